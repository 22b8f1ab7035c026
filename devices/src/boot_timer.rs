//! Boot timer: the guest writes a mark byte when it reaches a milestone (the
//! agent starting, ...), and the device stamps it with the host time elapsed
//! since the VMM started, so boot phases are measured on the host clock.

use std::time::{Duration, Instant};

use crate::BusDevice;

pub struct BootTimer {
    start: Instant,
    marks: Vec<(u8, Duration)>,
}

/// Bounds what a guest can make us store: one stamp per distinct mark.
const MAX_MARKS: usize = 256;

impl BootTimer {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: Vec::new(),
        }
    }

    /// Time from `start` to the first write of `mark`, if the guest made it.
    pub fn mark(&self, mark: u8) -> Option<Duration> {
        self.marks
            .iter()
            .find(|(m, _)| *m == mark)
            .map(|(_, at)| *at)
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let at = self.start.elapsed();
        if let Some(&mark) = data.first() {
            if self.mark(mark).is_none() && self.marks.len() < MAX_MARKS {
                self.marks.push((mark, at));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_first_stamp_of_each_mark() {
        let mut timer = BootTimer::new(Instant::now());
        assert_eq!(timer.mark(1), None);
        timer.write(0, &[1]);
        let first = timer.mark(1).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[1]);
        timer.write(0, &[]);
        assert_eq!(timer.mark(1), Some(first));
        timer.write(0, &[2]);
        assert!(timer.mark(2).unwrap() > first);
    }
}
