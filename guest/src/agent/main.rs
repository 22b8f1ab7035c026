//! uvm-agent: PID 1 of the utility VM. Kept lean on purpose: on PVM hosts each
//! guest system call costs about half a millisecond.

#[cfg(target_os = "linux")]
mod hooks;
#[cfg(target_os = "linux")]
mod limits;
#[cfg(target_os = "linux")]
mod mounts;
#[cfg(target_os = "linux")]
mod process;
#[cfg(target_os = "linux")]
mod restore;
#[cfg(target_os = "linux")]
mod root;
#[cfg(target_os = "linux")]
mod spawn;
#[cfg(target_os = "linux")]
mod supervisor;
#[cfg(target_os = "linux")]
mod user;

#[cfg(target_os = "linux")]
use std::ffi::CStr;
#[cfg(target_os = "linux")]
use std::io::{self, Write};

#[cfg(target_os = "linux")]
use guest::boot_mark;
#[cfg(target_os = "linux")]
use guest::protocol::{self, Ready, Run, CONTROL_PORT};
#[cfg(target_os = "linux")]
use guest::vsock;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("uvm-agent runs in a Linux guest only");
    std::process::exit(1);
}

#[cfg(target_os = "linux")]
fn main() {
    let mut args = std::env::args();
    if args.next().as_deref() == Some(hooks::ARGV0) {
        std::process::exit(hooks::main(&args.next().unwrap_or_default()));
    }
    if let Err(e) = start() {
        let _ = writeln!(io::stderr(), "uvm-agent: error: {e}");
    }
    power_off();
}

#[cfg(target_os = "linux")]
fn start() -> io::Result<()> {
    mount(c"proc", c"/proc", c"proc")?;
    mount(c"sysfs", c"/sys", c"sysfs")?;
    mount(c"devtmpfs", c"/dev", c"devtmpfs")?;
    write_boot_mark(boot_mark::AGENT_STARTED);
    writeln!(io::stdout(), "uvm-agent: ready")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    if let Some(run) = protocol::from_cmdline(&cmdline)? {
        return supervisor::run_standalone(&run);
    }
    // Before connecting: a template taken once the agent is connected has
    // the root assembled.
    let prepared = protocol::root_from_cmdline(&cmdline)?.map(root::prepare);
    let mut restored = false;
    let (control, frame) = loop {
        let mut control = vsock::connect(CONTROL_PORT)?;
        let waited = protocol::send(&mut control, 0, &Ready {})
            .and_then(|()| protocol::receive(&mut control));
        match waited {
            Ok(Some(frame)) => break (control, frame),
            // The host closes the control stream when it has nothing to run.
            Ok(None) => return Ok(()),
            // Restored from a snapshot taken while we waited: the new VM's
            // host serves the port afresh.
            Err(e) if restore::was_reset(&e) => restored = true,
            Err(e) => return Err(e),
        }
    };
    let run = frame.decode::<Run>()?;
    if restored {
        restore::refresh(&run.fresh)?;
    }
    supervisor::serve(control, run, frame.id, prepared)
}

#[cfg(target_os = "linux")]
pub(crate) fn mount(source: &CStr, target: &CStr, fstype: &CStr) -> io::Result<()> {
    mount_with(source, target, fstype, 0, None)
}

#[cfg(target_os = "linux")]
pub(crate) fn mount_with(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    options: Option<&CStr>,
) -> io::Result<()> {
    let data = options.map_or(std::ptr::null(), |o| o.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data,
        )
    };
    check(rc).map_err(|e| io::Error::new(e.kind(), format!("mount {target:?}: {e}")))
}

/// Tells the VMM's boot timer that we reached `mark`. Marks only measure:
/// without access to the port (not expected) there are none.
#[cfg(target_os = "linux")]
pub(crate) fn write_boot_mark(mark: u8) {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(boot_mark::PORT.into(), 1, 1) } < 0 {
        return;
    }
    // SAFETY: ioperm above granted access to exactly this port, which the VMM
    // emulates; the write has no effect on memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") boot_mark::PORT, in("al") mark,
            options(nomem, nostack, preserves_flags));
    }
}

/// Ends the VM. The guest has no ACPI, so a power-off would only halt: the
/// VMM ends the VM on the keyboard-controller reset that `reboot=k` issues.
#[cfg(target_os = "linux")]
fn power_off() -> ! {
    // SAFETY: plain system calls without pointers. The console is drained
    // first: its last line may be all the host gets (an exit status).
    unsafe {
        libc::tcdrain(libc::STDOUT_FILENO);
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot(2) only returns on failure; PID 1 must not exit.
    loop {
        // SAFETY: pause has no arguments and only waits for a signal.
        unsafe { libc::pause() };
    }
}

#[cfg(target_os = "linux")]
pub(crate) fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
