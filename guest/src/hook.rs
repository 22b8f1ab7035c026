//! Running an OCI hook: the host's (uvm-oci) and the container's (the
//! agent) alike.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
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
    let stdin = child.stdin.take().expect("piped");
    // Fed as the hook reads, between the checks of its status: a hook that
    // reads none of an input larger than the pipe holds must still meet
    // its timeout.
    if let Err(e) = set_nonblocking(&stdin) {
        stop(&mut child);
        return Err(e);
    }
    let mut input = Input {
        pipe: Some(stdin),
        rest: hook.input.as_bytes(),
    };
    let timeout = Duration::from_secs(hook.timeout_secs);
    let began = Instant::now();
    loop {
        input.feed();
        if let Some(status) = child.try_wait()? {
            return match status.success() {
                true => Ok(()),
                false => Err(io::Error::other(format!("it failed ({status})"))),
            };
        }
        if began.elapsed() > timeout {
            stop(&mut child);
            let e = format!("it did not end within {} s", hook.timeout_secs);
            return Err(io::Error::new(io::ErrorKind::TimedOut, e));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn set_nonblocking(pipe: &ChildStdin) -> io::Result<()> {
    let fd = pipe.as_raw_fd();
    // SAFETY: plain system calls on a descriptor we own.
    let set = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    match set {
        true => Ok(()),
        false => Err(io::Error::last_os_error()),
    }
}

/// What of a hook's input is still to go into its stdin (non-blocking).
struct Input<'a> {
    pipe: Option<ChildStdin>,
    rest: &'a [u8],
}

impl Input<'_> {
    /// Writes what the pipe takes now; closes it once all is written or
    /// the hook is gone (a broken pipe: Rust's runtime ignores SIGPIPE). A
    /// hook that does not read its input still runs.
    fn feed(&mut self) {
        let Some(pipe) = &mut self.pipe else {
            return;
        };
        while !self.rest.is_empty() {
            match pipe.write(self.rest) {
                Ok(n) => self.rest = &self.rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.pipe = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_that_reads_none_of_a_large_input_still_meets_its_timeout() {
        let hook = Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), "sleep 30".into()],
            env: Vec::new(),
            timeout_secs: 1,
            input: "x".repeat(1 << 20),
        };
        let began = Instant::now();
        let e = run(&hook, Stdio::null()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
    }
}
