//! Content digests (`sha256:<hex>`): what blobs and layers are named by in
//! the store, and readers that compute one while data streams through.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::{Error, Result};

/// A sha256 digest, the only algorithm images use in practice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::bad(format!("digest {s:?}"), "not a sha256 digest"))?;
        Self::from_hex(hex).ok_or_else(|| Error::bad(format!("digest {s:?}"), "not 64 hex digits"))
    }

    /// A bare hex digest, as docker archives and the store's file names use.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let ok = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| Self { hex: hex.into() })
    }

    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha(Sha256::digest(bytes).into())
    }

    fn from_sha(sum: [u8; 32]) -> Self {
        let hex = sum.iter().map(|b| format!("{b:02x}")).collect();
        Self { hex }
    }

    /// The OCI ChainID of layers with these diff_ids, bottom first: the
    /// bottom's diff_id, then sha256 of "PARENT_CHAIN DIFF_ID" per layer.
    pub fn chain(diff_ids: &[Digest]) -> Option<Self> {
        let (bottom, rest) = diff_ids.split_first()?;
        Some(rest.iter().fold(bottom.clone(), |chain, diff_id| {
            Self::of(format!("{chain} {diff_id}").as_bytes())
        }))
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, as `uvm images` shows an ID.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// A reader that hashes what it passes on and counts it.
pub struct Hashing<R> {
    inner: R,
    sha: Sha256,
    len: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            sha: Sha256::new(),
            len: 0,
        }
    }

    /// Reads what is left, then the digest of everything and its length.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_sha(self.sha.finalize().into()), self.len))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Checks that `actual` is `expected`, naming `what` if not.
pub fn verify(what: impl fmt::Display, expected: &Digest, actual: &Digest) -> Result<()> {
    if expected == actual {
        return Ok(());
    }
    Err(Error::bad(
        what,
        format!("its content has digest {actual}, not {expected} (corrupt or truncated)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_sha256_digests() {
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(Digest::of(b"").to_string(), empty);
        assert_eq!(Digest::parse(empty).unwrap(), Digest::of(b""));
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse("sha256:E3B0").is_err());
        assert!(Digest::from_hex("../../etc/passwd").is_none());
    }

    #[test]
    fn chain_ids_follow_the_oci_spec() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert_eq!(Digest::chain(std::slice::from_ref(&a)), Some(a.clone()));
        let ab = Digest::of(format!("{a} {b}").as_bytes());
        assert_eq!(Digest::chain(&[a, b]), Some(ab));
        assert_eq!(Digest::chain(&[]), None);
    }

    #[test]
    fn hashing_reader_hashes_what_it_passes_on() {
        let mut reader = Hashing::new(&b"hello world"[..]);
        let mut first = [0u8; 5];
        reader.read_exact(&mut first).unwrap();
        let (digest, len) = reader.finish().unwrap();
        assert_eq!((digest, len), (Digest::of(b"hello world"), 11));
    }
}
