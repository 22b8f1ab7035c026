//! The control socket of a running VM, served by its VMM process: other
//! uvm commands ask it to exec a process, signal the container, or stop
//! it. Messages are JSON lines; an exec's stdio streams to the guest pass
//! to the asking command as descriptors (SCM_RIGHTS), so its output goes
//! from the vsock device to that command without another copy here.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest::protocol::{Exited, TtySize};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::snapshot::Requests;
use crate::agent::{Agent, ExecError, ExecSpec, Execution};
use crate::process::Outcome;
use crate::vm::threads::{Ending, RunGate, ThreadKind, Worker};
use crate::vm::{Error, Exit};

/// Longest message: more than any request needs.
const MAX_MESSAGE: usize = 1 << 20;
/// Descriptors a message may carry.
const MAX_FDS: usize = 4;
/// Clients served at once.
const MAX_CLIENTS: usize = 64;
/// A client says what it wants within this, or is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGKILL, how long the guest gets to report before the VM is
/// ended from outside.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Commands → VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// A process beside the container's.
    Exec(ExecSpec),
    /// For the running exec: a signal, a new terminal size.
    Signal(i32),
    Resize(TtySize),
    /// A signal for the container's main process.
    Kill(i32),
    /// SIGTERM for the main process, SIGKILL after `timeout_secs`, and the
    /// VM ends.
    Stop {
        timeout_secs: u64,
    },
    /// Save the VM into this directory (see [`super::snapshot`]); it runs on.
    Snapshot {
        dir: PathBuf,
    },
    /// Run the main process of a VM created with its start held
    /// (`uvm create`); the reply comes once it runs.
    Start,
}

/// VMM → commands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Error(String),
    /// The exec runs; its stdin, stdout (and stderr without a tty) follow
    /// as descriptors.
    Started {
        pid: i32,
    },
    /// It could not start: the shell's status for that.
    Failed {
        message: String,
        exit_code: i32,
    },
    Exited(Exited),
}

/// One end of a control connection.
pub struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Channel {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// Connects to the VM whose socket is `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        UnixStream::connect(path).map(Self::new)
    }

    /// Sends `message` with `fds`.
    pub fn send<T: Serialize>(&self, message: &T, fds: &[RawFd]) -> io::Result<()> {
        let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
        line.push(b'\n');
        let sent = self
            .stream
            .send_with_fds(&[&line[..]], fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // The rest (rare: a full socket buffer) goes without descriptors.
        (&self.stream).write_all(&line[sent..])
    }

    /// The next message, or `None` at the end of the stream.
    pub fn recv<T: DeserializeOwned>(&mut self) -> io::Result<Option<T>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message too long",
                ));
            }
            if self.fill()? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    }

    /// Reads what is there, keeping the descriptors that came with it.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let mut fds = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        }];
        // SAFETY: the iovec points at `chunk`, valid for writes of its length.
        let (n, nfds) = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        for &fd in &fds[..nfds] {
            // SAFETY: recvmsg made these descriptors for us alone.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: plain fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            if self.fds.len() < MAX_FDS {
                self.fds.push_back(fd);
            }
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The `n` descriptors the last message said it carries.
    pub fn take_fds(&mut self, n: usize) -> io::Result<Vec<OwnedFd>> {
        if self.fds.len() < n {
            let e = format!("expected {n} descriptors, got {}", self.fds.len());
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(self.fds.drain(..n).collect())
    }

    /// Another handle on the connection, for a second thread.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.stream.try_clone().map(Self::new)
    }

    /// Ends the connection both ways, for every handle on it.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }
}

/// What the control socket reaches in its VM.
#[derive(Clone)]
pub struct Handles {
    pub agent: Agent,
    /// Where snapshots go, if the VM's owner takes them.
    pub snapshots: Option<Requests>,
    /// The hold on the main process's start, for a VM created with one.
    pub start: Option<Start>,
}

/// The hold `uvm create` keeps on a VM's main process, released once.
#[derive(Clone)]
pub struct Start {
    gate: RunGate,
    taken: Arc<AtomicBool>,
}

impl Start {
    /// For the hold the VM's owner took on `gate`.
    pub fn new(gate: RunGate) -> Self {
        Self {
            gate,
            taken: Arc::default(),
        }
    }
}

/// The VMM's control socket while its VM runs.
pub struct Server {
    stop: EventFd,
    worker: Worker,
}

impl Server {
    /// Serves `path` for the VM that `handles` and `ending` belong to.
    pub fn start(path: &Path, handles: Handles, ending: &Arc<Ending>) -> Result<Self, Error> {
        let listener = UnixListener::bind(path).map_err(|source| Error::ControlSocket {
            path: path.to_owned(),
            source,
        })?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::Devices)?;
        let stopped = stop.try_clone().map_err(Error::Devices)?;
        let vm = ending.clone();
        let worker = Worker::spawn("control", ThreadKind::Control, ending, move || {
            accept_clients(&listener, &stopped, &handles, &vm);
            None
        })?;
        Ok(Self { stop, worker })
    }

    /// Stops taking clients and joins those still served: call it once the
    /// VM has shut down, which ends every exec.
    pub fn stop(self) {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("stopping the control socket: {e}");
            return self.worker.detach();
        }
        self.worker.join();
    }
}

fn accept_clients(listener: &UnixListener, stop: &EventFd, handles: &Handles, vm: &Arc<Ending>) {
    let mut clients: Vec<Worker> = Vec::new();
    loop {
        let mut fds = [poll_in(listener.as_raw_fd()), poll_in(stop.as_raw_fd())];
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n < 0 || fds[1].revents != 0 {
            break;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        // Joins those done already; the others keep their place.
        let (done, running): (Vec<Worker>, Vec<Worker>) =
            clients.into_iter().partition(Worker::is_finished);
        done.into_iter().for_each(Worker::join);
        clients = running;
        let channel = Channel::new(stream);
        if clients.len() >= MAX_CLIENTS {
            let busy = format!("{MAX_CLIENTS} commands are served already");
            let _ = channel.send(&Reply::Error(busy), &[]);
            continue;
        }
        let (handles, ending) = (handles.clone(), vm.clone());
        match Worker::spawn("control-client", ThreadKind::Control, vm, move || {
            serve_client(channel, &handles, &ending);
            None
        }) {
            Ok(worker) => clients.push(worker),
            Err(e) => tracing::error!("control socket: {e}"),
        }
    }
    clients.into_iter().for_each(Worker::join);
}

fn serve_client(mut channel: Channel, handles: &Handles, vm: &Arc<Ending>) {
    let agent = &handles.agent;
    let request = channel
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| channel.recv::<Request>())
        .and_then(|r| r.ok_or_else(|| io::ErrorKind::UnexpectedEof.into()));
    let reply = match request {
        Ok(Request::Exec(exec)) => return serve_exec(channel, exec, agent, vm),
        Ok(Request::Kill(signal)) => kill(signal, handles, vm),
        Ok(Request::Stop { timeout_secs }) => {
            let _ = channel.send(&Reply::Ok, &[]);
            return stop(agent, vm, Duration::from_secs(timeout_secs));
        }
        Ok(Request::Snapshot { dir }) => snapshot(dir, agent, vm, handles.snapshots.as_ref()),
        Ok(Request::Start) => start(handles, vm),
        Ok(other) => Reply::Error(format!("{other:?} needs an exec first")),
        Err(e) => Reply::Error(format!("bad request: {e}")),
    };
    let _ = channel.send(&reply, &[]);
}

/// A signal for the main process; one that never started ends with its VM
/// as if the signal had killed it (runc's kill of a created container).
fn kill(signal: i32, handles: &Handles, vm: &Ending) -> Reply {
    if handles.agent.signal_main(signal) {
        return Reply::Ok;
    }
    match &handles.start {
        Some(start) if !start.taken.swap(true, Ordering::SeqCst) => {
            vm.end(Exit::Interrupted { signal });
            Reply::Ok
        }
        _ => Reply::Error("the container is not running".into()),
    }
}

/// Lets the held main process go and answers once it runs, or with why it
/// could not.
fn start(handles: &Handles, vm: &Ending) -> Reply {
    let Some(start) = &handles.start else {
        return Reply::Error("the VM was not created to be started: it runs already".into());
    };
    if start.taken.swap(true, Ordering::SeqCst) {
        return Reply::Error("the container was started already".into());
    }
    start.gate.release(vm);
    match vm.wait_for(|| handles.agent.main_started()) {
        Ok(()) => Reply::Ok,
        Err(Exit::Process(Outcome::Failed(failed))) => Reply::Error(failed.message),
        Err(exit) => Reply::Error(format!(
            "the VM ended before the container started: {exit:?}"
        )),
    }
}

fn snapshot(dir: PathBuf, agent: &Agent, vm: &Ending, snapshots: Option<&Requests>) -> Reply {
    let Some(snapshots) = snapshots else {
        // A restore would lose its container's stdio: it is this command's.
        return Reply::Error("only a VM in the background (run -d) can be saved".into());
    };
    if !agent.main_started() {
        return Reply::Error("the container is not running".into());
    }
    match snapshots.ask(dir, vm) {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::Error(e),
    }
}

/// `docker stop`: SIGTERM, SIGKILL after `timeout`, and if the guest still
/// does not end, the VM is ended from here.
fn stop(agent: &Agent, vm: &Ending, timeout: Duration) {
    if !agent.signal_main(libc::SIGTERM) {
        return vm.end(Exit::Stopped);
    }
    if vm.wait_timeout(timeout).is_some() {
        return;
    }
    agent.signal_main(libc::SIGKILL);
    if vm.wait_timeout(KILL_GRACE).is_none() {
        vm.end(Exit::Stopped);
    }
}

fn serve_exec(channel: Channel, spec: ExecSpec, agent: &Agent, vm: &Arc<Ending>) {
    let (execution, streams) = match agent.exec(spec) {
        Ok(started) => started,
        Err(ExecError::Failed(failed)) => {
            let reply = Reply::Failed {
                message: failed.message,
                exit_code: failed.exit_code,
            };
            return drop(channel.send(&reply, &[]));
        }
        Err(e) => return drop(channel.send(&Reply::Error(e.to_string()), &[])),
    };
    let fds: Vec<RawFd> = streams.iter().map(AsRawFd::as_raw_fd).collect();
    if channel
        .send(&Reply::Started { pid: execution.pid }, &fds)
        .is_err()
    {
        return drop(execution.signal(libc::SIGKILL));
    }
    drop(streams); // the command has them now
    let execution = Arc::new(execution);
    let ended = Arc::new(AtomicBool::new(false));
    let relay = channel.try_clone().and_then(|from| {
        let (execution, ended) = (execution.clone(), ended.clone());
        Worker::spawn("control-exec", ThreadKind::Control, vm, move || {
            relay_requests(from, &execution, &ended);
            None
        })
        .map_err(|e| io::Error::other(e.to_string()))
    });
    let reply = match execution.wait() {
        Ok(exited) => Reply::Exited(exited),
        Err(e) => Reply::Error(e.to_string()),
    };
    ended.store(true, Ordering::SeqCst);
    let _ = channel.send(&reply, &[]);
    channel.shutdown();
    if let Ok(relay) = relay {
        relay.join();
    }
}

/// The command's signals and terminal sizes, to the exec'd process. A
/// command that goes away takes its process with it: nobody could see its
/// output or its end.
fn relay_requests(mut from: Channel, execution: &Execution, ended: &AtomicBool) {
    let _ = from.set_read_timeout(None);
    while let Ok(Some(request)) = from.recv::<Request>() {
        let sent = match request {
            Request::Signal(signal) => execution.signal(signal),
            Request::Resize(size) => execution.resize(size),
            _ => Ok(()),
        };
        if let Err(e) = sent {
            tracing::debug!("exec request: {e}");
        }
    }
    if !ended.load(Ordering::SeqCst) {
        let _ = execution.signal(libc::SIGKILL);
    }
}

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn messages_carry_descriptors_across() {
        let (a, b) = UnixStream::pair().unwrap();
        let (sender, mut receiver) = (Channel::new(a), Channel::new(b));
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        sender
            .send(&Reply::Started { pid: 7 }, &[theirs.as_raw_fd()])
            .unwrap();
        sender.send(&Reply::Exited(Exited::Code(3)), &[]).unwrap();
        drop(theirs);
        assert_eq!(
            receiver.recv::<Reply>().unwrap(),
            Some(Reply::Started { pid: 7 })
        );
        let mut passed = UnixStream::from(receiver.take_fds(1).unwrap().remove(0));
        passed.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        assert!(receiver.take_fds(1).is_err(), "one descriptor came");
        assert_eq!(
            receiver.recv::<Reply>().unwrap(),
            Some(Reply::Exited(Exited::Code(3)))
        );
        drop(sender);
        assert_eq!(receiver.recv::<Reply>().unwrap(), None);
    }

    #[test]
    fn a_garbled_or_endless_message_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut receiver = Channel::new(b);
        a.write_all(b"{\"kill\": 9}\nnot json\n").unwrap();
        assert_eq!(receiver.recv::<Request>().unwrap(), Some(Request::Kill(9)));
        assert!(receiver.recv::<Request>().is_err());
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(MAX_MESSAGE / chunk.len() + 2) {
                if a.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let err = receiver.recv::<Request>().unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        drop(receiver);
        writer.join().unwrap();
    }
}
