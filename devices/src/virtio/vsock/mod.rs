//! virtio-vsock (virtio 1.2, 5.10), implemented in the VMM: there is no
//! vhost-vsock on the hosts we target. Guest connections end in host Unix
//! streams ([`HostPorts`]); host programs reach guest ports through the
//! hybrid socket. Runs on the VMM's event thread.

mod connection;
mod host;
mod muxer;
#[cfg(test)]
mod tests;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, GuestMemory, IrqStatus, VirtioDevice};
pub use host::HostPorts;
pub use muxer::{HOST_CID, MAX_CONNECTIONS};

pub const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// The guest's address unless told otherwise (the first one not reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;

const QUEUE_SIZE: u16 = 256;
// Queue indices; the third queue (events) is never used by this device.
const RX: usize = 0;
const TX: usize = 1;
/// Largest data payload we take in one guest packet (Linux sends ≤ 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;

/// Event-loop tokens; host streams use `STREAM_TOKEN + fd`.
const LISTENER_TOKEN: u32 = 3;
const STREAM_TOKEN: u32 = 4;

pub struct Vsock {
    mem: GuestMemory,
    queue_events: [EventFd; 3],
    /// Set once the driver is ready.
    active: Option<Active>,
    muxer: muxer::Muxer,
    /// The hybrid vsock socket host programs connect to.
    listener: Option<UnixListener>,
}

struct Active {
    queues: Vec<Queue>,
    irq: Arc<IrqStatus>,
}

impl Vsock {
    /// A device for a guest with address `guest_cid`. `listener`, if any, is
    /// the hybrid vsock socket (already bound).
    pub fn new(
        mem: GuestMemory,
        guest_cid: u64,
        host: HostPorts,
        listener: Option<UnixListener>,
    ) -> std::io::Result<Self> {
        if let Some(l) = &listener {
            l.set_nonblocking(true)?;
        }
        let event = || EventFd::new(EFD_NONBLOCK);
        Ok(Self {
            mem,
            queue_events: [event()?, event()?, event()?],
            active: None,
            muxer: muxer::Muxer::new(guest_cid, host),
            listener,
        })
    }

    fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// Hands every packet the guest queued for transmission to the muxer.
    fn process_tx(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let queue = &mut active.queues[TX];
        let mut used = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(&self.mem) {
            match VsockPacket::from_tx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.muxer.handle_guest_packet(&pkt),
                Err(e) => tracing::debug!("vsock: dropping malformed guest packet: {e}"),
            }
            if let Err(e) = queue.add_used(&self.mem, chain.head_index(), 0) {
                tracing::warn!("vsock: tx used ring: {e}");
            }
            used = true;
        }
        if used {
            active.irq.signal_used_queue();
        }
    }

    /// Fills guest receive buffers while there is something to send.
    fn process_rx(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let queue = &mut active.queues[RX];
        let mut used = false;
        while self.muxer.has_packet_for_guest() {
            let Some(mut chain) = queue.pop_descriptor_chain(&self.mem) else {
                break; // no buffers: the guest notifies the RX queue when it adds some
            };
            let len = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_packet(&mut pkt) {
                    Some(len) => len,
                    None => {
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::debug!("vsock: unusable guest receive buffer: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(&self.mem, chain.head_index(), len) {
                tracing::warn!("vsock: rx used ring: {e}");
            }
            used = true;
        }
        if used {
            active.irq.signal_used_queue();
        }
    }

    /// Starts or stops watching the host streams the muxer opened or closed.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let regs = &mut self.muxer.registrations;
        for stream in regs.removed.drain(..) {
            let _ = ops.remove(Events::empty(&stream));
        }
        for fd in regs.added.drain(..) {
            let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
            let events = Events::with_data_raw(fd, STREAM_TOKEN + fd as u32, set);
            if let Err(e) = ops.add(events) {
                tracing::warn!("vsock: watching a host stream: {e}");
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        0 // stream sockets only, no seqpacket
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration space is the 64-bit guest CID.
        let config = self.guest_cid().to_le_bytes();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(data.len()).min(config.len());
        data.fill(0);
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn activate(&mut self, queues: Vec<Queue>, irq: Arc<IrqStatus>) -> Result<(), ActivateError> {
        if let Some(bad) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::BadQueue(bad));
        }
        self.active = Some(Active { queues, irq });
        // Anything the guest queued before we were watching.
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.clear();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (token, event) in (0u32..).zip(&self.queue_events) {
            if let Err(e) = ops.add(Events::with_data(event, token, EventSet::IN)) {
                tracing::error!("vsock: watching queue {token}: {e}");
            }
        }
        if let Some(listener) = &self.listener {
            let events = Events::with_data(listener, LISTENER_TOKEN, EventSet::IN);
            if let Err(e) = ops.add(events) {
                tracing::error!("vsock: watching the hybrid socket: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        match events.data() {
            token if (token as usize) < self.queue_events.len() => {
                let _ = self.queue_events[token as usize].read();
                if token as usize == TX {
                    self.process_tx();
                }
                // RX: the guest added receive buffers, used below.
            }
            LISTENER_TOKEN => {
                if let Some(listener) = &self.listener {
                    self.muxer.accept_host_clients(listener);
                }
            }
            token => {
                let fd = (token - STREAM_TOKEN) as i32;
                let readable = set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
                self.muxer
                    .host_ready(fd, readable, set.contains(EventSet::OUT));
            }
        }
        self.process_rx();
        self.sync_registrations(ops);
    }
}
