//! The host↔agent protocol, shared by both sides (see PROTOCOL.md). Every
//! message is a 16-byte little-endian header — kind, body size, id — and a
//! JSON body.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The host port the agent connects to when it starts.
pub const CONTROL_PORT: u32 = 1024;
pub const HEADER_LEN: usize = 16;
/// Larger bodies are refused: no message needs more.
pub const MAX_BODY: u32 = 1 << 20;

/// A message type with its header kind.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: u32;
}

/// What every process the agent starts has: its command, environment,
/// working directory, terminal and the host ports of its stdio.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, on top of the agent's defaults.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this size; stderr then shares stdout.
    pub tty: Option<TtySize>,
    /// Host ports the agent connects to for the process's stdio.
    pub stdin_port: u32,
    pub stdout_port: u32,
    /// Absent with a tty.
    pub stderr_port: Option<u32>,
    /// `user`, `uid`, `user:group` or `uid:gid`, looked up in the
    /// container's /etc/passwd and /etc/group; absent: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Resource limits to set before it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
}

/// A resource limit: `resource` by its name without `RLIMIT_` (`NOFILE`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

/// Host → agent: start the VM's one container process (its main process).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    #[serde(flatten)]
    pub process: Process,
    /// The container root to assemble and run in; absent: run in the
    /// agent's own root (the initrd).
    pub root: Option<Root>,
    /// The VM's tools (an ext4 image of busybox and its commands) are
    /// `/dev/pmemN`, for processes in the VM itself (a console).
    #[serde(default)]
    pub tools: Option<u32>,
    /// What a guest restored from a snapshot (taken while the agent waited
    /// for this request) needs, because its random pool and clock are the
    /// saved guest's; a cold-booted agent ignores it.
    #[serde(default)]
    pub fresh: Fresh,
    /// The VM runs in the background: the agent relays the process's
    /// output through pipes instead of handing it the streams, so that its
    /// output outlives the streams when a snapshot of the VM is restored
    /// (see [`Resumed`]); its stdin is /dev/null.
    #[serde(default)]
    pub detached: bool,
    /// The container's host name [default: `uvm`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Mounts in the container besides its root, made in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Programs run in the container before the process, in order, each
    /// once the one before succeeded (OCI startContainer hooks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
}

/// A program run in the container just before its process: as its user,
/// in its namespaces, root and working directory, with `input` on its
/// stdin and its output on the process's stderr. One that fails or
/// outlasts its timeout keeps the process from running: the container
/// ends with status 125 and the reason on its stderr.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// An absolute path in the container.
    pub path: String,
    /// Its whole command line, `argv[0]` included [default: `path`].
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=VALUE` entries: all of its environment.
    #[serde(default)]
    pub env: Vec<String>,
    pub timeout_secs: u64,
    #[serde(default)]
    pub input: String,
}

/// A mount in the container (OCI config.json's mounts, `uvm run -v`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// An absolute path in the container.
    pub destination: String,
    pub kind: MountKind,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// A host directory shared live (virtio-fs, the tag
    /// [`crate::share_tag`]`(index)`): writes reach the host. With `file`,
    /// only that file of it (a one-file directory the VMM made for a
    /// bind mount of a file).
    Share {
        index: u32,
        file: Option<String>,
    },
    Tmpfs,
    Sysfs,
}

/// Fresh randomness and the time, from the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fresh {
    /// Mixed into the guest's pool, which then reseeds (the agent uses at
    /// most [`Fresh::MAX_ENTROPY`] bytes).
    pub entropy: Vec<u8>,
    /// The host's wall clock when it sent the request, in nanoseconds
    /// since the Unix epoch.
    pub realtime_ns: u64,
}

impl Fresh {
    pub const MAX_ENTROPY: usize = 64;
}

/// Host → agent: start another process while the main one runs: in the
/// container (its root, namespaces and environment), or with `in_vm` in
/// the utility VM itself, outside the container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    #[serde(flatten)]
    pub process: Process,
    pub in_vm: bool,
}

/// A container root: the pmem layers (`/dev/pmem0` at the bottom) stacked
/// under a writable layer with overlayfs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub layers: u32,
    /// Mount the layers with DAX (falling back to a plain mount).
    pub dax: bool,
    /// The writable layer is the disk with serial `uvm-scratch` (ext4), not
    /// a tmpfs.
    pub scratch: bool,
    /// The layers are read-only virtio disks with serials `uvm-layerN`
    /// instead of pmem (no DAX).
    #[serde(default)]
    pub layer_disks: bool,
    /// The root is shared host directory N (virtio-fs, writable; no
    /// layers): mounted when the run request comes, not at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Host → agent: deliver a signal to the process of the message's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub signal: i32,
}

/// Host → agent: the terminal of the process of the message's id changed size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub size: TtySize,
}

/// Agent → host, first on the control stream: the agent's connection is
/// complete and it waits for work. A VM saved after this (a template) has
/// its agent blocked on the stream, not halfway through connecting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {}

/// Agent → host, first on the control stream of a VM restored from a
/// snapshot taken while its detached main process (the message's id) ran:
/// the agent connected again and waits for [`Fresh`], then connects the
/// process's stdio ports again (output from then on goes to the new host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    pub pid: i32,
    pub tty: bool,
}

/// Agent → host: the process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: i32,
}

/// Agent → host: the process could not be started. `exit_code` follows the
/// shell: 127 not found, 126 not executable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub message: String,
    pub exit_code: i32,
}

/// Agent → host: the process ended; the guest's file systems are synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exited {
    Code(i32),
    Signal(i32),
}

/// The highest signal number on Linux (SIGRTMAX).
pub const MAX_SIGNAL: i32 = 64;

impl Exited {
    /// This status if a Linux process can end with it: a code of 0-255 or a
    /// signal of 1-64. A host checks what an agent reports before it turns
    /// it into a number of its own.
    pub fn checked(self) -> Result<Self, String> {
        match self {
            Exited::Code(0..=255) => Ok(self),
            Exited::Signal(1..=MAX_SIGNAL) => Ok(self),
            Exited::Code(code) => Err(format!("exit code {code} is not 0-255")),
            Exited::Signal(signal) => Err(format!("signal {signal} is not 1-{MAX_SIGNAL}")),
        }
    }

    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_status(self) -> i32 {
        match self {
            Exited::Code(code) => code,
            Exited::Signal(signal) => 128 + signal,
        }
    }
}

impl Message for Run {
    const KIND: u32 = 1;
}
impl Message for Signal {
    const KIND: u32 = 2;
}
impl Message for Resize {
    const KIND: u32 = 3;
}
impl Message for Exec {
    const KIND: u32 = 4;
}
impl Message for Fresh {
    const KIND: u32 = 5;
}
impl Message for Ready {
    const KIND: u32 = 0x100;
}
impl Message for Started {
    const KIND: u32 = 0x101;
}
impl Message for Failed {
    const KIND: u32 = 0x102;
}
impl Message for Exited {
    const KIND: u32 = 0x103;
}
impl Message for Resumed {
    const KIND: u32 = 0x104;
}

/// One received message, not yet decoded.
#[derive(Debug)]
pub struct Frame {
    pub kind: u32,
    pub id: u64,
    pub body: Vec<u8>,
}

impl Frame {
    /// The body as `M`, if this frame is one.
    pub fn decode<M: Message>(&self) -> io::Result<M> {
        if self.kind != M::KIND {
            return Err(invalid(format!(
                "expected message kind {:#x}, got {:#x}",
                M::KIND,
                self.kind
            )));
        }
        serde_json::from_slice(&self.body).map_err(|e| invalid(e.to_string()))
    }
}

/// Sends `msg` in one write, so that writers sharing a stream never interleave.
pub fn send<M: Message>(w: &mut impl Write, id: u64, msg: &M) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let size = u32::try_from(body.len())
        .ok()
        .filter(|&s| s <= MAX_BODY)
        .ok_or_else(|| invalid("message too large".into()))?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&M::KIND.to_le_bytes());
    frame.extend_from_slice(&size.to_le_bytes());
    frame.extend_from_slice(&id.to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)
}

/// The next message, or `None` if the stream ended between messages.
pub fn receive(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut header = [0u8; HEADER_LEN];
    match r.read(&mut header[..1])? {
        0 => return Ok(None),
        _ => r.read_exact(&mut header[1..])?,
    }
    let [k0, k1, k2, k3, s0, s1, s2, s3, id @ ..] = header;
    let kind = u32::from_le_bytes([k0, k1, k2, k3]);
    let size = u32::from_le_bytes([s0, s1, s2, s3]);
    let id = u64::from_le_bytes(id);
    if size > MAX_BODY {
        return Err(invalid(format!("message body of {size} bytes")));
    }
    let mut body = vec![0; size as usize];
    r.read_exact(&mut body)?;
    Ok(Some(Frame { kind, id, body }))
}

/// Kernel command-line parameter that carries a [`Run`] for a VMM without
/// vsock (the agent then runs it on the console, with no host connection).
pub const CMDLINE_RUN: &str = "uvm.run=";

/// Kernel command-line parameter that carries the [`Root`] the VM's runs
/// use, for the agent to assemble before it connects (so that a template
/// taken then has it).
pub const CMDLINE_ROOT: &str = "uvm.root=";

/// `uvm.run=<hex of the JSON of run>`: hex, because the kernel splits its
/// command line on spaces and quotes.
pub fn to_cmdline(run: &Run) -> String {
    encode(CMDLINE_RUN, run)
}

/// The [`Run`] in a kernel command line, if it carries one.
pub fn from_cmdline(cmdline: &str) -> io::Result<Option<Run>> {
    decode(CMDLINE_RUN, cmdline)
}

/// `uvm.root=<hex of the JSON of root>`.
pub fn root_to_cmdline(root: &Root) -> String {
    encode(CMDLINE_ROOT, root)
}

/// The [`Root`] in a kernel command line, if it carries one.
pub fn root_from_cmdline(cmdline: &str) -> io::Result<Option<Root>> {
    decode(CMDLINE_ROOT, cmdline)
}

fn encode(parameter: &str, value: &impl Serialize) -> String {
    let json = serde_json::to_vec(value).expect("protocol values always serialize");
    let hex: String = json.iter().map(|b| format!("{b:02x}")).collect();
    format!("{parameter}{hex}")
}

fn decode<T: DeserializeOwned>(parameter: &str, cmdline: &str) -> io::Result<Option<T>> {
    let Some(hex) = cmdline
        .split_ascii_whitespace()
        .find_map(|arg| arg.strip_prefix(parameter))
    else {
        return Ok(None);
    };
    let digit = |i: usize| {
        hex.get(i..i + 2)
            .and_then(|d| u8::from_str_radix(d, 16).ok())
            .ok_or_else(|| invalid(format!("{parameter}: bad hex at {i}")))
    };
    let json = (0..hex.len())
        .step_by(2)
        .map(digit)
        .collect::<io::Result<Vec<u8>>>()?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| invalid(format!("{parameter}: {e}")))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_the_documented_header() {
        let run = Run {
            process: Process {
                argv: vec!["/bin/echo".into(), "hi".into()],
                env: vec!["A=1".into()],
                cwd: Some("/tmp".into()),
                tty: None,
                stdin_port: 1025,
                stdout_port: 1026,
                stderr_port: Some(1027),
                user: Some("app".into()),
                rlimits: vec![Rlimit {
                    resource: "NOFILE".into(),
                    soft: 1024,
                    hard: 4096,
                }],
            },
            root: Some(Root {
                layers: 2,
                dax: true,
                scratch: true,
                layer_disks: false,
                share: None,
            }),
            tools: Some(2),
            fresh: Fresh {
                entropy: vec![1, 2, 3],
                realtime_ns: 1_796_566_416_000_000_000,
            },
            detached: true,
            hostname: Some("box".into()),
            mounts: vec![Mount {
                destination: "/data".into(),
                kind: MountKind::Share {
                    index: 2,
                    file: Some("hosts".into()),
                },
                read_only: true,
            }],
            hooks: vec![Hook {
                path: "/bin/hook".into(),
                args: vec!["hook".into()],
                env: vec!["A=1".into()],
                timeout_secs: 3,
                input: "{}".into(),
            }],
        };
        let mut wire = Vec::new();
        send(&mut wire, 7, &run).unwrap();
        send(&mut wire, 8, &Exited::Signal(9)).unwrap();
        assert_eq!(&wire[0..4], &1u32.to_le_bytes());
        let body_len = u32::from_le_bytes(wire[4..8].try_into().unwrap()) as usize;
        assert_eq!(&wire[8..16], &7u64.to_le_bytes());
        assert_eq!(wire[HEADER_LEN], b'{');

        let mut r = &wire[..];
        let frame = receive(&mut r).unwrap().unwrap();
        assert_eq!((frame.kind, frame.id, frame.body.len()), (1, 7, body_len));
        assert_eq!(frame.decode::<Run>().unwrap(), run);
        assert!(frame.decode::<Signal>().is_err());
        let exit = receive(&mut r)
            .unwrap()
            .unwrap()
            .decode::<Exited>()
            .unwrap();
        assert_eq!(exit.shell_status(), 137);
        assert!(receive(&mut r).unwrap().is_none());
    }

    #[test]
    fn only_statuses_a_process_can_end_with_pass_the_check() {
        for ok in [
            Exited::Code(0),
            Exited::Code(255),
            Exited::Signal(1),
            Exited::Signal(64),
        ] {
            assert_eq!(ok.checked(), Ok(ok));
        }
        for bad in [
            Exited::Code(-1),
            Exited::Code(256),
            Exited::Signal(0),
            Exited::Signal(65),
            Exited::Signal(i32::MAX),
        ] {
            assert!(bad.checked().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_run_travels_on_the_kernel_command_line() {
        let run = Run {
            process: Process {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo 'a b' \"c\"".into()],
                ..Process::default()
            },
            root: Some(Root {
                layers: 1,
                layer_disks: true,
                share: Some(1),
                ..Root::default()
            }),
            ..Run::default()
        };
        let arg = to_cmdline(&run);
        assert!(!arg.contains([' ', '"', '\'']));
        let cmdline = format!("console=ttyS0 {arg} quiet");
        assert_eq!(from_cmdline(&cmdline).unwrap(), Some(run.clone()));
        assert_eq!(from_cmdline("console=ttyS0 quiet").unwrap(), None);
        assert!(from_cmdline("uvm.run=7b2").is_err());
        assert!(from_cmdline("uvm.run=zz").is_err());
        assert!(from_cmdline("uvm.run=7b7d").is_err()); // `{}`: no argv

        let root = Root {
            layers: 3,
            dax: true,
            ..Root::default()
        };
        let both = format!("{cmdline} {}", root_to_cmdline(&root));
        assert_eq!(root_from_cmdline(&both).unwrap(), Some(root));
        assert_eq!(from_cmdline(&both).unwrap().map(|r| r.root), Some(run.root));
        assert_eq!(root_from_cmdline(&cmdline).unwrap(), None);
        assert!(root_from_cmdline("uvm.root=7b").is_err());
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut huge = Vec::new();
        huge.extend_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&0u64.to_le_bytes());
        assert!(receive(&mut &huge[..]).is_err());
        let truncated = &huge[..10];
        assert!(receive(&mut &truncated[..]).is_err());
        let mut garbage = Vec::new();
        garbage.extend_from_slice(&Signal::KIND.to_le_bytes());
        garbage.extend_from_slice(&3u32.to_le_bytes());
        garbage.extend_from_slice(&0u64.to_le_bytes());
        garbage.extend_from_slice(b"{{{");
        let frame = receive(&mut &garbage[..]).unwrap().unwrap();
        assert!(frame.decode::<Signal>().is_err());
    }
}
