//! Starting processes: their stdio streams to the host, command line,
//! environment, working directory, pseudo-terminal, and where they run.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use guest::protocol::{Exited, Failed, Process, TtySize};
use guest::vsock;

use crate::check;
use crate::hooks;
use crate::limits;
use crate::root::{self, Container, Setup};
use crate::spawn::{Spawn, Step};
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
    /// In a new container on the assembled root (the main process), set up
    /// so.
    NewContainer(&'a Setup),
    /// In the running container (an exec).
    Container(&'a Container),
}

/// A started process, as the supervisor watches it.
pub struct Child {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    /// Copies between it and the host, with a tty or detached.
    pub relay: Option<Relay>,
    /// The agent's own ends of its stdio streams (without a relay): shut
    /// down when it ends, so the host sees their end even if something it
    /// started still holds them.
    pub streams: Vec<File>,
}

impl Child {
    /// Ends the host's streams: the relayed last output first.
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

/// Starts `process` at `place` with `streams` as its stdio; `detached`:
/// through a relay even without a tty (see [`guest::protocol::Run`]).
pub fn start(
    process: &Process,
    place: Place,
    streams: Streams,
    detached: bool,
) -> Result<Child, Failed> {
    let started = match (process.tty, detached) {
        (Some(size), _) => start_on_tty(process, place, size, streams),
        (None, true) => start_relayed(process, place, streams),
        (None, false) => start_plain(process, place, streams),
    };
    started.map_err(|e| failure(process, &e))
}

fn start_plain(process: &Process, place: Place, streams: Streams) -> io::Result<Child> {
    let stderr = match &streams.stderr {
        Some(file) => file.try_clone()?,
        None => File::open("/dev/null")?,
    };
    let stdio = [
        streams.stdin.try_clone()?.into(),
        streams.stdout.try_clone()?.into(),
        stderr.into(),
    ];
    let pid = spawn(process, place, stdio, None)?;
    let Streams {
        stdin,
        stdout,
        stderr,
    } = streams;
    Ok(Child {
        pid,
        pidfd: pidfd_open(pid)?,
        relay: None,
        streams: [Some(stdin), Some(stdout), stderr]
            .into_iter()
            .flatten()
            .collect(),
    })
}

/// A detached process: /dev/null for input, its output through pipes
/// the agent copies to the host streams.
fn start_relayed(process: &Process, place: Place, streams: Streams) -> io::Result<Child> {
    let (stdout, stdout_end) = pipe()?;
    let (stderr, stderr_end) = pipe()?;
    let stdio = [
        File::open("/dev/null")?.into(),
        stdout_end.into(),
        stderr_end.into(),
    ];
    let pid = spawn(process, place, stdio, None)?;
    let mut relay = Relay {
        terminal: None,
        stdin: None,
        outputs: vec![Output::new(stdout, None), Output::new(stderr, None)],
    };
    relay.connect(streams);
    Ok(Child {
        pid,
        pidfd: pidfd_open(pid)?,
        relay: Some(relay),
        streams: Vec::new(),
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
    let stdio = [
        slave.try_clone()?.into(),
        slave.try_clone()?.into(),
        slave.into(),
    ];
    let controlling_terminal: Step = Box::new(|| {
        // SAFETY: plain system calls acting on the child alone.
        unsafe {
            check(libc::setsid())?;
            check(libc::ioctl(0, libc::TIOCSCTTY, 0))
        }
    });
    let pid = spawn(process, place, stdio, Some(controlling_terminal))?;
    Ok(Child {
        pid,
        pidfd: pidfd_open(pid)?,
        relay: Some(Relay {
            outputs: vec![Output::new(master.try_clone()?, Some(streams.stdout))],
            terminal: Some(master),
            stdin: Some(streams.stdin),
        }),
        streams: Vec::new(),
    })
}

/// Starts `process` at `place` with `stdio`, its command line,
/// environment, working directory and user; `last` is the child's final
/// step before it executes the program.
fn spawn(
    process: &Process,
    place: Place,
    stdio: [OwnedFd; 3],
    last: Option<Step>,
) -> io::Result<libc::pid_t> {
    let cwd = process.cwd.as_deref().unwrap_or("/");
    // Seen from the agent, the container's directories are under its root.
    let prefix = match place {
        Place::Vm => "",
        Place::NewContainer(_) => root::ROOT,
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
    let env = environment(process, home.unwrap_or("/root"));
    let hooks = match place {
        Place::NewContainer(setup) => setup.hooks.as_slice(),
        _ => &[],
    };
    let mut spawn = match hooks.is_empty() {
        true => Spawn::new(&process.argv, env, stdio)?,
        false => {
            let argv = hooks::command_line(hooks, &process.argv)?;
            let mut spawn = Spawn::new(&argv, env, stdio)?;
            spawn.program(hooks::agent_program()?);
            spawn
        }
    };
    let (tty, cwd_c) = (process.tty.is_some(), root::cstring(cwd.to_string())?);
    spawn.step(match place {
        // SAFETY: plain system call on a NUL-terminated string.
        Place::Vm => Box::new(move || check(unsafe { libc::chdir(cwd_c.as_ptr()) })),
        Place::NewContainer(setup) => {
            let setup = setup.clone();
            Box::new(move || root::enter(tty, &cwd_c, &setup))
        }
        Place::Container(container) => {
            let joined = container.namespaces()?;
            Box::new(move || joined.enter(&cwd_c))
        }
    });
    let limits = limits::resolve(&process.rlimits)?;
    if !limits.is_empty() {
        spawn.step(Box::new(move || limits::set(&limits)));
    }
    if let Some(ids) = ids {
        // After it entered its root: it may no longer be allowed to.
        spawn.step(Box::new(move || user::become_ids(&ids)));
    }
    if let Some(last) = last {
        spawn.step(last);
    }
    spawn.spawn()
}

/// The agent's defaults, then the process's own entries over them.
fn environment(process: &Process, home: &str) -> Vec<String> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), home.into()),
    ];
    if process.tty.is_some() {
        env.push(("TERM".into(), "xterm".into()));
    }
    for entry in &process.env {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        env.retain(|(k, _)| k != key);
        env.push((key.into(), value.into()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The agent between a process and the host: the master of its
/// pseudo-terminal, or the pipes of a detached process's output.
pub struct Relay {
    /// The terminal's master, for input and its size.
    terminal: Option<File>,
    pub stdin: Option<File>,
    pub outputs: Vec<Output>,
}

/// Output the agent copies to a host stream.
pub struct Output {
    pub from: File,
    /// `None` while there is no host stream to write to (it was reset by a
    /// restore, until the new host's is connected): not read meanwhile.
    to: Option<File>,
    /// Read but not yet written: at most one read's worth, kept when the
    /// host stream failed, for the next one.
    pending: Vec<u8>,
    /// Every writer is gone (for a terminal: every slave end is closed,
    /// and polling the master would report the hang-up at once, forever).
    ended: bool,
}

impl Output {
    fn new(from: File, to: Option<File>) -> Self {
        Self {
            from,
            to,
            pending: Vec::new(),
            ended: false,
        }
    }

    /// Whether to wait for its output.
    pub fn open(&self) -> bool {
        !self.ended && self.to.is_some()
    }

    /// One read copied to the host.
    pub fn forward(&mut self) {
        if self.to.is_none() {
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        match self.from.read(&mut buf) {
            Ok(n) if n > 0 => {
                self.pending.extend_from_slice(&buf[..n]);
                self.send_pending();
            }
            _ => self.ended = true,
        }
    }

    /// A host stream that fails is gone, not the output: what it did not
    /// take waits for the next host.
    fn send_pending(&mut self) {
        let Some(to) = &mut self.to else {
            return;
        };
        match to.write_all(&self.pending) {
            Ok(()) => self.pending.clear(),
            Err(_) => self.to = None,
        }
    }

    fn connect(&mut self, to: Option<File>) {
        self.to = to;
        self.send_pending();
    }

    fn drain(&mut self) {
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(self.from.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        while self.open() {
            self.forward();
        }
    }
}

impl Relay {
    /// Host input to the terminal; at its end, the terminal's EOF character.
    pub fn forward_input(&mut self) {
        let (Some(stdin), Some(terminal)) = (&mut self.stdin, &mut self.terminal) else {
            return;
        };
        if !matches!(copy_once(stdin, terminal), Ok(n) if n > 0) {
            let _ = terminal.write_all(&[4]); // ^D
            self.stdin = None;
        }
    }

    pub fn resize(&self, size: TtySize) {
        let Some(terminal) = &self.terminal else {
            return;
        };
        let winsize = winsize(size);
        // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer.
        unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    }

    /// The host's streams are gone (a restore reset them).
    pub fn disconnect(&mut self) {
        self.stdin = None;
        self.outputs.iter_mut().for_each(|o| o.to = None);
    }

    /// Output goes to `streams` from now on. Their stdin is not read: a
    /// detached process's input is empty.
    pub fn connect(&mut self, streams: Streams) {
        let to = [Some(streams.stdout), streams.stderr];
        for (output, to) in self.outputs.iter_mut().zip(to) {
            output.connect(to);
        }
    }

    /// What the process wrote before it ended.
    fn drain(&mut self) {
        self.outputs.iter_mut().for_each(Output::drain);
    }
}

/// One read from `from`, all of it written to `to`.
fn copy_once(from: &mut File, to: &mut File) -> io::Result<usize> {
    let mut buf = [0u8; 16 * 1024];
    let n = from.read(&mut buf)?;
    to.write_all(&buf[..n])?;
    Ok(n)
}

/// A pipe whose read end (first) stays with the agent.
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is valid storage for two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 made two new descriptors that nothing else owns.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(read), File::from(write)))
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
    Failed {
        message: format!("{program}: {e}"),
        exit_code: exec_status(e),
    }
}

/// The shell's exit status for a program that could not be executed.
pub fn exec_status(e: &io::Error) -> i32 {
    match e.kind() {
        io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn stream() -> (UnixStream, File) {
        let (host, agent) = UnixStream::pair().unwrap();
        (host, File::from(OwnedFd::from(agent)))
    }

    fn read_some(host: &mut UnixStream) -> String {
        let mut buf = [0u8; 64];
        let n = host.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn relayed_output_outlives_its_host_stream() {
        let (from, mut process) = pipe().unwrap();
        let (mut first, to) = stream();
        let mut output = Output::new(from, Some(to));
        process.write_all(b"one").unwrap();
        output.forward();
        assert_eq!(read_some(&mut first), "one");

        // The host's stream is gone (a restore reset it): what was read
        // waits, the rest stays in the pipe, the output is not over.
        drop(first);
        process.write_all(b"two").unwrap();
        output.forward();
        assert!(!output.open() && !output.ended);
        process.write_all(b"three").unwrap();

        let (mut second, to) = stream();
        output.connect(Some(to));
        assert_eq!(read_some(&mut second), "two");
        output.forward();
        assert_eq!(read_some(&mut second), "three");
        drop(process);
        output.forward();
        assert!(output.ended, "every writer is gone");
    }
}
