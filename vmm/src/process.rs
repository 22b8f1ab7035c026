//! The one process a utility VM runs: what the host asks for and how it
//! ended, whichever way the request reaches the agent.

use std::path::PathBuf;

use guest::protocol::{
    Exited, Failed, Hook, Mount, MountKind, Process, Rlimit, Root, Run, TtySize,
};

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
    /// The container's host name [default: `uvm`].
    pub hostname: Option<String>,
    /// Mounts in the container besides its root, in order.
    pub mounts: Vec<ContainerMount>,
    /// Resource limits set before it runs.
    pub rlimits: Vec<Rlimit>,
    /// Programs run in the container just before it (see [`Hook`]).
    pub hooks: Vec<Hook>,
}

/// A mount in the container, as the host asks for it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerMount {
    /// An absolute path in the container.
    pub destination: String,
    pub source: MountSource,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MountSource {
    /// A host directory or file (`-v`, an OCI bind mount), which
    /// [`crate::volume::attach`] makes a share.
    Host(PathBuf),
    /// What a host source became: the VM's shared directory `index`, or
    /// its one file `file`.
    Share {
        index: u32,
        file: Option<String>,
    },
    Tmpfs,
    Sysfs,
}

impl ContainerMount {
    /// The agent's mount, once its source is in the VM.
    fn request(&self) -> Option<Mount> {
        let kind = match &self.source {
            MountSource::Host(_) => return None,
            MountSource::Share { index, file } => MountKind::Share {
                index: *index,
                file: file.clone(),
            },
            MountSource::Tmpfs => MountKind::Tmpfs,
            MountSource::Sysfs => MountKind::Sysfs,
        };
        Some(Mount {
            destination: self.destination.clone(),
            kind,
            read_only: self.read_only,
        })
    }
}

impl ProcessSpec {
    /// A host source no layer stands for yet: what the VM cannot mount.
    pub fn unattached(&self) -> Option<&std::path::Path> {
        self.mounts.iter().find_map(|m| match &m.source {
            MountSource::Host(path) => Some(path.as_path()),
            _ => None,
        })
    }

    /// The agent's run request for this process, without stdio ports (a
    /// request on the kernel command line has none; the vsock link adds
    /// its own). Host sources not attached ([`Self::unattached`]) are left
    /// out.
    pub fn request(&self) -> Run {
        Run {
            process: Process {
                argv: self.argv.clone(),
                env: self.env.clone(),
                cwd: self.cwd.clone(),
                tty: self.tty,
                user: self.user.clone(),
                rlimits: self.rlimits.clone(),
                ..Process::default()
            },
            root: self.root,
            detached: self.detached,
            hostname: self.hostname.clone(),
            mounts: self
                .mounts
                .iter()
                .filter_map(ContainerMount::request)
                .collect(),
            hooks: self.hooks.clone(),
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

/// A host process's exit status as a shell reports it: its code, or 128 +
/// the signal that killed it.
#[cfg(unix)]
pub fn shell_status(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
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
            hostname: Some("box".into()),
            mounts: vec![
                ContainerMount {
                    destination: "/data".into(),
                    source: MountSource::Share {
                        index: 1,
                        file: None,
                    },
                    read_only: false,
                },
                ContainerMount {
                    destination: "/dev/shm".into(),
                    source: MountSource::Tmpfs,
                    read_only: false,
                },
            ],
            rlimits: vec![Rlimit {
                resource: "NOFILE".into(),
                soft: 8,
                hard: 9,
            }],
            hooks: vec![Hook {
                path: "/bin/hook".into(),
                args: Vec::new(),
                env: Vec::new(),
                timeout_secs: 3,
                input: "{}".into(),
            }],
        };
        assert_eq!(spec.unattached(), None);
        let Run {
            process,
            root,
            detached,
            hostname,
            mounts,
            hooks,
            ..
        } = spec.request();
        assert_eq!(hooks, spec.hooks);
        assert!(detached);
        assert_eq!(process.rlimits, spec.rlimits);
        assert_eq!(hostname.as_deref(), Some("box"));
        assert_eq!(
            mounts.iter().map(|m| &m.kind).collect::<Vec<_>>(),
            [
                &MountKind::Share {
                    index: 1,
                    file: None
                },
                &MountKind::Tmpfs
            ]
        );
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
    fn a_host_source_is_no_mount_until_a_layer_holds_it() {
        let spec = ProcessSpec {
            mounts: vec![ContainerMount {
                destination: "/data".into(),
                source: MountSource::Host("/srv".into()),
                read_only: true,
            }],
            ..ProcessSpec::default()
        };
        assert_eq!(spec.unattached(), Some(std::path::Path::new("/srv")));
        assert!(spec.request().mounts.is_empty());
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
