//! uvm: a minimal virtual machine monitor for utility VMs.

pub mod agent;
pub mod boot;
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
