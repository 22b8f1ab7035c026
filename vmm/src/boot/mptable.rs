//! Intel MultiProcessor table (MP spec 1.4): tells the guest how many CPUs it
//! has and how ISA interrupts reach the IOAPIC, without ACPI.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// Where the table goes: the start of the EBDA, a place Linux scans.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The IOAPIC: KVM's in-kernel one, or `devices::ioapic` (WHP).
const IOAPIC_ADDR: u32 = devices::ioapic::BASE as u32;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_PINS: u8 = devices::ioapic::PINS as u8;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

// Entry types and interrupt types (MP spec, 4.3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_FEATURES_FPU_APIC: u32 = 0x201;
const CPU_SIGNATURE: u32 = 0x600;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the MP table: {0}")]
pub struct Error(#[from] vm_memory::GuestMemoryError);

/// Bytes of the floating pointer and the configuration table for `cpus` CPUs.
pub fn build(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend([MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES_FPU_APIC.to_le_bytes());
        entries.extend([0; 8]);
    }
    entries.extend([MP_BUS, 0]);
    entries.extend(*b"ISA   ");
    entries.extend([MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        entries.extend([MP_INTSRC, MP_IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    entries.extend([MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = cpus as u16 + 2 + u16::from(IOAPIC_PINS) + 2;

    const HEADER_LEN: usize = 44;
    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend(*b"PCMP");
    table.extend(((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.extend([4, 0]); // spec revision 1.4, checksum (below)
    table.extend(*b"UVM     ");
    table.extend(*b"UVM         ");
    table.extend([0; 6]); // OEM table pointer and size
    table.extend(entry_count.to_le_bytes());
    table.extend(LAPIC_ADDR.to_le_bytes());
    table.extend([0; 4]); // extended table length, checksum, reserved
    table.extend(entries);
    table[7] = checksum(&table);

    const FLOATING_LEN: u64 = 16;
    let mut floating = Vec::with_capacity(16);
    floating.extend(*b"_MP_");
    floating.extend(((MPTABLE_START + FLOATING_LEN) as u32).to_le_bytes());
    floating.extend([1, 4, 0, 0, 0, 0, 0, 0]); // length/16, revision, checksum, features
    floating[10] = checksum(&floating);
    floating.extend(table);
    floating
}

pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), Error> {
    Ok(mem.write_slice(&build(cpus), GuestAddress(MPTABLE_START))?)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn floating_pointer_and_table_are_consistent() {
        for cpus in [1, 2, 64] {
            let bytes = build(cpus);
            assert_eq!(&bytes[0..4], b"_MP_");
            assert!(sums_to_zero(&bytes[..16]));
            let table_at = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
            let table = &bytes[(table_at - MPTABLE_START) as usize..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert!(sums_to_zero(table));
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 28);
            assert_eq!(len, 44 + cpus as usize * 20 + 27 * 8 + 8);
        }
    }

    #[test]
    fn fits_below_high_memory() {
        assert!(MPTABLE_START + build(64).len() as u64 <= super::super::HIMEM_START);
    }
}
