//! Host directories and files in the container (`uvm run -v`, an OCI
//! bundle's bind mounts). A directory is shared live (virtio-fs): what the
//! container writes there reaches the host, what the host changes the
//! container sees, and nothing is copied. A file becomes a read-only ext4
//! image that the VM maps like a layer: a copy taken when the VM starts
//! (sharing its directory would show the VM its neighbours too), so the
//! container's writes to it stay in the VM.

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
    #[error("volume {path}: {source}")]
    Image {
        path: PathBuf,
        source: uvm_image::Error,
    },
    #[error("volume {0}: neither a directory nor a file")]
    Kind(PathBuf),
}

/// `config` with each host source of its container's mounts made a share
/// (a directory) or an image in `dir` added after its layers (a file).
pub fn attach(config: &VmConfig, dir: &Path) -> Result<VmConfig, Error> {
    let mut config = config.clone();
    let Some(process) = config.process.as_mut() else {
        return Ok(config);
    };
    for (n, mount) in process.mounts.iter_mut().enumerate() {
        let MountSource::Host(host) = &mount.source else {
            continue;
        };
        let io = |source| Error::Io {
            path: host.clone(),
            source,
        };
        let meta = std::fs::metadata(host).map_err(io)?;
        if meta.is_dir() {
            let dir = std::fs::canonicalize(host).map_err(io)?;
            mount.source = MountSource::Share {
                index: config.shares.len() as u32,
            };
            config.shares.push(Share {
                dir,
                read_only: mount.read_only,
                keep_cache: false,
            });
            continue;
        }
        if !meta.is_file() {
            return Err(Error::Kind(host.clone()));
        }
        let image = dir.join(format!("{n}.img"));
        let file = file_image(host, &image, &dir.join(format!("{n}.d")))?;
        mount.source = MountSource::Layer {
            index: config.layers.len() as u32,
            file: Some(file),
        };
        config.layers.push(image);
    }
    Ok(config)
}

/// Writes the file `host` as the ext4 image `image` (by way of the
/// directory `staging`); returns the file's name.
fn file_image(host: &Path, image: &Path, staging: &Path) -> Result<String, Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let name = host
        .file_name()
        .ok_or_else(|| Error::Kind(host.to_owned()))?;
    std::fs::create_dir_all(image.parent().unwrap_or(Path::new("/"))).map_err(io(image))?;
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    let made = std::fs::copy(host, staging.join(name))
        .map_err(io(host))
        .and_then(|_| {
            uvm_image::convert::from_dir(staging, image).map_err(|source| Error::Image {
                path: host.to_owned(),
                source,
            })
        });
    let _ = std::fs::remove_dir_all(staging);
    made.map(|_| name.to_string_lossy().into_owned())
}
