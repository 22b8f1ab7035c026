//! How `uvm run` keeps its VM visible to other commands: a state directory
//! with the VM's record and control socket, in the foreground (removed at
//! the end) or in the background, where a second uvm process, detached
//! from the terminal, becomes the VM's VMM and owns it from then on.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio as ChildStdio;
use std::time::Instant;

use anyhow::{bail, Context};
use vmm::state::control::{Handles, Server, Start};
use vmm::state::log::LogWriter;
use vmm::state::snapshot::{self, Requests};
use vmm::state::{Config, Instance, Root, StateFiles};
use vmm::sys::{self, Stdio};
use vmm::template::Prepared;
use vmm::vm::{Report, UtilityVm, VmConfig};

use crate::templates::templates;

/// Set for the background uvm: `ID,LOCK_FD,READY_FD`.
const DETACHED: &str = "UVM_DETACHED_VMM";
/// What the background uvm writes on its ready descriptor once the
/// container's process runs, or with its start held, once the VM is ready
/// to start it.
const STARTED: &[u8] = b"started\n";
const CREATED: &[u8] = b"created\n";

/// How this `uvm run` (or `uvm restore`) runs its VM.
pub struct Launch {
    root: PathBuf,
    name: Option<String>,
    /// `run -d` and `create`: how the VM runs in the background.
    detach: Option<Background>,
    /// This process is the background VMM that a `run -d` started.
    vmm: Option<(String, RawFd, RawFd)>,
    origin: Origin,
}

/// A VM in the background.
#[derive(Clone, Debug, Default)]
pub struct Background {
    /// The container's process waits for `uvm start` (`uvm create`).
    pub held: bool,
    /// The container's stdio are this command's (as OCI runtimes' callers
    /// pass them), not /dev/null and the VM's log.
    pub keep_stdio: bool,
    /// Where to write the pid of the background VMM, which lives as long
    /// as the VM and exits with the container's status.
    pub pid_file: Option<PathBuf>,
}

/// Where the VM comes from.
pub enum Origin {
    /// Restored from its template or booted (and then saved as one), or
    /// with `cold` booted only.
    Run { cold: bool },
    /// Restored from a snapshot directory (`uvm restore`).
    Snapshot(PathBuf),
}

impl Launch {
    pub fn new(
        root: Option<PathBuf>,
        name: Option<String>,
        detach: Option<Background>,
        origin: Origin,
    ) -> anyhow::Result<Self> {
        let vmm = match std::env::var(DETACHED) {
            Ok(value) => {
                std::env::remove_var(DETACHED);
                Some(parse_detached(&value).with_context(|| format!("{DETACHED}={value}"))?)
            }
            Err(_) => None,
        };
        Ok(Self {
            root: root.unwrap_or_else(Root::default_dir),
            name,
            detach,
            vmm,
            origin,
        })
    }

    /// Runs the VM of `config`; `finish` turns its report into uvm's exit
    /// status (and says what went wrong).
    pub fn run(
        self,
        config: &VmConfig,
        start: Instant,
        finish: impl FnOnce(&Report) -> anyhow::Result<i32>,
    ) -> anyhow::Result<i32> {
        let root = Root::open(&self.root)?;
        if let Some((id, lock, ready)) = &self.vmm {
            let vmm = Vmm {
                config,
                start,
                origin: &self.origin,
            };
            let background = self.detach.unwrap_or_default();
            return background_vmm(&root, id, (*lock, *ready), &vmm, &background, finish);
        }
        let summary = summary(config);
        let instance = root.create(self.name.as_deref(), summary, self.detach.is_some())?;
        if let Some(background) = &self.detach {
            return detach(instance, background);
        }
        let mut instance = instance;
        let stdio = Stdio::inherit().context("the process's stdio")?;
        let vmm = Vmm {
            config,
            start,
            origin: &self.origin,
        };
        let report = serve(&mut instance, &vmm, stdio, None, false);
        let removed = instance.remove();
        let code = finish(&report?);
        removed?;
        code
    }
}

fn parse_detached(value: &str) -> anyhow::Result<(String, RawFd, RawFd)> {
    let mut parts = value.split(',');
    let (Some(id), Some(lock), Some(ready), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("expected ID,LOCK_FD,READY_FD");
    };
    Ok((id.to_string(), lock.parse()?, ready.parse()?))
}

/// What the record says the VM runs.
fn summary(config: &VmConfig) -> Config {
    let scratch = config.scratch.as_ref().map(|(path, _)| path.clone());
    Config {
        command: config
            .process
            .as_ref()
            .map(|p| p.argv.clone())
            .unwrap_or_default(),
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        layers: config.layers.clone(),
        scratch_created: scratch.as_ref().is_some_and(|path| !path.exists()),
        scratch,
        tty: config.process.as_ref().is_some_and(|p| p.tty.is_some()),
    }
}

/// What the VMM runs, and how it starts.
struct Vmm<'a> {
    config: &'a VmConfig,
    start: Instant,
    origin: &'a Origin,
}

/// Runs the VM with its control socket served, recording when the
/// container's process runs (and then writing `started` to `ready`); a VM
/// in the background with its output in its log (`snapshots`) takes
/// snapshots when asked. With `held`, the process waits for `uvm start`
/// (and `created` goes to `ready` once the VM is ready for it).
fn serve(
    instance: &mut Instance,
    vmm: &Vmm,
    stdio: Stdio,
    ready: Option<File>,
    held: bool,
) -> anyhow::Result<Report> {
    let (mut prepared, config) = prepare(instance, vmm)?;
    if let Some(notice) = &prepared.notice {
        eprintln!("uvm: {notice}");
    }
    let snapshots = ready.is_some() && config.process.as_ref().is_none_or(|p| p.detached);
    let snapshots = snapshots.then(Requests::default);
    if held {
        prepared.vm.hold_run()?;
    }
    let mut running = prepared.vm.start(stdio)?;
    let start = held
        .then(|| running.run_gate().cloned().map(Start::new))
        .flatten();
    let server = match running.link().agent() {
        Some(agent) => {
            let handles = Handles {
                agent: agent.clone(),
                snapshots: snapshots.clone(),
                start,
            };
            Some(Server::start(
                &instance.socket(),
                handles,
                running.ending(),
            )?)
        }
        None => None,
    };
    // The main thread saves the template before it confines itself: until
    // then it only waits and writes files.
    if let Some(save) = prepared.save {
        running.resume();
        if let Err(e) = save.save(&mut running) {
            eprintln!("uvm: no template saved: {e}");
        }
    }
    running.release()?;
    let mut ready = ready;
    if held && running.wait_agent_connected().is_ok() {
        if let Some(ready) = ready.take().as_mut() {
            let _ = ready.write_all(CREATED);
        }
    }
    if running.wait_started().is_ok() {
        instance.update(|record| record.set_running())?;
        if let Some(mut ready) = ready {
            let _ = ready.write_all(STARTED);
        }
    }
    match snapshots {
        Some(snapshots) => snapshots.serve(&mut running, &config),
        None => running.wait(),
    };
    let report = running.shutdown();
    if let Some(server) = server {
        server.stop();
    }
    Ok(report)
}

/// The VM to run, and the config it was built from.
fn prepare(
    instance: &Instance,
    vmm: &Vmm,
) -> anyhow::Result<(Prepared<sys::HostHypervisor>, VmConfig)> {
    let config = match vmm.origin {
        Origin::Run { .. } => vmm::volume::attach(vmm.config, &instance.volumes())?,
        Origin::Snapshot(_) => VmConfig {
            scratch: (vmm.config.scratch.clone()).map(|(_, size)| (instance.scratch(), size)),
            ..vmm.config.clone()
        },
    };
    let open = || sys::open_hypervisor(&config);
    let prepared = match (vmm.origin, templates()) {
        (Origin::Snapshot(dir), _) => {
            Prepared::ready(snapshot::restore(open, dir, &config, vmm.start)?)
        }
        (Origin::Run { cold }, Some(templates)) => {
            templates.prepare(open, &config, vmm.start, *cold)?
        }
        (Origin::Run { .. }, None) => Prepared::ready(UtilityVm::build(open, &config, vmm.start)?),
    };
    Ok((prepared, config))
}

/// `run -d` (and `create`): starts this same command again as the VM's
/// VMM, in a session of its own, and returns once that says the
/// container's process runs, or is ready to (printing the ID), or has
/// ended (with its errors and exit status).
fn detach(instance: Instance, background: &Background) -> anyhow::Result<i32> {
    let vmm_log = File::create(instance.vmm_log())
        .with_context(|| format!("{}", instance.vmm_log().display()))?;
    let (mut ready, ready_writer) = pipe()?;
    let (lock, writer) = (instance.lock_fd(), ready_writer.as_raw_fd());
    let id = instance.record().id.clone();
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args(std::env::args_os().skip(1))
        .env(DETACHED, format!("{id},{lock},{writer}"));
    if !background.keep_stdio {
        command
            .stdin(ChildStdio::null())
            .stdout(ChildStdio::null())
            .stderr(vmm_log);
    }
    // SAFETY: between fork and exec only async-signal-safe calls run
    // (setsid, fcntl), on the child alone.
    unsafe {
        command.pre_exec(move || {
            for fd in [lock, writer] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vmm = command.spawn().context("starting the background uvm")?;
    drop(ready_writer);
    let mut said = Vec::new();
    ready.read_to_end(&mut said)?;
    if said == STARTED || said == CREATED {
        if let Some(path) = &background.pid_file {
            vmm::state::write_pid_file(path, vmm.id())
                .with_context(|| format!("pid file {}", path.display()))?;
        }
        // Kept stdio: stdout is the container's now.
        if !background.keep_stdio {
            println!("{id}");
        }
        return Ok(0);
    }
    let status = vmm.wait()?;
    let log = std::fs::read_to_string(instance.vmm_log()).unwrap_or_default();
    eprint!("{log}");
    instance.remove()?;
    Ok(vmm::process::shell_status(status))
}

/// The uvm that `run -d` started: the VM's VMM, its output in the log
/// unless it keeps its stdio.
fn background_vmm(
    root: &Root,
    id: &str,
    (lock, ready): (RawFd, RawFd),
    vmm: &Vmm,
    background: &Background,
    finish: impl FnOnce(&Report) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    // SAFETY: the parent uvm made this pipe's write end for us alone.
    let ready = File::from(unsafe { OwnedFd::from_raw_fd(ready) });
    let mut instance = root.adopt(id, lock)?;
    let stdio = match background.keep_stdio {
        true => Stdio::inherit().context("the process's stdio")?,
        false => logged_stdio(&instance)?,
    };
    let report = serve(&mut instance, vmm, stdio, Some(ready), background.held)?;
    let code = finish(&report);
    let (status, error) = match &code {
        Ok(code) => (*code, None),
        Err(e) => (1, Some(vmm::describe(e))),
    };
    instance.update(|record| record.set_exited(status, error))?;
    code
}

/// The container's stdio in the VM's log, stdin /dev/null.
fn logged_stdio(instance: &Instance) -> anyhow::Result<Stdio> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(instance.log())
        .with_context(|| format!("{}", instance.log().display()))?;
    let (stdout, stderr) = LogWriter::pair(log);
    Ok(Stdio {
        stdin: File::open("/dev/null")?.into(),
        stdout: Box::new(stdout),
        stderr: Box::new(stderr),
    })
}

fn pipe() -> anyhow::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid storage for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: pipe2 made two new descriptors that nothing else owns.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(read), write))
}
