//! What the uvm host and the guest agent share.

pub mod protocol;
pub mod vsock;

/// Boot marks: the agent writes a mark byte to the VMM's boot-timer port at
/// each milestone, and the VMM stamps it with host time.
pub mod boot_mark {
    /// I/O port of the boot timer (unused by any PC device).
    pub const PORT: u16 = 0x440;
    /// The agent (PID 1) has started.
    pub const AGENT_STARTED: u8 = 1;
}
