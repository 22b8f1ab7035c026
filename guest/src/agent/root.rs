//! The container's root file system: the read-only layers (pmem) stacked
//! under a writable layer with overlayfs, entered by the process in a mount
//! namespace of its own, the way a container runtime does.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use guest::disk_serial;
use guest::protocol::{Hook, Root};

use crate::mounts::{self, Planned};
use crate::{check, mount_with};

/// Where the union is mounted in the agent's namespace.
pub const ROOT: &str = "/rootfs";
const ROOT_C: &CStr = c"/rootfs";
/// The writable layer: upper and work directories of the overlay.
const SCRATCH: &CStr = c"/scratch";

/// What the agent assembled of the VM's container root at boot, before it
/// connected: all of it, or the layers alone when the writable layer is
/// the scratch disk (whose content is the run's own).
pub enum Prepared {
    Whole(Root),
    Layers(Root),
    Failed(String),
}

/// Assembles as much of `root` as every run of this VM shares. A shared
/// root waits for the run: mounting it starts its FUSE session, which a
/// template taken before the run must not hold.
pub fn prepare(root: Root) -> Prepared {
    let prepared = match root.scratch || root.share.is_some() {
        true => mount_layers(root).map(|()| Prepared::Layers(root)),
        false => assemble(root).map(|()| Prepared::Whole(root)),
    };
    prepared.unwrap_or_else(|e| Prepared::Failed(e.to_string()))
}

/// Assembles `root` for a run, with what was `prepared` at boot.
pub fn assemble_prepared(root: Root, prepared: Option<&Prepared>) -> io::Result<()> {
    match prepared {
        None => assemble(root),
        Some(Prepared::Whole(done)) if *done == root => Ok(()),
        Some(Prepared::Layers(done)) if *done == root => stack(root),
        Some(Prepared::Failed(e)) => Err(io::Error::other(e.clone())),
        Some(_) => Err(io::Error::other(
            "the run asks for another root than the VM was booted for",
        )),
    }
}

/// Mounts the layers and the overlay at [`ROOT`].
fn assemble(root: Root) -> io::Result<()> {
    mount_layers(root)?;
    stack(root)
}

fn layer_dir(index: u32) -> String {
    format!("/layers/{index}")
}

fn mount_layers(root: Root) -> io::Result<()> {
    for index in 0..root.layers {
        let target = layer_dir(index);
        std::fs::create_dir_all(&target)?;
        mount_layer(index, &target, root)?;
    }
    Ok(())
}

/// The writable layer and the overlay over the mounted layers, or the
/// shared host directory itself (the container's writes reach it).
fn stack(root: Root) -> io::Result<()> {
    std::fs::create_dir_all(ROOT)?;
    if let Some(index) = root.share {
        let tag = cstring(guest::share_tag(index))?;
        mount_with(&tag, ROOT_C, c"virtiofs", 0, None)?;
    } else {
        overlay(root)?;
    }
    for dir in ["proc", "dev", "tmp", "sys"] {
        std::fs::create_dir_all(format!("{ROOT}/{dir}"))?;
    }
    Ok(())
}

fn overlay(root: Root) -> io::Result<()> {
    // overlayfs lists the top layer first
    let lower: Vec<String> = (0..root.layers).rev().map(layer_dir).collect();
    std::fs::create_dir_all("/scratch")?;
    if root.scratch {
        let disk = cstring(disk(disk_serial::SCRATCH)?)?;
        mount_with(&disk, SCRATCH, c"ext4", 0, None)?;
    } else {
        mount_with(c"tmpfs", SCRATCH, c"tmpfs", 0, None)?;
    }
    mount_union(&lower.join(":"), "/scratch", ROOT_C)?;
    std::fs::create_dir_all(format!("{ROOT}/run/layers"))
}

/// Where the VM's tools are mounted; the VM's /bin, /sbin and /usr lead
/// there.
const TOOLS: &str = "/uvm-tools";

/// Mounts layer `index` read-only at `target`: `/dev/pmem{index}`, with DAX
/// if asked and without it (saying so) if the DAX mount fails, or the disk
/// with the layer's serial.
fn mount_layer(index: u32, target: &str, root: Root) -> io::Result<()> {
    let device = match root.layer_disks {
        true => disk(&disk_serial::layer(index))?,
        false => pmem(index)?,
    };
    mount_read_only(device, target, root.dax && !root.layer_disks)
        .map_err(|e| io::Error::new(e.kind(), format!("layer {index}: {e}")))
}

/// `/dev/pmem{index}`, once it is there.
fn pmem(index: u32) -> io::Result<String> {
    let pmem = format!("/dev/pmem{index}");
    wait_until(&pmem, || Path::new(&pmem).exists().then_some(()))?;
    Ok(pmem)
}

/// Mounts the ext4 image on `device` read-only at `target`, with DAX if
/// asked and without it (saying so) if the DAX mount fails.
fn mount_read_only(device: String, target: &str, dax: bool) -> io::Result<()> {
    let source = cstring(device)?;
    let target = cstring(target.to_string())?;
    let mount =
        |options: &CStr| mount_with(&source, &target, c"ext4", libc::MS_RDONLY, Some(options));
    if dax {
        match mount(c"noload,dax=always") {
            Ok(()) => return Ok(()),
            Err(e) => {
                let _ = writeln!(
                    io::stderr(),
                    "uvm-agent: {target:?}: DAX mount failed ({e}), mounting without DAX"
                );
            }
        }
    }
    mount(c"noload")
}

/// Mounts overlayfs at `target`: `lower` (overlayfs's `a:b` list, top
/// first) under a writable layer whose upper and work directories it
/// makes in `writes` (a mounted file system).
fn mount_union(lower: &str, writes: &str, target: &CStr) -> io::Result<()> {
    std::fs::create_dir_all(format!("{writes}/upper"))?;
    std::fs::create_dir_all(format!("{writes}/work"))?;
    let options = format!("lowerdir={lower},upperdir={writes}/upper,workdir={writes}/work");
    mount_with(c"overlay", target, c"overlay", 0, Some(&cstring(options)?))
}

/// Mounts the VM's tools (pmem `index`) and links the VM's /bin, /sbin and
/// /usr to theirs.
pub fn mount_tools(index: u32) -> io::Result<()> {
    std::fs::create_dir_all(TOOLS)?;
    mount_read_only(pmem(index)?, TOOLS, true)?;
    for dir in ["bin", "sbin", "usr"] {
        match std::os::unix::fs::symlink(format!("{TOOLS}/{dir}"), format!("/{dir}")) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The node of the virtio disk whose serial is `serial`, once it is there.
/// Each disk's serial is read once: every read is a request to the device.
fn disk(serial: &str) -> io::Result<String> {
    let mut others = Vec::new();
    wait_until(&format!("the disk with serial {serial}"), || {
        let disks = std::fs::read_dir("/sys/block").ok()?;
        disks.flatten().find_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            if others.contains(&name) {
                return None;
            }
            let found = std::fs::read_to_string(entry.path().join("serial")).ok()?;
            if found.trim_end_matches(['\0', '\n']) != serial {
                others.push(name);
                return None;
            }
            let node = format!("/dev/{name}");
            Path::new(&node).exists().then_some(node)
        })
    })
}

/// Polls `found` until it yields: devices are probed asynchronously and may
/// appear after the agent starts.
fn wait_until<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> io::Result<T> {
    const PATIENCE: Duration = Duration::from_secs(30);
    let start = Instant::now();
    loop {
        if let Some(t) = found() {
            return Ok(t);
        }
        if start.elapsed() > PATIENCE {
            let e = format!("{what} did not appear within {PATIENCE:?}");
            return Err(io::Error::new(io::ErrorKind::NotFound, e));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the main process sets up as it enters its root, besides the root.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The root has layers, which the process sees at /run/layers.
    pub layers: bool,
    pub hostname: CString,
    pub mounts: Vec<Planned>,
    /// Run in the container just before its program.
    pub hooks: Vec<Hook>,
}

/// Run in the process between fork and exec: a mount, UTS and IPC namespace
/// of its own (the agent made a PID namespace for it), /proc, /dev (with the
/// agent's /dev/pts for a `tty`), /tmp and any layers at /run/layers, the
/// setup's mounts, then the union as `/`, the host name, and `cwd` as the
/// working directory.
pub fn enter(tty: bool, cwd: &CStr, setup: &Setup) -> io::Result<()> {
    // SAFETY: plain system calls on constant, NUL-terminated strings.
    unsafe {
        check(libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC,
        ))?;
        // Nothing mounted from here on leaks back into the agent's view.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
    }
    mount_with(c"proc", c"/rootfs/proc", c"proc", 0, None)?;
    mount_with(c"devtmpfs", c"/rootfs/dev", c"devtmpfs", 0, None)?;
    mount_with(c"tmpfs", c"/rootfs/tmp", c"tmpfs", 0, None)?;
    if setup.layers {
        // The layer mounts (read-only, DAX or not) stay visible for
        // inspection.
        mount_with(
            c"/layers",
            c"/rootfs/run/layers",
            c"",
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
    }
    if tty {
        // devtmpfs is one instance: the agent's /dev/pts may be there already.
        mounts::make_dir(c"/rootfs/dev/pts")?;
        mount_with(c"/dev/pts", c"/rootfs/dev/pts", c"", libc::MS_BIND, None)?;
    }
    mounts::make(&setup.mounts)?;
    // The agent's root is the initramfs, which pivot_root cannot move away
    // from: move the union over `/` instead and chroot into it, as runc
    // does with --no-pivot. In this private mount namespace only the
    // process sees it.
    // SAFETY: a constant, NUL-terminated path.
    check(unsafe { libc::chdir(ROOT_C.as_ptr()) })?;
    mount_with(c".", c"/", c"", libc::MS_MOVE, None)?;
    // SAFETY: plain system calls on constant, NUL-terminated strings.
    unsafe {
        check(libc::chroot(c".".as_ptr()))?;
        let name = setup.hostname.as_bytes();
        check(libc::sethostname(name.as_ptr().cast(), name.len()))?;
        check(libc::chdir(cwd.as_ptr()))
    }
}

/// The running container, for processes that join it.
pub struct Container {
    /// Its main process.
    pub pid: libc::pid_t,
}

/// The namespaces and root of a running container, open for a process
/// about to join them.
pub struct Joined {
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    root: OwnedFd,
}

impl Container {
    /// Opens its mount, UTS and IPC namespaces and its root (the PID
    /// namespace is the agent's to enter, before it forks).
    pub fn namespaces(&self) -> io::Result<Joined> {
        let open = |what: &str, flags| -> io::Result<OwnedFd> {
            let path = format!("/proc/{}/{what}", self.pid);
            Ok(OwnedFd::from(
                File::options().read(true).custom_flags(flags).open(path)?,
            ))
        };
        let kinds = [
            ("ns/mnt", libc::CLONE_NEWNS),
            ("ns/uts", libc::CLONE_NEWUTS),
            ("ns/ipc", libc::CLONE_NEWIPC),
        ];
        let namespaces = kinds
            .into_iter()
            .map(|(what, kind)| Ok((open(what, 0)?, kind)))
            .collect::<io::Result<_>>()?;
        Ok(Joined {
            namespaces,
            root: open("root", libc::O_DIRECTORY)?,
        })
    }

    /// Its PID namespace, which the agent enters to fork into it.
    pub fn pid_namespace(&self) -> io::Result<OwnedFd> {
        Ok(File::open(format!("/proc/{}/ns/pid", self.pid))?.into())
    }
}

impl Joined {
    /// Run in the process between fork and exec: joins the namespaces and
    /// the container's root, and goes to `cwd`.
    pub fn enter(&self, cwd: &CStr) -> io::Result<()> {
        for (fd, kind) in &self.namespaces {
            // SAFETY: plain system call on a descriptor we own.
            check(unsafe { libc::setns(fd.as_raw_fd(), *kind) })?;
        }
        // SAFETY: plain system calls on a descriptor we own and constant,
        // NUL-terminated strings.
        unsafe {
            check(libc::fchdir(self.root.as_raw_fd()))?;
            check(libc::chroot(c".".as_ptr()))?;
            check(libc::chdir(cwd.as_ptr()))
        }
    }
}

/// Moves the agent's future children into the PID namespace `ns`.
pub fn enter_pid_namespace(ns: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain system call on a descriptor we own.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) })
}

pub fn cstring(s: String) -> io::Result<CString> {
    CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}
