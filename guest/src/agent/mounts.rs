//! The container's mounts besides its root (OCI config.json's, `uvm run
//! -v`): the agent readies their sources, the main process makes them as it
//! enters its root, with plain system calls between vfork and exec.

use std::ffi::{CStr, CString};
use std::io;

use guest::protocol::{Mount, MountKind};

use crate::root::{self, cstring};
use crate::{check, mount_with};

/// Where the agent mounts the shares that bind mounts of files come from.
const SOURCES: &str = "/mounts";

/// One mount, ready to be made.
#[derive(Clone, Debug)]
pub struct Planned {
    source: CString,
    fstype: CString,
    flags: libc::c_ulong,
    /// The mount point under the root, and the directories to create first
    /// (outermost first).
    target: CString,
    parents: Vec<CString>,
    /// The mount point is a file (a bind mount of one).
    file: bool,
    /// Remount the bind mount read-only once made.
    read_only_bind: bool,
}

/// Readies each mount's source (the shares of files, mounted in the
/// agent) and what the process needs to make it.
pub fn plan(mounts: &[Mount]) -> io::Result<Vec<Planned>> {
    mounts
        .iter()
        .map(|mount| {
            plan_one(mount)
                .map_err(|e| io::Error::new(e.kind(), format!("mount {}: {e}", mount.destination)))
        })
        .collect()
}

fn plan_one(mount: &Mount) -> io::Result<Planned> {
    let (parents, target) = mount_point(&mount.destination)?;
    let read_only = if mount.read_only { libc::MS_RDONLY } else { 0 };
    let (source, fstype, flags, file) = match &mount.kind {
        // The directory itself, mounted by the process.
        MountKind::Share { index, file: None } => {
            (guest::share_tag(*index), "virtiofs", read_only, false)
        }
        MountKind::Share {
            index,
            file: Some(name),
        } => {
            if name.contains('/') || name == ".." || name == "." {
                let e = format!("bad file name {name:?}");
                return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
            }
            let dir = share_source(*index, mount.read_only)?;
            let flags = libc::MS_BIND | libc::MS_REC;
            (format!("{dir}/{name}"), "", flags, true)
        }
        MountKind::Tmpfs => ("tmpfs".into(), "tmpfs", read_only | libc::MS_NOSUID, false),
        MountKind::Sysfs => ("sysfs".into(), "sysfs", read_only | libc::MS_NOSUID, false),
    };
    Ok(Planned {
        source: cstring(source)?,
        fstype: cstring(fstype.into())?,
        flags,
        target,
        parents,
        file,
        read_only_bind: mount.read_only && file,
    })
}

/// The mount point of `destination` under the root and its parents, from
/// an absolute path without `..`.
fn mount_point(destination: &str) -> io::Result<(Vec<CString>, CString)> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    if !destination.starts_with('/') {
        return Err(bad("the destination is not an absolute path"));
    }
    let parts: Vec<&str> = destination
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(bad("the destination has `..` in it"));
    }
    if parts.is_empty() {
        return Err(bad("the destination is the root"));
    }
    let mut path = root::ROOT.to_string();
    let mut paths = Vec::new();
    for part in parts {
        path = format!("{path}/{part}");
        paths.push(cstring(path.clone())?);
    }
    let target = paths.pop().expect("one part at least");
    Ok((paths, target))
}

/// Mounts share `index` in the agent, for the process to bind one file of
/// it; returns the directory.
fn share_source(index: u32, read_only: bool) -> io::Result<String> {
    let dir = format!("{SOURCES}/{index}");
    std::fs::create_dir_all(&dir)?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    let tag = cstring(guest::share_tag(index))?;
    mount_with(&tag, &cstring(dir.clone())?, c"virtiofs", flags, None)?;
    Ok(dir)
}

/// Makes the mounts, in order, under the root: run by the process in its
/// own mount namespace, between vfork and exec (system calls only).
pub fn make(planned: &[Planned]) -> io::Result<()> {
    for mount in planned {
        for dir in &mount.parents {
            make_dir(dir)?;
        }
        match mount.file {
            true => make_file(&mount.target)?,
            false => make_dir(&mount.target)?,
        }
        mount_with(
            &mount.source,
            &mount.target,
            &mount.fstype,
            mount.flags,
            None,
        )?;
        if mount.read_only_bind {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
            mount_with(c"", &mount.target, c"", flags, None)?;
        }
    }
    Ok(())
}

/// Makes directory `path` unless it is there (a system call).
pub fn make_dir(path: &CStr) -> io::Result<()> {
    // SAFETY: a NUL-terminated path.
    match check(unsafe { libc::mkdir(path.as_ptr(), 0o755) }) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn make_file(path: &CStr) -> io::Result<()> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    // SAFETY: a NUL-terminated path; the descriptor is closed at once.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // A link there already points at what is mounted over.
        return match e.raw_os_error() == Some(libc::ELOOP) {
            true => Ok(()),
            false => Err(e),
        };
    }
    // SAFETY: the descriptor open just returned, closed once.
    unsafe { libc::close(fd) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_is_absolute_under_the_root_without_dot_dot() {
        let (parents, target) = mount_point("/data/in//./x").unwrap();
        assert_eq!(
            parents,
            [c"/rootfs/data".to_owned(), c"/rootfs/data/in".to_owned()]
        );
        assert_eq!(target, c"/rootfs/data/in/x".to_owned());
        for bad in ["data", "/a/../../etc", "/", ""] {
            assert!(mount_point(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tmpfs_sysfs_and_shares_need_no_source_and_keep_read_only() {
        let mount = |kind, read_only| Mount {
            destination: "/dev/shm".into(),
            kind,
            read_only,
        };
        let tmpfs = plan_one(&mount(MountKind::Tmpfs, false)).unwrap();
        assert_eq!(tmpfs.fstype, c"tmpfs".to_owned());
        assert_eq!(tmpfs.flags & libc::MS_RDONLY, 0);
        let sysfs = plan_one(&mount(MountKind::Sysfs, true)).unwrap();
        assert_ne!(sysfs.flags & libc::MS_RDONLY, 0);
        assert!(!sysfs.read_only_bind, "not a bind mount");
        let file = MountKind::Share {
            index: 3,
            file: Some("../x".into()),
        };
        assert!(plan_one(&mount(file, true)).is_err());
        let share = MountKind::Share {
            index: 2,
            file: None,
        };
        let share = plan_one(&mount(share, true)).unwrap();
        assert_eq!(
            (share.source.as_c_str(), share.fstype.as_c_str()),
            (c"uvm-share2", c"virtiofs")
        );
        assert_ne!(share.flags & libc::MS_RDONLY, 0);
    }
}
