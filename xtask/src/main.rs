//! `cargo xtask …`: builds the guest (kernel, initrd), runs the demo and the
//! test suite. Everything it needs it installs itself, so a fresh machine and
//! CI need nothing but this repository.

mod cpio;
mod fuzz;
mod kernel;
mod nested;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  kernel   build the guest kernel (cached) -> target/guest/{vmlinux,bzImage}
  initrd   build the agent and pack it     -> target/guest/initrd.img
  demo-layers  busybox base, app and test layers -> target/guest/layers/*.img
  guest    kernel + initrd + demo layers
  demo     build what is missing, then run a container from the demo layers
  test     guest, then fmt, clippy, the Windows (WHP) type-check, the whole
           test suite and every fuzz target for 20 s (what CI runs)
  bench [--nested] [--operate N]
           the standard comparison: `true`, 30 runs, uvm against QEMU microvm
           -> target/bench/{bench.json,bench.svg,table.txt}; with --nested on
           hardware KVM in the nested L1 -> target/bench/nested/; extra
           arguments go to `uvm bench` (e.g. `cargo xtask bench --runs 5`);
           --operate N: exec round trips, ps and memory with N running VMs
           -> operate.txt
  fuzz [--seconds N] [TARGET]
           the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer with
           AddressSanitizer), each for N seconds (default 20) from
           fuzz/seeds/TARGET -> target/fuzz/{summary.txt,TARGET.log}
  nested [--memory MiB] [--cpus N] [--timeout SECS] [--silence SECS] [-- COMMAND ARGS...]
           boot an L1 VM with hardware KVM (QEMU's emulator with SVM, Debian's
           kernel with kvm_amd) and run COMMAND there, in this directory, with
           the host's root shared read-only; without COMMAND, a boot check";

fn main() -> Result<()> {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    match cmd.as_str() {
        "kernel" => kernel::build().map(drop),
        "initrd" => initrd(),
        "demo-layers" => demo_layers(),
        "guest" => guest(),
        "demo" => demo(),
        "test" => test(),
        "bench" => bench(&std::env::args().skip(2).collect::<Vec<_>>()),
        "nested" => nested::main(&std::env::args().skip(2).collect::<Vec<_>>()),
        "fuzz" => fuzz::main(&std::env::args().skip(2).collect::<Vec<_>>()),
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

/// The agent (and uvm as shipped) is built for musl: a static binary less
/// than half the size of a static glibc one, and on PVM hosts each initrd
/// MiB costs seconds to unpack.
const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

/// Guest programs: the agent, and a vsock peer for the tests' layer.
const GUEST_BINS: [&str; 2] = ["uvm-agent", "uvm-vsock-test"];
/// Debian's static busybox: the commands of the demo base layer.
const BUSYBOX: &str = "/bin/busybox";

/// Builds the guest programs and `initrd.img`, which holds the agent alone:
/// on PVM hosts every initrd MiB costs seconds of unpacking.
fn initrd() -> Result<()> {
    run(Command::new("rustup").args(["target", "add", AGENT_TARGET]))?;
    let mut build = cargo();
    build.args(["build", "--profile", "agent", "-p", "guest"]);
    for bin in GUEST_BINS {
        build.args(["--bin", bin]);
    }
    run(build.args(["--target", AGENT_TARGET]))?;
    let agent = read(&guest_bin("uvm-agent"))?;
    let out = guest_dir()?.join("initrd.img");
    let bytes = cpio::Archive::initrd(&agent).finish();
    std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("xtask: {} ({} bytes)", out.display(), bytes.len());
    Ok(())
}

fn guest_bin(name: &str) -> PathBuf {
    root()
        .join("target")
        .join(AGENT_TARGET)
        .join("agent")
        .join(name)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The demo layers and the VM's tools, made with `uvm layer create`:
/// - base: busybox and its applets, /etc/hello.txt and /etc/remove-me.txt;
/// - app (on base): adds /etc/app.txt, changes /etc/hello.txt and deletes
///   /etc/remove-me.txt with an overlayfs whiteout;
/// - test (on base): the vsock peer the integration tests run;
/// - `target/guest/tools.img`: busybox and its applets alone, the commands
///   of `uvm console` in the utility VM itself (a pmem device read only
///   when used: in the initrd they would cost every boot).
fn demo_layers() -> Result<()> {
    apt_install(&["busybox-static", "e2fsprogs"])?;
    let dir = guest_dir()?.join("layers");
    let base = stage(&dir, "base")?;
    busybox_tree(&base)?;
    for sub in ["etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(base.join(sub))?;
    }
    std::fs::write(base.join("etc/hello.txt"), "hello from the base layer\n")?;
    std::fs::write(
        base.join("etc/remove-me.txt"),
        "the app layer deletes this\n",
    )?;

    let app = stage(&dir, "app")?;
    std::fs::create_dir_all(app.join("etc"))?;
    std::fs::write(app.join("etc/app.txt"), "added by the app layer\n")?;
    std::fs::write(app.join("etc/hello.txt"), "hello from the app layer\n")?;
    whiteout(&app.join("etc/remove-me.txt"))?;

    let test = stage(&dir, "test")?;
    std::fs::create_dir_all(test.join("bin"))?;
    std::fs::copy(guest_bin("uvm-vsock-test"), test.join("bin/uvm-vsock-test"))?;

    let tools = stage(&guest_dir()?, "tools")?;
    busybox_tree(&tools)?;

    for name in ["base", "app", "test"] {
        layer_image(
            &dir.join(format!("{name}.d")),
            &dir.join(format!("{name}.img")),
        )?;
    }
    layer_image(&tools, &guest_dir()?.join("tools.img"))
}

/// busybox as /bin/busybox, with a link for each applet where it installs it.
fn busybox_tree(root: &Path) -> Result<()> {
    for sub in ["bin", "sbin", "usr/bin", "usr/sbin"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    for applet in busybox_applets()? {
        if applet != "bin/busybox" {
            symlink(Path::new("/bin/busybox"), &root.join(&applet))?;
        }
    }
    Ok(())
}

fn layer_image(from: &Path, image: &Path) -> Result<()> {
    run(cargo()
        .args([
            "run", "--quiet", "-p", "vmm", "--bin", "uvm", "--", "layer", "create",
        ])
        .arg("--from")
        .arg(from)
        .arg("-o")
        .arg(image))
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

/// Guest layers are built on Linux; elsewhere xtask only has to compile (it
/// is part of the workspace's Windows check).
#[cfg(not(unix))]
fn symlink(_: &Path, link: &Path) -> std::io::Result<()> {
    let e = format!("{}: layers are built on Linux hosts", link.display());
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, e))
}

/// A fresh, empty staging directory `<dir>/<name>.d`.
fn stage(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.d"));
    if path.exists() {
        std::fs::remove_dir_all(&path)?;
    }
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

/// An overlayfs whiteout: a 0:0 character device hides `path` below.
fn whiteout(path: &Path) -> Result<()> {
    run(Command::new("mknod").arg(path).args(["c", "0", "0"]))
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

fn guest() -> Result<()> {
    kernel::build()?;
    initrd()?;
    demo_layers()
}

/// uvm as it ships: a static musl binary, whose resident memory is half
/// that of a glibc one linked dynamically (no shared-library pages).
fn uvm() -> Result<PathBuf> {
    run(Command::new("rustup").args(["target", "add", AGENT_TARGET]))?;
    // The image store's C parts (zstd, ring for TLS) need a musl C compiler.
    apt_install(&["musl-tools"])?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "vmm",
        "--bin",
        "uvm",
        "--target",
        AGENT_TARGET,
    ]))?;
    Ok(root().join("target").join(AGENT_TARGET).join("release/uvm"))
}

fn demo() -> Result<()> {
    guest()?;
    let uvm = uvm()?;
    let layers = guest_dir()?.join("layers");
    run(Command::new(uvm)
        .args(["run", "--timings", "--layer"])
        .arg(layers.join("base.img"))
        .arg("--layer")
        .arg(layers.join("app.img"))
        .args([
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/hello.txt /etc/app.txt; ls /etc; mount | grep -E 'pmem|overlay'",
        ]))
}

fn test() -> Result<()> {
    check_kvm()?;
    guest()?;
    // The bench tests boot QEMU microvm next to uvm; the image tests
    // build their images with umoci and skopeo and pull them from a
    // registry on loopback; the OCI runtime's tests drive podman and
    // containerd.
    apt_install(&[
        "qemu-system-x86",
        "umoci",
        "skopeo",
        "docker-registry",
        "podman",
        "containerd",
    ])?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    windows_check()?;
    // uvm as the demo and bench ship it: the static musl build.
    uvm()?;
    // --show-output: each boot test says which kind of KVM host it ran on.
    run(cargo().args(["test", "--workspace", "--", "--show-output"]))?;
    nested_tests()?;
    // Every fuzz target for a short time: what the seeds and CI-length
    // runs reach must not crash, hang or grow.
    fuzz::check()?;
    fuzz::fuzz(fuzz::CI_SECONDS, None)
}

/// The integration tests once more on hardware KVM, inside the nested L1
/// (tests/README.md says why all of them), one test at a time: the
/// emulated L1 has two slow vCPUs.
fn nested_tests() -> Result<()> {
    let binaries = integration_tests()?;
    let script = r#"rc=0; for t in "$@"; do echo "== nested: $t"; "$t" --test-threads=1 --show-output || rc=1; done; exit $rc"#;
    let mut command: Vec<String> = ["/bin/sh", "-c", script, "sh"].map(String::from).to_vec();
    command.extend(binaries.iter().map(|b| b.to_string_lossy().into_owned()));
    let status = nested::run_in_l1(&command, &nested::Options::default())?;
    if status != 0 {
        bail!("integration tests failed on hardware KVM (nested L1): exit status {status}");
    }
    Ok(())
}

/// The integration test executables (tests/), as `cargo test` built them.
fn integration_tests() -> Result<Vec<PathBuf>> {
    let out = cargo()
        .args([
            "test",
            "-p",
            "vmm",
            "-p",
            "uvm-oci",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("listing the integration tests")?;
    if !out.status.success() {
        bail!("building the integration tests failed");
    }
    let tests: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "test")
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect();
    if tests.is_empty() {
        bail!("cargo built no integration tests");
    }
    Ok(tests)
}

/// The WHP backend and everything `uvm` needs on Windows are type-checked
/// and linted for Windows: they cannot run on a Linux host.
fn windows_check() -> Result<()> {
    const WINDOWS: &str = "x86_64-pc-windows-msvc";
    run(Command::new("rustup").args(["target", "add", WINDOWS]))?;
    run(cargo().args(["check", "--workspace", "--target", WINDOWS]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--target",
        WINDOWS,
        "--",
        "-D",
        "warnings",
    ]))
}

/// The standard comparison, stored in target/bench/ for people and CI;
/// with `--nested` on hardware KVM inside the nested L1, stored in
/// target/bench/nested/.
fn bench(extra: &[String]) -> Result<()> {
    check_kvm()?;
    guest()?;
    apt_install(&["qemu-system-x86"])?;
    let uvm = uvm()?;
    let nested = extra.iter().any(|a| a == "--nested");
    let extra: Vec<&String> = extra.iter().filter(|a| *a != "--nested").collect();
    let out = root().join(if nested {
        "target/bench/nested"
    } else {
        "target/bench"
    });
    std::fs::create_dir_all(&out)?;
    // `--operate N`: the cost of operating N running VMs, not boots.
    let operate = extra.iter().any(|a| *a == "--operate");
    let mut args: Vec<String> = ["bench", "--runs", "30", "--warmup", "1"]
        .map(String::from)
        .to_vec();
    if !operate {
        args.extend(["--against", "qemu"].map(String::from));
        for (flag, file) in [("--json", "bench.json"), ("--plot", "bench.svg")] {
            args.extend([
                flag.to_string(),
                out.join(file).to_string_lossy().into_owned(),
            ]);
        }
    }
    args.extend(extra.into_iter().cloned());
    let table = out.join(if operate { "operate.txt" } else { "table.txt" });
    if nested {
        return bench_nested(&uvm, &args, &out, &table);
    }
    let run = Command::new(uvm)
        .args(&args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running uvm bench")?;
    let text = String::from_utf8_lossy(&run.stdout);
    print!("{text}");
    std::fs::write(&table, text.as_bytes())?;
    if !run.status.success() {
        bail!("uvm bench failed ({})", run.status);
    }
    eprintln!("xtask: results in {}", out.display());
    Ok(())
}

/// `uvm bench` in the nested L1, writing into `out` (shared read-write).
fn bench_nested(uvm: &Path, args: &[String], out: &Path, table: &Path) -> Result<()> {
    let script = r#"t=$1; shift; "$@" > "$t"; rc=$?; cat "$t"; exit $rc"#;
    let mut command: Vec<String> = ["/bin/sh", "-c", script, "sh"].map(String::from).to_vec();
    command.push(table.to_string_lossy().into_owned());
    command.push(uvm.to_string_lossy().into_owned());
    command.extend(args.iter().cloned());
    let options = nested::Options {
        writable: vec![out.to_owned()],
        ..nested::Options::default()
    };
    let status = nested::run_in_l1(&command, &options)?;
    if status != 0 {
        bail!("uvm bench failed in the nested L1 (exit status {status})");
    }
    eprintln!("xtask: results in {}", out.display());
    Ok(())
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
            eprintln!("xtask: no usable /dev/kvm: the boot tests are compiled as ignored (the summary counts them)");
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
