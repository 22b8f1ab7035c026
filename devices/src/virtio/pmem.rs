//! virtio-pmem (virtio 1.2, 5.19): a range of guest physical memory backed
//! by a host file — one read-only container image layer. The guest maps the
//! range straight into its address space (DAX); the device itself only
//! describes the range and answers flush requests.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Le32;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, GuestMemory, IrqStatus, RequestQueue, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};

pub const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_PMEM;
/// Linux maps the range with memremap_pages, which wants 2 MiB alignment of
/// its start and size.
pub const ALIGNMENT: u64 = 2 << 20;

const QUEUE_SIZE: u16 = 64;
const REQ_TYPE_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;

pub struct Pmem {
    mem: GuestMemory,
    /// Guest-physical start and length of the range: the config space.
    start: u64,
    len: u64,
    queue: RequestQueue,
}

impl Pmem {
    /// A device describing the guest range `start..start + len`, which the
    /// VMM maps (read-only) itself.
    pub fn new(mem: GuestMemory, start: u64, len: u64) -> std::io::Result<Self> {
        Ok(Self {
            mem,
            start,
            len,
            queue: RequestQueue::new()?,
        })
    }

    fn process_queue(&mut self) {
        let mem = &self.mem;
        self.queue.serve(mem, |chain| respond(mem, chain));
    }
}

/// Answers one request: a flush succeeds (the range is a read-only mapping
/// of the file, there is nothing to write back); anything else is an error.
/// Returns the bytes written, 0 for a chain that cannot hold an answer.
fn respond(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return 0;
    };
    let status = match reader.read_obj::<Le32>() {
        Ok(kind) if kind.to_native() == REQ_TYPE_FLUSH => RESP_OK,
        _ => RESP_EIO,
    };
    match writer.write_obj(Le32::from(status)) {
        Ok(()) => 4,
        Err(_) => 0,
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        self.queue.events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.start.to_le_bytes());
        config[8..].copy_from_slice(&self.len.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, queues: Vec<Queue>, irq: Arc<IrqStatus>) -> Result<(), ActivateError> {
        self.queue.activate(queues, irq)?;
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.queue.reset();
    }
}

impl MutEventSubscriber for Pmem {
    fn init(&mut self, ops: &mut EventOps) {
        self.queue.subscribe(ops, "pmem");
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::Ring;
    use crate::CountingInterrupt;

    #[test]
    fn describes_its_range_and_answers_flushes() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut pmem = Pmem::new(mem.clone(), 1 << 32, 4 << 20).unwrap();
        let mut config = [0u8; 16];
        pmem.read_config(0, &mut config);
        assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), 1 << 32);
        assert_eq!(u64::from_le_bytes(config[8..].try_into().unwrap()), 4 << 20);

        let mut ring = Ring::new(0);
        let irq = Arc::new(IrqStatus::new(Arc::new(CountingInterrupt::default())));
        pmem.activate(vec![ring.queue()], irq).unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        for (i, kind) in [REQ_TYPE_FLUSH, 7].into_iter().enumerate() {
            let (req, resp) = (0x8_0000 + i as u64 * 16, 0x9_0000 + i as u64 * 16);
            mem.write_obj(kind, GuestAddress(req)).unwrap();
            ring.add_chain(&mem, &[(req, 4, 0), (resp, 4, w)]);
        }
        ring.add_chain(&mem, &[(0x8_0100, 4, 0)]); // no room for an answer
        pmem.process_queue();
        let used = ring.take_used(&mem);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [4, 4, 0]);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x9_0000)).unwrap(),
            RESP_OK
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x9_0010)).unwrap(),
            RESP_EIO
        );
    }
}
