//! IOAPIC (82093AA) registers, for hypervisors with no interrupt controller
//! of their own (WHP; KVM has one in the kernel). The guest programs, in the
//! redirection table, the vector and destination of each interrupt line;
//! when a device raises a line the backend asks [`IoApic::route`] where it
//! goes and delivers it to the local APIC itself. Like KVM's irqfd, every
//! raise is delivered as one interrupt: there is no remote-IRR bookkeeping,
//! and a masked line's raise is dropped.

use crate::BusDevice;

/// Where the MP table puts it.
pub const BASE: u64 = 0xfec0_0000;
pub const WINDOW_LEN: u64 = 0x1000;
/// Interrupt lines (redirection table entries).
pub const PINS: u32 = 24;

/// Direct registers of the window: an index and a data window.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
/// Indirect registers.
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
/// Version 0x11, entries 0..=PINS-1.
const VERSION: u32 = 0x11 | ((PINS - 1) << 16);
/// Redirection entry bits.
const MASKED: u64 = 1 << 16;
const LOGICAL: u64 = 1 << 11;
const LEVEL: u64 = 1 << 15;
/// Read-only bits: delivery status and remote IRR.
const READ_ONLY: u64 = (1 << 12) | (1 << 14);

/// Where a raised line goes, as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub vector: u8,
    /// 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT.
    pub delivery_mode: u8,
    /// Logical (rather than physical) destination mode.
    pub logical: bool,
    /// Level (rather than edge) triggered.
    pub level: bool,
    pub destination: u8,
}

pub struct IoApic {
    select: u32,
    id: u32,
    table: [u64; PINS as usize],
}

impl Default for IoApic {
    fn default() -> Self {
        Self {
            select: 0,
            id: 0,
            // Every line starts masked, as after a reset.
            table: [MASKED; PINS as usize],
        }
    }
}

impl IoApic {
    /// Where line `pin` goes, unless it is masked or does not exist.
    pub fn route(&self, pin: u32) -> Option<Route> {
        let entry = *self.table.get(pin as usize)?;
        if entry & MASKED != 0 {
            return None;
        }
        Some(Route {
            vector: entry as u8,
            delivery_mode: ((entry >> 8) & 0x7) as u8,
            logical: entry & LOGICAL != 0,
            level: entry & LEVEL != 0,
            destination: (entry >> 56) as u8,
        })
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_ARBITRATION => self.id,
            reg => match self.entry_half(reg) {
                Some((pin, true)) => (self.table[pin] >> 32) as u32,
                Some((pin, false)) => self.table[pin] as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & 0x0f00_0000,
            reg => {
                let Some((pin, high)) = self.entry_half(reg) else {
                    return; // version and arbitration are read-only
                };
                let entry = &mut self.table[pin];
                let (shift, keep) = match high {
                    true => (32, 0xffff_ffff),
                    false => (0, 0xffff_ffff_0000_0000 | READ_ONLY),
                };
                let written = (u64::from(value) << shift) & !keep;
                *entry = (*entry & keep) | written;
            }
        }
    }

    /// The entry and half (high: true) an indirect register index names.
    fn entry_half(&self, reg: u32) -> Option<(usize, bool)> {
        let index = reg.checked_sub(REG_TABLE)?;
        let pin = (index / 2) as usize;
        (pin < self.table.len()).then_some((pin, index % 2 == 1))
    }
}

impl BusDevice for IoApic {
    /// Only 32-bit accesses mean anything; others read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => self.select,
            (IOWIN, 4) => self.read_register(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(value),
            _ => {} // EOI and the rest: nothing to track
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(ioapic: &mut IoApic, reg: u32, value: u32) {
        ioapic.write(IOREGSEL, &reg.to_le_bytes());
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    fn read(ioapic: &mut IoApic, reg: u32) -> u32 {
        ioapic.write(IOREGSEL, &reg.to_le_bytes());
        let mut data = [0u8; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn lines_start_masked_and_route_as_programmed() {
        let mut ioapic = IoApic::default();
        assert_eq!(ioapic.route(4), None);
        // Pin 4: vector 0x24, fixed, physical, edge, to APIC 1.
        write(&mut ioapic, REG_TABLE + 9, 1 << 24);
        write(&mut ioapic, REG_TABLE + 8, 0x24);
        let route = ioapic.route(4).unwrap();
        assert_eq!((route.vector, route.destination), (0x24, 1));
        assert!(!route.logical && !route.level && route.delivery_mode == 0);
        // Level-triggered, lowest priority, logical; then masked again.
        write(
            &mut ioapic,
            REG_TABLE + 8,
            0x31 | 1 << 8 | 1 << 11 | 1 << 15,
        );
        let route = ioapic.route(4).unwrap();
        assert!(route.logical && route.level && route.delivery_mode == 1);
        write(&mut ioapic, REG_TABLE + 8, 0x31 | 1 << 16);
        assert_eq!(ioapic.route(4), None);
        assert_eq!(ioapic.route(PINS), None, "no such line");
    }

    #[test]
    fn registers_read_back_and_read_only_bits_stay() {
        let mut ioapic = IoApic::default();
        assert_eq!(read(&mut ioapic, REG_VERSION), 0x0017_0011);
        write(&mut ioapic, REG_VERSION, 0);
        assert_eq!(read(&mut ioapic, REG_VERSION), 0x0017_0011);
        write(&mut ioapic, REG_ID, 0x0500_00ff);
        assert_eq!(read(&mut ioapic, REG_ID), 0x0500_0000);
        write(&mut ioapic, REG_TABLE + 2, 0x30 | 1 << 12 | 1 << 14);
        assert_eq!(
            read(&mut ioapic, REG_TABLE + 2),
            0x30,
            "status bits are read-only"
        );
        write(&mut ioapic, REG_TABLE + 3, 0xff00_0000);
        assert_eq!(read(&mut ioapic, REG_TABLE + 3), 0xff00_0000);
        assert_eq!(read(&mut ioapic, REG_TABLE + 2), 0x30, "halves are apart");
        assert_eq!(read(&mut ioapic, REG_TABLE + 2 * PINS), 0, "past the table");
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut ioapic = IoApic::default();
        ioapic.write(IOREGSEL, &[0x10]);
        ioapic.write(0x40, &0x24u32.to_le_bytes()); // EOI register
        let mut byte = [0xaau8; 2];
        ioapic.read(IOWIN, &mut byte);
        assert_eq!(byte, [0, 0]);
        assert_eq!(ioapic.route(0), None);
    }
}
