//! `uvm-oci`: an OCI runtime with runc's commands and flags, as podman
//! (through conmon) and containerd's runc shim call them, which runs each
//! container in a utility VM of its own: `create` boots the VM (`uvm
//! create`) with the bundle's root as its layer, `start` lets the process
//! run, and the pid it reports is the VM's VMM, which lives as long as the
//! container and exits with its status.

#[cfg(target_os = "linux")]
mod bundle;
#[cfg(target_os = "linux")]
mod commands;
#[cfg(target_os = "linux")]
mod console;
#[cfg(target_os = "linux")]
mod hooks;
#[cfg(target_os = "linux")]
mod log;
#[cfg(target_os = "linux")]
mod store;
#[cfg(target_os = "linux")]
mod uvm;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The runtime spec version this runtime implements.
#[cfg(target_os = "linux")]
const OCI_VERSION: &str = "1.0.2";

#[derive(Parser)]
#[command(
    name = "uvm-oci",
    version = concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.0.2"),
    about = "An OCI runtime that runs each container in a utility VM of its own"
)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Cli {
    /// Where containers' state is kept.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/run/uvm-oci"
    )]
    root: PathBuf,
    /// Also write errors and warnings to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    log: Option<PathBuf>,
    /// `text` or `json` (a JSON object per line, as podman and containerd
    /// read runc's).
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    log_format: String,
    /// Accepted for runc's callers: a VM has its own cgroups.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc's callers.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc's callers (`true`, `false`, `auto`).
    #[arg(long, global = true, value_name = "VALUE")]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
enum Command {
    /// Boot the container's VM, ready to run its process.
    Create(CreateArgs),
    /// Run the process of a created container.
    Start { id: String },
    /// The container's state (runtime-spec JSON).
    State { id: String },
    /// Send a signal to the container's process [default: SIGTERM].
    Kill {
        /// Accepted: the VM holds one container.
        #[arg(short, long)]
        all: bool,
        id: String,
        signal: Option<String>,
    },
    /// Remove a stopped (or, with --force, any) container and its VM.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Run another process in the running container.
    Exec(ExecArgs),
    /// The container's host processes (its VM's VMM).
    Ps {
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        id: String,
        /// Accepted for runc's callers (ps options).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ps_args: Vec<String>,
    },
    /// What this runtime supports (runtime-spec features JSON).
    Features,
}

#[derive(clap::Args)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub struct CreateArgs {
    /// The bundle directory (config.json and its root).
    #[arg(short, long, value_name = "DIR", default_value = ".")]
    pub bundle: PathBuf,
    /// Write the pid of the container's host process here.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// A Unix socket that gets the pty master of a terminal container.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Accepted: the VM's agent never pivots (it moves the root and chroots).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted: the VM has its own keyrings.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Accepted for runc's callers: descriptors beyond stdio are not passed
    /// into a VM.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

#[derive(clap::Args)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub struct ExecArgs {
    /// A process.json (runtime-spec process) to run instead of ARGS.
    #[arg(short, long, value_name = "FILE")]
    pub process: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Return once it runs; its host process (in --pid-file) ends with it.
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    #[arg(short, long)]
    pub tty: bool,
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    #[arg(short, long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// `uid[:gid]`.
    #[arg(short, long, value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Accepted for runc's callers.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[cfg(target_os = "linux")]
fn main() {
    let cli = Cli::parse();
    let log = log::Log::new(cli.log.as_deref(), cli.log_format == "json");
    let _ = (cli.systemd_cgroup, cli.debug, cli.rootless);
    let code = match commands::run(cli.command, &cli.root, &log) {
        Ok(code) => code,
        Err(e) => {
            log.error(&e);
            1
        }
    };
    std::process::exit(code)
}

#[cfg(not(target_os = "linux"))]
fn main() {
    let _ = Cli::parse();
    eprintln!("uvm-oci runs containers in utility VMs on Linux hosts only");
    std::process::exit(1);
}
