//! The VMM's seccomp filters (vmm/src/sys/seccomp.rs): one per thread kind.
//! Every other boot test runs under them, so each thread's real work is
//! shown to pass there; here, a forbidden call from each kind's threads
//! (the debug build's `UVM_SECCOMP_TRIGGER` hook, right after the thread
//! is confined) must kill the VMM with SIGSYS. These VMs die before the
//! guest runs, so they cost no boot.

mod support;

use std::os::unix::process::ExitStatusExt;

use support::{layer, require_kvm, run, stderr, stdout, uvm};

fn run_true(extra: &[&str], trigger: &str) -> std::process::Output {
    let mut cmd = uvm();
    cmd.args(["run", "--layer"]).arg(layer("base")).args(extra);
    cmd.args(["--", "/bin/echo", "hi"]);
    cmd.env("UVM_SECCOMP_TRIGGER", trigger);
    run(&mut cmd)
}

/// A forbidden call from a thread of `kind` must kill the VMM.
fn assert_killed(kind: &str) {
    require_kvm(&format!("seccomp of {kind} threads"));
    let out = run_true(&[], kind);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{kind}: {:?}\n{}",
        out.status,
        stderr(&out)
    );
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_forbidden_call_from_a_vcpu_thread_kills_the_vmm() {
    assert_killed("vcpu");
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_forbidden_call_from_the_device_loop_kills_the_vmm() {
    assert_killed("devices");
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_forbidden_call_from_the_agent_session_kills_the_vmm() {
    assert_killed("agent");
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_forbidden_call_from_the_control_socket_kills_the_vmm() {
    assert_killed("control");
}

#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn a_forbidden_call_from_the_main_thread_kills_the_vmm() {
    assert_killed("main");
}

// Why boot: --no-seccomp must really leave the threads unconfined (the
// hook then has no filter to trip) and the run must work as usual.
#[test]
#[cfg_attr(kvm_missing, ignore = "no usable /dev/kvm on this machine")]
fn no_seccomp_runs_unconfined() {
    require_kvm("no_seccomp_runs_unconfined");
    let out = run_true(&["--no-seccomp"], "vcpu");
    assert!(out.status.success(), "{:?}\n{}", out.status, stderr(&out));
    assert_eq!(stdout(&out), "hi\n");
}
