//! Where uvm-oci keeps its containers: `ROOT/ID/` holds the container's
//! record (its bundle, annotations and host hooks, and whether `create`
//! finished) and its root's layer image; their VMs are uvm's, under
//! `ROOT/vms`.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use oci_spec::runtime::Hooks;
use serde::{Deserialize, Serialize};

const RECORD: &str = "container.json";

pub struct Store {
    root: PathBuf,
}

/// What uvm-oci remembers of a container between its commands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    pub oci_version: String,
    pub annotations: HashMap<String, String>,
    /// The hooks that run on the host after `create`.
    pub hooks: Option<Hooks>,
    /// `create` finished: the VM is ready to run the process.
    pub created: bool,
}

#[derive(Debug)]
pub struct Container {
    pub dir: PathBuf,
    pub record: Record,
}

impl Store {
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("state directory {}", root.display()))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The uvm root the containers' VMs are under.
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// A new container's directory and record; its ID must be free.
    pub fn create(&self, record: Record) -> anyhow::Result<Container> {
        let dir = self.dir(&record.id)?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container {} exists already", record.id)
            }
            made => made.with_context(|| format!("{}", dir.display()))?,
        }
        let container = Container { dir, record };
        container.save()?;
        Ok(container)
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Container> {
        let dir = self.dir(id)?;
        let path = dir.join(RECORD);
        let text = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container {id} does not exist")
            }
            read => read.with_context(|| format!("{}", path.display()))?,
        };
        let record = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a container record", path.display()))?;
        Ok(Container { dir, record })
    }

    /// IDs are uvm's VM names too, and directory names here.
    fn dir(&self, id: &str) -> anyhow::Result<PathBuf> {
        vmm::state::check_name(id).context("container ID")?;
        Ok(self.root.join(id))
    }
}

impl Container {
    pub fn save(&self) -> anyhow::Result<()> {
        let path = self.dir.join(RECORD);
        let text = serde_json::to_vec(&self.record)?;
        vmm::state::write_whole(&path, &text).with_context(|| format!("{}", path.display()))
    }

    /// The startContainer hooks, as `uvm create --hooks` reads them.
    pub fn start_hooks(&self) -> PathBuf {
        self.dir.join("start-hooks.json")
    }

    pub fn remove(self) -> anyhow::Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("{}", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            bundle: "/b".into(),
            oci_version: "1.0.2".into(),
            annotations: HashMap::new(),
            hooks: None,
            created: false,
        }
    }

    #[test]
    fn a_container_is_made_once_and_found_by_its_id() {
        let dir = std::env::temp_dir().join(format!("uvm-oci-store-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        let mut made = store.create(record("c1")).unwrap();
        let again = store.create(record("c1")).unwrap_err().to_string();
        assert!(again.contains("exists already"), "{again}");
        made.record.created = true;
        made.save().unwrap();
        assert!(store.get("c1").unwrap().record.created);
        let missing = store.get("c2").err().unwrap().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        for bad in ["../x", "", ".x", "a/b"] {
            assert!(store.get(bad).is_err(), "{bad}");
        }
        store.get("c1").unwrap().remove().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
