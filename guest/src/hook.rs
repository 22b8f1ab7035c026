//! Running an OCI hook: the host's (uvm-oci) and the container's (the
//! agent) alike.

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::protocol::Hook;

/// Runs `hook` with its input on stdin, its stdout to `stdout` and its
/// stderr ours, and waits for it to succeed within its timeout.
pub fn run(hook: &Hook, stdout: impl Into<Stdio>) -> io::Result<()> {
    let mut command = Command::new(&hook.path);
    if let Some((first, rest)) = hook.args.split_first() {
        command.arg0(first).args(rest);
    }
    command.env_clear();
    for entry in &hook.env {
        if let Some((key, value)) = entry.split_once('=') {
            command.env(key, value);
        }
    }
    let mut child = command.stdin(Stdio::piped()).stdout(stdout).spawn()?;
    // A hook that does not read its input still runs.
    let _ = child
        .stdin
        .take()
        .expect("piped")
        .write_all(hook.input.as_bytes());
    let timeout = Duration::from_secs(hook.timeout_secs);
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return match status.success() {
                true => Ok(()),
                false => Err(io::Error::other(format!("it failed ({status})"))),
            };
        }
        if began.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let e = format!("it did not end within {} s", hook.timeout_secs);
            return Err(io::Error::new(io::ErrorKind::TimedOut, e));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
