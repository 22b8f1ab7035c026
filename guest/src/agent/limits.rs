//! A process's resource limits (OCI config.json's rlimits, `uvm run
//! --ulimit`): resolved by the agent, set by the process before it runs.

use std::io;

use guest::protocol::Rlimit;

use crate::check;

const RESOURCES: [(&str, libc::__rlimit_resource_t); 16] = [
    ("AS", libc::RLIMIT_AS),
    ("CORE", libc::RLIMIT_CORE),
    ("CPU", libc::RLIMIT_CPU),
    ("DATA", libc::RLIMIT_DATA),
    ("FSIZE", libc::RLIMIT_FSIZE),
    ("LOCKS", libc::RLIMIT_LOCKS),
    ("MEMLOCK", libc::RLIMIT_MEMLOCK),
    ("MSGQUEUE", libc::RLIMIT_MSGQUEUE),
    ("NICE", libc::RLIMIT_NICE),
    ("NOFILE", libc::RLIMIT_NOFILE),
    ("NPROC", libc::RLIMIT_NPROC),
    ("RSS", libc::RLIMIT_RSS),
    ("RTPRIO", libc::RLIMIT_RTPRIO),
    ("RTTIME", libc::RLIMIT_RTTIME),
    ("SIGPENDING", libc::RLIMIT_SIGPENDING),
    ("STACK", libc::RLIMIT_STACK),
];

/// The limits to set, each checked: a known resource, soft ≤ hard.
pub type Limits = Vec<(libc::__rlimit_resource_t, libc::rlimit)>;

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
        check(unsafe { libc::setrlimit(*resource, rlimit) })?;
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
        assert_eq!(limits[0].0, libc::RLIMIT_NOFILE);
        assert_eq!((limits[0].1.rlim_cur, limits[0].1.rlim_max), (10, 20));
        assert_eq!(limits[1].0, libc::RLIMIT_NPROC);
        assert!(resolve(&[limit("NOFILE", 30, 20)]).is_err());
        assert!(resolve(&[limit("BOGUS", 1, 1)]).is_err());
    }
}
