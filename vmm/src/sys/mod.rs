//! What differs between host platforms, behind the same names on each: the
//! loop that serves virtio devices, the link to the guest agent (vsock or
//! the kernel command line), and the process's stdio. The rest of uvm is
//! written once.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub mod seccomp;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
mod portable;
#[cfg(not(target_os = "linux"))]
pub use portable::*;
