//! `cargo xtask …`: builds the guest (kernel, initrd), runs the demo and the
//! test suite. Everything it needs it installs itself, so a fresh machine and
//! CI need nothing but this repository.

mod cpio;
mod kernel;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  kernel   build the guest kernel (cached) -> target/guest/{vmlinux,bzImage}
  initrd   build the agent and pack it     -> target/guest/initrd.img, initrd-test.img
  guest    kernel + initrd
  demo     build what is missing, then boot a utility VM on the defaults
  test     guest, then fmt, clippy and the whole test suite (what CI runs)";

fn main() -> Result<()> {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    match cmd.as_str() {
        "kernel" => kernel::build().map(drop),
        "initrd" => initrd(),
        "guest" => guest(),
        "demo" => demo(),
        "test" => test(),
        _ => {
            eprintln!("{USAGE}");
            bail!("unknown command {cmd:?}")
        }
    }
}

/// The workspace root (the parent of xtask/).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .into()
}

/// Where guest artifacts land: `target/guest/`.
fn guest_dir() -> Result<PathBuf> {
    let dir = root().join("target/guest");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs `cmd`, failing with its name if it does not succeed.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Installs Debian packages that are missing (one `apt-get update` first).
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The agent is built for musl: a static binary less than half the size of a
/// static glibc one, and on PVM hosts each initrd MiB costs seconds to unpack.
const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

/// Guest programs built for the initrds: the agent, and a test peer.
const GUEST_BINS: [&str; 2] = ["uvm-agent", "uvm-vsock-test"];
/// Debian's static busybox: the commands of the default root until image
/// layers provide them.
const BUSYBOX: &str = "/bin/busybox";

/// Builds `initrd.img` (agent + busybox) and `initrd-test.img` (the same
/// plus the vsock test peer).
fn initrd() -> Result<()> {
    run(Command::new("rustup").args(["target", "add", AGENT_TARGET]))?;
    let mut build = cargo();
    build.args(["build", "--profile", "agent", "-p", "guest"]);
    for bin in GUEST_BINS {
        build.args(["--bin", bin]);
    }
    run(build.args(["--target", AGENT_TARGET]))?;
    apt_install(&["busybox-static"])?;
    let bin_dir = root().join("target").join(AGENT_TARGET).join("agent");
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let agent = read(&bin_dir.join("uvm-agent"))?;
    let busybox = read(Path::new(BUSYBOX))?;
    let applets = busybox_applets()?;

    let mut archive = cpio::Archive::initrd(&agent);
    add_busybox(&mut archive, &busybox, &applets);
    let mut test_archive = cpio::Archive::initrd(&agent);
    add_busybox(&mut test_archive, &busybox, &applets);
    test_archive.file(
        "bin/uvm-vsock-test",
        &read(&bin_dir.join("uvm-vsock-test"))?,
    );
    for (name, archive) in [("initrd.img", archive), ("initrd-test.img", test_archive)] {
        let out = guest_dir()?.join(name);
        let bytes = archive.finish();
        std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("xtask: {} ({} bytes)", out.display(), bytes.len());
    }
    Ok(())
}

/// Where busybox installs each applet (`bin/sh`, `usr/bin/env`, …).
fn busybox_applets() -> Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {BUSYBOX}"))?;
    let list = String::from_utf8(out.stdout).context("busybox applet list")?;
    Ok(list
        .lines()
        .filter(|l| l.contains('/'))
        .map(String::from)
        .collect())
}

fn add_busybox(archive: &mut cpio::Archive, busybox: &[u8], applets: &[String]) {
    for dir in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "tmp"] {
        archive.dir(dir);
    }
    archive.file("bin/busybox", busybox);
    for applet in applets.iter().filter(|a| a.as_str() != "bin/busybox") {
        archive.symlink(applet, "/bin/busybox");
    }
}

fn guest() -> Result<()> {
    kernel::build()?;
    initrd()
}

fn demo() -> Result<()> {
    guest()?;
    run(cargo().args(["build", "--release", "-p", "vmm"]))?;
    run(Command::new(root().join("target/release/uvm")).args([
        "run",
        "--timings",
        "--",
        "/bin/sh",
        "-c",
        "echo hello from $(uname -n), kernel $(uname -r)",
    ]))
}

fn test() -> Result<()> {
    check_kvm()?;
    guest()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace"]))
}

/// Under CI a missing /dev/kvm fails the run instead of skipping boot tests.
fn check_kvm() -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let kvm = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    kvm_gate(ci, kvm)
}

fn kvm_gate(ci: bool, kvm: bool) -> Result<()> {
    match (ci, kvm) {
        (true, false) => bail!("CI=true but /dev/kvm cannot be opened: the boot tests need KVM"),
        (false, false) => {
            eprintln!("xtask: no usable /dev/kvm: boot tests will report that they skipped");
            Ok(())
        }
        (_, true) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kvm_fails_only_under_ci() {
        assert!(kvm_gate(true, false).is_err());
        assert!(kvm_gate(false, false).is_ok());
        assert!(kvm_gate(true, true).is_ok());
    }
}
