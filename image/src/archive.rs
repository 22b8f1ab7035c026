//! Reading an image from what real tools write: an OCI image layout
//! directory, an OCI archive (a tar of one), or a docker archive
//! (`docker save`: manifest.json, configs and layer tars). Everything an
//! image says about itself is checked: blob digests, and that the manifest
//! has as many layers as the config has diff_ids.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::Deserialize;

use crate::digest::{verify, Digest};
use crate::reference::Reference;
use crate::{io, Error, Result};

/// Manifests, indexes and configs are small: larger ones are refused
/// rather than read into memory.
pub const MAX_JSON: u64 = 4 << 20;
/// Index → index → manifest nesting deeper than this is refused.
const MAX_NESTING: usize = 4;

const OCI_ANNOTATION_NAME: &str = "io.containerd.image.name";
const OCI_ANNOTATION_REF: &str = "org.opencontainers.image.ref.name";

/// An image read from a source, before it is in the store.
pub struct Pending {
    pub config: Vec<u8>,
    pub config_digest: Digest,
    /// The config parsed (`config` is what the store keeps, byte for byte).
    pub parsed: ImageConfiguration,
    pub layers: Vec<LayerBlob>,
    /// The name the source gives the image, if any.
    pub name: Option<Reference>,
}

impl Pending {
    pub fn diff_ids(&self) -> Vec<Digest> {
        self.layers.iter().map(|l| l.diff_id.clone()).collect()
    }
}

/// One layer's blob: a tar, possibly gzip or zstd compressed.
pub struct LayerBlob {
    pub path: PathBuf,
    /// The blob's own digest where the source names one (OCI); docker
    /// archives name only the uncompressed diff_id.
    pub digest: Option<Digest>,
    /// Its size, where the source says it.
    pub size: Option<u64>,
    pub diff_id: Digest,
}

/// Reads the image at `path` (a directory, or an archive unpacked into
/// `scratch` first). `tag` picks one of several images in an OCI layout.
pub fn read(path: &Path, tag: Option<&str>, scratch: &Path) -> Result<Pending> {
    let meta = std::fs::metadata(path).map_err(io(path.display()))?;
    let dir = if meta.is_dir() {
        path.to_owned()
    } else {
        unpack(path, scratch)?;
        scratch.to_owned()
    };
    let what = path.display().to_string();
    if dir.join("index.json").is_file() {
        oci_layout(&dir, &what, tag)
    } else if dir.join("manifest.json").is_file() {
        docker_archive(&dir, &what)
    } else {
        Err(Error::bad(
            what,
            "not an image: no OCI index.json and no docker manifest.json in it",
        ))
    }
}

/// Unpacks the archive's regular files and directories into `dir`.
fn unpack(archive: &Path, dir: &Path) -> Result<()> {
    let what = archive.display();
    let file = File::open(archive).map_err(io(&what))?;
    let mut tar = tar::Archive::new(file);
    let entries = tar
        .entries()
        .map_err(|e| Error::bad(&what, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| Error::bad(&what, format!("reading it as a tar archive: {e}")))?;
        let name = entry.path().map_err(io(&what))?.into_owned();
        let Some(relative) = inside(&name) else {
            return Err(Error::bad(
                &what,
                format!("{} escapes the archive", name.display()),
            ));
        };
        let target = dir.join(relative);
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&target).map_err(io(&what))?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io(&what))?;
                }
                let mut out = File::create(&target).map_err(io(target.display()))?;
                std::io::copy(&mut entry, &mut out)
                    .map_err(|e| Error::bad(&what, format!("{}: {e}", name.display())))?;
            }
            // Links and others have no place in an image archive.
            _ => {}
        }
    }
    Ok(())
}

/// `name` as a relative path with no `..`, or None if it would escape.
pub(crate) fn inside(name: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in name.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A JSON file of the image, bounded in size.
fn read_json(path: &Path, what: &str) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(io(format!("{what}: {}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(io(format!("{what}: {}", path.display())))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(Error::bad(
            format!("{what}: {}", path.display()),
            format!("larger than {MAX_JSON} bytes"),
        ));
    }
    Ok(bytes)
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::bad(what, format!("not valid JSON: {e}")))
}

struct Layout<'a> {
    dir: &'a Path,
    what: &'a str,
}

impl Layout<'_> {
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    /// A JSON blob, checked against its descriptor's digest.
    fn blob(&self, descriptor: &Descriptor) -> Result<(Vec<u8>, Digest)> {
        let digest = Digest::parse(descriptor.digest().as_ref())?;
        let what = format!("{}: blob {digest}", self.what);
        let bytes = read_json(&self.blob_path(&digest), &what)?;
        verify(&what, &digest, &Digest::of(&bytes))?;
        Ok((bytes, digest))
    }
}

fn oci_layout(dir: &Path, what: &str, tag: Option<&str>) -> Result<Pending> {
    let layout = Layout { dir, what };
    let index_what = format!("{what}: index.json");
    let index: ImageIndex = parse(&read_json(&dir.join("index.json"), what)?, &index_what)?;
    let chosen = choose_entry(index.manifests(), tag, &index_what)?;
    let name = chosen.annotations().as_ref().and_then(|a| {
        let full = a.get(OCI_ANNOTATION_NAME);
        let named = a.get(OCI_ANNOTATION_REF).filter(|r| r.contains(['/', ':']));
        full.or(named).and_then(|r| Reference::parse(r).ok())
    });
    let manifest = resolve_manifest(&layout, chosen, 0)?;
    let (config, config_digest) = layout.blob(manifest.config())?;
    let blob_path = |digest: &Digest| layout.blob_path(digest);
    let mut pending = from_manifest(&manifest, config, config_digest, what, blob_path)?;
    pending.name = name;
    Ok(pending)
}

/// An image of `manifest` and its `config`, whose layer blobs are (or will
/// be) at `blob_path(digest)`.
pub(crate) fn from_manifest(
    manifest: &ImageManifest,
    config: Vec<u8>,
    config_digest: Digest,
    what: &str,
    blob_path: impl Fn(&Digest) -> PathBuf,
) -> Result<Pending> {
    let parsed = parse_config(&config, what)?;
    let diff_ids = diff_ids(&parsed, what)?;
    if manifest.layers().len() != diff_ids.len() {
        return Err(mismatch(what, manifest.layers().len(), diff_ids.len()));
    }
    let layers = manifest
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let digest = Digest::parse(layer.digest().as_ref())?;
            Ok(LayerBlob {
                path: blob_path(&digest),
                size: Some(layer.size()),
                digest: Some(digest),
                diff_id,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Pending {
        config,
        config_digest,
        parsed,
        layers,
        name: None,
    })
}

/// The index entry to import: the only one, or the one tagged `tag`.
fn choose_entry<'a>(
    entries: &'a [Descriptor],
    tag: Option<&str>,
    what: &str,
) -> Result<&'a Descriptor> {
    let tagged = |d: &&Descriptor| {
        let name = d
            .annotations()
            .as_ref()
            .and_then(|a| a.get(OCI_ANNOTATION_REF));
        name.is_some_and(|n| Some(n.as_str()) == tag || n.rsplit(':').next() == tag)
    };
    match entries {
        [] => Err(Error::bad(what, "lists no image")),
        [only] => Ok(only),
        many => many.iter().find(tagged).ok_or_else(|| {
            Error::bad(
                what,
                format!(
                    "lists {} images: name the one to import with --name (its tag picks it)",
                    many.len()
                ),
            )
        }),
    }
}

pub(crate) fn is_index(media: &str) -> bool {
    media == "application/vnd.oci.image.index.v1+json"
        || media == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// The image manifest `descriptor` leads to, through indexes picking
/// linux/amd64.
fn resolve_manifest(
    layout: &Layout,
    descriptor: &Descriptor,
    depth: usize,
) -> Result<ImageManifest> {
    let (bytes, digest) = layout.blob(descriptor)?;
    let what = format!("{}: manifest {digest}", layout.what);
    if depth > MAX_NESTING {
        return Err(Error::bad(what, "indexes nested too deep"));
    }
    let media = descriptor.media_type().to_string();
    if !is_index(&media) {
        return parse(&bytes, &what);
    }
    let index: ImageIndex = parse(&bytes, &what)?;
    resolve_manifest(layout, linux_amd64(&index, &what)?, depth + 1)
}

/// The linux/amd64 entry of an image index (`what` in errors).
pub(crate) fn linux_amd64<'a>(index: &'a ImageIndex, what: &str) -> Result<&'a Descriptor> {
    let amd64 = index.manifests().iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| *p.architecture() == Arch::Amd64 && *p.os() == Os::Linux)
    });
    amd64.ok_or_else(|| Error::bad(what, "has no linux/amd64 image"))
}

fn parse_config(bytes: &[u8], what: &str) -> Result<ImageConfiguration> {
    parse(bytes, &format!("{what}: image config"))
}

pub(crate) fn diff_ids(config: &ImageConfiguration, what: &str) -> Result<Vec<Digest>> {
    config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| {
            Digest::parse(d).map_err(|e| Error::bad(format!("{what}: image config"), e.to_string()))
        })
        .collect()
}

fn mismatch(what: &str, layers: usize, diff_ids: usize) -> Error {
    Error::bad(
        what,
        format!("the manifest has {layers} layers but the config's rootfs has {diff_ids} diff_ids"),
    )
}

/// One image of a docker archive's manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_archive(dir: &Path, what: &str) -> Result<Pending> {
    let manifest_what = format!("{what}: manifest.json");
    let entries: Vec<DockerEntry> = parse(
        &read_json(&dir.join("manifest.json"), what)?,
        &manifest_what,
    )?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => return Err(Error::bad(manifest_what, "lists no image")),
        many => {
            return Err(Error::bad(
                manifest_what,
                format!("lists {} images; uvm imports archives of one", many.len()),
            ))
        }
    };
    let member = |name: &str| {
        inside(Path::new(name))
            .map(|p| dir.join(p))
            .ok_or_else(|| Error::bad(&manifest_what, format!("{name} escapes the archive")))
    };
    let config = read_json(&member(&entry.config)?, what)?;
    let config_digest = Digest::of(&config);
    let parsed = parse_config(&config, what)?;
    let diff_ids = diff_ids(&parsed, what)?;
    if entry.layers.len() != diff_ids.len() {
        return Err(mismatch(what, entry.layers.len(), diff_ids.len()));
    }
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(path, diff_id)| {
            Ok(LayerBlob {
                path: member(path)?,
                digest: None,
                size: None,
                diff_id,
            })
        })
        .collect::<Result<_>>()?;
    let name = entry
        .repo_tags
        .as_ref()
        .and_then(|tags| tags.first())
        .and_then(|t| Reference::parse(t).ok());
    Ok(Pending {
        config,
        config_digest,
        parsed,
        layers,
        name,
    })
}
