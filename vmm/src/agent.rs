//! The host side of the agent protocol (guest/PROTOCOL.md): waits for the
//! agent to connect, asks it to run the process, carries the process's stdio
//! between the guest and the host, and brings back how it ended.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use devices::virtio::vsock::{HostPorts, PortsHandle};
use guest::protocol::{
    self, Exec, Exited, Failed, Frame, Fresh, Message, Process, Ready, Resize, Resumed, Run,
    Signal, Started, TtySize, CONTROL_PORT,
};

use crate::process::{Outcome, ProcessSpec};
use crate::vm::threads::{Ending, RunGate, ThreadKind, Worker};
use crate::vm::{Error, Exit};

/// Message id of the main process's run request; execs count up from it.
const RUN_ID: u64 = 1;
/// Host ports per request: stdin, stdout and stderr, above the control
/// port (the main process's are 1025-1027).
const PORTS_PER_REQUEST: u32 = 3;
/// Execs at once; the agent has a bound of its own.
const MAX_EXECS: usize = 32;
/// Messages about one exec waiting to be read: a well-behaved agent sends
/// two (started, exited); beyond this a guest's extra ones are dropped.
const MAX_QUEUED: usize = 4;
/// How long the agent may take to start an exec'd process (or say why
/// not) and to connect its streams.
const EXEC_PATIENCE: Duration = Duration::from_secs(60);

/// Where the process's stdio comes from and goes to on the host.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
}

impl Stdio {
    /// This process's own stdin, stdout and stderr (an empty stdin if it
    /// has none).
    pub fn inherit() -> io::Result<Self> {
        let stdin = match io::stdin().as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => std::fs::File::open("/dev/null")?.into(),
        };
        Ok(Self {
            stdin,
            stdout: Box::new(io::stdout()),
            stderr: Box::new(io::stderr()),
        })
    }
}

/// The ports of request `id`.
#[derive(Clone, Copy)]
struct RequestPorts {
    stdin: u32,
    stdout: u32,
    stderr: u32,
}

impl RequestPorts {
    fn of(id: u64) -> Option<Self> {
        let base = u32::try_from(id.checked_sub(1)?)
            .ok()?
            .checked_mul(PORTS_PER_REQUEST)?
            .checked_add(CONTROL_PORT)?;
        base.checked_add(PORTS_PER_REQUEST)?;
        Some(Self {
            stdin: base + 1,
            stdout: base + 2,
            stderr: base + 3,
        })
    }

    fn all(&self) -> [u32; 3] {
        [self.stdin, self.stdout, self.stderr]
    }
}

/// The agent of a running VM, for requests beside the main process: execs,
/// signals, terminal sizes. Clones share it.
#[derive(Clone)]
pub struct Agent(Arc<Shared>);

struct Shared {
    /// Where requests go, once the main process may have started.
    control: Mutex<Option<UnixStream>>,
    ports: PortsHandle,
    /// The session's routes for the agent's messages about each exec;
    /// `None` once the session has ended.
    routes: Mutex<Option<HashMap<u64, SyncSender<Frame>>>>,
    next_id: AtomicU64,
    main_started: AtomicBool,
    agent_connected: Mutex<Option<Instant>>,
}

/// A process to exec in the running VM (as `uvm exec` asks for it over the
/// control socket, too).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub tty: Option<TtySize>,
    /// Who it runs as (see [`Process::user`]) [default: root].
    #[serde(default)]
    pub user: Option<String>,
    /// In the utility VM, outside the container.
    pub in_vm: bool,
}

/// Why an exec did not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent could not start it (the shell's 126 or 127).
    #[error("{}", .0.message)]
    Failed(Failed),
    #[error("{0}")]
    Session(String),
}

/// An exec'd process: how it ends, and requests for it.
pub struct Execution {
    id: u64,
    pub pid: i32,
    /// Behind a lock only so that another thread may signal it.
    frames: Mutex<Receiver<Frame>>,
    agent: Agent,
}

impl Agent {
    fn new(ports: PortsHandle) -> Self {
        Self(Arc::new(Shared {
            control: Mutex::new(None),
            ports,
            routes: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(RUN_ID + 1),
            main_started: AtomicBool::new(false),
            agent_connected: Mutex::new(None),
        }))
    }

    /// Whether the main process has started (and the VM has not ended).
    pub fn main_started(&self) -> bool {
        self.0.main_started.load(Ordering::SeqCst)
    }

    pub fn agent_connected(&self) -> Option<Instant> {
        *crate::lock(&self.0.agent_connected)
    }

    /// Delivers `signal` to the main process; false if it has not started.
    pub fn signal_main(&self, signal: i32) -> bool {
        self.send(RUN_ID, &Signal { signal }).is_ok()
    }

    /// The main process's terminal has a new size.
    pub fn resize_main(&self, size: TtySize) {
        let _ = self.send(RUN_ID, &Resize { size });
    }

    fn send<M: Message>(&self, id: u64, message: &M) -> io::Result<()> {
        let mut control = crate::lock(&self.0.control);
        let control = control
            .as_mut()
            .ok_or_else(|| io::Error::other("the container is not running"))?;
        protocol::send(control, id, message)
    }

    /// Starts `spec` next to the main process and returns once it runs,
    /// with its stdio streams to the guest: stdin, stdout and (without a
    /// tty) stderr.
    pub fn exec(&self, spec: ExecSpec) -> Result<(Execution, Vec<UnixStream>), ExecError> {
        let session = |e: String| ExecError::Session(e);
        if !self.main_started() {
            return Err(session("the container is not running".into()));
        }
        let id = self.0.next_id.fetch_add(1, Ordering::SeqCst);
        let ports = RequestPorts::of(id).ok_or_else(|| session("out of request ids".into()))?;
        let frames = self.route(id)?;
        let streams = self.serve(ports);
        let request = Exec {
            process: Process {
                argv: spec.argv,
                env: spec.env,
                cwd: spec.cwd,
                tty: spec.tty,
                stdin_port: ports.stdin,
                stdout_port: ports.stdout,
                stderr_port: spec.tty.is_none().then_some(ports.stderr),
                user: spec.user,
                rlimits: Vec::new(),
            },
            in_vm: spec.in_vm,
        };
        let mut execution = Execution {
            id,
            pid: 0,
            frames: Mutex::new(frames),
            agent: self.clone(),
        };
        let lost = |e: io::Error| session(format!("the agent session: {e}"));
        self.send(id, &request).map_err(lost)?;
        execution.pid = execution.started()?;
        let count = if spec.tty.is_some() { 2 } else { 3 };
        let stdio = streams[..count]
            .iter()
            .map(accept)
            .collect::<io::Result<_>>();
        Ok((execution, stdio.map_err(lost)?))
    }

    /// A route for the agent's messages about request `id`.
    fn route(&self, id: u64) -> Result<Receiver<Frame>, ExecError> {
        let mut routes = crate::lock(&self.0.routes);
        let routes = routes
            .as_mut()
            .ok_or_else(|| ExecError::Session("the VM is ending".into()))?;
        if routes.len() >= MAX_EXECS {
            return Err(ExecError::Session(format!("{MAX_EXECS} execs run already")));
        }
        let (tx, rx) = mpsc::sync_channel(MAX_QUEUED);
        routes.insert(id, tx);
        Ok(rx)
    }

    /// Receivers for the agent's connections to `ports` (ended at once if
    /// the device is gone).
    fn serve(&self, ports: RequestPorts) -> Vec<Receiver<UnixStream>> {
        let serve = |port| {
            let (tx, rx) = mpsc::channel();
            self.0.ports.serve(port, tx);
            rx
        };
        ports.all().map(serve).into()
    }

    /// Hands the agent's message to the request it is about; false for a
    /// request nobody waits for. Its end is the last message it gets.
    fn deliver(&self, frame: Frame) -> bool {
        let mut routes = crate::lock(&self.0.routes);
        let Some(routes) = routes.as_mut() else {
            return false;
        };
        let (id, last) = (frame.id, matches!(frame.kind, Exited::KIND | Failed::KIND));
        let delivered = match routes.get(&id).map(|route| route.try_send(frame)) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_))) => {
                tracing::debug!("request {id}: more messages than it can have");
                true
            }
            Some(Err(TrySendError::Disconnected(_))) | None => false,
        };
        if last {
            routes.remove(&id);
        }
        delivered
    }

    /// The session ended: nothing more comes for any request.
    fn close(&self) {
        self.0.main_started.store(false, Ordering::SeqCst);
        *crate::lock(&self.0.routes) = None;
        *crate::lock(&self.0.control) = None;
    }

    fn forget(&self, id: u64) {
        if let Some(routes) = crate::lock(&self.0.routes).as_mut() {
            routes.remove(&id);
        }
        if let Some(ports) = RequestPorts::of(id) {
            for port in ports.all() {
                self.0.ports.unserve(port);
            }
        }
    }
}

/// The agent's connection to a served port, within [`EXEC_PATIENCE`].
fn accept(rx: &Receiver<UnixStream>) -> io::Result<UnixStream> {
    rx.recv_timeout(EXEC_PATIENCE)
        .map_err(|e| io::Error::other(waited_for("connect", e)))
}

fn waited_for(what: &str, e: mpsc::RecvTimeoutError) -> String {
    match e {
        mpsc::RecvTimeoutError::Timeout => {
            format!("the agent did not {what} within {EXEC_PATIENCE:?}")
        }
        mpsc::RecvTimeoutError::Disconnected => "the VM ended".into(),
    }
}

impl Execution {
    /// The agent's answer to the request: the pid, or why it did not start.
    fn started(&self) -> Result<i32, ExecError> {
        let frame = crate::lock(&self.frames)
            .recv_timeout(EXEC_PATIENCE)
            .map_err(|e| ExecError::Session(waited_for("answer", e)))?;
        let invalid = |e: io::Error| ExecError::Session(format!("the agent's answer: {e}"));
        match frame.kind {
            Started::KIND => Ok(frame.decode::<Started>().map_err(invalid)?.pid),
            Failed::KIND => Err(ExecError::Failed(checked_failure(
                frame.decode::<Failed>().map_err(invalid)?,
            )?)),
            kind => Err(ExecError::Session(format!(
                "the agent answered with message kind {kind:#x}"
            ))),
        }
    }

    /// Waits until the process ends. Its output may still be on the way:
    /// read its streams to their end.
    pub fn wait(&self) -> io::Result<Exited> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let frame = crate::lock(&self.frames)
            .recv()
            .map_err(|_| io::Error::other("the VM ended before the process did"))?;
        match frame.kind {
            Exited::KIND => frame.decode::<Exited>()?.checked().map_err(invalid),
            kind => Err(invalid(format!("unexpected message kind {kind:#x}"))),
        }
    }

    pub fn signal(&self, signal: i32) -> io::Result<()> {
        self.agent.send(self.id, &Signal { signal })
    }

    pub fn resize(&self, size: TtySize) -> io::Result<()> {
        self.agent.send(self.id, &Resize { size })
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        self.agent.forget(self.id);
    }
}

/// A process that never ran cannot have succeeded.
fn checked_failure(failed: Failed) -> Result<Failed, ExecError> {
    match (1..=255).contains(&failed.exit_code) {
        true => Ok(failed),
        false => Err(ExecError::Session(format!(
            "the agent's answer: exit code {} is not 1-255",
            failed.exit_code
        ))),
    }
}

/// The agent's streams for the main process as the vsock device hands
/// them over.
struct Ports {
    control: Receiver<UnixStream>,
    stdin: Receiver<UnixStream>,
    stdout: Receiver<UnixStream>,
    stderr: Receiver<UnixStream>,
}

/// One agent session: the ports it serves and the process it runs.
pub struct Session {
    ports: Ports,
    process: Option<ProcessSpec>,
    /// The pmem device of the VM's tools, if it has them.
    tools: Option<u32>,
    agent: Agent,
    /// Host randomness for a restored guest (see [`protocol::Fresh`]).
    entropy: Vec<u8>,
    gate: Option<RunGate>,
}

impl Session {
    /// Serves the agent's ports in `ports`. Without `process` the session
    /// ends as soon as the agent connects (a boot check).
    pub fn new(
        process: Option<ProcessSpec>,
        tools: Option<u32>,
        ports: &HostPorts,
        entropy: Vec<u8>,
    ) -> Self {
        let serve = |port| {
            let (tx, rx) = mpsc::channel();
            ports.serve(port, tx);
            rx
        };
        let main = RequestPorts::of(RUN_ID).expect("the first request has ports");
        Self {
            ports: Ports {
                control: serve(CONTROL_PORT),
                stdin: serve(main.stdin),
                stdout: serve(main.stdout),
                stderr: serve(main.stderr),
            },
            process,
            tools,
            agent: Agent::new(ports.handle()),
            entropy,
            gate: None,
        }
    }

    /// From now on the run request waits for the returned gate to open:
    /// one more hold on it.
    pub fn hold_run(&mut self) -> RunGate {
        let gate = self.gate.get_or_insert_with(RunGate::default);
        gate.hold();
        gate.clone()
    }

    pub fn agent(&self) -> Agent {
        self.agent.clone()
    }

    /// Runs the session on a thread of its own, which ends the VM with the
    /// process's outcome, or with a session failure if the agent's streams
    /// end without one. The thread ends once the vsock device is gone.
    pub fn start(self, stdio: Stdio, ending: &Arc<Ending>) -> Result<Worker, Error> {
        let reporter = ending.clone();
        Worker::spawn("agent", ThreadKind::Agent, ending, move || {
            let mut held = Held::default();
            let exit = match self.serve(stdio, &reporter, &mut held) {
                Ok(exit) => exit,
                Err(e) => Exit::Session(format!(
                    "the agent session ended without an exit status: {e}"
                )),
            };
            // Recorded before the control stream closes (the agent then
            // resets the guest) and while signals still go to the process.
            reporter.end(exit);
            self.agent.close();
            drop(held);
            None
        })
    }

    fn serve(&self, stdio: Stdio, ending: &Arc<Ending>, held: &mut Held) -> io::Result<Exit> {
        let control = held.control.insert(recv(&self.ports.control)?);
        let resumed = first_message(control)?;
        *crate::lock(&self.agent.0.agent_connected) = Some(Instant::now());
        if let Some(resumed) = resumed {
            protocol::send(control, RUN_ID, &self.fresh())?;
            self.agent.0.main_started.store(true, Ordering::SeqCst);
            ending.notify();
            return self.follow(resumed.tty, stdio, ending, held);
        }
        ending.notify();
        if let Some(gate) = &self.gate {
            if let Err(exit) = ending.wait_for(|| gate.is_open()) {
                return Ok(exit);
            }
        }
        let Some(process) = &self.process else {
            return Ok(Exit::Booted);
        };
        let request = Run {
            tools: self.tools,
            fresh: self.fresh(),
            ..run_request(process)
        };
        protocol::send(control, RUN_ID, &request)?;
        self.follow(process.tty.is_some(), stdio, ending, held)
    }

    /// What a restored guest needs to be its own (see [`protocol::Fresh`]).
    fn fresh(&self) -> Fresh {
        Fresh {
            entropy: self.entropy.clone(),
            realtime_ns: realtime_ns(),
        }
    }

    /// Carries the main process's stdio and the agent's messages until the
    /// process's outcome.
    fn follow(
        &self,
        tty: bool,
        stdio: Stdio,
        ending: &Arc<Ending>,
        held: &mut Held,
    ) -> io::Result<Exit> {
        let control = held.control.as_mut().expect("connected first");
        *crate::lock(&self.agent.0.control) = Some(control.try_clone()?);
        self.connect_stdio(tty, stdio, ending, held)?;
        let control = held.control.as_mut().expect("connected first");
        let outcome = dispatch(&self.agent, control, ending)?;
        // The agent closes the streams before it reports: once the copiers
        // are done, all output is in. (Without an outcome they may still
        // run; they end with the device.)
        held.copiers.clear();
        Ok(Exit::Process(outcome))
    }

    /// Takes the agent's stdio connections and starts copying.
    fn connect_stdio(
        &self,
        tty: bool,
        stdio: Stdio,
        ending: &Arc<Ending>,
        held: &mut Held,
    ) -> io::Result<()> {
        let to_guest = recv(&self.ports.stdin)?;
        let stdout = recv(&self.ports.stdout)?;
        let spawned = |e: Error| io::Error::other(e.to_string());
        let copier = copy("stdout", stdout, stdio.stdout, ending).map_err(spawned)?;
        held.copiers.push(copier);
        if !tty {
            let stderr = recv(&self.ports.stderr)?;
            let copier = copy("stderr", stderr, stdio.stderr, ending).map_err(spawned)?;
            held.copiers.push(copier);
        }
        let from = stdio.stdin;
        let forward = move || {
            forward_stdin(from, to_guest);
            None
        };
        held.stdin =
            Some(Worker::spawn("stdin", ThreadKind::Agent, ending, forward).map_err(spawned)?);
        Ok(())
    }
}

/// What the session keeps until the VM's end is recorded: the control
/// stream (the agent resets the guest once it closes) and the stdio
/// threads, which end when the guest's side of their stream does, at the
/// latest with the vsock device.
#[derive(Default)]
struct Held {
    control: Option<UnixStream>,
    copiers: Vec<Worker>,
    stdin: Option<Worker>,
}

/// Reads the control stream until the main process's outcome, handing
/// messages about execs to them.
/// Reads an agent's control stream as a session does, with no VM or
/// device behind it: the entry of the fuzz target for what a hostile agent
/// sends (fuzz/fuzz_targets/agent_host.rs).
pub fn read_control_stream(control: &mut impl Read) -> io::Result<Outcome> {
    let ports = HostPorts::new(None);
    dispatch(&Agent::new(ports.handle()), control, &Ending::default())
}

fn dispatch(agent: &Agent, control: &mut impl Read, ending: &Ending) -> io::Result<Outcome> {
    let mut main = MainProcess::default();
    loop {
        let frame = protocol::receive(control)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the control stream",
            )
        })?;
        if frame.id != RUN_ID {
            if !agent.deliver(frame) {
                tracing::debug!("a message about a request nobody waits for");
            }
            continue;
        }
        if let Some(outcome) = main.receive(&frame)? {
            return Ok(outcome);
        }
        if main.started {
            agent.0.main_started.store(true, Ordering::SeqCst);
            ending.notify();
        }
    }
}

/// The agent's messages about the main process.
#[derive(Default)]
struct MainProcess {
    started: bool,
}

impl MainProcess {
    /// Its outcome once the agent reports it; anything but what the
    /// protocol allows is a broken session.
    fn receive(&mut self, frame: &Frame) -> io::Result<Option<Outcome>> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        match frame.kind {
            Started::KIND => {
                frame.decode::<Started>()?;
                self.started = true;
                Ok(None)
            }
            Exited::KIND => {
                let exited = frame.decode::<Exited>()?.checked().map_err(invalid)?;
                Ok(Some(Outcome::Exited(exited)))
            }
            Failed::KIND => {
                let failed = checked_failure(frame.decode::<Failed>()?)
                    .map_err(|e| invalid(e.to_string()))?;
                Ok(Some(Outcome::Failed(failed)))
            }
            kind => Err(invalid(format!("unexpected message kind {kind:#x}"))),
        }
    }
}

/// The agent's first message: `Ready`, or `Resumed` from the agent of a
/// restored VM whose main process runs.
fn first_message(control: &mut impl Read) -> io::Result<Option<Resumed>> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    match protocol::receive(control)? {
        Some(frame) if frame.kind == Ready::KIND => Ok(None),
        Some(frame) if frame.kind == Resumed::KIND && frame.id == RUN_ID => {
            frame.decode().map(Some)
        }
        Some(frame) => Err(invalid(format!(
            "the agent began with message kind {:#x} (id {}), not Ready",
            frame.kind, frame.id
        ))),
        None => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

/// The host's wall clock, in nanoseconds since the Unix epoch.
fn realtime_ns() -> u64 {
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    since_epoch.map_or(0, |d| d.as_nanos() as u64)
}

fn run_request(process: &ProcessSpec) -> Run {
    let ports = RequestPorts::of(RUN_ID).expect("the first request has ports");
    let mut run = process.request();
    run.process.stdin_port = ports.stdin;
    run.process.stdout_port = ports.stdout;
    run.process.stderr_port = process.tty.is_none().then_some(ports.stderr);
    run
}

fn recv(rx: &Receiver<UnixStream>) -> io::Result<UnixStream> {
    rx.recv()
        .map_err(|_| io::Error::other("the vsock device stopped"))
}

/// Copies a guest stream to a host output on a thread of its own.
fn copy(
    name: &str,
    from: UnixStream,
    to: Box<dyn Write + Send>,
    ending: &Arc<Ending>,
) -> Result<Worker, Error> {
    Worker::spawn(name, ThreadKind::Agent, ending, move || {
        copy_output(from, to);
        None
    })
}

/// Copies a guest stream to a host output as data arrives, until the guest
/// side ends (the process closed it, or the device went with the VM).
pub fn copy_output(mut from: UnixStream, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
            return;
        }
    }
}

/// The host's input to the process; at its end, end of file for the
/// process. Stops as soon as the guest side is gone, even while the host
/// input has nothing to say (a terminal).
pub fn forward_stdin(from: OwnedFd, mut to: UnixStream) {
    let mut input = std::fs::File::from(from);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: input.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            // No events asked: poll reports the guest side's hang-up.
            libc::pollfd {
                fd: to.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if rc < 0 || fds[1].revents != 0 {
            return;
        }
        match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) if to.write_all(&buf[..n]).is_err() => return,
            Ok(_) => {}
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {

    use super::*;

    fn receive_outcome(wire: &[u8]) -> io::Result<Outcome> {
        let agent = Agent::new(PortsHandle::default());
        dispatch(&agent, &mut &wire[..], &Ending::default())
    }

    fn frames(messages: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut wire = Vec::new();
        messages(&mut wire);
        wire
    }

    #[test]
    fn the_outcome_is_the_agents_report() {
        let wire = frames(|w| {
            protocol::send(w, RUN_ID, &Started { pid: 7 }).unwrap();
            protocol::send(w, RUN_ID, &Exited::Signal(9)).unwrap();
        });
        let outcome = receive_outcome(&wire).unwrap();
        assert_eq!(outcome, Outcome::Exited(Exited::Signal(9)));
    }

    #[test]
    fn a_session_without_an_exit_status_is_an_error() {
        let closed = frames(|w| protocol::send(w, RUN_ID, &Started { pid: 7 }).unwrap());
        let err = receive_outcome(&closed).unwrap_err();
        assert!(
            err.to_string().contains("closed the control stream"),
            "{err}"
        );

        let hostile = [
            frames(|w| protocol::send(w, RUN_ID, &Exited::Signal(i32::MAX)).unwrap()),
            frames(|w| protocol::send(w, RUN_ID, &Exited::Code(-3)).unwrap()),
            frames(|w| {
                let failed = Failed {
                    message: "x".into(),
                    exit_code: 1000,
                };
                protocol::send(w, RUN_ID, &failed).unwrap()
            }),
            frames(|w| {
                let failed = Failed {
                    message: "not started, yet success".into(),
                    exit_code: 0,
                };
                protocol::send(w, RUN_ID, &failed).unwrap()
            }),
            frames(|w| protocol::send(w, RUN_ID + 1, &Started { pid: 1 }).unwrap()),
            frames(|w| protocol::send(w, RUN_ID, &Run::default()).unwrap()),
            // An Exited header with a body that is not one.
            frames(|w| {
                w.extend(Exited::KIND.to_le_bytes());
                w.extend(2u32.to_le_bytes());
                w.extend(RUN_ID.to_le_bytes());
                w.extend(b"{}");
            }),
            // A truncated frame.
            frames(|w| w.extend(Exited::KIND.to_le_bytes())),
        ];
        for wire in hostile {
            assert!(receive_outcome(&wire).is_err(), "accepted {wire:?}");
        }
    }

    /// A session for `program` started with its output discarded, and the
    /// agent's end of its control stream (what the vsock device hands over
    /// when the agent connects), on which the agent said it is ready.
    fn start_session(
        program: &str,
        tools: Option<u32>,
    ) -> (HostPorts, Agent, UnixStream, Arc<Ending>, Worker) {
        start_session_saying(program, tools, (0, &Ready {}))
    }

    /// As [`start_session`], with `first` (id, message) as the agent's
    /// first message.
    fn start_session_saying<M: Message>(
        program: &str,
        tools: Option<u32>,
        (id, first): (u64, &M),
    ) -> (HostPorts, Agent, UnixStream, Arc<Ending>, Worker) {
        let mut ports = HostPorts::new(None);
        let main = ProcessSpec {
            argv: vec![program.into()],
            ..ProcessSpec::default()
        };
        let session = Session::new(Some(main), tools, &ports, Vec::new());
        let agent = session.agent();
        let mut guest = ports.connect(CONTROL_PORT).unwrap();
        protocol::send(&mut guest, id, first).unwrap();
        let ending = Arc::new(Ending::default());
        let stdio = Stdio {
            stdin: std::fs::File::open("/dev/null").unwrap().into(),
            stdout: Box::new(io::sink()),
            stderr: Box::new(io::sink()),
        };
        let worker = session.start(stdio, &ending).unwrap();
        (ports, agent, guest, ending, worker)
    }

    /// A session whose agent begins with `first`, which must end it as a
    /// broken one; the agent's end of the control stream.
    fn refused_session<M: Message>(first: (u64, &M)) -> UnixStream {
        let (ports, _, agent, ending, worker) = start_session_saying("/bin/true", None, first);
        let exit = ending.wait();
        assert!(
            matches!(&exit, Exit::Session(m) if m.contains("not Ready")),
            "{exit:?}"
        );
        drop(ports);
        worker.join();
        agent
    }

    #[test]
    fn an_agent_that_does_not_say_it_is_ready_gets_no_request() {
        let mut agent = refused_session((0, &Started { pid: 1 }));
        assert!(
            protocol::receive(&mut agent).unwrap().is_none(),
            "a request"
        );
    }

    #[test]
    fn a_resumed_agent_gets_fresh_state_not_a_run_and_is_followed() {
        let resumed = Resumed { pid: 9, tty: false };
        let (mut ports, handle, mut guest, ending, worker) =
            start_session_saying("/bin/true", None, (RUN_ID, &resumed));
        let fresh = protocol::receive(&mut guest).unwrap().unwrap();
        assert_eq!((fresh.kind, fresh.id), (Fresh::KIND, RUN_ID));
        assert!(fresh.decode::<Fresh>().unwrap().realtime_ns > 0);
        let main_stdio: Vec<_> = (1025..=1027).map(|p| ports.connect(p).unwrap()).collect();
        ending.wait_for(|| handle.main_started()).unwrap();
        drop(main_stdio);
        protocol::send(&mut guest, RUN_ID, &Exited::Code(3)).unwrap();
        assert_eq!(
            ending.wait(),
            Exit::Process(Outcome::Exited(Exited::Code(3)))
        );
        drop((guest, ports));
        worker.join();

        // Only the main process can be resumed.
        refused_session((RUN_ID + 1, &resumed));
    }

    #[test]
    fn a_session_whose_agent_hangs_up_ends_the_vm_with_an_error() {
        let (ports, _, mut agent, ending, worker) = start_session("/bin/true", None);
        // The agent reads the request, then its control stream closes
        // before any stdio connection or exit status.
        let request = protocol::receive(&mut agent).unwrap().unwrap();
        assert_eq!(request.decode::<Run>().unwrap().process.argv, ["/bin/true"]);
        drop(agent);
        drop(ports); // the device goes: the stdio ports never connect
        let exit = ending.wait();
        worker.join();
        match exit {
            Exit::Session(message) => assert!(
                message.starts_with("the agent session ended without an exit status"),
                "{message}"
            ),
            other => panic!("expected a session failure, got {other:?}"),
        }
    }

    #[test]
    fn execs_get_their_own_ports_and_messages_and_end_with_the_session() {
        let (mut ports, handle, mut guest, ending, worker) = start_session("/bin/sleep", Some(1));
        // The guest's side of the main process: its request, stdio, start.
        let run = protocol::receive(&mut guest).unwrap().unwrap();
        assert_eq!(run.decode::<Run>().unwrap().tools, Some(1));
        let main_stdio: Vec<_> = (1025..=1027).map(|p| ports.connect(p).unwrap()).collect();
        let no_exec = handle.exec(ExecSpec::default());
        assert!(
            matches!(no_exec, Err(ExecError::Session(_))),
            "before Started"
        );
        protocol::send(&mut guest, RUN_ID, &Started { pid: 1 }).unwrap();
        ending.wait_for(|| handle.main_started()).unwrap();

        let exec = std::thread::spawn(move || {
            handle.exec(ExecSpec {
                argv: vec!["/bin/echo".into()],
                ..ExecSpec::default()
            })
        });
        let request = protocol::receive(&mut guest).unwrap().unwrap();
        assert_eq!(request.id, RUN_ID + 1);
        let exec_request = request.decode::<Exec>().unwrap().process;
        let ports_of_exec = [
            exec_request.stdin_port,
            exec_request.stdout_port,
            exec_request.stderr_port.unwrap(),
        ];
        assert_eq!(ports_of_exec, [1028, 1029, 1030]);
        let mut exec_stdio: Vec<_> = ports_of_exec
            .iter()
            .map(|&p| ports.connect(p).unwrap())
            .collect();
        // A message about a request nobody made is ignored.
        protocol::send(&mut guest, 99, &Exited::Code(1)).unwrap();
        protocol::send(&mut guest, request.id, &Started { pid: 42 }).unwrap();
        let (execution, mut streams) = exec.join().unwrap().unwrap();
        assert_eq!((execution.pid, streams.len()), (42, 3));
        exec_stdio[1].write_all(b"out").unwrap();
        let mut got = [0u8; 3];
        streams[1].read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out");
        protocol::send(&mut guest, request.id, &Exited::Code(4)).unwrap();
        assert_eq!(execution.wait().unwrap(), Exited::Code(4));

        // The main process ends (its streams first): the session ends the
        // VM with its outcome.
        drop(main_stdio);
        protocol::send(&mut guest, RUN_ID, &Exited::Code(0)).unwrap();
        assert_eq!(
            ending.wait(),
            Exit::Process(Outcome::Exited(Exited::Code(0)))
        );
        drop((guest, exec_stdio, ports));
        worker.join();
        assert!(execution.signal(9).is_err(), "the session is gone");
    }

    #[test]
    fn a_guest_cannot_queue_more_than_a_few_messages_for_an_exec() {
        let agent = Agent::new(PortsHandle::default());
        let rx = agent.route(5).unwrap();
        let frame = |kind| Frame {
            kind,
            id: 5,
            body: b"{}".to_vec(),
        };
        for _ in 0..1000 {
            assert!(agent.deliver(frame(Started::KIND)));
        }
        assert_eq!(rx.try_iter().count(), MAX_QUEUED);
        assert!(agent.deliver(frame(Exited::KIND)));
        assert!(!agent.deliver(frame(Started::KIND)), "its end was the last");
        assert!(!agent.deliver(Frame {
            id: 6,
            ..frame(Started::KIND)
        }));
    }
}
