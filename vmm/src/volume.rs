//! Host directories and files in the container (`uvm run -v`, an OCI
//! bundle's bind mounts): each becomes a read-only ext4 image that the VM
//! maps like a layer and the agent mounts where asked. The VM gets a copy
//! taken when it starts: the cost grows with the content, and what the
//! container writes there stays in the VM.

use std::path::{Path, PathBuf};

use crate::process::MountSource;
use crate::vm::VmConfig;

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

/// `config` with each host source of its container's mounts made an image
/// in `dir` and added after its layers.
pub fn attach(config: &VmConfig, dir: &Path) -> Result<VmConfig, Error> {
    let mut config = config.clone();
    let Some(process) = config.process.as_mut() else {
        return Ok(config);
    };
    for (n, mount) in process.mounts.iter_mut().enumerate() {
        let MountSource::Host(host) = &mount.source else {
            continue;
        };
        let image = dir.join(format!("{n}.img"));
        let file = make_image(host, &image, &dir.join(format!("{n}.d")))?;
        mount.source = MountSource::Layer {
            index: config.layers.len() as u32,
            file,
        };
        config.layers.push(image);
    }
    Ok(config)
}

/// Writes `host` (a directory, or a file by way of `staging`) as the ext4
/// image `image`; returns the file's name for a file.
fn make_image(host: &Path, image: &Path, staging: &Path) -> Result<Option<String>, Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let convert = |from: &Path| {
        uvm_image::convert::from_dir(from, image).map_err(|source| Error::Image {
            path: host.to_owned(),
            source,
        })
    };
    std::fs::create_dir_all(image.parent().unwrap_or(Path::new("/"))).map_err(io(image))?;
    let meta = std::fs::metadata(host).map_err(io(host))?;
    if meta.is_dir() {
        return convert(host).map(|_| None);
    }
    let name = host.file_name().filter(|_| meta.is_file());
    let Some(name) = name else {
        return Err(Error::Kind(host.to_owned()));
    };
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    let made = std::fs::copy(host, staging.join(name))
        .map_err(io(host))
        .and_then(|_| convert(staging));
    let _ = std::fs::remove_dir_all(staging);
    made.map(|_| Some(name.to_string_lossy().into_owned()))
}
