//! `uvm`: the command-line edge. Parses flags, hands a config to the library,
//! turns the outcome into an exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vmm::hypervisor::kvm::KvmHypervisor;
use vmm::pvm::{self, HostKind};
use vmm::uvm::{self, GuestExit, Report, VmConfig};

const DEFAULT_MEMORY_MIB: u64 = 128;
const MIN_MEMORY_MIB: u64 = 64;
/// Must match CONFIG_NR_CPUS in kernel-config/uvm.config.
const MAX_CPUS: u8 = 64;

#[derive(Parser)]
#[command(
    name = "uvm",
    version,
    about = "Run Linux containers in tiny utility VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a utility VM and run its agent until the guest ends the VM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: ELF vmlinux (PVH entry, fastest) or bzImage.
    /// [default: target/guest/vmlinux next to this binary, from `cargo xtask guest`]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initrd (newc cpio) whose /init is the uvm agent.
    /// [default: target/guest/initrd.img, from `cargo xtask guest`]
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Extra kernel command-line arguments, appended to the ones uvm sets.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,

    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = DEFAULT_MEMORY_MIB,
          value_parser = clap::value_parser!(u64).range(MIN_MEMORY_MIB..=1 << 20))]
    memory: u64,

    /// Number of vCPUs, one host thread each.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=MAX_CPUS as i64))]
    cpus: u8,

    /// Show the guest console (kernel log and agent output) on stderr.
    #[arg(long)]
    console: bool,

    /// Print boot timings as one JSON line on stderr when the VM ends.
    #[arg(long)]
    timings: bool,

    /// Kind of KVM host; detected by default. `pvm` adds the guest flags that
    /// kvm_pvm (software-virtualized /dev/kvm) needs.
    #[arg(long, value_enum, value_name = "KIND")]
    host: Option<HostKind>,
}

fn main() -> ExitCode {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("UVM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let Command::Run(args) = Cli::parse().command;
    let code = match run(args, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uvm: error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // vCPU threads are still inside the guest: leave without unwinding them.
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 })
}

fn run(args: RunArgs, start: Instant) -> anyhow::Result<()> {
    let config = VmConfig {
        kernel: artifact(args.kernel, "vmlinux", "--kernel")?,
        initrd: artifact(args.initrd, "initrd.img", "--initrd")?,
        extra_cmdline: args.cmdline,
        memory_mib: args.memory,
        cpus: args.cpus,
        console: args.console,
        host: args.host.unwrap_or_else(pvm::detect),
    };
    let report = uvm::run(KvmHypervisor::new, &config, start)?;
    if args.timings {
        eprintln!("{}", timings_json(&report));
    }
    check_exit(&report, args.console)
}

/// A path given on the command line, or the `cargo xtask guest` artifact.
fn artifact(given: Option<PathBuf>, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let path = default_guest_dir()?.join(name);
    if !path.exists() {
        bail!(
            "no {flag} given and the default {} does not exist: run `cargo xtask guest` or pass {flag}",
            path.display()
        );
    }
    Ok(path)
}

/// `target/guest`, next to `target/<profile>/uvm`.
fn default_guest_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the uvm binary")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("uvm binary has no target dir")?;
    Ok(target.join("guest"))
}

fn check_exit(report: &Report, console_shown: bool) -> anyhow::Result<()> {
    let tail = || match console_shown {
        true => String::new(),
        false => format!("\nlast console output:\n{}", report.console.tail()),
    };
    match &report.exit {
        GuestExit::Reset if report.timings.agent_started.is_some() => Ok(()),
        GuestExit::Reset => bail!(
            "the guest reset before the agent started (kernel panic or missing /init?){}",
            tail()
        ),
        GuestExit::Fault { cpu, reason, rip } => {
            let rip = rip.map_or("unknown".into(), |r| format!("{r:#x}"));
            bail!("vCPU {cpu} stopped: {reason} at guest RIP {rip}{}", tail())
        }
    }
}

fn timings_json(report: &Report) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let t = &report.timings;
    let setup = t.first_vcpu_entry.map(ms);
    let kernel = t
        .agent_started
        .zip(t.first_vcpu_entry)
        .map(|(a, e)| ms(a.saturating_sub(e)));
    serde_json::json!({
        "vmm_setup_ms": setup,
        "kernel_ms": kernel,
        "agent_started_ms": t.agent_started.map(ms),
        "total_ms": ms(t.ended),
        "vmm_rss_kib": report.vmm_rss_kib,
    })
    .to_string()
}
