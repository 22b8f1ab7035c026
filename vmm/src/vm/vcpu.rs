//! vCPU threads. Each runs its vCPU until the guest faults or the VM tells
//! it to stop; between two runs it looks at what the VM wants, so pausing
//! means: ask, kick every vCPU out of the guest, wait until all are parked.
//! A parked thread also does work the VM gives it on its vCPU (reading its
//! state for a snapshot): KVM wants a vCPU's ioctls from its own thread.

use std::any::Any;
use std::sync::mpsc;
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

/// Work for a parked vCPU thread, given its vCPU.
type Task = Box<dyn FnOnce(&mut dyn Any) + Send>;

struct State {
    want: Want,
    /// vCPU threads parked by a pause.
    parked: usize,
    /// vCPU threads that have not ended.
    live: usize,
    /// Work for each vCPU's thread, by vCPU id.
    tasks: Vec<Option<Task>>,
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

    /// Called by vCPU `id`'s thread between runs: parks while the VM is
    /// paused, doing the work it is given on `vcpu`. False once the vCPU
    /// must stop.
    fn proceed(&self, id: usize, vcpu: &mut dyn Any) -> bool {
        let mut state = self.lock();
        if state.want == Want::Pause {
            state.parked += 1;
            self.changed.notify_all();
            loop {
                state = self
                    .changed
                    .wait_while(state, |s| s.want == Want::Pause && s.tasks[id].is_none())
                    .unwrap_or_else(|p| p.into_inner());
                let Some(task) = state.tasks[id].take().filter(|_| state.want == Want::Pause)
                else {
                    break;
                };
                drop(state);
                task(vcpu);
                state = self.lock();
            }
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
                tasks: (0..vcpus.len()).map(|_| None).collect(),
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

    /// Runs `work` on every vCPU, each on its own thread, while
    /// the VM is paused ([`Self::pause`]); the results by vCPU id. `V` is
    /// the vCPUs' type as [`Self::start`] got them.
    pub fn on_each<V, T, F>(&self, work: F) -> Result<Vec<T>, Error>
    where
        V: Vcpu,
        T: Send + 'static,
        F: Fn(&mut V) -> T + Clone + Send + 'static,
    {
        let (done, results) = mpsc::channel();
        let count = {
            let mut state = self.control.lock();
            if state.want != Want::Pause || state.parked < state.live {
                return Err(Error::Pause("the vCPUs are not paused".into()));
            }
            if state.live < state.tasks.len() {
                return Err(Error::Pause("a vCPU's thread has ended".into()));
            }
            for (id, slot) in state.tasks.iter_mut().enumerate() {
                let (work, done) = (work.clone(), done.clone());
                *slot = Some(Box::new(move |vcpu: &mut dyn Any| {
                    if let Some(vcpu) = vcpu.downcast_mut::<V>() {
                        let _ = done.send((id, work(vcpu)));
                    }
                }));
            }
            state.tasks.len()
        };
        self.control.changed.notify_all();
        drop(done);
        let mut by_id: Vec<Option<T>> = (0..count).map(|_| None).collect();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        for _ in 0..count {
            let left = deadline.saturating_duration_since(Instant::now());
            match results.recv_timeout(left) {
                Ok((id, result)) => by_id[id] = Some(result),
                Err(_) => break,
            }
        }
        let answered = by_id.iter().flatten().count();
        // A thread that ended or was given no such vCPU drops its task.
        self.control.lock().tasks.iter_mut().for_each(|t| *t = None);
        by_id
            .into_iter()
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| {
                Error::Pause(format!(
                    "{} vCPU(s) of {count} did not do the work asked",
                    count - answered
                ))
            })
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
        if !control.proceed(id.into(), &mut vcpu) {
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
