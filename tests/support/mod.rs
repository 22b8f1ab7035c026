//! Helpers for tests that boot real guests with the `uvm` binary.
// Each test binary uses its own part of them.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Generous: only here to turn a hang into a failure. A PVM boot takes ~10 s,
/// a bzImage one (decompression emulated) longer.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(300);

/// `uvm`, booting cold: a test about the boot, the run protocol or the
/// devices must not depend on a template an earlier test left. Tests of
/// templates use [`uvm_templated`].
pub fn uvm() -> Command {
    let mut uvm = Command::new(uvm_binary());
    uvm.env("UVM_COLD", "1");
    uvm
}

/// `uvm` as users run it, with its templates (and images) in `store`.
pub fn uvm_templated(store: &std::path::Path) -> Command {
    let mut uvm = Command::new(uvm_binary());
    uvm.env_remove("UVM_COLD").env("UVM_STORE", store);
    uvm
}

/// The uvm binary: this package's (vmm's tests), or the one built beside
/// uvm-oci (uvm-oci's tests, which the workspace's build makes too).
pub fn uvm_binary() -> PathBuf {
    let beside_uvm_oci =
        option_env!("CARGO_BIN_EXE_uvm-oci").map(|p| PathBuf::from(p).with_file_name("uvm"));
    option_env!("CARGO_BIN_EXE_uvm")
        .map(PathBuf::from)
        .or(beside_uvm_oci)
        .expect("a test of vmm or uvm-oci")
}

/// `target/guest/`, where `cargo xtask guest` puts the kernel and initrd.
pub fn guest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest")
}

/// A demo layer image from `cargo xtask demo-layers` (base, app, test).
pub fn layer(name: &str) -> PathBuf {
    guest_dir().join("layers").join(format!("{name}.img"))
}

/// For a test that boots: fails unless /dev/kvm opens. Where it cannot
/// (and CI is not set), vmm's build script compiles such tests as ignored
/// (`kvm_missing`), so the runner counts them as skipped, never as passed.
/// Says on which kind of KVM host the test runs (shown with `--show-output`).
pub fn require_kvm(test: &str) {
    let opened = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = opened {
        panic!("{test}: needs /dev/kvm, which cannot be opened: {e}");
    }
    eprintln!("{test}: on {} KVM", host_kind());
}

/// "PVM" or "hardware": the kind of KVM host the tests run on.
pub fn host_kind() -> &'static str {
    match vmm::pvm::detect() {
        vmm::pvm::HostKind::Pvm => "PVM",
        vmm::pvm::HostKind::Hardware => "hardware",
    }
}

/// Runs `cmd` to completion, killing it (and failing) if it hangs.
pub fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uvm");
    wait_or_kill(&mut child);
    child.wait_with_output().expect("collect uvm output")
}

/// Waits for `child`, killing it (and failing with its stderr) if it hangs.
pub fn wait_or_kill(child: &mut Child) -> ExitStatus {
    let watchdog = Watchdog::default(child);
    let status = child.wait().expect("wait for uvm");
    if watchdog.fired() {
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        panic!("uvm hung for {HANG_TIMEOUT:?}; stderr:\n{err}");
    }
    status
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `script` with `sh -e`, `args` as its $1…, and fails the test
/// (with its output) if it fails.
pub fn sh(script: &str, args: &[&std::path::Path]) {
    let out = run(Command::new("/bin/sh")
        .arg("-ec")
        .arg(script)
        .arg("sh")
        .args(args));
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// A fresh directory for one test's files.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uvm-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts a failed run with exactly one error line naming `what`.
pub fn assert_fails_naming(out: &Output, what: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr:\n{err}"
    );
    assert!(err.contains(what), "error does not name {what:?}:\n{err}");
    assert!(!err.contains("panicked"), "uvm panicked:\n{err}");
}

/// Kills a process the test waits for or reads from with blocking calls if
/// it outlives a timeout, so that a hang fails the test instead of stalling it.
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn new(child: &Child, timeout: Duration) -> Self {
        let pid = child.id() as libc::pid_t;
        let (done, wait) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
                eprintln!("watchdog: killing uvm after {timeout:?}");
                flag.store(true, Ordering::SeqCst);
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        Self {
            done: Some(done),
            fired,
        }
    }

    pub fn default(child: &Child) -> Self {
        Self::new(child, HANG_TIMEOUT)
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take()); // wakes the thread, which leaves uvm alone
    }
}
