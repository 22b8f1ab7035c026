//! Linux hosts: KVM, an event thread (event-manager on epoll) serving the
//! virtio devices, and the agent over the in-VMM vsock device, with the
//! process's stdio on this process's own and its signals forwarded.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::fs::Fs;
use devices::virtio::vsock::{HostPorts, Vsock};
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use guest::protocol::Fresh;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::agent::Stdio;
use crate::agent::{Agent, Session};
use crate::console::Console;
use crate::hypervisor::kvm::KvmHypervisor;
use crate::hypervisor::{self, Vm};
use crate::signals::{self, Forwarder};
use crate::terminal::RawMode;
use crate::vm::board::DeviceEnv;
use crate::vm::layout::Slot;
use crate::vm::threads::{Ending, RunGate, ThreadKind, Worker};

pub use super::seccomp::{confine, confined};
use crate::vm::{Error, Exit, Share, VmConfig};

/// The agent talks over vsock: the layout has a vsock device.
pub const HAS_VSOCK: bool = true;
/// The process's output has streams of its own, not the console.
pub const CONSOLE_CARRIES_OUTPUT: bool = false;

pub type HostHypervisor = KvmHypervisor;

/// Opens /dev/kvm for `config`'s kind of host (the vCPU count is the VM's
/// business on KVM).
pub fn open_hypervisor(config: &VmConfig) -> hypervisor::Result<HostHypervisor> {
    KvmHypervisor::for_host(config.host)
}

/// Now on the host's monotonic clock, for lining up with other processes.
pub fn monotonic() -> Option<Duration> {
    Some(crate::clock::monotonic())
}

/// The host terminal in raw mode while a `-t` process runs, if it is one.
pub fn raw_terminal() -> Option<RawMode> {
    RawMode::enter_if_terminal()
}

pub fn terminal_size() -> Option<guest::protocol::TtySize> {
    crate::terminal::size()
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio device the [`DeviceLoop`] can serve.
pub trait Served: VirtioDevice + MutEventSubscriber + 'static {}
impl<T: VirtioDevice + MutEventSubscriber + 'static> Served for T {}

/// Lets KVM signal a queue's eventfd itself on the guest's notify write
/// at `notify` (ioeventfd), without an exit to the VMM.
pub fn register_notifiers<V: Vm>(
    vm: &V,
    device: &dyn VirtioDevice,
    notify: u64,
) -> Result<(), Error> {
    for (queue, event) in (0u32..).zip(device.queue_events()) {
        vm.register_notifier(event, notify, queue)?;
    }
    Ok(())
}

/// Attaches shared directory `index` at `slot`: a virtio-fs device served
/// on the event thread.
pub fn attach_share<V: Vm>(
    env: &mut DeviceEnv<'_, V>,
    slot: &Slot,
    index: usize,
    share: &Share,
) -> Result<(), Error> {
    let failed = |source| Error::Share {
        path: share.dir.clone(),
        source,
    };
    let dir = share.dir.to_str().ok_or_else(|| {
        failed(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not UTF-8",
        ))
    })?;
    let tag = guest::share_tag(index as u32);
    let fs = Fs::new(env.mem, dir, &tag, share.read_only, share.keep_cache).map_err(failed)?;
    env.attach(slot, fs)
}

/// The device event loop: queue notifications and host sockets, on one
/// thread, until it is told to stop.
pub struct DeviceLoop {
    manager: EventManager<Subscriber>,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
    park: Arc<Park>,
}

/// Parks the event thread between two dispatches while a snapshot is
/// taken, so that no device touches guest memory or its queues meanwhile:
/// asked through `event`, the thread parks in its handler.
struct Park {
    event: EventFd,
    state: Mutex<Parking>,
    changed: std::sync::Condvar,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Parking {
    #[default]
    Running,
    Asked,
    Parked,
}

/// The event thread's side of [`Park`]: it parks when its event comes.
struct Parker(Arc<Park>);

impl MutEventSubscriber for Parker {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, &self.0.event, "park");
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let park = &*self.0;
        let _ = park.event.read();
        let mut state = crate::lock(&park.state);
        if *state != Parking::Asked {
            return;
        }
        *state = Parking::Parked;
        park.changed.notify_all();
        while *state == Parking::Parked {
            state = park.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The event thread parked ([`RunningLoop::park`]) until this goes.
pub struct Parked<'a>(&'a Park);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        *crate::lock(&self.0.state) = Parking::Running;
        self.0.changed.notify_all();
    }
}

/// How long a park waits for the event thread to finish what it serves.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Watches one of the loop's own events (`what` names it in the log).
fn watch(ops: &mut EventOps, event: &EventFd, what: &str) {
    if let Err(e) = ops.add(Events::new(event, event_manager::EventSet::IN)) {
        tracing::error!("event loop: watching the {what} event: {e}");
    }
}

/// Ends the loop when its event is written.
struct Stopper {
    event: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, &self.event, "stop");
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.event.read();
        self.stopped.store(true, Ordering::SeqCst);
    }
}

impl DeviceLoop {
    pub fn new() -> Result<Self, Error> {
        let failed = |e: String| Error::Devices(std::io::Error::other(format!("event loop: {e}")));
        let mut manager =
            EventManager::<Subscriber>::new().map_err(|e| failed(format!("{e:?}")))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::Devices)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stopper = Stopper {
            event: stop.try_clone().map_err(Error::Devices)?,
            stopped: stopped.clone(),
        };
        manager.add_subscriber(Arc::new(Mutex::new(stopper)));
        let park = Arc::new(Park {
            event: EventFd::new(EFD_NONBLOCK).map_err(Error::Devices)?,
            state: Mutex::default(),
            changed: std::sync::Condvar::new(),
        });
        manager.add_subscriber(Arc::new(Mutex::new(Parker(park.clone()))));
        Ok(Self {
            manager,
            stop,
            stopped,
            park,
        })
    }

    /// Adds `device` to the devices the loop serves.
    pub fn serve<D: Served>(&mut self, device: Arc<Mutex<D>>) {
        self.manager.add_subscriber(device);
    }

    /// Runs the loop on its own thread. A loop that fails ends the VM.
    pub fn start(self, ending: &Arc<Ending>) -> Result<RunningLoop, Error> {
        let Self {
            mut manager,
            stop,
            stopped,
            park,
        } = self;
        let worker = Worker::spawn("events", ThreadKind::Devices, ending, move || {
            while !stopped.load(Ordering::SeqCst) {
                if let Err(e) = manager.run() {
                    return Some(Exit::Vmm(format!("the device event loop failed: {e:?}")));
                }
            }
            None
        })?;
        Ok(RunningLoop { stop, park, worker })
    }
}

/// The event thread; its devices go with it.
pub struct RunningLoop {
    stop: EventFd,
    park: Arc<Park>,
    worker: Worker,
}

impl RunningLoop {
    /// Parks the event thread once it has served what it is serving, until
    /// the returned guard goes. A thread that does not park within
    /// [`PARK_TIMEOUT`] (it ended, or a device is stuck) is an error.
    pub fn park(&self) -> Result<Parked<'_>, Error> {
        let park = &*self.park;
        *crate::lock(&park.state) = Parking::Asked;
        // From here on, however this returns, the thread runs on after.
        let parked = Parked(park);
        park.event.write(1).map_err(Error::Devices)?;
        let state = crate::lock(&park.state);
        let (state, wait) = park
            .changed
            .wait_timeout_while(state, PARK_TIMEOUT, |s| *s != Parking::Parked)
            .unwrap_or_else(|p| p.into_inner());
        drop(state);
        if wait.timed_out() {
            return Err(Error::Pause(format!(
                "the device event thread did not stop within {PARK_TIMEOUT:?}"
            )));
        }
        Ok(parked)
    }

    pub fn stop(self) {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("stopping the event loop: {e}");
            return self.worker.detach();
        }
        self.worker.join();
    }
}

/// The link to the agent before the VM starts: the vsock device's host
/// ports, the session that will serve them, and the hybrid socket.
pub struct AgentLink {
    session: Session,
    ports: Option<HostPorts>,
    hybrid: Option<HybridSocket>,
    signals: Option<signals::Blocked>,
    guest_cid: u64,
    /// The process runs on a terminal: size changes go to it.
    tty: bool,
}

impl AgentLink {
    /// Blocks the forwarded signals first when there is a process to run:
    /// call it before the VM starts any thread.
    pub fn new(config: &VmConfig) -> Result<Self, Error> {
        let signals = match config.process {
            Some(_) => Some(signals::block().map_err(Error::Devices)?),
            None => None,
        };
        let hybrid = config
            .vsock
            .uds
            .as_deref()
            .map(HybridSocket::bind)
            .transpose()?;
        let ports = HostPorts::new(config.vsock.uds.clone());
        let entropy = crate::random_bytes::<{ Fresh::MAX_ENTROPY }>().map_err(Error::Devices)?;
        let session = Session::new(
            config.process.clone(),
            config.tools_device(),
            &ports,
            entropy.to_vec(),
        );
        Ok(Self {
            session,
            ports: Some(ports),
            hybrid,
            signals,
            guest_cid: config.vsock.guest_cid,
            tty: config.process.as_ref().is_some_and(|p| p.tty.is_some()),
        })
    }

    /// From now on the run request waits for the returned gate.
    pub fn hold_run(&mut self) -> Result<RunGate, Error> {
        Ok(self.session.hold_run())
    }

    /// The run request goes over vsock, not on the command line.
    pub fn cmdline_request(&self) -> Option<String> {
        None
    }

    /// Attaches the vsock device at `slot`.
    pub fn attach<V: Vm>(&mut self, env: &mut DeviceEnv<'_, V>, slot: &Slot) -> Result<(), Error> {
        let ports = self.ports.take().expect("one vsock slot");
        let listener = self.hybrid.as_ref().map(|h| h.listener.try_clone());
        let listener = listener.transpose().map_err(Error::Devices)?;
        let vsock =
            Vsock::new(env.mem.clone(), self.guest_cid, ports, listener).map_err(Error::Devices)?;
        env.attach(slot, vsock)
    }

    /// Starts the session (and signal forwarding), recording them in `link`.
    pub fn start(self, stdio: Stdio, ending: &Arc<Ending>, link: &mut Link) -> Result<(), Error> {
        let agent = self.session.agent();
        link.agent = Some(agent.clone());
        link.hybrid = self.hybrid;
        link.session = Some(self.session.start(stdio, ending)?);
        if let Some(signals) = self.signals {
            let interrupted = ending.clone();
            let tty = self.tty;
            let forward = move |signal| {
                if signal == libc::SIGWINCH {
                    if tty {
                        agent.resize_main(terminal_size().unwrap_or_default());
                    }
                    return;
                }
                if !agent.signal_main(signal) {
                    interrupted.end(Exit::Interrupted { signal });
                }
            };
            link.forwarder = Some(signals.forward(forward, ending)?);
        }
        Ok(())
    }
}

/// The running link to the agent.
#[derive(Default)]
pub struct Link {
    session: Option<Worker>,
    forwarder: Option<Forwarder>,
    agent: Option<Agent>,
    hybrid: Option<HybridSocket>,
}

impl Link {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop_signals(&mut self) {
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.stop();
        }
    }

    /// Joins the session: call it once the vsock device is gone, which
    /// ends every stream the session waits on.
    pub fn join(&mut self) {
        if let Some(session) = self.session.take() {
            session.join();
        }
        self.hybrid = None;
    }

    pub fn agent_connected(&self) -> Option<Instant> {
        self.agent.as_ref().and_then(Agent::agent_connected)
    }

    pub fn process_started(&self) -> bool {
        self.agent.as_ref().is_some_and(Agent::main_started)
    }

    /// The agent, for requests beside the main process.
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// How the VM ended, as the session already said.
    pub fn exit(&self, exit: Exit, _: &Console) -> Exit {
        exit
    }
}

/// The hybrid vsock socket, removed when the VM ends.
struct HybridSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl HybridSocket {
    fn bind(path: &Path) -> Result<Self, Error> {
        let listener = UnixListener::bind(path).map_err(|source| Error::VsockSocket {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }
}

impl Drop for HybridSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose queue handling panics: a bug that kills the loop.
    struct Broken(EventFd);

    impl MutEventSubscriber for Broken {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, event_manager::EventSet::IN))
                .unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            panic!("device bug");
        }
    }

    /// A device that counts what it serves.
    struct Counter(EventFd, Arc<std::sync::atomic::AtomicU32>);

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, event_manager::EventSet::IN))
                .unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.0.read();
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_parked_event_loop_serves_nothing_until_let_go() {
        let mut events = DeviceLoop::new().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = Counter(kick.try_clone().unwrap(), served.clone());
        events.manager.add_subscriber(Arc::new(Mutex::new(counter)));
        let ending = Arc::new(Ending::default());
        let running = events.start(&ending).unwrap();
        let wait_served = |n| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while served.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            served.load(Ordering::SeqCst)
        };
        kick.write(1).unwrap();
        assert_eq!(wait_served(1), 1);
        let parked = running.park().unwrap();
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(served.load(Ordering::SeqCst), 1, "served while parked");
        drop(parked);
        assert_eq!(wait_served(2), 2, "not served once let go");
        // Parked and let go again: the loop still stops when told.
        drop(running.park().unwrap());
        running.stop();
        assert_eq!(ending.get(), None);
    }

    #[test]
    fn parking_an_ended_event_loop_is_an_error_not_a_hang() {
        let mut events = DeviceLoop::new().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let broken = Broken(kick.try_clone().unwrap());
        events.manager.add_subscriber(Arc::new(Mutex::new(broken)));
        let ending = Arc::new(Ending::default());
        let running = events.start(&ending).unwrap();
        kick.write(1).unwrap();
        ending.wait();
        let e = running.park().err().expect("an ended loop parked");
        assert!(e.to_string().contains("did not stop"), "{e}");
        running.worker.join();
    }

    #[test]
    fn a_dead_event_loop_ends_the_vm_with_an_error() {
        let mut events = DeviceLoop::new().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let broken = Broken(kick.try_clone().unwrap());
        events.manager.add_subscriber(Arc::new(Mutex::new(broken)));
        let ending = Arc::new(Ending::default());
        let running = events.start(&ending).unwrap();
        kick.write(1).unwrap();
        assert_eq!(
            ending.wait(),
            Exit::Vmm("the events thread panicked".into())
        );
        running.worker.join();
    }

    #[test]
    fn a_stopped_event_loop_ends_nothing() {
        let ending = Arc::new(Ending::default());
        let running = DeviceLoop::new().unwrap().start(&ending).unwrap();
        running.stop();
        assert_eq!(ending.get(), None);
    }
}
