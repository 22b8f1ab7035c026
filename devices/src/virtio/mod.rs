//! Virtio devices and their transport. A device ([`VirtioDevice`]) knows its
//! queues and configuration space; the transport ([`mmio::MmioTransport`])
//! turns guest register accesses into calls on it and activates it once the
//! driver is ready.
//!
//! Queue notifications are the seam between devices and hosts: on Linux each
//! queue has an eventfd that KVM signals without an exit (ioeventfd) and the
//! VMM's event thread watches; on hosts without eventfds the transport hands
//! the notification to the device itself ([`VirtioDevice::queue_notified`]).

pub mod block;
// fuse-backend-rs's passthrough file system is Linux's.
#[cfg(target_os = "linux")]
pub mod fs;
pub mod mmio;
pub mod pmem;
#[cfg(test)]
mod testing;
// Its host side is Unix streams and epoll.
#[cfg(target_os = "linux")]
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
#[cfg(target_os = "linux")]
use vmm_sys_util::eventfd::EventFd;

use crate::Interrupt;

/// Guest RAM as every virtio device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Feature bit every modern (virtio 1.x) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Notification suppression by ring index: with it the driver interrupts
/// and kicks far less, which matters most where each exit is expensive.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not set up correctly")]
    BadQueue(usize),
}

/// One virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (5.x of the virtio spec).
    fn device_type(&self) -> u32;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, which the hypervisor signals when the driver
    /// notifies that queue (ioeventfd) and the event thread watches.
    #[cfg(target_os = "linux")]
    fn queue_events(&self) -> &[EventFd];
    /// The driver notified `queue` and the hypervisor did not deliver it
    /// itself: serve it, or pass it on to where the device serves it.
    fn queue_notified(&mut self, queue: usize);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver is ready: from now on the device owns `queues`.
    fn activate(&mut self, queues: Vec<Queue>, irq: Arc<IrqStatus>) -> Result<(), ActivateError>;
    /// Where each queue the device owns stands (none before activation):
    /// what a snapshot keeps of them.
    fn queue_states(&self) -> Vec<QueueState>;
    /// The driver reset the device: drop the queues and all device state.
    fn reset(&mut self);
    /// The device was activated again with queues from a snapshot
    /// ([`mmio::MmioTransport::restore`]): what it had with the saved VM's
    /// host side is gone. Most devices kept nothing.
    fn restored(&mut self) {}
}

/// The interrupt status register shared by the transport (which the guest
/// reads and acknowledges) and the device (which raises it).
pub struct IrqStatus {
    status: AtomicU32,
    line: Arc<dyn Interrupt>,
}

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;

impl IrqStatus {
    pub fn new(line: Arc<dyn Interrupt>) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Interrupts the driver if `queue`'s new used buffers call for it (with
    /// EVENT_IDX the driver says when it wants to hear).
    pub fn signal_used(&self, queue: &mut Queue, mem: &GuestMemory) {
        if queue.needs_notification(mem).unwrap_or(true) {
            self.signal_used_queue();
        }
    }

    /// Tells the driver that a queue has used buffers.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    fn get(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets status bits without interrupting (a restored VM's interrupt
    /// controller keeps its own pending state).
    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Takes every chain the driver made available on `queue`, passes it to
/// `handle` (which returns how many bytes it wrote into the chain), gives it
/// back, and interrupts the driver if it asked to hear.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    irq: &IrqStatus,
    mut handle: impl FnMut(DescriptorChain<&GuestMemory>) -> u32,
) {
    let mut used = false;
    loop {
        let mut progress = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = handle(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio: used ring: {e}");
            }
            (used, progress) = (true, true);
        }
        // Ask for a kick on the next chain and take any that raced in; a
        // ring that claims chains it cannot give (a bogus available index)
        // makes no progress and ends the loop.
        if !progress || !queue.enable_notification(mem).unwrap_or(false) {
            break;
        }
    }
    if used {
        irq.signal_used(queue, mem);
    }
}

/// Copies the part of a device's configuration space `config` at `offset`
/// into `data`; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// What a device with a single request queue (pmem, block) does with each
/// request; [`RequestDevice`] does the rest.
pub trait RequestHandler: Send {
    /// For log messages.
    const NAME: &'static str;
    const DEVICE_ID: u32;
    /// Device-specific feature bits.
    fn features(&self) -> u64;
    /// The configuration space.
    fn config(&self) -> Vec<u8>;
    /// Serves one request chain; returns the bytes written into it.
    fn serve(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32;
}

/// A virtio device with one request queue, served by `H`.
pub struct RequestDevice<H> {
    mem: GuestMemory,
    handler: H,
    #[cfg(target_os = "linux")]
    events: [EventFd; 1],
    active: Option<(Queue, Arc<IrqStatus>)>,
}

impl<H: RequestHandler> RequestDevice<H> {
    pub fn new(mem: GuestMemory, handler: H) -> std::io::Result<Self> {
        Ok(Self {
            mem,
            handler,
            #[cfg(target_os = "linux")]
            events: [EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?],
            active: None,
        })
    }

    fn process_queue(&mut self) {
        if let Some((queue, irq)) = &mut self.active {
            let (mem, handler) = (&self.mem, &self.handler);
            drain_queue(queue, mem, irq, |chain| handler.serve(mem, chain));
        }
    }
}

impl<H: RequestHandler> VirtioDevice for RequestDevice<H> {
    fn device_type(&self) -> u32 {
        H::DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX | self.handler.features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[REQUEST_QUEUE_SIZE]
    }

    #[cfg(target_os = "linux")]
    fn queue_events(&self) -> &[EventFd] {
        &self.events
    }

    /// On Linux the event thread serves the queue (this runs on a vCPU
    /// thread, whose seccomp filter allows no file I/O); elsewhere there is
    /// no event thread.
    fn queue_notified(&mut self, _queue: usize) {
        #[cfg(target_os = "linux")]
        if let Err(e) = self.events[0].write(1) {
            tracing::warn!("{}: queue notify: {e}", H::NAME);
        }
        #[cfg(not(target_os = "linux"))]
        self.process_queue();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.handler.config(), offset, data);
    }

    fn activate(
        &mut self,
        mut queues: Vec<Queue>,
        irq: Arc<IrqStatus>,
    ) -> Result<(), ActivateError> {
        match queues.pop() {
            Some(queue) if queue.ready() => {
                self.active = Some((queue, irq));
                // Anything the driver queued before it said DRIVER_OK.
                self.queue_notified(0);
                Ok(())
            }
            _ => Err(ActivateError::BadQueue(0)),
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().map(|(queue, _)| queue.state()).collect()
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(target_os = "linux")]
impl<H: RequestHandler> event_manager::MutEventSubscriber for RequestDevice<H> {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        let events = event_manager::Events::new(&self.events[0], event_manager::EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("{}: watching the queue: {e}", H::NAME);
        }
    }

    fn process(&mut self, _: event_manager::Events, _: &mut event_manager::EventOps) {
        let _ = self.events[0].read();
        self.process_queue();
    }
}

/// The size of a request queue.
const REQUEST_QUEUE_SIZE: u16 = 256;
