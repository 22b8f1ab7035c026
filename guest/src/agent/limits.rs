//! A process's resource limits (OCI config.json's rlimits, `uvm run
//! --ulimit`): resolved by the agent, set by the process before it runs.

use std::io;

use guest::protocol::Rlimit;

use crate::check;

/// glibc and musl type the resource differently: kept as an int here.
type Resource = libc::c_int;

const RESOURCES: [(&str, Resource); 16] = [
    ("AS", libc::RLIMIT_AS as Resource),
    ("CORE", libc::RLIMIT_CORE as Resource),
    ("CPU", libc::RLIMIT_CPU as Resource),
    ("DATA", libc::RLIMIT_DATA as Resource),
    ("FSIZE", libc::RLIMIT_FSIZE as Resource),
    ("LOCKS", libc::RLIMIT_LOCKS as Resource),
    ("MEMLOCK", libc::RLIMIT_MEMLOCK as Resource),
    ("MSGQUEUE", libc::RLIMIT_MSGQUEUE as Resource),
    ("NICE", libc::RLIMIT_NICE as Resource),
    ("NOFILE", libc::RLIMIT_NOFILE as Resource),
    ("NPROC", libc::RLIMIT_NPROC as Resource),
    ("RSS", libc::RLIMIT_RSS as Resource),
    ("RTPRIO", libc::RLIMIT_RTPRIO as Resource),
    ("RTTIME", libc::RLIMIT_RTTIME as Resource),
    ("SIGPENDING", libc::RLIMIT_SIGPENDING as Resource),
    ("STACK", libc::RLIMIT_STACK as Resource),
];

/// The limits to set, each checked: a known resource, soft ≤ hard.
pub type Limits = Vec<(Resource, libc::rlimit)>;

pub fn resolve(rlimits: &[Rlimit]) -> io::Result<Limits> {
    rlimits
        .iter()
        .map(|limit| {
            let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
            let name = limit.resource.trim_start_matches("RLIMIT_");
            let Some(&(_, resource)) = RESOURCES.iter().find(|(known, _)| *known == name) else {
                return Err(bad(format!("unknown resource limit {}", limit.resource)));
            };
            if limit.soft > limit.hard {
                return Err(bad(format!("{name}: soft limit above the hard one")));
            }
            let rlimit = libc::rlimit {
                rlim_cur: limit.soft,
                rlim_max: limit.hard,
            };
            Ok((resource, rlimit))
        })
        .collect()
}

/// Sets `limits` on the calling process (a system call each).
pub fn set(limits: &Limits) -> io::Result<()> {
    for (resource, rlimit) in limits {
        // SAFETY: `rlimit` is a valid struct for the call to read.
        check(unsafe { libc::setrlimit(*resource as _, rlimit) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_known_resources_with_soft_under_hard() {
        let limit = |resource: &str, soft, hard| Rlimit {
            resource: resource.into(),
            soft,
            hard,
        };
        let limits = resolve(&[limit("RLIMIT_NOFILE", 10, 20), limit("NPROC", 5, 5)]).unwrap();
        assert_eq!(limits[0].0, libc::RLIMIT_NOFILE as Resource);
        assert_eq!((limits[0].1.rlim_cur, limits[0].1.rlim_max), (10, 20));
        assert_eq!(limits[1].0, libc::RLIMIT_NPROC as Resource);
        assert!(resolve(&[limit("NOFILE", 30, 20)]).is_err());
        assert!(resolve(&[limit("BOGUS", 1, 1)]).is_err());
    }
}
