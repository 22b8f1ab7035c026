//! `uvm run -- CMD`: a process in the guest with its stdio and exit status,
//! carried over virtio-vsock by the agent. Each test boots a real guest
//! because the path under test is guest kernel → vsock device → host; each
//! says what else it must prove with that boot.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{layer, require_kvm, run, stderr, stdout, uvm, Watchdog};

/// `uvm run` of `command` in a container on the demo base layer (busybox).
fn uvm_run(args: &[&str], command: &[&str]) -> Command {
    let mut cmd = uvm();
    cmd.args(["run", "--layer"]).arg(layer("base"));
    cmd.args(args).arg("--").args(command);
    cmd
}

/// Starts `cmd` with stdout and stderr piped to the test.
fn spawn_piped(cmd: &mut Command, stdin: Stdio) -> Child {
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uvm")
}

/// The rest of what the process wrote to stderr.
fn read_stderr(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut err).expect("read uvm stderr");
    }
    err
}

// Why boot: stdout and stderr are separate vsock streams; only a real guest
// shows they stay apart and in order, arrive as written, and that the exit
// code comes back.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn streams_stdout_and_stderr_separately_as_written() {
    require_kvm("streams_stdout_and_stderr_separately_as_written");
    let script = "echo out1; echo err1 >&2; sleep 3; echo out2; echo err2 >&2; exit 7";
    let mut child = spawn_piped(&mut uvm_run(&[], &["/bin/sh", "-c", script]), Stdio::null());
    let _watchdog = Watchdog::default(&child);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let first_at = Instant::now();
    let second = lines.next().unwrap().unwrap();
    let gap = first_at.elapsed();
    assert_eq!((first.as_str(), second.as_str()), ("out1", "out2"));
    assert!(lines.next().is_none(), "more stdout than written");
    let err = read_stderr(&mut child);
    let status = child.wait().unwrap();
    assert!(err.contains("err1\nerr2\n"), "stderr:\n{err}");
    assert!(!err.contains("out"), "stdout leaked into stderr:\n{err}");
    assert!(
        gap >= Duration::from_secs(2),
        "first line came only {gap:?} before the second: not streamed"
    );
    assert_eq!(status.code(), Some(7));
}

// Why boot: the exit status of a process killed by a signal (a child of the
// container's PID 1, which a signal from its own namespace cannot kill).
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn killed_process_exits_128_plus_signal() {
    require_kvm("killed_process_exits_128_plus_signal");
    let out = run(&mut uvm_run(
        &[],
        &["/bin/sh", "-c", "/bin/sh -c 'kill -9 $$'; exit $?"],
    ));
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
}

// Why boot: environment and working directory are applied by the agent.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn env_and_workdir_take_effect() {
    require_kvm("env_and_workdir_take_effect");
    let mut cmd = uvm_run(
        &["-e", "GREETING=hello world", "-w", "/tmp"],
        &["/bin/sh", "-c", "echo \"$GREETING\"; pwd"],
    );
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello world\n/tmp\n");
}

// Why boot: the agent reports a command it cannot start.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn missing_command_exits_127_naming_it() {
    require_kvm("missing_command_exits_127_naming_it");
    let out = run(&mut uvm_run(&[], &["/no/such/command"]));
    assert_eq!(out.status.code(), Some(127));
    let err = stderr(&out);
    assert!(err.contains("/no/such/command"), "{err}");
    assert!(err.contains("No such file"), "{err}");
}

// Why boot: stdin EOF and flow control in both directions under load.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn stdin_round_trips_64_mib_through_cat() {
    require_kvm("stdin_round_trips_64_mib_through_cat");
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut child = spawn_piped(&mut uvm_run(&[], &["/bin/cat"]), Stdio::piped());
    // A PVM guest moves data at well under 1 MiB/s: allow for that.
    let _watchdog = Watchdog::new(&child, 4 * support::HANG_TIMEOUT);
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn({
        let data = data.clone();
        move || stdin.write_all(&data)
    });
    let start = Instant::now();
    let mut echoed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut echoed)
        .unwrap();
    let elapsed = start.elapsed();
    let fed = feeder.join().unwrap();
    let status = child.wait().unwrap();
    let err = read_stderr(&mut child);
    assert!(status.success(), "uvm ended with {status}; stderr:\n{err}");
    fed.unwrap_or_else(|e| panic!("feeding stdin: {e}; stderr:\n{err}"));
    assert_eq!(echoed.len(), data.len(), "stderr:\n{err}");
    assert!(echoed == data, "data changed on the way");
    eprintln!(
        "64 MiB in and out through the guest in {elapsed:?} ({:.1} MiB/s each way)",
        64.0 / elapsed.as_secs_f64()
    );
}

/// Starts `script` (which prints `ready` first), sends uvm SIGTERM once it
/// runs, and returns uvm's exit status and how long it took to end.
fn terminate_after_ready(script: &str) -> (Option<i32>, Duration) {
    let mut cmd = uvm_run(&[], &["/bin/sh", "-c", script]);
    let mut child = spawn_piped(&mut cmd, Stdio::null());
    let _watchdog = Watchdog::default(&child);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    let sent = Instant::now();
    // SAFETY: plain kill of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = support::wait_or_kill(&mut child);
    (status.code(), sent.elapsed())
}

// Why boot: SIGTERM to uvm must reach the process in the guest (PID 1 of its
// namespace, so it needs a handler, as under docker), and uvm must still end
// the VM.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn sigterm_is_forwarded_to_the_process() {
    require_kvm("sigterm_is_forwarded_to_the_process");
    let script = "trap 'exit 143' TERM; echo ready; sleep 600 & wait";
    let (code, _) = terminate_after_ready(script);
    assert_eq!(code, Some(128 + libc::SIGTERM));
}

// Why boot: a process that ignores the forwarded signal is killed after the
// grace period, like `docker stop` does.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_process_ignoring_sigterm_is_killed_after_the_grace_period() {
    require_kvm("a_process_ignoring_sigterm_is_killed_after_the_grace_period");
    let (code, took) = terminate_after_ready("echo ready; exec sleep 600");
    assert_eq!(code, Some(128 + libc::SIGKILL));
    assert!(
        took >= Duration::from_secs(9),
        "killed before the grace period: {took:?}"
    );
}

// Why boot: hybrid vsock in both directions needs a guest kernel on the other
// end. The same boot shows that a guest opening more connections than the
// device allows gets refusals, not a stuck or unbounded VMM.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn hybrid_vsock_both_ways_and_connection_limit() {
    require_kvm("hybrid_vsock_both_ways_and_connection_limit");
    let dir = std::env::temp_dir().join(format!("uvm-hybrid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("vsock.sock");
    // Guest → host: the guest's connections to host port 6000.
    let host_port = UnixListener::bind(dir.join("vsock.sock_6000")).unwrap();
    let accepted = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in host_port.incoming() {
            match stream {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
            if held.len() == 300 {
                break;
            }
        }
        held.len()
    });
    let script = "uvm-vsock-test flood 6000 300 && uvm-vsock-test echo 5000";
    let test_layer = layer("test"); // the vsock peer, on top of base
    let mut cmd = uvm_run(
        &[
            "--layer",
            test_layer.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
        ],
        &["/bin/sh", "-c", script],
    );
    let mut child = spawn_piped(&mut cmd, Stdio::null());
    let _watchdog = Watchdog::default(&child);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut flood = String::new();
    out.read_line(&mut flood).unwrap();
    let counts: Vec<usize> = flood
        .trim()
        .split(' ')
        .filter_map(|kv| kv.split_once('=')?.1.parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "flood said: {flood:?}");
    assert_eq!(counts[0] + counts[1], 300);
    assert!(counts[1] > 0, "no connection was refused: {flood}");
    assert!(counts[0] >= 200, "too few connections: {flood}");

    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    assert_eq!(ready, "listening\n");
    // Host → guest: through the hybrid socket to the guest's port 5000.
    let mut conn = UnixStream::connect(&uds).unwrap();
    conn.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "handshake answer: {ok:?}");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let writer = std::thread::spawn({
        let (mut conn, payload) = (conn.try_clone().unwrap(), payload.clone());
        move || conn.write_all(&payload)
    });
    let mut echoed = vec![0u8; payload.len()];
    reader.read_exact(&mut echoed).unwrap();
    writer.join().unwrap().unwrap();
    assert!(echoed == payload, "echo differs");
    conn.shutdown(std::net::Shutdown::Write).unwrap();

    let status = support::wait_or_kill(&mut child);
    let err = read_stderr(&mut child);
    assert!(status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    drop(accepted);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!uds.exists(), "uvm left its socket behind");
}

// No boot: bad flags are refused before any VM exists.
#[test]
fn bad_run_flags_are_refused_naming_them() {
    let bad_socket = run(&mut uvm_run(
        &["--vsock-uds", "/nonexistent-dir/v.sock"],
        &["/bin/true"],
    ));
    support::assert_fails_naming(&bad_socket, "hybrid vsock socket /nonexistent-dir/v.sock");
    let bad_env = run(&mut uvm_run(&["-e", "NOVALUE"], &["/bin/true"]));
    support::assert_fails_naming(&bad_env, "KEY=VALUE");
    let host_cid = run(&mut uvm_run(&["--cid", "2"], &["/bin/true"]));
    support::assert_fails_naming(&host_cid, "--cid");
}

// Why boot: -t gives the process a guest pseudo-terminal of the host
// terminal's size, and uvm puts the host terminal back as it found it.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn tty_runs_on_a_guest_terminal_and_restores_the_host_one() {
    require_kvm("tty_runs_on_a_guest_terminal_and_restores_the_host_one");
    let (master, slave) = open_pty(33, 101);
    let before = termios(&slave);
    let mut child = uvm_run(&["-t"], &["/bin/sh", "-c", "tty; stty size"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = support::wait_or_kill(&mut child);
    assert!(status.success(), "uvm -t failed");
    let after = termios(&slave);
    drop(slave);
    let mut out = Vec::new();
    let _ = (&master).read_to_end(&mut out); // ends with EIO once all slaves close
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("/dev/pts/0"), "not on a guest pty: {out:?}");
    assert!(
        out.contains("33 101"),
        "terminal size not passed on: {out:?}"
    );
    assert!(before == after, "host terminal settings not restored");
}

/// A host pseudo-terminal pair of the given size.
fn open_pty(rows: u16, cols: u16) -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid out-pointers; name and termios may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: two new descriptors that nothing else owns.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

fn termios(tty: &std::fs::File) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data that tcgetattr fills.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) }, 0);
    // SAFETY: viewing a plain-data struct as bytes, for comparison.
    unsafe {
        std::slice::from_raw_parts(
            (&t as *const libc::termios).cast::<u8>(),
            std::mem::size_of_val(&t),
        )
        .to_vec()
    }
}
