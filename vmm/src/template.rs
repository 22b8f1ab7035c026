//! Templates: `uvm run` restores its VM from a snapshot of one that booted
//! from the same inputs, taken the moment that VM's agent was connected and
//! idle; without one it boots cold and saves one at that moment.
//!
//! A template is keyed by the VM's identity: uvm's version, the host kind,
//! the guest command line uvm builds, memory, vCPUs, the vsock CID, the
//! scratch disk's size, and the content (SHA-256) of the kernel, initrd,
//! layers and tools. So a changed file, even at the same path, never reuses
//! the template of the old one. What differs between runs of one template —
//! the command, its environment, user and terminal, the scratch disk's
//! data, the vsock socket — reaches the agent after the restore, with the
//! run request. The layers stay part of the identity: a template serves
//! one set of layers (one image), the simplest design that keeps the pmem
//! devices the guest probed at boot valid.
//!
//! Templates live in the store's `templates/` directory, one directory per
//! key with the snapshot ([`crate::vm::snapshot`]) and `inputs.json`
//! (what it was taken from, for `uvm template ls` and `prune`). Each appears
//! by rename from a private directory, so a reader never sees half of one.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hypervisor::{self, Hypervisor, Stateful};
use crate::vm::snapshot::{self, sha256};
use crate::vm::{self, Running, UtilityVm, VmConfig};

const INPUTS: &str = "inputs.json";
const DIGESTS: &str = "digests.json";
/// Private directories being written, removed by `prune`.
const PARTIAL: &str = ".partial-";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("templates {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error("no template {0}")]
    Unknown(String),
}

type Result<T> = std::result::Result<T, Error>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The templates directory of a store.
pub struct Templates {
    dir: PathBuf,
}

/// What a template was taken from, as `uvm template ls` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inputs {
    /// Each input file with its content digest when the template was saved.
    pub files: Vec<(PathBuf, String)>,
    pub memory_mib: u64,
    pub cpus: u8,
    pub created: SystemTime,
    /// How long the first run spent saving it.
    pub save_ms: f64,
}

/// A template in the directory.
pub struct Template {
    pub key: String,
    pub inputs: Option<Inputs>,
    /// Disk space its files take (the memory image is sparse).
    pub disk_bytes: u64,
}

/// The VM `uvm run` gets, and what it still has to do.
pub struct Prepared<H: Hypervisor> {
    pub vm: UtilityVm<H>,
    /// A cold VM that saves a template once its agent is connected.
    pub save: Option<Pending>,
    /// Why a template that matched could not be used (the VM boots cold).
    pub notice: Option<String>,
}

impl<H: Hypervisor> Prepared<H> {
    /// A VM with nothing more to do before it starts.
    pub fn ready(vm: UtilityVm<H>) -> Self {
        Self {
            vm,
            save: None,
            notice: None,
        }
    }
}

/// A template to save of a VM booting cold: it holds the VM's run request
/// until [`Pending::save`].
pub struct Pending {
    dir: PathBuf,
    key: String,
    identity: String,
    inputs: Inputs,
}

impl Templates {
    /// The templates of the store at `store` (created when first saved).
    pub fn in_store(store: &Path) -> Self {
        Self {
            dir: store.join("templates"),
        }
    }

    /// `config`'s VM: restored from the template that matches it unless
    /// `cold`, else built cold (saving a template unless `cold`).
    pub fn prepare<H, F>(
        &self,
        open: F,
        config: &VmConfig,
        start: Instant,
        cold: bool,
    ) -> Result<Prepared<H>>
    where
        H: Hypervisor + Send,
        H::Vm: Send + Stateful,
        vm::VcpuOf<H>: Stateful,
        F: Fn() -> hypervisor::Result<H> + Send + Sync,
    {
        let cold_vm = |save: Option<Pending>, notice| -> Result<Prepared<H>> {
            let mut vm = UtilityVm::build(&open, config, start)?;
            if save.is_some() {
                vm.hold_run()?;
            }
            Ok(Prepared { vm, save, notice })
        };
        if cold || config.process.is_none() {
            return cold_vm(None, None);
        }
        // An input that cannot be read is the cold build's to report.
        let Ok((identity, inputs)) = identity(config, &self.dir) else {
            return cold_vm(None, None);
        };
        let key = sha256(identity.as_bytes());
        let dir = self.dir.join(&key);
        let pending = Pending {
            dir: dir.clone(),
            key: key.clone(),
            identity: identity.clone(),
            inputs,
        };
        if !dir.join(INPUTS).exists() {
            // Templates appear whole, by rename: a directory without its
            // inputs was never one.
            remove_dir(&dir)?;
            return cold_vm(Some(pending), None);
        }
        let restored = snapshot::read(&dir, config.host)
            .map_err(vm::Error::from)
            .and_then(|snapshot| UtilityVm::restore(&open, config, start, snapshot, &identity));
        match restored {
            Ok(vm) => Ok(Prepared::ready(vm)),
            // The run's own inputs (its scratch disk in use, a socket path)
            // would fail a cold boot the same way.
            Err(e) if !unusable(&e) => Err(e.into()),
            Err(e) => {
                // Unusable: the cold run saves a good one in its place.
                remove_dir(&dir)?;
                let notice = format!("template {}: {e}; booting cold", short(&key));
                cold_vm(Some(pending), Some(notice))
            }
        }
    }

    /// Every template, newest first.
    pub fn list(&self) -> Result<Vec<Template>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at(&self.dir)(e)),
        };
        let mut templates = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_at(&self.dir))?;
            let key = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || key.starts_with('.') {
                continue;
            }
            let inputs = fs::read(entry.path().join(INPUTS))
                .ok()
                .and_then(|text| serde_json::from_slice(&text).ok());
            templates.push(Template {
                key,
                inputs,
                disk_bytes: disk_usage(&entry.path()),
            });
        }
        templates.sort_by_key(|t| std::cmp::Reverse(t.inputs.as_ref().map(|i| i.created)));
        Ok(templates)
    }

    /// Removes the template whose key starts with `prefix` (one only).
    pub fn remove(&self, prefix: &str) -> Result<String> {
        let found: Vec<String> = self
            .list()?
            .into_iter()
            .map(|t| t.key)
            .filter(|key| !prefix.is_empty() && key.starts_with(prefix))
            .collect();
        match &found[..] {
            [key] => {
                remove_dir(&self.dir.join(key))?;
                Ok(key.clone())
            }
            [] => Err(Error::Unknown(prefix.into())),
            _ => Err(Error::Unknown(format!(
                "{prefix}: it starts {} templates' keys, give more of it",
                found.len()
            ))),
        }
    }

    /// Removes the templates no run can use again (an input file gone or
    /// changed) and any left half-written; returns the keys removed.
    pub fn prune(&self) -> Result<Vec<String>> {
        let mut digests = Digests::load(&self.dir.join(DIGESTS));
        let mut removed = Vec::new();
        for template in self.list()? {
            let stale = template.inputs.as_ref().is_none_or(|inputs| {
                inputs
                    .files
                    .iter()
                    .any(|(path, digest)| digests.of(path).ok().as_ref() != Some(digest))
            });
            if stale {
                remove_dir(&self.dir.join(&template.key))?;
                removed.push(template.key);
            }
        }
        digests.store(&self.dir);
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(PARTIAL) && !writer_alive(&name) {
                    remove_dir(&entry.path())?;
                }
            }
        }
        Ok(removed)
    }
}

impl Pending {
    /// Waits until the cold VM's agent is connected and idle, pauses the
    /// VM, saves it as the template and lets it go on to run its own
    /// process. A VM that ends first saves nothing (`Ok(None)`); a save
    /// that fails leaves no template and the VM runs on.
    pub fn save<H>(mut self, running: &mut Running<H>) -> Result<Option<Duration>>
    where
        H: Hypervisor,
        H::Vm: Stateful,
        vm::VcpuOf<H>: Stateful,
    {
        if running.wait_agent_connected().is_err() {
            return Ok(None);
        }
        let began = Instant::now();
        let saved = running
            .pause()
            .map_err(Error::from)
            .and_then(|()| self.write(running, began));
        running.resume();
        running.release_run();
        saved.map(|()| Some(began.elapsed()))
    }

    fn write<H>(&mut self, running: &mut Running<H>, began: Instant) -> Result<()>
    where
        H: Hypervisor,
        H::Vm: Stateful,
        vm::VcpuOf<H>: Stateful,
    {
        let parent = self.dir.parent().expect("a template is in its directory");
        let partial = parent.join(format!("{PARTIAL}{}-{}", std::process::id(), self.key));
        fs::create_dir_all(parent).map_err(io_at(parent))?;
        // Ours by our PID: one found is a dead writer's.
        remove_dir(&partial)?;
        // The guest's memory is the owner's alone to read.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&partial)
            .map_err(io_at(&partial))?;
        let written = running
            .save(&partial, &self.identity)
            .map_err(Error::from)
            .and_then(|()| {
                self.inputs.save_ms = began.elapsed().as_secs_f64() * 1e3;
                let path = partial.join(INPUTS);
                let text = serde_json::to_vec_pretty(&self.inputs).expect("inputs encode");
                fs::write(&path, text).map_err(io_at(&path))
            });
        // Another run may have saved the same template meanwhile: keep it.
        let placed = written.and_then(|()| match fs::rename(&partial, &self.dir) {
            Err(_) if self.dir.join(INPUTS).exists() => Ok(()),
            renamed => renamed.map_err(io_at(&self.dir)),
        });
        if partial.exists() {
            remove_dir(&partial)?;
        }
        placed
    }
}

/// The identity text of `config`'s VM (see the module's doc) and the
/// inputs it names; file digests are remembered in `cache` (a directory).
pub(crate) fn identity(config: &VmConfig, cache: &Path) -> Result<(String, Inputs)> {
    let mut digests = Digests::load(&cache.join(DIGESTS));
    let files: Vec<&PathBuf> = [&config.kernel, &config.initrd]
        .into_iter()
        .chain(config.images())
        .collect();
    let mut named = Vec::with_capacity(files.len());
    for path in files {
        let path = fs::canonicalize(path).map_err(io_at(path))?;
        let digest = digests.of(&path).map_err(io_at(&path))?;
        named.push((path, digest));
    }
    digests.store(cache);
    let scratch = match &config.scratch {
        Some((path, size)) => fs::metadata(path).map_or(*size, |m| m.len()).to_string(),
        None => "none".into(),
    };
    // Shares count by number alone: the guest mounts none before its run
    // request, so a template serves any directories.
    let mut identity = format!(
        "uvm {}\nhost {:?}\nflags {} {}\nmemory {} MiB\ncpus {}\ncid {}\nscratch {scratch}\nshares {}\n",
        env!("CARGO_PKG_VERSION"),
        config.host,
        vm::guest_flags(config),
        vm::root_entry(config).unwrap_or_default(),
        config.memory_mib,
        config.cpus,
        config.vsock.guest_cid,
        config.shares.len(),
    );
    let roles = ["kernel", "initrd"]
        .into_iter()
        .chain(std::iter::repeat("image"));
    for (role, (_, digest)) in roles.zip(&named) {
        identity.push_str(&format!("{role} {digest}\n"));
    }
    let inputs = Inputs {
        files: named,
        memory_mib: config.memory_mib,
        cpus: config.cpus,
        created: SystemTime::now(),
        save_ms: 0.0,
    };
    Ok((identity, inputs))
}

/// Whether a restore failed because of the template (its files, or state
/// this host cannot take), not because of the run's own inputs.
fn unusable(e: &vm::Error) -> bool {
    !matches!(
        e,
        vm::Error::Layer(_)
            | vm::Error::Scratch(_)
            | vm::Error::Share { .. }
            | vm::Error::VsockSocket { .. }
            | vm::Error::ControlSocket { .. }
            | vm::Error::Thread(_)
    )
}

/// The first 12 hex digits of a key: how `uvm template ls` shows it.
pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(dir)(e)),
        _ => Ok(()),
    }
}

/// Whether the uvm writing the partial directory `name` still runs.
fn writer_alive(name: &str) -> bool {
    let pid = name[PARTIAL.len()..].split('-').next().unwrap_or("");
    !pid.is_empty() && Path::new("/proc").join(pid).exists()
}

fn disk_usage(dir: &Path) -> u64 {
    let files = fs::read_dir(dir).into_iter().flatten().flatten();
    files
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Content digests of input files, remembered by their metadata so that a
/// file is read only when it is new or changed (any write moves its ctime,
/// which no user can set back).
#[derive(Default, Serialize, Deserialize)]
struct Digests {
    files: BTreeMap<PathBuf, Known>,
    #[serde(skip)]
    changed: bool,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Known {
    stamp: Stamp,
    sha256: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        let ns = |s: i64, ns: i64| i128::from(s) * 1_000_000_000 + i128::from(ns);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Last changed over a second ago.
    fn settled(&self) -> bool {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
        now.is_ok_and(|now| (now.as_nanos() as i128) - self.ctime_ns > 1_000_000_000)
    }
}

impl Digests {
    /// What `path` remembers; a missing or damaged cache is an empty one.
    fn load(path: &Path) -> Self {
        fs::read(path)
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok())
            .unwrap_or_default()
    }

    /// The digest of the file at `path`, a canonical path.
    fn of(&mut self, path: &Path) -> io::Result<String> {
        let file = fs::File::open(path)?;
        let stamp = Stamp::of(&file.metadata()?);
        if let Some(known) = self.files.get(path).filter(|k| k.stamp == stamp) {
            return Ok(known.sha256.clone());
        }
        let mut hasher = Sha256::new();
        io::copy(
            &mut io::BufReader::with_capacity(1 << 20, file),
            &mut hasher,
        )?;
        let sha256 = format!("{:x}", hasher.finalize());
        // A file changed within a timestamp tick of now could change again
        // with the same stamp (timestamps are coarse): not remembered.
        if stamp.settled() {
            let known = Known {
                stamp,
                sha256: sha256.clone(),
            };
            self.files.insert(path.to_path_buf(), known);
            self.changed = true;
        }
        Ok(sha256)
    }

    /// Best effort: a cache that cannot be written is read again next time.
    fn store(&self, dir: &Path) {
        if !self.changed || fs::create_dir_all(dir).is_err() {
            return;
        }
        let partial = dir.join(format!("{PARTIAL}{}-{DIGESTS}", std::process::id()));
        let text = serde_json::to_vec(self).expect("digests encode");
        if fs::write(&partial, text).is_ok() && fs::rename(&partial, dir.join(DIGESTS)).is_err() {
            let _ = fs::remove_file(&partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uvm-template-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_rewritten_in_place_gets_a_new_digest() {
        let dir = tempdir("digests");
        let file = dir.join("layer.img");
        fs::write(&file, b"one").unwrap();
        let mut digests = Digests::load(&dir.join(DIGESTS));
        assert_eq!(digests.of(&file).unwrap(), sha256(b"one"));
        digests.store(&dir);
        // Same length, same path, likely the same coarse timestamps: only
        // the content differs.
        fs::write(&file, b"two").unwrap();
        let mut again = Digests::load(&dir.join(DIGESTS));
        assert_eq!(again.of(&file).unwrap(), sha256(b"two"));
        // A settled file is remembered, and found by its stamp.
        let old = Path::new("/usr/bin/env").canonicalize().unwrap();
        let digest = again.of(&old).unwrap();
        again.store(&dir);
        let remembered = Digests::load(&dir.join(DIGESTS));
        assert_eq!(remembered.files[&old].sha256, digest);
        assert!(!remembered.files.contains_key(&file));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prune_removes_templates_whose_inputs_changed_or_went() {
        let dir = tempdir("prune");
        let templates = Templates::in_store(&dir);
        let input = dir.join("kernel");
        fs::write(&input, b"k").unwrap();
        let template = |key: &str, files: Vec<(PathBuf, String)>| {
            let at = templates.dir.join(key);
            fs::create_dir_all(&at).unwrap();
            let inputs = Inputs {
                files,
                memory_mib: 128,
                cpus: 1,
                created: SystemTime::now(),
                save_ms: 1.0,
            };
            fs::write(at.join(INPUTS), serde_json::to_vec(&inputs).unwrap()).unwrap();
        };
        template("aaaa", vec![(input.clone(), sha256(b"k"))]);
        template("bbbb", vec![(input.clone(), sha256(b"old"))]);
        template("cccc", vec![(dir.join("gone"), sha256(b"k"))]);
        fs::create_dir_all(templates.dir.join(format!("{PARTIAL}999999999-dddd"))).unwrap();
        let mut removed = templates.prune().unwrap();
        removed.sort();
        assert_eq!(removed, ["bbbb", "cccc"]);
        let left: Vec<String> = templates
            .list()
            .unwrap()
            .into_iter()
            .map(|t| t.key)
            .collect();
        assert_eq!(left, ["aaaa"]);
        assert!(!templates
            .dir
            .join(format!("{PARTIAL}999999999-dddd"))
            .exists());
        assert!(matches!(templates.remove("b"), Err(Error::Unknown(_))));
        assert_eq!(templates.remove("aa").unwrap(), "aaaa");
        assert!(templates.list().unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
