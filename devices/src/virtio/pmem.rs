//! virtio-pmem (virtio 1.2, 5.19): a range of guest physical memory backed
//! by a host file — one read-only container image layer. The guest maps the
//! range straight into its address space (DAX); the device itself only
//! describes the range and answers flush requests.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Le32;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    drain_queue, ActivateError, GuestMemory, IrqStatus, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
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
    queue_events: [EventFd; 1],
    active: Option<(Queue, Arc<IrqStatus>)>,
}

impl Pmem {
    /// A device describing the guest range `start..start + len`, which the
    /// VMM maps (read-only) itself.
    pub fn new(mem: GuestMemory, start: u64, len: u64) -> std::io::Result<Self> {
        Ok(Self {
            mem,
            start,
            len,
            queue_events: [EventFd::new(EFD_NONBLOCK)?],
            active: None,
        })
    }

    fn process_queue(&mut self) {
        if let Some((queue, irq)) = &mut self.active {
            drain_queue(queue, &self.mem, irq, |chain| respond(&self.mem, chain));
        }
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
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.start.to_le_bytes());
        config[8..].copy_from_slice(&self.len.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, mut queues: Vec<Queue>, irq: Arc<IrqStatus>) -> Result<(), ActivateError> {
        match queues.pop() {
            Some(queue) if queue.ready() => {
                self.active = Some((queue, irq));
                self.process_queue();
                Ok(())
            }
            _ => Err(ActivateError::BadQueue(0)),
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Pmem {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            tracing::error!("pmem: watching the queue: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.queue_events[0].read();
        self.process_queue();
    }
}
