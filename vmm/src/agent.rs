//! The host side of the agent protocol (guest/PROTOCOL.md): waits for the
//! agent to connect, asks it to run the process, carries the process's stdio
//! between the guest and this process's own, and brings back how it ended.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use devices::virtio::vsock::HostPorts;
use guest::protocol::{self, Exited, Failed, Run, Signal, Started, CONTROL_PORT};

use crate::process::{Outcome, ProcessSpec};

/// Host ports of the process's stdio, served inside uvm.
const STDIN_PORT: u32 = CONTROL_PORT + 1;
const STDOUT_PORT: u32 = CONTROL_PORT + 2;
const STDERR_PORT: u32 = CONTROL_PORT + 3;
/// Message id of the one run request.
const RUN_ID: u64 = 1;

/// What the session saw, and when.
#[derive(Debug, Default)]
pub struct Progress {
    pub agent_connected: Option<Instant>,
    pub outcome: Option<Outcome>,
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

/// One agent session: the ports it serves and the process it runs.
pub struct Session {
    control: Receiver<UnixStream>,
    stdin: Receiver<UnixStream>,
    stdout: Receiver<UnixStream>,
    stderr: Receiver<UnixStream>,
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
            control: serve(CONTROL_PORT),
            stdin: serve(STDIN_PORT),
            stdout: serve(STDOUT_PORT),
            stderr: serve(STDERR_PORT),
            process,
            progress: Arc::default(),
        }
    }

    pub fn progress(&self) -> Arc<Mutex<Progress>> {
        self.progress.clone()
    }

    /// Runs the session on its own thread; `done` is called when it is over.
    pub fn start(self, done: impl FnOnce() + Send + 'static) -> io::Result<()> {
        std::thread::Builder::new()
            .name("agent".into())
            .spawn(move || {
                if let Err(e) = self.serve() {
                    tracing::warn!("agent session: {e}");
                }
                done();
            })?;
        Ok(())
    }

    fn serve(self) -> io::Result<()> {
        let mut control = recv(&self.control)?;
        self.update(|p| p.agent_connected = Some(Instant::now()));
        let Some(process) = &self.process else {
            return Ok(());
        };
        protocol::send(&mut control, RUN_ID, &run_request(process))?;
        self.update(|p| p.control = control.try_clone().ok());
        let stdio = self.connect_stdio(process.tty.is_some())?;
        while let Some(frame) = protocol::receive(&mut control)? {
            if frame.decode::<Started>().is_ok() {
                continue;
            } else if let Ok(exited) = frame.decode::<Exited>() {
                self.finish(Outcome::Exited(exited), stdio);
                return Ok(());
            } else if let Ok(failed) = frame.decode::<Failed>() {
                self.finish(Outcome::Failed(failed), stdio);
                return Ok(());
            } else {
                tracing::warn!(kind = frame.kind, "agent sent an unexpected message");
            }
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the control stream",
        ))
    }

    /// Takes the agent's stdio connections and starts copying.
    fn connect_stdio(&self, tty: bool) -> io::Result<Vec<JoinHandle<()>>> {
        let stdin = recv(&self.stdin)?;
        let stdout = recv(&self.stdout)?;
        let mut copiers = vec![spawn_copy("stdout", stdout, io::stdout)?];
        if !tty {
            copiers.push(spawn_copy("stderr", recv(&self.stderr)?, io::stderr)?);
        }
        // Not joined: the process may end without reading its input.
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || forward_stdin(stdin))?;
        Ok(copiers)
    }

    /// Records the outcome once the process's output has all arrived (the
    /// agent closes the streams before it reports).
    fn finish(&self, outcome: Outcome, copiers: Vec<JoinHandle<()>>) {
        for copier in copiers {
            let _ = copier.join();
        }
        self.update(|p| {
            p.outcome = Some(outcome);
            p.control = None;
        });
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut crate::lock(&self.progress));
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
        .map_err(|_| io::Error::other("vsock device stopped"))
}

/// Copies a guest stream to one of our outputs as data arrives.
fn spawn_copy<W: Write + 'static>(
    name: &str,
    mut from: UnixStream,
    to: fn() -> W,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut out = to();
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
        })
}

/// Our stdin to the process; at its end, end of file for the process.
fn forward_stdin(mut to: UnixStream) {
    let _ = io::copy(&mut io::stdin().lock(), &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}
