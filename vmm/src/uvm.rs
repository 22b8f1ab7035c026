//! A utility VM: built from a [`VmConfig`], run until the guest ends it.

#[cfg(target_os = "linux")]
use std::os::unix::net::UnixListener;
#[cfg(target_os = "linux")]
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::boot_timer::BootTimer;
use devices::i8042::{self, I8042};
use devices::serial::{self, Serial};
use devices::virtio::block::Block;
use devices::virtio::mmio::{self, MmioTransport};
use devices::virtio::pmem::Pmem;
#[cfg(target_os = "linux")]
use devices::virtio::vsock::{HostPorts, Vsock};
use devices::virtio::{RequestDevice, VirtioDevice};
use devices::{Bus, BusError};
#[cfg(target_os = "linux")]
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use guest::boot_mark;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[cfg(target_os = "linux")]
use crate::agent::Session;
use crate::console::Console;
use crate::hypervisor::{self, Hypervisor, IoHandler, Vcpu, VcpuExit, Vm};
use crate::layer::{self, Layer};
use crate::process::{Outcome, ProcessSpec};
use crate::pvm::{self, HostKind};
use crate::scratch;
#[cfg(target_os = "linux")]
use crate::signals;
use crate::{boot, cpuid, lock, memory};

/// Command line every guest gets: console on COM1, reset through the i8042
/// (so reboot ends the VM), reboot at once on panic, no legacy UART probing,
/// and no /sys/module/*/parameters for built-in code (nothing in a utility VM
/// reads them; creating them took 2 s of a 16 s boot on PVM hosts).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 no_timer_check \
    initcall_blacklist=param_sysfs_builtin_init";

#[derive(Clone, Debug)]
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
    #[cfg(target_os = "linux")]
    pub vsock: VsockConfig,
    /// Read-only image layers, bottom first: one virtio-pmem device each.
    pub layers: Vec<PathBuf>,
    /// The writable layer's image and the size to create it with.
    pub scratch: Option<(PathBuf, u64)>,
    /// The process to run; without one the VM ends once the agent is up.
    pub process: Option<ProcessSpec>,
}

#[cfg(target_os = "linux")]
#[derive(Clone, Debug)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Hybrid vsock: host programs reach guest ports through this Unix
    /// socket, and guest connections to host port P go to `{uds}_P`.
    pub uds: Option<PathBuf>,
}

/// virtio-mmio windows, one page per device, in the 32-bit MMIO hole.
const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSIs 0-4 belong to legacy devices (timer, keyboard, cascade, COM2, COM1).
const VIRTIO_FIRST_GSI: u32 = 5;
/// The vsock device is virtio device 0; layers follow in order, then the
/// scratch disk.
const VSOCK_SLOT: u32 = 0;
const FIRST_LAYER_SLOT: u32 = 1;

/// Where virtio devices are served. On Linux: the event thread, woken by
/// the queues' eventfds (which KVM signals itself) and by host sockets.
/// Elsewhere the MMIO bus hands each queue notification to its device on
/// the vCPU thread, and there is no loop.
#[cfg(target_os = "linux")]
type DeviceLoop = EventManager<Subscriber>;
#[cfg(not(target_os = "linux"))]
struct DeviceLoop;

#[cfg(target_os = "linux")]
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio device the [`DeviceLoop`] can serve.
#[cfg(target_os = "linux")]
trait Served: VirtioDevice + MutEventSubscriber + 'static {}
#[cfg(target_os = "linux")]
impl<T: VirtioDevice + MutEventSubscriber + 'static> Served for T {}
/// A virtio device the [`DeviceLoop`] can serve.
#[cfg(not(target_os = "linux"))]
trait Served: VirtioDevice + 'static {}
#[cfg(not(target_os = "linux"))]
impl<T: VirtioDevice + 'static> Served for T {}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error("guest memory ({mib} MiB): {source}")]
    Memory { mib: u64, source: std::io::Error },
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("starting a VMM thread: {0}")]
    Thread(std::io::Error),
    #[error("hybrid vsock socket {path}: {source}")]
    VsockSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting up devices: {0}")]
    Devices(std::io::Error),
    #[error(transparent)]
    Layer(#[from] layer::Error),
    #[error(transparent)]
    Scratch(#[from] scratch::Error),
}

/// How the guest ended the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine (reboot, power-off, or panic=-1).
    Reset,
    /// The agent session is over: the process ended, or there was none.
    Finished,
    /// uvm got `signal` before the process started.
    Interrupted { signal: i32 },
    /// A vCPU stopped in a way the guest cannot recover from.
    Fault {
        cpu: u8,
        reason: String,
        rip: Option<u64>,
    },
}

/// What a run produced.
pub struct Report {
    pub exit: GuestExit,
    pub timings: Timings,
    pub console: Console,
    /// The VMM's resident memory without guest RAM, when the host tells.
    pub vmm_rss_kib: Option<u64>,
    /// How the process in the guest ended, if it ran.
    pub process: Option<Outcome>,
}

/// Host-clock milestones, measured from VMM process start; the agent's and
/// the process's are the guest's boot marks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub first_vcpu_entry: Option<Duration>,
    pub agent_started: Option<Duration>,
    pub agent_connected: Option<Duration>,
    pub process_started: Option<Duration>,
    /// The process ended, its leftovers were killed and the disks synced.
    pub process_exited: Option<Duration>,
    pub ended: Duration,
}

/// The first reason any part of the VM gives for ending it; later ones lose.
#[derive(Default)]
struct Ending {
    exit: Mutex<Option<GuestExit>>,
    cond: Condvar,
}

impl Ending {
    fn signal(&self, exit: GuestExit) {
        let mut slot = lock(&self.exit);
        slot.get_or_insert(exit);
        self.cond.notify_all();
    }

    fn wait(&self) -> GuestExit {
        let slot = lock(&self.exit);
        let slot = self
            .cond
            .wait_while(slot, |exit| exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.clone().unwrap_or(GuestExit::Reset)
    }
}

/// The port-I/O and MMIO buses the vCPUs dispatch to.
struct Buses {
    pio: Bus,
    mmio: Bus,
}

impl IoHandler for Buses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(port.into(), data) {
            data.fill(0xff); // nothing there: the bus floats high
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(port.into(), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

/// The full guest command line for `config`: uvm's flags, the virtio
/// devices, then the user's additions (which may end in init arguments).
pub fn cmdline(config: &VmConfig) -> String {
    let disks = config.layers.len() + usize::from(config.scratch.is_some());
    let vsock = cfg!(target_os = "linux").then_some(VSOCK_SLOT);
    let virtio = vsock
        .into_iter()
        .chain((FIRST_LAYER_SLOT..).take(disks))
        .map(|slot| {
            let (base, gsi) = virtio_slot(slot);
            MmioTransport::cmdline_entry(base, gsi)
        });
    let flags = uvm_flags(config).into_iter().map(str::to_string);
    flags
        .chain(virtio)
        .chain(console_request(config))
        .chain(config.extra_cmdline.clone())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Without the vsock link (its host side needs Unix streams and epoll), the
/// run request goes on the kernel command line and the process's output
/// and exit status come back on the console (guest/PROTOCOL.md).
fn console_request(config: &VmConfig) -> Option<String> {
    if cfg!(target_os = "linux") {
        return None;
    }
    let process = config.process.as_ref()?;
    Some(guest::protocol::to_cmdline(&process.request()))
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

/// The MMIO window and GSI of virtio device `slot`.
fn virtio_slot(slot: u32) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + u64::from(slot) * mmio::WINDOW_LEN,
        VIRTIO_FIRST_GSI + slot,
    )
}

/// Boots `config` and waits until the guest ends the VM. `open` opens the
/// hypervisor; it runs, and the VM and its memory map are created, on a second
/// thread while the guest is loaded, because on PVM hosts the first memory
/// slot alone costs several milliseconds. Bad input is reported before any
/// hypervisor error. `start` is when the VMM process started, for the timings.
pub fn run<H, F>(open: F, config: &VmConfig, start: Instant) -> Result<Report, Error>
where
    H: Hypervisor + Send,
    H::Vm: Send,
    F: FnOnce() -> hypervisor::Result<H> + Send,
{
    // Before any thread starts, so that all of them inherit the mask.
    #[cfg(target_os = "linux")]
    let signals = match config.process {
        Some(_) => Some(signals::block().map_err(Error::Devices)?),
        None => None,
    };
    let layers = config
        .layers
        .iter()
        .map(|path| Layer::open(path))
        .collect::<Result<Vec<_>, _>>()?;
    let scratch = config
        .scratch
        .as_ref()
        .map(|(path, size)| scratch::open_or_create(path, *size))
        .transpose()?;
    #[cfg(target_os = "linux")]
    let hybrid = config
        .vsock
        .uds
        .as_deref()
        .map(HybridSocket::bind)
        .transpose()?;
    #[cfg(target_os = "linux")]
    let mut ports = HostPorts::new(config.vsock.uds.clone());
    #[cfg(target_os = "linux")]
    let session = Session::new(config.process.clone(), &mut ports);
    #[cfg(target_os = "linux")]
    let progress = session.progress();

    let mem = memory::create(config.memory_mib << 20).map_err(|source| Error::Memory {
        mib: config.memory_mib,
        source,
    })?;
    let (entry, created) = std::thread::scope(|s| {
        let created = s.spawn(|| create_vm(open, &mem, &layers, config.memory_mib << 20));
        let entry = boot::load(
            &mem,
            &config.kernel,
            &config.initrd,
            &cmdline(config),
            config.cpus,
        );
        (entry, created.join())
    });
    let entry = entry?;
    let (hv, vm) = created.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    tracing::debug!(at = ?start.elapsed(), "guest loaded, VM created");

    let ending = Arc::new(Ending::default());
    // Without the vsock link the process's output arrives on the console.
    let console = Console::new(config.console || cfg!(not(target_os = "linux")));
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(start)));
    let mut mmio = Bus::new();
    let mut events = device_loop()?;
    #[cfg(target_os = "linux")]
    {
        let listener = hybrid.as_ref().map(|h| h.listener.try_clone()).transpose();
        let vsock = Vsock::new(
            mem.clone(),
            config.vsock.guest_cid,
            ports,
            listener.map_err(Error::Devices)?,
        )
        .map_err(Error::Devices)?;
        attach_virtio(&vm, &mem, &mut mmio, &mut events, VSOCK_SLOT, vsock)?;
    }
    attach_layers(
        &vm,
        &mem,
        &mut mmio,
        &mut events,
        &layers,
        config.memory_mib << 20,
    )?;
    if let Some(file) = scratch {
        let block = Block::new(file, false, guest::disk_serial::SCRATCH).map_err(Error::Devices)?;
        let disk = RequestDevice::new(mem.clone(), block).map_err(Error::Devices)?;
        let slot = FIRST_LAYER_SLOT + layers.len() as u32;
        attach_virtio(&vm, &mem, &mut mmio, &mut events, slot, disk)?;
    }
    let buses = Arc::new(Buses {
        pio: pio_bus(&vm, &ending, &console, &boot_timer)?,
        mmio,
    });
    #[cfg(target_os = "linux")]
    {
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || run_events(events))
            .map_err(Error::Thread)?;
        let finished = ending.clone();
        session
            .start(move || finished.signal(GuestExit::Finished))
            .map_err(Error::Thread)?;
        if let Some(signals) = signals {
            let (ending, progress) = (ending.clone(), progress.clone());
            let forward = move |signal| {
                if !lock(&progress).forward_signal(signal) {
                    ending.signal(GuestExit::Interrupted { signal });
                }
            };
            signals.forward(forward).map_err(Error::Thread)?;
        }
    }

    tracing::debug!(at = ?start.elapsed(), "devices ready");
    let supported = hv.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(config.cpus.into());
    for id in 0..config.cpus {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.init(&cpuid::for_vcpu(&supported, id, config.cpus))?;
        if id == 0 {
            vcpu.set_entry_state(&entry)?;
        }
        vcpus.push(vcpu);
    }

    tracing::debug!(at = ?start.elapsed(), "vCPUs configured");
    let entered = Arc::new(OnceLock::new());
    for (id, vcpu) in (0u8..).zip(vcpus) {
        let (buses, ending, entered) = (buses.clone(), ending.clone(), entered.clone());
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_vcpu(vcpu, id, &*buses, &ending, &entered))
            .map_err(Error::Thread)?;
    }
    // Guest memory: RAM and the layer files mapped into it.
    let guest_memory: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.as_ptr() as u64, r.len()))
        .chain(
            layers
                .iter()
                .map(|l| (l.host_addr() as u64, l.mapped_len())),
        )
        .collect();
    // The vCPU threads run until the process exits; guest memory must stay
    // mapped for them, so it is never unmapped.
    std::mem::forget(mem);

    let exit = ending.wait();
    let mark = |mark| lock(&boot_timer).mark(mark);
    let since_start = |at: Option<Instant>| at.map(|at| at.duration_since(start));
    #[cfg(target_os = "linux")]
    let (agent_connected, process) = {
        let progress = lock(&progress);
        (progress.agent_connected, progress.outcome.clone())
    };
    #[cfg(not(target_os = "linux"))]
    let (agent_connected, process) = (None, console_outcome(&console));
    let timings = Timings {
        first_vcpu_entry: since_start(entered.get().copied()),
        agent_started: mark(boot_mark::AGENT_STARTED),
        agent_connected: since_start(agent_connected),
        process_started: mark(boot_mark::PROCESS_STARTED),
        process_exited: mark(boot_mark::PROCESS_EXITED),
        ended: start.elapsed(),
    };
    Ok(Report {
        exit,
        timings,
        console,
        vmm_rss_kib: crate::rss::vmm_rss_kib(&guest_memory),
        process,
    })
}

/// How the process ended, from the agent's exit-status line (see
/// [`console_request`]).
#[cfg(not(target_os = "linux"))]
fn console_outcome(console: &Console) -> Option<Outcome> {
    let status = crate::process::exit_status_on_console(&console.tail())?;
    Some(Outcome::Exited(guest::protocol::Exited::Code(status)))
}

#[cfg(target_os = "linux")]
fn device_loop() -> Result<DeviceLoop, Error> {
    EventManager::<Subscriber>::new()
        .map_err(|e| Error::Devices(std::io::Error::other(format!("event loop: {e:?}"))))
}

#[cfg(not(target_os = "linux"))]
fn device_loop() -> Result<DeviceLoop, Error> {
    Ok(DeviceLoop)
}

/// Adds `device` to the loop that serves its queues and host sockets.
#[cfg(target_os = "linux")]
fn serve<D: Served>(events: &mut DeviceLoop, device: Arc<Mutex<D>>) {
    events.add_subscriber(device);
}

/// Nothing to add: the MMIO bus hands queue notifications to the device.
#[cfg(not(target_os = "linux"))]
fn serve<D: Served>(_: &mut DeviceLoop, _: Arc<Mutex<D>>) {}

/// Puts a virtio device on the MMIO bus at `slot`: its register window, its
/// interrupt, its queue notifications (straight to the device's events when
/// the hypervisor can) and its place in the event loop.
fn attach_virtio<V: Vm, D: Served>(
    vm: &V,
    mem: &memory::GuestMemory,
    mmio: &mut Bus,
    events: &mut DeviceLoop,
    slot: u32,
    device: D,
) -> Result<(), Error> {
    let (base, gsi) = virtio_slot(slot);
    #[cfg(target_os = "linux")]
    for (queue, event) in (0u32..).zip(device.queue_events()) {
        vm.register_notifier(event, base + mmio::NOTIFY_OFFSET, queue)?;
    }
    let device = Arc::new(Mutex::new(device));
    let transport = MmioTransport::new(device.clone(), mem.clone(), vm.interrupt(gsi)?);
    mmio.insert(Arc::new(Mutex::new(transport)), base, mmio::WINDOW_LEN)?;
    serve(events, device);
    Ok(())
}

/// Puts a virtio-pmem device on the bus for each layer, describing where
/// `create_vm` mapped it.
fn attach_layers<V: Vm>(
    vm: &V,
    mem: &memory::GuestMemory,
    mmio: &mut Bus,
    events: &mut DeviceLoop,
    layers: &[Layer],
    ram_size: u64,
) -> Result<(), Error> {
    let places = layer_addresses(layers, ram_size);
    for ((start, layer), virtio_slot) in places.zip(layers).zip(FIRST_LAYER_SLOT..) {
        let range = Pmem {
            start,
            len: layer.mapped_len(),
        };
        let pmem = RequestDevice::new(mem.clone(), range).map_err(Error::Devices)?;
        attach_virtio(vm, mem, mmio, events, virtio_slot, pmem)?;
    }
    Ok(())
}

/// Where each layer sits in guest physical memory: one after another above
/// RAM.
fn layer_addresses(layers: &[Layer], ram_size: u64) -> impl Iterator<Item = u64> + '_ {
    layers
        .iter()
        .scan(memory::device_memory_start(ram_size), |next, layer| {
            let start = *next;
            *next += layer.mapped_len();
            Some(start)
        })
}

/// The device event loop: queue notifications and host sockets.
#[cfg(target_os = "linux")]
fn run_events(mut events: EventManager<Subscriber>) {
    loop {
        if let Err(e) = events.run() {
            tracing::error!("event loop: {e:?}");
            return;
        }
    }
}

/// The hybrid vsock socket, removed when the VM ends.
#[cfg(target_os = "linux")]
struct HybridSocket {
    path: PathBuf,
    listener: UnixListener,
}

#[cfg(target_os = "linux")]
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

#[cfg(target_os = "linux")]
impl Drop for HybridSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the hypervisor and creates a VM with `mem` as its RAM and the
/// layers mapped read-only above it.
fn create_vm<H: Hypervisor, F: FnOnce() -> hypervisor::Result<H>>(
    open: F,
    mem: &memory::GuestMemory,
    layers: &[Layer],
    ram_size: u64,
) -> hypervisor::Result<(H, H::Vm)> {
    let hv = open()?;
    let vm = hv.create_vm()?;
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: in `run` the VM is declared after `mem`, so on every error
        // path it is dropped first, and once vCPUs run `mem` is leaked: the
        // mapping outlives the VM.
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
    let places = layer_addresses(layers, ram_size).zip(layers);
    for (slot, (start, layer)) in (first_layer_slot..).zip(places) {
        // SAFETY: layer mappings are never unmapped (see `layer::map`).
        unsafe { vm.map_memory(slot, start, layer.host_addr(), layer.mapped_len(), true)? };
    }
    Ok((hv, vm))
}

fn pio_bus<V: Vm>(
    vm: &V,
    ending: &Arc<Ending>,
    console: &Console,
    boot_timer: &Arc<Mutex<BootTimer>>,
) -> Result<Bus, Error> {
    let mut bus = Bus::new();
    let irq = vm.interrupt(serial::COM1_IRQ)?;
    let com1 = Serial::new(irq, Box::new(console.clone()));
    bus.insert(
        Arc::new(Mutex::new(com1)),
        serial::COM1_PORT,
        serial::PORT_LEN,
    )?;
    let ending = ending.clone();
    let i8042 = I8042::new(Box::new(move || ending.signal(GuestExit::Reset)));
    bus.insert(
        Arc::new(Mutex::new(i8042)),
        i8042::PORT_BASE,
        i8042::PORT_LEN,
    )?;
    bus.insert(boot_timer.clone(), boot_mark::PORT.into(), 1)?;
    Ok(bus)
}

fn run_vcpu<V: Vcpu>(
    mut vcpu: V,
    id: u8,
    io: &dyn IoHandler,
    ending: &Ending,
    entered: &OnceLock<Instant>,
) {
    if id == 0 {
        let _ = entered.set(Instant::now());
    }
    let reason = loop {
        match vcpu.run(io) {
            Ok(VcpuExit::Io | VcpuExit::Interrupted) => {}
            Ok(VcpuExit::Shutdown) => break "triple fault (shutdown)".to_string(),
            Ok(VcpuExit::InternalError { detail }) => break detail,
            Ok(VcpuExit::Unexpected { reason }) => break format!("unexpected exit {reason}"),
            Err(e) => break e.to_string(),
        }
    };
    let rip = vcpu.instruction_pointer().ok();
    ending.signal(GuestExit::Fault {
        cpu: id,
        reason,
        rip,
    });
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
            scratch: Some(("s.img".into(), 1 << 30)),
            process: None,
        }
    }

    #[test]
    fn cmdline_adds_pvm_flags_only_on_pvm_hosts() {
        let hw = cmdline(&config(false, HostKind::Hardware));
        let virtio = "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
                      virtio_mmio.device=4K@0xd0002000:7";
        assert_eq!(hw, format!("{BASE_CMDLINE} quiet {virtio} foo=bar"));
        let pvm = guest_flags(&config(true, HostKind::Pvm));
        assert!(pvm.starts_with(BASE_CMDLINE) && pvm.ends_with("pvm_host foo=bar"));
        assert!(!pvm.contains("quiet") && !pvm.contains("virtio"));
    }

    #[test]
    fn first_ending_wins() {
        let ending = Ending::default();
        ending.signal(GuestExit::Reset);
        ending.signal(GuestExit::Fault {
            cpu: 1,
            reason: "x".into(),
            rip: None,
        });
        assert_eq!(ending.wait(), GuestExit::Reset);
    }
}
