//! What KVM holds of a paused VM, read with KVM_GET_* and written into a
//! fresh VM with KVM_SET_*: the architectural state a snapshot keeps.
//! The order of the writes is KVM's (api.rst and Firecracker's restore):
//! TSC frequency and MP state first, the events last, after the LAPIC and
//! the MSRs they depend on.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::super::{Error, Result};

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The guest's TSC rate, where KVM tells it (a restore on a host with
    /// another rate scales to it).
    pub tsc_khz: Option<u32>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The FPU, SSE and AVX state (the legacy 4 KiB area: no AMX).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that this vCPU could read (kvm-clock, TSC,
    /// SYSCALL and the rest).
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The VM's own devices in KVM: the interrupt controllers, the PIT and
/// the clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// At most this many MSRs in one KVM_GET_MSRS (KVM's own limit is 255
/// per call on older kernels).
const MSR_BATCH: usize = 64;

pub fn save_vcpu(fd: &VcpuFd, msr_indexes: &[u32]) -> Result<VcpuState> {
    let get = |op| move |e| Error::backend(op, e);
    Ok(VcpuState {
        tsc_khz: fd.get_tsc_khz().ok(),
        mp_state: fd.get_mp_state().map_err(get("KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(get("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(get("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(get("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(get("KVM_GET_XCRS"))?,
        debug_regs: fd.get_debug_regs().map_err(get("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(get("KVM_GET_LAPIC"))?,
        msrs: readable_msrs(fd, msr_indexes)?,
        events: fd.get_vcpu_events().map_err(get("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Writes `state` into a vCPU whose CPUID is already set.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<()> {
    let set = |op| move |e| Error::backend(op, e);
    if let Some(khz) = state.tsc_khz {
        // Hosts without TSC scaling refuse any other rate: the guest then
        // runs on the host's, which its kvm-clock corrects for.
        if fd.get_tsc_khz().ok() != Some(khz) {
            let _ = fd.set_tsc_khz(khz);
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(set("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(set("KVM_SET_REGS"))?;
    fd.set_sregs(&sregs_to_write(&state.sregs))
        .map_err(set("KVM_SET_SREGS"))?;
    // SAFETY: `kvm_xsave` is the legacy 4 KiB area that KVM_SET_XSAVE
    // reads in full; it is exactly what KVM_GET_XSAVE filled.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(set("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(set("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(set("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(set("KVM_SET_LAPIC"))?;
    set_msrs(fd, &state.msrs)?;
    fd.set_vcpu_events(&state.events)
        .map_err(set("KVM_SET_VCPU_EVENTS"))
}

/// The special registers as this host's KVM should get them back. On AMD
/// hosts KVM reports the task register busy (type 11) although the SVM
/// state holds it available (9): svm_get_segment adds the bit. Real SVM
/// ignores it, but an emulated one (QEMU's, the nested path) then takes
/// the TSS for invalid and faults every I/O port a guest process was
/// allowed. Written back as the hardware had it.
fn sregs_to_write(saved: &kvm_sregs) -> kvm_sregs {
    let mut sregs = *saved;
    if amd_host() {
        sregs.tr.type_ &= !TSS_BUSY;
    }
    sregs
}

/// The busy bit of a TSS descriptor's type.
const TSS_BUSY: u8 = 0x2;

fn amd_host() -> bool {
    let vendor = std::arch::x86_64::__cpuid(0);
    // "AuthenticAMD" in EBX, EDX, ECX.
    (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
}

/// The MSRs among `indexes` this vCPU answers, in batches; one KVM
/// cannot read (KVM_GET_MSRS stops at it) is left out.
fn readable_msrs(fd: &VcpuFd, indexes: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut read = Vec::with_capacity(indexes.len());
    let mut rest = indexes;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let mut msrs = msr_list(
            "KVM_GET_MSRS",
            batch.iter().map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            }),
        )?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::backend("KVM_GET_MSRS", e))?;
        read.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let skip = if n < batch.len() { n + 1 } else { n };
        rest = &rest[skip..];
    }
    Ok(read)
}

fn set_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    for batch in entries.chunks(MSR_BATCH) {
        let msrs = msr_list("KVM_SET_MSRS", batch.iter().copied())?;
        let n = fd
            .set_msrs(&msrs)
            .map_err(|e| Error::backend("KVM_SET_MSRS", e))?;
        if n < batch.len() {
            let index = batch[n].index;
            return Err(Error::backend(
                "KVM_SET_MSRS",
                std::io::Error::other(format!("this host refuses MSR {index:#x}")),
            ));
        }
    }
    Ok(())
}

/// `entries` as the list `op` takes.
fn msr_list(op: &'static str, entries: impl Iterator<Item = kvm_msr_entry>) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = entries.collect();
    Msrs::from_entries(&entries)
        .map_err(|_| Error::backend(op, std::io::Error::other("too many MSRs")))
}

pub fn save_vm(fd: &VmFd) -> Result<VmState> {
    let chip = |id| {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map(|()| chip)
            .map_err(|e| Error::backend("KVM_GET_IRQCHIP", e))
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: fd
            .get_pit2()
            .map_err(|e| Error::backend("KVM_GET_PIT2", e))?,
        clock: fd
            .get_clock()
            .map_err(|e| Error::backend("KVM_GET_CLOCK", e))?,
    })
}

/// Writes `state` into a VM that has its irqchip and PIT. The clock goes
/// on from where it was saved: the guest's monotonic time does not count
/// the time the VM did not exist.
pub fn restore_vm(fd: &VmFd, state: &VmState) -> Result<()> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        fd.set_irqchip(chip)
            .map_err(|e| Error::backend("KVM_SET_IRQCHIP", e))?;
    }
    fd.set_pit2(&state.pit)
        .map_err(|e| Error::backend("KVM_SET_PIT2", e))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(|e| Error::backend("KVM_SET_CLOCK", e))
}
