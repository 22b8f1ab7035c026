//! vCPU threads. Each runs its vCPU until the guest faults or the VM tells
//! it to stop; between two runs it looks at what the VM wants, so pausing
//! means: ask, kick every vCPU out of the guest, wait until all are parked.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::threads::{Ending, ThreadKind, Worker};
use super::{Error, Exit};
use crate::hypervisor::{IoHandler, Kick, Vcpu, VcpuExit};
use crate::lock;

/// How long `pause` waits for the vCPUs to leave the guest. A kicked vCPU
/// returns within one exit; only a VMM bug could take this long.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct State {
    want: Want,
    /// vCPU threads parked by a pause.
    parked: usize,
    /// vCPU threads that have not ended.
    live: usize,
}

/// What the VM wants of its vCPUs, shared with every vCPU thread.
struct Control {
    state: Mutex<State>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn set(&self, want: Want) {
        self.lock().want = want;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between runs: parks while the VM is paused.
    /// False once the vCPU must stop.
    fn proceed(&self) -> bool {
        let mut state = self.lock();
        if state.want == Want::Pause {
            state.parked += 1;
            self.changed.notify_all();
            state = self
                .changed
                .wait_while(state, |s| s.want == Want::Pause)
                .unwrap_or_else(|p| p.into_inner());
            state.parked -= 1;
        }
        state.want == Want::Run
    }

    fn exited(&self) {
        self.lock().live -= 1;
        self.changed.notify_all();
    }
}

/// Tells the control that its vCPU thread ended, however it ended.
struct Exited(Arc<Control>);

impl Drop for Exited {
    fn drop(&mut self) {
        self.0.exited();
    }
}

/// The VM's running vCPUs.
pub struct Vcpus {
    control: Arc<Control>,
    kickers: Vec<Box<dyn Kick>>,
    workers: Vec<Worker>,
}

impl Vcpus {
    /// Starts one thread per vCPU, answering guest I/O with `io`, each
    /// parked until [`Self::resume`]. `entered` is set when vCPU 0 first
    /// enters the guest.
    pub fn start<V: Vcpu>(
        vcpus: Vec<V>,
        io: Arc<dyn IoHandler + Send + Sync>,
        ending: &Arc<Ending>,
        entered: &Arc<OnceLock<Instant>>,
    ) -> Result<Self, Error> {
        let control = Arc::new(Control {
            // Held (parked) until the VM is released.
            state: Mutex::new(State {
                want: Want::Pause,
                parked: 0,
                live: 0,
            }),
            changed: Condvar::new(),
        });
        // Built as they start, so that a failure stops those already running.
        let mut started = Self {
            control,
            kickers: Vec::new(),
            workers: Vec::new(),
        };
        for (id, vcpu) in (0u8..).zip(vcpus) {
            started.kickers.push(Box::new(vcpu.kicker()));
            started.control.lock().live += 1;
            let exited = Exited(started.control.clone());
            let (io, entered) = (io.clone(), entered.clone());
            let body = move || run(vcpu, id, &*io, &exited.0, &entered);
            // On failure the body is dropped unrun, and with it `exited`.
            started.workers.push(Worker::spawn(
                format!("vcpu{id}"),
                ThreadKind::Vcpu,
                ending,
                body,
            )?);
        }
        Ok(started)
    }

    /// Takes every vCPU out of the guest and parks it until [`Self::resume`].
    pub fn pause(&self) -> Result<(), Error> {
        self.control.set(Want::Pause);
        self.kick();
        let state = self.control.lock();
        let (state, waited) = self
            .control
            .changed
            .wait_timeout_while(state, PAUSE_TIMEOUT, |s| {
                s.want == Want::Pause && s.parked < s.live
            })
            .unwrap_or_else(|p| p.into_inner());
        if waited.timed_out() {
            let missing = state.live - state.parked;
            return Err(Error::Pause(format!(
                "{missing} vCPU(s) did not leave the guest within {PAUSE_TIMEOUT:?}"
            )));
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.control.set(Want::Run);
    }

    /// Stops every vCPU and joins its thread.
    pub fn stop(&mut self) {
        self.control.set(Want::Stop);
        self.kick();
        for worker in self.workers.drain(..) {
            worker.join();
        }
    }

    fn kick(&self) {
        for kicker in &self.kickers {
            kicker.kick();
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One vCPU thread: runs until the guest faults (which ends the VM) or the
/// VM says stop.
fn run<V: Vcpu>(
    mut vcpu: V,
    id: u8,
    io: &dyn IoHandler,
    control: &Control,
    entered: &OnceLock<Instant>,
) -> Option<Exit> {
    let mut first = id == 0;
    let reason = loop {
        if !control.proceed() {
            return None;
        }
        if std::mem::take(&mut first) {
            let _ = entered.set(Instant::now());
        }
        match vcpu.run(io) {
            Ok(VcpuExit::Io | VcpuExit::Interrupted) => {}
            Ok(VcpuExit::Shutdown) => break "triple fault (shutdown)".to_string(),
            Ok(VcpuExit::InternalError { detail }) => break detail,
            Ok(VcpuExit::Unexpected { reason }) => break format!("unexpected exit {reason}"),
            Err(e) => break e.to_string(),
        }
    };
    let rip = vcpu.instruction_pointer().ok();
    Some(Exit::Fault {
        cpu: id,
        reason,
        rip,
    })
}
