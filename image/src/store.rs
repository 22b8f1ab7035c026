//! The image store: content-addressed, shared by every image in it.
//!
//! ```text
//! ROOT/lock               shared by imports, exclusive for rmi and prune
//! ROOT/names.json         name → image ID (the config's digest)
//! ROOT/images/HEX.json    an image's config, byte for byte
//! ROOT/images/HEX.lock    shared while a VM runs the image
//! ROOT/layers/HEX.ext4    a layer converted once, keyed by its diff_id
//! ROOT/layers/HEX.lock    held while the layer is converted
//! ROOT/tmp/               work in progress, renamed into place when done
//! ```
//! Everything appears by rename, so a killed import leaves nothing but
//! files in tmp/, which the next rmi or prune removes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use oci_spec::image::{ImageConfiguration, ImageManifest};

use crate::archive::{self, LayerBlob, Pending};
use crate::digest::{verify, Digest, Hashing};
use crate::registry::{Access, Registry};
use crate::{convert, io, Error, Reference, Result};

pub struct Store {
    root: PathBuf,
}

/// An image found in the store, held (not removable) while this lives.
pub struct Image {
    pub id: Digest,
    pub config: ImageConfiguration,
    /// The converted layers, bottom first.
    pub layers: Vec<PathBuf>,
    _hold: File,
}

/// A line of `uvm images`.
pub struct Summary {
    pub id: Digest,
    pub names: Vec<String>,
    pub layers: usize,
    /// Bytes of its converted layers.
    pub size: u64,
    pub created: Option<String>,
}

/// What an import did, layer by layer.
pub enum Progress<'a> {
    Downloading {
        index: usize,
        of: usize,
        done: u64,
        total: u64,
    },
    Reused {
        index: usize,
        of: usize,
        diff_id: &'a Digest,
    },
    Converted {
        index: usize,
        of: usize,
        diff_id: &'a Digest,
        bytes: u64,
        seconds: f64,
    },
}

/// What rmi and prune removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub names: Vec<String>,
    pub images: Vec<Digest>,
    pub layers: Vec<Digest>,
}

type Names = BTreeMap<String, String>;

impl Store {
    /// `$UVM_STORE`, else /var/lib/uvm for root, else
    /// `$XDG_DATA_HOME/uvm` or ~/.local/share/uvm.
    pub fn default_root() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("UVM_STORE") {
            return Some(dir.into());
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return Some("/var/lib/uvm".into());
        }
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))?;
        Some(data.join("uvm"))
    }

    pub fn open(root: &Path) -> Result<Self> {
        for dir in ["images", "layers", "tmp"] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).map_err(io(format!("image store {}", dir.display())))?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Imports the image at `source` (OCI layout, OCI archive or docker
    /// archive), naming it `name` or what the source calls it.
    pub fn import(
        &self,
        source: &Path,
        name: Option<&str>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Digest, Option<Reference>)> {
        let name = name.map(Reference::parse).transpose()?;
        let _shared = self.lock(false)?;
        let scratch = self.tmp_path("import");
        let tag = name.as_ref().and_then(|n| match &n.version {
            crate::reference::Version::Tag(tag) => Some(tag.as_str()),
            crate::reference::Version::Digest(_) => None,
        });
        let added = std::fs::create_dir(&scratch)
            .map_err(io(scratch.display()))
            .and_then(|()| archive::read(source, tag, &scratch))
            .and_then(|pending| {
                let name = name.or_else(|| pending.name.clone());
                self.add(pending, name.as_ref(), progress)
                    .map(|id| (id, name))
            });
        let _ = std::fs::remove_dir_all(&scratch);
        added
    }

    /// Pulls `reference` from its registry: the manifest and config, then
    /// the layers not stored yet, converted as they are imported.
    pub fn pull(
        &self,
        reference: &Reference,
        access: &Access,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Digest> {
        let _shared = self.lock(false)?;
        let what = reference.to_string();
        let mut registry = Registry::new(reference, access);
        let (manifest, _) = registry.manifest(&reference.version)?;
        let manifest: ImageManifest = archive::parse(&manifest, &what)?;
        let config_digest = Digest::parse(manifest.config().digest().as_ref())?;
        let config = registry.json_blob(&config_digest)?;
        let scratch = self.tmp_path("pull");
        let blob_path = |digest: &Digest| scratch.join(digest.hex());
        let pending = archive::from_manifest(&manifest, config, config_digest, &what, blob_path)?;
        let pulled = std::fs::create_dir(&scratch)
            .map_err(io(scratch.display()))
            .and_then(|()| self.download_missing(&mut registry, &pending, progress))
            .and_then(|()| self.add(pending, Some(reference), progress));
        let _ = std::fs::remove_dir_all(&scratch);
        pulled
    }

    /// Downloads the blobs of the layers the store lacks.
    fn download_missing(
        &self,
        registry: &mut Registry,
        pending: &Pending,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let plan = plan(&pending.diff_ids());
        let missing = plan
            .iter()
            .filter(|(key, _)| !self.layer_path(key).exists());
        let blobs = missing.flat_map(|(_, range)| range.clone());
        let of = pending.layers.len();
        for index in blobs {
            let blob = &pending.layers[index];
            let (Some(digest), Some(total)) = (&blob.digest, blob.size) else {
                continue;
            };
            registry.download(digest, total, &blob.path, &mut |done| {
                progress(Progress::Downloading {
                    index,
                    of,
                    done,
                    total,
                })
            })?;
        }
        Ok(())
    }

    /// Stores a read image: its layers converted (those not stored yet),
    /// then its config, then its name.
    fn add(
        &self,
        pending: Pending,
        name: Option<&Reference>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Digest> {
        let plan = plan(&pending.diff_ids());
        let of = plan.len();
        for (index, (key, range)) in plan.iter().enumerate() {
            let started = Instant::now();
            match self.ensure_layer(key, &pending.layers[range.clone()])? {
                None => progress(Progress::Reused {
                    index,
                    of,
                    diff_id: key,
                }),
                Some(bytes) => progress(Progress::Converted {
                    index,
                    of,
                    diff_id: key,
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                }),
            }
        }
        let id = pending.config_digest;
        let config = self.image_path(&id);
        if !config.exists() {
            self.write_atomic(&config, &pending.config)?;
        }
        if let Some(name) = name {
            self.update_names(|names| {
                names.insert(name.to_string(), id.to_string());
            })?;
        }
        Ok(id)
    }

    /// Converts layers into the stored layer `key` unless it is stored;
    /// the uncompressed bytes read if it converted them. Its lock makes a
    /// concurrent import of the same layer wait and then find it.
    fn ensure_layer(&self, key: &Digest, blobs: &[LayerBlob]) -> Result<Option<u64>> {
        let stored = self.layer_path(key);
        let _converting = lock_file(&stored.with_extension("lock"), true)?;
        if stored.exists() {
            return Ok(None);
        }
        let out = self.tmp_path("layer");
        let converted = self.convert(blobs, &out).and_then(|bytes| {
            std::fs::rename(&out, &stored).map_err(io(stored.display()))?;
            Ok(bytes)
        });
        if converted.is_err() {
            let _ = std::fs::remove_file(&out);
        }
        converted.map(Some)
    }

    /// Converts layer blobs, bottom first, into one image at `out`.
    fn convert(&self, blobs: &[LayerBlob], out: &Path) -> Result<u64> {
        let mut stack = convert::Stack::new(&self.tmp_path("staging"))?;
        let mut bytes = 0;
        for blob in blobs {
            bytes += add_verified(&mut stack, blob)?;
        }
        stack.build(out)?;
        Ok(bytes)
    }

    /// The image `reference` names (a name, an ID or an ID prefix), held
    /// until the returned value goes.
    pub fn find(&self, reference: &str) -> Result<Image> {
        let id = self.resolve(reference)?;
        let hold = lock_file(&self.image_path(&id).with_extension("lock"), false)?;
        let config = self.config(&id)?;
        let layers = self.layers_of(&config, &id)?;
        for layer in &layers {
            if !layer.exists() {
                return Err(Error::bad(
                    format!("image {reference}"),
                    format!("its layer {} is missing from the store", layer.display()),
                ));
            }
        }
        Ok(Image {
            id,
            config,
            layers,
            _hold: hold,
        })
    }

    /// The images, newest name first.
    pub fn list(&self) -> Result<Vec<Summary>> {
        let names = self.names()?;
        let mut out = Vec::new();
        for id in self.image_ids()? {
            let config = self.config(&id)?;
            let layers = self.layers_of(&config, &id)?;
            let size = layers
                .iter()
                .filter_map(|l| std::fs::metadata(l).ok())
                .map(|m| m.len())
                .sum();
            out.push(Summary {
                names: names_of(&names, &id),
                layers: layers.len(),
                size,
                created: config.created().clone(),
                id,
            });
        }
        Ok(out)
    }

    /// The config of the image `reference` names, as stored.
    pub fn inspect(&self, reference: &str) -> Result<(Digest, Vec<String>, ImageConfiguration)> {
        let id = self.resolve(reference)?;
        let named = names_of(&self.names()?, &id);
        Ok((id.clone(), named, self.config(&id)?))
    }

    /// `uvm rmi`: a name goes; the image with its last name (or named by
    /// ID), unless a VM runs it; then every layer no image uses.
    pub fn remove(&self, reference: &str) -> Result<Removed> {
        let _exclusive = self.lock(true)?;
        let id = self.resolve(reference)?;
        let by_name = Reference::parse(reference).ok().map(|r| r.to_string());
        let mut removed = Removed::default();
        let mine = names_of(&self.names()?, &id);
        let dropping: Vec<String> = match &by_name {
            Some(name) if mine.contains(name) => vec![name.clone()],
            _ => mine.clone(),
        };
        if dropping.len() == mine.len() {
            self.remove_image(&id, reference)?;
            removed.images.push(id);
        }
        self.update_names(|names| names.retain(|k, _| !dropping.contains(k)))?;
        removed.names = dropping;
        removed.layers = self.collect_layers()?;
        Ok(removed)
    }

    /// `uvm image prune`: images without a name that no VM runs, layers no
    /// image uses, and what killed imports left in tmp/.
    pub fn prune(&self) -> Result<Removed> {
        let _exclusive = self.lock(true)?;
        let names = self.names()?;
        let mut removed = Removed::default();
        for id in self.image_ids()? {
            let unnamed = names_of(&names, &id).is_empty();
            if unnamed && self.remove_image(&id, &id.to_string()).is_ok() {
                removed.images.push(id);
            }
        }
        removed.layers = self.collect_layers()?;
        Ok(removed)
    }

    /// Removes an image's config unless a VM holds it.
    fn remove_image(&self, id: &Digest, reference: &str) -> Result<()> {
        let lock_path = self.image_path(id).with_extension("lock");
        if open_lock(&lock_path)?.try_lock().is_err() {
            return Err(Error::bad(
                format!("image {reference}"),
                "in use by a running VM (stop it first)",
            ));
        }
        std::fs::remove_file(self.image_path(id)).map_err(io(format!("image {reference}")))?;
        let _ = std::fs::remove_file(lock_path);
        Ok(())
    }

    /// Removes the layers no image uses and stale work in tmp/; the
    /// caller holds the store exclusively (no import runs).
    fn collect_layers(&self) -> Result<Vec<Digest>> {
        let mut used = std::collections::BTreeSet::new();
        for id in self.image_ids()? {
            let diff_ids = archive::diff_ids(&self.config(&id)?, &format!("image {id}"))?;
            used.extend(plan(&diff_ids).into_iter().map(|(key, _)| key));
        }
        let mut removed = Vec::new();
        for (digest, path) in self.entries("layers", "ext4")? {
            if !used.contains(&digest) {
                std::fs::remove_file(&path).map_err(io(path.display()))?;
                let _ = std::fs::remove_file(path.with_extension("lock"));
                removed.push(digest);
            }
        }
        let tmp = self.root.join("tmp");
        for entry in std::fs::read_dir(&tmp)
            .map_err(io(tmp.display()))?
            .flatten()
        {
            let _ = std::fs::remove_dir_all(entry.path())
                .or_else(|_| std::fs::remove_file(entry.path()));
        }
        Ok(removed)
    }

    fn resolve(&self, reference: &str) -> Result<Digest> {
        let names = self.names()?;
        if let Some(id) = Reference::parse(reference)
            .ok()
            .and_then(|r| names.get(&r.to_string()))
        {
            return Digest::parse(id);
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        let hex = prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit());
        let matches: Vec<Digest> = match hex {
            true => self
                .image_ids()?
                .into_iter()
                .filter(|id| id.hex().starts_with(prefix))
                .collect(),
            false => Vec::new(),
        };
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::bad(
                format!("image {reference}"),
                format!(
                    "not in the store {} (`uvm images` lists them)",
                    self.root.display()
                ),
            )),
            _ => Err(Error::bad(
                format!("image {reference}"),
                "an ID prefix of several images",
            )),
        }
    }

    fn config(&self, id: &Digest) -> Result<ImageConfiguration> {
        let path = self.image_path(id);
        let bytes = std::fs::read(&path).map_err(io(format!("image {id}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::bad(path.display(), format!("corrupt image config: {e}")))
    }

    fn layers_of(&self, config: &ImageConfiguration, id: &Digest) -> Result<Vec<PathBuf>> {
        let plan = plan(&archive::diff_ids(config, &format!("image {id}"))?);
        Ok(plan.iter().map(|(key, _)| self.layer_path(key)).collect())
    }

    fn image_ids(&self) -> Result<Vec<Digest>> {
        Ok(self
            .entries("images", "json")?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// The `HEX.ext` files of a store directory.
    fn entries(&self, dir: &str, ext: &str) -> Result<Vec<(Digest, PathBuf)>> {
        let dir = self.root.join(dir);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(dir.display()))? {
            let path = entry.map_err(io(dir.display()))?.path();
            if path.extension().is_some_and(|e| e == ext) {
                let hex = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(Digest::from_hex);
                if let Some(digest) = hex {
                    out.push((digest, path));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn names(&self) -> Result<Names> {
        let path = self.root.join("names.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::bad(path.display(), format!("corrupt image names: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Names::new()),
            Err(e) => Err(io(path.display())(e)),
        }
    }

    /// Read, change and atomically replace names.json, one writer at a time.
    fn update_names(&self, change: impl FnOnce(&mut Names)) -> Result<()> {
        let _writing = lock_file(&self.root.join("names.lock"), true)?;
        let mut names = self.names()?;
        change(&mut names);
        let bytes = serde_json::to_vec_pretty(&names).expect("a map of strings serializes");
        self.write_atomic(&self.root.join("names.json"), &bytes)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.tmp_path("write");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .map_err(io(path.display()))
    }

    fn lock(&self, exclusive: bool) -> Result<File> {
        lock_file(&self.root.join("lock"), exclusive)
    }

    /// A fresh name in tmp/.
    fn tmp_path(&self, what: &str) -> PathBuf {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    fn image_path(&self, id: &Digest) -> PathBuf {
        self.root.join("images").join(format!("{}.json", id.hex()))
    }

    fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("layers")
            .join(format!("{}.ext4", diff_id.hex()))
    }
}

/// At most this many layer devices per image: uvm's pmem slots with the
/// VM's tools and a scratch disk attached (vmm's vm::layout).
pub const MAX_LAYERS: usize = 16;

/// How an image's layers (their diff_ids) become stored layer images: one
/// each, keyed by diff_id, except that an image with more than
/// [`MAX_LAYERS`] has its bottom ones merged into one, keyed by their
/// ChainID (shared by the images with that same base).
pub fn plan(diff_ids: &[Digest]) -> Vec<(Digest, Range<usize>)> {
    let merged = match diff_ids.len() {
        0 => return Vec::new(),
        n if n > MAX_LAYERS => n - MAX_LAYERS + 1,
        _ => 1,
    };
    let bottom = Digest::chain(&diff_ids[..merged]).expect("at least one layer");
    let upper = (merged..diff_ids.len()).map(|i| (diff_ids[i].clone(), i..i + 1));
    std::iter::once((bottom, 0..merged)).chain(upper).collect()
}

/// Adds a layer blob to `stack`, checking its digests: the blob's own and
/// the config's diff_id. Returns the uncompressed bytes.
fn add_verified(stack: &mut convert::Stack, blob: &LayerBlob) -> Result<u64> {
    let what = match &blob.digest {
        Some(digest) => format!("layer blob {digest} ({})", blob.path.display()),
        None => format!("layer {} ({})", blob.diff_id, blob.path.display()),
    };
    let file = File::open(&blob.path).map_err(io(&what))?;
    let mut compressed = Hashing::new(BufReader::new(file));
    let (diff_id, bytes) = {
        let tar = convert::decompress(BufReader::new(&mut compressed)).map_err(io(&what))?;
        let mut layer = Hashing::new(tar);
        stack.add(&mut layer, &what)?;
        layer.finish().map_err(io(&what))?
    };
    let (blob_digest, _) = compressed.finish().map_err(io(&what))?;
    if let Some(expected) = &blob.digest {
        verify(&what, expected, &blob_digest)?;
    }
    let what = format!("{what}: the config's diff_id");
    verify(what, &blob.diff_id, &diff_id)?;
    Ok(bytes)
}

/// The names of the image `id`.
fn names_of(names: &Names, id: &Digest) -> Vec<String> {
    let id = id.to_string();
    names
        .iter()
        .filter(|(_, v)| **v == id)
        .map(|(k, _)| k.clone())
        .collect()
}

/// Opens (creating) and flocks `path`, waiting for other holders.
fn lock_file(path: &Path, exclusive: bool) -> Result<File> {
    let file = open_lock(path)?;
    match exclusive {
        true => file.lock(),
        false => file.lock_shared(),
    }
    .map_err(io(format!("locking {}", path.display())))?;
    Ok(file)
}

fn open_lock(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_with_more_layers_than_devices_merge_their_bottom_ones() {
        let ids: Vec<Digest> = (0..40u8).map(|i| Digest::of(&[i])).collect();
        let small = plan(&ids[..MAX_LAYERS]);
        assert_eq!(small.len(), MAX_LAYERS);
        assert!(small.iter().zip(&ids).all(|((key, _), id)| key == id));
        let big = plan(&ids);
        assert_eq!(big.len(), MAX_LAYERS);
        assert_eq!(big[0], (Digest::chain(&ids[..25]).unwrap(), 0..25));
        assert_eq!(big[1], (ids[25].clone(), 25..26));
        assert_eq!(big[MAX_LAYERS - 1].1, 39..40);
        assert!(plan(&[]).is_empty());
    }
}
