//! `uvm bench --operate N`: N idle VMs in the background, then what
//! operating them costs — `uvm exec` round trips on one of them, `uvm ps`
//! with all N listed, and each idle VM's host memory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use super::report::Stats;
use super::{vm_flags, BenchArgs};
use crate::VmArgs;

/// Each VM's container: one process that only waits (it starts no other).
const IDLE: [&str; 2] = ["/bin/sleep", "1000000"];
/// `uvm ps` is timed this many times.
const PS_RUNS: usize = 10;

pub fn run(args: &BenchArgs, vm: &VmArgs, vms: u32, command: &[String]) -> anyhow::Result<i32> {
    let root = std::env::temp_dir().join(format!("uvm-bench-operate-{}", std::process::id()));
    let measured = measure(args, vm, vms, command, &root);
    let cleaned = remove_all(&root, vms);
    let table = measured?;
    cleaned?;
    print!("{table}");
    Ok(0)
}

fn measure(
    args: &BenchArgs,
    vm: &VmArgs,
    vms: u32,
    command: &[String],
    root: &Path,
) -> anyhow::Result<String> {
    let uvm = std::env::current_exe().context("locating uvm")?;
    let started = Instant::now();
    let runs: Vec<_> = (0..vms)
        .map(|i| {
            let mut run = uvm_at(&uvm, root);
            run.args(["run", "--cold", "-d", "--name", &name(i)])
                .args(vm_flags(vm));
            run.args(kernel(args)).arg("--").args(IDLE);
            run.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()
        })
        .collect::<Result<_, _>>()
        .context("starting uvm run -d")?;
    for (i, run) in runs.into_iter().enumerate() {
        let out = run.wait_with_output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!("VM {} did not start: {err}", name(i as u32));
        }
    }
    let boot_s = started.elapsed().as_secs_f64();
    let exec = |_| {
        timed(
            uvm_at(&uvm, root)
                .args(["exec", &name(0), "--"])
                .args(command),
        )
    };
    for warmup in 0..args.warmup {
        exec(warmup)?;
    }
    let exec_ms = (0..args.runs)
        .map(exec)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ps = |_| timed(uvm_at(&uvm, root).arg("ps"));
    let ps_ms = (0..PS_RUNS).map(ps).collect::<anyhow::Result<Vec<_>>>()?;
    let memory = (0..vms)
        .map(|i| host_memory(root, &name(i), vm.memory))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rows = [
        (format!("exec_ms ({})", command.join(" ")), exec_ms),
        (format!("ps_ms ({vms} VMs)"), ps_ms),
        ("host_rss_kib".into(), memory.iter().map(|m| m.0).collect()),
        ("guest_ram_kib".into(), memory.iter().map(|m| m.1).collect()),
        (
            "rest_rss_kib".into(),
            memory.iter().map(|m| m.0 - m.1).collect(),
        ),
    ];
    Ok(table(vms, boot_s, args.runs, rows))
}

fn name(i: u32) -> String {
    format!("bench-{i}")
}

fn kernel(args: &BenchArgs) -> Vec<OsString> {
    match args.kernels.first() {
        Some(kernel) => vec!["--kernel".into(), kernel.into()],
        None => Vec::new(),
    }
}

fn uvm_at(uvm: &Path, root: &Path) -> Command {
    let mut cmd = Command::new(uvm);
    cmd.arg("--root").arg(root);
    cmd
}

/// Milliseconds from spawning `cmd` to its successful end.
fn timed(cmd: &mut Command) -> anyhow::Result<f64> {
    let began = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let ms = began.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{cmd:?} failed ({}): {err}", out.status);
    }
    Ok(ms)
}

/// The host memory of VM `name`'s uvm process: its whole resident set and
/// the part of it that is guest RAM the guest touched (KiB).
fn host_memory(root: &Path, name: &str, memory_mib: u64) -> anyhow::Result<(f64, f64)> {
    let state: PathBuf = std::fs::read_dir(root)?
        .flatten()
        .map(|e| e.path().join("state.json"))
        .find(|p| {
            std::fs::read_to_string(p).is_ok_and(|s| s.contains(&format!("\"name\": \"{name}\"")))
        })
        .with_context(|| format!("the state of {name}"))?;
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(state)?)?;
    let pid = record["pid"].as_u64().context("a pid")?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let ram = vmm::rss::mappings_of_at_least(&smaps, memory_mib << 20);
    let total = vmm::rss::outside(&smaps, &[]) as f64;
    let outside_ram = vmm::rss::outside(&smaps, &ram) as f64;
    Ok((total, total - outside_ram))
}

fn table(vms: u32, boot_s: f64, runs: u32, rows: [(String, Vec<f64>); 5]) -> String {
    let mut text = format!(
        "uvm bench --operate: {vms} idle VMs (all running after {boot_s:.1} s), exec x{runs}\n"
    );
    text += &format!(
        "{:<28} | {:>9} {:>9} {:>9} {:>9}\n",
        "", "min", "median", "p90", "max"
    );
    for (label, values) in rows {
        if let Some(s) = Stats::of(values) {
            text += &format!(
                "{label:<28} | {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                s.min, s.median, s.p90, s.max
            );
        }
    }
    text
}

/// Removes every VM the benchmark started (killing those still running)
/// and its state root.
fn remove_all(root: &Path, vms: u32) -> anyhow::Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let uvm = std::env::current_exe()?;
    let names: Vec<String> = (0..vms).map(name).collect();
    let _ = uvm_at(&uvm, root)
        .args(["rm", "-f"])
        .args(&names)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))
}
