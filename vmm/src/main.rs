//! `uvm`: the command-line edge. Parses flags, hands a config to the library,
//! turns the outcome into an exit status.

// Spawns and reaps VMs with Linux process APIs (pidfd, wait4, PDEATHSIG).
#[cfg(target_os = "linux")]
mod bench;
// Running VMs between commands: state directories, control sockets, flock.
#[cfg(target_os = "linux")]
mod commands;
// The image store: flock, mkfs.ext4 and debugfs for layer conversion.
#[cfg(target_os = "linux")]
mod images;
// `uvm template …`: the snapshots `uvm run` starts from.
#[cfg(target_os = "linux")]
mod templates;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use guest::protocol::{Hook, Rlimit, Root, TtySize};
use vmm::describe;
use vmm::process::{ContainerMount, MountSource, Outcome, ProcessSpec};
use vmm::pvm::{self, HostKind};
use vmm::sys;
use vmm::vm::{Exit, Report, Share, VmConfig, VsockConfig, DEFAULT_GUEST_CID};

const DEFAULT_MEMORY_MIB: u64 = 128;
const MIN_MEMORY_MIB: u64 = 64;
/// Must match CONFIG_NR_CPUS in kernel-config/uvm.config.
const MAX_CPUS: u8 = 64;

#[derive(Parser)]
#[command(
    name = "uvm",
    version,
    about = "Run Linux containers in tiny utility VMs",
    // A later flag wins (`cargo xtask bench --runs 5` overrides its default).
    args_override_self = true
)]
struct Cli {
    /// Where the state of utility VMs is kept [default: /run/uvm as root,
    /// $XDG_RUNTIME_DIR/uvm otherwise].
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a utility VM and run COMMAND in it, with its stdio and exit code.
    /// Without COMMAND, boot until the guest agent is up.
    Run(Box<RunArgs>),
    /// Boot a utility VM in the background, ready to run COMMAND when `uvm
    /// start` says so (docker create); prints its ID once it is ready.
    #[cfg(target_os = "linux")]
    Create(Box<RunArgs>),
    /// Container image layers.
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Container images: import, list, inspect, remove, prune.
    #[cfg(target_os = "linux")]
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Pull an image from a registry into the store.
    #[cfg(target_os = "linux")]
    Pull {
        /// The image, e.g. `busybox`, `localhost:5000/app:1`.
        #[arg(value_name = "IMAGE")]
        reference: String,
        /// Plain HTTP to this registry (always for localhost).
        #[arg(long)]
        insecure: bool,
        /// `USER:PASSWORD` for the registry [default: $UVM_REGISTRY_CREDS].
        #[arg(
            long,
            value_name = "USER:PASSWORD",
            env = "UVM_REGISTRY_CREDS",
            hide_env_values = true
        )]
        creds: Option<String>,
    },
    /// List the images in the store (`uvm image ls`).
    #[cfg(target_os = "linux")]
    Images,
    /// Remove images (`uvm image rm`).
    #[cfg(target_os = "linux")]
    Rmi {
        #[arg(value_name = "IMAGE", required = true)]
        references: Vec<String>,
    },
    /// Boot utility VMs one after another (or several at once) and report
    /// how long each phase took, optionally side by side with QEMU microvm.
    #[cfg(target_os = "linux")]
    Bench(Box<bench::BenchArgs>),
    /// Templates `uvm run` starts from: list, remove, prune.
    #[cfg(target_os = "linux")]
    #[command(subcommand)]
    Template(templates::TemplateCommand),
    #[cfg(target_os = "linux")]
    #[command(flatten)]
    Operate(commands::Command),
    /// Start a VM in the background from a directory `uvm snapshot` wrote:
    /// its container carries on where the saved one was. Prints its ID.
    #[cfg(target_os = "linux")]
    Restore(commands::RestoreArgs),
}

#[derive(Subcommand)]
enum LayerCommand {
    /// Make an ext4 layer image (for --layer) from a directory (overlayfs
    /// whiteouts in it, 0:0 character devices, hide files of lower layers)
    /// or from an OCI layer tar (gzip, zstd or plain; its whiteouts too).
    Create {
        /// The directory or tar file whose content the layer holds.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The image file to write.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: ELF vmlinux (PVH entry, fastest) or bzImage.
    /// [default: target/guest/vmlinux next to this binary, from `cargo xtask guest`]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    #[command(flatten)]
    vm: VmArgs,

    /// Show the guest console (kernel log and agent output) on stderr.
    #[arg(long)]
    console: bool,

    /// Print boot timings as one JSON line on stderr when the VM ends.
    #[arg(long)]
    timings: bool,

    /// Run COMMAND on a pseudo-terminal (the host terminal goes raw meanwhile).
    #[arg(short = 't', long)]
    tty: bool,

    /// Run in the background: print the VM's ID once COMMAND started; its
    /// output goes to the VM's log (`uvm logs`).
    #[arg(short = 'd', long)]
    detach: bool,

    /// A name for the VM, for the commands that take an ID.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// In the background: the container's stdin, stdout and stderr are this
    /// command's own, kept by the VM, instead of /dev/null and the VM's log
    /// (as conmon and containerd's shim pass them to an OCI runtime); the
    /// ID is then not printed.
    #[arg(long)]
    keep_stdio: bool,

    /// In the background: write the pid of the VM's VMM process to FILE. It
    /// lives as long as the VM and exits with the container's status.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,

    /// `uvm create` (Linux only): the container waits for `uvm start`.
    #[arg(skip)]
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    held: bool,

    /// The VM's own tools for `uvm console` (an ext4 image, mapped like a
    /// layer, read only when a console starts).
    /// [default: target/guest/tools.img if `cargo xtask guest` made it]
    #[arg(long, value_name = "PATH", conflicts_with = "no_tools")]
    tools: Option<PathBuf>,

    /// No tools: `uvm console` cannot run anything in this VM.
    #[arg(long)]
    no_tools: bool,

    /// Boot cold: neither restore nor save a template (a snapshot of a VM
    /// booted from the same kernel, initrd, layers, memory and vCPUs,
    /// which `uvm run` otherwise starts from, saving one on a first run).
    #[arg(long, env = "UVM_COLD", value_parser = clap::builder::FalseyValueParser::new())]
    cold: bool,

    /// Run the VMM's threads without their seccomp filters (for debugging;
    /// `UVM_SECCOMP=log` keeps them but only logs forbidden calls).
    #[arg(long)]
    no_seccomp: bool,

    /// The guest's vsock context ID.
    #[arg(long, value_name = "CID", default_value_t = DEFAULT_GUEST_CID,
          value_parser = clap::value_parser!(u64).range(3..u64::from(u32::MAX)))]
    cid: u64,

    /// Hybrid vsock (Firecracker convention): host programs connect to PATH and
    /// send `CONNECT <port>\n` to reach a guest port; guest connections to
    /// host port P go to PATH_P.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,

    /// The container's root is this host directory, shared live
    /// (virtio-fs): what COMMAND writes there reaches it (podman's
    /// `--rootfs`; instead of layers).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["image", "layers", "scratch"])]
    rootfs: Option<PathBuf>,

    /// The writable layer: a raw ext4 image, created sparse and formatted if
    /// missing. Without it the writable layer is a tmpfs in the guest.
    #[arg(long, value_name = "FILE")]
    scratch: Option<PathBuf>,

    /// Size of a scratch image uvm creates (K, M, G, T suffixes).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = vmm::scratch::parse_size)]
    scratch_size: u64,

    /// Override the image's Entrypoint (and, like docker, drop its Cmd).
    #[arg(long, value_name = "CMD", requires = "image")]
    entrypoint: Option<String>,

    /// A host directory or file in the container, at GUEST: a copy taken
    /// when the VM starts (what the container writes there stays in the
    /// VM); `:ro` makes it read-only (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]", value_parser = parse_volume)]
    volumes: Vec<ContainerMount>,

    /// A mount in the container, docker's way:
    /// `type=bind,source=HOST,target=GUEST[,readonly]` (as -v),
    /// `type=tmpfs,target=GUEST` or `type=sysfs,target=GUEST[,readonly]`
    /// (repeatable; made after the -v ones, in order).
    #[arg(long = "mount", value_name = "type=…,target=…", value_parser = parse_mount)]
    mounts: Vec<ContainerMount>,

    /// A resource limit for COMMAND: `nofile=1024` or `nofile=1024:4096`
    /// (soft:hard) (repeatable).
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]", value_parser = parse_ulimit)]
    ulimits: Vec<Rlimit>,

    /// Programs to run in the container just before COMMAND (OCI
    /// startContainer hooks): a JSON list of `{"path", "args", "env",
    /// "timeout_secs", "input"}`; one that fails ends the container with
    /// status 125.
    #[arg(long, value_name = "FILE", value_parser = parse_hooks)]
    hooks: Option<Hooks>,

    /// The container's host name [default: uvm].
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,

    /// Run COMMAND as `user`, `uid`, `user:group` or `uid:gid` (names from
    /// the container's /etc/passwd and /etc/group) [default: the image's
    /// User, else root].
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,

    /// An image from the store (`uvm images`) to run: its layers, and its
    /// config for what runs. COMMAND then follows it, without `--`.
    #[arg(value_name = "IMAGE", conflicts_with = "layers")]
    image: Option<String>,

    /// With IMAGE: the command replacing its Cmd.
    #[arg(value_name = "ARG", allow_hyphen_values = true, requires = "image")]
    image_command: Vec<String>,

    /// The command to run in the guest, and its arguments.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// What `run` and `bench` share: the guest apart from its kernel, and how
/// the command runs.
#[derive(clap::Args, Clone, Debug)]
pub struct VmArgs {
    /// Initrd (newc cpio) whose /init is the uvm agent.
    /// [default: target/guest/initrd.img, from `cargo xtask guest`]
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Extra kernel command-line arguments, appended to the ones uvm sets.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,

    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = DEFAULT_MEMORY_MIB,
          value_parser = clap::value_parser!(u64).range(MIN_MEMORY_MIB..=1 << 20))]
    memory: u64,

    /// Number of vCPUs, one host thread each.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=MAX_CPUS as i64))]
    cpus: u8,

    /// Kind of KVM host; detected by default. `pvm` adds the guest flags that
    /// kvm_pvm (software-virtualized /dev/kvm) needs.
    #[arg(long, value_enum, value_name = "KIND")]
    host: Option<HostKind>,

    /// Set an environment variable for COMMAND (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL", value_parser = parse_env)]
    env: Vec<String>,

    /// Working directory of COMMAND in the guest.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,

    /// A read-only image layer (ext4 image, see `uvm layer create`), bottom
    /// first; repeat for each layer. COMMAND runs in their union.
    #[arg(long = "layer", value_name = "FILE")]
    layers: Vec<PathBuf>,

    /// Mount the layers without DAX (through the page cache).
    #[arg(long)]
    no_dax: bool,
}

impl VmArgs {
    /// The container root for `layers` layers, if there are any.
    fn root(&self, layers: usize, scratch: bool) -> Option<Root> {
        (layers > 0).then_some(Root {
            layers: layers as u32,
            dax: !self.no_dax,
            scratch,
            ..Root::default()
        })
    }
}

/// `type=bind|tmpfs|sysfs,source=HOST,target=GUEST,readonly` (docker's
/// `--mount`, with its synonyms src, destination, dst, ro).
fn parse_mount(text: &str) -> Result<ContainerMount, String> {
    let (mut kind, mut source, mut target, mut read_only) = (None, None, None, false);
    for field in text.split(',') {
        let (key, value) = field.split_once('=').unwrap_or((field, "true"));
        match (key, value) {
            ("type", value) => kind = Some(value),
            ("source" | "src", value) => source = Some(value),
            ("target" | "destination" | "dst", value) => target = Some(value),
            ("readonly" | "ro", "true" | "1") => read_only = true,
            ("readonly" | "ro", "false" | "0") => read_only = false,
            _ => return Err(format!("`{text}`: unknown field `{field}`")),
        }
    }
    let Some(target) = target.filter(|t| t.starts_with('/')) else {
        return Err(format!("`{text}`: an absolute target=GUEST is needed"));
    };
    let source = match (kind, source) {
        (Some("bind"), Some(host)) if !host.is_empty() => host_source(host)?,
        (Some("tmpfs"), None) => MountSource::Tmpfs,
        (Some("sysfs"), None) => MountSource::Sysfs,
        _ => {
            return Err(format!(
                "`{text}`: type=bind with source=HOST, or type=tmpfs or type=sysfs without one"
            ))
        }
    };
    Ok(ContainerMount {
        destination: target.to_string(),
        source,
        read_only,
    })
}

/// `--rootfs DIR` as the VM's share: an existing directory, by its full
/// path.
fn rootfs_share(dir: &Path) -> anyhow::Result<Share> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("--rootfs {}", dir.display()))?;
    if !dir.is_dir() {
        bail!("--rootfs {}: not a directory", dir.display());
    }
    Ok(Share {
        dir,
        read_only: false,
        keep_cache: true,
    })
}

/// The hooks `--hooks` names (a type of its own: clap takes a `Vec` as a
/// repeated flag).
#[derive(Clone, Debug)]
struct Hooks(Vec<Hook>);

/// A JSON file of hooks, each with an absolute path.
fn parse_hooks(path: &str) -> Result<Hooks, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let hooks: Vec<Hook> =
        serde_json::from_str(&text).map_err(|e| format!("{path}: not a list of hooks: {e}"))?;
    match hooks.iter().find(|hook| !hook.path.starts_with('/')) {
        Some(hook) => Err(format!("{path}: hook path `{}` is not absolute", hook.path)),
        None => Ok(Hooks(hooks)),
    }
}

/// `nofile=1024` or `nofile=1024:4096`; the agent checks the name.
fn parse_ulimit(text: &str) -> Result<Rlimit, String> {
    let bad = || format!("expected NAME=SOFT[:HARD], got `{text}`");
    let (name, values) = text.split_once('=').ok_or_else(bad)?;
    let (soft, hard) = values.split_once(':').unwrap_or((values, values));
    let number = |v: &str| match v {
        "unlimited" | "-1" => Ok(u64::MAX),
        v => v.parse::<u64>().map_err(|_| bad()),
    };
    Ok(Rlimit {
        resource: name.to_ascii_uppercase(),
        soft: number(soft)?,
        hard: number(hard)?,
    })
}

/// `HOST:GUEST` or `HOST:GUEST:ro`, HOST made absolute.
fn parse_volume(text: &str) -> Result<ContainerMount, String> {
    let (rest, read_only) = match text.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (text.strip_suffix(":rw").unwrap_or(text), false),
    };
    let Some((host, guest)) = rest.split_once(':') else {
        return Err(format!("expected HOST:GUEST[:ro], got `{text}`"));
    };
    if host.is_empty() || !guest.starts_with('/') {
        return Err(format!(
            "`{text}`: HOST must be given and GUEST be absolute"
        ));
    }
    Ok(ContainerMount {
        destination: guest.to_string(),
        source: host_source(host)?,
        read_only,
    })
}

/// A host path of a bind mount, made absolute.
fn host_source(host: &str) -> Result<MountSource, String> {
    let path = std::path::absolute(host).map_err(|e| format!("{host}: {e}"))?;
    Ok(MountSource::Host(path))
}

fn parse_env(entry: &str) -> Result<String, String> {
    match entry.split_once('=') {
        Some((key, _)) if !key.is_empty() => Ok(entry.to_string()),
        _ => Err(format!("expected KEY=VALUE, got `{entry}`")),
    }
}

fn main() {
    let start = Instant::now();
    let started_at = sys::monotonic();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("UVM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args, cli.root, start, started_at),
        #[cfg(target_os = "linux")]
        Command::Create(args) => run(
            RunArgs {
                detach: true,
                held: true,
                ..*args
            },
            cli.root,
            start,
            started_at,
        ),
        Command::Layer(LayerCommand::Create { from, output }) => create_layer(&from, &output),
        #[cfg(target_os = "linux")]
        Command::Image(command) => images::run(command),
        #[cfg(target_os = "linux")]
        Command::Pull {
            reference,
            insecure,
            creds,
        } => images::pull(
            &reference,
            &uvm_image::registry::Access {
                insecure,
                credentials: creds,
            },
        ),
        #[cfg(target_os = "linux")]
        Command::Images => images::run(images::ImageCommand::Ls),
        #[cfg(target_os = "linux")]
        Command::Rmi { references } => images::run(images::ImageCommand::Rm { references }),
        #[cfg(target_os = "linux")]
        Command::Bench(args) => bench::run(*args),
        #[cfg(target_os = "linux")]
        Command::Template(command) => templates::run(command),
        #[cfg(target_os = "linux")]
        Command::Operate(command) => commands::run(command, cli.root),
        #[cfg(target_os = "linux")]
        Command::Restore(args) => {
            commands::restore(args, cli.root, start, |report| exit_code(report, false))
        }
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uvm: error: {}", describe(&e));
            1
        }
    };
    std::process::exit(code)
}

/// `started_at`: `start` on the monotonic clock, for `--timings` readers.
fn run(
    args: RunArgs,
    root: Option<PathBuf>,
    start: Instant,
    started_at: Option<Duration>,
) -> anyhow::Result<i32> {
    let (config, _image) = vm_config(&args)?;
    let finish = |report: &Report| {
        if args.timings {
            eprintln!("{}", timings_json(report, started_at));
        }
        exit_code(report, args.console)
    };
    // Raw while the VM runs, restored when this goes.
    let _raw = (args.tty && config.process.is_some() && !args.detach)
        .then(sys::raw_terminal)
        .flatten();
    #[cfg(target_os = "linux")]
    {
        if !args.no_seccomp {
            use vmm::sys::seccomp;
            seccomp::enable(seccomp::Mode::from_env()).context("compiling the seccomp filters")?;
        }
        let origin = commands::Origin::Run { cold: args.cold };
        let background = args.detach.then(|| commands::Background {
            held: args.held,
            keep_stdio: args.keep_stdio,
            pid_file: args.pid_file.clone(),
        });
        let launch = commands::Launch::new(root, args.name.clone(), background, origin)?;
        launch.run(&config, start, finish)
    }
    #[cfg(not(target_os = "linux"))]
    {
        if args.detach || args.name.is_some() || root.is_some() {
            bail!("-d, --name and --root need a Linux host");
        }
        let stdio = sys::Stdio::inherit().context("the process's stdio")?;
        let open = || sys::open_hypervisor(&config);
        finish(&vmm::vm::run(open, &config, start, stdio)?)
    }
}

/// What keeps an image in the store while a VM runs it.
type Hold = Option<Box<dyn std::any::Any>>;

/// The VM `uvm run` asks for, and the hold on its image.
fn vm_config(args: &RunArgs) -> anyhow::Result<(VmConfig, Hold)> {
    let vm = &args.vm;
    let (container, hold) = container(args)?;
    if args.detach && container.argv.is_empty() {
        bail!("-d needs a COMMAND (or an IMAGE that names one)");
    }
    if !args.detach && (args.keep_stdio || args.pid_file.is_some()) {
        bail!("--keep-stdio and --pid-file are for VMs in the background (-d, create)");
    }
    if args.scratch.is_some() && container.layers.is_empty() {
        bail!("--scratch needs layers to go over (--layer or IMAGE)");
    }
    let rootfs = args.rootfs.as_deref().map(rootfs_share).transpose()?;
    let mounts = !args.volumes.is_empty() || !args.mounts.is_empty();
    let container_only = mounts || args.hostname.is_some() || args.hooks.is_some();
    if container_only && container.layers.is_empty() && rootfs.is_none() {
        bail!("-v, --mount, --hostname and --hooks are for a container: give its layers (--layer or IMAGE) or --rootfs");
    }
    let root = match rootfs {
        // The root is the first share.
        Some(_) => Some(Root {
            share: Some(0),
            ..Root::default()
        }),
        None => vm.root(container.layers.len(), args.scratch.is_some()),
    };
    let process = (!container.argv.is_empty()).then(|| ProcessSpec {
        root,
        argv: container.argv,
        env: container.env,
        cwd: container.workdir,
        user: container.user,
        tty: args.tty.then(terminal_size),
        detached: args.detach && !args.keep_stdio,
        hostname: args.hostname.clone(),
        mounts: args.volumes.iter().chain(&args.mounts).cloned().collect(),
        rlimits: args.ulimits.clone(),
        hooks: args.hooks.clone().map(|h| h.0).unwrap_or_default(),
    });
    let config = VmConfig {
        kernel: artifact(args.kernel.clone(), "vmlinux", "--kernel")?,
        initrd: artifact(vm.initrd.clone(), "initrd.img", "--initrd")?,
        extra_cmdline: vm.cmdline.clone(),
        memory_mib: vm.memory,
        cpus: vm.cpus,
        console: args.console,
        host: vm.host.unwrap_or_else(pvm::detect),
        vsock: VsockConfig {
            guest_cid: args.cid,
            uds: args.vsock_uds.clone(),
        },
        layers: container.layers,
        tools: tools(args.tools.clone(), args.no_tools)?,
        scratch: args.scratch.clone().map(|path| (path, args.scratch_size)),
        shares: rootfs.into_iter().collect(),
        process,
    };
    Ok((config, hold))
}

/// What the container runs, on which layers.
#[derive(Default)]
struct Container {
    argv: Vec<String>,
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    layers: Vec<std::path::PathBuf>,
}

/// `--layer … -- COMMAND` as given, or IMAGE with its config and flags.
fn container(args: &RunArgs) -> anyhow::Result<(Container, Hold)> {
    let vm = &args.vm;
    let Some(reference) = &args.image else {
        let given = Container {
            argv: args.command.clone(),
            env: vm.env.clone(),
            workdir: vm.workdir.clone(),
            user: args.user.clone(),
            layers: vm.layers.clone(),
        };
        return Ok((given, None));
    };
    if !args.command.is_empty() {
        bail!("with IMAGE, COMMAND follows it without `--`");
    }
    image_container(args, reference)
}

#[cfg(target_os = "linux")]
fn image_container(args: &RunArgs, reference: &str) -> anyhow::Result<(Container, Hold)> {
    use uvm_image::config::Overrides;
    let image = images::store()?.find(reference)?;
    let run = uvm_image::RunConfig::new(
        &image.config,
        &Overrides {
            command: &args.image_command,
            entrypoint: args.entrypoint.as_deref(),
            env: &args.vm.env,
            workdir: args.vm.workdir.as_deref(),
            user: args.user.as_deref(),
        },
    );
    if run.argv.is_empty() {
        bail!("image {reference} names no command (no Entrypoint or Cmd): give one after it");
    }
    let container = Container {
        argv: run.argv,
        env: run.env,
        workdir: run.workdir,
        user: run.user,
        layers: image.layers.clone(),
    };
    Ok((container, Some(Box::new(image))))
}

#[cfg(not(target_os = "linux"))]
fn image_container(_: &RunArgs, _: &str) -> anyhow::Result<(Container, Hold)> {
    bail!("images need a Linux host (the image store converts layers with e2fsprogs)")
}

/// `--tools`, else the default tools image if it was built.
fn tools(given: Option<PathBuf>, none: bool) -> anyhow::Result<Option<PathBuf>> {
    if none {
        return Ok(None);
    }
    if given.is_some() {
        return Ok(given);
    }
    let path = default_guest_dir()?.join("tools.img");
    Ok(path.exists().then_some(path))
}

/// Makes the layer under names of this process's own beside `output` and
/// renames it into place: a killed or failed create leaves no half image
/// at `output`, and never stands in the way of the next one.
#[cfg(target_os = "linux")]
fn create_layer(from: &Path, output: &Path) -> anyhow::Result<i32> {
    use uvm_image::convert;
    let own = |what: &str| {
        let mut name = output.as_os_str().to_owned();
        name.push(format!(".{what}-{}", std::process::id()));
        PathBuf::from(name)
    };
    let partial = own("uvm-partial");
    let size = match from.is_dir() {
        true => convert::from_dir(from, &partial),
        false => convert::from_tar_file(from, &own("uvm-staging"), &partial),
    }
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    if let Err(e) = std::fs::rename(&partial, output) {
        let _ = std::fs::remove_file(&partial);
        bail!("{}: putting the layer in place: {e}", output.display());
    }
    eprintln!("uvm: {} ({} MiB)", output.display(), size >> 20);
    Ok(0)
}

#[cfg(not(target_os = "linux"))]
fn create_layer(_: &Path, _: &Path) -> anyhow::Result<i32> {
    bail!("uvm layer create needs a Linux host (e2fsprogs)")
}

/// The host terminal's size, for a guest pseudo-terminal.
fn terminal_size() -> TtySize {
    sys::terminal_size().unwrap_or(DEFAULT_TTY)
}

const DEFAULT_TTY: TtySize = TtySize { rows: 24, cols: 80 };

/// A path given on the command line, or the `cargo xtask guest` artifact.
fn artifact(given: Option<PathBuf>, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let path = default_guest_dir()?.join(name);
    if !path.exists() {
        bail!(
            "no {flag} given and the default {} does not exist: run `cargo xtask guest` or pass {flag}",
            path.display()
        );
    }
    Ok(path)
}

/// `target/guest`, next to `target/<profile>/uvm` or
/// `target/<triple>/<profile>/uvm`.
fn default_guest_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the uvm binary")?;
    let profile = exe.parent().context("uvm binary has no directory")?;
    let mut targets = profile.ancestors().skip(1).take(2);
    let first = targets.next().context("uvm binary has no target dir")?;
    let candidates: Vec<&Path> = std::iter::once(first).chain(targets).collect();
    let built = candidates
        .iter()
        .find(|dir| dir.join("guest/initrd.img").is_file());
    let named_target = candidates
        .iter()
        .find(|dir| dir.file_name().is_some_and(|n| n == "target"));
    Ok(built.or(named_target).unwrap_or(&first).join("guest"))
}

/// uvm's exit status: the process's, like a shell's, or 0 for a boot check.
fn exit_code(report: &Report, console_shown: bool) -> anyhow::Result<i32> {
    let tail = || match console_shown {
        true => String::new(),
        false => format!("\nlast console output:\n{}", report.console.tail()),
    };
    let timings = &report.timings;
    match &report.exit {
        Exit::Process(Outcome::Exited(exited)) => Ok(exited.shell_status()),
        Exit::Process(Outcome::Failed(failed)) => {
            eprintln!("uvm: error: cannot run the command: {}", failed.message);
            Ok(failed.exit_code)
        }
        Exit::Booted => Ok(0),
        Exit::Interrupted { signal } => Ok(128 + signal),
        Exit::Reset if timings.agent_connected.is_some() => bail!(
            "the guest reset while the process ran (did the agent crash?){}",
            tail()
        ),
        Exit::Reset if timings.agent_started.is_some() => bail!(
            "the guest reset before {}{}",
            match sys::HAS_VSOCK {
                true => "the agent connected over vsock",
                false => "the agent reported an exit status on the console",
            },
            tail()
        ),
        Exit::Reset => bail!(
            "the guest reset before the agent started (kernel panic or missing /init?){}",
            tail()
        ),
        Exit::Fault { cpu, reason, rip } => {
            let rip = rip.map_or("unknown".into(), |r| format!("{r:#x}"));
            bail!("vCPU {cpu} stopped: {reason} at guest RIP {rip}{}", tail())
        }
        Exit::Session(why) => bail!("{why}{}", tail()),
        Exit::Vmm(why) => bail!("{why}"),
        Exit::Stopped => bail!("the VM was shut down before the guest ended"),
    }
}

fn timings_json(report: &Report, started_at: Option<Duration>) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let t = &report.timings;
    let setup = t.first_vcpu_entry.map(ms);
    let kernel = t
        .agent_started
        .zip(t.first_vcpu_entry)
        .map(|(a, e)| ms(a.saturating_sub(e)));
    serde_json::json!({
        "boot": if t.restored { "template" } else { "cold" },
        "template_save_ms": t.snapshot_saved.map(ms),
        "vmm_setup_ms": setup,
        "kernel_ms": kernel,
        "agent_started_ms": t.agent_started.map(ms),
        "agent_connected_ms": t.agent_connected.map(ms),
        "process_started_ms": t.process_started.map(ms),
        "process_exited_ms": t.process_exited.map(ms),
        "total_ms": ms(t.ended),
        "started_at_monotonic_ms": started_at.map(ms),
        "vmm_rss_kib": report.vmm_rss_kib,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use guest::protocol::Exited;
    use vmm::console::Console;
    use vmm::vm::Timings;

    use super::*;

    fn report(exit: Exit) -> Report {
        Report {
            exit,
            timings: Timings::default(),
            console: Console::new(false),
            vmm_rss_kib: None,
        }
    }

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["uvm", "run"].iter().chain(argv)).unwrap();
        match cli.command {
            Command::Run(args) => *args,
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn flags_after_an_image_belong_to_its_command() {
        let args = run_args(&["-e", "A=1", "img:1", "sh", "-c", "echo hi", "-e", "x"]);
        assert_eq!(args.image.as_deref(), Some("img:1"));
        assert_eq!(args.image_command, ["sh", "-c", "echo hi", "-e", "x"]);
        assert_eq!(args.vm.env, ["A=1"]);
        let layers = run_args(&["--layer", "l.img", "--", "sh", "-c", "x"]);
        assert_eq!(
            (layers.image, layers.command),
            (None, vec!["sh".into(), "-c".into(), "x".into()])
        );
        assert!(Cli::try_parse_from(["uvm", "run", "--layer", "l", "img"]).is_err());
    }

    #[test]
    fn hooks_are_a_json_list_with_absolute_paths() {
        let dir = std::env::temp_dir().join(format!("uvm-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let good = file("good", r#"[{"path": "/bin/h", "timeout_secs": 5}]"#);
        let Hooks(hooks) = parse_hooks(&good).unwrap();
        assert_eq!(
            (hooks[0].path.as_str(), hooks[0].timeout_secs),
            ("/bin/h", 5)
        );
        let relative = parse_hooks(&file("relative", r#"[{"path": "h", "timeout_secs": 5}]"#));
        assert!(relative.unwrap_err().contains("not absolute"));
        let invalid = parse_hooks(&file("invalid", "{")).unwrap_err();
        assert!(invalid.contains("not a list of hooks"), "{invalid}");
        assert!(parse_hooks("/nonexistent/hooks").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ulimits_are_soft_and_hard() {
        let limit = parse_ulimit("nofile=10:20").unwrap();
        assert_eq!(
            (limit.resource.as_str(), limit.soft, limit.hard),
            ("NOFILE", 10, 20)
        );
        let limit = parse_ulimit("core=unlimited").unwrap();
        assert_eq!((limit.soft, limit.hard), (u64::MAX, u64::MAX));
        assert!(parse_ulimit("nofile").is_err());
        assert!(parse_ulimit("nofile=x").is_err());
    }

    #[test]
    fn volumes_and_mounts_parse_docker_s_way() {
        let host = |path: &str| MountSource::Host(std::path::absolute(path).unwrap());
        let volume = parse_volume("data:/data:ro").unwrap();
        assert_eq!(
            (volume.source, volume.destination),
            (host("data"), "/data".into())
        );
        assert!(volume.read_only);
        assert!(!parse_volume("/a:/b").unwrap().read_only);
        for bad in ["/a", ":/b", "/a:b"] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
        let bind = parse_mount("type=bind,src=/a,dst=/b,readonly").unwrap();
        assert_eq!((bind.source, bind.read_only), (host("/a"), true));
        let tmpfs = parse_mount("type=tmpfs,target=/dev/shm").unwrap();
        assert_eq!((tmpfs.source, tmpfs.read_only), (MountSource::Tmpfs, false));
        let sysfs = parse_mount("type=sysfs,destination=/sys,ro=true").unwrap();
        assert_eq!((sysfs.source, sysfs.read_only), (MountSource::Sysfs, true));
        for bad in [
            "type=bind,target=/b",
            "type=tmpfs,src=/a,target=/b",
            "type=nfs,target=/b",
            "type=tmpfs,target=b",
            "type=tmpfs,target=/b,size=1",
        ] {
            assert!(parse_mount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_process_outcome_or_a_boot_check_is_an_exit_status() {
        let code = |exit| exit_code(&report(exit), true).ok();
        assert_eq!(
            code(Exit::Process(Outcome::Exited(Exited::Code(7)))),
            Some(7)
        );
        assert_eq!(
            code(Exit::Process(Outcome::Exited(Exited::Signal(9)))),
            Some(137)
        );
        assert_eq!(code(Exit::Booted), Some(0));
        assert_eq!(code(Exit::Interrupted { signal: 2 }), Some(130));
        let session = "the agent session ended without an exit status: the agent closed \
                       the control stream";
        for (exit, named) in [
            (Exit::Session(session.into()), session),
            (
                Exit::Vmm("the device event loop failed: x".into()),
                "event loop",
            ),
            (Exit::Stopped, "shut down"),
            (Exit::Reset, "reset"),
        ] {
            let err = exit_code(&report(exit), true).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
    }
}
