//! Host directories and files in the container (`uvm run -v`, an OCI
//! bundle's bind mounts), each a shared directory (virtio-fs) the agent
//! mounts where asked. A directory is shared live: what the container
//! writes there reaches the host, what the host changes the container
//! sees, nothing is copied. A file is copied, when the VM starts, into a
//! directory of its own that is shared instead (sharing the file's own
//! directory would show the VM its neighbours too): the container sees the
//! copy and its writes stay there. No mount adds a layer, so a template
//! (keyed by the number of shares) serves any of them.

use std::path::{Path, PathBuf};

use crate::process::MountSource;
use crate::vm::{Share, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("volume {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume {0}: neither a directory nor a file")]
    Kind(PathBuf),
}

/// `config` with each host source of its container's mounts made a share
/// after its others: a directory itself, a file by way of a copy in a
/// directory of its own under `dir`.
pub fn attach(config: &VmConfig, dir: &Path) -> Result<VmConfig, Error> {
    let mut config = config.clone();
    let Some(process) = config.process.as_mut() else {
        return Ok(config);
    };
    for (n, mount) in process.mounts.iter_mut().enumerate() {
        let MountSource::Host(host) = &mount.source else {
            continue;
        };
        let (shared, file) = shared_dir(host, &dir.join(n.to_string()))?;
        mount.source = MountSource::Share {
            index: config.shares.len() as u32,
            file,
        };
        config.shares.push(Share {
            dir: shared,
            read_only: mount.read_only,
            keep_cache: false,
        });
    }
    Ok(config)
}

/// The directory to share for `host`: itself if it is a directory, else
/// `copies` holding a copy of the file, whose name comes along.
fn shared_dir(host: &Path, copies: &Path) -> Result<(PathBuf, Option<String>), Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let meta = std::fs::metadata(host).map_err(io(host))?;
    if meta.is_dir() {
        return Ok((std::fs::canonicalize(host).map_err(io(host))?, None));
    }
    let name = host.file_name().filter(|_| meta.is_file());
    let Some(name) = name else {
        return Err(Error::Kind(host.to_owned()));
    };
    std::fs::create_dir_all(copies).map_err(io(copies))?;
    std::fs::copy(host, copies.join(name)).map_err(io(host))?;
    let copies = std::fs::canonicalize(copies).map_err(io(copies))?;
    Ok((copies, Some(name.to_string_lossy().into_owned())))
}
