//! uvm as an OCI runtime (issue 16): Debian's podman 4.3 (with conmon) and
//! containerd 1.6 (with ctr and its runc shim) drive `uvm-oci`, which runs
//! each container in a VM of its own; an image loaded from a local OCI
//! archive (no network). Then `uvm-oci` alone: its state after each step,
//! runc's refusals, and bad bundles.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::{require_kvm, run, sh, stderr, stdout, tempdir};

const UVM_OCI: &str = env!("CARGO_BIN_EXE_uvm-oci");
/// The image's name once loaded.
const IMAGE: &str = "localhost/uvm-oci-test:1";

/// A busybox image as an OCI archive, and its unpacked bundle (config.json
/// made by umoci), built once per test binary.
struct Image {
    archive: PathBuf,
    bundle: PathBuf,
}

fn image() -> &'static Image {
    static IMAGE_BUILT: OnceLock<Image> = OnceLock::new();
    IMAGE_BUILT.get_or_init(|| {
        let dir = tempdir("oci-image");
        sh(
            r#"d=$1; rm -rf "$d/oci" "$d/bundle"
            umoci init --layout "$d/oci"
            umoci new --image "$d/oci:1"
            umoci unpack --image "$d/oci:1" "$d/bundle"
            r="$d/bundle/rootfs"; mkdir -p "$r/bin" "$r/etc" "$r/tmp"
            cp /bin/busybox "$r/bin/busybox"
            for a in sh echo cat ls sleep hostname tty test true; do ln -s busybox "$r/bin/$a"; done
            umoci repack --image "$d/oci:1" "$d/bundle"
            umoci config --image "$d/oci:1" --config.cmd /bin/sh
            rm -rf "$d/bundle"
            umoci unpack --image "$d/oci:1" "$d/bundle"
            skopeo --tmpdir "$d" copy -q "oci:$d/oci:1" "oci-archive:$d/image.tar:localhost/uvm-oci-test:1"
            "#,
            &[&dir],
        );
        Image {
            archive: dir.join("image.tar"),
            bundle: dir.join("bundle"),
        }
    })
}

/// podman with a store, runtime state and temporary files of its own,
/// `uvm-oci` as its runtime, and the image loaded.
struct Podman {
    dir: PathBuf,
}

fn podman() -> &'static Podman {
    static PODMAN: OnceLock<Podman> = OnceLock::new();
    PODMAN.get_or_init(|| {
        let dir = tempdir("podman");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf = format!(
            "[engine]\nimage_copy_tmp_dir = \"{}\"\nevents_logger = \"file\"\n\
             [engine.runtimes]\nuvm-oci = [\"{UVM_OCI}\"]\n",
            dir.join("tmp").display()
        );
        std::fs::write(dir.join("containers.conf"), conf).unwrap();
        let podman = Podman { dir };
        let archive = &image().archive;
        let loaded = run(podman.command().arg("load").arg("-i").arg(archive));
        assert!(loaded.status.success(), "podman load: {}", stderr(&loaded));
        podman
    })
}

impl Podman {
    fn command(&self) -> Command {
        let mut podman = Command::new("podman");
        podman
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("TMPDIR", self.dir.join("tmp"))
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--runtime", "uvm-oci"]);
        podman
    }

    /// `podman run --rm --network none ARGS` (a VM has no host network).
    fn run(&self, args: &[&str]) -> Output {
        run(self
            .command()
            .args(["run", "--rm", "--network", "none"])
            .args(args))
    }

    /// uvm-oci's default root: podman's --runtime-flag does not reach the
    /// runtime conmon starts.
    fn oci_root(&self) -> PathBuf {
        PathBuf::from("/run/uvm-oci")
    }
}

/// The containers under a uvm-oci root, and the VMs under its uvm root.
fn left_behind(root: &Path) -> (Vec<String>, Vec<String>) {
    let names = |dir: &Path, skip: &[&str]| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| !skip.contains(&name.as_str()))
                    .collect()
            })
            .unwrap_or_default()
    };
    (names(root, &["vms"]), names(&root.join("vms"), &["lock"]))
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn podman_runs_containers_in_vms_with_their_output_exit_code_and_volumes() {
    require_kvm("podman_runs_containers_in_vms_with_their_output_exit_code_and_volumes");
    let podman = podman();
    let out = podman.run(&[IMAGE, "echo", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi\n");

    let data = tempdir("oci-volume");
    std::fs::write(data.join("f.txt"), "from the host\n").unwrap();
    let volume = format!("{}:/data", data.display());
    let script = "cat /data/f.txt; echo back > /data/g.txt; ulimit -n; hostname; exit 5";
    let cidfile = data.join("cid");
    let out = podman.run(&[
        "--cidfile",
        &cidfile.to_string_lossy(),
        "-v",
        &volume,
        "--ulimit",
        "nofile=4096:4096",
        "--hostname",
        "box",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from the host\n4096\nbox\n");
    // The volume is shared, not copied: the container's write is the host's.
    assert_eq!(
        std::fs::read_to_string(data.join("g.txt")).unwrap(),
        "back\n"
    );
    // --rm: the container and its VM go (podman's cleanup may finish
    // after `run` returns).
    let id = std::fs::read_to_string(&cidfile).unwrap();
    let began = Instant::now();
    while !gone(&podman.oci_root(), id.trim()) {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "{id} left behind"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn podman_runs_a_container_in_the_background_execs_in_it_and_stops_it() {
    require_kvm("podman_runs_a_container_in_the_background_execs_in_it_and_stops_it");
    let podman = podman();
    let name = format!("bg-{}", std::process::id());
    let started = run(podman.command().args([
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "echo up; trap 'exit 3' TERM; while true; do sleep 1; done",
    ]));
    assert!(started.status.success(), "{}", stderr(&started));
    let exec =
        run(podman
            .command()
            .args(["exec", &name, "sh", "-c", "echo in $(hostname); exit 4"]));
    assert_eq!(exec.status.code(), Some(4), "{}", stderr(&exec));
    assert!(stdout(&exec).starts_with("in "), "{}", stdout(&exec));
    let stopped = run(podman.command().args(["stop", "-t", "30", &name]));
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    let status = run(podman
        .command()
        .args(["inspect", "--format", "{{.State.ExitCode}}", &name]));
    assert_eq!(stdout(&status).trim(), "3", "the trap's exit code");
    let logs = run(podman.command().args(["logs", &name]));
    assert_eq!(stdout(&logs), "up\n");
    let removed = run(podman.command().args(["rm", &name]));
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert!(gone(&podman.oci_root(), stdout(&started).trim()));
}

/// Neither container `id` nor its VM is under the uvm-oci root `root`.
fn gone(root: &Path, id: &str) -> bool {
    let vms = vmm::state::Root::open(&root.join("vms")).unwrap();
    !root.join(id).exists() && vms.find(id).is_err()
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn podman_run_t_gives_the_container_a_pty() {
    require_kvm("podman_run_t_gives_the_container_a_pty");
    let out = podman().run(&["-t", IMAGE, "sh", "-c", "tty; test -t 0 && echo stdin-tty"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    // The guest's pty turns \n into \r\n: a terminal's output.
    assert!(text.ends_with("stdin-tty\r\n"), "{text:?}");
}

/// containerd started with a config and state of the test's own.
struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Containerd {
    fn start() -> Self {
        let dir = tempdir("containerd");
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd (apt-get install containerd)");
        let containerd = Self { dir, child };
        let began = Instant::now();
        while !containerd.dir.join("containerd.sock").exists() {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "containerd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        containerd
    }

    fn ctr(&self) -> Command {
        let mut ctr = Command::new("ctr");
        ctr.arg("--address").arg(self.dir.join("containerd.sock"));
        ctr
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn containerd_runs_a_container_through_the_runc_shim() {
    require_kvm("containerd_runs_a_container_through_the_runc_shim");
    let containerd = Containerd::start();
    let imported = run(containerd
        .ctr()
        .args(["image", "import", "--snapshotter", "native"])
        .arg(&image().archive));
    assert!(imported.status.success(), "{}", stderr(&imported));
    let out = run(containerd.ctr().args([
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runtime",
        "io.containerd.runc.v2",
        "--runc-binary",
        UVM_OCI,
        "--runc-root",
        &containerd.dir.join("uvm-oci").to_string_lossy(),
        IMAGE,
        "ctr-test",
        "sh",
        "-c",
        "echo hi from containerd; exit 7",
    ]));
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi from containerd\n");
}

/// `uvm-oci --root ROOT ARGS`.
fn uvm_oci(root: &Path, args: &[&str]) -> Output {
    run(Command::new(UVM_OCI).arg("--root").arg(root).args(args))
}

fn state(root: &Path, id: &str) -> serde_json::Value {
    let out = uvm_oci(root, &["state", id]);
    assert!(out.status.success(), "state: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A copy of the image's bundle whose process is `args`, with `hooks`.
fn bundle_with_hooks(name: &str, args: &[&str], hooks: serde_json::Value) -> PathBuf {
    let bundle = bundle(name, args);
    edit_config(&bundle, |spec| spec["hooks"] = hooks);
    bundle
}

/// Changes the bundle's config.json with `edit`.
fn edit_config(bundle: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    edit(&mut spec);
    std::fs::write(&config, spec.to_string()).unwrap();
}

/// A hook that writes the state it gets to `out`.
fn hook_saving_state(out: &Path) -> serde_json::Value {
    let script = format!("cat > {}", out.display());
    serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", script]}])
}

/// A copy of the image's bundle whose process is `args`.
fn bundle(name: &str, args: &[&str]) -> PathBuf {
    let dir = tempdir(name);
    let bundle = dir.join("bundle");
    sh(
        r#"rm -rf "$2"; cp -a "$1" "$2""#,
        &[&image().bundle, &bundle],
    );
    edit_config(&bundle, |spec| {
        spec["process"]["args"] = serde_json::json!(args);
        spec["process"]["terminal"] = serde_json::json!(false);
    });
    bundle
}

fn alive(pid: i64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn the_state_follows_runtime_spec_and_runc_s_refusals() {
    require_kvm("the_state_follows_runtime_spec_and_runc_s_refusals");
    // What the startContainer hook left in the container's /tmp (a tmpfs
    // of its own) reaches create's stderr, which the container keeps.
    // Its write to / lands in the bundle's root, as with runc.
    let script = "cat /tmp/started >&2; echo made > /made; \
        trap 'exit 3' TERM; while true; do sleep 1; done";
    let root = tempdir("oci-state-root");
    let files = tempdir("oci-state-files");
    let hooked = |name: &str| files.join(format!("{name}.json"));
    let in_container = r#"cat > /tmp/started; echo " $HOOK $(hostname)" >> /tmp/started"#;
    let hooks = serde_json::json!({
        "createRuntime": hook_saving_state(&hooked("createRuntime")),
        "createContainer": hook_saving_state(&hooked("createContainer")),
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", in_container],
                            "env": ["HOOK=in-the-vm"]}],
        "poststart": hook_saving_state(&hooked("poststart")),
        "poststop": hook_saving_state(&hooked("poststop")),
    });
    let bundle = bundle_with_hooks("oci-state", &["sh", "-c", script], hooks);
    edit_config(&bundle, |spec| spec["hostname"] = "oci-state".into());
    let pid_file = files.join("pid");
    let id = "state-test";
    // A file, not a pipe: the VM keeps create's stdio as its container's.
    let errors = files.join("create.err");
    let mut create = Command::new(UVM_OCI)
        .arg("--root")
        .arg(&root)
        .args(["create", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errors).unwrap())
        .spawn()
        .unwrap();
    let watchdog = support::Watchdog::default(&create);
    let mut seen_creating = false;
    while create.try_wait().unwrap().is_none() {
        let out = uvm_oci(&root, &["state", id]);
        if out.status.success() {
            let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            seen_creating |= state["status"] == "creating";
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let created = create.wait().unwrap();
    drop(watchdog);
    let create_errors = std::fs::read_to_string(&errors).unwrap();
    assert!(created.success(), "create: {create_errors}");
    assert!(seen_creating, "state said creating while create ran");
    let state_now = state(&root, id);
    assert_eq!(state_now["status"], "created");
    assert_eq!(state_now["id"], id);
    assert_eq!(state_now["bundle"], bundle.to_string_lossy().as_ref());
    let pid = state_now["pid"].as_i64().unwrap();
    assert!(alive(pid), "the VMM {pid} runs");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), pid.to_string());

    let started = uvm_oci(&root, &["start", id]);
    assert!(started.status.success(), "start: {}", stderr(&started));
    assert_eq!(state(&root, id)["status"], "running");
    // The startContainer hook ran in the container before its process,
    // with the state runc gives it and its own environment.
    let began = Instant::now();
    let hooked_state = loop {
        let text = std::fs::read_to_string(&errors).unwrap();
        if let Some(line) = text.lines().find(|l| l.ends_with(" in-the-vm oci-state")) {
            break line.to_string();
        }
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "no hook output: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (json, _) = hooked_state.split_once(" in-the-vm").unwrap();
    let made = bundle.join("rootfs/made");
    while std::fs::read_to_string(&made).unwrap_or_default() != "made\n" {
        assert!(began.elapsed() < Duration::from_secs(120), "no /made");
        std::thread::sleep(Duration::from_millis(50));
    }
    let hooked_state: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        (
            &hooked_state["id"],
            &hooked_state["status"],
            &hooked_state["pid"]
        ),
        (&id.into(), &"created".into(), &1.into())
    );
    let again = uvm_oci(&root, &["start", id]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("it is running"),
        "{}",
        stderr(&again)
    );
    let delete = uvm_oci(&root, &["delete", id]);
    assert!(!delete.status.success());
    assert!(
        stderr(&delete).contains("not stopped"),
        "{}",
        stderr(&delete)
    );
    let ps = uvm_oci(&root, &["ps", "--format", "json", id]);
    assert_eq!(stdout(&ps).trim(), format!("[{pid}]"));

    let killed = uvm_oci(&root, &["kill", id, "TERM"]);
    assert!(killed.status.success(), "kill: {}", stderr(&killed));
    let began = Instant::now();
    while state(&root, id)["status"] != "stopped" {
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "still not stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopped = state(&root, id);
    assert_eq!(stopped["pid"], 0);
    let deleted = uvm_oci(&root, &["delete", id]);
    assert!(deleted.status.success(), "delete: {}", stderr(&deleted));
    let gone = uvm_oci(&root, &["state", id]);
    assert!(!gone.status.success());
    assert!(
        stderr(&gone).contains("does not exist"),
        "{}",
        stderr(&gone)
    );
    assert_eq!(left_behind(&root), (vec![], vec![]));
    // Each host hook ran once, at its step, with the state on its stdin.
    for (hook, status) in [
        ("createRuntime", "creating"),
        ("createContainer", "creating"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ] {
        let text = std::fs::read(hooked(hook)).unwrap();
        let state: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            (&state["id"], &state["status"]),
            (&id.into(), &status.into()),
            "{hook}"
        );
    }
}

#[test]
fn features_and_version_say_what_the_runtime_is() {
    let features = run(Command::new(UVM_OCI).arg("features"));
    assert!(features.status.success(), "{}", stderr(&features));
    let features: serde_json::Value = serde_json::from_slice(&features.stdout).unwrap();
    assert_eq!(features["ociVersionMax"], "1.0.2");
    assert!(features["hooks"]
        .as_array()
        .unwrap()
        .contains(&"poststop".into()));
    let version = run(Command::new(UVM_OCI).arg("--version"));
    assert!(
        stdout(&version).contains("spec: 1.0.2"),
        "{}",
        stdout(&version)
    );
}

#[test]
fn bad_bundles_are_clear_errors_in_stderr_and_the_json_log_and_leave_nothing() {
    let dir = tempdir("oci-bad");
    let root = dir.join("root");
    /// A name, what spoils the bundle, and the reason the error gives.
    type Case<'a> = (&'a str, &'a dyn Fn(&Path), &'a str);
    let cases: [Case; 3] = [
        (
            "no-config",
            &|b| std::fs::remove_file(b.join("config.json")).unwrap(),
            "reading config.json",
        ),
        (
            "bad-json",
            &|b| std::fs::write(b.join("config.json"), "{ not json").unwrap(),
            "config.json is not valid",
        ),
        (
            "no-root",
            &|b| std::fs::remove_dir_all(b.join("rootfs")).unwrap(),
            "is not a directory",
        ),
    ];
    for (name, spoil, reason) in cases {
        let bundle = bundle(&format!("oci-bad-{name}"), &["true"]);
        spoil(&bundle);
        let log = dir.join(format!("{name}.log"));
        let out = run(Command::new(UVM_OCI)
            .arg("--root")
            .arg(&root)
            .arg("--log")
            .arg(&log)
            .args(["--log-format", "json", "create", "--bundle"])
            .arg(&bundle)
            .arg(name));
        assert!(!out.status.success(), "{name}: create succeeded");
        assert!(stderr(&out).contains(reason), "{name}: {}", stderr(&out));
        let line = std::fs::read_to_string(&log).unwrap();
        let logged: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(logged["level"], "error", "{line}");
        assert!(logged["msg"].as_str().unwrap().contains(reason), "{line}");
        assert_eq!(left_behind(&root), (vec![], vec![]), "{name}");
    }
}
