//! Commands for utility VMs that run already, the hcsdiag and docker way:
//! list them, exec into their container or the VM itself, read their logs,
//! stop, signal, wait for and remove them.

mod exec;
mod launch;
mod lifecycle;
mod logs;
mod ps;
mod snapshot;

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use vmm::state::control::{Channel, Reply, Request};
use vmm::state::{Entry, Root, StateFiles, Status};

pub use self::launch::{Background, Launch, Origin};
pub use self::snapshot::{restore, RestoreArgs};

#[derive(Subcommand)]
pub enum Command {
    /// List the running utility VMs (-a: all of them).
    Ps(ps::PsArgs),
    /// Run a process in a running VM's container, with its stdio and exit code.
    Exec(exec::ExecArgs),
    /// A shell (or COMMAND) in the utility VM itself, outside the container.
    Console(exec::ConsoleArgs),
    /// Print a VM's container output.
    Logs(logs::LogsArgs),
    /// SIGTERM to the container, SIGKILL after a grace period; the VM ends.
    Stop(lifecycle::StopArgs),
    /// Send a signal to the container's main process.
    Kill(lifecycle::KillArgs),
    /// Wait until the VMs end; print their exit codes, exit with the last.
    Wait(lifecycle::VmsArgs),
    /// Remove ended VMs' state (-f: stop running ones first).
    Rm(lifecycle::RmArgs),
    /// A VM's state as JSON.
    Inspect(lifecycle::VmsArgs),
    /// Run the container of VMs that `uvm create` made.
    Start(lifecycle::VmsArgs),
    /// Save a VM in the background to a directory (`uvm restore` starts
    /// VMs from it); the VM runs on.
    Snapshot(snapshot::SnapshotArgs),
}

pub fn run(command: Command, root: Option<PathBuf>) -> anyhow::Result<i32> {
    let root = Root::open(&root.unwrap_or_else(Root::default_dir))?;
    match command {
        Command::Ps(args) => ps::ps(&root, &args),
        Command::Exec(args) => exec::exec(&root, args),
        Command::Console(args) => exec::console(&root, args),
        Command::Logs(args) => logs::logs(&root, &args),
        Command::Stop(args) => lifecycle::stop(&root, &args),
        Command::Kill(args) => lifecycle::kill(&root, &args),
        Command::Wait(args) => lifecycle::wait(&root, &args),
        Command::Rm(args) => lifecycle::rm(&root, &args),
        Command::Inspect(args) => ps::inspect(&root, &args),
        Command::Snapshot(args) => snapshot::snapshot(&root, &args),
        Command::Start(args) => lifecycle::start(&root, &args),
    }
}

/// The live VM `key` names (running, or still booting); an ended or dead
/// one is an error that says so.
fn running(root: &Root, key: &str) -> anyhow::Result<Entry> {
    let entry = root.find(key)?;
    match entry.status() {
        Status::Running | Status::Created => Ok(entry),
        status => bail!(
            "utility VM {} is not running: it is {status}",
            display_name(&entry)
        ),
    }
}

/// The VM's name if it has one, else its short ID.
fn display_name(entry: &Entry) -> String {
    entry
        .name()
        .map_or_else(|| entry.short_id().to_string(), str::to_string)
}

/// Sends `request` to the VM's VMM and returns the channel for its replies.
fn connect(entry: &Entry, request: &Request, fds: &[i32]) -> anyhow::Result<Channel> {
    let socket = entry.socket();
    let channel = Channel::connect(&socket).map_err(|e| {
        anyhow::anyhow!(
            "utility VM {}: its control socket {}: {e}",
            display_name(entry),
            socket.display()
        )
    })?;
    channel.send(request, fds)?;
    Ok(channel)
}

/// A request whose one reply is `Ok` or an error.
fn ask(entry: &Entry, request: &Request) -> anyhow::Result<()> {
    let mut channel = connect(entry, request, &[])?;
    match channel.recv::<Reply>()? {
        Some(Reply::Ok) => Ok(()),
        Some(Reply::Error(e)) => bail!("utility VM {}: {e}", display_name(entry)),
        Some(other) => bail!(
            "utility VM {}: unexpected reply {other:?}",
            display_name(entry)
        ),
        None => bail!(
            "utility VM {}: its VMM closed the connection",
            display_name(entry)
        ),
    }
}
