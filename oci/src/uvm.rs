//! The `uvm` beside this binary, which runs the containers' VMs, and what
//! its state says about them.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use vmm::state::{Root, Status};

pub struct Uvm {
    exe: PathBuf,
    /// Where the containers' VMs are kept.
    root: PathBuf,
}

impl Uvm {
    pub fn new(root: PathBuf) -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("locating the uvm-oci binary")?;
        let exe = me.with_file_name("uvm");
        if !exe.is_file() {
            bail!(
                "{} not found: uvm-oci runs the uvm binary built beside it",
                exe.display()
            );
        }
        Ok(Self { exe, root })
    }

    /// `uvm --root ROOT SUBCOMMAND`, to be given its arguments.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut command = Command::new(&self.exe);
        command.arg("--root").arg(&self.root).arg(subcommand);
        command
    }

    /// Runs `uvm SUBCOMMAND ARGS` with its output ours; fails if it does.
    pub fn run(&self, subcommand: &str, args: &[&str]) -> anyhow::Result<()> {
        let status = self
            .command(subcommand)
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running {}", self.exe.display()))?;
        if !status.success() {
            bail!("uvm {subcommand} failed ({status})");
        }
        Ok(())
    }

    /// The container's VM: its status and VMM pid, if uvm knows it.
    pub fn vm(&self, id: &str) -> Option<(Status, u32)> {
        let root = Root::open(&self.root).ok()?;
        let entry = root.find(id).ok()?;
        Some((entry.status(), entry.record.pid))
    }
}
