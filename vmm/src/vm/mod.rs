//! A utility VM as a value. [`UtilityVm::build`] checks and opens every
//! input of a [`VmConfig`], creates the VM, loads the guest and attaches its
//! devices; [`UtilityVm::start`] runs it and gives a [`Running`] handle to
//! wait for it, pause and resume it, and shut it down, which stops and joins
//! every thread the VM started and unmaps its memory.
//!
//! Who owns what: the running VM owns its vCPU threads ([`vcpu::Vcpus`]),
//! the device event loop and the agent link (session, stdio copiers, signal
//! forwarding, in `sys`), the hypervisor's VM, guest memory and the layer
//! mappings. Every thread reports how it ended to one [`threads::Ending`];
//! the first report is how the VM ended ([`Exit`]).

pub(crate) mod board;
pub mod layout;
#[cfg(unix)]
pub mod snapshot;
pub mod threads;
mod vcpu;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::boot_timer::BootTimer;
use devices::BusError;
use guest::boot_mark;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub use self::board::DeviceState;
use self::board::{pio_bus, Buses, DeviceEnv};
use self::layout::Layout;
use self::threads::{Ending, RunGate, ThreadKind};
use self::vcpu::Vcpus;
use crate::console::Console;
use crate::hypervisor::{self, CpuidEntry, Hypervisor, Stateful, Vcpu, Vm};
use crate::layer::{self, Layer};
use crate::process::{Outcome, ProcessSpec};
use crate::pvm::{self, HostKind};
use crate::sys::{self, AgentLink, DeviceLoop, Link, RunningLoop, Stdio};
use crate::{boot, cpuid, lock, memory, scratch};

/// Command line every guest gets: console on COM1, reset through the i8042
/// (so reboot ends the VM), reboot at once on panic, no legacy UART probing,
/// and no /sys/module/*/parameters for built-in code (nothing in a utility VM
/// reads them; creating them took 2 s of a 16 s boot on PVM hosts).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 no_timer_check \
    initcall_blacklist=param_sysfs_builtin_init";

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the command line uvm builds.
    pub extra_cmdline: Option<String>,
    pub memory_mib: u64,
    pub cpus: u8,
    /// Show the guest console (kernel log included) on stderr.
    pub console: bool,
    pub host: HostKind,
    pub vsock: VsockConfig,
    /// Read-only image layers, bottom first: one virtio-pmem device each.
    pub layers: Vec<PathBuf>,
    /// The VM's own tools (an ext4 image of busybox and its commands) for
    /// processes in the VM itself (`uvm console`): a pmem device after the
    /// layers, mounted only when first used.
    pub tools: Option<PathBuf>,
    /// The writable layer's image and the size to create it with.
    pub scratch: Option<(PathBuf, u64)>,
    /// Host directories shared live with the guest: one virtio-fs device
    /// each, after the scratch disk.
    #[serde(default)]
    pub shares: Vec<Share>,
    /// The process to run; without one the VM ends once the agent is up.
    pub process: Option<ProcessSpec>,
}

/// A host directory the guest mounts by its tag ([`guest::share_tag`]);
/// `read_only` is enforced by the VMM, not only by the guest's mount.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub dir: PathBuf,
    pub read_only: bool,
    /// Only the VM changes it (a container's root): the guest may keep
    /// file data cached across opens.
    #[serde(default)]
    pub keep_cache: bool,
}

impl VmConfig {
    /// The tools' pmem device number in the guest: the one after the layers.
    pub fn tools_device(&self) -> Option<u32> {
        self.tools.as_ref().map(|_| self.layers.len() as u32)
    }

    /// Every read-only image the VM maps: the layers, then the tools.
    pub(crate) fn images(&self) -> impl Iterator<Item = &PathBuf> {
        self.layers.iter().chain(&self.tools)
    }
}

/// The guest's vsock address unless told otherwise (the first one not
/// reserved; the host is 2).
pub const DEFAULT_GUEST_CID: u64 = 3;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Hybrid vsock: host programs reach guest ports through this Unix
    /// socket, and guest connections to host port P go to `{uds}_P`.
    pub uds: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error("guest memory ({mib} MiB): {source}")]
    Memory { mib: u64, source: std::io::Error },
    #[error("device layout: {0}")]
    Layout(#[from] layout::Error),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("starting a VMM thread: {0}")]
    Thread(std::io::Error),
    #[error("hybrid vsock socket {path}: {source}")]
    VsockSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    ControlSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting up devices: {0}")]
    Devices(std::io::Error),
    #[error("{0}")]
    Unsupported(&'static str),
    #[cfg(unix)]
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error("saved device state: {0}")]
    DeviceState(String),
    #[error("pausing the VM: {0}")]
    Pause(String),
    #[error("the main thread's seccomp filter: {0}")]
    Confine(std::io::Error),
    #[error(transparent)]
    Layer(#[from] layer::Error),
    #[error(transparent)]
    Scratch(#[from] scratch::Error),
    #[error("mount of {0}: no layer or share holds it (volume::attach makes one)")]
    Unattached(PathBuf),
    #[error("shared directory {path}: {source}")]
    Share {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a VM ended: the first reason any part of it gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The process ran and ended, or could not start.
    Process(Outcome),
    /// There was no process to run and the agent came up (a boot check).
    Booted,
    /// uvm got `signal` before the process started.
    Interrupted { signal: i32 },
    /// The guest reset the machine (reboot, power-off, or panic=-1) before
    /// the agent reported an outcome.
    Reset,
    /// A vCPU stopped in a way the guest cannot recover from.
    Fault {
        cpu: u8,
        reason: String,
        rip: Option<u64>,
    },
    /// The agent session ended without the process's outcome.
    Session(String),
    /// A part of the VMM failed (the device event loop, a panicked thread).
    Vmm(String),
    /// The host shut the VM down before anything else ended it.
    Stopped,
}

/// What a run produced, once the VM is gone.
pub struct Report {
    pub exit: Exit,
    pub timings: Timings,
    pub console: Console,
    /// The VMM's resident memory without guest RAM, when the host tells.
    pub vmm_rss_kib: Option<u64>,
}

/// Host-clock milestones, measured from VMM process start; the agent's and
/// the process's are the guest's boot marks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// The guest came from a snapshot, not a cold boot.
    pub restored: bool,
    /// How long saving a snapshot of the VM took, if one was.
    pub snapshot_saved: Option<Duration>,
    pub first_vcpu_entry: Option<Duration>,
    pub agent_started: Option<Duration>,
    pub agent_connected: Option<Duration>,
    pub process_started: Option<Duration>,
    /// The process ended, its leftovers were killed and the disks synced.
    pub process_exited: Option<Duration>,
    pub ended: Duration,
}

/// The full guest command line for `config` with its devices at `layout`:
/// uvm's flags, the virtio devices, the run request where it travels on
/// the command line, then the user's additions (which may end in init
/// arguments).
fn cmdline(config: &VmConfig, layout: &Layout, link: &AgentLink) -> String {
    let flags = uvm_flags(config).into_iter().map(str::to_string);
    flags
        .chain(layout.cmdline_entries())
        .chain(root_entry(config))
        .chain(link.cmdline_request())
        .chain(config.extra_cmdline.clone())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The container root every run of the VM uses, for the agent to assemble
/// at boot (`uvm.root=`).
pub fn root_entry(config: &VmConfig) -> Option<String> {
    let root = config.process.as_ref()?.root?;
    Some(guest::protocol::root_to_cmdline(&root))
}

/// The command line without device entries: what another VMM passes to
/// boot the same guest the same way (`uvm bench --against`).
pub fn guest_flags(config: &VmConfig) -> String {
    let mut flags = uvm_flags(config);
    flags.extend(config.extra_cmdline.as_deref());
    flags.join(" ")
}

fn uvm_flags(config: &VmConfig) -> Vec<&str> {
    let quiet = (!config.console).then_some("quiet");
    [Some(BASE_CMDLINE), quiet, pvm::guest_flags(config.host)]
        .into_iter()
        .flatten()
        .collect()
}

/// Builds `config`'s VM, runs it until something ends it, and shuts it
/// down. Returns only once the VM and every thread it started are gone and
/// its memory is unmapped. `start` is when the VMM process started.
pub fn run<H, F>(open: F, config: &VmConfig, start: Instant, stdio: Stdio) -> Result<Report, Error>
where
    H: Hypervisor + Send,
    H::Vm: Send,
    F: FnOnce() -> hypervisor::Result<H> + Send,
{
    let running = UtilityVm::build(open, config, start)?.start(stdio)?;
    running.release()?;
    running.wait();
    Ok(running.shutdown())
}

/// A VM built from its config, ready to start. Field order is drop order:
/// the hypervisor's VM goes before the memory it maps.
pub struct UtilityVm<H: Hypervisor> {
    vcpus: Vec<<H::Vm as Vm>::Vcpu>,
    buses: Arc<Buses>,
    events: DeviceLoop,
    link: AgentLink,
    vm: H::Vm,
    hypervisor: H,
    mem: memory::GuestMemory,
    layers: Vec<Layer>,
    console: Console,
    boot_timer: Arc<Mutex<BootTimer>>,
    ending: Arc<Ending>,
    run_gate: Option<RunGate>,
    /// Each vCPU's CPUID, as given to it.
    cpuid: Vec<Vec<CpuidEntry>>,
    host: HostKind,
    restored: bool,
    start: Instant,
}

/// Where a VM's guest comes from.
enum Guest {
    /// The config's kernel and initrd, loaded into fresh RAM.
    Boot,
    /// A snapshot's memory image, mapped copy-on-write.
    #[cfg(unix)]
    Image(std::fs::File),
}

impl<H> UtilityVm<H>
where
    H: Hypervisor + Send,
    H::Vm: Send,
{
    /// Checks and opens every input, creates the VM and loads the guest.
    /// `open` opens the hypervisor; it runs, and the VM and its memory map
    /// are created, on a second thread while the guest loads, because on
    /// PVM hosts the first memory slot alone costs several milliseconds.
    /// Bad input is reported before any hypervisor error.
    pub fn build<F>(open: F, config: &VmConfig, start: Instant) -> Result<Self, Error>
    where
        F: FnOnce() -> hypervisor::Result<H> + Send,
    {
        Self::assemble(open, config, start, Guest::Boot)
    }

    fn assemble<F>(open: F, config: &VmConfig, start: Instant, guest: Guest) -> Result<Self, Error>
    where
        F: FnOnce() -> hypervisor::Result<H> + Send,
    {
        if let Some(path) = config.process.as_ref().and_then(ProcessSpec::unattached) {
            return Err(Error::Unattached(path.to_owned()));
        }
        // First: it blocks the forwarded signals for every later thread.
        let mut link = AgentLink::new(config)?;
        let layers = config
            .images()
            .map(|path| Layer::open(path))
            .collect::<Result<Vec<_>, _>>()?;
        let scratch = config
            .scratch
            .as_ref()
            .map(|(path, size)| scratch::open_or_create(path, *size))
            .transpose()?;
        let ram_size = config.memory_mib << 20;
        let lens: Vec<u64> = layers.iter().map(Layer::mapped_len).collect();
        let tools = config.tools.is_some();
        let shares = config.shares.len();
        let layout = Layout::new(
            sys::HAS_VSOCK,
            &lens,
            tools,
            scratch.is_some(),
            shares,
            ram_size,
        )?;

        let boots = matches!(guest, Guest::Boot);
        let mem = match guest {
            Guest::Boot => memory::create(ram_size),
            #[cfg(unix)]
            Guest::Image(file) => memory::map_private(file, ram_size),
        };
        let mem = mem.map_err(|source| Error::Memory {
            mib: config.memory_mib,
            source,
        })?;
        let (entry, created) = std::thread::scope(|s| {
            let created = s.spawn(|| create_vm(open, &mem, &layers, &layout));
            let cmdline = cmdline(config, &layout, &link);
            let entry = boots
                .then(|| boot::load(&mem, &config.kernel, &config.initrd, &cmdline, config.cpus));
            (entry, created.join())
        });
        let entry = entry.transpose()?;
        let (hypervisor, vm) = created.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        tracing::debug!(at = ?start.elapsed(), "guest loaded, VM created");

        let ending = Arc::new(Ending::default());
        let console = Console::new(config.console || sys::CONSOLE_CARRIES_OUTPUT);
        let boot_timer = Arc::new(Mutex::new(BootTimer::new(start)));
        let mut mmio = devices::Bus::new();
        let mut transports = Vec::new();
        let mut events = DeviceLoop::new()?;
        let mut env = DeviceEnv {
            vm: &vm,
            mem: &mem,
            mmio: &mut mmio,
            transports: &mut transports,
            events: &mut events,
        };
        env.attach_all(&layout, &mut link, scratch, &config.shares)?;
        let (pio, com1) = pio_bus(&vm, &ending, &console, &boot_timer)?;
        let buses = Arc::new(Buses {
            pio,
            mmio,
            com1,
            transports,
        });
        tracing::debug!(at = ?start.elapsed(), "devices ready");

        let supported = hypervisor.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(config.cpus.into());
        let mut cpuids = Vec::with_capacity(config.cpus.into());
        for id in 0..config.cpus {
            let mut vcpu = vm.create_vcpu(id)?;
            let cpuid = cpuid::for_vcpu(&supported, id, config.cpus);
            vcpu.init(&cpuid)?;
            if let (0, Some(entry)) = (id, &entry) {
                vcpu.set_entry_state(entry)?;
            }
            vcpus.push(vcpu);
            cpuids.push(cpuid);
        }
        tracing::debug!(at = ?start.elapsed(), "vCPUs configured");
        Ok(Self {
            vcpus,
            buses,
            events,
            link,
            vm,
            hypervisor,
            mem,
            layers,
            console,
            boot_timer,
            ending,
            run_gate: None,
            cpuid: cpuids,
            host: config.host,
            restored: false,
            start,
        })
    }

    /// Once started, the VM holds the process's run request back until
    /// this hold is released ([`Running::release_run`]):
    /// [`Running::wait_agent_connected`] then finds the agent idle, which
    /// is when a template is saved. Holds add up.
    pub fn hold_run(&mut self) -> Result<(), Error> {
        self.run_gate = Some(self.link.hold_run()?);
        Ok(())
    }

    /// Starts the VM's threads: the device event loop, the agent link, then
    /// the vCPUs, held until [`Running::release`]. The process's stdio is
    /// `stdio`.
    pub fn start(self, stdio: Stdio) -> Result<Running<H>, Error> {
        let guest_memory = self.guest_memory();
        // Everything belongs to `Running` before anything starts, so that a
        // failure stops (through its drop) whatever already runs.
        let mut running = Running {
            unstarted: self.vcpus,
            vcpus: None,
            link: Link::new(),
            events: None,
            buses: Some(self.buses),
            vm: Some(self.vm),
            hypervisor: Some(self.hypervisor),
            mem: Some(self.mem),
            layers: self.layers,
            console: self.console,
            boot_timer: self.boot_timer,
            ending: self.ending,
            run_gate: self.run_gate,
            cpuid: self.cpuid,
            host: self.host,
            restored: self.restored,
            saved_in: None,
            entered: Arc::default(),
            start: self.start,
            guest_memory,
            vmm_rss_kib: None,
        };
        running.events = Some(self.events.start(&running.ending)?);
        self.link.start(stdio, &running.ending, &mut running.link)?;
        let io = running.buses.clone().expect("set above");
        let vcpus = std::mem::take(&mut running.unstarted);
        running.vcpus = Some(Vcpus::start(vcpus, io, &running.ending, &running.entered)?);
        Ok(running)
    }

    /// Host ranges of guest memory: RAM and the layer files mapped into it.
    fn guest_memory(&self) -> Vec<(u64, u64)> {
        let ram = self.mem.iter().map(|r| (r.as_ptr() as u64, r.len()));
        let layers = self.layers.iter();
        ram.chain(layers.map(|l| (l.host_addr() as u64, l.mapped_len())))
            .collect()
    }
}

impl<H> UtilityVm<H>
where
    H: Hypervisor + Send,
    H::Vm: Send,
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    /// Builds `config`'s VM from `snapshot`, taken of a VM whose config
    /// had the same `identity` (what [`Running::save`] was given): its RAM
    /// is the snapshot's memory image, mapped copy-on-write; then the VM's
    /// state and each vCPU's (KVM's order: interrupt controllers and clock
    /// before the vCPUs' LAPICs), then the devices, whose first interrupts
    /// (the vsock reset) need all of those.
    #[cfg(unix)]
    pub fn restore<F>(
        open: F,
        config: &VmConfig,
        start: Instant,
        snapshot: snapshot::Snapshot<H>,
        identity: &str,
    ) -> Result<Self, Error>
    where
        F: FnOnce() -> hypervisor::Result<H> + Send,
    {
        snapshot.check_identity(identity)?;
        let snapshot::Snapshot { state, memory, dir } = snapshot;
        let refuse = |reason: String| snapshot::Error::Invalid {
            path: dir.clone(),
            reason,
        };
        let mut vm = Self::assemble(open, config, start, Guest::Image(memory))?;
        if let Some(difference) = snapshot::cpuid_difference(&state.cpuid, &vm.cpuid) {
            return Err(refuse(difference).into());
        }
        if state.vcpus.len() != vm.vcpus.len() {
            return Err(refuse("saved for another number of vCPUs".into()).into());
        }
        vm.vm.restore_state(&state.vm)?;
        for (vcpu, saved) in vm.vcpus.iter_mut().zip(&state.vcpus) {
            vcpu.restore_state(saved)?;
        }
        vm.buses.restore(&state.devices)?;
        vm.restored = true;
        Ok(vm)
    }
}

/// What the hypervisor keeps of a paused VM's CPUs: every vCPU's state
/// and the VM's own (interrupt controllers, timer, clock).
pub struct CpuState<H: Hypervisor>
where
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    pub vcpus: Vec<<VcpuOf<H> as Stateful>::State>,
    pub vm: <H::Vm as Stateful>::State,
}

/// A hypervisor's vCPU type.
pub type VcpuOf<H> = <<H as Hypervisor>::Vm as Vm>::Vcpu;

/// A running VM. Dropping it shuts it down.
pub struct Running<H: Hypervisor> {
    /// The vCPUs until their threads start.
    unstarted: Vec<<H::Vm as Vm>::Vcpu>,
    vcpus: Option<Vcpus>,
    link: Link,
    events: Option<RunningLoop>,
    buses: Option<Arc<Buses>>,
    vm: Option<H::Vm>,
    hypervisor: Option<H>,
    mem: Option<memory::GuestMemory>,
    layers: Vec<Layer>,
    console: Console,
    boot_timer: Arc<Mutex<BootTimer>>,
    ending: Arc<Ending>,
    run_gate: Option<RunGate>,
    // For snapshots, which Unix hosts alone take (as below).
    #[cfg_attr(not(unix), allow(dead_code))]
    cpuid: Vec<Vec<CpuidEntry>>,
    #[cfg_attr(not(unix), allow(dead_code))]
    host: HostKind,
    restored: bool,
    saved_in: Option<Duration>,
    entered: Arc<OnceLock<Instant>>,
    start: Instant,
    guest_memory: Vec<(u64, u64)>,
    vmm_rss_kib: Option<u64>,
}

impl<H: Hypervisor> Running<H> {
    /// Waits until something ends the VM and says what did. The VM's
    /// threads may still run: [`Self::shutdown`] stops them.
    pub fn wait(&self) -> Exit {
        self.ending.wait()
    }

    /// How the VM ended, if it has (without waiting).
    pub fn ended(&self) -> Option<Exit> {
        self.ending.get()
    }

    /// Confines the calling (main) thread, then lets the vCPUs into the
    /// guest: every thread's filter is in place before its first
    /// instruction. Threads the caller needs unconfined (they would inherit
    /// its filter) start before this.
    pub fn release(&self) -> Result<(), Error> {
        sys::confine(ThreadKind::Main, sys::confined()).map_err(Error::Confine)?;
        self.resume();
        Ok(())
    }

    /// Takes every vCPU out of the guest and parks it; devices keep
    /// serving what the guest queued before.
    pub fn pause(&self) -> Result<(), Error> {
        self.vcpus.as_ref().map_or(Ok(()), Vcpus::pause)
    }

    /// Lets the paused vCPUs run again.
    pub fn resume(&self) {
        if let Some(vcpus) = &self.vcpus {
            vcpus.resume();
        }
    }

    /// Waits until the agent has connected, or says how the VM ended first.
    pub fn wait_agent_connected(&self) -> Result<(), Exit> {
        self.ending
            .wait_for(|| self.link.agent_connected().is_some())
    }

    /// Lets go of the hold [`UtilityVm::hold_run`] took on the run request.
    pub fn release_run(&self) {
        if let Some(gate) = &self.run_gate {
            gate.release(&self.ending);
        }
    }

    /// The gate the run request waits at, if it was held: for a hold
    /// released elsewhere (`uvm start`).
    pub fn run_gate(&self) -> Option<&RunGate> {
        self.run_gate.as_ref()
    }

    /// Waits until the container's process has started, or says how the VM
    /// ended before it did.
    pub fn wait_started(&self) -> Result<(), Exit> {
        self.ending.wait_for(|| self.link.process_started())
    }

    #[cfg_attr(not(unix), allow(dead_code))]
    fn save_devices(&self) -> DeviceState {
        self.buses
            .as_ref()
            .expect("a running VM has its buses")
            .save()
    }

    /// Where the VM's parts report its end: a handle to end it from outside.
    pub fn ending(&self) -> &Arc<Ending> {
        &self.ending
    }

    /// The link to the guest agent.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Host ranges (address, length) of the guest's memory: RAM and layers.
    pub fn guest_memory(&self) -> &[(u64, u64)] {
        &self.guest_memory
    }

    /// Stops the VM if it still runs, joins every thread it started, unmaps
    /// its memory, and reports how it ended.
    pub fn shutdown(mut self) -> Report {
        self.stop();
        let mark = |mark| lock(&self.boot_timer).mark(mark);
        let since_start = |at: Option<Instant>| at.map(|at| at.duration_since(self.start));
        // Set by now: `stop` ends the VM if nothing else had.
        let exit = self.ending.wait();
        let timings = Timings {
            restored: self.restored,
            snapshot_saved: self.saved_in,
            first_vcpu_entry: since_start(self.entered.get().copied()),
            agent_started: mark(boot_mark::AGENT_STARTED),
            agent_connected: since_start(self.link.agent_connected()),
            process_started: mark(boot_mark::PROCESS_STARTED),
            process_exited: mark(boot_mark::PROCESS_EXITED),
            ended: self.start.elapsed(),
        };
        Report {
            exit: self.link.exit(exit, &self.console),
            timings,
            console: self.console.clone(),
            vmm_rss_kib: self.vmm_rss_kib,
        }
    }

    /// Every part in the order that lets the next one end: vCPUs (nothing
    /// touches devices after them), the event loop; then the devices go,
    /// which ends the agent's streams, so a signal being forwarded and the
    /// session end too.
    fn stop(&mut self) {
        self.ending.end(Exit::Stopped);
        self.unstarted.clear();
        if let Some(mut vcpus) = self.vcpus.take() {
            vcpus.stop();
        }
        if let Some(events) = self.events.take() {
            events.stop();
        }
        self.buses = None;
        self.link.stop_signals();
        self.link.join();
        if self.mem.is_some() {
            self.vmm_rss_kib = crate::rss::vmm_rss_kib(&self.guest_memory);
        }
        // The VM's memory slots go before the memory they map.
        self.vm = None;
        self.hypervisor = None;
        self.mem = None;
        self.layers.clear();
    }
}

impl<H: Hypervisor> Running<H>
where
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    /// The CPU state of the paused VM ([`Self::pause`]), each vCPU's read
    /// on its own thread.
    pub fn save_cpus(&mut self) -> Result<CpuState<H>, Error> {
        let vcpus = self.vcpus.as_ref().ok_or(Error::Unsupported(
            "saving the CPU state of a VM that has not started",
        ))?;
        let saved = vcpus.on_each(|vcpu: &mut VcpuOf<H>| vcpu.save_state())?;
        let vm = self.vm.as_mut().expect("a running VM has its VM");
        Ok(CpuState {
            vcpus: saved.into_iter().collect::<Result<_, _>>()?,
            vm: vm.save_state()?,
        })
    }

    /// Saves the paused VM ([`Self::pause`]) into `dir`, an empty
    /// directory, as a snapshot of a VM built from a config whose identity
    /// is `identity`. The device event thread is parked meanwhile, so that
    /// no device moves a queue or writes guest memory under the save.
    #[cfg(unix)]
    pub fn save(&mut self, dir: &std::path::Path, identity: &str) -> Result<(), Error> {
        let began = Instant::now();
        let events = self
            .events
            .take()
            .ok_or(Error::Unsupported("saving a VM that has not started"))?;
        let saved = events
            .park()
            .and_then(|_parked| self.save_parked(dir, identity));
        self.events = Some(events);
        saved?;
        self.saved_in = Some(began.elapsed());
        Ok(())
    }

    #[cfg(unix)]
    fn save_parked(&mut self, dir: &std::path::Path, identity: &str) -> Result<(), Error> {
        let cpus = self.save_cpus()?;
        let state = snapshot::State::<H> {
            identity: identity.to_string(),
            memory_bytes: self
                .mem
                .as_ref()
                .map_or(0, |m| m.iter().map(|r| r.len()).sum()),
            cpuid: self.cpuid.clone(),
            vcpus: cpus.vcpus,
            vm: cpus.vm,
            devices: self.save_devices(),
        };
        let mem = self.mem.as_ref().expect("a running VM has its memory");
        snapshot::write(dir, self.host, &state, |file| memory::save(mem, file)).map_err(Error::from)
    }
}

impl<H: Hypervisor> Drop for Running<H> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens the hypervisor and creates a VM with `mem` as its RAM and the
/// layers mapped read-only where `layout` placed them.
fn create_vm<H: Hypervisor, F: FnOnce() -> hypervisor::Result<H>>(
    open: F,
    mem: &memory::GuestMemory,
    layers: &[Layer],
    layout: &Layout,
) -> hypervisor::Result<(H, H::Vm)> {
    let hv = open()?;
    let vm = hv.create_vm()?;
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: `UtilityVm` and `Running` drop the VM before `mem`.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.as_ptr(),
                region.len(),
                false,
            )?
        };
    }
    let first_layer_slot = mem.num_regions() as u32;
    let places = layout.layers.iter().zip(layers);
    for (slot, (place, layer)) in (first_layer_slot..).zip(places) {
        // SAFETY: as above, the VM is dropped before the layers.
        unsafe { vm.map_memory(slot, place.start, layer.host_addr(), place.len, true)? };
    }
    Ok((hv, vm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(console: bool, host: HostKind) -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: "i".into(),
            extra_cmdline: Some("foo=bar".into()),
            memory_mib: 128,
            cpus: 1,
            console,
            host,
            vsock: VsockConfig {
                guest_cid: 3,
                uds: None,
            },
            layers: vec!["a.img".into()],
            tools: None,
            scratch: Some(("s.img".into(), 1 << 30)),
            shares: Vec::new(),
            process: None,
        }
    }

    #[test]
    fn cmdline_adds_pvm_flags_only_on_pvm_hosts() {
        let layout = Layout::new(true, &[2 << 20], false, true, 0, 128 << 20).unwrap();
        let config = config(false, HostKind::Hardware);
        let link = AgentLink::new(&config).unwrap();
        let hw = cmdline(&config, &layout, &link);
        let virtio = "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
                      virtio_mmio.device=4K@0xd0002000:7";
        assert_eq!(hw, format!("{BASE_CMDLINE} quiet {virtio} foo=bar"));
        let pvm = guest_flags(&self::tests::config(true, HostKind::Pvm));
        assert!(pvm.starts_with(BASE_CMDLINE) && pvm.ends_with("pvm_host foo=bar"));
        assert!(!pvm.contains("quiet") && !pvm.contains("virtio"));
    }

    #[test]
    fn the_root_every_run_uses_travels_on_the_command_line() {
        let mut config = config(false, HostKind::Hardware);
        let layout = Layout::new(true, &[2 << 20], false, true, 0, 128 << 20).unwrap();
        let link = AgentLink::new(&config).unwrap();
        assert!(!cmdline(&config, &layout, &link).contains("uvm.root="));
        let root = guest::protocol::Root {
            layers: 1,
            dax: true,
            scratch: true,
            ..Default::default()
        };
        config.process = Some(ProcessSpec {
            argv: vec!["/bin/true".into()],
            root: Some(root),
            ..ProcessSpec::default()
        });
        let line = cmdline(&config, &layout, &link);
        let found = guest::protocol::root_from_cmdline(&line).unwrap();
        assert_eq!(found, Some(root));
        assert!(line.ends_with(" foo=bar"), "the user's flags stay last");
    }
}
