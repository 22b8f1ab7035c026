//! A paused VM on disk: a directory with two files.
//!
//! - `memory`: guest RAM, its regions in address order (zero pages are
//!   holes). A restored VM maps it copy-on-write.
//! - `state`: one header line of JSON — `format` ("uvm-snapshot"),
//!   `version` ([`VERSION`]), `uvm` (the version that wrote it), `host`
//!   (the KVM host kind), `sha256` (of everything after the line) — then
//!   the state as JSON: the identity of the config it was taken from, the
//!   RAM size, each vCPU's CPUID, every vCPU's and the VM's hypervisor state
//!   and the devices' state ([`State`]).
//!
//! Everything read is checked before any of it is used: a snapshot of
//! another format version, uvm version or host kind, a damaged state or a
//! memory file of the wrong size is an error naming the file and the reason.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{DeviceState, VcpuOf};
use crate::hypervisor::{CpuidEntry, Hypervisor, Stateful};
use crate::pvm::HostKind;

/// The state file's format version: a change to what it holds is a new one.
pub const VERSION: u32 = 1;
const FORMAT: &str = "uvm-snapshot";
const UVM_VERSION: &str = env!("CARGO_PKG_VERSION");
const STATE: &str = "state";
const MEMORY: &str = "memory";
/// Larger state files are not read (a real one is tens of KiB a vCPU).
const MAX_STATE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The first line of the state file.
#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    uvm: String,
    host: HostKind,
    sha256: String,
}

/// What a snapshot holds besides the memory.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct State<H: Hypervisor>
where
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    /// What the VM was built from, as its saver described it: a VM
    /// restored from it must be built from a config with the same.
    pub identity: String,
    pub memory_bytes: u64,
    /// Each vCPU's CPUID: the guest may use every feature listed.
    pub cpuid: Vec<Vec<CpuidEntry>>,
    pub vcpus: Vec<<VcpuOf<H> as Stateful>::State>,
    pub vm: <H::Vm as Stateful>::State,
    pub devices: DeviceState,
}

/// A snapshot read and checked, its memory file open.
pub struct Snapshot<H: Hypervisor>
where
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    pub state: State<H>,
    pub memory: File,
    pub dir: PathBuf,
}

/// Writes `state` into `dir` (which exists and is empty); the memory is
/// written by `memory` into the file it is given.
pub fn write<H: Hypervisor>(
    dir: &Path,
    host: HostKind,
    state: &State<H>,
    memory: impl FnOnce(&File) -> io::Result<()>,
) -> Result<(), Error>
where
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    let at = |name: &str| dir.join(name);
    let io = |path: PathBuf| move |source| Error::Io { path, source };
    let body = serde_json::to_vec(state).map_err(|e| Error::Invalid {
        path: at(STATE),
        reason: format!("encoding the state: {e}"),
    })?;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        uvm: UVM_VERSION.into(),
        host,
        sha256: sha256(&body),
    };
    let header = serde_json::to_string(&header).expect("a header always encodes");
    let file = File::create(at(MEMORY)).map_err(io(at(MEMORY)))?;
    memory(&file)
        .and_then(|()| file.sync_all())
        .map_err(io(at(MEMORY)))?;
    let mut file = File::create(at(STATE)).map_err(io(at(STATE)))?;
    writeln!(file, "{header}")
        .and_then(|()| file.write_all(&body))
        .and_then(|()| file.sync_all())
        .map_err(io(at(STATE)))
}

/// Reads and checks the snapshot in `dir` for a VM on a `host` host.
pub fn read<H: Hypervisor>(dir: &Path, host: HostKind) -> Result<Snapshot<H>, Error>
where
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    let path = dir.join(STATE);
    let invalid = |reason: String| Error::Invalid {
        path: path.clone(),
        reason,
    };
    let text = read_bounded(&path)?;
    let line = text.iter().position(|&b| b == b'\n');
    let line = line.ok_or_else(|| invalid("no header line: not a uvm snapshot".into()))?;
    let (header, body) = (&text[..line], &text[line + 1..]);
    let header: Header = serde_json::from_slice(header)
        .map_err(|e| invalid(format!("not a uvm snapshot header: {e}")))?;
    check_header(&header, host, body).map_err(invalid)?;
    let state: State<H> =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the state: {e}")))?;
    let memory_path = dir.join(MEMORY);
    let io = |source| Error::Io {
        path: memory_path.clone(),
        source,
    };
    let memory = File::open(&memory_path).map_err(io)?;
    let len = memory.metadata().map_err(io)?.len();
    if len != state.memory_bytes {
        return Err(Error::Invalid {
            path: memory_path,
            reason: format!(
                "{len} bytes where the state says {}: truncated or not its own",
                state.memory_bytes
            ),
        });
    }
    Ok(Snapshot {
        state,
        memory,
        dir: dir.to_path_buf(),
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut text = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_STATE + 1), &mut text).map_err(io)?;
    if text.len() as u64 > MAX_STATE {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            reason: format!("larger than {} MiB", MAX_STATE >> 20),
        });
    }
    Ok(text)
}

fn check_header(header: &Header, host: HostKind, body: &[u8]) -> Result<(), String> {
    if header.format != FORMAT {
        return Err(format!("format {:?}, not {FORMAT:?}", header.format));
    }
    if header.version != VERSION {
        return Err(format!(
            "format version {}: this uvm reads version {VERSION}",
            header.version
        ));
    }
    if header.uvm != UVM_VERSION {
        return Err(format!(
            "written by uvm {}: this is uvm {UVM_VERSION}",
            header.uvm
        ));
    }
    if header.host != host {
        return Err(format!(
            "taken on a {:?} KVM host: this one is {host:?}",
            header.host
        ));
    }
    if sha256(body) != header.sha256 {
        return Err("damaged: its checksum does not match".into());
    }
    Ok(())
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl<H: Hypervisor> Snapshot<H>
where
    H::Vm: Stateful,
    VcpuOf<H>: Stateful,
{
    /// Refuses a snapshot of a VM whose config had another identity.
    pub fn check_identity(&self, identity: &str) -> Result<(), Error> {
        match self.state.identity == identity {
            true => Ok(()),
            false => Err(Error::Invalid {
                path: self.dir.clone(),
                reason: "taken of a VM with other inputs (kernel, initrd, layers, memory, \
                         vCPUs or flags)"
                    .into(),
            }),
        }
    }
}

/// The first CPUID leaf a restored vCPU would see differently from the
/// snapshot's: its guest may use features this host's CPU lacks.
pub fn cpuid_difference(saved: &[Vec<CpuidEntry>], here: &[Vec<CpuidEntry>]) -> Option<String> {
    if saved.len() != here.len() {
        return Some(format!("{} vCPUs saved, {} here", saved.len(), here.len()));
    }
    for (cpu, (saved, here)) in saved.iter().zip(here).enumerate() {
        let leaf = |e: &CpuidEntry| (e.function, e.index);
        for entry in saved {
            let found = here.iter().find(|h| leaf(h) == leaf(entry));
            if found != Some(entry) {
                return Some(format!(
                    "vCPU {cpu}'s CPUID leaf {:#x} subleaf {} differs on this host",
                    entry.function, entry.index
                ));
            }
        }
        if here.len() != saved.len() {
            return Some(format!("vCPU {cpu} has other CPUID leaves on this host"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(body: &[u8]) -> Header {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            uvm: UVM_VERSION.into(),
            host: HostKind::Pvm,
            sha256: sha256(body),
        }
    }

    #[test]
    fn a_header_is_checked_field_by_field() {
        let body = b"{}";
        assert_eq!(check_header(&header(body), HostKind::Pvm, body), Ok(()));
        let refused = |h: Header, host, body: &[u8]| check_header(&h, host, body).unwrap_err();
        let e = refused(header(body), HostKind::Hardware, body);
        assert!(e.contains("Pvm KVM host"), "{e}");
        let e = refused(header(body), HostKind::Pvm, b"{ }");
        assert!(e.contains("checksum"), "{e}");
        let e = refused(
            Header {
                version: VERSION + 1,
                ..header(body)
            },
            HostKind::Pvm,
            body,
        );
        assert!(e.contains("format version 2"), "{e}");
        let e = refused(
            Header {
                uvm: "0.0.0".into(),
                ..header(body)
            },
            HostKind::Pvm,
            body,
        );
        assert!(e.contains("uvm 0.0.0"), "{e}");
    }

    #[test]
    fn a_cpuid_leaf_that_differs_is_named() {
        let leaf = |function, ebx| CpuidEntry {
            function,
            ebx,
            ..CpuidEntry::default()
        };
        let saved = vec![vec![leaf(1, 0), leaf(7, 0x20)]];
        assert_eq!(cpuid_difference(&saved, &saved.clone()), None);
        let fewer_features = vec![vec![leaf(1, 0), leaf(7, 0)]];
        let e = cpuid_difference(&saved, &fewer_features).unwrap();
        assert!(e.contains("leaf 0x7"), "{e}");
        let e = cpuid_difference(&saved, &[]).unwrap();
        assert!(e.contains("1 vCPUs saved, 0 here"), "{e}");
    }
}
