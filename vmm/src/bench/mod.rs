//! `uvm bench`: boots utility VMs one after another (or several at once),
//! runs a command in each and reports how long every phase took, optionally
//! side by side with QEMU microvm booting the same kernel and initrd,
//! interleaved run by run so that machine noise hits both alike.

mod launch;
mod operate;
mod plot;
mod report;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

use self::launch::{Launcher, Vmm};
use self::report::{Results, Series};
use crate::{artifact, default_guest_dir, VmArgs};

/// What runs in each VM unless a command is given.
const DEFAULT_COMMAND: &str = "/bin/true";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Guest kernel; repeat to compare kernels (each one is a series).
    /// [default: target/guest/vmlinux, from `cargo xtask guest`]
    #[arg(long = "kernel", value_name = "PATH")]
    kernels: Vec<PathBuf>,

    #[command(flatten)]
    vm: VmArgs,

    /// Measured runs of each series.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    runs: u32,

    /// Runs before the measured ones, not counted (they warm the page cache).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    warmup: u32,

    /// Boot the same kernel, initrd and layers under this VMM too, run by
    /// run in turn with uvm.
    #[arg(long, value_enum, value_name = "VMM")]
    against: Option<Peer>,

    /// A series of uvm runs restored from a template (saved by one run
    /// before the series, not counted), beside the cold ones.
    #[arg(long)]
    template: bool,

    /// The QEMU binary for `--against qemu`.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,

    /// Start P VMs at once in every run, and report the time until all of
    /// them were ready and the host memory they took (density).
    #[arg(long, value_name = "P", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: u32,

    /// Instead of boots: start N idle VMs in the background and time
    /// `uvm exec -- COMMAND` on one of them (--runs times), `uvm ps` with all
    /// N listed, and each idle VM's host memory.
    #[arg(long, value_name = "N", conflicts_with_all = ["against", "parallel", "results", "baseline"],
          value_parser = clap::value_parser!(u32).range(1..=64))]
    operate: Option<u32>,

    /// Write every run and the summary as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Draw the distributions as an SVG.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,

    /// An earlier `--json`: fail if a series' median total is worse than
    /// the same series there by more than --max-regression.
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,

    /// How much slower than the baseline a median total may be.
    #[arg(long, value_name = "PERCENT", default_value = "10%", value_parser = parse_percent)]
    max_regression: f64,

    /// Report the results in FILE (an earlier `--json`) instead of booting;
    /// the run and VM flags are then ignored.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernels", "against", "command"])]
    results: Option<PathBuf>,

    /// The command each VM runs. [default: /bin/true]
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Peer {
    /// qemu-system-x86_64 -M microvm with KVM.
    Qemu,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let number = s.strip_suffix('%').unwrap_or(s);
    match number.parse::<f64>() {
        Ok(p) if p >= 0.0 && p.is_finite() => Ok(p / 100.0),
        _ => Err(format!("expected a percentage such as 10%, got `{s}`")),
    }
}

/// `vm` as `uvm run` flags (for the VMs `uvm bench` starts).
fn vm_flags(vm: &VmArgs) -> Vec<OsString> {
    let mut flags: Vec<OsString> = vec![
        "--memory".into(),
        vm.memory.to_string().into(),
        "--cpus".into(),
        vm.cpus.to_string().into(),
    ];
    let mut add = |flag: &str, value: OsString| flags.extend([flag.into(), value]);
    if let Some(initrd) = &vm.initrd {
        add("--initrd", initrd.into());
    }
    if let Some(cmdline) = &vm.cmdline {
        add("--cmdline", cmdline.into());
    }
    if let Some(host) = vm.host {
        let name = host.to_possible_value().map(|v| v.get_name().to_string());
        add("--host", name.unwrap_or_default().into());
    }
    if let Some(workdir) = &vm.workdir {
        add("--workdir", workdir.into());
    }
    for entry in &vm.env {
        add("--env", entry.into());
    }
    for layer in &vm.layers {
        add("--layer", layer.into());
    }
    if vm.no_dax {
        flags.push("--no-dax".into());
    }
    flags
}

pub fn run(args: BenchArgs) -> anyhow::Result<i32> {
    if let Some(vms) = args.operate {
        return operate::run(&args, &vm_with_defaults(&args.vm)?, vms, &command(&args));
    }
    // Read before anything boots (and before --json may overwrite it).
    let baseline = args.baseline.as_deref().map(Results::load).transpose()?;
    let results = match &args.results {
        Some(path) => Results::load(path)?,
        None => measure(&args)?,
    };
    print!("{}", results.table());
    if let Some(path) = &args.json {
        results.save(path)?;
    }
    if let Some(path) = &args.plot {
        plot::draw(&results, path).with_context(|| format!("drawing {}", path.display()))?;
    }
    if let (Some(path), Some(baseline)) = (&args.baseline, baseline) {
        let verdict = results.compare(&baseline, args.max_regression)?;
        println!("{verdict}");
        if verdict.regressed() {
            bail!("slower than the baseline {}", path.display());
        }
    }
    Ok(0)
}

/// Boots every series `warmup + runs` times, in turn.
fn measure(args: &BenchArgs) -> anyhow::Result<Results> {
    let peer_qemu = args.against.map(|Peer::Qemu| args.qemu.as_path());
    let launcher = Launcher::new(vm_with_defaults(&args.vm)?, command(args), peer_qemu)?;
    let kernels = match args.kernels.is_empty() {
        true => vec![artifact(None, "vmlinux", "--kernel")?],
        false => args.kernels.clone(),
    };
    for kernel in &kernels {
        check_file(kernel, "kernel")?;
    }
    let template = args.template.then_some(Vmm::UvmTemplate);
    let peers = std::iter::once(Vmm::Uvm).chain(template);
    let peers: Vec<Vmm> = peers
        .chain(args.against.map(|Peer::Qemu| Vmm::Qemu))
        .collect();
    let series = kernels
        .iter()
        .flat_map(|kernel| peers.iter().map(|&vmm| Series::new(vmm, kernel)));
    let mut series = Results::labelled(series.collect());
    let rounds = args.warmup + args.runs;
    let progress = progress_bar(u64::from(rounds) * series.len() as u64);
    for s in series.iter().filter(|s| s.vmm == Vmm::UvmTemplate) {
        progress.set_message(format!("{} (saving the template)", s.name));
        launcher
            .batch(s.vmm, &s.kernel, 1)
            .with_context(|| format!("{}: the run that saves the template", s.name))?;
    }
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..series.len()).collect();
        if round % 2 == 1 {
            order.reverse(); // neither VMM always goes first
        }
        for i in order {
            let s = &mut series[i];
            progress.set_message(format!("{} ({})", s.name, phase_name(round, args.warmup)));
            let batch = launcher
                .batch(s.vmm, &s.kernel, args.parallel)
                .with_context(|| format!("{} run {}", s.name, round + 1))?;
            if round >= args.warmup {
                s.batches.push(batch);
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    Ok(Results {
        command: launcher.command().to_vec(),
        runs: args.runs,
        warmup: args.warmup,
        parallel: args.parallel,
        host: launcher.host_name(),
        memory_mib: launcher.vm().memory,
        layers: launcher.vm().layers.len(),
        series,
    })
}

fn phase_name(round: u32, warmup: u32) -> String {
    match round < warmup {
        true => "warm-up".into(),
        false => format!("run {}", round - warmup + 1),
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} VMs  {elapsed}  {msg}")
        .expect("a valid progress template");
    bar.set_style(style);
    bar
}

/// The run options with the `cargo xtask guest` artifacts filled in: the
/// same initrd and layers go to every series.
fn vm_with_defaults(vm: &VmArgs) -> anyhow::Result<VmArgs> {
    let mut vm = vm.clone();
    vm.initrd = Some(artifact(vm.initrd, "initrd.img", "--initrd")?);
    check_file(vm.initrd.as_deref().unwrap_or(Path::new("")), "initrd")?;
    if vm.layers.is_empty() {
        // `/bin/true` and friends live in the demo base layer; the initrd
        // holds the agent alone.
        let base = default_guest_dir()?.join("layers/base.img");
        if !base.exists() {
            bail!(
                "no --layer given and the default {} does not exist: run `cargo xtask demo-layers` or pass --layer",
                base.display()
            );
        }
        vm.layers.push(base);
    }
    for layer in &vm.layers {
        check_file(layer, "layer")?;
    }
    Ok(vm)
}

fn command(args: &BenchArgs) -> Vec<String> {
    match args.command.is_empty() {
        true => vec![DEFAULT_COMMAND.into()],
        false => args.command.clone(),
    }
}

/// Bad paths fail before anything boots, naming the file.
fn check_file(path: &Path, what: &str) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {}: not a regular file", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_flag_wins() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from(["uvm", "bench", "--runs", "30", "--runs", "5"]);
        match cli.map(|c| c.command) {
            Ok(crate::Command::Bench(args)) => assert_eq!(args.runs, 5),
            _ => panic!("`cargo xtask bench --runs 5` must override its default"),
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10%"), Ok(0.1));
        assert_eq!(parse_percent("2.5"), Ok(0.025));
        assert!(parse_percent("-1%").is_err());
        assert!(parse_percent("ten").is_err());
    }
}
