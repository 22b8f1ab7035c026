//! The guest console: a 16550A UART (vm-superio) at COM1.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{Serial as Uart, Trigger};

use crate::{BusDevice, Interrupt};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PORT_LEN: u64 = 8;

/// Adapts our [`Interrupt`] line to vm-superio's trigger.
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

pub struct Serial {
    uart: Uart<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART whose transmitted bytes go to `out`, raising `irq`.
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Uart::new(IrqTrigger(irq), out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A failed host write or interrupt loses console output, not the VM.
            if let Err(e) = self.uart.write(offset, *byte) {
                tracing::debug!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CountingInterrupt;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_thre_interrupt() {
        let irq = Arc::new(CountingInterrupt::default());
        let out = Shared::default();
        let mut serial = Serial::new(irq.clone(), Box::new(out.clone()));
        serial.write(1, &[0x02]); // IER: transmitter-empty interrupt on
        let mut iir = [0u8];
        serial.write(0, b"o");
        serial.read(2, &mut iir); // the guest acknowledges by reading IIR
        serial.write(0, b"k");
        assert_eq!(&*out.0.lock().unwrap(), b"ok");
        assert!(irq.count() >= 2);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        serial.write(0, b"ab"); // wider than a byte: ignored
        assert_eq!(&*out.0.lock().unwrap(), b"ok");
    }
}
