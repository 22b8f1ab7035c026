//! Guest physical memory: RAM below the 32-bit MMIO hole and above 4 GiB.

use std::io;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
    VolatileMemoryError, WriteVolatile,
};

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

/// Writes every RAM region to `out` in address order: a memory image.
pub fn save(mem: &GuestMemory, out: &mut impl WriteVolatile) -> io::Result<()> {
    for region in mem.iter() {
        let slice = region.as_volatile_slice().map_err(io::Error::other)?;
        out.write_all_volatile(&slice).map_err(io_error)?;
    }
    Ok(())
}

/// Fills every RAM region from `image`, as [`save`] wrote it; an image
/// shorter than the RAM is an error.
pub fn load(mem: &GuestMemory, image: &mut impl ReadVolatile) -> io::Result<()> {
    for region in mem.iter() {
        let mut slice = region.as_volatile_slice().map_err(io::Error::other)?;
        image.read_exact_volatile(&mut slice).map_err(io_error)?;
    }
    Ok(())
}

fn io_error(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        e => io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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

    #[test]
    fn an_image_restores_every_region_and_a_short_one_is_refused() {
        // Two regions, as RAM past the MMIO hole has.
        let ranges = [
            (GuestAddress(0), 1 << 16),
            (GuestAddress(FOUR_GIB), 1 << 16),
        ];
        let memory = || GuestMemory::from_ranges(&ranges).unwrap();
        let saved = memory();
        saved.write_obj(0x5a5a_u16, GuestAddress(0x1000)).unwrap();
        saved
            .write_obj(0xa5a5_u16, GuestAddress(FOUR_GIB + 0x2000))
            .unwrap();
        let mut image = Vec::new();
        save(&saved, &mut image).unwrap();
        assert_eq!(image.len(), 2 << 16);

        let restored = memory();
        load(&restored, &mut image.as_slice()).unwrap();
        let low: u16 = restored.read_obj(GuestAddress(0x1000)).unwrap();
        let high: u16 = restored.read_obj(GuestAddress(FOUR_GIB + 0x2000)).unwrap();
        assert_eq!((low, high), (0x5a5a, 0xa5a5));

        let short = &image[..image.len() - 1];
        let e = load(&memory(), &mut &short[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
