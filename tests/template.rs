//! Templates: `uvm run` boots cold once, saves a snapshot of the booted VM
//! with its agent idle, and later runs of the same inputs restore it. A
//! restored run must behave exactly as a cold one; VMs from one template
//! must not share randomness, identity or a stale clock; a changed input
//! or a damaged template must never be used.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use support::{layer, require_kvm, run, stderr, stdout, tempdir, uvm, uvm_templated, Watchdog};

/// `uvm run --timings [flags] -- command` with its templates in `store`,
/// `input` on stdin.
fn run_in(store: &Path, flags: &[&Path], command: &[&str], input: &[u8]) -> Output {
    spawn_run(uvm_templated(store), flags, command, input)
}

fn spawn_run(
    mut cmd: std::process::Command,
    flags: &[&Path],
    command: &[&str],
    input: &[u8],
) -> Output {
    cmd.args(["run", "--timings"]);
    for flag in flags {
        cmd.arg(flag);
    }
    let mut child = cmd
        .arg("--")
        .args(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uvm");
    let watchdog = Watchdog::default(&child);
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!watchdog.fired(), "uvm hung; stderr:\n{}", stderr(&out));
    out
}

/// How the run started, from its `--timings` line: "cold" or "template".
fn boot(out: &Output) -> String {
    let err = stderr(out);
    let line = err
        .lines()
        .find(|l| l.starts_with('{') && l.contains("\"boot\""))
        .unwrap_or_else(|| panic!("no timings line:\n{err}"));
    let timings: serde_json::Value = serde_json::from_str(line).unwrap();
    timings["boot"].as_str().unwrap().to_string()
}

/// Stderr without the timings line: what the command and uvm said.
fn said(out: &Output) -> String {
    stderr(out)
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn base() -> Vec<PathBuf> {
    vec!["--layer".into(), layer("base")]
}

fn paths(flags: &[PathBuf]) -> Vec<&Path> {
    flags.iter().map(PathBuf::as_path).collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_second_run_restores_and_behaves_exactly_as_a_cold_one() {
    require_kvm("a_second_run_restores_and_behaves_exactly_as_a_cold_one");
    let store = tempdir("template-run");
    let flags = base();
    let first = run_in(&store, &paths(&flags), &["/bin/echo", "hi"], b"");
    assert_eq!(stdout(&first), "hi\n", "{}", stderr(&first));
    assert_eq!(boot(&first), "cold");
    let second = run_in(&store, &paths(&flags), &["/bin/echo", "hi"], b"");
    assert_eq!(stdout(&second), "hi\n", "{}", stderr(&second));
    assert_eq!(boot(&second), "template");
    assert!(first.status.success() && second.status.success());

    // Stdin, stdout, stderr and the exit code, against a cold run's.
    let script = ["/bin/sh", "-c", "tr a-z A-Z; echo to-stderr >&2; exit 7"];
    let restored = run_in(&store, &paths(&flags), &script, b"some input\n");
    let mut cold = uvm();
    cold.env("UVM_STORE", &store);
    let cold = spawn_run(cold, &paths(&flags), &script, b"some input\n");
    assert_eq!(boot(&restored), "template");
    assert_eq!(boot(&cold), "cold");
    assert_eq!(stdout(&restored), "SOME INPUT\n");
    assert_eq!(stdout(&restored), stdout(&cold));
    assert_eq!(said(&restored), "to-stderr\n");
    assert_eq!(said(&restored), said(&cold));
    assert_eq!(restored.status.code(), Some(7));
    assert_eq!(restored.status.code(), cold.status.code());
    std::fs::remove_dir_all(&store).unwrap();
}

#[test]
fn five_vms_restored_at_once_are_each_their_own() {
    require_kvm("five_vms_restored_at_once_are_each_their_own");
    let store = tempdir("template-five");
    let flags = base();
    let first = run_in(&store, &paths(&flags), &["/bin/true"], b"");
    assert!(first.status.success(), "{}", stderr(&first));
    let script = "cat /proc/sys/kernel/random/boot_id; \
                  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '; date +%s";
    let before = now();
    let runs: Vec<_> = (0..5)
        .map(|_| {
            let store = store.clone();
            let flags = flags.clone();
            std::thread::spawn(move || {
                run_in(&store, &paths(&flags), &["/bin/sh", "-c", script], b"")
            })
        })
        .collect();
    let outs: Vec<Output> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let after = now();
    let mut seen = Vec::new();
    for out in &outs {
        assert!(out.status.success(), "{}", stderr(out));
        assert_eq!(boot(out), "template");
        let text = stdout(out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let guest: u64 = lines[2].parse().unwrap();
        // Whole seconds: the guest's reading lies within the host's.
        assert!(
            (before..=after).contains(&guest),
            "guest clock {guest}, host {before}..={after}"
        );
        seen.push((lines[0].to_string(), lines[1].to_string()));
    }
    for (i, a) in seen.iter().enumerate() {
        for b in &seen[i + 1..] {
            assert_ne!(a.0, b.0, "two VMs share a boot ID");
            assert_ne!(a.1, b.1, "two VMs read the same random bytes");
        }
    }
    std::fs::remove_dir_all(&store).unwrap();
}

/// A layer with /msg holding `text`, written at `path` (`uvm layer create`).
fn message_layer(dir: &Path, path: &Path, text: &str) {
    let content = dir.join("content");
    let _ = std::fs::remove_dir_all(&content);
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("msg"), text).unwrap();
    let _ = std::fs::remove_file(path);
    let out = run(uvm()
        .args(["layer", "create", "--from"])
        .arg(&content)
        .arg("-o")
        .arg(path));
    assert!(out.status.success(), "{}", stderr(&out));
}

fn template_keys(store: &Path) -> Vec<String> {
    let out = run(uvm_templated(store).args(["template", "ls"]));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn a_changed_layer_file_gets_a_template_of_its_own() {
    require_kvm("a_changed_layer_file_gets_a_template_of_its_own");
    let store = tempdir("template-changed");
    let msg = store.join("msg.img");
    message_layer(&store, &msg, "one");
    let flags = [base(), vec!["--layer".into(), msg.clone()]].concat();
    let cat = ["/bin/cat", "/msg"];
    let cold = run_in(&store, &paths(&flags), &cat, b"");
    let restored = run_in(&store, &paths(&flags), &cat, b"");
    assert_eq!((stdout(&cold), boot(&cold)), ("one".into(), "cold".into()));
    assert_eq!(
        (stdout(&restored), boot(&restored)),
        ("one".into(), "template".into())
    );
    let old = template_keys(&store);
    assert_eq!(old.len(), 1);

    // Same path, new content (and the same size: a layer image's size is
    // fixed by its content's, so only the content tells them apart).
    message_layer(&store, &msg, "two");
    let changed = run_in(&store, &paths(&flags), &cat, b"");
    assert_eq!(stdout(&changed), "two", "{}", stderr(&changed));
    assert_eq!(boot(&changed), "cold");
    assert_eq!(template_keys(&store).len(), 2);

    // The old template can never be used again: prune removes it alone.
    let pruned = run(uvm_templated(&store).args(["template", "prune"]));
    assert!(pruned.status.success(), "{}", stderr(&pruned));
    assert!(stdout(&pruned).starts_with(&old[0]), "{}", stdout(&pruned));
    let left = template_keys(&store);
    assert_eq!(left.len(), 1);
    assert_ne!(left[0], old[0]);
    let removed = run(uvm_templated(&store).args(["template", "rm", &left[0]]));
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert!(template_keys(&store).is_empty());
    std::fs::remove_dir_all(&store).unwrap();
}

/// Spoils a template in its directory.
type Damage = fn(&Path);

/// The one template directory in `store`.
fn template_dir(store: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(store.join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

#[test]
fn a_damaged_template_is_refused_and_the_run_boots_cold() {
    require_kvm("a_damaged_template_is_refused_and_the_run_boots_cold");
    let store = tempdir("template-damaged");
    let flags = base();
    let echo = ["/bin/echo", "hi"];
    let first = run_in(&store, &paths(&flags), &echo, b"");
    assert!(first.status.success(), "{}", stderr(&first));
    let damages: [(&str, Damage); 3] = [
        ("truncated", |dir| {
            let memory = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("memory"))
                .unwrap();
            memory
                .set_len(memory.metadata().unwrap().len() / 2)
                .unwrap();
        }),
        ("format version 2", |dir| {
            let state = std::fs::read_to_string(dir.join("state")).unwrap();
            let state = state.replacen("\"version\":1,", "\"version\":2,", 1);
            std::fs::write(dir.join("state"), state).unwrap();
        }),
        ("checksum", |dir| {
            let mut state = std::fs::read(dir.join("state")).unwrap();
            let at = state.len() - 100;
            state[at] ^= 0x01;
            std::fs::write(dir.join("state"), state).unwrap();
        }),
    ];
    for (reason, damage) in damages {
        damage(&template_dir(&store));
        let out = run_in(&store, &paths(&flags), &echo, b"");
        let err = stderr(&out);
        assert!(out.status.success(), "{reason}: {err}");
        assert_eq!(stdout(&out), "hi\n", "{reason}: {err}");
        assert_eq!(boot(&out), "cold", "{reason}");
        assert!(
            err.contains(reason) && err.contains("booting cold"),
            "{reason}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        // The cold run saved a good template in the damaged one's place.
        let again = run_in(&store, &paths(&flags), &echo, b"");
        assert_eq!(
            boot(&again),
            "template",
            "after {reason}: {}",
            stderr(&again)
        );
    }
    std::fs::remove_dir_all(&store).unwrap();
}

#[test]
fn scratch_data_written_in_one_run_is_there_in_a_restored_one() {
    require_kvm("scratch_data_written_in_one_run_is_there_in_a_restored_one");
    let store = tempdir("template-scratch");
    let scratch = store.join("scratch.img");
    let flags = [base(), vec!["--scratch".into(), scratch]].concat();
    let write = ["/bin/sh", "-c", "echo kept > /data && sync"];
    let first = run_in(&store, &paths(&flags), &write, b"");
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(boot(&first), "cold");
    let read = run_in(&store, &paths(&flags), &["/bin/cat", "/data"], b"");
    assert_eq!(stdout(&read), "kept\n", "{}", stderr(&read));
    assert_eq!(boot(&read), "template");
    std::fs::remove_dir_all(&store).unwrap();
}
