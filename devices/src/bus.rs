//! Address-range dispatch of guest I/O (port or MMIO) to devices.

use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes inside its range.
/// `offset` is relative to the start of the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges, each owned by one device. Built before the
/// vCPUs start, then shared read-only by every vCPU thread.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |e: &Entry| base < e.base + e.len && e.base < end.unwrap_or(u64::MAX);
        if end.is_none() || self.entries.iter().any(overlaps) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    /// The device whose range holds the whole access `[addr, addr + size)`.
    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let at = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let entry = &self.entries[at];
        let offset = addr - entry.base;
        (offset.checked_add(size as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`; returns false (data untouched) if none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.find(addr, data.len()).is_some_and(|(entry, offset)| {
            lock(&entry.device).read(offset, data);
            true
        })
    }

    /// Writes to the device at `addr`; returns false if there is none.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.find(addr, data.len()).is_some_and(|(entry, offset)| {
            lock(&entry.device).write(offset, data);
            true
        })
    }
}

/// A device mutex is only poisoned if a device panicked; the device state is
/// still the best we have, so keep serving the guest.
fn lock(device: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![7])]);
    }

    #[test]
    fn misses_outside_and_across_range_end() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        let mut data = [0u8; 2];
        assert!(!bus.read(0xf, &mut data));
        assert!(!bus.read(0x13, &mut data), "access crossing the end");
        assert!(!bus.write(0x14, &[1]));
        assert!(!bus.write(u64::MAX, &[1]));
    }

    #[test]
    fn rejects_overlap_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev(), 0x10f, 1).is_err());
        assert!(bus.insert(dev(), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
        bus.insert(dev(), 0x110, 1).unwrap();
    }
}
