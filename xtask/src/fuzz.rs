//! `cargo xtask fuzz [--seconds N] [TARGET]`: the fuzz targets in fuzz/
//! (cargo-fuzz and libFuzzer, with AddressSanitizer), each for N seconds
//! from its committed seeds (fuzz/seeds/TARGET). The toolchain is stable:
//! RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the flags it wants nightly for.
//! New inputs collect in target/fuzz/corpus/TARGET, crashes in
//! target/fuzz/artifacts/TARGET/; target/fuzz/summary.txt has the counts.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// What CI gives each target.
pub const CI_SECONDS: u64 = 20;
const CARGO_FUZZ: &str = "0.13";
/// libFuzzer's per-input bounds: an input that takes longer or grows the
/// process past this is a finding, like a crash.
const INPUT_TIMEOUT_SECS: u64 = 10;
const RSS_LIMIT_MB: u64 = 2048;
const MALLOC_LIMIT_MB: u64 = 512;

pub fn main(args: &[String]) -> Result<()> {
    let mut seconds = CI_SECONDS;
    let mut only = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                seconds = value
                    .parse()
                    .with_context(|| format!("--seconds {value}"))?;
            }
            target if !target.starts_with('-') && only.is_none() => only = Some(target.to_string()),
            other => bail!("fuzz: unexpected argument {other:?}"),
        }
    }
    fuzz(seconds, only.as_deref())
}

/// fmt and clippy of the fuzz crate, which the workspace's leave out.
pub fn check() -> Result<()> {
    install_cargo_fuzz()?;
    run(cargo_fuzz_crate().args(["fmt", "--check"]))?;
    run(cargo_fuzz_crate().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
}

/// Builds every target, then runs `only` (or all) for `seconds` each.
pub fn fuzz(seconds: u64, only: Option<&str>) -> Result<()> {
    install_cargo_fuzz()?;
    let all = targets()?;
    let chosen: Vec<&String> = match only {
        Some(name) => match all.iter().find(|t| *t == name) {
            Some(target) => vec![target],
            None => bail!("no fuzz target {name:?}; there are: {}", all.join(", ")),
        },
        None => all.iter().collect(),
    };
    run(cargo_fuzz().arg("build"))?;
    let out = root().join("target/fuzz");
    let mut summary = String::from("target            executions   execs/s  result\n");
    let mut failed = Vec::new();
    for target in chosen {
        let (line, ok) = run_target(target, seconds, &out)?;
        eprintln!("xtask: fuzz {line}");
        summary.push_str(&line);
        summary.push('\n');
        if !ok {
            failed.push(target.clone());
        }
    }
    std::fs::write(out.join("summary.txt"), &summary)?;
    eprint!("{summary}");
    if !failed.is_empty() {
        bail!(
            "fuzz targets found problems: {} (inputs in {})",
            failed.join(", "),
            out.join("artifacts").display()
        );
    }
    Ok(())
}

/// Runs one target; its summary line and whether it found nothing.
fn run_target(target: &str, seconds: u64, out: &Path) -> Result<(String, bool)> {
    let corpus = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let seeds = root().join("fuzz/seeds").join(target);
    let output = cargo_fuzz()
        .args(["run", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    std::fs::write(out.join(format!("{target}.log")), log.as_bytes())?;
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap_or(0))
    };
    let execs = stat("number_of_executed_units");
    let rate = stat("average_exec_per_sec");
    let ok = output.status.success();
    let result = if ok {
        "ok".into()
    } else {
        format!("FAILED ({})", output.status)
    };
    Ok((format!("{target:<16} {execs:>12} {rate:>9}  {result}"), ok))
}

/// The targets fuzz/Cargo.toml declares.
fn targets() -> Result<Vec<String>> {
    let out = cargo_fuzz()
        .arg("list")
        .output()
        .context("cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// cargo in fuzz/ (libfuzzer-sys wants RUSTC_BOOTSTRAP for its flags).
fn cargo_fuzz_crate() -> Command {
    let mut cmd = crate::cargo();
    cmd.current_dir(root().join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1");
    cmd
}

fn cargo_fuzz() -> Command {
    let mut cmd = cargo_fuzz_crate();
    cmd.arg("fuzz");
    cmd
}

fn install_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(" 0.13"));
    if installed {
        return Ok(());
    }
    run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        &format!("^{CARGO_FUZZ}"),
    ]))
}
