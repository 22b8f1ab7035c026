//! Who a container process runs as: `user`, `uid`, `user:group` or
//! `uid:gid` (an image's User, `uvm run -u`), looked up in the container's
//! own /etc/passwd and /etc/group the way runc does.

use std::io::{self, Read};

use crate::check;

/// The container's account files are its image's: read no more than this.
const MAX_FILE: u64 = 1 << 20;
/// Linux's NGROUPS_MAX.
const MAX_GROUPS: usize = 65536;

#[derive(Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: those the account file lists the user in.
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

/// Resolves `spec` against the account files under `root`.
pub fn resolve(spec: &str, root: &str) -> io::Result<Ids> {
    let passwd = read(&format!("{root}/etc/passwd"))?;
    let group = read(&format!("{root}/etc/group"))?;
    resolve_in(spec, &passwd, &group)
}

fn resolve_in(spec: &str, passwd: &str, group: &str) -> io::Result<Ids> {
    let (user, wanted_group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let account =
        records(passwd).find(|r| r[0] == user || (user.parse::<u32>().is_ok() && r[2] == user));
    let (uid, gid, name, home) = match (account, user.parse::<u32>()) {
        (Some(r), _) => (
            number(r[2], spec)?,
            number(r[3], spec)?,
            Some(r[0]),
            Some(r[5]),
        ),
        (None, Ok(uid)) => (uid, 0, None, None),
        (None, Err(_)) => {
            return Err(unknown(format!(
                "user {user}: no such user in the container's /etc/passwd"
            )))
        }
    };
    let gid = match wanted_group {
        None => gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let found = records(group).find(|r| r[0] == g);
                let found = found.ok_or_else(|| {
                    unknown(format!(
                        "group {g}: no such group in the container's /etc/group"
                    ))
                })?;
                number(found[2], spec)?
            }
        },
    };
    let groups = match name {
        Some(name) => records(group)
            .filter(|r| r.get(3).is_some_and(|m| m.split(',').any(|m| m == name)))
            .filter_map(|r| r[2].parse().ok())
            .take(MAX_GROUPS)
            .collect(),
        None => Vec::new(),
    };
    Ok(Ids {
        uid,
        gid,
        groups,
        home: home.map(str::to_string),
    })
}

/// Between fork and exec, after the process entered its root: drop to the
/// ids (groups first, while setgroups is still allowed).
pub fn become_ids(ids: &Ids) -> io::Result<()> {
    // SAFETY: plain system calls on values owned by the caller; setgroups
    // reads `groups.len()` entries.
    unsafe {
        check(libc::setgroups(ids.groups.len(), ids.groups.as_ptr()))?;
        check(libc::setgid(ids.gid))?;
        check(libc::setuid(ids.uid))
    }
}

/// An account file's lines split at `:`, those with the 4 fields a group
/// line has at least (7 for passwd lines are checked where used).
fn records(file: &str) -> impl Iterator<Item = Vec<&str>> {
    file.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|r| r.len() >= 3)
        .map(|mut r| {
            r.resize(7, "");
            r
        })
}

fn number(field: &str, spec: &str) -> io::Result<u32> {
    field.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("user {spec}: bad id {field:?} in the account files"),
        )
    })
}

fn unknown(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, message)
}

/// An account file, or nothing if the image has none.
fn read(path: &str) -> io::Result<String> {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(file) => {
            file.take(MAX_FILE).read_to_string(&mut text)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\nwheel:x:10:root\n";

    fn ids(spec: &str) -> io::Result<Ids> {
        resolve_in(spec, PASSWD, GROUP)
    }

    #[test]
    fn names_and_numbers_resolve_like_runc() {
        let app = ids("app").unwrap();
        assert_eq!(
            (app.uid, app.gid, app.groups.as_slice()),
            (1000, 1000, &[50][..])
        );
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        assert_eq!(
            ids("1000").unwrap().gid,
            1000,
            "a uid in passwd gets its group"
        );
        let numeric = ids("4242:77").unwrap();
        assert_eq!((numeric.uid, numeric.gid, numeric.home), (4242, 77, None));
        assert_eq!(ids("app:staff").unwrap().gid, 50);
        assert_eq!(ids("0:wheel").unwrap().gid, 10);
    }

    #[test]
    fn unknown_names_are_errors_naming_them() {
        let err = ids("nobody").unwrap_err().to_string();
        assert!(err.contains("user nobody: no such user"), "{err}");
        let err = ids("app:ghosts").unwrap_err().to_string();
        assert!(err.contains("group ghosts: no such group"), "{err}");
    }
}
