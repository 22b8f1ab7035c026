//! Utility VMs as the host sees them between commands: one directory per
//! VM under a root, holding its record (`state.json`), the control socket
//! its VMM process serves, the container's log and a lock file. The VMM
//! process holds that lock for as long as it lives, so a VM whose VMM died
//! (kill -9, a host crash) is seen as dead at once, whatever its record
//! says, and nobody waits for it.

pub mod control;
pub mod log;
mod record;
pub mod snapshot;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use self::record::{Config, Phase, Record, Status};

/// Bytes of randomness in an ID (shown as twice as many hex digits).
const ID_BYTES: usize = 16;
/// Hex digits of an ID as `ps` shows it.
pub const SHORT_ID: usize = 12;
const RECORD: &str = "state.json";
const LOCK: &str = "lock";
const SOCKET: &str = "control.sock";
const LOG: &str = "log.json";
/// uvm's own messages for a VM in the background.
const VMM_LOG: &str = "vmm.log";
const SCRATCH: &str = "scratch.img";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("state file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no utility VM named or with ID `{key}` under {root}")]
    Unknown { key: String, root: PathBuf },
    #[error("ID prefix `{key}` is ambiguous: it matches {matches}")]
    Ambiguous { key: String, matches: String },
    #[error("the name `{0}` is taken by utility VM {1}")]
    NameTaken(String, String),
    #[error("invalid name `{0}`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit")]
    BadName(String),
    #[error("utility VM {id} {state}")]
    State { id: String, state: String },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory under which uvm keeps its VMs' state.
pub struct Root {
    dir: PathBuf,
}

/// A VM's state as a command finds it.
#[derive(Debug)]
pub struct Entry {
    pub dir: PathBuf,
    pub record: Record,
    /// Its VMM process still runs.
    pub alive: bool,
}

/// The state a VMM process holds for its VM while it runs. Its lock says
/// the VM is alive.
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
    record: Record,
    lock: File,
}

impl Root {
    /// `/run/uvm` as root, `$XDG_RUNTIME_DIR/uvm` otherwise (or
    /// `/tmp/uvm-UID` without it).
    pub fn default_dir() -> PathBuf {
        // SAFETY: getuid has no arguments and cannot fail.
        let uid = unsafe { libc::getuid() };
        if uid == 0 {
            return PathBuf::from("/run/uvm");
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("uvm"),
            _ => std::env::temp_dir().join(format!("uvm-{uid}")),
        }
    }

    /// The root at `dir`, created (private to this user) if missing.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir))?;
        // A directory we cannot write is an error now, not at `run`'s end.
        let probe = File::open(dir).map_err(io_error(dir))?;
        // SAFETY: plain system call on a descriptor we own.
        if unsafe { libc::faccessat(probe.as_raw_fd(), c".".as_ptr(), libc::W_OK, 0) } < 0 {
            return Err(io_error(dir)(io::Error::last_os_error()));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new VM's state, with a fresh ID and `name` if it is free: its lock
    /// is held from here on.
    pub fn create(&self, name: Option<&str>, config: Config, detached: bool) -> Result<Instance> {
        if let Some(name) = name {
            check_name(name)?;
        }
        let _guard = self.lock()?;
        if let Some(name) = name {
            if let Some(other) = self.list()?.into_iter().find(|e| e.name() == Some(name)) {
                return Err(Error::NameTaken(name.into(), other.short_id().into()));
            }
        }
        let id = random_id().map_err(io_error(&self.dir))?;
        let dir = self.dir.join(&id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_error(&dir))?;
        let lock = hold_lock(&dir.join(LOCK))?;
        let record = Record::new(id, name.map(str::to_string), config, detached);
        let instance = Instance { dir, record, lock };
        instance.save()?;
        Ok(instance)
    }

    /// The state `create` made for a VM whose VMM is this process, started
    /// in the background with the lock on `lock_fd`.
    pub fn adopt(&self, id: &str, lock_fd: RawFd) -> Result<Instance> {
        let dir = self.dir.join(id);
        let lock_path = dir.join(LOCK);
        let same = |fd: &File| -> io::Result<bool> {
            let (ours, theirs) = (fd.metadata()?, std::fs::metadata(&lock_path)?);
            Ok(ours.ino() == theirs.ino() && ours.dev() == theirs.dev())
        };
        // SAFETY: the parent uvm passed this descriptor for us alone.
        let lock = File::from(unsafe { OwnedFd::from_raw_fd(lock_fd) });
        if !same(&lock).map_err(io_error(&lock_path))? {
            return Err(Error::State {
                id: id.into(),
                state: "was handed a lock that is not its own".into(),
            });
        }
        // SAFETY: plain fcntl on a descriptor we own: keep it from children.
        unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let record = read_record(&dir)?;
        let mut instance = Instance { dir, record, lock };
        // The VM's VMM is this process now, not the command that made it.
        instance.update(|record| record.pid = std::process::id())?;
        Ok(instance)
    }

    /// Every VM under the root, oldest first.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for dirent in std::fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let dir = dirent.map_err(io_error(&self.dir))?.path();
            if !dir.join(RECORD).exists() {
                continue; // being created, or not ours
            }
            let record = match read_record(&dir) {
                Ok(record) => record,
                // Being removed between the listing and the read.
                Err(_) if !dir.exists() => continue,
                Err(e) => return Err(e),
            };
            let alive = is_locked(&dir.join(LOCK));
            entries.push(Entry { dir, record, alive });
        }
        entries.sort_by(|a, b| a.record.created.cmp(&b.record.created));
        Ok(entries)
    }

    /// The VM named `key`, or whose ID is or starts with `key`.
    pub fn find(&self, key: &str) -> Result<Entry> {
        let mut entries = self.list()?;
        if let Some(at) = entries.iter().position(|e| e.name() == Some(key)) {
            return Ok(entries.swap_remove(at));
        }
        if let Some(at) = entries.iter().position(|e| e.record.id == key) {
            return Ok(entries.swap_remove(at));
        }
        let mut matches: Vec<Entry> = entries
            .into_iter()
            .filter(|e| !key.is_empty() && e.record.id.starts_with(key))
            .collect();
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(Error::Unknown {
                key: key.into(),
                root: self.dir.clone(),
            }),
            _ => Err(Error::Ambiguous {
                key: key.into(),
                matches: matches
                    .iter()
                    .map(|e| e.record.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Removes an ended VM's state (and the scratch image uvm made for it).
    pub fn remove(&self, entry: &Entry) -> Result<()> {
        let _guard = self.lock()?;
        if is_locked(&entry.dir.join(LOCK)) {
            return Err(Error::State {
                id: entry.short_id().into(),
                state: "is running: stop it first, or use rm -f".into(),
            });
        }
        if let Some(scratch) = entry.record.created_scratch() {
            match std::fs::remove_file(scratch) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(scratch)(e)),
                _ => {}
            }
        }
        std::fs::remove_dir_all(&entry.dir).map_err(io_error(&entry.dir))
    }

    /// The root's own lock, for what must not race: names, removal.
    fn lock(&self) -> Result<File> {
        hold_lock(&self.dir.join(LOCK))
    }
}

impl Entry {
    pub fn name(&self) -> Option<&str> {
        self.record.name.as_deref()
    }

    pub fn short_id(&self) -> &str {
        short(&self.record.id)
    }

    /// What `ps` says of it: a record that says running with no VMM
    /// process alive is dead.
    pub fn status(&self) -> Status {
        self.record.status(self.alive)
    }

    /// Waits until the VM's VMM process has ended.
    pub fn wait_ended(&self) -> Result<()> {
        let path = self.dir.join(LOCK);
        let file = File::open(&path).map_err(io_error(&path))?;
        flock(&file, libc::LOCK_SH).map_err(io_error(&path))
    }

    /// Waits (at most `limit`) until its record says it left `phase`, or
    /// its VMM ended: the VMM records a change just after it answers for it.
    pub fn wait_past(&self, phase: Phase, limit: std::time::Duration) -> Result<Record> {
        let began = std::time::Instant::now();
        loop {
            let record = self.reread()?;
            if record.phase != phase || self.ended() || began.elapsed() >= limit {
                return Ok(record);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Its record as it is now (the VMM updates it when the VM ends).
    pub fn reread(&self) -> Result<Record> {
        read_record(&self.dir)
    }

    /// Whether its VMM process has ended by now.
    pub fn ended(&self) -> bool {
        !is_locked(&self.dir.join(LOCK))
    }
}

impl Instance {
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The lock, for a VMM process started in the background to take over.
    pub fn lock_fd(&self) -> RawFd {
        self.lock.as_raw_fd()
    }

    /// Changes the record and writes it out (atomically: readers see the
    /// old one or the new one).
    pub fn update(&mut self, change: impl FnOnce(&mut Record)) -> Result<()> {
        change(&mut self.record);
        self.save()
    }

    fn save(&self) -> Result<()> {
        let path = self.dir.join(RECORD);
        let json = serde_json::to_vec_pretty(&self.record).expect("a record serializes");
        write_whole(&path, &json).map_err(io_error(&path))
    }

    /// Removes the state of a VM that ran in the foreground (the lock goes
    /// last: until then the VM is alive).
    pub fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).map_err(io_error(&self.dir))
    }
}

/// The files in a VM's state directory.
pub trait StateFiles {
    fn dir(&self) -> &Path;

    /// The control socket its VMM serves.
    fn socket(&self) -> PathBuf {
        self.dir().join(SOCKET)
    }

    /// The container's output (`run -d`).
    fn log(&self) -> PathBuf {
        self.dir().join(LOG)
    }

    /// uvm's own messages for a VM in the background.
    fn vmm_log(&self) -> PathBuf {
        self.dir().join(VMM_LOG)
    }

    /// A restored VM's own copy of its snapshot's scratch disk.
    fn scratch(&self) -> PathBuf {
        self.dir().join(SCRATCH)
    }

    /// The images of the container's volumes (`-v`).
    fn volumes(&self) -> PathBuf {
        self.dir().join("volumes")
    }
}

impl StateFiles for Entry {
    fn dir(&self) -> &Path {
        &self.dir
    }
}

impl StateFiles for Instance {
    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A VM name: letters, digits, `_`, `.` and `-`, starting with a letter or
/// digit, at most 128 (a directory name elsewhere, too).
pub fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    match first_ok && rest_ok && name.len() <= 128 {
        true => Ok(()),
        false => Err(Error::BadName(name.into())),
    }
}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(SHORT_ID)]
}

fn random_id() -> io::Result<String> {
    let bytes = crate::random_bytes::<ID_BYTES>()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn read_record(dir: &Path) -> Result<Record> {
    let path = dir.join(RECORD);
    let bytes = std::fs::read(&path).map_err(io_error(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        path,
        reason: e.to_string(),
    })
}

/// Opens (creating) and takes the lock at `path`, waiting for it.
fn hold_lock(path: &Path) -> Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(path)
        .map_err(io_error(path))?;
    flock(&file, libc::LOCK_EX).map_err(io_error(path))?;
    Ok(file)
}

/// Whether a live process holds the lock at `path`.
fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    matches!(flock(&file, libc::LOCK_SH | libc::LOCK_NB), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: plain system call on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes `bytes` to `path` whole, by rename from a name of this
/// process's: a reader sees the old file or the new one, never half.
pub fn write_whole(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
}

/// Writes `pid` to `path` whole (conmon, a shim read it).
pub fn write_pid_file(path: &Path, pid: u32) -> io::Result<()> {
    write_whole(path, pid.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> (PathBuf, Root) {
        let dir = std::env::temp_dir().join(format!("uvm-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = Root::open(&dir).unwrap();
        (dir, root)
    }

    #[test]
    fn a_vm_is_alive_while_its_instance_holds_the_lock() {
        let (dir, root) = root("alive");
        let instance = root.create(Some("web"), Config::default(), false).unwrap();
        let id = instance.record().id.clone();
        assert_eq!(id.len(), 2 * ID_BYTES);
        let entry = root.find("web").unwrap();
        assert!(entry.alive && !entry.ended());
        assert_eq!(entry.status(), Status::Created);
        // Nothing recorded an end: without its VMM the VM is dead.
        drop(instance);
        let entry = root.find(&id[..5]).unwrap();
        assert_eq!((entry.alive, entry.status()), (false, Status::Dead));
        entry.wait_ended().unwrap(); // does not wait for a dead VM
        root.remove(&entry).unwrap();
        assert!(root.list().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_are_unique_and_keys_must_be_unambiguous() {
        let (dir, root) = root("names");
        let first = root.create(Some("web"), Config::default(), true).unwrap();
        let taken = root.create(Some("web"), Config::default(), true);
        assert!(matches!(taken, Err(Error::NameTaken(..))), "{taken:?}");
        assert!(matches!(
            root.create(Some("../x"), Config::default(), true),
            Err(Error::BadName(_))
        ));
        let second = root.create(None, Config::default(), true).unwrap();
        // The empty prefix matches both: ambiguous, never the first found.
        assert!(matches!(root.find(""), Err(Error::Unknown { .. })));
        let common = common_prefix(&first.record().id, &second.record().id);
        if !common.is_empty() {
            assert!(matches!(root.find(common), Err(Error::Ambiguous { .. })));
        }
        assert!(matches!(root.find("nope"), Err(Error::Unknown { .. })));
        let running = root.find(&second.record().id).unwrap();
        assert!(matches!(root.remove(&running), Err(Error::State { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
        let n = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
        &a[..n]
    }

    #[test]
    fn an_ended_vm_keeps_its_record() {
        let (dir, root) = root("ended");
        let mut instance = root.create(None, Config::default(), true).unwrap();
        instance.update(|r| r.set_running()).unwrap();
        instance.update(|r| r.set_exited(3, None)).unwrap();
        let id = instance.record().id.clone();
        drop(instance);
        let entry = root.find(&id).unwrap();
        assert_eq!(entry.status(), Status::Exited(3));
        std::fs::write(entry.dir.join(RECORD), "{not json").unwrap();
        assert!(matches!(root.list(), Err(Error::Corrupt { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
