//! While a process runs in the guest, the signals that would end uvm go to
//! that process instead, like `docker run` does.

use std::io;

/// Ctrl-C, termination, hang-up and Ctrl-\.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The forwarded signals, blocked in the calling thread and every thread it
/// starts afterwards: call it before starting any.
pub struct Blocked(libc::sigset_t);

pub fn block() -> io::Result<Blocked> {
    // SAFETY: sigemptyset/sigaddset initialise the set we own; a zeroed
    // sigset_t is valid storage for them.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED {
            libc::sigaddset(&mut set, signal);
        }
        set
    };
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(Blocked(set))
}

impl Blocked {
    /// Hands each arriving signal to `handle` on a thread of its own.
    pub fn forward(self, mut handle: impl FnMut(i32) + Send + 'static) -> io::Result<()> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut signal = 0;
                // SAFETY: the set is initialised and `signal` is valid storage.
                if unsafe { libc::sigwait(&self.0, &mut signal) } == 0 {
                    handle(signal);
                }
            })?;
        Ok(())
    }
}
