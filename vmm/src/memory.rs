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

/// Where device memory (pmem layers) starts for a guest with `size` bytes
/// of RAM: above 4 GiB, after the RAM that lives there.
pub fn device_memory_start(size: u64) -> u64 {
    let high_ram = size.saturating_sub(MMIO_START);
    (FOUR_GIB + high_ram).next_multiple_of(devices::virtio::pmem::ALIGNMENT)
}

/// Anonymous, lazily-backed guest RAM of `size` bytes.
pub fn create(size: u64) -> std::io::Result<GuestMemory> {
    GuestMemory::from_ranges(&ram_ranges(size)).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_memory_follows_ram() {
        assert_eq!(device_memory_start(128 << 20), FOUR_GIB);
        assert_eq!(device_memory_start(4 << 30), FOUR_GIB + (1 << 30));
        assert_eq!(device_memory_start((3 << 30) + 1), FOUR_GIB + (2 << 20));
    }

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
