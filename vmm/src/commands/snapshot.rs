//! `uvm snapshot` and `uvm restore`: a VM in the background saved to a
//! directory while it runs on, and new VMs started from one
//! (`vmm::state::snapshot`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use vmm::state::control::Request;
use vmm::state::snapshot;
use vmm::state::Root;
use vmm::vm::Report;

use super::{ask, running, Background, Launch, Origin};

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// The VM (ID, unique prefix or name), started with `run -d`.
    #[arg(value_name = "ID|NAME")]
    vm: String,
    /// The directory to write; it must not exist.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    output: PathBuf,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// A directory `uvm snapshot` wrote.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// A name for the new VM.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Run the VMM's threads without their seccomp filters (debugging).
    #[arg(long)]
    no_seccomp: bool,
}

pub fn snapshot(root: &Root, args: &SnapshotArgs) -> anyhow::Result<i32> {
    let entry = running(root, &args.vm)?;
    // The VMM runs elsewhere: it gets an absolute path.
    let dir =
        std::path::absolute(&args.output).with_context(|| format!("{}", args.output.display()))?;
    ask(&entry, &Request::Snapshot { dir: dir.clone() })?;
    println!("{}", dir.display());
    Ok(0)
}

/// Starts a VM in the background from the snapshot, prints its ID once its
/// container carries on; `finish` turns the VM's report into the exit
/// status of its background VMM.
pub fn restore(
    args: RestoreArgs,
    root: Option<PathBuf>,
    start: Instant,
    finish: impl FnOnce(&Report) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    let dir = std::path::absolute(&args.dir).with_context(|| format!("{}", args.dir.display()))?;
    let config = snapshot::config(&dir)?;
    if !args.no_seccomp {
        use vmm::sys::seccomp;
        seccomp::enable(seccomp::Mode::from_env()).context("compiling the seccomp filters")?;
    }
    Launch::new(
        root,
        args.name,
        Some(Background::default()),
        Origin::Snapshot(dir),
    )?
    .run(&config, start, finish)
}
