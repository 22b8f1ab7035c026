//! Snapshots of detached VMs, Firecracker's way: `uvm snapshot ID -o DIR`
//! saves a running VM to a directory and lets it go on; `uvm restore DIR`
//! starts another VM from it, whose container carries on where the saved
//! one was (its agent reconnects, guest/PROTOCOL.md's `Resumed`).
//!
//! DIR holds the VM's snapshot (`memory` and `state`, as a template's:
//! [`crate::vm::snapshot`]), `vm.json` (the config the VM was built from)
//! and `scratch`, a copy of its scratch disk taken while the VM was paused,
//! so that the disk and the guest's page cache in `memory` agree. Each VM
//! restored from DIR writes a copy of its own (in its state directory).

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hypervisor::{self, Hypervisor, Stateful};
use crate::vm::threads::Ending;
use crate::vm::{self, snapshot, Exit, Running, UtilityVm, VcpuOf, VmConfig};
use crate::{lock, scratch, template};

const CONFIG: &str = "vm.json";
const SCRATCH: &str = "scratch";
/// How long a client waits for the save (memory and scratch disk writes).
const PATIENCE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error(transparent)]
    Inputs(#[from] template::Error),
    #[error(transparent)]
    Scratch(#[from] scratch::Error),
}

type Result<T> = std::result::Result<T, Error>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Snapshots asked for by control clients, for the thread that owns the
/// VM to take (one at a time).
#[derive(Clone, Default)]
pub struct Requests(Arc<Mutex<Option<Asked>>>);

struct Asked {
    dir: PathBuf,
    reply: mpsc::SyncSender<std::result::Result<(), String>>,
}

impl Requests {
    /// Asks for a snapshot of the VM that `ending` belongs to in `dir`,
    /// and waits until it is taken.
    pub fn ask(&self, dir: PathBuf, ending: &Ending) -> std::result::Result<(), String> {
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let mut slot = lock(&self.0);
            if slot.is_some() {
                return Err("another snapshot of this VM is being taken".into());
            }
            *slot = Some(Asked { dir, reply });
        }
        ending.notify();
        answer.recv_timeout(PATIENCE).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => format!("no snapshot within {PATIENCE:?}"),
            mpsc::RecvTimeoutError::Disconnected => "the VM ended".into(),
        })?
    }

    /// Takes the snapshots asked for until the VM ends, and says how it
    /// ended. Runs on the thread that owns `running`.
    pub fn serve<H>(&self, running: &mut Running<H>, config: &VmConfig) -> Exit
    where
        H: Hypervisor,
        H::Vm: Stateful,
        VcpuOf<H>: Stateful,
    {
        loop {
            let asked = running.ending().wait_for(|| lock(&self.0).is_some());
            if let Err(exit) = asked {
                // A client still waiting hears that the VM ended.
                lock(&self.0).take();
                return exit;
            }
            if let Some(asked) = lock(&self.0).take() {
                let taken = take(running, config, &asked.dir).map_err(|e| e.to_string());
                let _ = asked.reply.send(taken);
            }
        }
    }
}

/// Saves the running VM built from `config` into `dir` (which must not
/// exist) and lets it go on. The directory appears whole, by rename.
pub fn take<H>(running: &mut Running<H>, config: &VmConfig, dir: &Path) -> Result<()>
where
    H: Hypervisor,
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    if dir.exists() {
        return Err(Error::Invalid {
            path: dir.to_path_buf(),
            reason: "exists already".into(),
        });
    }
    if !config.shares.is_empty() {
        // The FUSE session (the guest's inodes and open files) lives in
        // the VMM and would not come back with the snapshot.
        return Err(Error::Invalid {
            path: dir.to_path_buf(),
            reason: "the VM shares host directories (virtio-fs), which a snapshot cannot keep"
                .into(),
        });
    }
    let name = dir.file_name().ok_or_else(|| Error::Invalid {
        path: dir.to_path_buf(),
        reason: "names no directory".into(),
    })?;
    let mut partial = name.to_owned();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = dir.with_file_name(partial);
    // The guest's memory is the owner's alone to read.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&partial)
        .map_err(io_at(&partial))?;
    let written = write(running, config, &partial)
        .and_then(|()| fs::rename(&partial, dir).map_err(io_at(dir)));
    if written.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    written
}

fn write<H>(running: &mut Running<H>, config: &VmConfig, dir: &Path) -> Result<()>
where
    H: Hypervisor,
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    // Hashing the inputs is the slow part: done while the VM runs. Their
    // digests stay in the directory, so a restore reads them only if
    // they changed.
    let (identity, _) = template::identity(config, dir)?;
    let path = dir.join(CONFIG);
    let text = serde_json::to_vec_pretty(config).expect("a config encodes");
    fs::write(&path, text).map_err(io_at(&path))?;
    running.pause()?;
    let saved = running
        .save(dir, &identity)
        .map_err(Error::from)
        .and_then(|()| match &config.scratch {
            Some((disk, _)) => Ok(scratch::copy(disk, &dir.join(SCRATCH))?),
            None => Ok(()),
        });
    running.resume();
    saved
}

/// The config of the VM saved in `dir`, as a VM restored from it runs: it
/// has no hybrid vsock socket (that path is the saved VM's), and needs a
/// scratch disk of its own (see [`restore`]).
pub fn config(dir: &Path) -> Result<VmConfig> {
    let path = dir.join(CONFIG);
    let text = fs::read(&path).map_err(io_at(&path))?;
    let mut config: VmConfig = serde_json::from_slice(&text).map_err(|e| Error::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    config.vsock.uds = None;
    Ok(config)
}

/// The VM saved in `dir`, for `config` (from [`config`], with a path of its
/// own for the scratch disk): its inputs checked against the saved ones
/// (by content) and its state read first, then the saved scratch disk
/// copied to that path, then its memory and state restored.
pub fn restore<H, F>(open: F, dir: &Path, config: &VmConfig, start: Instant) -> Result<UtilityVm<H>>
where
    H: Hypervisor + Send,
    H::Vm: Send + Stateful,
    VcpuOf<H>: Stateful,
    F: FnOnce() -> hypervisor::Result<H> + Send,
{
    let saved_scratch = dir.join(SCRATCH);
    let saved_config = VmConfig {
        scratch: (config.scratch.clone()).map(|(_, size)| (saved_scratch.clone(), size)),
        ..config.clone()
    };
    let (identity, _) = template::identity(&saved_config, dir)?;
    let saved = snapshot::read(dir, config.host).map_err(vm::Error::from)?;
    saved.check_identity(&identity).map_err(vm::Error::from)?;
    if let Some((disk, _)) = &config.scratch {
        scratch::copy(&saved_scratch, disk)?;
    }
    Ok(UtilityVm::restore(open, config, start, saved, &identity)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_snapshot_is_asked_for_at_a_time_and_an_ending_vm_answers() {
        let (requests, ending) = (Requests::default(), Arc::new(Ending::default()));
        let first = {
            let (requests, ending) = (requests.clone(), ending.clone());
            std::thread::spawn(move || requests.ask("/one".into(), &ending))
        };
        while lock(&requests.0).is_none() {
            std::thread::yield_now();
        }
        let second = requests.ask("/two".into(), &ending).unwrap_err();
        assert!(second.contains("another snapshot"), "{second}");
        // What the owner does when the VM ends while a client waits.
        let asked = lock(&requests.0).take().unwrap();
        assert_eq!(asked.dir, Path::new("/one"));
        drop(asked);
        assert_eq!(first.join().unwrap().unwrap_err(), "the VM ended");
    }

    #[test]
    fn a_missing_or_garbled_config_names_the_file() {
        let dir = std::env::temp_dir().join(format!("uvm-snapshot-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let err = config(&dir).unwrap_err().to_string();
        assert!(
            err.contains("vm.json") && err.contains("No such file"),
            "{err}"
        );
        fs::write(dir.join(CONFIG), "7").unwrap();
        let err = config(&dir).unwrap_err().to_string();
        assert!(err.contains("vm.json: invalid type"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}
