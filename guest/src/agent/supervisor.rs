//! The agent's one loop: the main process, the processes exec'd next to
//! it, their terminals, and the host's requests on the control stream.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use guest::boot_mark;
use guest::protocol::{
    self, Exec, Failed, Fresh, Message, Process, Resize, Resumed, Run, Signal, Started,
    CONTROL_PORT,
};
use guest::vsock;

use crate::mounts;
use crate::process::{self, Child, Place, Streams};
use crate::restore;
use crate::root::{self, Container, Prepared, Setup};
use crate::{check, write_boot_mark};

/// After a forwarded signal a process gets this long to end before it is
/// killed, like `docker stop`: as PID 1 of its namespace the main process
/// ignores signals it has no handler for.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Processes at once, the main one included: the host asks for each.
const MAX_PROCESSES: usize = 64;

/// A process the agent watches, and the request it answers.
struct Watched {
    id: u64,
    child: Child,
    tty: bool,
    kill_at: Option<Instant>,
}

pub struct Supervisor {
    control: File,
    control_open: bool,
    watched: Vec<Watched>,
    /// The main process's request id and request: its environment and
    /// working directory (execs start from them, as `docker exec` does),
    /// its stdio ports, and whether it is detached (its output relayed, to
    /// outlive a restore).
    main: u64,
    main_process: Process,
    detached: bool,
    container: Option<Container>,
    /// The pmem device of the VM's tools, until they are mounted.
    tools: Option<u32>,
    tools_mounted: bool,
    /// The agent's own PID namespace, to return to after forking into the
    /// container's.
    own_pid_ns: OwnedFd,
}

/// Runs `run` (request `id`) and the host's further requests until the
/// main process ends, then reports it. An error ends the agent.
pub fn serve(control: File, run: Run, id: u64, prepared: Option<Prepared>) -> io::Result<()> {
    let streams = Streams::connect(&run.process)?;
    let mut supervisor = Supervisor {
        control,
        control_open: true,
        watched: Vec::new(),
        main: id,
        main_process: run.process.clone(),
        detached: run.detached,
        container: None,
        tools: run.tools,
        tools_mounted: false,
        own_pid_ns: File::open("/proc/self/ns/pid")?.into(),
    };
    match supervisor.start_main(&run, streams, prepared.as_ref()) {
        Ok(pid) => {
            write_boot_mark(boot_mark::PROCESS_STARTED);
            supervisor.send(id, &Started { pid })?;
            supervisor.watch()?;
        }
        Err(failed) => supervisor.send(id, &failed)?,
    }
    // The host ends the VM once it has the exit status; should it close
    // the stream instead, the agent powers off.
    while supervisor.control_open && protocol::receive(&mut supervisor.control)?.is_some() {}
    Ok(())
}

/// Runs `run` with no host connection (a VMM without vsock, such as QEMU
/// as a benchmark peer): the process's stdio is the console, and how it
/// ended goes to the console and the boot timer.
pub fn run_standalone(run: &Run) -> io::Result<()> {
    let started = Streams::console()
        .map_err(|e| process::failure(&run.process, &e))
        .and_then(|streams| start_main_process(run, streams, None));
    let status = match started {
        Ok(child) => {
            write_boot_mark(boot_mark::PROCESS_STARTED);
            let status = wait(child.pid)?;
            end_all_processes(|_, _| {});
            finish_main();
            process::exited(status).shell_status()
        }
        Err(failed) => {
            writeln!(io::stdout(), "uvm-agent: {}", failed.message)?;
            failed.exit_code
        }
    };
    writeln!(io::stdout(), "uvm-agent: exit status {status}")
}

/// Assembles the container root, if the request has one, and starts the
/// main process as PID 1 of a PID namespace of its own.
fn start_main_process(
    run: &Run,
    streams: Streams,
    prepared: Option<&Prepared>,
) -> Result<Child, Failed> {
    let Some(root) = run.root else {
        return process::start(&run.process, Place::Vm, streams, run.detached);
    };
    let failed = |what: &str, e: io::Error| Failed {
        message: format!("{what}: {e}"),
        exit_code: 125,
    };
    root::assemble_prepared(root, prepared)
        .map_err(|e| failed("assembling the container root", e))?;
    let setup = Setup {
        layers: root.layers > 0,
        hostname: root::cstring(run.hostname.clone().unwrap_or_else(|| "uvm".into()))
            .map_err(|e| failed("the host name", e))?,
        mounts: mounts::plan(&run.mounts).map_err(|e| failed("the container's mounts", e))?,
        hooks: run.hooks.clone(),
    };
    // SAFETY: plain system call without pointers; it applies to the
    // agent's children from now on.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(|e| failed("creating a PID namespace", e))?;
    let place = Place::NewContainer(&setup);
    process::start(&run.process, place, streams, run.detached)
}

impl Supervisor {
    fn start_main(
        &mut self,
        run: &Run,
        streams: Streams,
        prepared: Option<&Prepared>,
    ) -> Result<libc::pid_t, Failed> {
        let child = start_main_process(run, streams, prepared)?;
        let pid = child.pid;
        if run.root.is_some() {
            self.container = Some(Container { pid });
            // Later children (a console) start in the VM's namespace.
            root::enter_pid_namespace(&self.own_pid_ns)
                .map_err(|e| process::failure(&run.process, &e))?;
        }
        self.watched.push(Watched {
            id: self.main,
            child,
            tty: run.process.tty.is_some(),
            kill_at: None,
        });
        Ok(pid)
    }

    /// Until the main process has ended and been reported.
    fn watch(&mut self) -> io::Result<()> {
        loop {
            let mut fds = self.poll_fds();
            let timeout = self.kill_at().map_or(-1, |at| {
                at.saturating_duration_since(Instant::now()).as_millis() as libc::c_int
            });
            // SAFETY: `fds` is a valid array of pollfd of the length passed.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let ready = |fd: RawFd| fds.iter().any(|p| p.fd == fd && p.revents != 0);
            if self.control_open && ready(self.control.as_raw_fd()) {
                self.handle_request();
            }
            self.kill_overdue();
            for w in &mut self.watched {
                let Some(relay) = &mut w.child.relay else {
                    continue;
                };
                for output in &mut relay.outputs {
                    if output.open() && ready(output.from.as_raw_fd()) {
                        output.forward();
                    }
                }
                if relay.stdin.as_ref().is_some_and(|s| ready(s.as_raw_fd())) {
                    relay.forward_input();
                }
            }
            if self.reap()? {
                return Ok(());
            }
        }
    }

    fn poll_fds(&self) -> Vec<libc::pollfd> {
        let mut fds = Vec::new();
        if self.control_open {
            fds.push(poll_in(self.control.as_raw_fd()));
        }
        for w in &self.watched {
            fds.push(poll_in(w.child.pidfd.as_raw_fd()));
            if let Some(relay) = &w.child.relay {
                let outputs = relay.outputs.iter().filter(|o| o.open());
                fds.extend(outputs.map(|o| poll_in(o.from.as_raw_fd())));
                fds.extend(relay.stdin.as_ref().map(|s| poll_in(s.as_raw_fd())));
            }
        }
        fds
    }

    fn kill_at(&self) -> Option<Instant> {
        self.watched.iter().filter_map(|w| w.kill_at).min()
    }

    fn kill_overdue(&mut self) {
        let now = Instant::now();
        for w in &mut self.watched {
            if w.kill_at.is_some_and(|at| now >= at) {
                w.kill_at = None;
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(w.child.pid, libc::SIGKILL) };
            }
        }
    }

    /// Handles one message from the host. A host that is gone takes every
    /// process with it: nobody is left to see their output. A detached
    /// process outlives a restore, which resets the stream.
    fn handle_request(&mut self) {
        let frame = match protocol::receive(&mut self.control) {
            Ok(Some(frame)) => frame,
            Err(e) if self.detached && restore::was_reset(&e) && self.resumed() => return,
            _ => {
                self.control_open = false;
                for w in &self.watched {
                    // SAFETY: kill has no memory effects.
                    unsafe { libc::kill(w.child.pid, libc::SIGKILL) };
                }
                return;
            }
        };
        let result = match frame.kind {
            Signal::KIND => frame.decode().map(|s| self.signal(frame.id, s)),
            Resize::KIND => frame.decode().map(|r| self.resize(frame.id, r)),
            Exec::KIND => frame.decode().map(|e| self.exec(frame.id, e)),
            kind => Err(io::Error::other(format!("unknown message kind {kind:#x}"))),
        };
        if let Err(e) = result.and_then(|sent| sent) {
            let _ = writeln!(io::stderr(), "uvm-agent: request {}: {e}", frame.id);
        }
    }

    fn signal(&mut self, id: u64, Signal { signal }: Signal) -> io::Result<()> {
        let Some(w) = self.watched.iter_mut().find(|w| w.id == id) else {
            return Ok(()); // it has just ended
        };
        // On a tty the process leads its own group, as in a shell.
        let target = if w.tty { -w.child.pid } else { w.child.pid };
        // SAFETY: kill has no memory effects; a bad signal number is EINVAL.
        unsafe { libc::kill(target, signal) };
        w.kill_at.get_or_insert_with(|| Instant::now() + STOP_GRACE);
        Ok(())
    }

    fn resize(&mut self, id: u64, Resize { size }: Resize) -> io::Result<()> {
        let relay = self.watched.iter().find(|w| w.id == id);
        if let Some(relay) = relay.and_then(|w| w.child.relay.as_ref()) {
            relay.resize(size);
        }
        Ok(())
    }

    /// Starts an exec'd process and says so, or why not.
    fn exec(&mut self, id: u64, exec: Exec) -> io::Result<()> {
        let tty = exec.process.tty.is_some();
        match self.start_exec(id, exec) {
            Ok(child) => {
                let pid = child.pid;
                self.watched.push(Watched {
                    id,
                    child,
                    tty,
                    kill_at: None,
                });
                self.send(id, &Started { pid })
            }
            Err(failed) => self.send(id, &failed),
        }
    }

    fn start_exec(&mut self, id: u64, exec: Exec) -> Result<Child, Failed> {
        let refused = |message: String| Failed {
            message,
            exit_code: 126,
        };
        if self.watched.iter().any(|w| w.id == id) {
            return Err(refused(format!("request {id} is already running")));
        }
        if self.watched.len() >= MAX_PROCESSES {
            return Err(refused(format!("{MAX_PROCESSES} processes run already")));
        }
        if exec.in_vm {
            self.mount_tools()?;
        }
        let mut process = exec.process;
        let streams = Streams::connect(&process)
            .map_err(|e| refused(format!("connecting the process's stdio: {e}")))?;
        let place = match (&self.container, exec.in_vm) {
            (Some(container), false) => {
                let main = &self.main_process;
                process.env.splice(0..0, main.env.iter().cloned());
                process.cwd = process.cwd.or_else(|| main.cwd.clone());
                Place::Container(container)
            }
            _ => Place::Vm,
        };
        self.fork_into(place, || process::start(&process, place, streams, false))
    }

    fn resumed(&mut self) -> bool {
        let resumed = self.resume();
        if let Err(e) = &resumed {
            let _ = writeln!(io::stderr(), "uvm-agent: resuming after a restore: {e}");
        }
        resumed.is_ok()
    }

    /// The VM was restored from a snapshot and has a new host: connects to
    /// it, says which process runs, makes the guest its own with the
    /// host's [`Fresh`], and relays the main process's output to it. The
    /// exec'd processes end: the commands that asked for them are the old
    /// host's.
    fn resume(&mut self) -> io::Result<()> {
        let main = self.main;
        for w in self.watched.iter().filter(|w| w.id != main) {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(w.child.pid, libc::SIGKILL) };
        }
        self.watched.retain(|w| w.id == main);
        let Some(w) = self.watched.first_mut() else {
            return Err(io::Error::other("the main process is not running"));
        };
        let relay = w
            .child
            .relay
            .as_mut()
            .ok_or_else(|| io::Error::other("the main process's output is not relayed"))?;
        relay.disconnect();
        let mut control = vsock::connect(CONTROL_PORT)?;
        let resumed = Resumed {
            pid: w.child.pid,
            tty: w.tty,
        };
        protocol::send(&mut control, main, &resumed)?;
        let frame = protocol::receive(&mut control)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if frame.kind != Fresh::KIND {
            let e = format!("the host answered with message kind {:#x}", frame.kind);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        restore::refresh(&frame.decode::<Fresh>()?)?;
        relay.connect(Streams::connect(&self.main_process)?);
        self.control = control;
        Ok(())
    }

    /// The VM's tools, for processes in the VM itself: mounted on first use
    /// (nothing of them is read before).
    fn mount_tools(&mut self) -> Result<(), Failed> {
        if self.tools_mounted {
            return Ok(());
        }
        let Some(device) = self.tools else {
            return Err(Failed {
                message: "this VM has no tools to run commands in (uvm run --tools)".into(),
                exit_code: 127,
            });
        };
        root::mount_tools(device).map_err(|e| Failed {
            message: format!("mounting the VM's tools: {e}"),
            exit_code: 126,
        })?;
        self.tools_mounted = true;
        Ok(())
    }

    /// Runs `start` with the agent's children going to `place`'s PID
    /// namespace.
    fn fork_into(
        &self,
        place: Place,
        start: impl FnOnce() -> Result<Child, Failed>,
    ) -> Result<Child, Failed> {
        let Place::Container(container) = place else {
            return start();
        };
        let entered = container
            .pid_namespace()
            .and_then(|ns| root::enter_pid_namespace(&ns));
        if let Err(e) = entered {
            return Err(Failed {
                message: format!("joining the container's PID namespace: {e}"),
                exit_code: 126,
            });
        }
        let started = start();
        if let Err(e) = root::enter_pid_namespace(&self.own_pid_ns) {
            let _ = writeln!(io::stderr(), "uvm-agent: leaving the PID namespace: {e}");
        }
        started
    }

    /// Reaps what has ended and reports it; true once the main process has
    /// ended (everything else is then ended too).
    fn reap(&mut self) -> io::Result<bool> {
        loop {
            let mut status = 0;
            // SAFETY: `status` is valid storage; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return Ok(false);
            }
            let Some(at) = self.watched.iter().position(|w| w.child.pid == pid) else {
                continue; // an orphan of the VM's namespace
            };
            let mut ended = self.watched.swap_remove(at);
            if ended.id == self.main {
                self.end_main(ended, status)?;
                return Ok(true);
            }
            ended.child.close_streams();
            self.send(ended.id, &process::exited(status))?;
        }
    }

    /// The main process ended: ends and reports everything else, writes
    /// the file systems out, then reports it.
    fn end_main(&mut self, mut main: Watched, status: libc::c_int) -> io::Result<()> {
        main.child.close_streams();
        let mut ended = Vec::new();
        let mut watched = std::mem::take(&mut self.watched);
        end_all_processes(|pid, status| {
            if let Some(at) = watched.iter().position(|w| w.child.pid == pid) {
                let mut w = watched.swap_remove(at);
                w.child.close_streams();
                ended.push((w.id, process::exited(status)));
            }
        });
        for (id, exited) in ended {
            self.send(id, &exited)?;
        }
        finish_main();
        self.send(main.id, &process::exited(status))
    }

    fn send<M: protocol::Message>(&mut self, id: u64, message: &M) -> io::Result<()> {
        protocol::send(&mut self.control, id, message)
    }
}

/// After the main process: the file systems written out, and the mark.
fn finish_main() {
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    write_boot_mark(boot_mark::PROCESS_EXITED);
}

/// Kills whatever is left and reaps it, handing each to `reaped`, so that
/// every stdio stream is closed before the exit status goes out.
fn end_all_processes(mut reaped: impl FnMut(libc::pid_t, libc::c_int)) {
    // SAFETY: as PID 1, kill(-1) reaches every other process.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    loop {
        let mut status = 0;
        // SAFETY: `status` is valid storage for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid <= 0 {
            return;
        }
        reaped(pid, status);
    }
}

fn wait(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is valid storage for the call.
        if unsafe { libc::waitpid(pid, &mut status, 0) } >= 0 {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
