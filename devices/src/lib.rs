//! uvm's guest-visible devices. Each device is one module; the VMM owns them
//! through [`Bus`] and [`BusDevice`] and never the other way round: devices
//! reach the VM only through the small traits defined here.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod ioapic;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// An interrupt line into the guest (an irqfd on KVM, a requested interrupt on
/// other hypervisors). Devices raise it; the VMM decides how it is delivered.
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

/// An interrupt line that counts how often it was raised, for device tests.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct CountingInterrupt(std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl CountingInterrupt {
    pub(crate) fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
impl Interrupt for CountingInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}
