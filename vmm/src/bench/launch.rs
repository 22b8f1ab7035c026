//! Starting one benchmark VM under uvm or QEMU and measuring it: every time
//! is taken on the host clock from the VMM's spawn, at the same guest marks
//! (the agent's boot-timer writes) and at the VMM's exit.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use guest::boot_mark;
use guest::protocol::{self, Root};
use serde::{Deserialize, Serialize};
use vmm::process::ProcessSpec;
use vmm::pvm::{self, HostKind};
use vmm::vm::{self, VmConfig, VsockConfig, DEFAULT_GUEST_CID};

use crate::VmArgs;

/// A VM that takes longer is killed and the benchmark fails.
const HANG_TIMEOUT: Duration = Duration::from_secs(600);
/// x86 Linux's COMMAND_LINE_SIZE, less room for QEMU's device entries.
const MAX_QEMU_CMDLINE: usize = 2048 - 512;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vmm {
    /// uvm booting cold.
    Uvm,
    /// uvm restoring its template.
    #[serde(rename = "uvm-template")]
    UvmTemplate,
    Qemu,
}

impl std::fmt::Display for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Vmm::Uvm => "uvm",
            Vmm::UvmTemplate => "uvm-template",
            Vmm::Qemu => "qemu",
        })
    }
}

/// One VM's measurements, in milliseconds from its VMM's spawn.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    /// Until the first guest instruction (uvm reports it; QEMU does not).
    pub vmm_setup_ms: Option<f64>,
    /// The agent's first mark: the kernel has booted and run /init.
    pub ready_ms: f64,
    pub process_started_ms: f64,
    pub process_exited_ms: f64,
    /// Until the VMM process was gone.
    pub total_ms: f64,
    /// The VMM's resident memory without guest RAM.
    pub vmm_rss_kib: Option<u64>,
    /// User + system CPU time of the VMM process (its vCPU threads included).
    pub vmm_cpu_ms: f64,
}

/// VMs started together (one, unless `--parallel`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    pub samples: Vec<Sample>,
    /// From the first spawn until every VM's agent was ready.
    pub all_ready_ms: f64,
    /// The VMMs' private host memory (guest RAM touched, their own heap),
    /// summed, at its peak.
    pub host_memory_kib: u64,
}

pub struct Launcher {
    uvm: PathBuf,
    /// The peer's binary, with `--against qemu`.
    qemu: Option<PathBuf>,
    vm: VmArgs,
    command: Vec<String>,
    host: HostKind,
    /// Names the marks sockets of QEMU VMs apart.
    next_socket: AtomicU64,
    /// The store of the template series' template.
    store: OwnStore,
}

/// A store of the bench's own, removed with it.
struct OwnStore(PathBuf);

impl Drop for OwnStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Launcher {
    /// Checks what can be checked before anything boots: QEMU runs, and
    /// the request fits on its guest's command line.
    pub fn new(vm: VmArgs, command: Vec<String>, qemu: Option<&Path>) -> anyhow::Result<Self> {
        let launcher = Self {
            uvm: std::env::current_exe().context("locating the uvm binary")?,
            qemu: qemu.map(Path::to_path_buf),
            host: vm.host.unwrap_or_else(pvm::detect),
            vm,
            command,
            next_socket: AtomicU64::new(0),
            store: OwnStore(
                std::env::temp_dir().join(format!("uvm-bench-store-{}", std::process::id())),
            ),
        };
        if let Some(qemu) = &launcher.qemu {
            check_qemu(qemu)?;
            launcher.qemu_cmdline()?;
        }
        Ok(launcher)
    }

    pub fn vm(&self) -> &VmArgs {
        &self.vm
    }

    pub fn command(&self) -> &[String] {
        &self.command
    }

    pub fn host_name(&self) -> String {
        let name = self
            .host
            .to_possible_value()
            .map(|v| v.get_name().to_string());
        name.unwrap_or_default()
    }

    /// Starts `parallel` VMs at once and measures each to its end.
    pub fn batch(&self, vmm: Vmm, kernel: &Path, parallel: u32) -> anyhow::Result<Batch> {
        let start = Instant::now();
        let running = (0..parallel)
            .map(|_| self.start(vmm, kernel))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let memory = HostMemory::watch(running.iter().map(|vm| vm.child.id()).collect());
        let mut samples = Vec::new();
        let mut all_ready_ms: f64 = 0.0;
        for vm in running {
            let offset = ms(vm.spawned.duration_since(start));
            let sample = vm.finish()?;
            all_ready_ms = all_ready_ms.max(offset + sample.ready_ms);
            samples.push(sample);
        }
        Ok(Batch {
            samples,
            all_ready_ms,
            host_memory_kib: memory.peak_kib(),
        })
    }

    fn start(&self, vmm: Vmm, kernel: &Path) -> anyhow::Result<RunningVm> {
        match vmm {
            Vmm::Uvm => self.start_uvm(kernel, false),
            Vmm::UvmTemplate => self.start_uvm(kernel, true),
            Vmm::Qemu => self.start_qemu(kernel),
        }
    }

    fn start_uvm(&self, kernel: &Path, template: bool) -> anyhow::Result<RunningVm> {
        let mut args: Vec<OsString> = vec!["run".into(), "--timings".into()];
        if !template {
            args.push("--cold".into());
        }
        args.push("--kernel".into());
        args.push(kernel.into());
        args.extend(super::vm_flags(&self.vm));
        args.push("--".into());
        args.extend(self.command.iter().map(OsString::from));
        let mut cmd = Command::new(&self.uvm);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.env("UVM_STORE", &self.store.0).env_remove("UVM_COLD");
        let vmm = if template { Vmm::UvmTemplate } else { Vmm::Uvm };
        RunningVm::spawn(vmm, cmd, None)
    }

    fn start_qemu(&self, kernel: &Path) -> anyhow::Result<RunningVm> {
        let qemu = self
            .qemu
            .as_ref()
            .context("no QEMU binary (--against qemu)")?;
        let n = self.next_socket.fetch_add(1, Ordering::Relaxed);
        let socket =
            std::env::temp_dir().join(format!("uvm-bench-{}-{n}.sock", std::process::id()));
        let mut cmd = Command::new(qemu);
        cmd.args(self.qemu_args(kernel, &socket)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let _ = std::fs::remove_file(&socket);
        let marks = MarksSocket {
            listener: UnixListener::bind(&socket)
                .with_context(|| format!("marks socket {}", socket.display()))?,
            path: socket,
            guest_ram: self.vm.memory << 20,
        };
        RunningVm::spawn(Vmm::Qemu, cmd, Some(marks))
    }

    /// QEMU microvm with the same kernel, initrd, command line, memory and
    /// vCPUs. Differences forced by QEMU: the layers are read-only virtio
    /// disks (microvm has no virtio-pmem), there is no vsock (no
    /// vhost-vsock needed), so the command travels on the kernel command
    /// line and its stdio is the console; marks go to an isa-debugcon at
    /// the boot-timer port.
    fn qemu_args(&self, kernel: &Path, socket: &Path) -> anyhow::Result<Vec<OsString>> {
        let cmdline = self.qemu_cmdline()?;
        let cpu = match self.host {
            // PVM cannot virtualize the ARCH_CAPABILITIES MSR QEMU sets.
            HostKind::Pvm => "host,-arch-capabilities",
            HostKind::Hardware => "host",
        };
        let mut args: Vec<OsString> = [
            "-M",
            "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on,acpi=off",
            "-global",
            "virtio-mmio.force-legacy=false",
            "-enable-kvm",
            "-cpu",
            cpu,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-device",
            "i8042", // `reboot=k` ends the VM, as under uvm
            "-serial",
            "stdio",
        ]
        .map(OsString::from)
        .to_vec();
        let mut add = |flag: &str, value: OsString| args.extend([flag.into(), value]);
        add("-m", self.vm.memory.to_string().into());
        add("-smp", self.vm.cpus.to_string().into());
        add("-kernel", kernel.into());
        add("-initrd", self.vm.initrd.clone().unwrap_or_default().into());
        add("-append", cmdline.into());
        add(
            "-chardev",
            qemu_path_option("socket,id=marks,path=", socket),
        );
        let debugcon = format!("isa-debugcon,iobase={:#x},chardev=marks", boot_mark::PORT);
        add("-device", debugcon.into());
        for (i, layer) in self.vm.layers.iter().enumerate() {
            let drive = format!("if=none,id=layer{i},format=raw,readonly=on,file=");
            add("-drive", qemu_path_option(&drive, layer));
            let serial = guest::disk_serial::layer(i as u32);
            add(
                "-device",
                format!("virtio-blk-device,drive=layer{i},serial={serial}").into(),
            );
        }
        Ok(args)
    }

    /// uvm's guest flags and the run request.
    fn qemu_cmdline(&self) -> anyhow::Result<String> {
        let cmdline = format!("{} {}", vm::guest_flags(&self.config()), self.run_arg());
        if cmdline.len() > MAX_QEMU_CMDLINE {
            bail!(
                "the command and flags need {} bytes of the QEMU guest's kernel command line; at most {MAX_QEMU_CMDLINE} fit",
                cmdline.len()
            );
        }
        Ok(cmdline)
    }

    /// The guest uvm would boot, for its command-line flags (the kernel
    /// plays no part in them).
    fn config(&self) -> VmConfig {
        VmConfig {
            kernel: PathBuf::new(),
            initrd: self.vm.initrd.clone().unwrap_or_default(),
            extra_cmdline: self.vm.cmdline.clone(),
            memory_mib: self.vm.memory,
            cpus: self.vm.cpus,
            console: false,
            host: self.host,
            vsock: VsockConfig {
                guest_cid: DEFAULT_GUEST_CID,
                uds: None,
            },
            layers: self.vm.layers.clone(),
            tools: None,
            scratch: None,
            shares: Vec::new(),
            process: None,
        }
    }

    /// The run request, for the kernel command line.
    fn run_arg(&self) -> String {
        let root = self.vm.root(self.vm.layers.len(), false).map(|root| Root {
            layer_disks: true,
            dax: false,
            ..root
        });
        let process = ProcessSpec {
            argv: self.command.clone(),
            env: self.vm.env.clone(),
            cwd: self.vm.workdir.clone(),
            tty: None,
            user: None,
            root,
            ..ProcessSpec::default()
        };
        protocol::to_cmdline(&process.request())
    }
}

/// Fails early, naming the package, when QEMU is not installed.
fn check_qemu(qemu: &Path) -> anyhow::Result<()> {
    match Command::new(qemu).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => bail!(
            "{} does not run: install Debian's qemu-system-x86 (`cargo xtask bench` does) or pass --qemu",
            qemu.display()
        ),
    }
}

/// `prefix` and `path` as one QEMU option value (commas in it doubled).
fn qemu_path_option(prefix: &str, path: &Path) -> OsString {
    let path = path.to_string_lossy().replace(',', ",,");
    format!("{prefix}{path}").into()
}

/// Where QEMU's debugcon connects; the socket file goes with it.
struct MarksSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The size of QEMU's guest RAM mapping, to leave it out of its memory.
    guest_ram: u64,
}

impl Drop for MarksSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Guest marks as they arrive from QEMU's debugcon, and QEMU's memory.
#[derive(Default)]
struct Marks {
    at: Vec<(u8, Instant)>,
    rss_kib: Option<u64>,
}

impl Marks {
    fn get(&self, mark: u8) -> Option<Instant> {
        self.at.iter().find(|(m, _)| *m == mark).map(|&(_, at)| at)
    }
}

struct RunningVm {
    vmm: Vmm,
    child: Child,
    pidfd: Arc<OwnedFd>,
    spawned: Instant,
    /// `spawned` on the monotonic clock.
    spawned_at: Duration,
    stderr: JoinHandle<String>,
    /// QEMU: the console (the command's output and exit status).
    stdout: Option<JoinHandle<String>>,
    /// QEMU: the marks reader.
    marks: Option<(JoinHandle<Marks>, Arc<AtomicBool>)>,
}

impl RunningVm {
    fn spawn(vmm: Vmm, mut cmd: Command, marks: Option<MarksSocket>) -> anyhow::Result<Self> {
        cmd.stderr(Stdio::piped());
        // SAFETY: prctl between fork and exec, on the child alone: a VM
        // does not outlive an interrupted bench.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let (spawned, spawned_at) = (Instant::now(), vmm::clock::monotonic());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        let pidfd = Arc::new(pidfd_open(child.id())?);
        let stderr = read_all(child.stderr.take());
        let stdout = child.stdout.take().map(|out| read_all(Some(out)));
        let marks = marks.map(|socket| {
            let stop = Arc::new(AtomicBool::new(false));
            let reader = read_marks(socket, child.id(), stop.clone());
            (reader, stop)
        });
        Ok(Self {
            vmm,
            child,
            pidfd,
            spawned,
            spawned_at,
            stderr,
            stdout,
            marks,
        })
    }

    /// Waits for the VMM to exit (killing it after [`HANG_TIMEOUT`]) and
    /// turns what it reported into a sample.
    fn finish(self) -> anyhow::Result<Sample> {
        let (done, watchdog) = watchdog(self.pidfd.clone());
        let (status, cpu) = reap(&self.child)?;
        let total = self.spawned.elapsed();
        drop(done);
        let killed = watchdog.join().unwrap_or(false);
        let stderr = self.stderr.join().unwrap_or_default();
        let console = self.stdout.map(|h| h.join().unwrap_or_default());
        let marks = self.marks.map(|(reader, stop)| {
            stop.store(true, Ordering::Relaxed);
            reader.join().unwrap_or_default()
        });
        let tail = tail(&stderr, console.as_deref());
        if killed {
            bail!(
                "{} did not end within {HANG_TIMEOUT:?} and was killed{tail}",
                self.vmm
            );
        }
        let mut sample = match marks {
            Some(_) if !status.success() => bail!("qemu exited with {status}{tail}"),
            Some(marks) => qemu_sample(&marks, self.spawned, console.as_deref(), &tail)?,
            None => uvm_sample(&stderr, status, self.spawned_at, &tail)?,
        };
        sample.total_ms = ms(total);
        sample.vmm_cpu_ms = ms(cpu);
        Ok(sample)
    }
}

/// A sample from `uvm run --timings`: its times count from its own start,
/// which it gives on the monotonic clock, so they shift by the time from
/// spawn to that start.
fn uvm_sample(
    stderr: &str,
    status: ExitStatus,
    spawned_at: Duration,
    tail: &str,
) -> anyhow::Result<Sample> {
    if !status.success() {
        bail!("uvm run exited with {status}{tail}");
    }
    // The timings come last, as one flat JSON object, possibly right after
    // COMMAND's own stderr if that did not end in a newline.
    let json = stderr
        .rfind('{')
        .map(|at| stderr[at..].trim_end())
        .with_context(|| format!("uvm run printed no timings{tail}"))?;
    let t: serde_json::Value = serde_json::from_str(json).context("uvm run's timings")?;
    let get = |key: &str| t.get(key).and_then(serde_json::Value::as_f64);
    let started = get("started_at_monotonic_ms").context("timings without a start time")?;
    let offset = (started - ms(spawned_at)).max(0.0);
    let mark = |key: &str| {
        get(key)
            .map(|at| at + offset)
            .with_context(|| format!("the guest never reported {key}{tail}"))
    };
    // A restored agent does not start again: it is ready once reconnected.
    let ready = match t.get("boot").and_then(serde_json::Value::as_str) {
        Some("template") => "agent_connected_ms",
        _ => "agent_started_ms",
    };
    Ok(Sample {
        vmm_setup_ms: get("vmm_setup_ms").map(|at| at + offset),
        ready_ms: mark(ready)?,
        process_started_ms: mark("process_started_ms")?,
        process_exited_ms: mark("process_exited_ms")?,
        total_ms: 0.0,
        vmm_rss_kib: t.get("vmm_rss_kib").and_then(serde_json::Value::as_u64),
        vmm_cpu_ms: 0.0,
    })
}

fn qemu_sample(
    marks: &Marks,
    spawned: Instant,
    console: Option<&str>,
    tail: &str,
) -> anyhow::Result<Sample> {
    let status = vmm::process::exit_status_on_console(console.unwrap_or_default())
        .with_context(|| format!("the QEMU guest reported no exit status{tail}"))?;
    if status != 0 {
        bail!("the command exited with {status} in the QEMU guest{tail}");
    }
    let mark = |mark: u8, name: &str| {
        marks
            .get(mark)
            .map(|at| ms(at.duration_since(spawned)))
            .with_context(|| format!("the QEMU guest never marked {name}{tail}"))
    };
    Ok(Sample {
        vmm_setup_ms: None,
        ready_ms: mark(boot_mark::AGENT_STARTED, "agent start")?,
        process_started_ms: mark(boot_mark::PROCESS_STARTED, "process start")?,
        process_exited_ms: mark(boot_mark::PROCESS_EXITED, "process exit")?,
        total_ms: 0.0,
        vmm_rss_kib: marks.rss_kib,
        vmm_cpu_ms: 0.0,
    })
}

/// The end of what the VMM printed, to explain a failure.
fn tail(stderr: &str, console: Option<&str>) -> String {
    let last = |text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let mut tail = String::new();
    if !stderr.trim().is_empty() {
        tail += &format!("\nstderr:\n{}", last(stderr));
    }
    if let Some(console) = console.filter(|c| !c.trim().is_empty()) {
        tail += &format!("\nconsole:\n{}", last(console));
    }
    tail
}

fn read_all(stream: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut s) = stream {
            let _ = s.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// Stamps each mark byte QEMU's debugcon sends as it arrives; once the
/// process runs, takes QEMU's memory without the guest RAM (not later: QEMU
/// would pay for the read in its teardown).
fn read_marks(socket: MarksSocket, pid: u32, stop: Arc<AtomicBool>) -> JoinHandle<Marks> {
    std::thread::spawn(move || {
        let mut marks = Marks::default();
        let Some(mut stream) = accept_until(&socket.listener, &stop) else {
            return marks;
        };
        let mut byte = [0u8; 1];
        while matches!(stream.read(&mut byte), Ok(1)) {
            marks.at.push((byte[0], Instant::now()));
            if byte[0] == boot_mark::PROCESS_STARTED {
                let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"));
                marks.rss_kib = smaps.ok().map(|s| {
                    let guest = vmm::rss::mappings_of_at_least(&s, socket.guest_ram);
                    vmm::rss::outside(&s, &guest)
                });
            }
        }
        marks
    })
}

/// QEMU connects at its start; a QEMU that fails first never does.
fn accept_until(
    listener: &UnixListener,
    stop: &AtomicBool,
) -> Option<std::os::unix::net::UnixStream> {
    listener.set_nonblocking(true).ok()?;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).ok()?;
                return Some(stream);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    None
}

/// Kills the VMM if `done` is not dropped within [`HANG_TIMEOUT`]; says
/// whether it did.
fn watchdog(pidfd: Arc<OwnedFd>) -> (mpsc::Sender<()>, JoinHandle<bool>) {
    let (done, wait) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || match wait.recv_timeout(HANG_TIMEOUT) {
        Err(RecvTimeoutError::Timeout) => {
            // SAFETY: a signal through a pidfd we own: it cannot reach a
            // recycled pid.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            true
        }
        _ => false,
    });
    (done, handle)
}

fn pidfd_open(pid: u32) -> anyhow::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reaps the child with its resource usage: its exit status and CPU time.
fn reap(child: &Child) -> anyhow::Result<(ExitStatus, Duration)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: the out-pointers are valid for the call.
        let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
        if rc >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("waiting for the VMM");
        }
    }
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let cpu = time(usage.ru_utime) + time(usage.ru_stime);
    Ok((ExitStatus::from_raw(status), cpu))
}

/// The host memory a batch's VMMs hold: anonymous and shared-memory pages
/// (guest RAM the guests touched, the VMMs' own heaps), not the page cache
/// of layer files that all VMs share. Sampled every few milliseconds.
struct HostMemory {
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<u64>,
}

impl HostMemory {
    fn watch(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(pids.iter().filter_map(|&pid| private_kib(pid)).sum());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        Self { stop, sampler }
    }

    fn peak_kib(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap_or(0)
    }
}

/// RssAnon + RssShmem of `pid`, if it still runs.
fn private_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(vmm::rss::kib)
    };
    Some(field("RssAnon:")? + field("RssShmem:")?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uvm_times_shift_to_its_spawn() {
        let stderr = "uvm: something\n{\"vmm_setup_ms\":10.0,\"agent_started_ms\":100.0,\
            \"process_started_ms\":150.0,\"process_exited_ms\":180.0,\"total_ms\":190.0,\
            \"vmm_rss_kib\":3000,\"started_at_monotonic_ms\":5002.0}\n";
        let ok = ExitStatus::from_raw(0);
        let s = uvm_sample(stderr, ok, Duration::from_secs(5), "").unwrap();
        assert_eq!(s.vmm_setup_ms, Some(12.0));
        assert_eq!((s.ready_ms, s.process_exited_ms), (102.0, 182.0));
        assert_eq!(s.vmm_rss_kib, Some(3000));
        let failed = ExitStatus::from_raw(1 << 8);
        let err = uvm_sample(stderr, failed, Duration::ZERO, "\nstderr: boom").unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        let glued = format!("no newline{}", stderr.lines().last().unwrap());
        assert!(uvm_sample(&glued, ok, Duration::from_secs(5), "").is_ok());
        let no_process = "{\"agent_started_ms\":1.0,\"started_at_monotonic_ms\":2.0}";
        let err = uvm_sample(no_process, ok, Duration::ZERO, "").unwrap_err();
        assert!(err.to_string().contains("process_started_ms"), "{err}");
    }

    #[test]
    fn qemu_needs_every_mark_and_a_zero_status() {
        let t0 = Instant::now();
        let marks = Marks {
            at: [1, 2, 3]
                .map(|m| (m, t0 + Duration::from_millis(10 * u64::from(m))))
                .to_vec(),
            rss_kib: Some(9000),
        };
        let console = "uvm-agent: ready\nuvm-agent: exit status 0\r\n";
        let s = qemu_sample(&marks, t0, Some(console), "").unwrap();
        assert_eq!((s.ready_ms, s.process_started_ms), (10.0, 20.0));
        assert_eq!(s.vmm_setup_ms, None);
        let failed = "uvm-agent: exit status 0\nuvm-agent: exit status 127\n";
        assert!(
            qemu_sample(&marks, t0, Some(failed), "").is_err(),
            "the last one counts"
        );
        assert!(qemu_sample(&Marks::default(), t0, Some(console), "").is_err());
    }

    #[test]
    fn commas_in_qemu_paths_are_doubled() {
        let opt = qemu_path_option("file=", Path::new("/a,b/c.img"));
        assert_eq!(opt, OsString::from("file=/a,,b/c.img"));
    }
}
