//! `uvm start`, `stop`, `kill`, `wait` and `rm`.

use anyhow::bail;
use vmm::state::control::Request;
use vmm::state::{Entry, Phase, Root, Status};

use super::{ask, display_name, running};

#[derive(clap::Args)]
pub struct VmsArgs {
    /// IDs (or unique prefixes) or names.
    #[arg(required = true, value_name = "ID|NAME")]
    pub vms: Vec<String>,
}

#[derive(clap::Args)]
pub struct StopArgs {
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(short = 't', long = "time", value_name = "SECS", default_value_t = 10)]
    time: u64,
    #[command(flatten)]
    vms: VmsArgs,
}

#[derive(clap::Args)]
pub struct KillArgs {
    /// The signal, by name (TERM, SIGTERM) or number.
    #[arg(short = 's', long, default_value = "KILL", value_parser = parse_signal)]
    signal: i32,
    #[command(flatten)]
    vms: VmsArgs,
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Kill running VMs first.
    #[arg(short = 'f', long)]
    force: bool,
    #[command(flatten)]
    vms: VmsArgs,
}

pub fn stop(root: &Root, args: &StopArgs) -> anyhow::Result<i32> {
    each(&args.vms, |key| {
        let entry = running(root, key)?;
        stop_one(&entry, args.time)?;
        println!("{key}");
        Ok(())
    })
}

/// Asks the VMM to stop and waits until it has ended.
fn stop_one(entry: &Entry, timeout_secs: u64) -> anyhow::Result<()> {
    ask(entry, &Request::Stop { timeout_secs })?;
    entry.wait_ended()?;
    Ok(())
}

pub fn start(root: &Root, args: &VmsArgs) -> anyhow::Result<i32> {
    each(args, |key| {
        let entry = running(root, key)?;
        ask(&entry, &Request::Start)?;
        // So that `ps` (and an OCI runtime's state) says running from now.
        entry.wait_past(Phase::Created, RECORD_UPDATE)?;
        println!("{key}");
        Ok(())
    })
}

/// How long a VMM may take to record what it answered for.
const RECORD_UPDATE: std::time::Duration = std::time::Duration::from_secs(5);

pub fn kill(root: &Root, args: &KillArgs) -> anyhow::Result<i32> {
    each(&args.vms, |key| {
        ask(&running(root, key)?, &Request::Kill(args.signal))?;
        println!("{key}");
        Ok(())
    })
}

pub fn wait(root: &Root, args: &VmsArgs) -> anyhow::Result<i32> {
    let mut last = 0;
    for key in &args.vms {
        let entry = root.find(key)?;
        entry.wait_ended()?;
        if !entry.record.detached && !entry.dir.exists() {
            bail!(
                "utility VM {} ran in the foreground: its uvm run has exited with its status",
                display_name(&entry)
            );
        }
        let record = entry.reread()?;
        match record.status(false) {
            Status::Exited(code) => {
                println!("{code}");
                last = code;
            }
            _ => bail!(
                "utility VM {}: its VMM process died without recording an exit code",
                display_name(&entry)
            ),
        }
    }
    Ok(last)
}

pub fn rm(root: &Root, args: &RmArgs) -> anyhow::Result<i32> {
    each(&args.vms, |key| {
        let entry = root.find(key)?;
        if !entry.ended() {
            if !args.force {
                bail!(
                    "utility VM {} is running: stop it first, or use rm -f",
                    display_name(&entry)
                );
            }
            stop_one(&entry, 0)?;
        }
        root.remove(&entry)?;
        println!("{key}");
        Ok(())
    })
}

/// Runs `one` for each VM; an error for one is reported and the others
/// still go, and the exit status says whether any failed.
fn each(vms: &VmsArgs, mut one: impl FnMut(&str) -> anyhow::Result<()>) -> anyhow::Result<i32> {
    let mut failed = None;
    for key in &vms.vms {
        if let Err(e) = one(key) {
            if vms.vms.len() == 1 {
                return Err(e);
            }
            eprintln!("uvm: error: {}", vmm::describe(&e));
            failed = Some(1);
        }
    }
    Ok(failed.unwrap_or(0))
}

const SIGNALS: [(&str, i32); 16] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
];

/// `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(text: &str) -> Result<i32, String> {
    if let Ok(number) = text.parse::<i32>() {
        return match (1..=guest::protocol::MAX_SIGNAL).contains(&number) {
            true => Ok(number),
            false => Err(format!(
                "signal {number} is not 1-{}",
                guest::protocol::MAX_SIGNAL
            )),
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|&(_, number)| number)
        .ok_or_else(|| format!("unknown signal `{text}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("sigkill"), Ok(libc::SIGKILL));
        assert_eq!(parse_signal("10"), Ok(10));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("BOGUS").is_err());
    }
}
