//! The threads a VM starts: each has a name and an owner that joins it, and
//! each tells the VM's [`Ending`] how it ended. The first reason to end the
//! VM is the one [`super::Running::wait`] returns; later ones are logged.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{Error, Exit};
use crate::lock;

/// Holds the main process's run request back while anyone holds it: a
/// template being saved (the agent is then connected and idle), a
/// container created but not started yet (`uvm create`).
#[derive(Clone, Default)]
pub struct RunGate(Arc<AtomicU32>);

impl RunGate {
    pub fn hold(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Lets go of one hold; the last one opens the gate.
    pub fn release(&self, ending: &Ending) {
        let _ = (self.0).fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        ending.notify();
    }

    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }
}

/// Where every part of the VM reports why it ends; the first report wins.
#[derive(Default)]
pub struct Ending {
    exit: Mutex<Option<Exit>>,
    cond: Condvar,
}

impl Ending {
    /// Ends the VM for `exit`, unless it has ended already.
    pub fn end(&self, exit: Exit) {
        let mut slot = lock(&self.exit);
        match &*slot {
            Some(first) => tracing::debug!(?exit, ?first, "VM already ending"),
            None => {
                tracing::debug!(?exit, "VM ending");
                *slot = Some(exit);
                self.cond.notify_all();
            }
        }
    }

    /// Waits until something ends the VM.
    pub fn wait(&self) -> Exit {
        let slot = lock(&self.exit);
        let slot = self
            .cond
            .wait_while(slot, |exit| exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.clone().expect("waited until set")
    }

    /// How the VM ended, if it has.
    pub fn get(&self) -> Option<Exit> {
        lock(&self.exit).clone()
    }

    /// Waits at most `timeout` for the VM to end.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<Exit> {
        let slot = lock(&self.exit);
        let (slot, _) = self
            .cond
            .wait_timeout_while(slot, timeout, |exit| exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.clone()
    }

    /// Waits until `reached` holds (re-checked after each [`Self::notify`])
    /// or the VM ends, and says which.
    pub fn wait_for(&self, reached: impl Fn() -> bool) -> Result<(), Exit> {
        let slot = lock(&self.exit);
        let slot = self
            .cond
            .wait_while(slot, |exit| exit.is_none() && !reached())
            .unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(exit) if !reached() => Err(exit.clone()),
            _ => Ok(()),
        }
    }

    /// Wakes [`Self::wait_for`]: what it waits for may have happened.
    pub fn notify(&self) {
        let _slot = lock(&self.exit);
        self.cond.notify_all();
    }
}

/// What a VMM thread does, which decides the system calls it may make
/// (its seccomp filter on Linux: `sys::confine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU and answers its port and MMIO exits.
    Vcpu,
    /// The device event loop: virtio queues, host sockets, the block file.
    Devices,
    /// The agent session and the stdio copiers it starts.
    Agent,
    /// The control socket: its listener, clients and their execs.
    Control,
    /// The main thread (once the VM runs) and the signal thread.
    Main,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Agent,
        ThreadKind::Control,
        ThreadKind::Main,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Agent => "agent",
            ThreadKind::Control => "control",
            ThreadKind::Main => "main",
        }
    }
}

/// A running VM thread, joined by whoever holds this (at the latest when
/// it drops this: tell the thread to stop first).
pub struct Worker {
    name: String,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `body` on a thread called `name`, confined to what a thread
    /// of `kind` may do. What it returns is how it ended: `Some(exit)` ends
    /// the VM for that reason, `None` means it stopped because it was told
    /// to. A panic ends the VM too, and so does a filter that cannot be
    /// installed (the body does not run).
    pub fn spawn(
        name: impl Into<String>,
        kind: ThreadKind,
        ending: &std::sync::Arc<Ending>,
        body: impl FnOnce() -> Option<Exit> + Send + 'static,
    ) -> Result<Self, Error> {
        let name = name.into();
        let ending = ending.clone();
        let thread = name.clone();
        let inherited = crate::sys::confined();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Err(e) = crate::sys::confine(kind, inherited) {
                    let why = format!("the {thread} thread's {} filter: {e}", kind.name());
                    return ending.end(Exit::Vmm(why));
                }
                let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
                match ended {
                    Ok(None) => tracing::debug!("thread {thread}: stopped"),
                    Ok(Some(exit)) => {
                        tracing::debug!(?exit, "thread {thread}: ended");
                        ending.end(exit);
                    }
                    Err(_) => ending.end(Exit::Vmm(format!("the {thread} thread panicked"))),
                }
            })
            .map_err(Error::Thread)?;
        Ok(Self {
            name,
            handle: Some(handle),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The thread, for signalling it (until it is joined).
    #[cfg(unix)]
    pub fn pthread(&self) -> libc::pthread_t {
        let handle = self.handle.as_ref().expect("joined only on drop");
        let raw = std::os::unix::thread::JoinHandleExt::as_pthread_t(handle);
        // std and the libc crate spell musl's pthread_t differently (an
        // integer, a pointer); on glibc both are the same integer.
        #[allow(clippy::unnecessary_cast)]
        let pthread = raw as libc::pthread_t;
        pthread
    }

    /// Waits for the thread to end; the owner has told it to stop.
    /// Whether its thread has ended (joining it then does not wait).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    pub fn join(self) {
        drop(self);
    }

    /// Lets the thread go unjoined, for when it could not be told to stop
    /// (joining would hang); the process's exit ends it.
    pub fn detach(mut self) {
        tracing::error!("thread {}: left running", self.name);
        self.handle = None;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // The body's panic was caught and reported inside the thread.
            let _ = handle.join();
            tracing::debug!("thread {}: joined", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_first_ending_wins() {
        let ending = Ending::default();
        ending.end(Exit::Reset);
        ending.end(Exit::Vmm("later".into()));
        assert_eq!(ending.wait(), Exit::Reset);
    }

    #[test]
    fn a_worker_reports_how_it_ended() {
        let ending = Arc::new(Ending::default());
        let stopped = Worker::spawn("quiet", ThreadKind::Main, &ending, || None).unwrap();
        stopped.join();
        assert_eq!(ending.get(), None, "stopping as asked does not end the VM");
        let panicked =
            Worker::spawn("boom", ThreadKind::Main, &ending, || panic!("device bug")).unwrap();
        assert_eq!(panicked.name(), "boom");
        panicked.join();
        assert_eq!(ending.wait(), Exit::Vmm("the boom thread panicked".into()));
    }
}
