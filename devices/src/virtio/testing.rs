//! A driver's view of split virtqueues in plain memory, for device tests
//! that must run without a guest.

use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;

pub const QUEUE_LEN: u16 = 512;

/// The driver's side of one split virtqueue (virtio 1.2, 2.7) in guest
/// memory: descriptor table, available ring, used ring.
pub struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    pub next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    pub fn new(base: u64) -> Self {
        let avail = base + 16 * u64::from(QUEUE_LEN);
        let used = (avail + 6 + 2 * u64::from(QUEUE_LEN)).next_multiple_of(4);
        Self {
            desc: base,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_LEN).unwrap();
        q.set_size(QUEUE_LEN);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    pub fn write_desc(&self, mem: &GuestMemory, index: u16, (addr, len, flags): Desc, next: u16) {
        let at = self.desc + 16 * u64::from(index);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes descriptor `head` available to the device.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_LEN);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Moves the available index `count` chains ahead without offering
    /// any, as a broken or hostile driver might.
    pub fn claim_available(&mut self, mem: &GuestMemory, count: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(count);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Offers `descs` as one chain; returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemory, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_LEN;
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            self.write_desc(mem, index, (addr, len, flags), (index + 1) % QUEUE_LEN);
        }
        self.next_desc = (head + descs.len() as u16) % QUEUE_LEN;
        self.publish(mem, head);
        head
    }

    /// Used elements (head id, length) the device returned since last asked.
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = self.used + 4 + 8 * u64::from(self.used_seen % QUEUE_LEN);
            let id = mem.read_obj(GuestAddress(elem)).unwrap();
            let len = mem.read_obj(GuestAddress(elem + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
}

/// A descriptor: address, length, flags.
pub type Desc = (u64, u32, u16);
