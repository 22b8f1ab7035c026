//! Container images for uvm: importing them from the formats real tools
//! write (OCI layouts and archives, docker archives), a content-addressed
//! store of their configs and of their layers converted once into the
//! read-only ext4 images uvm maps as pmem devices, and what an image's
//! config says a container runs.
//!
//! Unix hosts only: layers are converted with e2fsprogs (mkfs.ext4, debugfs)
//! and the store is locked with flock. On Windows the crate is empty.
#![cfg(unix)]

pub mod archive;
pub mod config;
pub mod convert;
pub mod digest;
pub mod reference;
pub mod registry;
pub mod store;

pub use config::RunConfig;
pub use digest::Digest;
pub use reference::Reference;
pub use store::{Image, Store};

/// What went wrong, naming the thing it happened to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{what}: {reason}")]
    Bad { what: String, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn bad(what: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::Bad {
            what: what.to_string(),
            reason: reason.into(),
        }
    }
}

/// `map_err` for I/O on `what`.
pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |err| Error::Io {
        what: what.to_string(),
        err,
    }
}
