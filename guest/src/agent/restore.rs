//! A guest restored from a snapshot taken while the agent waited for work:
//! its vsock connections were reset, and its random pool and wall clock
//! are the saved guest's, shared by every VM restored from the snapshot.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use guest::protocol::Fresh;

use crate::check;

/// `_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)` (linux/random.h).
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// `struct rand_pool_info` with room for the most the host sends.
#[repr(C)]
struct PoolInfo {
    entropy_bits: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; Fresh::MAX_ENTROPY],
}

/// Whether a failed read of the control stream means the VM was restored:
/// the vsock device's transport reset ends every connection.
pub fn was_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// Makes this guest its own before anything runs in it: the host's
/// randomness mixed in and the pool reseeded, the wall clock set.
pub fn refresh(fresh: &Fresh) -> io::Result<()> {
    reseed(&fresh.entropy)?;
    set_clock(fresh.realtime_ns)
}

fn reseed(entropy: &[u8]) -> io::Result<()> {
    let len = entropy.len().min(Fresh::MAX_ENTROPY);
    let mut info = PoolInfo {
        entropy_bits: (len * 8) as libc::c_int,
        buf_size: len as libc::c_int,
        buf: [0; Fresh::MAX_ENTROPY],
    };
    info.buf[..len].copy_from_slice(&entropy[..len]);
    let random = File::open("/dev/urandom")?;
    // SAFETY: `info` is a rand_pool_info whose buffer holds `buf_size`
    // bytes; the kernel only reads it.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) })?;
    // SAFETY: takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) })
}

fn set_clock(realtime_ns: u64) -> io::Result<()> {
    let now = libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as _,
        tv_nsec: (realtime_ns % 1_000_000_000) as _,
    };
    // SAFETY: clock_settime only reads the timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) })
}
