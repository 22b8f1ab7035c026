//! `uvm exec` and `uvm console`: a process in a running VM, its stdio
//! streamed straight from the VM's vsock device to this command, its
//! signals and terminal size passed on, its exit code as ours.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use anyhow::{bail, Context};
use vmm::agent::{copy_output, forward_stdin, ExecSpec};
use vmm::signals;
use vmm::state::control::{Reply, Request};
use vmm::state::{Entry, Root};
use vmm::sys;
use vmm::vm::threads::Ending;

use super::{connect, display_name, running};

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Pass stdin to the process (without it, the process reads nothing).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run it on a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable (repeatable), on top of the container's.
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL", value_parser = crate::parse_env)]
    env: Vec<String>,
    /// Working directory [default: the container's].
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// Run it as `user`, `uid`, `user:group` or `uid:gid` [default: root].
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    #[arg(value_name = "ID|NAME")]
    vm: String,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
pub struct ConsoleArgs {
    #[arg(value_name = "ID|NAME")]
    vm: String,
    /// What to run [default: /bin/sh].
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

pub fn exec(root: &Root, args: ExecArgs) -> anyhow::Result<i32> {
    let entry = running(root, &args.vm)?;
    let request = ExecSpec {
        argv: args.command,
        env: args.env,
        cwd: args.workdir,
        tty: args.tty.then(crate::terminal_size),
        user: args.user,
        in_vm: false,
    };
    session(&entry, request, args.interactive)
}

pub fn console(root: &Root, args: ConsoleArgs) -> anyhow::Result<i32> {
    let entry = running(root, &args.vm)?;
    let argv = match args.command.is_empty() {
        true => vec!["/bin/sh".to_string()],
        false => args.command,
    };
    // SAFETY: isatty only inspects the descriptor.
    let terminal = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    let request = ExecSpec {
        argv,
        env: Vec::new(),
        cwd: None,
        tty: terminal.then(crate::terminal_size),
        user: None,
        in_vm: true,
    };
    session(&entry, request, true)
}

/// Starts `request` in the VM and carries its stdio until it ends.
fn session(entry: &Entry, request: ExecSpec, interactive: bool) -> anyhow::Result<i32> {
    let tty = request.tty.is_some();
    // Blocked before any thread starts, so that the forwarder alone takes them.
    let blocked = signals::block().context("blocking signals")?;
    let mut channel = connect(entry, &Request::Exec(request), &[])?;
    let vm = display_name(entry);
    match channel.recv::<Reply>()? {
        Some(Reply::Started { .. }) => {}
        Some(Reply::Failed { message, exit_code }) => {
            eprintln!("uvm: error: cannot run the command: {message}");
            return Ok(exit_code);
        }
        Some(Reply::Error(e)) => bail!("utility VM {vm}: {e}"),
        Some(other) => bail!("utility VM {vm}: unexpected reply {other:?}"),
        None => bail!("utility VM {vm}: its VMM closed the connection"),
    }
    let mut streams = channel
        .take_fds(if tty { 2 } else { 3 })?
        .into_iter()
        .map(UnixStream::from);
    let (to_guest, stdout) = (streams.next().expect("2"), streams.next().expect("2"));
    let stderr = streams.next();
    let _raw = tty.then(sys::raw_terminal).flatten();
    let requests = channel.try_clone()?;
    let forward = move |signal| {
        let request = match signal {
            libc::SIGWINCH => Request::Resize(crate::terminal_size()),
            signal => Request::Signal(signal),
        };
        let _ = requests.send(&request, &[]);
    };
    let forwarder = blocked.forward(forward, &Arc::new(Ending::default()))?;
    let reply = std::thread::scope(|s| {
        s.spawn(|| copy_output(stdout, io::stdout()));
        if let Some(stderr) = stderr {
            s.spawn(|| copy_output(stderr, io::stderr()));
        }
        match interactive.then(|| io::stdin().as_fd().try_clone_to_owned()) {
            Some(Ok(stdin)) => drop(s.spawn(|| forward_stdin(stdin, to_guest))),
            _ => drop(to_guest.shutdown(std::net::Shutdown::Write)),
        }
        channel.recv::<Reply>()
    });
    forwarder.stop();
    match reply? {
        Some(Reply::Exited(exited)) => Ok(exited.shell_status()),
        Some(Reply::Error(e)) => bail!("utility VM {vm}: {e}"),
        Some(other) => bail!("utility VM {vm}: unexpected reply {other:?}"),
        None => bail!("utility VM {vm}: its VMM closed the connection before the process ended"),
    }
}
