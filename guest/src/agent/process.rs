//! Runs the process the host asked for and reports how it ended.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use guest::boot_mark;
use guest::protocol::{self, Exited, Failed, Run, Signal, Started, TtySize};

use guest::vsock;

use crate::{check, root, write_boot_mark};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `req` to its end, answering on `control` with message id `id`.
pub fn run(req: &Run, control: &mut File, id: u64) -> io::Result<()> {
    let stdin = vsock::connect(req.stdin_port)?;
    let stdout = vsock::connect(req.stdout_port)?;
    let stderr = req.stderr_port.map(vsock::connect).transpose()?;
    if let Err(failed) = prepare(req) {
        return protocol::send(control, id, &failed);
    }
    let spawned = match req.tty {
        Some(size) => spawn_on_tty(req, size, stdin, stdout),
        None => spawn(req, stdin, stdout, stderr).map(|child| (child, None)),
    };
    let (child, relay) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => return protocol::send(control, id, &failure(req, &e)),
    };
    write_boot_mark(boot_mark::PROCESS_STARTED);
    protocol::send(
        control,
        id,
        &Started {
            pid: child.id() as i32,
        },
    )?;
    let status = supervise(child, control, relay, req.tty.is_some())?;
    protocol::send(control, id, &ended(status))
}

/// Runs `req` with no host connection (a VMM without vsock, such as QEMU
/// as a benchmark peer): the process's stdio is the console, and how it
/// ended goes to the console and the boot timer.
pub fn run_standalone(req: &Run) -> io::Result<()> {
    let mut console = io::stdout();
    // Nothing types on the console: the process reads an empty stdin.
    let spawned = prepare(req).and_then(|()| {
        command(req)
            .and_then(|mut cmd| cmd.stdin(Stdio::null()).spawn())
            .map_err(|e| failure(req, &e))
    });
    let status = match spawned {
        Ok(mut child) => {
            write_boot_mark(boot_mark::PROCESS_STARTED);
            ended(child.wait()?).shell_status()
        }
        Err(failed) => {
            writeln!(console, "uvm-agent: {}", failed.message)?;
            failed.exit_code
        }
    };
    writeln!(console, "uvm-agent: exit status {status}")
}

/// Assembles the container root, if the request has one, and makes the
/// process PID 1 of a PID namespace of its own (this only applies to
/// children started from now on).
fn prepare(req: &Run) -> Result<(), Failed> {
    let Some(root) = req.root else {
        return Ok(());
    };
    let failed = |what: &str, e: io::Error| Failed {
        message: format!("{what}: {e}"),
        exit_code: 125,
    };
    root::assemble(root).map_err(|e| failed("assembling the container root", e))?;
    // SAFETY: plain system call without pointers.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(|e| failed("creating a PID namespace", e))
}

/// After the process ended: ends what it left behind, writes the file
/// systems out, marks the moment and says how it ended.
fn ended(status: ExitStatus) -> Exited {
    end_all_processes();
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    write_boot_mark(boot_mark::PROCESS_EXITED);
    match (status.code(), status.signal()) {
        (Some(code), _) => Exited::Code(code),
        (None, Some(signal)) => Exited::Signal(signal),
        (None, None) => Exited::Code(255),
    }
}

/// The command line, environment and working directory of `req`.
fn command(req: &Run) -> io::Result<Command> {
    let (program, args) = req
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let cwd = req.cwd.as_deref().unwrap_or("/");
    // Seen from the agent, the container's directories are under its root.
    let prefix = if req.root.is_some() { root::ROOT } else { "" };
    let dir = std::fs::metadata(format!("{prefix}/{cwd}"))
        .map_err(|e| io::Error::new(e.kind(), format!("working directory {cwd}: {e}")))?;
    if !dir.is_dir() {
        let e = format!("working directory {cwd}: not a directory");
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
    }
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear();
    cmd.env("PATH", DEFAULT_PATH).env("HOME", "/root");
    if req.tty.is_some() {
        cmd.env("TERM", "xterm");
    }
    for entry in &req.env {
        match entry.split_once('=') {
            Some((key, value)) => cmd.env(key, value),
            None => cmd.env(entry, ""),
        };
    }
    match req.root {
        Some(_) => {
            let (tty, cwd) = (req.tty.is_some(), root::cstring(cwd.to_string())?);
            // SAFETY: between fork and exec only system calls run (mount,
            // pivot_root, chdir: async-signal-safe), on the child alone.
            unsafe { cmd.pre_exec(move || root::enter(tty, &cwd)) };
        }
        None => {
            cmd.current_dir(cwd);
        }
    }
    Ok(cmd)
}

fn spawn(req: &Run, stdin: File, stdout: File, stderr: Option<File>) -> io::Result<Child> {
    let stderr = match stderr {
        Some(file) => Stdio::from(file),
        None => Stdio::null(),
    };
    command(req)?
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
}

/// The agent's side of a pseudo-terminal: it copies between the master and
/// the host streams.
struct Relay {
    master: File,
    /// Every slave end is closed: stop polling the master, which would
    /// report the hang-up at once, forever.
    hung_up: bool,
    stdin: Option<File>,
    stdout: File,
}

fn spawn_on_tty(
    req: &Run,
    size: TtySize,
    stdin: File,
    stdout: File,
) -> io::Result<(Child, Option<Relay>)> {
    mount_devpts()?;
    let (master, slave) = openpty(size)?;
    let mut cmd = command(req)?;
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
    let relay = Relay {
        master,
        hung_up: false,
        stdin: Some(stdin),
        stdout,
    };
    Ok((child, Some(relay)))
}

fn mount_devpts() -> io::Result<()> {
    match std::fs::create_dir("/dev/pts") {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        result => result?,
    }
    crate::mount(c"devpts", c"/dev/pts", c"devpts")
}

fn openpty(size: TtySize) -> io::Result<(File, File)> {
    let (mut master, mut slave): (RawFd, RawFd) = (-1, -1);
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
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

/// After a forwarded signal the process gets this long to end before it is
/// killed, like `docker stop`: as PID 1 of its namespace it ignores signals
/// it has no handler for.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Waits for the child while forwarding the host's signals and, on a tty,
/// the terminal's bytes.
fn supervise(
    mut child: Child,
    control: &mut File,
    mut relay: Option<Relay>,
    tty: bool,
) -> io::Result<ExitStatus> {
    let pid = child.id() as libc::pid_t;
    let pidfd = pidfd_open(pid)?;
    let mut control_open = true;
    let mut kill_at: Option<Instant> = None;
    loop {
        let mut fds = vec![poll_in(pidfd.as_raw_fd())];
        if control_open {
            fds.push(poll_in(control.as_raw_fd()));
        }
        if let Some(r) = &relay {
            if !r.hung_up {
                fds.push(poll_in(r.master.as_raw_fd()));
            }
            fds.extend(r.stdin.as_ref().map(|s| poll_in(s.as_raw_fd())));
        }
        // SAFETY: `fds` is a valid array of pollfd of the length passed.
        let timeout = kill_at.map_or(-1, |at| {
            at.saturating_duration_since(Instant::now()).as_millis() as libc::c_int
        });
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let ready = |fd: RawFd| fds.iter().any(|p| p.fd == fd && p.revents != 0);
        if control_open && ready(control.as_raw_fd()) {
            match forward_signal(control, pid, tty) {
                Control::Signalled => {
                    kill_at.get_or_insert_with(|| Instant::now() + STOP_GRACE);
                }
                Control::Closed => control_open = false,
                Control::Ignored => {}
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            kill_at = None;
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(r) = &mut relay {
            if !r.hung_up && ready(r.master.as_raw_fd()) {
                r.hung_up = !matches!(copy_once(&mut r.master, &mut r.stdout), Ok(n) if n > 0);
            }
            let stdin_ready = r.stdin.as_ref().is_some_and(|s| ready(s.as_raw_fd()));
            if stdin_ready {
                r.forward_stdin();
            }
        }
        if ready(pidfd.as_raw_fd()) {
            let status = child.wait()?;
            if let Some(r) = &mut relay {
                r.drain();
            }
            return Ok(status);
        }
    }
}

impl Relay {
    /// Host input to the terminal; at its end, the terminal's EOF character.
    fn forward_stdin(&mut self) {
        let Some(stdin) = &mut self.stdin else {
            return;
        };
        if !matches!(copy_once(stdin, &mut self.master), Ok(n) if n > 0) {
            let _ = self.master.write_all(&[4]); // ^D
            self.stdin = None;
        }
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

/// What a control message did.
enum Control {
    Signalled,
    /// The host is gone; the process was killed: nobody is left to see its
    /// output.
    Closed,
    Ignored,
}

/// Handles one control message.
fn forward_signal(control: &mut File, pid: libc::pid_t, tty: bool) -> Control {
    let frame = match protocol::receive(control) {
        Ok(Some(frame)) => frame,
        _ => {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Control::Closed;
        }
    };
    let Ok(Signal { signal }) = frame.decode::<Signal>() else {
        return Control::Ignored;
    };
    // On a tty the process leads its own group, as in a shell.
    let target = if tty { -pid } else { pid };
    // SAFETY: kill has no memory effects; a bad signal number is EINVAL.
    unsafe { libc::kill(target, signal) };
    Control::Signalled
}

/// Kills whatever the process left behind and reaps it, so that every
/// stdio stream is closed before the exit status goes out.
fn end_all_processes() {
    // SAFETY: as PID 1, kill(-1) reaches every other process; waitpid with a
    // null status pointer only reaps.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {}
    }
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

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Why the process could not start, with the shell's exit status for it.
fn failure(req: &Run, e: &io::Error) -> Failed {
    let program = req.argv.first().map_or("", String::as_str);
    let exit_code = match e.kind() {
        io::ErrorKind::NotFound => 127,
        _ => 126,
    };
    Failed {
        message: format!("{program}: {e}"),
        exit_code,
    }
}
