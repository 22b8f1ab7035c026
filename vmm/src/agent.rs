//! The host side of the agent protocol (guest/PROTOCOL.md): waits for the
//! agent to connect, asks it to run the process, carries the process's stdio
//! between the guest and the host, and brings back how it ended.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::vsock::HostPorts;
use guest::protocol::{self, Exited, Failed, Message, Run, Signal, Started, CONTROL_PORT};

use crate::process::{Outcome, ProcessSpec};
use crate::vm::threads::{Ending, Worker};
use crate::vm::{Error, Exit};

/// Host ports of the process's stdio, served inside uvm.
const STDIN_PORT: u32 = CONTROL_PORT + 1;
const STDOUT_PORT: u32 = CONTROL_PORT + 2;
const STDERR_PORT: u32 = CONTROL_PORT + 3;
/// Message id of the one run request.
const RUN_ID: u64 = 1;

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

/// What the session saw, and when.
#[derive(Debug, Default)]
pub struct Progress {
    pub agent_connected: Option<Instant>,
    /// Where signals for the process go, once it may have started.
    control: Option<UnixStream>,
}

impl Progress {
    /// Forwards `signal` to the process; false if no process runs yet.
    pub fn forward_signal(&mut self, signal: i32) -> bool {
        let Some(control) = &mut self.control else {
            return false;
        };
        if let Err(e) = protocol::send(control, RUN_ID, &Signal { signal }) {
            tracing::warn!("forwarding signal {signal}: {e}");
        }
        true
    }
}

/// The agent's streams as the vsock device hands them over.
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
    progress: Arc<Mutex<Progress>>,
}

impl Session {
    /// Serves the agent's ports in `ports`. Without `process` the session
    /// ends as soon as the agent connects (a boot check).
    pub fn new(process: Option<ProcessSpec>, ports: &mut HostPorts) -> Self {
        let mut serve = |port| {
            let (tx, rx) = mpsc::channel();
            ports.serve(port, tx);
            rx
        };
        Self {
            ports: Ports {
                control: serve(CONTROL_PORT),
                stdin: serve(STDIN_PORT),
                stdout: serve(STDOUT_PORT),
                stderr: serve(STDERR_PORT),
            },
            process,
            progress: Arc::default(),
        }
    }

    pub fn progress(&self) -> Arc<Mutex<Progress>> {
        self.progress.clone()
    }

    /// Runs the session on a thread of its own, which ends the VM with the
    /// process's outcome, or with a session failure if the agent's streams
    /// end without one. The thread ends once the vsock device is gone.
    pub fn start(self, stdio: Stdio, ending: &Arc<Ending>) -> Result<Worker, Error> {
        let reporter = ending.clone();
        Worker::spawn("agent", ending, move || {
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
            self.update(|p| p.control = None);
            drop(held);
            None
        })
    }

    fn serve(&self, stdio: Stdio, ending: &Arc<Ending>, held: &mut Held) -> io::Result<Exit> {
        let control = held.control.insert(recv(&self.ports.control)?);
        self.update(|p| p.agent_connected = Some(Instant::now()));
        let Some(process) = &self.process else {
            return Ok(Exit::Booted);
        };
        protocol::send(control, RUN_ID, &run_request(process))?;
        let signals = control.try_clone().ok();
        self.update(|p| p.control = signals);
        self.connect_stdio(process.tty.is_some(), stdio, ending, held)?;
        let outcome = receive_outcome(held.control.as_mut().expect("set above"))?;
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
        held.stdin = Some(Worker::spawn("stdin", ending, forward).map_err(spawned)?);
        Ok(())
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut crate::lock(&self.progress));
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

/// Reads the control stream until the process's outcome; anything else the
/// agent sends by then is a broken session.
fn receive_outcome(control: &mut impl Read) -> io::Result<Outcome> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    loop {
        let Some(frame) = protocol::receive(control)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the control stream",
            ));
        };
        if frame.id != RUN_ID {
            return Err(invalid(format!("a message about request {}", frame.id)));
        }
        match frame.kind {
            Started::KIND => drop(frame.decode::<Started>()?),
            Exited::KIND => {
                let exited = frame.decode::<Exited>()?.checked().map_err(invalid)?;
                return Ok(Outcome::Exited(exited));
            }
            Failed::KIND => {
                let failed = frame.decode::<Failed>()?;
                // A process that never ran cannot have succeeded.
                if !(1..=255).contains(&failed.exit_code) {
                    return Err(invalid(format!(
                        "exit code {} is not 1-255",
                        failed.exit_code
                    )));
                }
                return Ok(Outcome::Failed(failed));
            }
            kind => return Err(invalid(format!("unexpected message kind {kind:#x}"))),
        }
    }
}

fn run_request(process: &ProcessSpec) -> Run {
    Run {
        stdin_port: STDIN_PORT,
        stdout_port: STDOUT_PORT,
        stderr_port: process.tty.is_none().then_some(STDERR_PORT),
        ..process.request()
    }
}

fn recv(rx: &Receiver<UnixStream>) -> io::Result<UnixStream> {
    rx.recv()
        .map_err(|_| io::Error::other("the vsock device stopped"))
}

/// Copies a guest stream to a host output as data arrives, until the guest
/// side ends (the process closed it, or the device went with the VM).
fn copy(
    name: &str,
    mut from: UnixStream,
    mut to: Box<dyn Write + Send>,
    ending: &Arc<Ending>,
) -> Result<Worker, Error> {
    Worker::spawn(name, ending, move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                return None;
            }
        }
    })
}

/// The host's input to the process; at its end, end of file for the
/// process. Stops as soon as the guest side is gone, even while the host
/// input has nothing to say (a terminal).
fn forward_stdin(from: OwnedFd, mut to: UnixStream) {
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
        let outcome = receive_outcome(&mut &wire[..]).unwrap();
        assert_eq!(outcome, Outcome::Exited(Exited::Signal(9)));
    }

    #[test]
    fn a_session_without_an_exit_status_is_an_error() {
        let closed = frames(|w| protocol::send(w, RUN_ID, &Started { pid: 7 }).unwrap());
        let err = receive_outcome(&mut &closed[..]).unwrap_err();
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
            assert!(
                receive_outcome(&mut &wire[..]).is_err(),
                "accepted {wire:?}"
            );
        }
    }

    #[test]
    fn a_session_whose_agent_hangs_up_ends_the_vm_with_an_error() {
        let mut ports = HostPorts::new(None);
        let session = Session::new(
            Some(ProcessSpec {
                argv: vec!["/bin/true".into()],
                ..ProcessSpec::default()
            }),
            &mut ports,
        );
        // What the vsock device does when the agent connects to the port:
        // this end stands for the agent.
        let mut agent = ports.connect(CONTROL_PORT).unwrap();
        let ending = Arc::new(Ending::default());
        let stdio = Stdio {
            stdin: std::fs::File::open("/dev/null").unwrap().into(),
            stdout: Box::new(io::sink()),
            stderr: Box::new(io::sink()),
        };
        let worker = session.start(stdio, &ending).unwrap();
        // The agent reads the request, then its control stream closes
        // before any stdio connection or exit status.
        let request = protocol::receive(&mut agent).unwrap().unwrap();
        assert_eq!(request.decode::<Run>().unwrap().argv, ["/bin/true"]);
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
}
