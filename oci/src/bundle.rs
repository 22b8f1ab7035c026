//! An OCI bundle (config.json and its root directory) and the VM that runs
//! it: what config.json asks for, as `uvm create` flags, and what a VM
//! cannot honour, as warnings.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use oci_spec::runtime::{Mount, PosixRlimit, Process, Spec};

/// Guest RAM below this does not boot the agent; uvm's own minimum.
const MIN_MEMORY_MIB: u64 = 64;
/// uvm's most vCPUs.
const MAX_CPUS: u64 = 64;
/// Annotations naming the guest kernel and initrd (as config-vm.md's
/// `vm.kernel` does).
pub const KERNEL_ANNOTATION: &str = "io.uvm.kernel";
pub const INITRD_ANNOTATION: &str = "io.uvm.initrd";

/// Mounts the VM provides itself: the agent mounts /proc, a devtmpfs /dev
/// (with /dev/pts for a terminal) and /tmp in every container.
const PROVIDED: [&str; 5] = ["/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys/fs/cgroup"];

pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    /// The root directory, resolved against the bundle.
    pub root: PathBuf,
}

impl Bundle {
    /// Reads `dir`'s config.json and checks what the VM cannot go without.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let dir = std::path::absolute(dir).with_context(|| format!("bundle {}", dir.display()))?;
        let config = dir.join("config.json");
        let text = std::fs::read(&config)
            .with_context(|| format!("bundle {}: reading config.json", dir.display()))?;
        let spec: Spec = serde_json::from_slice(&text)
            .with_context(|| format!("bundle {}: config.json is not valid", dir.display()))?;
        let Some(root) = spec.root() else {
            bail!("bundle {}: config.json has no root", dir.display());
        };
        let root = dir.join(root.path());
        if !root.is_dir() {
            bail!(
                "bundle {}: its root {} is not a directory",
                dir.display(),
                root.display()
            );
        }
        let argv = spec.process().as_ref().and_then(|p| p.args().clone());
        if argv.is_none_or(|a| a.is_empty()) {
            bail!("bundle {}: config.json has no process.args", dir.display());
        }
        Ok(Self { dir, spec, root })
    }

    fn process(&self) -> &Process {
        self.spec.process().as_ref().expect("checked by load")
    }

    /// The container as `uvm create` flags (the command not included).
    pub fn plan(&self) -> Plan {
        let mut plan = Plan::default();
        let process = self.process();
        plan.process(process);
        if let Some(hostname) = self.spec.hostname() {
            plan.flag("--hostname", hostname);
        }
        for mount in self.spec.mounts().iter().flatten() {
            plan.mount(mount, &self.dir);
        }
        plan.resources(&self.spec);
        plan.guest(&self.spec);
        plan.unsupported(&self.spec);
        plan
    }

    pub fn argv(&self) -> Vec<String> {
        self.process().args().clone().unwrap_or_default()
    }

    pub fn terminal(&self) -> bool {
        self.process().terminal().unwrap_or(false)
    }
}

/// What `uvm create` gets, and what the VM leaves out.
#[derive(Debug, Default)]
pub struct Plan {
    pub flags: Vec<String>,
    pub warnings: Vec<String>,
}

impl Plan {
    fn flag(&mut self, flag: &str, value: impl Into<String>) {
        self.flags.push(flag.into());
        self.flags.push(value.into());
    }

    /// The process's environment, directory, user and limits (its command
    /// and terminal are the caller's).
    fn process(&mut self, process: &Process) {
        for entry in process.env().iter().flatten() {
            match entry.split_once('=') {
                Some((key, _)) if !key.is_empty() => self.flag("-e", entry.clone()),
                _ => self.warn(format!(
                    "environment entry `{entry}` is not KEY=VALUE: left out"
                )),
            }
        }
        self.flag("-w", process.cwd().to_string_lossy());
        let user = process.user();
        self.flag("-u", format!("{}:{}", user.uid(), user.gid()));
        let extra_groups = user.additional_gids().iter().flatten();
        if extra_groups.filter(|&&g| g != user.gid()).count() > 0 {
            self.warn("additional groups are not set: the process has its user's groups".into());
        }
        for limit in process.rlimits().iter().flatten() {
            self.flag("--ulimit", ulimit(limit));
        }
    }

    /// A mount the VM makes itself is left to it; bind mounts become
    /// volumes (`uvm --mount type=bind`), tmpfs and sysfs stay what they
    /// are; anything else is a warning.
    fn mount(&mut self, mount: &Mount, bundle: &Path) {
        let destination = mount.destination().to_string_lossy().into_owned();
        let kind = mount.typ().as_deref().unwrap_or("");
        let options = mount.options().clone().unwrap_or_default();
        let has = |o: &str| options.iter().any(|x| x == o);
        let read_only = if has("ro") { ",readonly" } else { "" };
        if PROVIDED.contains(&destination.as_str()) {
            return;
        }
        // A host's shared memory directory cannot be shared with a VM.
        if destination == "/dev/shm" || kind == "tmpfs" {
            return self.flag(
                "--mount",
                format!("type=tmpfs,target={destination}{read_only}"),
            );
        }
        if kind == "sysfs" {
            return self.flag(
                "--mount",
                format!("type=sysfs,target={destination}{read_only}"),
            );
        }
        if kind == "bind" || has("bind") || has("rbind") {
            let Some(source) = mount.source() else {
                return self.warn(format!("bind mount {destination} has no source: left out"));
            };
            let source = bundle.join(source);
            return self.flag(
                "--mount",
                format!(
                    "type=bind,source={},target={destination}{read_only}",
                    source.display()
                ),
            );
        }
        self.warn(format!(
            "mount {destination} (type {kind}) is not supported in a VM: left out"
        ));
    }

    /// linux.resources: the memory limit is the guest's RAM, the CPU quota
    /// (or cpuset) its vCPUs.
    fn resources(&mut self, spec: &Spec) {
        let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().clone()) else {
            return;
        };
        let limit = resources.memory().as_ref().and_then(|m| m.limit());
        if let Some(bytes) = limit.filter(|&b| b > 0) {
            let mib = (bytes as u64).div_ceil(1 << 20);
            if mib < MIN_MEMORY_MIB {
                self.warn(format!(
                    "memory limit {mib} MiB: the VM gets {MIN_MEMORY_MIB} MiB"
                ));
            }
            self.flag("--memory", mib.max(MIN_MEMORY_MIB).to_string());
        }
        if let Some(cpu) = resources.cpu() {
            let quota = cpu.quota().filter(|&q| q > 0).map(|q| q as u64);
            let from_quota = quota.zip(cpu.period().filter(|&p| p > 0));
            let cpus = match from_quota {
                Some((quota, period)) => Some(quota.div_ceil(period)),
                None => cpu.cpus().as_deref().and_then(cpuset_size),
            };
            if let Some(cpus) = cpus {
                self.flag("--cpus", cpus.clamp(1, MAX_CPUS).to_string());
            }
        }
    }

    /// The guest kernel and initrd, from config-vm.md's `vm` or our
    /// annotations.
    fn guest(&mut self, spec: &Spec) {
        let annotation = |key: &str| {
            spec.annotations()
                .as_ref()
                .and_then(|a| a.get(key).cloned())
        };
        let vm = spec.vm().as_ref();
        let kernel = vm.map(|vm| vm.kernel().path().to_string_lossy().into_owned());
        if let Some(kernel) = kernel.or_else(|| annotation(KERNEL_ANNOTATION)) {
            self.flag("--kernel", kernel);
        }
        let initrd = vm.and_then(|vm| vm.kernel().initrd().clone());
        if let Some(initrd) = initrd.or_else(|| annotation(INITRD_ANNOTATION)) {
            self.flag("--initrd", initrd);
        }
        let parameters = vm.and_then(|vm| vm.kernel().parameters().clone());
        if let Some(parameters) = parameters.filter(|p| !p.is_empty()) {
            self.flag("--cmdline", parameters.join(" "));
        }
    }

    /// What config.json asks for that the VM does not apply, said once.
    fn unsupported(&mut self, spec: &Spec) {
        let mut ignored = Vec::new();
        if let Some(linux) = spec.linux() {
            if linux.seccomp().is_some() {
                ignored.push("the seccomp profile");
            }
            if linux.devices().as_ref().is_some_and(|d| !d.is_empty()) {
                ignored.push("devices");
            }
            if linux.sysctl().as_ref().is_some_and(|s| !s.is_empty()) {
                ignored.push("sysctls");
            }
        }
        if let Some(process) = spec.process() {
            if process.capabilities().is_some() {
                ignored.push("capabilities (the process has root's in its VM)");
            }
            if process.apparmor_profile().is_some() || process.selinux_label().is_some() {
                ignored.push("LSM labels");
            }
        }
        if !ignored.is_empty() {
            self.warn(format!(
                "not applied: the VM is the container's boundary: {}",
                ignored.join(", ")
            ));
        }
    }

    fn warn(&mut self, warning: String) {
        self.warnings.push(warning);
    }
}

/// `nofile=SOFT:HARD`, uvm's --ulimit.
fn ulimit(limit: &PosixRlimit) -> String {
    let name = limit.typ().to_string();
    let name = name.trim_start_matches("RLIMIT_").to_ascii_lowercase();
    format!("{name}={}:{}", limit.soft(), limit.hard())
}

/// How many CPUs a cpuset such as `0-3,6` names.
fn cpuset_size(set: &str) -> Option<u64> {
    set.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => Some(b.trim().parse::<u64>().ok()? + 1 - a.trim().parse::<u64>().ok()?),
            None => part.trim().parse::<u64>().ok().map(|_| 1),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> (PathBuf, anyhow::Result<Bundle>) {
        let dir = std::env::temp_dir().join(format!(
            "uvm-oci-bundle-{}-{}",
            std::process::id(),
            config.len()
        ));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        let loaded = Bundle::load(&dir);
        (dir, loaded)
    }

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "box",
        "process": {
            "args": ["sh", "-c", "exit 5"], "cwd": "/srv", "terminal": true,
            "env": ["PATH=/bin", "BAD"],
            "user": {"uid": 1000, "gid": 100, "additionalGids": [100]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "bind", "source": "/var/shm", "options": ["bind"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/run/hosts", "options": ["rbind", "ro"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
            {"destination": "/mnt", "type": "nfs", "source": "server:/x"}
        ],
        "linux": {
            "resources": {"memory": {"limit": 268435456}, "cpu": {"quota": 150000, "period": 100000}},
            "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}
        },
        "annotations": {"io.uvm.kernel": "/k/vmlinux"}
    }"#;

    #[test]
    fn config_json_becomes_uvm_flags_and_warnings() {
        let (dir, loaded) = bundle(CONFIG);
        let bundle = loaded.unwrap();
        assert_eq!(bundle.argv(), ["sh", "-c", "exit 5"]);
        assert!(bundle.terminal());
        let plan = bundle.plan();
        let flags = plan.flags.join(" ");
        for expected in [
            "-e PATH=/bin -w /srv -u 1000:100 --ulimit nofile=1024:4096 --hostname box",
            "--mount type=tmpfs,target=/dev/shm",
            "--mount type=bind,source=/run/hosts,target=/etc/hosts,readonly",
            "--mount type=sysfs,target=/sys,readonly",
            "--memory 256 --cpus 2 --kernel /k/vmlinux",
        ] {
            assert!(flags.contains(expected), "{expected} in {flags}");
        }
        assert!(
            !flags.contains("/proc") && !flags.contains("/mnt"),
            "{flags}"
        );
        let warnings = plan.warnings.join("\n");
        for expected in ["`BAD`", "/mnt (type nfs)", "seccomp"] {
            assert!(warnings.contains(expected), "{expected} in {warnings}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_bundle_says_what_is_wrong() {
        let (dir, loaded) = bundle("{not json");
        let e = format!("{:#}", loaded.err().unwrap());
        assert!(e.contains("config.json is not valid"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let no_root = r#"{"ociVersion": "1.0.2", "root": {"path": "nowhere"}, "process": {"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#;
        let (dir, loaded) = bundle(no_root);
        let e = format!("{:#}", loaded.err().unwrap());
        assert!(e.contains("nowhere is not a directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = Bundle::load(Path::new("/nonexistent-bundle"))
            .err()
            .unwrap();
        assert!(format!("{missing:#}").contains("reading config.json"));
    }

    #[test]
    fn cpusets_count_their_cpus() {
        assert_eq!(cpuset_size("0-3,6"), Some(5));
        assert_eq!(cpuset_size("2"), Some(1));
        assert_eq!(cpuset_size("x"), None);
    }
}
