//! Hosts without eventfds, epoll and Unix streams (Windows): no event
//! thread (the MMIO bus hands each queue notification to its device on the
//! vCPU thread) and no vsock. The run request travels on the kernel command
//! line and the process's output and exit status come back on the console,
//! as for `uvm bench`'s QEMU peer (guest/PROTOCOL.md, "Without vsock").

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::VirtioDevice;
use guest::protocol::Exited;

use crate::console::Console;
use crate::hypervisor::{self, Vm};
use crate::process::Outcome;
use crate::vm::board::DeviceEnv;
use crate::vm::layout::Slot;
use crate::vm::threads::{Ending, RunGate, ThreadKind};
use crate::vm::{Error, Exit, Share, VmConfig, DEFAULT_GUEST_CID};

/// No vsock device: the layout has none.
pub const HAS_VSOCK: bool = false;
/// The process's output arrives on the console, so it is always shown.
pub const CONSOLE_CARRIES_OUTPUT: bool = true;

#[cfg(windows)]
pub type HostHypervisor = crate::hypervisor::whp::WhpHypervisor;

/// Opens a WHP partition for `config`'s processors.
#[cfg(windows)]
pub fn open_hypervisor(config: &VmConfig) -> hypervisor::Result<HostHypervisor> {
    HostHypervisor::new(config.cpus.into())
}

/// No thread filters on these hosts (seccomp is Linux's).
pub fn confine(_kind: ThreadKind, _inherited: Option<ThreadKind>) -> std::io::Result<()> {
    Ok(())
}

pub fn confined() -> Option<ThreadKind> {
    None
}

pub fn monotonic() -> Option<Duration> {
    None
}

/// No raw host terminal: `-t` is refused on these hosts.
pub struct RawMode;

pub fn raw_terminal() -> Option<RawMode> {
    None
}

pub fn terminal_size() -> Option<guest::protocol::TtySize> {
    None
}

/// A virtio device the [`DeviceLoop`] can serve.
pub trait Served: VirtioDevice + 'static {}
impl<T: VirtioDevice + 'static> Served for T {}

/// Nothing to register: the MMIO bus passes notifications on.
pub fn register_notifiers<V: Vm>(_: &V, _: &dyn VirtioDevice, _: u64) -> Result<(), Error> {
    Ok(())
}

/// virtio-fs's server (fuse-backend-rs's passthrough) is Linux's.
pub fn attach_share<V: Vm>(
    _: &mut DeviceEnv<'_, V>,
    _: &Slot,
    _: usize,
    _: &Share,
) -> Result<(), Error> {
    Err(Error::Unsupported(
        "shared directories (virtio-fs) need a Linux host",
    ))
}

/// No loop: devices are served on the vCPU threads.
pub struct DeviceLoop;

impl DeviceLoop {
    pub fn new() -> Result<Self, Error> {
        Ok(Self)
    }

    pub fn serve<D: Served>(&mut self, _: Arc<std::sync::Mutex<D>>) {}

    pub fn start(self, _: &Arc<Ending>) -> Result<RunningLoop, Error> {
        Ok(RunningLoop)
    }
}

pub struct RunningLoop;

impl RunningLoop {
    pub fn stop(self) {}
}

/// The process's stdio is the console here.
pub struct Stdio;

impl Stdio {
    pub fn inherit() -> std::io::Result<Self> {
        Ok(Self)
    }
}

/// The run request, for the kernel command line.
pub struct AgentLink {
    request: Option<String>,
}

impl AgentLink {
    pub fn new(config: &VmConfig) -> Result<Self, Error> {
        if config.vsock.uds.is_some() || config.vsock.guest_cid != DEFAULT_GUEST_CID {
            return Err(Error::Unsupported(
                "--cid and --vsock-uds need a Linux host (vsock)",
            ));
        }
        let process = config.process.as_ref();
        let Some(process) = process else {
            return Err(Error::Unsupported(
                "a boot check (no COMMAND) needs the vsock link, which this host does not have yet",
            ));
        };
        if process.tty.is_some() {
            return Err(Error::Unsupported(
                "-t needs a Unix host (a pseudo-terminal)",
            ));
        }
        Ok(Self {
            request: Some(guest::protocol::to_cmdline(&process.request())),
        })
    }

    pub fn hold_run(&mut self) -> Result<RunGate, Error> {
        Err(Error::Unsupported(
            "holding the run request needs the vsock link",
        ))
    }

    pub fn cmdline_request(&self) -> Option<String> {
        self.request.clone()
    }

    /// There is no vsock slot on these hosts.
    pub fn attach<V: Vm>(&mut self, _: &mut DeviceEnv<'_, V>, _: &Slot) -> Result<(), Error> {
        Ok(())
    }

    pub fn start(self, _: Stdio, _: &Arc<Ending>, _: &mut Link) -> Result<(), Error> {
        Ok(())
    }
}

#[derive(Default)]
pub struct Link;

impl Link {
    pub fn new() -> Self {
        Self
    }

    pub fn stop_signals(&mut self) {}

    pub fn join(&mut self) {}

    pub fn agent_connected(&self) -> Option<Instant> {
        None
    }

    /// Without a host connection nobody hears when the process starts.
    pub fn process_started(&self) -> bool {
        false
    }

    /// The agent resets the guest after printing the exit status: a reset
    /// with that line on the console is the process's end.
    pub fn exit(&self, exit: Exit, console: &Console) -> Exit {
        let status = crate::process::exit_status_on_console(&console.tail());
        match (exit, status.map(|s| Exited::Code(s).checked())) {
            (Exit::Reset, Some(Ok(exited))) => Exit::Process(Outcome::Exited(exited)),
            (Exit::Reset, Some(Err(e))) => Exit::Session(format!("the agent printed {e}")),
            (exit, _) => exit,
        }
    }
}
