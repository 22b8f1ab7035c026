//! Guest physical memory: RAM below the 32-bit MMIO hole and above 4 GiB.

#[cfg(unix)]
use std::io;

use vm_memory::{GuestAddress, GuestMemoryMmap};
#[cfg(unix)]
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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

/// Writes every RAM region to `out` in address order, a memory image of
/// `size` bytes: pages of zeros are left as holes, so the file takes the
/// disk (and, mapped, the page cache) of what the guest touched.
#[cfg(unix)]
pub fn save(mem: &GuestMemory, out: &std::fs::File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut page = [0u8; PAGE];
    let mut offset = 0u64;
    for region in mem.iter() {
        let slice = region.as_volatile_slice().map_err(io::Error::other)?;
        for at in (0..slice.len()).step_by(PAGE) {
            let len = PAGE.min(slice.len() - at);
            let read = slice.subslice(at, len).map_err(io::Error::other)?;
            read.copy_to(&mut page[..len]);
            // A slice comparison is a memcmp, fast in debug builds too.
            if page[..len] != ZEROS[..len] {
                out.write_all_at(&page[..len], offset + at as u64)?;
            }
        }
        offset += slice.len() as u64;
    }
    out.set_len(offset)
}

#[cfg(unix)]
const PAGE: usize = 4096;
#[cfg(unix)]
const ZEROS: [u8; PAGE] = [0; PAGE];

/// Guest RAM of `size` bytes backed by a memory image ([`save`]) mapped
/// copy-on-write: VMs mapping one image share its pages in the page cache
/// and each copies only what its guest writes. An image of another size is
/// refused.
#[cfg(unix)]
pub fn map_private(image: std::fs::File, size: u64) -> io::Result<GuestMemory> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let len = image.metadata()?.len();
    if len != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{len} bytes for {size} bytes of guest memory"),
        ));
    }
    let image = std::sync::Arc::new(image);
    let mut offset = 0;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(image.clone(), offset))
            .build()
            .map_err(io::Error::other)?;
        let region = GuestRegionMmap::new(mapping, start)
            .ok_or_else(|| io::Error::other("guest memory region overflows"))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemory::from_regions(regions).map_err(io::Error::other)
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
    fn an_image_maps_back_copy_on_write_and_a_short_one_is_refused() {
        let size = 1 << 20;
        let saved = create(size).unwrap();
        saved.write_obj(0x5a5a_u16, GuestAddress(0x1000)).unwrap();
        saved.write_obj(0xa5a5_u16, GuestAddress(0xf_2000)).unwrap();
        let dir = std::env::temp_dir().join(format!("uvm-memory-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let file = std::fs::File::create(&path).unwrap();
        save(&saved, &file).unwrap();
        drop(saved);
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), size);
        assert!(meta.blocks() * 512 < 64 << 10, "zero pages are holes");

        let open = || std::fs::File::open(&path).unwrap();
        let restored = map_private(open(), size).unwrap();
        let low: u16 = restored.read_obj(GuestAddress(0x1000)).unwrap();
        let high: u16 = restored.read_obj(GuestAddress(0xf_2000)).unwrap();
        assert_eq!((low, high), (0x5a5a, 0xa5a5));
        // A guest's write stays its own.
        restored
            .write_obj(0x1111_u16, GuestAddress(0x1000))
            .unwrap();
        let again = map_private(open(), size).unwrap();
        assert_eq!(again.read_obj::<u16>(GuestAddress(0x1000)).unwrap(), 0x5a5a);

        let e = map_private(open(), size + 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
