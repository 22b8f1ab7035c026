//! Starting processes: their stdio streams to the host, command line,
//! environment, working directory, pseudo-terminal, and where they run.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio as StdStdio};

use guest::protocol::{Exited, Failed, Process, TtySize};
use guest::vsock;

use crate::check;
use crate::root::{self, Container};
use crate::user;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process's stdio streams to the host, connected before it starts.
pub struct Streams {
    stdin: File,
    stdout: File,
    stderr: Option<File>,
}

impl Streams {
    /// The console for output and nothing for input: a run without a host
    /// connection.
    pub fn console() -> io::Result<Self> {
        let dup = |fd: RawFd| -> io::Result<File> {
            // SAFETY: plain system call; the result is checked.
            let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            check(new)?;
            // SAFETY: a new descriptor that nothing else owns.
            Ok(File::from(unsafe { OwnedFd::from_raw_fd(new) }))
        };
        Ok(Self {
            stdin: File::open("/dev/null")?,
            stdout: dup(libc::STDOUT_FILENO)?,
            stderr: Some(dup(libc::STDERR_FILENO)?),
        })
    }

    pub fn connect(process: &Process) -> io::Result<Self> {
        Ok(Self {
            stdin: vsock::connect(process.stdin_port)?,
            stdout: vsock::connect(process.stdout_port)?,
            stderr: process.stderr_port.map(vsock::connect).transpose()?,
        })
    }
}

/// Where a process runs.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// In the agent's own root and namespaces: the utility VM itself.
    Vm,
    /// In a new container on the assembled root (the main process).
    NewContainer,
    /// In the running container (an exec).
    Container(&'a Container),
}

/// A started process, as the supervisor watches it.
pub struct Child {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    /// Copies between its terminal and the host, with a tty.
    pub relay: Option<Relay>,
    /// The agent's own ends of its stdio streams (without a tty): shut
    /// down when it ends, so the host sees their end even if something it
    /// started still holds them.
    pub streams: Vec<File>,
}

impl Child {
    /// Ends the host's streams: the terminal's last output first.
    pub fn close_streams(&mut self) {
        if let Some(relay) = &mut self.relay {
            relay.drain();
        }
        self.relay = None;
        for stream in self.streams.drain(..) {
            // SAFETY: plain system call on a socket we own.
            unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// Starts `process` at `place` with `streams` as its stdio.
pub fn start(process: &Process, place: Place, streams: Streams) -> Result<Child, Failed> {
    let started = match process.tty {
        Some(size) => start_on_tty(process, place, size, streams),
        None => start_plain(process, place, streams),
    };
    started.map_err(|e| failure(process, &e))
}

fn start_plain(process: &Process, place: Place, streams: Streams) -> io::Result<Child> {
    let stderr = match &streams.stderr {
        Some(file) => StdStdio::from(file.try_clone()?),
        None => StdStdio::null(),
    };
    let child = command(process, place)?
        .stdin(streams.stdin.try_clone()?)
        .stdout(streams.stdout.try_clone()?)
        .stderr(stderr)
        .spawn()?;
    let Streams {
        stdin,
        stdout,
        stderr,
    } = streams;
    Ok(Child {
        pid: child.id() as libc::pid_t,
        pidfd: pidfd_open(child.id() as libc::pid_t)?,
        relay: None,
        streams: [Some(stdin), Some(stdout), stderr]
            .into_iter()
            .flatten()
            .collect(),
    })
}

fn start_on_tty(
    process: &Process,
    place: Place,
    size: TtySize,
    streams: Streams,
) -> io::Result<Child> {
    mount_devpts()?;
    let (master, slave) = openpty(size)?;
    let mut cmd = command(process, place)?;
    cmd.stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    // SAFETY: between fork and exec only async-signal-safe calls (setsid,
    // ioctl) run; both act on the child alone.
    unsafe {
        cmd.pre_exec(|| {
            check(libc::setsid())?;
            check(libc::ioctl(0, libc::TIOCSCTTY, 0))
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    Ok(Child {
        pid,
        pidfd: pidfd_open(pid)?,
        relay: Some(Relay {
            master,
            hung_up: false,
            stdin: Some(streams.stdin),
            stdout: streams.stdout,
        }),
        streams: Vec::new(),
    })
}

/// The command line, environment and working directory of `process`, to
/// run at `place`.
fn command(process: &Process, place: Place) -> io::Result<Command> {
    let (program, args) = process
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let cwd = process.cwd.as_deref().unwrap_or("/");
    // Seen from the agent, the container's directories are under its root.
    let prefix = match place {
        Place::Vm => "",
        Place::NewContainer => root::ROOT,
        Place::Container(_) => root::ROOT,
    };
    let dir = std::fs::metadata(format!("{prefix}/{cwd}"))
        .map_err(|e| io::Error::new(e.kind(), format!("working directory {cwd}: {e}")))?;
    if !dir.is_dir() {
        let e = format!("working directory {cwd}: not a directory");
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
    }
    let ids = process
        .user
        .as_deref()
        .map(|spec| user::resolve(spec, prefix))
        .transpose()?;
    let home = ids.as_ref().and_then(|ids| ids.home.as_deref());
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear();
    cmd.env("PATH", DEFAULT_PATH)
        .env("HOME", home.unwrap_or("/root"));
    if process.tty.is_some() {
        cmd.env("TERM", "xterm");
    }
    for entry in &process.env {
        match entry.split_once('=') {
            Some((key, value)) => cmd.env(key, value),
            None => cmd.env(entry, ""),
        };
    }
    let (tty, cwd_c) = (process.tty.is_some(), root::cstring(cwd.to_string())?);
    match place {
        Place::Vm => {
            cmd.current_dir(cwd);
        }
        Place::NewContainer => {
            // SAFETY: between fork and exec only system calls run (mount,
            // chroot, chdir: async-signal-safe), on the child alone.
            unsafe { cmd.pre_exec(move || root::enter(tty, &cwd_c)) };
        }
        Place::Container(container) => {
            let joined = container.namespaces()?;
            // SAFETY: between fork and exec only system calls run (setns,
            // fchdir, chroot, chdir: async-signal-safe), on the child alone.
            unsafe { cmd.pre_exec(move || joined.enter(&cwd_c)) };
        }
    }
    if let Some(ids) = ids {
        // SAFETY: only system calls run (setgroups, setgid, setuid:
        // async-signal-safe), on the child alone, after it entered its root.
        unsafe { cmd.pre_exec(move || user::become_ids(&ids)) };
    }
    Ok(cmd)
}

/// The agent's side of a pseudo-terminal: it copies between the master and
/// the host streams.
pub struct Relay {
    pub master: File,
    /// Every slave end is closed: stop polling the master, which would
    /// report the hang-up at once, forever.
    pub hung_up: bool,
    pub stdin: Option<File>,
    stdout: File,
}

impl Relay {
    /// The terminal's output to the host.
    pub fn forward_output(&mut self) {
        self.hung_up = !matches!(copy_once(&mut self.master, &mut self.stdout), Ok(n) if n > 0);
    }

    /// Host input to the terminal; at its end, the terminal's EOF character.
    pub fn forward_input(&mut self) {
        let Some(stdin) = &mut self.stdin else {
            return;
        };
        if !matches!(copy_once(stdin, &mut self.master), Ok(n) if n > 0) {
            let _ = self.master.write_all(&[4]); // ^D
            self.stdin = None;
        }
    }

    pub fn resize(&self, size: TtySize) {
        let winsize = winsize(size);
        // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    }

    /// What the process wrote before it ended.
    fn drain(&mut self) {
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(self.master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        while matches!(copy_once(&mut self.master, &mut self.stdout), Ok(n) if n > 0) {}
    }
}

/// One read from `from`, all of it written to `to`.
fn copy_once(from: &mut File, to: &mut File) -> io::Result<usize> {
    let mut buf = [0u8; 16 * 1024];
    let n = from.read(&mut buf)?;
    to.write_all(&buf[..n])?;
    Ok(n)
}

fn mount_devpts() -> io::Result<()> {
    match std::fs::create_dir("/dev/pts") {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        result => result?,
    }
    crate::mount(c"devpts", c"/dev/pts", c"devpts")
}

fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn openpty(size: TtySize) -> io::Result<(File, File)> {
    let (mut master, mut slave): (RawFd, RawFd) = (-1, -1);
    let winsize = winsize(size);
    // SAFETY: the out-pointers are valid; name and termios may be null.
    check(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &winsize,
        )
    })?;
    // SAFETY: openpty returned two new descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: plain fcntl on a descriptor we own.
    check(unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok((File::from(master), File::from(slave)))
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// How a process ended, from its wait status.
pub fn exited(status: libc::c_int) -> Exited {
    if libc::WIFSIGNALED(status) {
        Exited::Signal(libc::WTERMSIG(status))
    } else {
        Exited::Code(libc::WEXITSTATUS(status))
    }
}

/// Why the process could not start, with the shell's exit status for it.
pub fn failure(process: &Process, e: &io::Error) -> Failed {
    let program = process.argv.first().map_or("", String::as_str);
    let exit_code = match e.kind() {
        io::ErrorKind::NotFound => 127,
        _ => 126,
    };
    Failed {
        message: format!("{program}: {e}"),
        exit_code,
    }
}
