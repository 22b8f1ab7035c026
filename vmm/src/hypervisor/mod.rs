//! The hypervisor seam: everything backend-specific lives behind these traits.
//!
//! `Vcpu::run` returns a small exit enum and answers guest I/O through an
//! [`IoHandler`] callback, so a backend that hands over the access (KVM) and
//! one that must emulate the faulting instruction to learn it both fit.

#[cfg(target_os = "linux")]
pub mod kvm;
pub mod regs;
#[cfg(windows)]
pub mod whp;
// Backend-neutral parts of the WHP backend, unit-tested on every host.
#[cfg(any(windows, test))]
mod whp_regs;

use std::sync::Arc;

#[cfg(target_os = "linux")]
use vmm_sys_util::eventfd::EventFd;

pub use regs::{EntryState, Segment};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps a backend failure of the operation `op`.
    pub fn backend(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        Error::Backend {
            op,
            source: source.into(),
        }
    }
}

/// One CPUID leaf/subleaf as presented to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// The leaf has subleaves selected by ECX (`index`).
    pub indexed: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

pub trait Hypervisor {
    type Vm: Vm;

    fn create_vm(&self) -> Result<Self::Vm>;

    /// The CPUID the hypervisor can offer guests, before our template.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

pub trait Vm: Send + Sync {
    type Vcpu: Vcpu;

    /// Maps `size` bytes of host memory at `host` to guest physical `guest`.
    ///
    /// # Safety
    /// `host..host + size` must stay mapped and valid for the VM's lifetime.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest: u64,
        host: *mut u8,
        size: u64,
        read_only: bool,
    ) -> Result<()>;

    fn create_vcpu(&self, id: u8) -> Result<Self::Vcpu>;

    /// An interrupt line for a device wired to `gsi` (IOAPIC pin).
    fn interrupt(&self, gsi: u32) -> Result<Arc<dyn devices::Interrupt>>;

    /// Signals `event` on a 32-bit guest write of `value` to MMIO `addr`
    /// without an exit to the VMM (a virtio queue notification). Writes the
    /// hypervisor does not take this way reach the MMIO bus as usual; a
    /// backend without eventfds leaves them all to the bus.
    #[cfg(target_os = "linux")]
    fn register_notifier(&self, event: &EventFd, addr: u64, value: u32) -> Result<()>;
}

/// A VM or vCPU whose state can be read while it is paused and written
/// into a fresh one of the same backend: what a snapshot keeps of it.
pub trait Stateful {
    type State: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static;

    /// Of a paused VM or vCPU. A vCPU first finishes what its last exit
    /// left pending (an I/O instruction the VMM answered), running no
    /// guest code, so that the state is between two instructions.
    fn save_state(&mut self) -> Result<Self::State>;

    /// Before the VM first runs: the vCPU's CPUID is set, the VM has its
    /// memory and interrupt controllers.
    fn restore_state(&mut self, state: &Self::State) -> Result<()>;
}

/// Guest port and MMIO accesses, answered by the VMM's buses.
pub trait IoHandler {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

#[derive(Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// A port or MMIO access, already answered through the [`IoHandler`].
    Io,
    /// Kicked ([`Kick`]) or interrupted by a signal: run again or stop.
    Interrupted,
    /// Triple fault or another reason the CPU shut down.
    Shutdown,
    /// The hypervisor could not run or emulate the guest.
    InternalError { detail: String },
    /// Anything else this VMM does not expect.
    Unexpected { reason: String },
}

/// Stops a vCPU's current or next [`Vcpu::run`] from another thread: that
/// call returns [`VcpuExit::Interrupted`] soon, whether the vCPU is inside
/// the guest, halted there, or between two runs.
pub trait Kick: Send + Sync + 'static {
    fn kick(&self);
}

pub trait Vcpu: Send + 'static {
    type Kicker: Kick;

    /// The handle that kicks this vCPU out of `run`.
    fn kicker(&self) -> Self::Kicker;

    /// Per-vCPU set-up every vCPU needs: CPUID, MSRs, FPU, local APIC.
    fn init(&mut self, cpuid: &[CpuidEntry]) -> Result<()>;

    /// Registers for the boot CPU's first instruction.
    fn set_entry_state(&mut self, state: &EntryState) -> Result<()>;

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit>;

    /// The guest's current RIP, for error messages.
    fn instruction_pointer(&self) -> Result<u64>;
}
