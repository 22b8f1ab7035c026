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
use std::io::{Read, Write};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::{
    drain_queue, ActivateError, GuestMemory, IrqStatus, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};
pub use host::{HostPorts, PortsHandle};
pub use muxer::{HOST_CID, MAX_CONNECTIONS};

pub const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

const QUEUE_SIZE: u16 = 256;
// Queue indices.
const RX: usize = 0;
const TX: usize = 1;
/// Where the device's one event goes, after a restore.
const EVENTS: usize = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2, 5.10.6.7): the guest
/// drops every connection and reads its CID again.
const TRANSPORT_RESET: u32 = 0;
/// Largest data payload we take in one guest packet (Linux sends ≤ 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;

/// Event-loop tokens; host streams use `STREAM_TOKEN + fd`.
const LISTENER_TOKEN: u32 = 3;
const TIMER_TOKEN: u32 = 4;
const STREAM_TOKEN: u32 = 5;

pub struct Vsock {
    mem: GuestMemory,
    queue_events: [EventFd; 3],
    /// Set once the driver is ready.
    active: Option<Active>,
    muxer: muxer::Muxer,
    /// The hybrid vsock socket host programs connect to.
    listener: Option<UnixListener>,
    /// Where scattered guest packets are gathered.
    tx_buf: Vec<u8>,
    /// Fires at the muxer's next connection deadline.
    timer: TimerFd,
    /// The deadline `timer` is set for.
    armed: Option<std::time::Instant>,
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
            tx_buf: Vec::new(),
            timer: TimerFd::new()?,
            armed: None,
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
        let (mem, muxer, buf) = (&self.mem, &mut self.muxer, &mut self.tx_buf);
        drain_queue(&mut active.queues[TX], mem, &active.irq, |chain| {
            handle_tx_chain(mem, muxer, buf, chain);
            0
        });
    }

    /// Fills guest receive buffers while there is something to send.
    fn process_rx(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let queue = &mut active.queues[RX];
        let mut used = false;
        let mut asked_for_kick = false;
        while self.muxer.has_packet_for_guest() {
            let Some(mut chain) = queue.pop_descriptor_chain(&self.mem) else {
                // Out of buffers: ask for a kick when the guest adds some,
                // and look once more for any that raced in (only once: a
                // bogus available index would claim buffers forever).
                match !asked_for_kick && queue.enable_notification(&self.mem).unwrap_or(false) {
                    true => {
                        asked_for_kick = true;
                        continue;
                    }
                    false => break,
                }
            };
            let len = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_packet(&mut pkt) {
                    muxer::Fill::Packet(len) => len,
                    muxer::Fill::NoRoom => 0,
                    muxer::Fill::Nothing => {
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
            active.irq.signal_used(queue, &self.mem);
        }
    }

    /// Sets the timer for the muxer's next deadline, if that changed.
    fn arm_timer(&mut self) {
        let next = self.muxer.next_deadline();
        if next == self.armed {
            return;
        }
        let result = match next {
            // A zero duration would disarm the timer: fire in 1 ns instead.
            Some(at) => {
                let left = at.saturating_duration_since(std::time::Instant::now());
                self.timer
                    .reset(left.max(std::time::Duration::from_nanos(1)), None)
            }
            None => self.timer.clear(),
        };
        match result {
            Ok(()) => self.armed = next,
            Err(e) => tracing::warn!("vsock: connection timer: {e}"),
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

/// One chain from the transmit queue: straight from guest memory when it has
/// the usual shape, gathered into `buf` when its data is scattered.
fn handle_tx_chain(
    mem: &GuestMemory,
    muxer: &mut muxer::Muxer,
    buf: &mut Vec<u8>,
    chain: DescriptorChain<&GuestMemory>,
) {
    let mut direct = chain.clone();
    if let Ok(pkt) = VsockPacket::from_tx_virtq_chain(mem, &mut direct, MAX_PKT_DATA) {
        return muxer.handle_guest_packet(&pkt);
    }
    // Not the usual shape (data spread over several descriptors): gather it.
    let gathered = gather(mem, chain, buf).and_then(|mut gathered| {
        let pkt = gathered.packet().map_err(std::io::Error::other)?;
        muxer.handle_guest_packet(&pkt);
        Ok(())
    });
    if let Err(e) = gathered {
        tracing::debug!("vsock: dropping malformed guest packet: {e}");
    }
}

/// A guest packet copied out of a descriptor chain of any shape.
struct Gathered<'b> {
    header: [u8; PKT_HEADER_SIZE],
    data: &'b mut [u8],
}

/// Copies the readable part of `chain` into `buf`: header, then data.
fn gather<'b>(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    buf: &'b mut Vec<u8>,
) -> std::io::Result<Gathered<'b>> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut reader = chain.reader(mem).map_err(|e| invalid(&e.to_string()))?;
    let mut header = [0u8; PKT_HEADER_SIZE];
    reader.read_exact(&mut header)?;
    let len = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
    if len > MAX_PKT_DATA || len as usize > reader.available_bytes() {
        return Err(invalid("data length beyond the descriptors or the limit"));
    }
    buf.resize(len as usize, 0);
    reader.read_exact(buf)?;
    Ok(Gathered { header, data: buf })
}

impl Gathered<'_> {
    fn packet(&mut self) -> Result<VsockPacket<'_, ()>, virtio_vsock::packet::Error> {
        let raw = self.header;
        let data = (!self.data.is_empty()).then_some(&mut *self.data);
        // SAFETY: the packet borrows `self` mutably, so the header and data
        // it points at outlive it and nothing else touches them meanwhile.
        let mut pkt = unsafe { VsockPacket::new(&mut self.header, data)? };
        pkt.set_header_from_raw(&raw)?;
        Ok(pkt)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX // stream sockets only, no seqpacket
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Served on the event thread, which owns the host sockets' registrations.
    fn queue_notified(&mut self, queue: usize) {
        if let Err(e) = self.queue_events[queue].write(1) {
            tracing::warn!("vsock: queue {queue} notify: {e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration space is the 64-bit guest CID.
        super::read_config_bytes(&self.guest_cid().to_le_bytes(), offset, data);
    }

    fn activate(&mut self, queues: Vec<Queue>, irq: Arc<IrqStatus>) -> Result<(), ActivateError> {
        if let Some(bad) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::BadQueue(bad));
        }
        self.active = Some(Active { queues, irq });
        // Anything the guest queued before we were watching is served on
        // the event thread: activation runs on a vCPU thread, whose seccomp
        // filter allows no socket I/O.
        self.queue_notified(TX);
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|active| active.queues.iter().map(Queue::state))
            .collect()
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.clear();
    }

    /// The guest's connections were with the saved VM's host side: it is
    /// told to drop them, as Firecracker does, and its programs reconnect.
    /// What it queued for them before the snapshot is dropped unread:
    /// answered, each packet would earn a reset that could reach the guest
    /// before the event and end a reconnection too.
    fn restored(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        drain_queue(&mut active.queues[TX], &self.mem, &active.irq, |_| 0);
        let queue = &mut active.queues[EVENTS];
        let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
            return tracing::warn!("vsock: no event buffer for the transport reset");
        };
        let head = chain.head_index();
        let event = TRANSPORT_RESET.to_le_bytes();
        let written = chain
            .writer(&self.mem)
            .map_err(std::io::Error::other)
            .and_then(|mut writer| writer.write_all(&event));
        let len = match written {
            Ok(()) => event.len() as u32,
            Err(e) => {
                tracing::warn!("vsock: unusable event buffer: {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(&self.mem, head, len) {
            tracing::warn!("vsock: event used ring: {e}");
        }
        active.irq.signal_used(queue, &self.mem);
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
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_TOKEN, EventSet::IN)) {
            tracing::error!("vsock: watching the connection timer: {e}");
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
            TIMER_TOKEN => {
                // Disarming also clears the expiry count (a read could
                // block if the timer was set again since it fired).
                if let Err(e) = self.timer.clear() {
                    tracing::warn!("vsock: connection timer: {e}");
                }
                self.armed = None;
                self.muxer.expire(std::time::Instant::now());
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
        self.arm_timer();
    }
}
