//! `cargo xtask nested`: uvm's hardware-KVM path on a machine without
//! VMX/SVM. QEMU's emulator (TCG) with an AMD CPU model that has SVM boots
//! Debian's own kernel (L1, fetched with `apt-get download` and unpacked
//! into the cache, never installed), which loads kvm_amd and so has a real
//! /dev/kvm. The host's root is shared read-only over 9p; L1 runs COMMAND
//! as its root, in the same working directory, so the project's binaries
//! run as they are. COMMAND's output is L1's console; its exit status ours.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{apt_install, cpio, kernel, run};

/// Debian's kernel, which has kvm_amd and 9p as modules.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// Loaded in this order (each after what it depends on): the virtio PCI
/// transport and 9p for the host's root, overlayfs for a writable /tmp
/// over it, then KVM for AMD.
const MODULES: [&str; 15] = [
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
    "virt/lib/irqbypass",
    "drivers/crypto/ccp/ccp",
    "arch/x86/kvm/kvm",
    "arch/x86/kvm/kvm-amd",
];
/// An AMD CPU model with SVM and nested paging, emulated.
const L1_CPU: &str = "EPYC,+svm,+npt";
/// What L1 prints after COMMAND, for us to take its exit status from.
const STATUS_LINE: &str = "uvm-nested: exit status ";
/// Host environment variables COMMAND sees too.
const PASSED_ENV: [&str; 5] = [
    "CI",
    "RUST_BACKTRACE",
    "RUST_TEST_THREADS",
    "UVM_LOG",
    "TERM",
];

/// How one L1 runs.
pub struct Options {
    pub memory_mib: u32,
    pub cpus: u32,
    /// The whole run, L1's boot included.
    pub timeout: Duration,
    /// How long L1's console may stay silent before L1 counts as frozen
    /// (the emulated L1 has been seen to stop, busy, with nothing inside
    /// answering).
    pub silence: Duration,
    /// Host directories L1 may write (shared read-write at the same path).
    pub writable: Vec<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            memory_mib: 4096,
            cpus: 2,
            timeout: Duration::from_secs(40 * 60),
            silence: Duration::from_secs(5 * 60),
            writable: Vec::new(),
        }
    }
}

/// `cargo xtask nested [--memory MiB] [--cpus N] [--timeout SECS] [-- COMMAND…]`
pub fn main(args: &[String]) -> Result<()> {
    let mut options = Options::default();
    let mut args = args.iter();
    let mut command = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |flag: &'static str| {
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            Ok::<_, anyhow::Error>((flag, value.clone()))
        };
        match arg.as_str() {
            "--memory" => options.memory_mib = number(value("--memory")?)?,
            "--cpus" => options.cpus = number(value("--cpus")?)?,
            "--timeout" => options.timeout = Duration::from_secs(number(value("--timeout")?)?),
            "--silence" => options.silence = Duration::from_secs(number(value("--silence")?)?),
            "--" => {
                command = args.cloned().collect();
                break;
            }
            other => bail!("cargo xtask nested: unknown flag {other:?} (commands go after --)"),
        }
    }
    if command.is_empty() {
        command = boot_check();
    }
    let status = run_in_l1(&command, &options)?;
    if status != 0 {
        bail!("in the nested L1, {command:?} exited with status {status}");
    }
    Ok(())
}

/// A flag's numeric value.
fn number<T: std::str::FromStr>((flag, value): (&str, String)) -> Result<T> {
    value
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag} takes a number, not {value:?}"))
}

/// Without COMMAND: /dev/kvm is there and is hardware KVM (kvm_amd).
fn boot_check() -> Vec<String> {
    let script =
        "test -c /dev/kvm && test -d /sys/module/kvm_amd && ! test -d /sys/module/kvm_pvm \
                  && echo 'uvm-nested: /dev/kvm is kvm_amd on emulated SVM'";
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// What stopped an L1 that did not report.
enum Stuck {
    /// Its console said nothing for this long.
    Silent(Duration),
    /// The whole run took longer than this.
    TimedOut(Duration),
    /// Its kernel said its CPUs stopped running its threads.
    LockedUp,
}

/// Boots L1, runs `command` there, and returns its exit status. An L1 that
/// freezes (silent console, a soft lockup, or past the timeout) is killed
/// and, once, run again from the start, saying so; a second freeze, or an
/// L1 that ends without reporting, is an error saying what happened. A
/// command that fails is never run again.
pub fn run_in_l1(command: &[String], options: &Options) -> Result<i32> {
    match boot_l1(command, options)? {
        Ok(status) => Ok(status),
        Err(stuck) => {
            eprintln!(
                "xtask: the nested L1 {}; retrying once (policy: one retry after a freeze of the \
                 emulated L1, none after a failure)",
                stuck.describe()
            );
            match boot_l1(command, options)? {
                Ok(status) => Ok(status),
                Err(again) => bail!("the nested L1 {} again; not retried", again.describe()),
            }
        }
    }
}

impl Stuck {
    fn describe(&self) -> String {
        match self {
            Stuck::Silent(d) => format!("froze: its console was silent for {}s", d.as_secs()),
            Stuck::TimedOut(d) => format!("did not finish within {}s", d.as_secs()),
            Stuck::LockedUp => "locked up: its kernel reported a soft lockup".into(),
        }
    }
}

/// One L1 run: COMMAND's status, or how L1 got stuck.
fn boot_l1(command: &[String], options: &Options) -> Result<std::result::Result<i32, Stuck>> {
    apt_install(&["qemu-system-x86", "busybox-static"])?;
    let l1 = l1_kernel()?;
    let cwd = std::env::current_dir().context("working directory")?;
    let initramfs = l1.dir.join("l1-initramfs.cpio");
    let script = command_script(command, &cwd);
    std::fs::write(
        &initramfs,
        initramfs_image(&l1, &script, &options.writable)?,
    )
    .with_context(|| format!("writing {}", initramfs.display()))?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        L1_CPU,
    ])
    .args(["-m", &options.memory_mib.to_string()])
    .args(["-smp", &options.cpus.to_string()])
    .args([
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&l1.vmlinuz)
    .arg("-initrd")
    .arg(&initramfs)
    .args(["-append", "console=ttyS0 panic=-1 rdinit=/init quiet"])
    .args([
        "-virtfs",
        "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
    ]);
    for (i, dir) in options.writable.iter().enumerate() {
        let share = format!(
            "local,path={},mount_tag=out{i},security_model=none",
            dir.display()
        );
        qemu.args(["-virtfs", &share]);
    }
    eprintln!(
        "xtask: nested L1 (QEMU TCG, {L1_CPU}, Debian {}): {command:?}",
        l1.version
    );
    watch(qemu, options)
}

/// Runs QEMU, passing L1's console on, until L1 reports COMMAND's status
/// and powers off, or it is stuck.
fn watch(mut qemu: Command, options: &Options) -> Result<std::result::Result<i32, Stuck>> {
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (lines, console) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            if lines.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut heard = Instant::now();
    let mut status = None;
    let mut last = Vec::new();
    let outcome = loop {
        match console.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => match line.strip_prefix(STATUS_LINE) {
                Some(code) => status = code.trim().parse::<i32>().ok(),
                None => {
                    println!("{line}");
                    let locked_up = l1_locked_up(&line);
                    last.push(line);
                    let excess = last.len().saturating_sub(20);
                    last.drain(..excess);
                    if locked_up {
                        break Err(Stuck::LockedUp);
                    }
                }
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) if started.elapsed() >= options.timeout => {
                break Err(Stuck::TimedOut(options.timeout));
            }
            Err(mpsc::RecvTimeoutError::Timeout) if heard.elapsed() >= options.silence => {
                break Err(Stuck::Silent(options.silence));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        }
        heard = Instant::now();
    };
    if outcome.is_err() {
        let _ = child.kill();
    }
    let qemu_status = child.wait().context("waiting for QEMU")?;
    let _ = reader.join();
    match (outcome, status) {
        (Err(stuck), _) => {
            eprintln!(
                "xtask: the nested L1 {}; its last console lines:\n{}",
                stuck.describe(),
                last.join("\n")
            );
            Ok(Err(stuck))
        }
        (Ok(()), Some(code)) => Ok(Ok(code)),
        (Ok(()), None) => bail!(
            "the nested L1 ended ({qemu_status}) without reporting an exit status; its last \
             console lines:\n{}",
            last.join("\n")
        ),
    }
}

/// L1's own kernel says its CPUs stopped running its threads: the
/// emulated L1 has been seen to lock up so while a nested guest ran, its
/// console printing only these reports, so it never fell silent. L1's
/// kernel lines carry a timestamp; a nested guest's (in a test's output)
/// do not.
fn l1_locked_up(line: &str) -> bool {
    line.starts_with('[') && line.contains("] watchdog: BUG: soft lockup")
}

/// Debian's kernel, unpacked into the cache.
struct L1Kernel {
    dir: PathBuf,
    version: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn l1_kernel() -> Result<L1Kernel> {
    let package = kernel_package()?;
    let dir = kernel::cache_root()?.join("nested").join(&package);
    let unpacked = dir.join("root");
    if !unpacked.join("boot").is_dir() {
        std::fs::create_dir_all(&dir)?;
        eprintln!("xtask: fetching {package} for the nested L1");
        run(Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&dir))?;
        let deb = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let staging = dir.join("root.partial");
        let _ = std::fs::remove_dir_all(&staging);
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&staging))?;
        std::fs::rename(&staging, &unpacked)?;
        std::fs::remove_file(&deb)?;
    }
    let version = only_entry(&unpacked.join("lib/modules"))?;
    Ok(L1Kernel {
        vmlinuz: unpacked.join(format!("boot/vmlinuz-{version}")),
        modules: unpacked.join("lib/modules").join(&version).join("kernel"),
        version,
        dir,
    })
}

/// The versioned package `linux-image-amd64` depends on.
fn kernel_package() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_META_PACKAGE])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(String::from)
        .with_context(|| format!("apt-cache depends {KERNEL_META_PACKAGE} names no kernel"))
}

fn only_entry(dir: &Path) -> Result<String> {
    let mut names = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let name = names
        .next()
        .with_context(|| format!("{} is empty", dir.display()))??;
    Ok(name.file_name().to_string_lossy().into_owned())
}

/// L1's initramfs: busybox, the modules, /init and COMMAND's script.
fn initramfs_image(l1: &L1Kernel, script: &str, writable: &[PathBuf]) -> Result<Vec<u8>> {
    let mut archive = cpio::Archive::with_console();
    for dir in ["bin", "dev", "tmp", "host", "modules"] {
        archive.dir(dir);
    }
    archive.file("bin/busybox", &crate::read(Path::new(crate::BUSYBOX))?);
    let mut names = Vec::new();
    for module in MODULES {
        let name = Path::new(module).file_name().expect("a module name");
        let name = name.to_string_lossy().into_owned();
        let file = l1.modules.join(format!("{module}.ko"));
        archive.file(&format!("modules/{name}.ko"), &crate::read(&file)?);
        names.push(name);
    }
    archive.file("init", init_script(&names, writable).as_bytes());
    archive.file("command", script.as_bytes());
    Ok(archive.finish())
}

/// PID 1 of L1: load the modules, mount the host's root (and the writable
/// shares over it), switch to it, run COMMAND there and report its status.
fn init_script(modules: &[String], writable: &[PathBuf]) -> String {
    let mounts: String = writable
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            format!(
                "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out{i} '/host{}' || fail\n",
                dir.display()
            )
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "uvm-nested: L1 set-up failed"; echo "{STATUS_LINE}125"; poweroff -f; }}
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev || fail
for m in {modules}; do insmod /modules/$m.ko || fail; done
# Loopback: tests serve and reach programs on 127.0.0.1 (a registry).
ip link set lo up || fail
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 host /host || fail
# A writable /tmp over the host's (conmon makes its console sockets there)
# and /var/lib (uvm's store as root, where uvm-oci's VMs keep templates).
mkdir /tmpw && mount -t tmpfs tmpw /tmpw || fail
for d in tmp var/lib; do
  mkdir -p /tmpw/$d/upper /tmpw/$d/work || fail
  mount -t overlay -o lowerdir=/host/$d,upperdir=/tmpw/$d/upper,workdir=/tmpw/$d/work $d /host/$d || fail
done
{mounts}mount -t proc proc /host/proc && mount -t sysfs sys /host/sys || fail
mount -t devtmpfs dev /host/dev && mount -t tmpfs run /host/run && mkdir /host/run/tmp || fail
# Where podman's image transports unpack archives (not $TMPDIR).
mount -t tmpfs vartmp /host/var/tmp || fail
mkdir -p /host/dev/pts /host/dev/shm && mount -t devpts -o ptmxmode=666 pts /host/dev/pts || fail
mount -t tmpfs shm /host/dev/shm || fail
cp /command /host/run/uvm-nested-command
# The host's root becomes L1's root, not a chroot: the kernel refuses a
# chrooted caller a user namespace (tests use `unshare -r`).
exec switch_root /host /bin/busybox sh -c \
    '/bin/sh /run/uvm-nested-command; printf "\\n{STATUS_LINE}%d\\n" $?; /bin/busybox poweroff -f'
"#,
        modules = modules.join(" "),
    )
}

/// COMMAND in the same working directory, with the environment it needs.
fn command_script(command: &[String], cwd: &Path) -> String {
    // UVM_NESTED_EMULATOR: tests may excuse what the emulated L1 causes.
    let mut script = String::from(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
         UVM_NESTED_EMULATOR=qemu-tcg TMPDIR=/run/tmp\n",
    );
    for name in PASSED_ENV {
        if let Ok(value) = std::env::var(name) {
            script.push_str(&format!("export {name}={}\n", quote(&value)));
        }
    }
    script.push_str(&format!(
        "cd {} || exit 125\n",
        quote(&cwd.to_string_lossy())
    ));
    let words: Vec<String> = command.iter().map(|w| quote(w)).collect();
    script.push_str(&format!("exec {}\n", words.join(" ")));
    script
}

/// `word` as one shell word.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_l1_s_own_soft_lockup_reports_count_as_a_lockup() {
        let l1 = "[   77.089931] watchdog: BUG: soft lockup - CPU#0 stuck for 48s! [kworker/0:0:7]";
        assert!(l1_locked_up(l1));
        let guest = "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]";
        assert!(!l1_locked_up(guest));
        let stall = "[   50.012326] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:";
        assert!(!l1_locked_up(stall));
    }

    #[test]
    fn the_command_runs_quoted_in_the_same_directory() {
        let script = command_script(
            &["/bin/sh".into(), "-c".into(), "echo 'it''s' $HOME".into()],
            Path::new("/work/my tree"),
        );
        assert!(
            script.contains("cd '/work/my tree' || exit 125\n"),
            "{script}"
        );
        assert!(
            script.ends_with("exec '/bin/sh' '-c' 'echo '\\''it'\\'''\\''s'\\'' $HOME'\n"),
            "{script}"
        );
    }

    #[test]
    fn init_loads_modules_in_order_and_mounts_writable_shares() {
        let init = init_script(&["a".into(), "b".into()], &["/w/target/bench".into()]);
        assert!(init.contains("for m in a b; do insmod /modules/$m.ko"));
        assert!(init.contains("ip link set lo up"));
        assert!(init.contains("mount -t tmpfs vartmp /host/var/tmp"));
        assert!(init.contains("for d in tmp var/lib; do"));
        assert!(init.contains("out0 '/host/w/target/bench'"));
        // On a line of its own, whatever COMMAND printed last.
        assert!(init.contains(&format!(r#"printf "\\n{STATUS_LINE}%d\\n" $?"#)));
    }
}
