//! Layer conversion: an OCI layer (a tar, possibly gzip or zstd compressed)
//! into the read-only ext4 image uvm maps as a pmem device.
//!
//! Only file content goes through the host file system: the tar's regular
//! files, directories, symlinks and hard links are unpacked as the caller
//! into a staging directory and `mkfs.ext4 -d` copies them into the image
//! (4 KiB blocks for DAX, holes kept). Everything else the tar says —
//! modes, owners, times, xattrs, device nodes, FIFOs, whiteouts and opaque
//! directories — is applied to the image itself by a debugfs script, so
//! an unprivileged user converts a layer exactly as root does.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::archive::inside;
use crate::{io, Error, Result};

const BLOCK: usize = 4096;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;
const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";

/// A decompressing reader for a layer blob: gzip and zstd are recognised
/// by their magic numbers, anything else is read as a plain tar.
pub fn decompress<'a, R: BufRead + 'a>(mut blob: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = blob.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(blob))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(blob)?)
    } else {
        Box::new(blob)
    })
}

/// Makes the layer image `out` from the (possibly compressed) tar file
/// `tar`, staging content under `work`. Returns the image size.
pub fn from_tar_file(tar: &Path, work: &Path, out: &Path) -> Result<u64> {
    let file = File::open(tar).map_err(io(tar.display()))?;
    let layer = decompress(BufReader::new(file)).map_err(io(tar.display()))?;
    from_tar(layer, &tar.display().to_string(), work, out)
}

/// Makes the layer image `out` from the uncompressed tar stream `layer`
/// (named `what` in errors), staging content under `work`, which must not
/// exist and is removed again. Returns the image size.
pub fn from_tar(layer: impl Read, what: &str, work: &Path, out: &Path) -> Result<u64> {
    let mut stack = Stack::new(work)?;
    stack.add(layer, what)?;
    stack.build(out)
}

/// Layers merged into one image as overlayfs would stack them, bottom
/// first: an upper layer's whiteouts and opaque directories remove what
/// the layers below it put there. Content is staged under `work`, which
/// goes with the value.
pub struct Stack {
    tree: Tree,
    work: PathBuf,
}

impl Stack {
    /// `work` must not exist.
    pub fn new(work: &Path) -> Result<Self> {
        std::fs::create_dir(work).map_err(io(work.display()))?;
        let stack = Self {
            tree: Tree::empty(work.join("root")),
            work: work.to_owned(),
        };
        std::fs::create_dir(&stack.tree.root).map_err(io(stack.tree.root.display()))?;
        Ok(stack)
    }

    /// The next layer up, an uncompressed tar stream named `what` in errors.
    pub fn add(&mut self, layer: impl Read, what: &str) -> Result<()> {
        self.tree.unpack(layer, what)?;
        self.tree.layer += 1;
        Ok(())
    }

    /// Writes the image; returns its size.
    pub fn build(self, out: &Path) -> Result<u64> {
        self.tree.build(&self.work, out).inspect_err(|_| {
            let _ = std::fs::remove_file(out);
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Makes a layer image from a directory as it is (owners, modes and
/// overlayfs whiteouts included, so unprivileged users keep their own).
pub fn from_dir(dir: &Path, out: &Path) -> Result<u64> {
    let (content, entries) = tree_size(dir).map_err(io(dir.display()))?;
    mkfs(dir, out, content, entries)
}

/// What the tar says about a path, applied to the image after mkfs.
struct Meta {
    /// The layer of the stack it came from.
    layer: usize,
    /// A hard link: its inode's metadata is its target's.
    link: bool,
    /// File type and permission bits.
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

/// Inodes mkfs cannot copy from the staging directory.
enum Node {
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    /// Overlayfs's whiteout: a 0:0 character device hiding a lower file.
    Whiteout,
}

/// The layer being unpacked: content under `root`, the rest recorded.
struct Tree {
    root: PathBuf,
    meta: BTreeMap<PathBuf, Meta>,
    nodes: BTreeMap<PathBuf, Node>,
    xattrs: BTreeMap<PathBuf, Vec<(String, Vec<u8>)>>,
    opaque: BTreeSet<PathBuf>,
    /// Bytes of content blocks and entries, to size the image.
    content: u64,
    entries: u64,
    /// The layer being unpacked, counted from the bottom of the stack.
    layer: usize,
    buf: Vec<u8>,
}

impl Tree {
    fn empty(root: PathBuf) -> Self {
        let mut meta = BTreeMap::new();
        meta.insert(PathBuf::new(), dir_meta(0));
        Self {
            root,
            meta,
            nodes: BTreeMap::new(),
            xattrs: BTreeMap::new(),
            opaque: BTreeSet::new(),
            content: 0,
            entries: 0,
            layer: 0,
            buf: vec![0; 16 * BLOCK],
        }
    }

    fn unpack(&mut self, layer: impl Read, what: &str) -> Result<()> {
        let bad = |reason: String| Error::bad(what, reason);
        let mut archive = tar::Archive::new(layer);
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("not a tar: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("reading the tar: {e}")))?;
            let name = entry
                .path()
                .map_err(|e| bad(format!("an entry's name: {e}")))?
                .into_owned();
            self.add(&mut entry, &name)
                .map_err(|reason| bad(format!("{}: {reason}", name.display())))?;
        }
        // The rest of the stream (the tar's end padding) counts for the
        // layer's digest too.
        io::copy(&mut archive.into_inner(), &mut io::sink())
            .map_err(|e| bad(format!("reading the tar: {e}")))?;
        Ok(())
    }

    fn add<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        name: &Path,
    ) -> std::result::Result<(), String> {
        let rel = inside(name).ok_or("escapes the layer (absolute or through ..)")?;
        check_name(&rel)?;
        self.entries += 1;
        let file_name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        self.make_parents(&parent)?;
        // The bottom layer of a stack keeps its whiteouts for the layers
        // below it in the VM; an upper one applies them to the stack.
        let bottom = self.layer == 0;
        match file_name.as_deref() {
            Some(OPAQUE) if bottom => {
                self.opaque.insert(parent);
                return Ok(());
            }
            Some(OPAQUE) => return self.remove_older(&parent).map_err(|e| e.to_string()),
            Some(n) if n.starts_with(WHITEOUT) => {
                let hidden = parent.join(&n[WHITEOUT.len()..]);
                self.clear(&hidden).map_err(|e| e.to_string())?;
                if bottom {
                    self.nodes.insert(hidden, Node::Whiteout);
                }
                return Ok(());
            }
            _ => {}
        }
        let header = entry.header().clone();
        let kind = header.entry_type();
        let xattrs = pax_xattrs(entry)?;
        let staged = self.root.join(&rel);
        let device = || -> std::result::Result<(u32, u32), String> {
            let major = header
                .device_major()
                .map_err(|e| e.to_string())?
                .unwrap_or(0);
            let minor = header
                .device_minor()
                .map_err(|e| e.to_string())?
                .unwrap_or(0);
            Ok((major, minor))
        };
        let io_err = |e: io::Error| e.to_string();
        let file_type = match kind {
            tar::EntryType::Directory => {
                if !std::fs::symlink_metadata(&staged).is_ok_and(|m| m.is_dir()) {
                    self.clear(&rel).map_err(io_err)?;
                    std::fs::create_dir(&staged).map_err(io_err)?;
                }
                S_IFDIR
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.clear(&rel).map_err(io_err)?;
                self.write_file(entry, &staged).map_err(io_err)?;
                S_IFREG
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io_err)?
                    .ok_or("a symlink without a target")?;
                self.clear(&rel).map_err(io_err)?;
                std::os::unix::fs::symlink(&target, &staged).map_err(io_err)?;
                S_IFLNK
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(io_err)?
                    .ok_or("a hard link without a target")?;
                let target = inside(&target).ok_or("a hard link escaping the layer")?;
                let source = self.root.join(&target);
                if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    return Err(format!(
                        "a hard link to {}, which is no file above it",
                        target.display()
                    ));
                }
                self.clear(&rel).map_err(io_err)?;
                std::fs::hard_link(&source, &staged).map_err(io_err)?;
                S_IFREG
            }
            tar::EntryType::Char => {
                let (major, minor) = device()?;
                self.clear(&rel).map_err(io_err)?;
                self.nodes.insert(rel.clone(), Node::Char(major, minor));
                S_IFCHR
            }
            tar::EntryType::Block => {
                let (major, minor) = device()?;
                self.clear(&rel).map_err(io_err)?;
                self.nodes.insert(rel.clone(), Node::Block(major, minor));
                S_IFBLK
            }
            tar::EntryType::Fifo => {
                self.clear(&rel).map_err(io_err)?;
                self.nodes.insert(rel.clone(), Node::Fifo);
                S_IFIFO
            }
            tar::EntryType::XGlobalHeader => return Ok(()),
            other => return Err(format!("entry type {other:?} has no place in a layer")),
        };
        let field = |v: io::Result<u64>| v.map_err(|e| e.to_string());
        let perms = field(header.mode().map(u64::from))? as u32 & 0o7777;
        let meta = Meta {
            layer: self.layer,
            link: kind == tar::EntryType::Link,
            mode: file_type | perms,
            uid: field(header.uid())?,
            gid: field(header.gid())?,
            mtime: field(header.mtime())?,
        };
        self.meta.insert(rel.clone(), meta);
        if !xattrs.is_empty() {
            self.xattrs.insert(rel, xattrs);
        }
        Ok(())
    }

    /// Makes the directories above an entry that the tar did not list
    /// (root-owned 0755, as docker does), refusing to go through anything
    /// but a directory: an entry never lands outside the layer through a
    /// symlink, and a symlink loop is never followed.
    fn make_parents(&mut self, parent: &Path) -> std::result::Result<(), String> {
        let mut at = PathBuf::new();
        for part in parent.components() {
            at.push(part);
            let staged = self.root.join(&at);
            match std::fs::symlink_metadata(&staged) {
                Ok(m) if m.is_dir() => continue,
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!("goes through {}, a symlink", at.display()))
                }
                Ok(_) => {
                    return Err(format!(
                        "goes through {}, which is not a directory",
                        at.display()
                    ))
                }
                Err(_) if self.nodes.contains_key(&at) => {
                    return Err(format!(
                        "goes through {}, which is not a directory",
                        at.display()
                    ))
                }
                Err(_) => {
                    std::fs::create_dir(&staged).map_err(|e| e.to_string())?;
                    let layer = self.layer;
                    self.meta
                        .entry(at.clone())
                        .or_insert_with(|| dir_meta(layer));
                    self.entries += 1;
                }
            }
        }
        Ok(())
    }

    /// An opaque directory in an upper layer: what lower layers put under
    /// `dir` goes, what this layer put there (before the marker) stays.
    fn remove_older(&mut self, dir: &Path) -> io::Result<()> {
        let under = |p: &&PathBuf| p.starts_with(dir) && p.as_path() != dir;
        let older: Vec<PathBuf> = self
            .meta
            .range(dir.to_path_buf()..)
            .map(|(p, m)| (p, m.layer))
            .take_while(|(p, _)| p.starts_with(dir))
            .filter(|(p, layer)| under(p) && *layer < self.layer)
            .map(|(p, _)| p.clone())
            .collect();
        let whiteouts: Vec<PathBuf> = self.nodes.keys().filter(under).cloned().collect();
        // Deepest first; a directory this layer added to stays.
        for path in older.iter().rev().chain(&whiteouts) {
            let newer_inside = self
                .meta
                .range(path.clone()..)
                .take_while(|(p, _)| p.starts_with(path))
                .any(|(p, m)| p != path && m.layer == self.layer);
            if !newer_inside {
                self.clear(path)?;
            }
        }
        Ok(())
    }

    /// Removes what an entry of the same name left before it (a later tar
    /// entry replaces an earlier one).
    fn clear(&mut self, rel: &Path) -> io::Result<()> {
        let staged = self.root.join(rel);
        match std::fs::symlink_metadata(&staged) {
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir_all(&staged)?;
                self.meta.retain(|p, _| !p.starts_with(rel));
                self.nodes.retain(|p, _| !p.starts_with(rel));
                self.xattrs.retain(|p, _| !p.starts_with(rel));
                self.opaque.retain(|p| !p.starts_with(rel));
            }
            Ok(_) => std::fs::remove_file(&staged)?,
            Err(_) => {}
        }
        self.nodes.remove(rel);
        self.meta.remove(rel);
        self.xattrs.remove(rel);
        Ok(())
    }

    /// Writes a file's content, leaving its all-zero blocks as holes.
    fn write_file(&mut self, from: &mut impl Read, to: &Path) -> io::Result<()> {
        let mut file = File::create(to)?;
        let mut len = 0u64;
        loop {
            let n = fill(from, &mut self.buf)?;
            if n == 0 {
                break;
            }
            for block in self.buf[..n].chunks(BLOCK) {
                if block.iter().all(|&b| b == 0) {
                    file.seek(SeekFrom::Current(block.len() as i64))?;
                } else {
                    file.write_all(block)?;
                    self.content += BLOCK as u64;
                }
            }
            len += n as u64;
        }
        file.set_len(len)
    }

    /// The image: mkfs copies the content with the metadata the staged
    /// files could be given, debugfs applies the rest.
    fn build(&self, work: &Path, out: &Path) -> Result<u64> {
        let left = self.stage_meta();
        let size = mkfs(&self.root, out, self.content, self.entries)?;
        let script = self.script(work, &left).map_err(io(work.display()))?;
        let script_path = work.join("debugfs.script");
        std::fs::write(&script_path, script).map_err(io(script_path.display()))?;
        debugfs(out, &script_path)?;
        Ok(size)
    }

    /// Gives each staged file, directory and symlink the owner, mode and
    /// mtime the tar says, where the caller may, so that mkfs copies them:
    /// a debugfs command per field costs far more (about 1 ms a file). An
    /// unprivileged caller keeps its own owners and the modes it needs to
    /// read and remove the staging tree. Returns what is left to debugfs.
    fn stage_meta(&self) -> BTreeMap<&Path, Left> {
        // SAFETY: geteuid has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let mut left = BTreeMap::new();
        for (rel, meta) in self.meta.iter().filter(|(_, m)| !m.link) {
            // mkfs makes the root itself, and makes nodes no more.
            let undone = if rel.as_os_str().is_empty() || self.nodes.contains_key(rel) {
                Left::ALL
            } else {
                stage(&self.root.join(rel), meta, root)
            };
            if undone != Left::NONE {
                left.insert(rel.as_path(), undone);
            }
        }
        left
    }

    /// The debugfs commands that give the image what mkfs could not copy.
    fn script(&self, work: &Path, left: &BTreeMap<&Path, Left>) -> io::Result<Vec<u8>> {
        let mut s = Vec::new();
        for (rel, node) in &self.nodes {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let name = rel.file_name().unwrap_or_default().as_bytes();
            s.extend_from_slice(b"cd ");
            quoted(&mut s, parent);
            s.extend_from_slice(b"\nmknod \"");
            s.extend_from_slice(name);
            s.extend_from_slice(b"\"");
            match node {
                Node::Char(major, minor) => write!(s, " c {major} {minor}")?,
                Node::Block(major, minor) => write!(s, " b {major} {minor}")?,
                Node::Fifo => write!(s, " p")?,
                Node::Whiteout => write!(s, " c 0 0")?,
            }
            s.push(b'\n');
        }
        for (rel, meta) in self.meta.iter().filter(|(_, m)| !m.link) {
            let Some(undone) = left.get(rel.as_path()) else {
                continue;
            };
            let fields = [
                (undone.mode, "mode", format!("0{:o}", meta.mode)),
                (undone.owner, "uid", meta.uid.to_string()),
                (undone.owner, "gid", meta.gid.to_string()),
                (undone.mtime, "mtime", format!("@{}", meta.mtime)),
            ];
            let fields = fields.into_iter().filter(|(undone, ..)| *undone);
            for (_, field, value) in fields {
                s.extend_from_slice(b"sif ");
                quoted(&mut s, rel);
                writeln!(s, " {field} {value}")?;
            }
        }
        for (n, (rel, name, value)) in self
            .xattrs
            .iter()
            .flat_map(|(rel, all)| all.iter().map(move |(name, value)| (rel, name, value)))
            .enumerate()
        {
            let value_path = work.join(format!("xattr-{n}"));
            std::fs::write(&value_path, value)?;
            s.extend_from_slice(b"ea_set -f ");
            quoted(&mut s, &value_path);
            s.push(b' ');
            quoted(&mut s, rel);
            writeln!(s, " {name}")?;
        }
        for rel in &self.opaque {
            s.extend_from_slice(b"ea_set ");
            quoted(&mut s, rel);
            s.extend_from_slice(b" trusted.overlay.opaque y\n");
        }
        if !self.meta.contains_key(Path::new("lost+found")) {
            // rmdir looks "/NAME" up in the current directory.
            s.extend_from_slice(b"cd /\nrmdir lost+found\n");
        }
        Ok(s)
    }
}

/// The metadata fields of a path that staging could not set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Left {
    mode: bool,
    owner: bool,
    mtime: bool,
}

impl Left {
    const ALL: Left = Left {
        mode: true,
        owner: true,
        mtime: true,
    };
    const NONE: Left = Left {
        mode: false,
        owner: false,
        mtime: false,
    };
}

/// Sets `meta` on the staged `path` as far as the caller (`root` or not)
/// may; returns what it did not set. The owner goes first: chown clears
/// the set-id bits.
fn stage(path: &Path, meta: &Meta, root: bool) -> Left {
    let symlink = meta.mode & 0o170000 == S_IFLNK;
    let owner = std::os::unix::fs::lchown(path, Some(meta.uid as u32), Some(meta.gid as u32));
    let perms = meta.mode & 0o7777;
    // mkfs copies a symlink's mode as the host keeps it (0777).
    let mode = if symlink {
        perms == 0o777
    } else if root || keeps_access(meta.mode) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms)).is_ok()
    } else {
        false
    };
    Left {
        mode: !mode,
        owner: owner.is_err(),
        mtime: set_mtime(path, meta.mtime).is_err(),
    }
}

/// Whether an unprivileged caller can give a staged path `mode` and still
/// read it (and, for a directory, list, enter and empty it); set-id bits
/// it may not keep are left to debugfs too.
fn keeps_access(mode: u32) -> bool {
    let needed = if mode & 0o170000 == S_IFDIR {
        0o700
    } else {
        0o400
    };
    mode & needed == needed && mode & 0o7000 == 0
}

/// The mtime of `path` itself (not a symlink's target); atime stays.
fn set_mtime(path: &Path, mtime: u64) -> io::Result<()> {
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: i64::try_from(mtime).map_err(io::Error::other)?,
            tv_nsec: 0,
        },
    ];
    // SAFETY: `name` is a NUL-terminated path and `times` two timespecs,
    // both alive for the call; utimensat only reads them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn dir_meta(layer: usize) -> Meta {
    Meta {
        layer,
        link: false,
        mode: S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    }
}

/// `rel` as an absolute path in the image, quoted for debugfs.
fn quoted(s: &mut Vec<u8>, rel: &Path) {
    s.extend_from_slice(b"\"");
    if !rel.is_absolute() {
        s.push(b'/');
    }
    s.extend_from_slice(rel.as_os_str().as_bytes());
    s.extend_from_slice(b"\"");
}

/// debugfs reads one command per line and quotes with `"`: names it could
/// not be given are refused rather than mangled.
fn check_name(rel: &Path) -> std::result::Result<(), String> {
    let bytes = rel.as_os_str().as_bytes();
    if bytes.iter().any(|&b| b == b'"' || b < b' ') {
        return Err("a name with a quote or a control character".into());
    }
    Ok(())
}

/// The entry's extended attributes (`SCHILY.xattr.NAME` PAX records).
fn pax_xattrs<R: Read>(
    entry: &mut tar::Entry<R>,
) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let Some(extensions) = entry.pax_extensions().map_err(|e| e.to_string())? else {
        return Ok(out);
    };
    for extension in extensions {
        let extension = extension.map_err(|e| e.to_string())?;
        let Ok(key) = extension.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            let printable = name.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
            if !printable || !name.contains('.') {
                return Err(format!("an xattr named {name:?}"));
            }
            out.push((name.to_string(), extension.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

/// Reads until `buf` is full or the input ends.
fn fill(from: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(read) => n += read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What virtio-pmem devices are aligned to (memremap_pages' section size).
const PMEM_ALIGNMENT: u64 = 2 << 20;

/// Makes an ext4 image at `out` from the directory `from` with e2fsprogs'
/// `mkfs.ext4 -d`: 4 KiB blocks (DAX needs the page size), no journal
/// (layers are mounted read-only), an inode per entry, sized to the content
/// plus headroom, in whole pmem alignment units (2 MiB) so the filesystem
/// fills the device the guest sees. Returns the image size.
fn mkfs(from: &Path, out: &Path, content: u64, entries: u64) -> Result<u64> {
    let fail = |reason: String| Error::bad(out.display(), reason);
    // Metadata (inode tables, bitmaps, directories) grows with the content.
    let inodes = entries + 64;
    let mut size =
        (content + content / 8 + inodes * 512 + (8 << 20)).next_multiple_of(PMEM_ALIGNMENT);
    for _ in 0..3 {
        let file = File::create(out).map_err(io(out.display()))?;
        file.set_len(size).map_err(io(out.display()))?;
        let mkfs = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-I",
                "256",
                "-O",
                "^has_journal",
            ])
            .args(["-N", &inodes.to_string()])
            .args(["-E", "root_owner=0:0", "-L", "uvm-layer", "-d"])
            .arg(from)
            .arg(out)
            .output()
            .map_err(|e| fail(format!("running mkfs.ext4 (e2fsprogs): {e}")))?;
        if mkfs.status.success() {
            return Ok(size);
        }
        let stderr = String::from_utf8_lossy(&mkfs.stderr);
        let _ = std::fs::remove_file(out);
        if !stderr.contains("Could not allocate") || stderr.contains("No space left on device") {
            return Err(fail(format!("mkfs.ext4 failed: {}", stderr.trim())));
        }
        size *= 2;
    }
    Err(fail(format!(
        "the content does not fit even in {size} bytes"
    )))
}

/// Runs a debugfs script on the image; debugfs exits 0 whatever fails, so
/// anything on its stderr but its banner is an error.
fn debugfs(image: &Path, script: &Path) -> Result<()> {
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(script)
        .arg(image)
        .output()
        .map_err(|e| Error::bad(image.display(), format!("running debugfs (e2fsprogs): {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .take(5)
        .collect();
    if !out.status.success() || !errors.is_empty() {
        return Err(Error::bad(
            image.display(),
            format!("debugfs failed: {}", errors.join("; ")),
        ));
    }
    Ok(())
}

/// Bytes the files under `dir` take in 4 KiB blocks, and its entries.
fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut content, mut entries) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        entries += 1;
        if meta.is_dir() {
            let (c, e) = tree_size(&entry.path())?;
            content += c;
            entries += e;
        } else if meta.is_file() {
            content += meta.len().next_multiple_of(BLOCK as u64);
        }
    }
    Ok((content, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uvm-convert-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid + 1);
        h.set_mtime(1_000_000_000);
        h.set_size(size);
        h
    }

    /// A layer with one of everything a container needs.
    fn layer() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |h: &mut tar::Header, path: &str, data: &[u8]| {
            b.append_data(h, path, data).unwrap();
        };
        add(
            &mut header(tar::EntryType::Directory, 0o750, 7, 0),
            "srv/",
            b"",
        );
        add(
            &mut header(tar::EntryType::Regular, 0o4755, 1000, 5),
            "srv/tool",
            b"hello",
        );
        let mut sparse = vec![0u8; 1 << 20];
        sparse[(1 << 20) - 1] = 1;
        add(
            &mut header(tar::EntryType::Regular, 0o644, 0, 1 << 20),
            "srv/sparse",
            &sparse,
        );
        let mut link = header(tar::EntryType::Link, 0o644, 0, 0);
        link.set_link_name("srv/tool").unwrap();
        add(&mut link, "srv/hard", b"");
        let mut sym = header(tar::EntryType::Symlink, 0o777, 0, 0);
        sym.set_link_name("/etc/loop").unwrap();
        add(&mut sym, "loop", b"");
        let mut dev = header(tar::EntryType::Char, 0o666, 0, 0);
        dev.set_device_major(1).unwrap();
        dev.set_device_minor(3).unwrap();
        add(&mut dev, "dev/null", b"");
        add(
            &mut header(tar::EntryType::Fifo, 0o600, 0, 0),
            "run/fifo",
            b"",
        );
        add(
            &mut header(tar::EntryType::Regular, 0, 0, 0),
            "etc/.wh.gone",
            b"",
        );
        add(
            &mut header(tar::EntryType::Regular, 0, 0, 0),
            "opt/.wh..wh..opq",
            b"",
        );
        b.into_inner().unwrap()
    }

    fn stat(image: &Path, path: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", &format!("stat {path}")])
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn a_layer_keeps_modes_owners_links_nodes_holes_and_whiteouts() {
        let dir = scratch("all");
        let image = dir.join("layer.ext4");
        from_tar(&layer()[..], "test layer", &dir.join("work"), &image).unwrap();
        assert!(!dir.join("work").exists());
        let tool = stat(&image, "/srv/tool");
        assert!(
            tool.contains("Mode:  04755") && tool.contains("User:  1000   Group:  1001"),
            "{tool}"
        );
        assert!(
            tool.contains("Links: 2"),
            "the hard link shares the inode: {tool}"
        );
        let srv = stat(&image, "/srv");
        assert!(
            srv.contains("Mode:  0750") && srv.contains("User:     7"),
            "{srv}"
        );
        assert!(srv.contains("mtime: 0x3b9aca00"), "{srv}");
        // mkfs makes the root itself: its metadata is the layer's all the same.
        let root = stat(&image, "/");
        assert!(root.contains("mtime: 0x00000000"), "{root}");
        let sparse = stat(&image, "/srv/sparse");
        assert!(
            sparse.contains("Size: 1048576") && sparse.contains("Blockcount: 8"),
            "{sparse}"
        );
        let null = stat(&image, "/dev/null");
        assert!(
            null.contains("Type: character special")
                && null.contains("Device major/minor number: 01:03"),
            "{null}"
        );
        assert!(stat(&image, "/run/fifo").contains("Type: FIFO"));
        assert!(stat(&image, "/loop").contains("Fast link dest: \"/etc/loop\""));
        let gone = stat(&image, "/etc/gone");
        assert!(
            gone.contains("Type: character special") && gone.contains("00:00"),
            "{gone}"
        );
        assert!(stat(&image, "/opt").contains("trusted.overlay.opaque (1) = \"y\""));
        assert!(!stat(&image, "/etc").contains("opaque"));
        assert_eq!(
            stat(&image, "/lost+found"),
            "",
            "no lost+found the layer lacks"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn refused(entries: &[(&str, tar::EntryType, Option<&str>)]) -> String {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut h = header(*kind, 0o755, 0, 0);
            if let Some(link) = link {
                h.set_link_name(link).unwrap();
            }
            // Names the builder would refuse go in raw.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
        }
        let dir = scratch("bad");
        let out = dir.join("layer.ext4");
        let err = from_tar(
            &b.into_inner().unwrap()[..],
            "bad layer",
            &dir.join("work"),
            &out,
        )
        .unwrap_err()
        .to_string();
        assert!(
            !out.exists() && !dir.join("work").exists(),
            "nothing is left behind"
        );
        std::fs::remove_dir_all(dir).unwrap();
        err
    }

    #[test]
    fn entries_escaping_the_layer_are_refused() {
        use tar::EntryType::{Link, Regular, Symlink};
        let up = refused(&[("../etc/passwd", Regular, None)]);
        assert!(
            up.starts_with("bad layer: ../etc/passwd: escapes the layer"),
            "{up}"
        );
        let abs = refused(&[("/etc/passwd", Regular, None)]);
        assert!(abs.contains("escapes the layer"), "{abs}");
        let through = refused(&[("up", Symlink, Some("..")), ("up/x", Regular, None)]);
        assert!(
            through.contains("up/x: goes through up, a symlink"),
            "{through}"
        );
        let looped = refused(&[
            ("a", Symlink, Some("b")),
            ("b", Symlink, Some("a")),
            ("a/x", Regular, None),
        ]);
        assert!(
            looped.contains("a/x: goes through a, a symlink"),
            "{looped}"
        );
        let hard = refused(&[("x", Link, Some("../../etc/shadow"))]);
        assert!(hard.contains("a hard link escaping the layer"), "{hard}");
    }

    #[test]
    fn a_truncated_layer_is_refused() {
        let tar = layer();
        let dir = scratch("short");
        let out = dir.join("layer.ext4");
        let err = from_tar(&tar[..1500], "short layer", &dir.join("work"), &out).unwrap_err();
        assert!(err.to_string().starts_with("short layer: "), "{err}");
        assert!(!out.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tar_of(entries: &[(&str, tar::EntryType)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind) in entries {
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"x"
            } else {
                b""
            };
            let mut h = header(*kind, 0o755, 0, data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_stack_applies_upper_whiteouts_and_opaque_dirs_to_the_layers_below() {
        use tar::EntryType::{Directory, Regular};
        let dir = scratch("stack");
        let image = dir.join("stack.ext4");
        let mut stack = Stack::new(&dir.join("work")).unwrap();
        let layers = [
            tar_of(&[
                ("a/gone", Regular),
                ("a/kept", Regular),
                ("m/old/deep", Regular),
                ("w/x", Regular),
            ]),
            // The opaque marker after an entry of its own layer: that one stays.
            tar_of(&[
                ("a/.wh.gone", Regular),
                ("m/", Directory),
                ("m/new", Regular),
                ("m/.wh..wh..opq", Regular),
            ]),
            tar_of(&[
                (".wh.w", Regular),
                ("w/", Directory),
                ("w/again", Regular),
                ("top/.wh.below", Regular),
            ]),
        ];
        for (i, layer) in layers.iter().enumerate() {
            stack.add(&layer[..], &format!("layer {i}")).unwrap();
        }
        stack.build(&image).unwrap();
        assert!(!dir.join("work").exists());
        let ls = |path: &str| {
            let out = Command::new("debugfs")
                .args(["-R", &format!("ls {path}")])
                .arg(&image)
                .output()
                .unwrap();
            let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|w| {
                    !w.starts_with('(') && w.parse::<u64>().is_err() && *w != "." && *w != ".."
                })
                .map(str::to_string)
                .collect();
            names.sort();
            names
        };
        assert_eq!(ls("/a"), ["kept"]);
        assert_eq!(ls("/m"), ["new"]);
        assert_eq!(ls("/w"), ["again"]);
        // The stack's own whiteouts are applied, not kept: nothing below it.
        assert!(stat(&image, "/top/below").is_empty());
        assert!(!stat(&image, "/m").contains("opaque"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
