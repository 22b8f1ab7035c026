//! uvm: a minimal virtual machine monitor for utility VMs.

// The host side of the agent's vsock link, and what only Unix hosts have.
#[cfg(target_os = "linux")]
pub mod agent;
pub mod boot;
#[cfg(unix)]
pub mod clock;
pub mod console;
pub mod cpuid;
pub mod hypervisor;
pub mod layer;
pub mod memory;
pub mod process;
pub mod pvm;
pub mod rss;
pub mod scratch;
#[cfg(target_os = "linux")]
pub mod signals;
// Utility VMs between commands: their state directories and control sockets.
#[cfg(target_os = "linux")]
pub mod state;
pub mod sys;
// Snapshots of booted VMs that `uvm run` starts from.
#[cfg(target_os = "linux")]
pub mod template;
#[cfg(unix)]
pub mod terminal;
pub mod vm;
// Host directories and files in the container, as layer images.
#[cfg(target_os = "linux")]
pub mod volume;

/// `N` bytes from the host's random pool.
#[cfg(target_os = "linux")]
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut bytes = [0; N];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes)
}

/// Locks `m` even if a thread panicked while holding it: the VMM's shared
/// state stays usable, and the process must still report and exit.
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `e` and its causes, each said once: a library error's message often
/// ends with its source's already.
pub fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1).map(ToString::to_string) {
        if !text.ends_with(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("state directory /x: {source}")]
        struct Io {
            source: std::io::Error,
        }
        let io = || std::io::Error::from_raw_os_error(libc::ENOTDIR);
        let e = anyhow::Error::from(Io { source: io() });
        assert_eq!(super::describe(&e), format!("state directory /x: {}", io()));
        let e = anyhow::Error::from(io()).context("reading the config");
        assert_eq!(super::describe(&e), format!("reading the config: {}", io()));
    }
}
