//! The VM as a library value: built, started, paused, resumed and shut down
//! in this test process, with real guests, and checked from inside the
//! process (its threads in /proc/self/task, its mappings in /proc/self/maps).

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest::protocol::{Exited, Root};
use support::{guest_dir, layer, require_kvm};
use vmm::hypervisor::kvm::KvmHypervisor;
use vmm::process::{Outcome, ProcessSpec};
use vmm::sys::Stdio;
use vmm::vm::{snapshot, Exit, Running, UtilityVm, VmConfig, VsockConfig, DEFAULT_GUEST_CID};

/// Names of the threads a VM starts (vCPUs are `vcpu0`, `vcpu1`, …).
const VM_THREADS: [&str; 6] = ["events", "agent", "stdout", "stderr", "stdin", "signals"];

/// For a test that boots: one VM at a time (the tests look at the whole
/// process), with a guard against hangs.
/// The guard goes (and joins its thread) before the lock is let go.
fn exclusive(test: &'static str) -> (HangGuard, MutexGuard<'static, ()>) {
    static LOCK: Mutex<()> = Mutex::new(());
    require_kvm(test);
    let one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    (HangGuard::new(test), one)
}

/// Output collected in memory.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<u8>>>);

impl Collected {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Collected {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn config(memory_mib: u64, script: &str) -> VmConfig {
    VmConfig {
        kernel: guest_dir().join("vmlinux"),
        initrd: guest_dir().join("initrd.img"),
        extra_cmdline: None,
        memory_mib,
        cpus: 1,
        console: false,
        host: vmm::pvm::detect(),
        vsock: VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds: None,
        },
        layers: vec![layer("base")],
        tools: None,
        scratch: None,
        shares: Vec::new(),
        process: Some(ProcessSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            root: Some(Root {
                layers: 1,
                dax: true,
                ..Root::default()
            }),
            ..ProcessSpec::default()
        }),
    }
}

/// Starts `config`'s VM with its stdout collected.
fn start(config: &VmConfig) -> (Running<KvmHypervisor>, Collected, Collected) {
    start_built(build(config))
}

fn build(config: &VmConfig) -> UtilityVm<KvmHypervisor> {
    let open = || KvmHypervisor::for_host(config.host);
    UtilityVm::build(open, config, Instant::now()).expect("build")
}

/// Starts a built VM with no stdin and its stdout and stderr collected.
fn start_built(vm: UtilityVm<KvmHypervisor>) -> (Running<KvmHypervisor>, Collected, Collected) {
    let (stdout, stderr) = (Collected::default(), Collected::default());
    let stdio = Stdio {
        stdin: std::fs::File::open("/dev/null").unwrap().into(),
        stdout: Box::new(stdout.clone()),
        stderr: Box::new(stderr.clone()),
    };
    let running = vm.start(stdio).expect("start");
    running.release().expect("release");
    (running, stdout, stderr)
}

/// Fails the test (by aborting the process, since the test's own thread is
/// the one stuck) if the guard is not dropped within the hang timeout.
struct HangGuard {
    done: Option<std::sync::mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl HangGuard {
    fn new(what: &'static str) -> Self {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    wait.recv_timeout(support::HANG_TIMEOUT)
                {
                    eprintln!("{what}: hung for {:?}", support::HANG_TIMEOUT);
                    std::process::abort();
                }
            })
            .unwrap();
        Self {
            done: Some(done),
            watchdog: Some(watchdog),
        }
    }
}

impl Drop for HangGuard {
    fn drop(&mut self) {
        drop(self.done.take()); // wakes the watchdog, which lets us be
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
    }
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}

fn vm_threads() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|name| name.starts_with("vcpu") || VM_THREADS.contains(&name.as_str()))
        .collect()
}

/// Lines of /proc/self/maps that overlap any of `ranges` or name `file`.
fn mappings_of(ranges: &[(u64, u64)], file: &std::path::Path) -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let file = file.to_string_lossy().into_owned();
    maps.lines()
        .filter(|line| {
            let span = line.split_whitespace().next().unwrap_or_default();
            let (start, end) = span.split_once('-').unwrap_or(("0", "0"));
            let start = u64::from_str_radix(start, 16).unwrap_or(0);
            let end = u64::from_str_radix(end, 16).unwrap_or(0);
            let overlaps = ranges.iter().any(|&(at, len)| start < at + len && at < end);
            overlaps || line.ends_with(&file)
        })
        .map(String::from)
        .collect()
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn two_vms_in_turn_leave_no_thread_and_no_mapping_behind() {
    let _exclusive = exclusive("two_vms_in_turn_leave_no_thread_and_no_mapping_behind");
    let threads_before = thread_names().len();
    assert_eq!(vm_threads(), Vec::<String>::new(), "no VM yet");
    for round in 0..2 {
        let (running, stdout, stderr) = start(&config(136, "echo hi $0"));
        // A new thread names itself once it runs: give them a moment.
        let named = |during: &[String]| {
            ["vcpu0", "events", "agent", "signals"]
                .iter()
                .all(|name| during.iter().any(|t| t == name))
        };
        let since = Instant::now();
        while !named(&vm_threads()) && since.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let during = vm_threads();
        assert!(named(&during), "VM threads missing: {during:?}");
        let memory = running.guest_memory().to_vec();
        assert_eq!(memory[0].1, 136 << 20, "guest RAM is the first range");
        assert!(!mappings_of(&memory, &layer("base")).is_empty());

        let exit = running.wait();
        let report = running.shutdown();
        assert_eq!(exit, Exit::Process(Outcome::Exited(Exited::Code(0))));
        assert_eq!(report.exit, exit);
        assert_eq!(
            stdout.text(),
            "hi /bin/sh\n",
            "round {round}: {}",
            stderr.text()
        );
        assert_eq!(vm_threads(), Vec::<String>::new(), "round {round}");
        // At most as many as before: a thread of the test that ran before
        // this one may still have been ending when they were counted.
        assert!(
            thread_names().len() <= threads_before,
            "round {round}: threads left behind"
        );
        assert_eq!(
            mappings_of(&memory, &layer("base")),
            Vec::<String>::new(),
            "round {round}: guest memory still mapped"
        );
    }
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_paused_guest_stops_and_resumes_where_it_was() {
    let _exclusive = exclusive("a_paused_guest_stops_and_resumes_where_it_was");
    let script = "i=0; while [ $i -lt 30 ]; do cat /proc/uptime; i=$((i+1)); usleep 20000; done; \
                  echo done";
    let (mut running, stdout, stderr) = start(&config(128, script));
    while stdout.text().lines().count() < 3 {
        assert_eq!(running.ended(), None, "ended early: {}", stderr.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    running.pause().expect("pause");
    // What the guest queued before the pause may still arrive; then nothing.
    std::thread::sleep(Duration::from_millis(300));
    let paused = stdout.text();
    // The paused CPUs' state, read on the vCPU threads (what a snapshot
    // saves); the guest goes on as before.
    let cpus = running.save_cpus().expect("save the CPU state");
    assert_eq!(cpus.vcpus.len(), 1);
    assert_ne!(cpus.vcpus[0].sregs.cr3, 0, "a guest with page tables");
    assert!(cpus.vcpus[0].msrs.iter().any(|m| m.index == 0x10), "TSC");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stdout.text(), paused, "output while paused");
    running.resume();
    let exit = running.wait();
    drop(running);
    assert_eq!(
        exit,
        Exit::Process(Outcome::Exited(Exited::Code(0))),
        "{}",
        stderr.text()
    );
    let out = stdout.text();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 31, "{out}");
    assert_eq!(lines[30], "done");
    let uptimes: Vec<f64> = lines[..30]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        uptimes.windows(2).all(|w| w[0] <= w[1]),
        "the guest clock went backwards: {uptimes:?}"
    );
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn vms_restored_from_a_waiting_agent_run_their_own_processes() {
    let _exclusive = exclusive("vms_restored_from_a_waiting_agent_run_their_own_processes");
    // A template: saved while its agent, connected, waits for work.
    let mut template = build(&config(128, "true"));
    template.hold_run().expect("hold the run request");
    let (mut template, _, stderr) = start_built(template);
    if let Err(exit) = template.wait_agent_connected() {
        panic!("{exit:?}: {}", stderr.text());
    }
    template.pause().expect("pause");
    let dir = support::tempdir("vm-snapshot");
    template.save(&dir, IDENTITY).expect("save a snapshot");
    // The VM a template was taken from goes on to run its own process.
    template.resume();
    template.release_run();
    let exit = template.wait();
    drop(template);
    assert_eq!(exit, Exit::Process(Outcome::Exited(Exited::Code(0))));
    // Time passes: the restored guests' clocks must not lag by it.
    std::thread::sleep(Duration::from_secs(3));

    let script = "cat /proc/sys/kernel/random/boot_id; \
                  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '; date +%s";
    let mut seen = Vec::new();
    for round in 0..2 {
        let start = Instant::now();
        let config = config(128, script);
        let open = || KvmHypervisor::for_host(config.host);
        let snapshot = snapshot::read(&dir, config.host).expect("read the snapshot");
        let vm = UtilityVm::restore(open, &config, start, snapshot, IDENTITY).expect("restore");
        let (running, stdout, stderr) = start_built(vm);
        if running.wait_agent_connected().is_ok() {
            eprintln!(
                "round {round}: build, restore → agent ready in {:?}",
                start.elapsed()
            );
        }
        let exit = running.wait();
        let report = running.shutdown();
        let host_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let console = report.console.tail();
        assert_eq!(
            exit,
            Exit::Process(Outcome::Exited(Exited::Code(0))),
            "round {round}: {}\nconsole:\n{console}",
            stderr.text()
        );
        assert!(!console.contains("uvm-agent: ready"), "booted cold");
        let out = stdout.text();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let guest_time: u64 = lines[2].parse().unwrap();
        assert!(
            host_time.abs_diff(guest_time) <= 2,
            "guest clock {guest_time}, host {host_time}"
        );
        seen.push((lines[0].to_string(), lines[1].to_string()));
    }
    assert_ne!(seen[0].0, seen[1].0, "the boot IDs are the same");
    assert_ne!(seen[0].1, seen[1].1, "the random bytes are the same");

    // A snapshot of other inputs is refused, naming itself.
    let config = config(128, "true");
    let open = || KvmHypervisor::for_host(config.host);
    let snapshot = snapshot::read(&dir, config.host).expect("read the snapshot");
    let refused = UtilityVm::restore(open, &config, Instant::now(), snapshot, "other").err();
    let refused = refused
        .expect("a snapshot of other inputs restored")
        .to_string();
    assert!(refused.contains(&*dir.to_string_lossy()), "{refused}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What the template test says its VMs were built from.
const IDENTITY: &str = "tests/vm.rs: base layer, 128 MiB, 1 vCPU";
