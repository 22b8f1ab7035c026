//! The guest console: a 16550A UART (vm-superio) at COM1.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};

use crate::{BusDevice, Interrupt};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PORT_LEN: u64 = 8;

/// Adapts our [`Interrupt`] line to vm-superio's trigger.
#[derive(Clone)]
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

type Output = Box<dyn Write + Send>;

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, Output>,
}

/// The UART's registers and unread input, as a snapshot keeps them: the
/// guest's driver remembers what it programmed (which interrupts it
/// enabled) and does not write it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot(#[serde(with = "SerialStateDef")] pub SerialState);

#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// A saved state the UART cannot hold.
#[derive(Debug, thiserror::Error)]
#[error("serial: {0} bytes of unread input, more than the FIFO holds")]
pub struct RestoreError(usize);

impl Serial {
    /// A UART whose transmitted bytes go to `out`, raising `irq`.
    pub fn new(irq: Arc<dyn Interrupt>, out: Output) -> Self {
        Self {
            uart: Uart::new(IrqTrigger(irq), out),
        }
    }

    pub fn save(&self) -> SerialSnapshot {
        SerialSnapshot(self.uart.state())
    }

    /// Takes the registers and input of `saved` (a snapshot's, so
    /// untrusted); the output and interrupt line stay this UART's.
    pub fn restore(&mut self, saved: &SerialSnapshot) -> Result<(), RestoreError> {
        let input = saved.0.in_buffer.len();
        let trigger = self.uart.interrupt_evt().clone();
        let sink: Output = Box::new(std::io::sink());
        let fresh = Uart::new(trigger.clone(), sink);
        // Checked before the UART is taken apart: it is from_state's only
        // failure.
        if input > fresh.fifo_capacity() {
            return Err(RestoreError(input));
        }
        let old = std::mem::replace(&mut self.uart, fresh);
        match Uart::from_state(&saved.0, trigger, NoEvents, old.into_writer()) {
            Ok(uart) => self.uart = uart,
            Err(e) => tracing::warn!("serial: restoring: {e:?}"),
        }
        Ok(())
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

    #[test]
    fn a_restored_uart_keeps_what_the_driver_programmed_and_its_own_output() {
        let saved_irq = Arc::new(CountingInterrupt::default());
        let mut saved = Serial::new(saved_irq, Box::new(std::io::sink()));
        saved.write(1, &[0x02]); // IER: transmitter-empty interrupt on
        saved.write(7, &[0x5a]); // scratch
        let snapshot = saved.save();
        let json = serde_json::to_string(&snapshot).unwrap();
        let snapshot: SerialSnapshot = serde_json::from_str(&json).unwrap();

        let irq = Arc::new(CountingInterrupt::default());
        let out = Shared::default();
        let mut serial = Serial::new(irq.clone(), Box::new(out.clone()));
        serial.restore(&snapshot).unwrap();
        let (mut ier, mut scratch) = ([0u8], [0u8]);
        serial.read(1, &mut ier);
        serial.read(7, &mut scratch);
        assert_eq!((ier[0], scratch[0]), (0x02, 0x5a));
        // The driver does not enable the interrupt again: it must still fire.
        serial.write(0, b"x");
        assert_eq!(&*out.0.lock().unwrap(), b"x");
        assert!(irq.count() >= 1, "no transmitter-empty interrupt");

        let mut overfull = snapshot.clone();
        overfull.0.in_buffer = vec![0; 65];
        assert!(serial.restore(&overfull).is_err());
        serial.write(0, b"y");
        assert_eq!(
            &*out.0.lock().unwrap(),
            b"xy",
            "a refused state cost the output"
        );
    }
}
