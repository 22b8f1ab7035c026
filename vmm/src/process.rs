//! The one process a utility VM runs: what the host asks for and how it
//! ended, whichever way the request reaches the agent.

use guest::protocol::{Exited, Failed, Process, Root, Run, TtySize};

/// The process to run in the guest.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    /// Who it runs as (see [`Process::user`]).
    pub user: Option<String>,
    /// Run on a guest pseudo-terminal of this size.
    pub tty: Option<TtySize>,
    /// The container root, if the process runs in one.
    pub root: Option<Root>,
    /// The VM runs in the background (see [`Run::detached`]).
    pub detached: bool,
}

impl ProcessSpec {
    /// The agent's run request for this process, without stdio ports (a
    /// request on the kernel command line has none; the vsock link adds
    /// its own).
    pub fn request(&self) -> Run {
        Run {
            process: Process {
                argv: self.argv.clone(),
                env: self.env.clone(),
                cwd: self.cwd.clone(),
                tty: self.tty,
                user: self.user.clone(),
                ..Process::default()
            },
            root: self.root,
            detached: self.detached,
            ..Run::default()
        }
    }
}

/// How the process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Exited(Exited),
    /// It never started (missing command, bad working directory).
    Failed(Failed),
}

/// What the agent prints on the console after running a request from the
/// kernel command line (no vsock), before the VM ends.
pub const EXIT_STATUS_LINE: &str = "uvm-agent: exit status ";

/// The exit status, as a shell reports it, in the agent's last exit-status
/// line on `console`.
pub fn exit_status_on_console(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(EXIT_STATUS_LINE))
        .and_then(|status| status.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_the_process_and_no_ports() {
        let spec = ProcessSpec {
            argv: vec!["/bin/sh".into()],
            env: vec!["A=1".into()],
            cwd: Some("/tmp".into()),
            user: Some("1000:50".into()),
            tty: Some(TtySize { rows: 5, cols: 9 }),
            root: Some(Root::default()),
            detached: true,
        };
        let Run {
            process,
            root,
            detached,
            ..
        } = spec.request();
        assert!(detached);
        assert_eq!(
            (process.argv, process.env, process.cwd, process.user),
            (spec.argv, spec.env, spec.cwd, spec.user)
        );
        assert_eq!((process.tty, root), (spec.tty, spec.root));
        assert_eq!(
            (process.stdin_port, process.stdout_port, process.stderr_port),
            (0, 0, None)
        );
    }

    #[test]
    fn the_last_exit_status_line_counts() {
        let console =
            "uvm-agent: ready\r\nuvm-agent: exit status 0\r\nuvm-agent: exit status 127\r\n";
        assert_eq!(exit_status_on_console(console), Some(127));
        assert_eq!(exit_status_on_console("uvm-agent: ready\n"), None);
        assert_eq!(exit_status_on_console("uvm-agent: exit status x\n"), None);
    }
}
