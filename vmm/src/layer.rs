//! Container image layers: ext4 image files mapped read-only into guest
//! physical memory, one virtio-pmem device each. The mapping is shared, so
//! VMs using the same layer share its host page cache.

use std::fs::File;
use std::io::Read;
#[cfg(unix)]
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use devices::virtio::pmem::ALIGNMENT;

/// Where ext2/3/4 keep their superblock magic.
const EXT_MAGIC_OFFSET: usize = 1024 + 56;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];

#[derive(Debug, thiserror::Error)]
#[error("layer {}: {reason}", path.display())]
pub struct Error {
    path: PathBuf,
    reason: String,
}

/// One layer file, mapped read-only and padded with zeros to the pmem
/// alignment (the file itself is never written).
pub struct Layer {
    ptr: *mut u8,
    len: u64,
}

// SAFETY: the mapping is read-only and lives as long as the `Layer`;
// sharing its address between threads is harmless.
unsafe impl Send for Layer {}
unsafe impl Sync for Layer {}

impl Layer {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let fail = |reason: String| Error {
            path: path.to_owned(),
            reason,
        };
        let mut file = File::open(path).map_err(|e| fail(e.to_string()))?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        if !meta.is_file() {
            return Err(fail("not a regular file".into()));
        }
        let mut head = [0u8; EXT_MAGIC_OFFSET + 2];
        match file.read_exact(&mut head) {
            Ok(()) if head[EXT_MAGIC_OFFSET..] == EXT_MAGIC => {}
            Ok(()) => return Err(fail("not an ext4 image (no ext2/3/4 superblock)".into())),
            Err(_) if meta.len() == 0 => return Err(fail("empty file".into())),
            Err(_) => return Err(fail("too short to be an ext4 image".into())),
        }
        let len = meta.len().next_multiple_of(ALIGNMENT);
        let ptr = map(&file, meta.len(), len).map_err(|e| fail(format!("mapping it: {e}")))?;
        Ok(Self { ptr, len })
    }

    pub fn host_addr(&self) -> *mut u8 {
        self.ptr
    }

    /// The file size rounded up to the pmem alignment.
    pub fn mapped_len(&self) -> u64 {
        self.len
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        // SAFETY: `map` made this mapping of `len` bytes; the VM that used
        // it is gone (it is dropped before its layers).
        unsafe { unmap(self.ptr, self.len) };
    }
}

/// Maps `file_len` bytes of `file` read-only and shared, followed by
/// read-only zero pages up to `len`; [`unmap`] undoes it.
#[cfg(unix)]
fn map(file: &File, file_len: u64, len: u64) -> std::io::Result<*mut u8> {
    let prot = libc::PROT_READ;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous reservation; the kernel picks the address.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, prot, anon, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let shared = libc::MAP_SHARED | libc::MAP_FIXED;
    // SAFETY: replaces the start of the reservation made above, which we
    // own, with the file; `file_len <= len`.
    let at = unsafe { libc::mmap(base, file_len as usize, prot, shared, file.as_raw_fd(), 0) };
    if at == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: unmapping the reservation made above.
        unsafe { libc::munmap(base, len as usize) };
        return Err(e);
    }
    Ok(base.cast())
}

/// # Safety
/// `ptr` and `len` are a mapping `map` returned, which nothing uses any more.
#[cfg(unix)]
unsafe fn unmap(ptr: *mut u8, len: u64) {
    // SAFETY: as the caller promises.
    unsafe { libc::munmap(ptr.cast(), len as usize) };
}

/// Page-aligned memory for a layer copy (`len` is a multiple of the pmem
/// alignment, so never zero).
#[cfg(not(unix))]
fn copy_layout(len: u64) -> std::io::Result<std::alloc::Layout> {
    std::alloc::Layout::from_size_align(len as usize, 4096).map_err(std::io::Error::other)
}

/// Without a read-only file mapping (the `windows` features uvm builds with
/// have none) the layer is copied into memory of its own: the same guest
/// view, but not shared between VMs.
#[cfg(not(unix))]
fn map(mut file: &File, file_len: u64, len: u64) -> std::io::Result<*mut u8> {
    use std::io::{Seek, SeekFrom};
    let layout = copy_layout(len)?;
    // SAFETY: `layout` has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(std::io::ErrorKind::OutOfMemory.into());
    }
    // SAFETY: the allocation is `len` bytes, fresh and ours alone.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
    let read = file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut bytes[..file_len as usize]));
    if let Err(e) = read {
        // SAFETY: allocated above with this layout, not handed out.
        unsafe { std::alloc::dealloc(ptr, layout) };
        return Err(e);
    }
    Ok(ptr)
}

/// # Safety
/// `ptr` and `len` are a copy `map` returned, which nothing uses any more.
#[cfg(not(unix))]
unsafe fn unmap(ptr: *mut u8, len: u64) {
    let layout = copy_layout(len).expect("the layout `map` allocated with");
    // SAFETY: as the caller promises; same layout as the allocation.
    unsafe { std::alloc::dealloc(ptr, layout) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uvm-layer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn error(path: &Path) -> String {
        Layer::open(path).err().expect("refused").to_string()
    }

    #[test]
    fn bad_layers_are_refused_naming_file_and_reason() {
        let missing = Path::new("/nonexistent/layer.img");
        assert!(error(missing).starts_with("layer /nonexistent/layer.img: "));
        let empty = temp("empty.img", b"");
        assert!(error(&empty).ends_with("empty file"));
        let text = temp("text.img", &[b'x'; 4096]);
        assert!(error(&text).contains("not an ext4 image"));
        let short = temp("short.img", b"tiny");
        assert!(error(&short).contains("too short"));
        assert!(error(&std::env::temp_dir()).contains("not a regular file"));
    }

    #[test]
    fn maps_the_file_padded_with_zeros() {
        let mut image = vec![0u8; 3000];
        image[EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2].copy_from_slice(&EXT_MAGIC);
        image[2999] = 7;
        let layer = Layer::open(&temp("tiny.img", &image)).unwrap();
        assert_eq!(layer.mapped_len(), ALIGNMENT);
        // SAFETY: the mapping is `len` bytes long and readable.
        let mapped =
            unsafe { std::slice::from_raw_parts(layer.host_addr(), layer.mapped_len() as usize) };
        assert_eq!(&mapped[..3000], &image[..]);
        assert!(mapped[3000..].iter().all(|&b| b == 0));
    }
}
