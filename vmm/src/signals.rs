//! While a process runs in the guest, the signals that would end uvm go to
//! that process instead, like `docker run` does.

use std::io;
use std::sync::Arc;

use crate::vm::threads::{Ending, ThreadKind, Worker};
use crate::vm::Error;

/// Ctrl-C, termination, hang-up, Ctrl-\ and the terminal's size changes.
const FORWARDED: [libc::c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGWINCH,
];

/// The signal that stops the forwarding thread (the vCPU kick is SIGRTMIN).
fn stop_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

/// The forwarded signals (and the stop signal), blocked in the calling
/// thread and every thread it starts afterwards: call it before starting any.
pub struct Blocked(libc::sigset_t);

pub fn block() -> io::Result<Blocked> {
    // SAFETY: sigemptyset/sigaddset initialise the set we own; a zeroed
    // sigset_t is valid storage for them.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED.into_iter().chain([stop_signal()]) {
            libc::sigaddset(&mut set, signal);
        }
        set
    };
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(Blocked(set))
}

impl Blocked {
    /// Hands each arriving signal to `handle` on a thread of its own, until
    /// [`Forwarder::stop`].
    pub fn forward(
        self,
        mut handle: impl FnMut(i32) + Send + 'static,
        ending: &Arc<Ending>,
    ) -> Result<Forwarder, Error> {
        let worker = Worker::spawn("signals", ThreadKind::Main, ending, move || loop {
            let mut signal = 0;
            // SAFETY: the set is initialised and `signal` is valid storage.
            if unsafe { libc::sigwait(&self.0, &mut signal) } != 0 {
                continue;
            }
            if signal == stop_signal() {
                return None;
            }
            handle(signal);
        })?;
        Ok(Forwarder(worker))
    }
}

/// The signal-forwarding thread.
pub struct Forwarder(Worker);

impl Forwarder {
    pub fn stop(self) {
        // SAFETY: the thread is not joined yet, so its handle is valid; the
        // signal is blocked there and taken by its sigwait.
        let rc = unsafe { libc::pthread_kill(self.0.pthread(), stop_signal()) };
        if rc != 0 {
            tracing::error!(
                "stopping the signal thread: {}",
                io::Error::from_raw_os_error(rc)
            );
            return self.0.detach();
        }
        self.0.join();
    }
}
