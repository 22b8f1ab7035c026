//! uvm: a minimal virtual machine monitor for utility VMs.

pub mod agent;
pub mod boot;
pub mod clock;
pub mod console;
pub mod cpuid;
pub mod hypervisor;
pub mod layer;
pub mod memory;
pub mod pvm;
pub mod rss;
pub mod scratch;
pub mod signals;
pub mod terminal;
pub mod uvm;

/// Locks `m` even if a thread panicked while holding it: the VMM's shared
/// state stays usable, and the process must still report and exit.
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
