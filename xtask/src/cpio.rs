//! Newc cpio archives for the initrd, written here so that the build needs
//! no cpio tool: the agent as /init plus the few nodes the kernel and agent
//! need before devtmpfs is mounted.

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

struct Entry<'a> {
    name: &'a str,
    mode: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

/// An archive being written; entries go in the order added.
pub struct Archive {
    out: Vec<u8>,
    next_ino: u32,
}

impl Archive {
    /// The base every initrd has: /dev/console for init's stdio, mount
    /// points, and `agent` as /init.
    pub fn initrd(agent: &[u8]) -> Self {
        let mut archive = Self::with_console();
        archive.file("init", agent);
        archive
    }

    /// /dev/console for init's stdio before devtmpfs, and the /proc and
    /// /sys mount points.
    pub fn with_console() -> Self {
        let mut archive = Self {
            out: Vec::new(),
            next_ino: 1,
        };
        archive.dir("dev");
        archive.add(&Entry {
            name: "dev/console",
            mode: S_IFCHR | 0o600,
            rdev: (5, 1),
            data: &[],
        });
        archive.dir("proc");
        archive.dir("sys");
        archive
    }

    pub fn dir(&mut self, name: &str) {
        self.add(&Entry {
            name,
            mode: S_IFDIR | 0o755,
            rdev: (0, 0),
            data: &[],
        });
    }

    /// An executable file.
    pub fn file(&mut self, name: &str, data: &[u8]) {
        self.add(&Entry {
            name,
            mode: S_IFREG | 0o755,
            rdev: (0, 0),
            data,
        });
    }

    fn add(&mut self, entry: &Entry) {
        write_entry(&mut self.out, self.next_ino, entry);
        self.next_ino += 1;
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        let trailer = Entry {
            name: "TRAILER!!!",
            mode: 0,
            rdev: (0, 0),
            data: &[],
        };
        write_entry(&mut self.out, 0, &trailer);
        self.out
    }
}

fn write_entry(out: &mut Vec<u8>, ino: u32, e: &Entry) {
    let nlink = if e.mode & S_IFDIR != 0 { 2 } else { 1 };
    let fields = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, so the archive is reproducible
        e.data.len() as u32,
        0, // dev major
        0, // dev minor
        e.rdev.0,
        e.rdev.1,
        e.name.len() as u32 + 1,
        0, // checksum
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(e.data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_aligned_newc_with_trailer() {
        let archive = Archive::initrd(b"ELF!x").finish();
        assert!(archive.starts_with(b"070701"));
        assert_eq!(archive.len() % 4, 0);
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("dev/console\0"));
        // Header (110 bytes) + "init\0" is padded to 116: data follows one NUL.
        assert!(text.contains("init\0\0ELF!x"));
        assert!(text.contains("TRAILER!!!\0"));
        // 5 entries + trailer, each starting with the magic.
        assert_eq!(text.matches("070701").count(), 6);
    }
}
