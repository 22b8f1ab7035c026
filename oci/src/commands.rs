//! runc's commands, each on a container and its VM.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command as Process;

use anyhow::{bail, Context};
use oci_spec::runtime::{Hook, Hooks};

use crate::bundle::Bundle;
use crate::log::Log;
use crate::store::{Container, Record, Store};
use crate::uvm::Uvm;
use crate::{console, hooks, Command, CreateArgs, ExecArgs, OCI_VERSION};

/// A container's state, as runtime-spec names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Creating,
    Created,
    Running,
    Stopped,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

pub fn run(command: Command, root: &Path, log: &Log) -> anyhow::Result<i32> {
    if let Command::Features = command {
        return features();
    }
    let store = Store::open(root)?;
    let uvm = Uvm::new(store.vms())?;
    match command {
        Command::Create(args) => create(&store, &uvm, &args, log),
        Command::Start { id } => start(&store, &uvm, &id, log),
        Command::State { id } => state(&store, &uvm, &id),
        Command::Kill { id, signal, .. } => kill(&store, &uvm, &id, signal.as_deref()),
        Command::Delete { force, id } => delete(&store, &uvm, &id, force, log),
        Command::Exec(args) => exec(&store, &uvm, &args),
        Command::Ps { format, id, .. } => ps(&store, &uvm, &id, &format),
        Command::Features => unreachable!("answered above"),
    }
}

/// Where the container is, and the pid of its VMM while it has one.
fn status(container: &Container, uvm: &Uvm) -> (Status, u32) {
    status_of(container, uvm.vm(&container.record.id))
}

/// [`status`] from what uvm says of the container's VM.
fn status_of(container: &Container, vm: Option<(vmm::state::Status, u32)>) -> (Status, u32) {
    if !container.record.created {
        return (Status::Creating, vm.map_or(0, |(_, pid)| pid));
    }
    match vm {
        Some((vmm::state::Status::Created, pid)) => (Status::Created, pid),
        Some((vmm::state::Status::Running, pid)) => (Status::Running, pid),
        _ => (Status::Stopped, 0),
    }
}

/// The runtime-spec state JSON.
fn state_json(container: &Container, status: Status, pid: u32) -> String {
    let record = &container.record;
    serde_json::json!({
        "ociVersion": record.oci_version,
        "id": record.id,
        "status": status.word(),
        "pid": pid,
        "bundle": record.bundle,
        "annotations": record.annotations,
    })
    .to_string()
}

fn create(store: &Store, uvm: &Uvm, args: &CreateArgs, log: &Log) -> anyhow::Result<i32> {
    let bundle = Bundle::load(&args.bundle)?;
    if bundle.terminal() && args.console_socket.is_none() {
        bail!("the container's process has a terminal: --console-socket is needed for it");
    }
    let record = Record {
        id: args.id.clone(),
        bundle: bundle.dir.clone(),
        oci_version: bundle.spec.version().clone(),
        annotations: bundle.spec.annotations().clone().unwrap_or_default(),
        hooks: bundle.spec.hooks().clone(),
        created: false,
    };
    let mut container = store.create(record)?;
    match boot(&container, &bundle, args, uvm, log) {
        Ok(()) => {
            container.record.created = true;
            container.save()?;
            Ok(0)
        }
        Err(e) => {
            // Nothing left running or half made.
            if uvm.vm(&args.id).is_some() {
                let _ = uvm.run("rm", &["-f", &args.id]);
            }
            let _ = container.remove();
            Err(e)
        }
    }
}

/// Boots the VM on the bundle's root up to the point where `start` runs
/// the process, then runs the create-time hooks.
fn boot(
    container: &Container,
    bundle: &Bundle,
    args: &CreateArgs,
    uvm: &Uvm,
    log: &Log,
) -> anyhow::Result<()> {
    let plan = bundle.plan();
    for warning in &plan.warnings {
        log.warn(warning);
    }
    let mut command = uvm.command("create");
    // The root is shared as it is (virtio-fs): the container's writes
    // reach it, as with runc. Roots and mounts are shares, so one template
    // serves every container with as many mounts and the same resources.
    command
        .args(["--keep-stdio", "--name", &args.id, "--rootfs"])
        .arg(&bundle.root);
    if let Some(pid_file) = &args.pid_file {
        command
            .arg("--pid-file")
            .arg(std::path::absolute(pid_file)?);
    }
    if bundle.terminal() {
        let socket = args.console_socket.as_deref().expect("checked by create");
        with_terminal(&mut command, console::open(socket)?)?;
    }
    let hooks = bundle.spec.hooks().as_ref();
    let start_container = hooks_of(hooks, Hooks::start_container);
    if !start_container.is_empty() {
        // Their state is the one runc's give them: created, and the pid
        // the process has in its own namespace.
        let state = state_json(container, Status::Created, 1);
        let file = container.start_hooks();
        vmm::state::write_whole(
            &file,
            &serde_json::to_vec(&hooks::with_state(start_container, &state))?,
        )?;
        command.arg("--hooks").arg(file);
    }
    command.args(&plan.flags).arg("--").args(bundle.argv());
    let status = command.status().context("running uvm create")?;
    if !status.success() {
        bail!("the container's VM did not come up (uvm create: {status})");
    }
    let state = state_json(container, Status::Creating, 0);
    hooks::run("prestart", hooks_of(hooks, Hooks::prestart), &state)?;
    hooks::run(
        "createRuntime",
        hooks_of(hooks, Hooks::create_runtime),
        &state,
    )?;
    hooks::run(
        "createContainer",
        hooks_of(hooks, Hooks::create_container),
        &state,
    )
}

/// The hooks `pick` chooses, if there are any.
fn hooks_of(hooks: Option<&Hooks>, pick: fn(&Hooks) -> &Option<Vec<Hook>>) -> &[Hook] {
    hooks.and_then(|h| pick(h).as_deref()).unwrap_or(&[])
}

/// `command` on a terminal: `-t`, and the pty's slave as its stdio.
fn with_terminal(command: &mut Process, slave: File) -> anyhow::Result<()> {
    command
        .arg("-t")
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    Ok(())
}

fn start(store: &Store, uvm: &Uvm, id: &str, log: &Log) -> anyhow::Result<i32> {
    let container = store.get(id)?;
    match status(&container, uvm) {
        (Status::Created, _) => {}
        (other, _) => bail!("cannot start container {id}: it is {}", other.word()),
    }
    uvm.run("start", &[id])?;
    let (status, pid) = status(&container, uvm);
    let state = state_json(&container, status, pid);
    let poststart = hooks_of(container.record.hooks.as_ref(), Hooks::poststart);
    if let Err(e) = hooks::run("poststart", poststart, &state) {
        log.warn(&format!("{e:#}"));
    }
    Ok(0)
}

fn state(store: &Store, uvm: &Uvm, id: &str) -> anyhow::Result<i32> {
    let container = store.get(id)?;
    let (status, pid) = status(&container, uvm);
    println!("{}", state_json(&container, status, pid));
    Ok(0)
}

fn kill(store: &Store, uvm: &Uvm, id: &str, signal: Option<&str>) -> anyhow::Result<i32> {
    let container = store.get(id)?;
    match status(&container, uvm) {
        (Status::Created | Status::Running, _) => {}
        (other, _) => bail!("cannot kill container {id}: it is {}", other.word()),
    }
    // uvm takes names (TERM, SIGTERM) and numbers alike.
    uvm.run("kill", &["-s", signal.unwrap_or("TERM"), id])?;
    Ok(0)
}

fn delete(store: &Store, uvm: &Uvm, id: &str, force: bool, log: &Log) -> anyhow::Result<i32> {
    let container = store.get(id)?;
    let vm = uvm.vm(id);
    let has_vm = vm.is_some();
    if status_of(&container, vm).0 == Status::Running && !force {
        bail!("cannot delete container {id} that is not stopped: it is running");
    }
    if has_vm {
        uvm.run("rm", &["-f", id])?;
    }
    let state = state_json(&container, Status::Stopped, 0);
    let poststop = hooks_of(container.record.hooks.as_ref(), Hooks::poststop);
    if let Err(e) = hooks::run("poststop", poststop, &state) {
        log.warn(&format!("{e:#}"));
    }
    container.remove()?;
    Ok(0)
}

/// `uvm exec` in the container's VM. Detached, it runs on in a session of
/// its own as the exec's host process (its pid in --pid-file), which the
/// caller reaps; otherwise its status is ours.
fn exec(store: &Store, uvm: &Uvm, args: &ExecArgs) -> anyhow::Result<i32> {
    let container = store.get(&args.id)?;
    if status(&container, uvm).0 != Status::Running {
        bail!("cannot exec in container {}: it is not running", args.id);
    }
    let process = match &args.process {
        Some(path) => Some(read_process(path)?),
        None => None,
    };
    let argv = process
        .as_ref()
        .and_then(|p| p.args().clone())
        .unwrap_or_else(|| args.args.clone());
    if argv.is_empty() {
        bail!("exec needs a command: ARGS or --process with args");
    }
    let terminal = args.tty || process.as_ref().and_then(|p| p.terminal()).unwrap_or(false);
    let mut command = uvm.command("exec");
    command.arg("-i");
    let env = process.as_ref().and_then(|p| p.env().clone());
    for entry in env.iter().flatten().chain(&args.env) {
        command.args(["-e", entry]);
    }
    let cwd = args.cwd.clone().or_else(|| {
        process
            .as_ref()
            .map(|p| p.cwd().to_string_lossy().into_owned())
    });
    if let Some(cwd) = cwd {
        command.args(["-w", &cwd]);
    }
    let user = args.user.clone().or_else(|| {
        let user = process.as_ref()?.user();
        Some(format!("{}:{}", user.uid(), user.gid()))
    });
    if let Some(user) = user {
        command.args(["-u", &user]);
    }
    if terminal {
        let Some(socket) = &args.console_socket else {
            bail!("exec with a terminal needs --console-socket");
        };
        with_terminal(&mut command, console::open(socket)?)?;
    }
    command.arg(&args.id).arg("--").args(&argv);
    if args.detach {
        // SAFETY: between fork and exec only setsid runs, on the child.
        unsafe {
            command.pre_exec(|| match libc::setsid() {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            });
        }
    }
    let mut child = command.spawn().context("running uvm exec")?;
    if let Some(pid_file) = &args.pid_file {
        vmm::state::write_pid_file(pid_file, child.id())
            .with_context(|| format!("pid file {}", pid_file.display()))?;
    }
    if args.detach {
        return Ok(0);
    }
    Ok(vmm::process::shell_status(child.wait()?))
}

fn read_process(path: &Path) -> anyhow::Result<oci_spec::runtime::Process> {
    let text = std::fs::read(path).with_context(|| format!("process {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("process {}: not a runtime-spec process", path.display()))
}

fn ps(store: &Store, uvm: &Uvm, id: &str, format: &str) -> anyhow::Result<i32> {
    let container = store.get(id)?;
    let pids: Vec<u32> = match status(&container, uvm) {
        (Status::Created | Status::Running, pid) if pid > 0 => vec![pid],
        _ => Vec::new(),
    };
    match format {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        _ => {
            println!("PID");
            pids.iter().for_each(|pid| println!("{pid}"));
        }
    }
    Ok(0)
}

/// runtime-spec's features document: what this runtime does with a
/// config.json (README "uvm as an OCI runtime" says more).
fn features() -> anyhow::Result<i32> {
    let features = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop"
        ],
        "mountOptions": ["ro", "rw", "bind", "rbind"],
        "annotations": {
            "io.uvm.kernel": "the guest kernel (uvm run --kernel)",
            "io.uvm.initrd": "the guest initrd (uvm run --initrd)",
        },
        "linux": {
            "namespaces": ["pid", "mount", "uts", "ipc"],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
        },
    });
    println!("{}", serde_json::to_string_pretty(&features)?);
    Ok(0)
}
