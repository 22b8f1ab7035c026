//! The part of the i8042 keyboard controller a guest uses to reset the
//! machine: `reboot=k` makes Linux write 0xFE (pulse reset line) to port 0x64.

use crate::BusDevice;

/// Port base of the controller: data at +0 (0x60), command/status at +4 (0x64).
pub const PORT_BASE: u64 = 0x60;
pub const PORT_LEN: u64 = 5;

const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    /// `on_reset` runs when the guest asks for a CPU reset.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the guest's
        // keyboard-controller polling loops finish at once.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_on_port_64_only() {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let mut dev = I8042::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
