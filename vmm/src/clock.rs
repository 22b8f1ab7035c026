//! The host's monotonic clock as a number, to line up times taken in
//! different processes (`uvm bench` and the `uvm run` it starts).

use std::time::Duration;

/// CLOCK_MONOTONIC now: the clock behind `Instant`, shared by all processes.
pub fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass; the monotonic
    // clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_like_instant() {
        let (a, t) = (monotonic(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let elapsed = monotonic() - a;
        assert!(elapsed >= Duration::from_millis(20));
        assert!(elapsed <= t.elapsed() + Duration::from_millis(1));
    }
}
