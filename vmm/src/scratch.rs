//! The writable scratch layer: a raw ext4 image that virtio-blk serves as
//! the upper layer of the container's overlay. A missing file is created
//! sparse and formatted, the way LCOW makes a fresh sandbox.vhdx.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// The default size of a new scratch image.
pub const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
#[error("scratch {}: {reason}", path.display())]
pub struct Error {
    path: PathBuf,
    reason: String,
}

/// Opens the scratch image at `path` for reading and writing; creates a
/// sparse, ext4-formatted one of `size` bytes if there is none.
pub fn open_or_create(path: &Path, size: u64) -> Result<File, Error> {
    let fail = |reason: String| Error {
        path: path.to_owned(),
        reason,
    };
    if !path.exists() {
        create(path, size).map_err(fail)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() < 1 << 20 {
        return Err(fail(format!(
            "{} bytes is too small for a disk",
            meta.len()
        )));
    }
    // One VM at a time writes a scratch disk: two would corrupt its ext4.
    // The lock lasts as long as the file is open (the VM's life).
    if let Err(e) = file.try_lock() {
        return Err(fail(match e {
            std::fs::TryLockError::WouldBlock => match holder(&meta) {
                Some(pid) => format!("in use by another VM (uvm process {pid})"),
                None => "in use by another VM".into(),
            },
            std::fs::TryLockError::Error(e) => format!("locking it: {e}"),
        }));
    }
    Ok(file)
}

/// The process holding the lock on the file of `meta`, as /proc/locks says.
#[cfg(target_os = "linux")]
fn holder(meta: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    // `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`: pid, then
    // major:minor:inode.
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let inode = fields.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (inode == meta.ino()).then(|| fields.get(4)?.parse().ok())?
    })
}

#[cfg(not(target_os = "linux"))]
fn holder(_: &std::fs::Metadata) -> Option<u32> {
    None
}

fn create(path: &Path, size: u64) -> Result<(), String> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let made = file
        .set_len(size)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let out = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-L", "uvm-scratch"])
                .arg(path)
                .output()
                .map_err(|e| format!("running mkfs.ext4 (e2fsprogs): {e}"))?;
            match out.status.success() {
                true => Ok(()),
                false => Err(format!(
                    "mkfs.ext4 failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            }
        });
    if made.is_err() {
        let _ = std::fs::remove_file(path); // leave nothing half-made behind
    }
    made
}

/// Copies the scratch image `from` to a new file `to` (created private),
/// holes and all: a copy takes the disk space of what the guest wrote.
#[cfg(target_os = "linux")]
pub fn copy(from: &Path, to: &Path) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let source = File::open(from).map_err(|e| Error {
        path: from.to_owned(),
        reason: e.to_string(),
    })?;
    let fail = |reason: String| Error {
        path: to.to_owned(),
        reason,
    };
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| fail(e.to_string()))?;
    let copied = source
        .metadata()
        .and_then(|meta| target.set_len(meta.len()))
        .and_then(|()| copy_data(&source, &target));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(to);
        return Err(fail(format!("copying {}: {e}", from.display())));
    }
    Ok(())
}

/// Copies each run of data `source` has (between its holes) to the same
/// place in `target`.
#[cfg(target_os = "linux")]
fn copy_data(source: &File, target: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seek = |offset: i64, whence| {
        // SAFETY: plain system call on a descriptor we own.
        let at = unsafe { libc::lseek(source.as_raw_fd(), offset, whence) };
        match at {
            -1 => match std::io::Error::last_os_error() {
                // No data after `offset`.
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
            at => Ok(Some(at)),
        }
    };
    let mut at = 0;
    while let Some(data) = seek(at, libc::SEEK_DATA)? {
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(data);
        let (mut from, mut to) = (data, data);
        while from < end {
            // SAFETY: both descriptors are open; the offsets are valid
            // storage the kernel updates.
            let n = unsafe {
                libc::copy_file_range(
                    source.as_raw_fd(),
                    &mut from,
                    target.as_raw_fd(),
                    &mut to,
                    (end - from) as usize,
                    0,
                )
            };
            match n {
                -1 => return Err(std::io::Error::last_os_error()),
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => {}
            }
        }
        at = end;
    }
    target.sync_all()
}

/// Parses a size such as `1G`, `512M`, `65536K` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        Some(b'T' | b't') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n >= 16 << 20)
        .ok_or_else(|| format!("expected a size of at least 16M such as 512M or 1G, got `{text}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("33554432"), Ok(32 << 20));
        for bad in ["", "G", "1X", "-1G", "1M", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_scratch_image_serves_one_vm_at_a_time() {
        let dir = std::env::temp_dir().join(format!("uvm-scratch-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scratch.img");
        std::fs::write(&path, vec![0u8; 2 << 20]).unwrap();
        let first = open_or_create(&path, 0).unwrap();
        let err = open_or_create(&path, 0).unwrap_err().to_string();
        let holder = format!("in use by another VM (uvm process {})", std::process::id());
        assert!(
            err.contains(&holder) && err.contains("scratch.img"),
            "{err}"
        );
        drop(first);
        open_or_create(&path, 0).expect("free again once the first VM is gone");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn creates_a_sparse_formatted_image_once() {
        let dir = std::env::temp_dir().join(format!("uvm-scratch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scratch.img");
        let file = open_or_create(&path, 64 << 20).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);
        let magic = std::fs::read(&path).unwrap()[1024 + 56..1024 + 58].to_vec();
        assert_eq!(magic, [0x53, 0xef], "formatted ext4");
        drop(file);
        std::fs::write(&path, vec![1u8; 2 << 20]).unwrap();
        open_or_create(&path, 64 << 20).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            2 << 20,
            "kept, not recreated"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_copy_keeps_data_and_holes_and_never_overwrites() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = std::env::temp_dir().join(format!("uvm-scratch-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (from, to) = (dir.join("from.img"), dir.join("to.img"));
        let file = File::create(&from).unwrap();
        file.set_len(256 << 20).unwrap();
        file.write_all_at(b"start", 0).unwrap();
        file.write_all_at(b"middle", 100 << 20).unwrap();
        file.write_all_at(b"end", (256 << 20) - 3).unwrap();
        copy(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let used = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(used < 1 << 20, "the holes stay holes: {used} bytes used");
        let err = copy(&from, &to).unwrap_err().to_string();
        assert!(err.contains("to.img") && err.contains("exists"), "{err}");
        let err = copy(&dir.join("none.img"), &dir.join("new.img")).unwrap_err();
        assert!(err.to_string().contains("none.img"), "{err}");
        assert!(!dir.join("new.img").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unusable_paths_are_refused_and_nothing_is_left() {
        let err = open_or_create(Path::new("/proc/uvm-scratch.img"), 64 << 20).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("scratch /proc/uvm-scratch.img: "));
        assert!(!Path::new("/proc/uvm-scratch.img").exists());
        let dir_err = open_or_create(&std::env::temp_dir(), 64 << 20).unwrap_err();
        assert!(dir_err.to_string().contains("scratch"));
    }
}
