//! Guest physical memory: RAM below the 32-bit MMIO hole and above 4 GiB.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Devices (virtio-mmio, IOAPIC, LAPIC) live in [MMIO_START, 4 GiB).
pub const MMIO_START: u64 = 0xc000_0000;
const FOUR_GIB: u64 = 1 << 32;

pub type GuestMemory = GuestMemoryMmap<()>;

/// RAM ranges for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(FOUR_GIB), (size - low) as usize));
    }
    ranges
}

/// Anonymous, lazily-backed guest RAM of `size` bytes.
pub fn create(size: u64) -> std::io::Result<GuestMemory> {
    GuestMemory::from_ranges(&ram_ranges(size)).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_around_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (GuestAddress(0), 3 << 30),
                (GuestAddress(FOUR_GIB), 1 << 30)
            ]
        );
    }
}
