//! Image references as docker writes them (`busybox`, `localhost:5000/app:1`,
//! `ghcr.io/o/r@sha256:…`), normalized to the full form the store keeps.

use std::fmt;

use crate::{Digest, Error, Result};

pub const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    /// A tag, or the digest of a manifest.
    pub version: Version,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::bad(format!("image reference {s:?}"), reason);
        let (name, version) = match s.split_once('@') {
            Some((name, digest)) => (name, Version::Digest(Digest::parse(digest)?)),
            None => match s.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name, Version::Tag(tag.into())),
                _ => (s, Version::Tag(DEFAULT_TAG.into())),
            },
        };
        if let Version::Tag(tag) = &version {
            if !valid_tag(tag) {
                return Err(bad(
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            Some(_) => (DEFAULT_REGISTRY.into(), name.to_string()),
            None => (DEFAULT_REGISTRY.into(), format!("library/{name}")),
        };
        if !valid_repository(&repository) {
            return Err(bad(
                "a repository is lowercase [a-z0-9] words joined by . _ - and /",
            ));
        }
        Ok(Self {
            registry,
            repository,
            version,
        })
    }
}

fn valid_tag(tag: &str) -> bool {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
    (1..=128).contains(&tag.len()) && !tag.starts_with(['.', '-']) && tag.bytes().all(ok)
}

fn valid_repository(repository: &str) -> bool {
    let word = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && w.starts_with(|c: char| c.is_ascii_alphanumeric())
            && w.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    repository.len() <= 255 && repository.split('/').all(word)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match &self.version {
            Version::Tag(tag) => write!(f, ":{tag}"),
            Version::Digest(digest) => write!(f, "@{digest}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn names_are_normalized_like_docker() {
        assert_eq!(full("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(full("user/app:1.0"), "docker.io/user/app:1.0");
        assert_eq!(full("localhost:5000/test:1"), "localhost:5000/test:1");
        assert_eq!(full("localhost/test"), "localhost/test:latest");
        assert_eq!(full("ghcr.io/o/r/x:v_2"), "ghcr.io/o/r/x:v_2");
        let pinned = format!("quay.io/a/b@{}", Digest::of(b""));
        assert_eq!(full(&pinned), pinned);
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            "UPPER",
            "a//b",
            "a:",
            "a:-x",
            "-a",
            "a@sha256:12",
            "a b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
