//! KVM backend (kvm-ioctls). Works unchanged on hardware KVM and on kvm_pvm.

mod state;

use std::cell::Cell;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_enable_cap, kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_run, kvm_segment,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_CAP_PMU_CAPABILITY,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY, KVM_PMU_CAP_DISABLE,
};
use kvm_ioctls::{
    Cap, IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags,
    VcpuExit as KvmExit, VcpuFd, VmFd,
};
use vmm_sys_util::eventfd::EventFd;

use super::{CpuidEntry, EntryState, Error, IoHandler, Kick, Result, Segment, VcpuExit};
use crate::pvm::HostKind;

/// Where KVM keeps the real-mode TSS it needs on Intel: three pages just below
/// the 4 GiB BIOS area, outside guest RAM and the MMIO holes we use.
const TSS_ADDRESS: usize = 0xfffb_d000;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// AMD's performance counters: the legacy four (event selects, then
/// counters) and the six of the core extension.
const AMD_PMU_MSRS: [(u32, u32); 2] = [(0xc001_0000, 8), (0xc001_0200, 12)];
const MISC_ENABLE_FAST_STRING: u64 = 1;

// Local APIC LVT registers and delivery modes (Intel SDM vol. 3, 10.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

pub struct KvmHypervisor {
    kvm: Kvm,
    /// Whether guests obey the CPUID we set (hardware KVM; on kvm_pvm the
    /// guest executes CPUID natively).
    cpuid_intercepted: bool,
}

impl KvmHypervisor {
    /// /dev/kvm on a hardware-KVM host.
    pub fn new() -> Result<Self> {
        Self::for_host(HostKind::Hardware)
    }

    /// /dev/kvm on a host of `kind`.
    pub fn for_host(kind: HostKind) -> Result<Self> {
        Ok(Self {
            kvm: Kvm::new().map_err(|e| Error::backend("open /dev/kvm", e))?,
            cpuid_intercepted: kind == HostKind::Hardware,
        })
    }
}

impl super::Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn create_vm(&self) -> Result<KvmVm> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::backend("KVM_CREATE_VM", e))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|e| Error::backend("KVM_SET_TSS_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| Error::backend("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| Error::backend("KVM_CREATE_PIT2", e))?;
        // On kvm_pvm the guest sees (and probes) the host's CPU whatever we
        // do, and the MSR filter's SRCU grace period costs ~6 ms of set-up.
        if self.cpuid_intercepted {
            self.disable_pmu(&fd)?;
        }
        let msr_indexes = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| Error::backend("KVM_GET_MSR_INDEX_LIST", e))?;
        Ok(KvmVm {
            fd,
            msr_indexes: msr_indexes.as_slice().into(),
        })
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::backend("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut entries: Vec<CpuidEntry> = cpuid.as_slice().iter().map(from_kvm_cpuid).collect();
        // KVM leaves this bit to userspace (api.rst, KVM_GET_SUPPORTED_CPUID):
        // without it the guest calibrates its LAPIC timer against the PIT.
        if self.kvm.check_extension(Cap::TscDeadlineTimer) {
            set_tsc_deadline(&mut entries);
        }
        Ok(entries)
    }
}

/// Offers the TSC-deadline timer in leaf 1.
fn set_tsc_deadline(entries: &mut [CpuidEntry]) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= crate::cpuid::ECX_TSC_DEADLINE;
    }
}

impl KvmHypervisor {
    /// A utility VM has no use for a PMU: KVM's virtual PMU is switched
    /// off where KVM can, and the AMD counter MSRs refused (#GP, as on a CPU
    /// without them) where KVM filters MSRs, because an AMD guest probes
    /// them whatever CPUID says, and each probe of a missing PMU is a
    /// warning in the host's log.
    fn disable_pmu(&self, fd: &VmFd) -> Result<()> {
        let pmu = self.kvm.check_extension_raw(KVM_CAP_PMU_CAPABILITY.into());
        if pmu & KVM_PMU_CAP_DISABLE as i32 != 0 {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_PMU_CAPABILITY,
                args: [KVM_PMU_CAP_DISABLE.into(), 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap)
                .map_err(|e| Error::backend("KVM_CAP_PMU_CAPABILITY", e))?;
        }
        if self.kvm.check_extension(Cap::X86MsrFilter) {
            let denied = [0u8; 2];
            let ranges = AMD_PMU_MSRS.map(|(base, msr_count)| MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base,
                msr_count,
                bitmap: &denied,
            });
            fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
                .map_err(|e| Error::backend("KVM_X86_SET_MSR_FILTER", e))?;
        }
        Ok(())
    }
}

pub struct KvmVm {
    fd: VmFd,
    /// The MSRs KVM saves and restores, for every vCPU's state.
    msr_indexes: Arc<[u32]>,
}

impl super::Stateful for KvmVm {
    type State = state::VmState;

    fn save_state(&mut self) -> Result<state::VmState> {
        state::save_vm(&self.fd)
    }

    fn restore_state(&mut self, state: &state::VmState) -> Result<()> {
        state::restore_vm(&self.fd, state)
    }
}

impl super::Vm for KvmVm {
    type Vcpu = KvmVcpu;

    unsafe fn map_memory(
        &self,
        slot: u32,
        guest: u64,
        host: *mut u8,
        size: u64,
        read_only: bool,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: guest,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| Error::backend("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_vcpu(&self, id: u8) -> Result<KvmVcpu> {
        install_kick_handler()?;
        let fd = self
            .fd
            .create_vcpu(id.into())
            .map_err(|e| Error::backend("KVM_CREATE_VCPU", e))?;
        Ok(KvmVcpu {
            fd,
            kick: Arc::default(),
            msr_indexes: self.msr_indexes.clone(),
        })
    }

    fn interrupt(&self, gsi: u32) -> Result<Arc<dyn devices::Interrupt>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::backend("eventfd", e))?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| Error::backend("KVM_IRQFD", e))?;
        Ok(Arc::new(IrqFd(evt)))
    }

    fn register_notifier(&self, event: &EventFd, addr: u64, value: u32) -> Result<()> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), value)
            .map_err(|e| Error::backend("KVM_IOEVENTFD", e))
    }
}

/// An eventfd wired to a GSI with KVM_IRQFD: a write raises the interrupt.
struct IrqFd(EventFd);

impl devices::Interrupt for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct KvmVcpu {
    fd: VcpuFd,
    kick: Arc<KickState>,
    msr_indexes: Arc<[u32]>,
}

impl super::Stateful for KvmVcpu {
    type State = state::VcpuState;

    fn save_state(&mut self) -> Result<state::VcpuState> {
        self.finish_pending_exit()?;
        state::save_vcpu(&self.fd, &self.msr_indexes)
    }

    fn restore_state(&mut self, state: &state::VcpuState) -> Result<()> {
        state::restore_vcpu(&self.fd, state)
    }
}

/// How a vCPU is kicked out of KVM_RUN, the way Firecracker and
/// vmm-reference do it: a real-time signal to its thread, whose handler sets
/// `immediate_exit` so that a KVM_RUN the signal just missed returns at once.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick handler.
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = RUNNING.with(Cell::get);
    if !run.is_null() {
        // SAFETY: RUNNING is set by `KvmVcpu::run` and cleared by its drop,
        // both on this thread, so it points at a live kvm_run mapping; the
        // handler runs on this thread too. A volatile store: KVM reads it.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    installed.map_err(|errno| {
        Error::backend(
            "installing the vCPU kick signal handler",
            std::io::Error::from_raw_os_error(errno),
        )
    })
}

/// Shared by a vCPU and its kicker.
#[derive(Default)]
struct KickState {
    /// A kick that the vCPU has not yet returned for.
    requested: std::sync::atomic::AtomicBool,
    /// The thread running the vCPU, once it ran; none again once it is gone.
    thread: Mutex<Option<libc::pid_t>>,
}

pub struct KvmKicker(Arc<KickState>);

impl Kick for KvmKicker {
    fn kick(&self) {
        use std::sync::atomic::Ordering;
        self.0.requested.store(true, Ordering::SeqCst);
        let thread = crate::lock(&self.0.thread);
        if let Some(tid) = *thread {
            // SAFETY: tgkill has no memory effects; `tid` is the vCPU's live
            // thread (cleared, under this lock, before that thread lets the
            // vCPU go).
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal()) };
        }
    }
}

impl KvmVcpu {
    /// KVM completes an I/O or MMIO instruction the VMM answered (its
    /// result into the registers, RIP past it) only in the next KVM_RUN
    /// (api.rst, KVM_RUN): state read or written before that is mid-way
    /// through the instruction (writing it back reset guests on hardware
    /// KVM). A run with immediate_exit set does just that and returns.
    fn finish_pending_exit(&mut self) -> Result<()> {
        self.fd.set_kvm_immediate_exit(1);
        let finished = self.fd.run().map(drop);
        self.fd.set_kvm_immediate_exit(0);
        match finished {
            Err(e) if e.errno() != libc::EINTR => Err(Error::backend("KVM_RUN", e)),
            _ => Ok(()),
        }
    }

    /// Lets kicks reach this thread: called on the thread that runs us.
    fn claim_thread(&mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        if std::ptr::eq(RUNNING.with(Cell::get), run) {
            return;
        }
        RUNNING.with(|r| r.set(run));
        // SAFETY: gettid has no arguments and no memory effects.
        let tid = unsafe { libc::gettid() };
        *crate::lock(&self.kick.thread) = Some(tid);
    }

    /// Whether a kick is pending; takes it.
    fn take_kick(&self) -> bool {
        self.kick
            .requested
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        *crate::lock(&self.kick.thread) = None;
        let run: *mut kvm_run = self.fd.get_kvm_run();
        RUNNING.with(|r| {
            if std::ptr::eq(r.get(), run) {
                r.set(std::ptr::null_mut());
            }
        });
    }
}

impl super::Vcpu for KvmVcpu {
    type Kicker = KvmKicker;

    fn kicker(&self) -> KvmKicker {
        KvmKicker(self.kick.clone())
    }

    fn init(&mut self, cpuid: &[CpuidEntry]) -> Result<()> {
        let entries: Vec<kvm_cpuid_entry2> = cpuid.iter().map(to_kvm_cpuid).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| {
            Error::backend(
                "KVM_SET_CPUID2",
                std::io::Error::other("too many CPUID entries"),
            )
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::backend("KVM_SET_CPUID2", e))?;
        self.set_boot_msrs()?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| Error::backend("KVM_SET_FPU", e))?;
        self.set_lint()
    }

    fn set_entry_state(&mut self, state: &EntryState) -> Result<()> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| Error::backend("KVM_GET_SREGS", e))?;
        sregs.cs = kvm_seg(&state.code);
        let data = kvm_seg(&state.data);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_seg(&state.tss);
        sregs.gdt.base = state.gdt.base;
        sregs.gdt.limit = state.gdt.limit;
        sregs.idt.base = state.idt.base;
        sregs.idt.limit = state.idt.limit;
        sregs.cr0 = state.cr0;
        sregs.cr3 = state.cr3;
        sregs.cr4 = state.cr4;
        sregs.efer = state.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| Error::backend("KVM_SET_SREGS", e))?;

        let regs = kvm_bindings::kvm_regs {
            rip: state.rip,
            rsp: state.rsp,
            rbp: state.rsp,
            rflags: state.rflags,
            rbx: state.rbx,
            rsi: state.rsi,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| Error::backend("KVM_SET_REGS", e))
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        // Claim first, then look: a kick after the look finds the thread
        // and its signal (or immediate_exit) stops KVM_RUN.
        self.claim_thread();
        if self.take_kick() {
            return Ok(VcpuExit::Interrupted);
        }
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                self.take_kick();
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(Error::backend("KVM_RUN", e)),
        };
        Ok(match exit {
            KvmExit::IoIn(port, data) => {
                io.pio_read(port, data);
                VcpuExit::Io
            }
            KvmExit::IoOut(port, data) => {
                io.pio_write(port, data);
                VcpuExit::Io
            }
            KvmExit::MmioRead(addr, data) => {
                io.mmio_read(addr, data);
                VcpuExit::Io
            }
            KvmExit::MmioWrite(addr, data) => {
                io.mmio_write(addr, data);
                VcpuExit::Io
            }
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::InternalError => {
                // SAFETY: KVM filled the `internal` member for this exit reason.
                let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                VcpuExit::InternalError {
                    detail: format!("KVM internal error, suberror {}", internal.suberror),
                }
            }
            KvmExit::FailEntry(reason, cpu) => VcpuExit::InternalError {
                detail: format!("VM entry failed on cpu {cpu}: hardware reason {reason:#x}"),
            },
            other => VcpuExit::Unexpected {
                reason: format!("{other:?}"),
            },
        })
    }

    fn instruction_pointer(&self) -> Result<u64> {
        Ok(self
            .fd
            .get_regs()
            .map_err(|e| Error::backend("KVM_GET_REGS", e))?
            .rip)
    }
}

impl KvmVcpu {
    fn set_boot_msrs(&self) -> Result<()> {
        let entries = [kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        }];
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| Error::backend("KVM_SET_MSRS", std::io::Error::other("bad MSR list")))?;
        self.fd
            .set_msrs(&msrs)
            .map_err(|e| Error::backend("KVM_SET_MSRS", e))?;
        Ok(())
    }

    /// LINT0 takes the legacy PIC's interrupts (ExtINT), LINT1 the NMI, as on a
    /// PC; the guest relies on it before it programs the IOAPIC.
    fn set_lint(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| Error::backend("KVM_GET_LAPIC", e))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes = &mut lapic.regs[reg..reg + 4];
            let value = u32::from_le_bytes([0, 1, 2, 3].map(|i| bytes[i] as u8));
            let value = (value & !0x700) | (mode << 8);
            for (b, v) in bytes.iter_mut().zip(value.to_le_bytes()) {
                *b = v as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::backend("KVM_SET_LAPIC", e))
    }
}

fn kvm_seg(seg: &Segment) -> kvm_segment {
    kvm_segment {
        base: seg.base,
        limit: seg.limit,
        selector: seg.selector,
        type_: seg.type_,
        present: seg.present.into(),
        dpl: seg.dpl,
        db: seg.db.into(),
        s: seg.s.into(),
        l: seg.l.into(),
        g: seg.g.into(),
        avl: 0,
        unusable: (!seg.present).into(),
        padding: 0,
    }
}

fn from_kvm_cpuid(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        indexed: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn to_kvm_cpuid(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: if e.indexed {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::Hypervisor;
    use super::*;

    /// Needs /dev/kvm: a failure under CI=true, a skip said so elsewhere.
    fn kvm() -> Option<KvmHypervisor> {
        match KvmHypervisor::new() {
            Ok(kvm) => Some(kvm),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIPPED: {e}");
                None
            }
            Err(e) => panic!("CI=true but {e}"),
        }
    }

    /// A vCPU's and a VM's state, saved, carried as JSON and written into
    /// a fresh VM, reads back the same: what a snapshot relies on.
    #[test]
    fn state_saved_from_one_vm_restores_into_another() {
        use super::super::{Stateful, Vcpu, Vm};
        let Some(hv) = kvm() else { return };
        let cpuid = crate::cpuid::for_vcpu(&hv.supported_cpuid().unwrap(), 0, 1);
        let mut vm = hv.create_vm().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.init(&cpuid).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rax: 0x1234_5678,
            rip: 0xfff0,
            rflags: 2,
            ..Default::default()
        };
        vcpu.fd.set_regs(&regs).unwrap();
        let saved = (vcpu.save_state().unwrap(), vm.save_state().unwrap());
        assert!(
            saved.0.msrs.iter().any(|m| m.index == 0x10),
            "the TSC is saved"
        );
        let json = serde_json::to_string(&saved).unwrap();
        let (saved, vm_saved): (state::VcpuState, state::VmState) =
            serde_json::from_str(&json).unwrap();

        let mut vm = hv.create_vm().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.init(&cpuid).unwrap();
        vcpu.restore_state(&saved).unwrap();
        vm.restore_state(&vm_saved).unwrap();
        let again = vcpu.save_state().unwrap();
        assert_eq!((again.regs.rax, again.regs.rip), (0x1234_5678, 0xfff0));
        assert_eq!(again.sregs.cr0, saved.sregs.cr0);
        assert_eq!(again.lapic.regs[..0x400], saved.lapic.regs[..0x400]);
        assert_eq!(again.xcrs.xcrs[0].value, saved.xcrs.xcrs[0].value);
        let tsc = |s: &state::VcpuState| s.msrs.iter().find(|m| m.index == 0x10).unwrap().data;
        assert!(
            tsc(&again) >= tsc(&saved),
            "the TSC goes on from the saved one"
        );
        let again = vm.save_state().unwrap();
        // SAFETY: both were filled by KVM_GET_IRQCHIP for the IOAPIC.
        let (a, b) = unsafe { (vm_saved.ioapic.chip.ioapic, again.ioapic.chip.ioapic) };
        assert_eq!(a.base_address, b.base_address);
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_when_kvm_has_it() {
        let Some(hv) = kvm() else { return };
        let offered = hv.kvm.check_extension(Cap::TscDeadlineTimer);
        let cpuid = hv.supported_cpuid().unwrap();
        let leaf1 = cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ecx & crate::cpuid::ECX_TSC_DEADLINE != 0, offered);
    }
}
