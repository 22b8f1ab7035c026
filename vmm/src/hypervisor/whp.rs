//! Windows Hypervisor Platform backend. Never run on a Windows host yet:
//! CI type-checks and lints it; `whp_regs` holds its backend-neutral half,
//! unit-tested everywhere.
//!
//! Interrupt model (the main difference from the KVM backend): WHP has no
//! in-kernel PIC or IOAPIC, only a per-vCPU local APIC that the hypervisor
//! emulates once the partition's LocalApicEmulationMode is XApic. The
//! backend keeps the IOAPIC the MP table announces (`devices::ioapic`),
//! served from the instruction emulator's MMIO callback as KVM serves its
//! own in the kernel; a device raising line N makes one WHvRequestInterrupt
//! with the vector, destination and mode the guest put in entry N, always
//! as an edge (what KVM's irqfd does too). No 8259: Linux runs without it.
//!
//! CPUID is answered from the table given to `Vcpu::init` through CPUID
//! exits (WHP's CPUID result list can only be set before WHvSetupPartition,
//! when that table does not exist yet). Port I/O is answered directly; INS/
//! OUTS and MMIO go through the WHP instruction emulator (WinHvEmulation).

use std::ffi::c_void;
use std::io;
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::Duration;

use windows::core::HRESULT;
use windows::Win32::Foundation::{E_INVALIDARG, S_OK};
use windows::Win32::System::Hypervisor::*;

use devices::ioapic::{self, IoApic};
use devices::{BusDevice, Interrupt};

use super::whp_regs::{self, ExitAction, ExitKind, PortAccess, Reg, Region, Value};
use super::{
    CpuidEntry, EntryState, Error, Hypervisor, IoHandler, Kick, Result, Vcpu, VcpuExit, Vm,
};
use crate::lock;

/// How long a halted vCPU sleeps before re-entering when nothing we know
/// of has happened: the LAPIC timer is emulated by the hypervisor and
/// fires without telling us, so the wait must be short.
const HALT_POLL: Duration = Duration::from_millis(1);

fn unsupported(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what.to_string())
}

/// A WHP partition, deleted when the VM, its vCPUs, interrupt lines and
/// cancellers are all gone.
struct Partition(WHV_PARTITION_HANDLE);

impl Partition {
    /// Creates and sets up a partition with `vcpus` processors, the
    /// emulated xAPIC and CPUID exits for every leaf a CPUID table can hold.
    fn new(vcpus: u32) -> Result<Self> {
        // SAFETY: no arguments; the handle returned is owned by `Partition`.
        let handle =
            unsafe { WHvCreatePartition() }.map_err(|e| Error::backend("WHvCreatePartition", e))?;
        let partition = Partition(handle);
        partition.set_property(
            WHvPartitionPropertyCodeProcessorCount,
            &vcpus,
            "WHvSetPartitionProperty(ProcessorCount)",
        )?;
        partition.set_property(
            WHvPartitionPropertyCodeLocalApicEmulationMode,
            &WHvX64LocalApicEmulationModeXApic,
            "WHvSetPartitionProperty(LocalApicEmulationMode)",
        )?;
        let exits = WHV_EXTENDED_VM_EXITS {
            AsUINT64: whp_regs::EXTENDED_EXIT_CPUID,
        };
        partition.set_property(
            WHvPartitionPropertyCodeExtendedVmExits,
            &exits,
            "WHvSetPartitionProperty(ExtendedVmExits)",
        )?;
        partition.set_property(
            WHvPartitionPropertyCodeCpuidExitList,
            whp_regs::cpuid_exit_leaves().as_slice(),
            "WHvSetPartitionProperty(CpuidExitList)",
        )?;
        // SAFETY: `handle` is a live partition whose properties are set.
        unsafe { WHvSetupPartition(handle) }.map_err(|e| Error::backend("WHvSetupPartition", e))?;
        Ok(partition)
    }

    fn set_property<T: ?Sized>(
        &self,
        code: WHV_PARTITION_PROPERTY_CODE,
        value: &T,
        op: &'static str,
    ) -> Result<()> {
        // SAFETY: `value` is valid for reads of size_of_val(value) bytes for
        // the call; WHP copies the property.
        unsafe {
            WHvSetPartitionProperty(
                self.0,
                code,
                (value as *const T).cast::<c_void>(),
                std::mem::size_of_val(value) as u32,
            )
        }
        .map_err(|e| Error::backend(op, e))
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // SAFETY: the handle is live and this is its last user. A failure
        // leaves nothing we could do about it.
        let _ = unsafe { WHvDeletePartition(self.0) };
    }
}

fn capability(code: WHV_CAPABILITY_CODE, op: &'static str) -> Result<WHV_CAPABILITY> {
    let mut cap = WHV_CAPABILITY::default();
    // SAFETY: `cap` is a writable WHV_CAPABILITY, the size passed is its size.
    unsafe {
        WHvGetCapability(
            code,
            (&mut cap as *mut WHV_CAPABILITY).cast::<c_void>(),
            size_of::<WHV_CAPABILITY>() as u32,
            None,
        )
    }
    .map_err(|e| Error::backend(op, e))?;
    Ok(cap)
}

/// Entry point of the backend.
pub struct WhpHypervisor {
    vcpus: u32,
}

impl WhpHypervisor {
    /// WHP fixes the processor count when the partition is set up, so it
    /// is given here rather than discovered by `create_vcpu`.
    pub fn new(vcpus: u32) -> Result<Self> {
        let present = capability(
            WHvCapabilityCodeHypervisorPresent,
            "WHvGetCapability(HypervisorPresent)",
        )?;
        // SAFETY: HypervisorPresent is the member this capability code fills.
        if !unsafe { present.HypervisorPresent }.as_bool() {
            return Err(Error::backend(
                "WHvGetCapability(HypervisorPresent)",
                unsupported("Windows Hypervisor Platform is not enabled"),
            ));
        }
        let features = capability(WHvCapabilityCodeFeatures, "WHvGetCapability(Features)")?;
        // SAFETY: Features is the member this capability code fills.
        if unsafe { features.Features.AsUINT64 } & whp_regs::FEATURE_LOCAL_APIC_EMULATION == 0 {
            return Err(Error::backend(
                "WHvGetCapability(Features)",
                unsupported("WHP cannot emulate the local APIC on this host"),
            ));
        }
        Ok(WhpHypervisor { vcpus })
    }
}

impl Hypervisor for WhpHypervisor {
    type Vm = WhpVm;

    fn create_vm(&self) -> Result<WhpVm> {
        Ok(WhpVm {
            partition: Arc::new(Partition::new(self.vcpus)?),
            regions: Arc::new(RwLock::new(Vec::new())),
            wakeup: Arc::new(Wakeup::default()),
            ioapic: Arc::default(),
        })
    }

    /// What WHP's own CPUID returns for VP 0 of a partition set up like
    /// the ones `create_vm` makes: WHP has no "supported CPUID" query.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let partition = Partition::new(self.vcpus)?;
        // SAFETY: the partition is set up; VP 0 is deleted below.
        unsafe { WHvCreateVirtualProcessor(partition.0, 0, 0) }
            .map_err(|e| Error::backend("WHvCreateVirtualProcessor", e))?;
        let table = whp_regs::enumerate_cpuid(|function, index| {
            // SAFETY: VP 0 exists in this partition.
            unsafe { WHvGetVirtualProcessorCpuidOutput(partition.0, 0, function, index) }
                .map(|o| [o.Eax, o.Ebx, o.Ecx, o.Edx])
                .map_err(|e| Error::backend("WHvGetVirtualProcessorCpuidOutput", e))
        });
        // SAFETY: VP 0 was created above and is not running.
        unsafe { WHvDeleteVirtualProcessor(partition.0, 0) }
            .map_err(|e| Error::backend("WHvDeleteVirtualProcessor", e))?;
        table
    }
}

/// Wakes halted vCPUs when an interrupt is requested or a run is cancelled.
#[derive(Default)]
struct Wakeup {
    generation: Mutex<u64>,
    cond: Condvar,
}

impl Wakeup {
    fn generation(&self) -> u64 {
        *lock(&self.generation)
    }

    fn notify(&self) {
        *lock(&self.generation) += 1;
        self.cond.notify_all();
    }

    /// Waits until the generation moves past `seen` or `timeout` passes.
    fn wait(&self, seen: u64, timeout: Duration) {
        let guard = lock(&self.generation);
        let _ = self
            .cond
            .wait_timeout_while(guard, timeout, |generation| *generation == seen)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

pub struct WhpVm {
    partition: Arc<Partition>,
    /// WHP maps ranges, not slots: the slot table lives here, and the
    /// instruction emulator needs it to reach guest RAM.
    regions: Arc<RwLock<Vec<Region>>>,
    wakeup: Arc<Wakeup>,
    /// The interrupt controller KVM has in the kernel: WHP has none.
    ioapic: Arc<Mutex<IoApic>>,
}

impl Vm for WhpVm {
    type Vcpu = WhpVcpu;

    /// Same semantics as KVM_SET_USER_MEMORY_REGION: reusing a slot replaces
    /// its mapping, size 0 removes it.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest: u64,
        host: *mut u8,
        size: u64,
        read_only: bool,
    ) -> Result<()> {
        let mut regions = self.regions.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = regions.iter().position(|r| r.slot == slot) {
            let old = regions[i];
            // SAFETY: old.guest..+old.size was mapped by us in this partition.
            unsafe { WHvUnmapGpaRange(self.partition.0, old.guest, old.size) }
                .map_err(|e| Error::backend("WHvUnmapGpaRange", e))?;
            regions.remove(i);
        }
        if size == 0 {
            return Ok(());
        }
        let mut flags = WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagExecute;
        if !read_only {
            flags |= WHvMapGpaRangeFlagWrite;
        }
        // SAFETY: the caller keeps host..host+size mapped for the VM's
        // lifetime, which outlives the partition's use of it.
        unsafe {
            WHvMapGpaRange(
                self.partition.0,
                host.cast_const().cast(),
                guest,
                size,
                flags,
            )
        }
        .map_err(|e| Error::backend("WHvMapGpaRange", e))?;
        regions.push(Region {
            slot,
            guest,
            host: host as usize,
            size,
            read_only,
        });
        Ok(())
    }

    fn create_vcpu(&self, id: u8) -> Result<WhpVcpu> {
        let index = u32::from(id);
        // First, so that a failure here leaves no VP behind.
        let emulator = Emulator::new()?;
        // SAFETY: the partition is set up; the VP is deleted by WhpVcpu's Drop.
        unsafe { WHvCreateVirtualProcessor(self.partition.0, index, 0) }
            .map_err(|e| Error::backend("WHvCreateVirtualProcessor", e))?;
        Ok(WhpVcpu {
            partition: self.partition.clone(),
            index,
            emulator,
            regions: self.regions.clone(),
            wakeup: self.wakeup.clone(),
            ioapic: self.ioapic.clone(),
            cancel: Arc::new(AtomicBool::new(false)),
            cpuid: Vec::new(),
        })
    }

    /// Raises IOAPIC line `gsi`, which the guest routes (see the module
    /// documentation).
    fn interrupt(&self, gsi: u32) -> Result<Arc<dyn Interrupt>> {
        if gsi >= ioapic::PINS {
            let e = io::Error::new(io::ErrorKind::InvalidInput, format!("no IOAPIC line {gsi}"));
            return Err(Error::backend("WHvRequestInterrupt", e));
        }
        Ok(Arc::new(WhpInterrupt {
            partition: self.partition.clone(),
            wakeup: self.wakeup.clone(),
            ioapic: self.ioapic.clone(),
            pin: gsi,
        }))
    }
}

struct WhpInterrupt {
    partition: Arc<Partition>,
    wakeup: Arc<Wakeup>,
    ioapic: Arc<Mutex<IoApic>>,
    pin: u32,
}

impl Interrupt for WhpInterrupt {
    /// Delivers the line where the guest's IOAPIC entry sends it, as one
    /// edge (like an irqfd); a masked line, or a delivery mode WHP cannot
    /// request (SMI, ExtINT), is dropped.
    fn trigger(&self) -> io::Result<()> {
        let Some(route) = lock(&self.ioapic).route(self.pin) else {
            return Ok(());
        };
        let Some(kind) = whp_regs::interrupt_type(route.delivery_mode) else {
            return Ok(());
        };
        let control = WHV_INTERRUPT_CONTROL {
            _bitfield: whp_regs::interrupt_control(
                kind,
                u8::from(route.logical),
                WHvX64InterruptTriggerModeEdge.0 as u8,
            ),
            Destination: u32::from(route.destination),
            Vector: u32::from(route.vector),
        };
        // SAFETY: `control` is a valid WHV_INTERRUPT_CONTROL of the size given.
        unsafe {
            WHvRequestInterrupt(
                self.partition.0,
                &control,
                size_of::<WHV_INTERRUPT_CONTROL>() as u32,
            )
        }?;
        // A vCPU halted in our run loop re-enters to take it.
        self.wakeup.notify();
        Ok(())
    }
}

/// WHP wants register value arrays 16-byte aligned.
#[repr(C, align(16))]
#[derive(Clone, Copy, Default)]
struct Aligned(WHV_REGISTER_VALUE);

fn register_name(reg: Reg) -> WHV_REGISTER_NAME {
    match reg {
        Reg::Rax => WHvX64RegisterRax,
        Reg::Rbx => WHvX64RegisterRbx,
        Reg::Rcx => WHvX64RegisterRcx,
        Reg::Rdx => WHvX64RegisterRdx,
        Reg::Rsi => WHvX64RegisterRsi,
        Reg::Rsp => WHvX64RegisterRsp,
        Reg::Rip => WHvX64RegisterRip,
        Reg::Rflags => WHvX64RegisterRflags,
        Reg::Cr0 => WHvX64RegisterCr0,
        Reg::Cr3 => WHvX64RegisterCr3,
        Reg::Cr4 => WHvX64RegisterCr4,
        Reg::Efer => WHvX64RegisterEfer,
        Reg::Cs => WHvX64RegisterCs,
        Reg::Ds => WHvX64RegisterDs,
        Reg::Es => WHvX64RegisterEs,
        Reg::Fs => WHvX64RegisterFs,
        Reg::Gs => WHvX64RegisterGs,
        Reg::Ss => WHvX64RegisterSs,
        Reg::Tr => WHvX64RegisterTr,
        Reg::Gdtr => WHvX64RegisterGdtr,
        Reg::Idtr => WHvX64RegisterIdtr,
        Reg::ApicBase => WHvX64RegisterApicBase,
        Reg::Pat => WHvX64RegisterPat,
        Reg::MtrrDefType => WHvX64RegisterMsrMtrrDefType,
        Reg::FpControlStatus => WHvX64RegisterFpControlStatus,
        Reg::XmmControlStatus => WHvX64RegisterXmmControlStatus,
    }
}

fn register_value(value: Value) -> Aligned {
    // Start from zero so every byte of the 16-byte union is defined.
    let mut v = WHV_REGISTER_VALUE::default();
    match value {
        Value::U64(x) => v.Reg64 = x,
        Value::Segment(s) => {
            v.Segment = WHV_X64_SEGMENT_REGISTER {
                Base: s.base,
                Limit: s.limit,
                Selector: s.selector,
                Anonymous: WHV_X64_SEGMENT_REGISTER_0 {
                    Attributes: s.attributes,
                },
            }
        }
        Value::Table(t) => {
            v.Table = WHV_X64_TABLE_REGISTER {
                Pad: [0; 3],
                Limit: t.limit,
                Base: t.base,
            }
        }
        Value::FpControl { fcw } => {
            v.FpControlStatus = WHV_X64_FP_CONTROL_STATUS_REGISTER {
                Anonymous: WHV_X64_FP_CONTROL_STATUS_REGISTER_0 {
                    FpControl: fcw,
                    ..Default::default()
                },
            }
        }
        Value::Mxcsr(mxcsr) => {
            v.XmmControlStatus = WHV_X64_XMM_CONTROL_STATUS_REGISTER {
                Anonymous: WHV_X64_XMM_CONTROL_STATUS_REGISTER_0 {
                    XmmStatusControl: mxcsr,
                    XmmStatusControlMask: 0xffff,
                    ..Default::default()
                },
            }
        }
    }
    Aligned(v)
}

/// A WinHvEmulation instruction emulator instance.
struct Emulator(*mut c_void);

// SAFETY: the emulator handle is not tied to the creating thread; WhpVcpu
// uses it from one thread at a time (&mut self in run).
unsafe impl Send for Emulator {}

static EMULATOR_CALLBACKS: WHV_EMULATOR_CALLBACKS = WHV_EMULATOR_CALLBACKS {
    Size: size_of::<WHV_EMULATOR_CALLBACKS>() as u32,
    Reserved: 0,
    WHvEmulatorIoPortCallback: Some(emulator_io_port),
    WHvEmulatorMemoryCallback: Some(emulator_memory),
    WHvEmulatorGetVirtualProcessorRegisters: Some(emulator_get_registers),
    WHvEmulatorSetVirtualProcessorRegisters: Some(emulator_set_registers),
    WHvEmulatorTranslateGvaPage: Some(emulator_translate_gva),
};

impl Emulator {
    fn new() -> Result<Self> {
        let mut handle = ptr::null_mut();
        // SAFETY: the callbacks are 'static; `handle` receives the emulator,
        // destroyed in Drop.
        unsafe { WHvEmulatorCreateEmulator(&EMULATOR_CALLBACKS, &mut handle) }
            .map_err(|e| Error::backend("WHvEmulatorCreateEmulator", e))?;
        Ok(Emulator(handle))
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // SAFETY: the handle came from WHvEmulatorCreateEmulator and is not
        // used after this.
        let _ = unsafe { WHvEmulatorDestroyEmulator(self.0) };
    }
}

/// What the emulator callbacks get as their `context`.
struct EmulationContext<'a> {
    partition: WHV_PARTITION_HANDLE,
    index: u32,
    io: &'a dyn IoHandler,
    regions: &'a [Region],
    ioapic: &'a Mutex<IoApic>,
}

fn hresult(r: windows::core::Result<()>) -> HRESULT {
    match r {
        Ok(()) => S_OK,
        Err(e) => e.code(),
    }
}

/// # Safety
/// `context` must point to a live `EmulationContext`, as it does for the
/// duration of WHvEmulatorTry*Emulation.
unsafe fn emulation_context<'a>(context: *const c_void) -> &'a EmulationContext<'a> {
    // SAFETY: guaranteed by the caller.
    unsafe { &*context.cast::<EmulationContext>() }
}

unsafe extern "system" fn emulator_io_port(
    context: *const c_void,
    access: *mut WHV_EMULATOR_IO_ACCESS_INFO,
) -> HRESULT {
    // SAFETY: the emulator passes back the context we gave it and a valid,
    // exclusive access record.
    let (ctx, access) = unsafe { (emulation_context(context), &mut *access) };
    let size = usize::from(access.AccessSize);
    if !matches!(size, 1 | 2 | 4) {
        return E_INVALIDARG;
    }
    if access.Direction == 0 {
        let mut data = [0u8; 4];
        ctx.io.pio_read(access.Port, &mut data[..size]);
        access.Data = u32::from_le_bytes(data);
    } else {
        ctx.io
            .pio_write(access.Port, &access.Data.to_le_bytes()[..size]);
    }
    S_OK
}

unsafe extern "system" fn emulator_memory(
    context: *const c_void,
    access: *mut WHV_EMULATOR_MEMORY_ACCESS_INFO,
) -> HRESULT {
    // SAFETY: as in emulator_io_port.
    let (ctx, access) = unsafe { (emulation_context(context), &mut *access) };
    let size = usize::from(access.AccessSize);
    if size > access.Data.len() {
        return E_INVALIDARG;
    }
    let write = access.Direction != 0;
    let gpa = access.GpaAddress;
    let data = &mut access.Data[..size];
    match whp_regs::ram_address(ctx.regions, gpa, size as u64, write) {
        Some(host) if write => {
            // SAFETY: ram_address checked that host..host+size lies in a
            // writable region that map_memory's caller keeps mapped.
            unsafe { ptr::copy_nonoverlapping(data.as_ptr(), host as *mut u8, size) }
        }
        Some(host) => {
            // SAFETY: ram_address checked that host..host+size lies in a
            // region that map_memory's caller keeps mapped.
            unsafe { ptr::copy_nonoverlapping(host as *const u8, data.as_mut_ptr(), size) }
        }
        None if (ioapic::BASE..ioapic::BASE + ioapic::WINDOW_LEN).contains(&gpa) => {
            let mut ioapic = lock(ctx.ioapic);
            match write {
                true => ioapic.write(gpa - ioapic::BASE, data),
                false => ioapic.read(gpa - ioapic::BASE, data),
            }
        }
        None if write => ctx.io.mmio_write(gpa, data),
        None => ctx.io.mmio_read(gpa, data),
    }
    S_OK
}

unsafe extern "system" fn emulator_get_registers(
    context: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *mut WHV_REGISTER_VALUE,
) -> HRESULT {
    // SAFETY: the emulator passes our context and arrays of `count` entries.
    hresult(unsafe {
        let ctx = emulation_context(context);
        WHvGetVirtualProcessorRegisters(ctx.partition, ctx.index, names, count, values)
    })
}

unsafe extern "system" fn emulator_set_registers(
    context: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *const WHV_REGISTER_VALUE,
) -> HRESULT {
    // SAFETY: as in emulator_get_registers.
    hresult(unsafe {
        let ctx = emulation_context(context);
        WHvSetVirtualProcessorRegisters(ctx.partition, ctx.index, names, count, values)
    })
}

unsafe extern "system" fn emulator_translate_gva(
    context: *const c_void,
    gva: u64,
    flags: WHV_TRANSLATE_GVA_FLAGS,
    result: *mut WHV_TRANSLATE_GVA_RESULT_CODE,
    gpa: *mut u64,
) -> HRESULT {
    let mut translation = WHV_TRANSLATE_GVA_RESULT::default();
    // SAFETY: our context; `gpa` and `result` are writable outputs the
    // emulator provides.
    unsafe {
        let ctx = emulation_context(context);
        let r = WHvTranslateGva(ctx.partition, ctx.index, gva, flags, &mut translation, gpa);
        if r.is_ok() {
            *result = translation.ResultCode;
        }
        hresult(r)
    }
}

pub struct WhpVcpu {
    partition: Arc<Partition>,
    index: u32,
    emulator: Emulator,
    regions: Arc<RwLock<Vec<Region>>>,
    wakeup: Arc<Wakeup>,
    ioapic: Arc<Mutex<IoApic>>,
    cancel: Arc<AtomicBool>,
    cpuid: Vec<CpuidEntry>,
}

/// Stops a vCPU's `run` from another thread.
#[derive(Clone)]
pub struct WhpCanceller {
    partition: Arc<Partition>,
    index: u32,
    cancel: Arc<AtomicBool>,
    wakeup: Arc<Wakeup>,
}

impl Kick for WhpCanceller {
    /// Makes the vCPU's current or next `run` return `Interrupted`. The flag
    /// covers the windows where the VP is not inside WHvRunVirtualProcessor
    /// (handling an exit, about to enter, halted in our loop).
    fn kick(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.wakeup.notify();
        // SAFETY: the partition is alive (we hold it) and flags must be 0.
        // A VP that is not running has nothing to cancel: the flag does it.
        let _ = unsafe { WHvCancelRunVirtualProcessor(self.partition.0, self.index, 0) };
    }
}

impl WhpVcpu {
    fn set_registers(&self, regs: &[(Reg, Value)]) -> Result<()> {
        let names: Vec<WHV_REGISTER_NAME> = regs.iter().map(|(r, _)| register_name(*r)).collect();
        let values: Vec<Aligned> = regs.iter().map(|(_, v)| register_value(*v)).collect();
        // SAFETY: both arrays hold regs.len() entries; Aligned is a 16-byte
        // aligned repr(C) wrapper of WHV_REGISTER_VALUE with the same size.
        unsafe {
            WHvSetVirtualProcessorRegisters(
                self.partition.0,
                self.index,
                names.as_ptr(),
                names.len() as u32,
                values.as_ptr().cast(),
            )
        }
        .map_err(|e| Error::backend("WHvSetVirtualProcessorRegisters", e))
    }

    fn set_u64s(&self, regs: &[(Reg, u64)]) -> Result<()> {
        let regs: Vec<(Reg, Value)> = regs.iter().map(|(r, v)| (*r, Value::U64(*v))).collect();
        self.set_registers(&regs)
    }

    fn set_lapic_virtual_wire(&self) -> Result<()> {
        let mut page = [0u8; whp_regs::LAPIC_PAGE_SIZE];
        let mut written = 0u32;
        // SAFETY: `page` is writable for its full length, which is passed.
        unsafe {
            WHvGetVirtualProcessorInterruptControllerState2(
                self.partition.0,
                self.index,
                page.as_mut_ptr().cast(),
                page.len() as u32,
                Some(&mut written),
            )
        }
        .map_err(|e| Error::backend("WHvGetVirtualProcessorInterruptControllerState2", e))?;
        whp_regs::set_virtual_wire(&mut page);
        // SAFETY: `page` is readable for `written` bytes, as WHP returned it.
        unsafe {
            WHvSetVirtualProcessorInterruptControllerState2(
                self.partition.0,
                self.index,
                page.as_ptr().cast(),
                written,
            )
        }
        .map_err(|e| Error::backend("WHvSetVirtualProcessorInterruptControllerState2", e))
    }

    /// Plain IN/OUT: the exit context has port, size and RAX; we answer and
    /// step over the instruction ourselves, which WHP leaves to us.
    fn port_io(
        &self,
        exit: &WHV_RUN_VP_EXIT_CONTEXT,
        access: PortAccess,
        io: &dyn IoHandler,
    ) -> Result<()> {
        // SAFETY: ExitReason is X64IoPortAccess, so IoPortAccess is the live member.
        let ctx = unsafe { &exit.Anonymous.IoPortAccess };
        let size = usize::from(access.size);
        let next = exit.VpContext.Rip + whp_regs::instruction_length(exit.VpContext._bitfield);
        if access.write {
            io.pio_write(ctx.PortNumber, &ctx.Rax.to_le_bytes()[..size]);
            self.set_u64s(&[(Reg::Rip, next)])
        } else {
            let mut data = [0u8; 4];
            io.pio_read(ctx.PortNumber, &mut data[..size]);
            let rax = whp_regs::merge_port_read(ctx.Rax, &data[..size]);
            self.set_u64s(&[(Reg::Rax, rax), (Reg::Rip, next)])
        }
    }

    fn answer_cpuid(&self, exit: &WHV_RUN_VP_EXIT_CONTEXT) -> Result<()> {
        // SAFETY: ExitReason is X64Cpuid, so CpuidAccess is the live member.
        let ctx = unsafe { &exit.Anonymous.CpuidAccess };
        let default = [
            ctx.DefaultResultRax as u32,
            ctx.DefaultResultRbx as u32,
            ctx.DefaultResultRcx as u32,
            ctx.DefaultResultRdx as u32,
        ];
        let [eax, ebx, ecx, edx] =
            whp_regs::cpuid_result(&self.cpuid, ctx.Rax as u32, ctx.Rcx as u32, default);
        let next = exit.VpContext.Rip + whp_regs::instruction_length(exit.VpContext._bitfield);
        self.set_u64s(&[
            (Reg::Rax, eax.into()),
            (Reg::Rbx, ebx.into()),
            (Reg::Rcx, ecx.into()),
            (Reg::Rdx, edx.into()),
            (Reg::Rip, next),
        ])
    }

    /// INS/OUTS and MMIO through the instruction emulator, which decodes the
    /// instruction, calls back into `io`/guest RAM, and updates registers
    /// (RIP included). Returns the failure detail if it could not.
    fn emulate(
        &self,
        exit: &WHV_RUN_VP_EXIT_CONTEXT,
        io: &dyn IoHandler,
    ) -> Result<Option<String>> {
        // A snapshot, so no lock is held while `io` runs: a device model
        // that remaps memory from an MMIO handler must not deadlock.
        let regions = self
            .regions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let ctx = EmulationContext {
            partition: self.partition.0,
            index: self.index,
            io,
            regions: &regions,
            ioapic: &self.ioapic,
        };
        let context = (&ctx as *const EmulationContext).cast::<c_void>();
        let status = if exit.ExitReason == WHvRunVpExitReasonX64IoPortAccess {
            // SAFETY: `ctx` outlives the call and is what the callbacks
            // expect; IoPortAccess is the live member for this exit reason.
            unsafe {
                WHvEmulatorTryIoEmulation(
                    self.emulator.0,
                    context,
                    &exit.VpContext,
                    &exit.Anonymous.IoPortAccess,
                )
            }
            .map_err(|e| Error::backend("WHvEmulatorTryIoEmulation", e))?
        } else {
            // SAFETY: as above; MemoryAccess is the live member for this exit reason.
            unsafe {
                WHvEmulatorTryMmioEmulation(
                    self.emulator.0,
                    context,
                    &exit.VpContext,
                    &exit.Anonymous.MemoryAccess,
                )
            }
            .map_err(|e| Error::backend("WHvEmulatorTryMmioEmulation", e))?
        };
        // SAFETY: every bit pattern of the status union is a valid u32.
        Ok(whp_regs::emulator_failure(unsafe { status.AsUINT32 }))
    }
}

// The windows crate keeps the C names of the exit-reason constants.
#[allow(non_upper_case_globals)]
fn exit_kind(exit: &WHV_RUN_VP_EXIT_CONTEXT) -> ExitKind {
    match exit.ExitReason {
        WHvRunVpExitReasonX64IoPortAccess => {
            // SAFETY: IoPortAccess is the member filled for this reason.
            let bits = unsafe { exit.Anonymous.IoPortAccess.AccessInfo.AsUINT32 };
            ExitKind::IoPortAccess(PortAccess::from_bits(bits))
        }
        WHvRunVpExitReasonMemoryAccess => ExitKind::MemoryAccess,
        WHvRunVpExitReasonX64Halt => ExitKind::Halt,
        WHvRunVpExitReasonUnrecoverableException => ExitKind::UnrecoverableException,
        WHvRunVpExitReasonCanceled => ExitKind::Canceled,
        WHvRunVpExitReasonInvalidVpRegisterValue => ExitKind::InvalidVpRegisterValue,
        WHvRunVpExitReasonUnsupportedFeature => {
            // SAFETY: UnsupportedFeature is the member filled for this reason.
            let ctx = unsafe { &exit.Anonymous.UnsupportedFeature };
            ExitKind::UnsupportedFeature {
                feature: ctx.FeatureCode.0,
                parameter: ctx.FeatureParameter,
            }
        }
        WHvRunVpExitReasonX64InterruptWindow => ExitKind::InterruptWindow,
        WHvRunVpExitReasonX64ApicEoi => ExitKind::ApicEoi {
            // SAFETY: ApicEoi is the member filled for this reason.
            vector: unsafe { exit.Anonymous.ApicEoi.InterruptVector },
        },
        WHvRunVpExitReasonX64Cpuid => ExitKind::Cpuid,
        WHvRunVpExitReasonX64MsrAccess => ExitKind::MsrAccess {
            // SAFETY: MsrAccess is the member filled for this reason.
            msr: unsafe { exit.Anonymous.MsrAccess.MsrNumber },
        },
        other => ExitKind::Other(other.0),
    }
}

impl Vcpu for WhpVcpu {
    type Kicker = WhpCanceller;

    fn kicker(&self) -> WhpCanceller {
        WhpCanceller {
            partition: self.partition.clone(),
            index: self.index,
            cancel: self.cancel.clone(),
            wakeup: self.wakeup.clone(),
        }
    }

    fn init(&mut self, cpuid: &[CpuidEntry]) -> Result<()> {
        self.cpuid = cpuid.to_vec();
        // vcpu ids come in as u8 (create_vcpu), so this cannot truncate.
        self.set_registers(&whp_regs::init_registers(self.index as u8))?;
        self.set_lapic_virtual_wire()
    }

    fn set_entry_state(&mut self, state: &EntryState) -> Result<()> {
        self.set_registers(&whp_regs::entry_registers(state))
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        loop {
            if self.cancel.swap(false, Ordering::SeqCst) {
                return Ok(VcpuExit::Interrupted);
            }
            let generation = self.wakeup.generation();
            let mut exit = WHV_RUN_VP_EXIT_CONTEXT::default();
            // SAFETY: `exit` is writable for the size passed.
            unsafe {
                WHvRunVirtualProcessor(
                    self.partition.0,
                    self.index,
                    (&mut exit as *mut WHV_RUN_VP_EXIT_CONTEXT).cast(),
                    size_of::<WHV_RUN_VP_EXIT_CONTEXT>() as u32,
                )
            }
            .map_err(|e| Error::backend("WHvRunVirtualProcessor", e))?;
            match whp_regs::exit_action(exit_kind(&exit)) {
                ExitAction::PortIo(access) => {
                    self.port_io(&exit, access, io)?;
                    return Ok(VcpuExit::Io);
                }
                ExitAction::EmulateIo | ExitAction::EmulateMmio => {
                    return Ok(match self.emulate(&exit, io)? {
                        None => VcpuExit::Io,
                        Some(detail) => VcpuExit::InternalError { detail },
                    });
                }
                ExitAction::WaitForInterrupt => self.wakeup.wait(generation, HALT_POLL),
                ExitAction::AnswerCpuid => self.answer_cpuid(&exit)?,
                ExitAction::Resume => {}
                ExitAction::Shutdown => return Ok(VcpuExit::Shutdown),
                ExitAction::Interrupted => {
                    self.cancel.store(false, Ordering::SeqCst);
                    return Ok(VcpuExit::Interrupted);
                }
                ExitAction::InternalError(detail) => return Ok(VcpuExit::InternalError { detail }),
                ExitAction::Unexpected(reason) => return Ok(VcpuExit::Unexpected { reason }),
            }
        }
    }

    fn instruction_pointer(&self) -> Result<u64> {
        let name = WHvX64RegisterRip;
        let mut value = Aligned::default();
        // SAFETY: one name, one 16-byte aligned writable value.
        unsafe {
            WHvGetVirtualProcessorRegisters(
                self.partition.0,
                self.index,
                &name,
                1,
                (&mut value as *mut Aligned).cast(),
            )
        }
        .map_err(|e| Error::backend("WHvGetVirtualProcessorRegisters", e))?;
        // SAFETY: RIP is returned in Reg64.
        Ok(unsafe { value.0.Reg64 })
    }
}

impl Drop for WhpVcpu {
    fn drop(&mut self) {
        // SAFETY: the VP was created by create_vcpu in this partition and
        // cannot be running: run takes &mut self. Nothing to do on failure.
        let _ = unsafe { WHvDeleteVirtualProcessor(self.partition.0, self.index) };
    }
}
