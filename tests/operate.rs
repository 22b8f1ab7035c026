//! Running utility VMs operated from other uvm commands: `run -d`, `ps`,
//! `exec`, `console`, `logs`, `stop`, `kill`, `wait`, `rm`, `inspect`. The
//! VMs are real guests: exec and console reach the agent over vsock and
//! their processes run in the guest. Each test keeps its state under a root
//! of its own.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{assert_fails_naming, layer, require_kvm, run, stderr, stdout, tempdir, uvm};

/// A uvm command under `root`.
fn uvm_at(root: &Path, args: &[&str]) -> Command {
    let mut cmd = uvm();
    cmd.arg("--root").arg(root).args(args);
    cmd
}

/// `uvm run -d` of `command` on the base layer, with `extra` flags.
fn detached(root: &Path, extra: &[&str], command: &str) -> Output {
    let mut cmd = uvm_at(root, &["run", "-d"]);
    cmd.arg("--layer").arg(layer("base")).args(extra);
    run(cmd.args(["--", "/bin/sh", "-c", command]))
}

/// The VMs `ps -a --format json` lists.
fn ps(root: &Path) -> Vec<serde_json::Value> {
    let out = run(&mut uvm_at(root, &["ps", "-a", "--format", "json"]));
    assert!(out.status.success(), "ps: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("ps --format json is JSON")
}

fn field<'a>(vm: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    vm.get(name)
        .unwrap_or_else(|| panic!("ps lacks {name}: {vm}"))
}

/// The main process prints what a later exec writes to its FIFO. After
/// `started` it starts no process (`read` and `echo` are shell builtins):
/// on PVM hosts processes that start at the same moment sometimes crash
/// (README.md, "PVM hosts"), so the tests start theirs one at a time.
/// (`read` fails on a writer's end of file: no empty line then.)
const MAIN: &str =
    "trap '' TERM; mkfifo /tmp/f; echo started; while :; do read x < /tmp/f && echo \"$x\"; done";

/// Runs a uvm exec or console; on PVM hosts only, a process that the guest
/// killed with SIGSEGV as it started (uvm's status 139, the PVM bug above)
/// is run once more, saying so.
fn exec(cmd: &mut Command) -> Output {
    let out = run(cmd);
    if out.status.code() == Some(139) && support::host_kind() == "PVM" {
        eprintln!("PVM: the guest process crashed as it started (SIGSEGV); once more");
        return run(cmd);
    }
    out
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_detached_vm_is_operated_like_a_container() {
    require_kvm("a_detached_vm_is_operated_like_a_container");
    let dir = tempdir("operate");
    let root = dir.join("root");
    let scratch = dir.join("scratch.img");
    let scratch_arg = scratch.to_str().unwrap();
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let volume = format!("{}:/shared", shared.display());
    let args = ["--name", "web", "--scratch", scratch_arg, "-v", &volume];
    let out = detached(&root, &args, MAIN);
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert_eq!(id.len(), 32, "run -d prints the ID: {id:?}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id:?}");

    // ps: running, with the pid of a live VMM process.
    let vms = ps(&root);
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(field(&vms[0], "name"), "web");
    assert_eq!(field(&vms[0], "status"), "running");
    let pid = field(&vms[0], "pid").as_i64().expect("a pid") as libc::pid_t;
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(
        unsafe { libc::kill(pid, 0) },
        0,
        "the VMM process {pid} lives"
    );
    let table = stdout(&run(&mut uvm_at(&root, &["ps"])));
    assert!(
        table.contains(&id[..12]) && table.contains("running"),
        "{table}"
    );
    assert!(table.contains(&pid.to_string()), "{table}");

    // logs -f: the container's first line; nothing else starts in the
    // guest until it is there.
    let mut follow = uvm_at(&root, &["logs", "-f", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = read_lines(follow.stdout.take().unwrap());
    assert_eq!(next_line(&lines), "started");

    // The name is taken: refused before anything boots.
    let out = detached(&root, &["--name", "web"], "true");
    assert_fails_naming(&out, "the name `web` is taken");

    // Its shared directory is live; and it cannot be snapshotted: what its
    // guest holds of the share lives in the VMM's FUSE server.
    let wrote = exec(&mut uvm_at(
        &root,
        &["exec", "web", "--", "sh", "-c", "echo hi > /shared/f"],
    ));
    assert!(wrote.status.success(), "{}", stderr(&wrote));
    assert_eq!(std::fs::read_to_string(shared.join("f")).unwrap(), "hi\n");
    let never = dir.join("never");
    let refused = run(uvm_at(&root, &["snapshot", "web", "-o"]).arg(&never));
    assert_fails_naming(&refused, "shares host directories");
    assert!(!never.exists());

    // exec: exit code, stdin, two at once with their own output.
    let code = exec(&mut uvm_at(
        &root,
        &["exec", "web", "--", "/bin/sh", "-c", "exit 3"],
    ));
    assert_eq!(code.status.code(), Some(3), "{}", stderr(&code));
    let mut cat = uvm_at(&root, &["exec", "-i", &id[..8], "--", "cat"]);
    let mut echoed = run_with_stdin(&mut cat, b"through cat\n");
    if echoed.status.code() == Some(139) && support::host_kind() == "PVM" {
        eprintln!("PVM: the guest process crashed as it started (SIGSEGV); once more");
        echoed = run_with_stdin(&mut cat, b"through cat\n");
    }
    assert_eq!(stdout(&echoed), "through cat\n", "{}", stderr(&echoed));
    let two: Vec<_> = ["one", "two"]
        .map(|word| {
            let mut cmd = uvm_at(&root, &["exec", "web", "--", "/bin/sh", "-c"]);
            cmd.arg(format!("echo {word}; echo {word}-err >&2"));
            std::thread::spawn(move || exec(&mut cmd))
        })
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (out, word) in two.iter().zip(["one", "two"]) {
        assert_eq!(stdout(out), format!("{word}\n"));
        assert_eq!(stderr(out), format!("{word}-err\n"));
    }

    // console: the VM's own view — the agent, the container's processes,
    // the layer read-only on pmem and the scratch disk read-write.
    let console = exec(&mut uvm_at(
        &root,
        &["console", "web", "--", "/bin/sh", "-c", "ps; mount"],
    ));
    assert!(console.status.success(), "{}", stderr(&console));
    let view = stdout(&console);
    assert!(view.contains("/init"), "the agent is PID 1:\n{view}");
    assert!(
        view.contains("mkfifo /tmp/f"),
        "the container's process:\n{view}"
    );
    assert!(
        view.lines()
            .any(|l| l.starts_with("/dev/pmem0 on /layers/0 type ext4 (ro,")),
        "{view}"
    );
    assert!(
        view.lines()
            .any(|l| l.contains(" on /scratch type ext4 (rw,")),
        "{view}"
    );

    // logs -f shows a line the container prints after it started.
    let poke = exec(&mut uvm_at(
        &root,
        &[
            "exec",
            "web",
            "--",
            "/bin/sh",
            "-c",
            "echo late-line > /tmp/f",
        ],
    ));
    assert!(poke.status.success(), "{}", stderr(&poke));
    assert_eq!(next_line(&lines), "late-line");

    // stop -t 2: SIGTERM is ignored, SIGKILL comes after the grace period.
    let began = Instant::now();
    let stop = run(&mut uvm_at(&root, &["stop", "-t", "2", "web"]));
    assert!(stop.status.success(), "{}", stderr(&stop));
    let took = began.elapsed();
    assert!(took >= Duration::from_secs(2), "stopped in {took:?}");
    assert!(took < Duration::from_secs(60), "stopped in {took:?}");
    assert!(
        support::wait_or_kill(&mut follow).success(),
        "logs -f ends with the VM"
    );

    let wait = run(&mut uvm_at(&root, &["wait", "web"]));
    assert_eq!(wait.status.code(), Some(137), "{}", stderr(&wait));
    assert_eq!(stdout(&wait), "137\n");
    let vms = ps(&root);
    assert_eq!(field(&vms[0], "status"), "exited");
    assert_eq!(field(&vms[0], "exit_code"), 137);
    let logs = stdout(&run(&mut uvm_at(&root, &["logs", "--timestamps", "web"])));
    let stamped: Vec<&str> = logs.lines().collect();
    assert_eq!(stamped.len(), 2, "{logs}");
    for (line, text) in stamped.iter().zip(["started", "late-line"]) {
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(time.starts_with("20") && time.ends_with('Z'), "{line}");
        assert_eq!(rest, text);
    }
    let inspect = run(&mut uvm_at(&root, &["inspect", "web"]));
    let inspected: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspected[0]["id"], id.as_str());
    assert_eq!(inspected[0]["config"]["scratch_created"], true);

    // exec into an ended VM; rm; then it is gone, with the scratch uvm made.
    let late = run(&mut uvm_at(&root, &["exec", "web", "--", "true"]));
    assert_fails_naming(&late, "is not running: it is exited (137)");
    let rm = run(&mut uvm_at(&root, &["rm", "web"]));
    assert!(rm.status.success(), "{}", stderr(&rm));
    assert!(ps(&root).is_empty());
    assert!(
        !scratch.exists(),
        "rm removes the scratch image uvm created"
    );
    let gone = run(&mut uvm_at(&root, &["logs", "web"]));
    assert_fails_naming(&gone, "no utility VM named or with ID `web`");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_vm_whose_vmm_died_is_dead_and_a_foreground_one_is_listed() {
    require_kvm("a_vm_whose_vmm_died_is_dead_and_a_foreground_one_is_listed");
    let root = tempdir("operate-dead").join("root");
    // A foreground run, listed while it runs, and a detached one that fails
    // to start as the foreground would, leaving nothing: both boot at once.
    let mut foreground = uvm_at(&root, &["run", "--name", "fg", "--layer"]);
    foreground
        .arg(layer("base"))
        .args(["--", "/bin/sh", "-c", MAIN]);
    let mut foreground = foreground
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fg_lines = read_lines(foreground.stdout.take().unwrap());
    let failing = {
        let mut cmd = uvm_at(&root, &["run", "-d", "--name", "bad", "--layer"]);
        cmd.arg(layer("base")).args(["--", "/no/such/program"]);
        std::thread::spawn(move || run(&mut cmd))
    };
    let out = detached(&root, &["--name", "doomed"], MAIN);
    assert!(out.status.success(), "run -d: {}", stderr(&out));

    let failed = failing.join().unwrap();
    assert_eq!(failed.status.code(), Some(127), "{}", stderr(&failed));
    assert!(
        stderr(&failed).contains("/no/such/program"),
        "{}",
        stderr(&failed)
    );

    assert_eq!(next_line(&fg_lines), "started");
    let fg = wait_until_listed(&root, "fg");
    assert_eq!(field(&fg, "status"), "running");
    let code = exec(&mut uvm_at(
        &root,
        &["exec", "fg", "--", "/bin/sh", "-c", "exit 5"],
    ));
    assert_eq!(code.status.code(), Some(5), "{}", stderr(&code));
    // Its stdio is its uvm's: a VM restored from it would lose them.
    let out = run(&mut uvm_at(&root, &["snapshot", "fg", "-o", "/tmp/never"]));
    assert_fails_naming(&out, "only a VM in the background (run -d) can be saved");

    // kill -9 of the detached VM's uvm: dead, never running, never a hang.
    let vms = ps(&root);
    let doomed = vms.iter().find(|v| v["name"] == "doomed").expect("listed");
    let pid = field(doomed, "pid").as_i64().unwrap() as libc::pid_t;
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let dead = wait_for_status(&root, "doomed", "dead");
    assert!(dead["exit_code"].is_null(), "{dead}");
    for args in [
        &["exec", "doomed", "--", "true"][..],
        &["stop", "doomed"],
        &["kill", "doomed"],
    ] {
        let out = run(&mut uvm_at(&root, args));
        assert_fails_naming(&out, "utility VM doomed is not running: it is dead");
    }
    let inspect = run(&mut uvm_at(&root, &["inspect", "doomed"]));
    let inspected: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let why = inspected[0]["error"].as_str().unwrap_or_default();
    assert!(why.contains("ended without recording"), "{inspected}");
    let wait = run(&mut uvm_at(&root, &["wait", "doomed"]));
    assert_fails_naming(&wait, "died without recording an exit code");
    let rm = run(&mut uvm_at(&root, &["rm", "doomed"]));
    assert!(rm.status.success(), "{}", stderr(&rm));

    // stop of the foreground VM ends its uvm with the container's status
    // and leaves no state behind.
    let stop = run(&mut uvm_at(&root, &["stop", "-t", "1", "fg"]));
    assert!(stop.status.success(), "{}", stderr(&stop));
    let out = foreground.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert!(fg_lines.recv().is_err(), "nothing after `started`");
    assert!(ps(&root).is_empty(), "{:?}", ps(&root));
}

/// Writes `line` into the FIFO the [`MAIN`] process of `vm` reads.
fn poke(root: &Path, vm: &str, line: &str) {
    let write = format!("echo {line} > /tmp/f");
    let out = exec(&mut uvm_at(
        root,
        &["exec", vm, "--", "/bin/sh", "-c", &write],
    ));
    assert!(out.status.success(), "exec in {vm}: {}", stderr(&out));
}

/// `logs -f` of `vm`, line by line.
fn follow(root: &Path, vm: &str) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = uvm_at(root, &["logs", "-f", vm])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = read_lines(child.stdout.take().unwrap());
    (child, lines)
}

/// What `command` prints in `vm`'s container.
fn exec_output(root: &Path, vm: &str, command: &str) -> String {
    let out = exec(&mut uvm_at(
        root,
        &["exec", vm, "--", "/bin/sh", "-c", command],
    ));
    assert!(out.status.success(), "{command} in {vm}: {}", stderr(&out));
    stdout(&out)
}

fn unix_seconds() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.unwrap().as_secs()
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_snapshot_of_a_detached_vm_restores_into_vms_that_carry_on() {
    require_kvm("a_snapshot_of_a_detached_vm_restores_into_vms_that_carry_on");
    let dir = tempdir("snapshot");
    let root = dir.join("root");
    let scratch = dir.join("scratch.img");
    let main = format!("echo kept > /kept; sync; {MAIN}");
    let out = detached(
        &root,
        &["--name", "a", "--scratch", scratch.to_str().unwrap()],
        &main,
    );
    assert!(out.status.success(), "run -d: {}", stderr(&out));
    let (mut follow_a, lines_a) = follow(&root, "a");
    assert_eq!(next_line(&lines_a), "started");
    poke(&root, "a", "before");
    assert_eq!(next_line(&lines_a), "before");

    // The snapshot: the VM saved while it runs, and running on.
    let saved = dir.join("saved");
    let out = run(uvm_at(&root, &["snapshot", "a", "-o"]).arg(&saved));
    assert!(out.status.success(), "snapshot: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), saved.to_str().unwrap());
    for file in ["memory", "state", "vm.json", "scratch"] {
        assert!(saved.join(file).is_file(), "the snapshot has its {file}");
    }
    poke(&root, "a", "after");
    assert_eq!(next_line(&lines_a), "after");
    exec_output(&root, "a", "echo a-only > /a-only; sync");
    let out = run(uvm_at(&root, &["snapshot", "a", "-o"]).arg(&saved));
    assert_fails_naming(&out, "exists already");

    // Two VMs from it: the container carries on in each, its output in
    // each one's log, its scratch disk as it was at the snapshot.
    let began = unix_seconds();
    for name in ["b", "c"] {
        let out = run(uvm_at(&root, &["restore", "--name", name]).arg(&saved));
        assert!(out.status.success(), "restore: {}", stderr(&out));
        assert_eq!(stdout(&out).trim().len(), 32, "prints the ID");
    }
    let mut random = Vec::new();
    for name in ["b", "c"] {
        assert_eq!(field(&wait_until_listed(&root, name), "status"), "running");
        let (mut follow_vm, lines) = follow(&root, name);
        poke(&root, name, &format!("in-{name}"));
        assert_eq!(next_line(&lines), format!("in-{name}"), "its first line");
        assert_eq!(exec_output(&root, name, "cat /kept"), "kept\n");
        let a_only = exec_output(&root, name, "test -e /a-only && echo yes || echo no");
        assert_eq!(a_only, "no\n", "a's writes after the snapshot are its own");
        let date: u64 = exec_output(&root, name, "date +%s").trim().parse().unwrap();
        assert!(
            (began..=unix_seconds()).contains(&date),
            "the guest's clock {date} is the host's ({began}…)"
        );
        random.push(exec_output(
            &root,
            name,
            "head -c 16 /dev/urandom | od -A n -t x1",
        ));
        let stop = run(&mut uvm_at(&root, &["stop", "-t", "1", name]));
        assert!(stop.status.success(), "{}", stderr(&stop));
        assert!(support::wait_or_kill(&mut follow_vm).success());
    }
    assert_ne!(
        random[0], random[1],
        "VMs from one snapshot share no randomness"
    );
    poke(&root, "a", "still");
    assert_eq!(next_line(&lines_a), "still");

    // A damaged copy, or one whose layer changed, is refused and leaves
    // nothing behind.
    let damaged = dir.join("damaged");
    copy_dir(&saved, &damaged);
    let mut state = std::fs::read(damaged.join("state")).unwrap();
    let last = state.len() - 2;
    state[last] ^= 1;
    std::fs::write(damaged.join("state"), state).unwrap();
    let out = run(uvm_at(&root, &["restore"]).arg(&damaged));
    assert_fails_naming(&out, "state");
    let changed = dir.join("changed");
    copy_dir(&saved, &changed);
    let other_layer = dir.join("layer.img");
    std::fs::copy(layer("base"), &other_layer).unwrap();
    let mut bytes = std::fs::read(&other_layer).unwrap();
    let end = bytes.len() - 1;
    bytes[end] ^= 1; // past the file system: its content differs, not its use
    std::fs::write(&other_layer, bytes).unwrap();
    let vm_json = changed.join("vm.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&vm_json).unwrap()).unwrap();
    config["layers"][0] = other_layer.to_str().unwrap().into();
    std::fs::write(&vm_json, config.to_string()).unwrap();
    let out = run(uvm_at(&root, &["restore"]).arg(&changed));
    assert_fails_naming(&out, "taken of a VM with other inputs");
    let names: Vec<String> = ps(&root).iter().map(|v| v["name"].to_string()).collect();
    assert_eq!(names.len(), 3, "{names:?}");

    let stop = run(&mut uvm_at(&root, &["stop", "-t", "1", "a"]));
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert!(support::wait_or_kill(&mut follow_a).success());
    let rm = run(&mut uvm_at(&root, &["rm", "a", "b", "c"]));
    assert!(rm.status.success(), "{}", stderr(&rm));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restoring_a_missing_or_garbled_snapshot_is_a_clear_error() {
    let dir = tempdir("snapshot-errors");
    let root = dir.join("root");
    let out = run(uvm_at(&root, &["restore"]).arg(dir.join("nope")));
    assert_fails_naming(&out, "nope/vm.json: No such file or directory");
    std::fs::write(dir.join("vm.json"), "{not json").unwrap();
    let out = run(uvm_at(&root, &["restore"]).arg(&dir));
    assert_fails_naming(&out, "vm.json: key must be a string");
    let out = run(&mut uvm_at(&root, &["snapshot", "nope", "-o", "x"]));
    assert_fails_naming(&out, "no utility VM named or with ID `nope`");
    assert!(ps(&root).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of the snapshot in `from`, sparse as it is.
fn copy_dir(from: &Path, to: &Path) {
    let out = run(Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(from)
        .arg(to));
    assert!(out.status.success(), "cp: {}", stderr(&out));
}

#[test]
fn unknown_ambiguous_and_badly_named_vms_are_clear_errors() {
    let root = tempdir("operate-errors").join("root");
    for id in [
        "aa11aa11aa11aa11aa11aa11aa11aa11",
        "aa22aa22aa22aa22aa22aa22aa22aa22",
    ] {
        fake_dead_vm(&root, id);
    }
    let out = run(&mut uvm_at(&root, &["inspect", "aa"]));
    assert_fails_naming(&out, "ID prefix `aa` is ambiguous");
    let out = run(&mut uvm_at(&root, &["logs", "nope"]));
    assert_fails_naming(&out, "no utility VM named or with ID `nope`");
    let out = run(&mut uvm_at(&root, &["exec", "aa1", "--", "true"]));
    assert_fails_naming(&out, "is not running: it is dead");
    let out = run(&mut uvm_at(&root, &["rm", "aa1"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let left = ps(&root);
    assert_eq!(left.len(), 1, "rm removed only its VM: {left:?}");
    assert_eq!(field(&left[0], "status"), "dead");

    let out = run(&mut uvm_at(
        &root,
        &["run", "-d", "--name", "-x", "--", "true"],
    ));
    assert!(!out.status.success());
    let out = run(&mut uvm_at(
        &root,
        &["run", "-d", "--name", "a/b", "--", "true"],
    ));
    assert_fails_naming(&out, "invalid name `a/b`");
    let out = run(uvm().args(["ps", "--root", "/dev/null/uvm"]));
    assert_fails_naming(&out, "state directory /dev/null/uvm");
    std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
}

/// A VM's state directory as a VMM that died would leave it.
fn fake_dead_vm(root: &Path, id: &str) -> PathBuf {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let record = serde_json::json!({
        "id": id, "name": null, "phase": "running", "pid": 1,
        "created": "2026-01-01T00:00:00.000Z", "started": "2026-01-01T00:00:01.000Z",
        "ended": null, "exit_code": null, "error": null, "detached": true,
        "config": {"command": ["true"], "kernel": "k", "initrd": "i", "cpus": 1,
                   "memory_mib": 128, "layers": [], "scratch": null,
                   "scratch_created": false, "tty": false}
    });
    std::fs::write(dir.join("state.json"), record.to_string()).unwrap();
    std::fs::write(dir.join("lock"), "").unwrap();
    dir
}

fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    support::wait_or_kill(&mut child);
    child.wait_with_output().unwrap()
}

/// The lines of `from`, as they come, on a channel.
fn read_lines(from: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(support::HANG_TIMEOUT)
        .expect("a line within the hang timeout")
}

fn wait_until_listed(root: &Path, name: &str) -> serde_json::Value {
    wait_for_status(root, name, "running")
}

/// Polls `ps` until `name` has `status` (bounded by the hang timeout).
fn wait_for_status(root: &Path, name: &str, status: &str) -> serde_json::Value {
    let began = Instant::now();
    loop {
        if let Some(vm) = ps(root).into_iter().find(|v| v["name"] == name) {
            if vm["status"] == status {
                return vm;
            }
        }
        assert!(
            began.elapsed() < support::HANG_TIMEOUT,
            "{name} never {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
