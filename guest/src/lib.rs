//! What the uvm host and the guest agent share.

#[cfg(unix)]
pub mod hook;
pub mod protocol;
// The guest side: the agent and its test peer run in Linux guests.
#[cfg(target_os = "linux")]
pub mod vsock;

/// Boot marks: the agent writes a mark byte to the VMM's boot-timer port at
/// each milestone, and the VMM stamps it with host time.
pub mod boot_mark {
    /// I/O port of the boot timer (unused by any PC device).
    pub const PORT: u16 = 0x440;
    /// The agent (PID 1) has started.
    pub const AGENT_STARTED: u8 = 1;
    /// The process has been started.
    pub const PROCESS_STARTED: u8 = 2;
    /// The process has ended, the agent killed what it left behind and
    /// synced the file systems.
    pub const PROCESS_EXITED: u8 = 3;
}

/// Serial numbers (virtio-blk GET_ID) by which the agent finds its disks.
pub mod disk_serial {
    /// The writable layer.
    pub const SCRATCH: &str = "uvm-scratch";

    /// Read-only layer `index`, for VMMs that give layers as disks because
    /// they have no virtio-pmem (QEMU microvm, as a benchmark peer).
    pub fn layer(index: u32) -> String {
        format!("uvm-layer{index}")
    }
}

/// The virtio-fs tag by which the agent mounts shared host directory
/// `index` (see `MountKind::Share`).
pub fn share_tag(index: u32) -> String {
    format!("uvm-share{index}")
}
