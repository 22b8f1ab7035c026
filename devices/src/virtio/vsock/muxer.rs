//! The connection table: turns guest packets into host stream I/O and host
//! stream readiness into packets for the guest. No virtqueues here, so every
//! rule is testable with plain memory.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

use super::connection::{Connection, State, BUF_ALLOC, PATIENCE};
use super::host::{Handshake, HostPorts};

pub const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2, 5.10.6).
mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
const SHUTDOWN_RECV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// Connections (and hybrid handshakes) open at once; more are refused, so a
/// guest cannot make the VMM hold unbounded sockets and buffers.
pub const MAX_CONNECTIONS: usize = 256;
/// Header-only packets waiting for guest receive buffers. A guest that
/// posts none can earn replies without end (a reset per stray packet, a
/// response per connect-and-reset): past this they are dropped, and no
/// connection is taken that could not be answered.
pub(super) const MAX_BACKLOG: usize = 4 * MAX_CONNECTIONS;
/// Host-initiated connections use local ports from here up.
const FIRST_HOST_PORT: u32 = 1 << 30;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    /// The host port.
    local: u32,
    /// The guest port.
    peer: u32,
}

/// A header-only packet for the guest.
#[derive(Clone, Copy, Debug)]
struct Reply {
    key: Key,
    op: u16,
    flags: u32,
}

/// What [`Muxer::fill_packet`] did with a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// A packet of this many bytes is in it.
    Packet(u32),
    /// Nothing to send now: the buffer stays the guest's.
    Nothing,
    /// Only data waits, and the buffer has no room for any: it goes back
    /// empty rather than being offered again and again.
    NoRoom,
}

/// Host streams the event loop must start or stop watching.
#[derive(Default)]
pub struct Registrations {
    pub added: Vec<RawFd>,
    pub removed: Vec<UnixStream>,
}

pub struct Muxer {
    guest_cid: u64,
    host: HostPorts,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    backlog: VecDeque<Reply>,
    next_host_port: u32,
    pub registrations: Registrations,
}

impl Muxer {
    pub fn new(guest_cid: u64, host: HostPorts) -> Self {
        Self {
            guest_cid,
            host,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            backlog: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            registrations: Registrations::default(),
        }
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    #[cfg(test)]
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// The host stream of the connection from guest port `peer`.
    #[cfg(test)]
    pub fn host_fd(&self, peer: u32) -> Option<RawFd> {
        let (_, conn) = self.conns.iter().find(|(k, _)| k.peer == peer)?;
        Some(conn.stream.as_raw_fd())
    }

    /// Drops every connection (device reset).
    pub fn clear(&mut self) {
        let streams = self.conns.drain().map(|(_, c)| c.stream);
        let handshakes = self.handshakes.drain().map(|(_, h)| h.stream);
        self.registrations.removed.extend(streams.chain(handshakes));
        self.registrations.added.clear();
        self.by_fd.clear();
        self.backlog.clear();
    }

    /// One packet from the guest's transmit queue.
    pub fn handle_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
        let key = Key {
            local: pkt.dst_port(),
            peer: pkt.src_port(),
        };
        if pkt.src_cid() != self.guest_cid || pkt.dst_cid() != HOST_CID {
            tracing::debug!(src = pkt.src_cid(), dst = pkt.dst_cid(), "vsock: bad CID");
            return;
        }
        if pkt.type_() != TYPE_STREAM {
            return self.reply_rst_unless_rst(key, pkt.op());
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return match pkt.op() {
                op::REQUEST => self.accept_guest(key, pkt),
                op => self.reply_rst_unless_rst(key, op),
            };
        };
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        let result = match (pkt.op(), conn.state) {
            (op::RESPONSE, State::HostConnecting) => {
                conn.establish();
                use std::io::Write;
                (&conn.stream).write_all(format!("OK {}\n", key.local).as_bytes())
            }
            (op::RW, State::Established) => match pkt.data_slice() {
                Some(data) => conn.write_from_guest(data),
                None => Ok(()),
            },
            (op::CREDIT_UPDATE, _) => Ok(()),
            (op::CREDIT_REQUEST, _) => {
                // One update in flight answers any number of requests.
                if !conn.credit_update_queued {
                    self.queue_credit_update(key);
                }
                Ok(())
            }
            (op::SHUTDOWN, _) => {
                let flags = pkt.flags();
                conn.guest_shut_down(flags & SHUTDOWN_SEND != 0, flags & SHUTDOWN_RECV != 0);
                conn.flush()
            }
            (op::RST, _) => {
                conn.reset = true;
                conn.flush()
            }
            (op, state) => Err(io::Error::other(format!("op {op} in state {state:?}"))),
        };
        match result {
            Ok(()) => self.settle(key),
            Err(e) => {
                tracing::debug!(?key, "vsock: resetting connection: {e}");
                self.kill(key);
            }
        }
    }

    /// Whether [`fill_packet`](Self::fill_packet) has something to send.
    pub fn has_packet_for_guest(&self) -> bool {
        !self.backlog.is_empty() || self.conns.values().any(Connection::can_send_to_guest)
    }

    /// Writes the next packet for the guest into an empty receive buffer.
    pub fn fill_packet(&mut self, pkt: &mut VsockPacket<'_, ()>) -> Fill {
        if let Some(reply) = self.backlog.pop_front() {
            self.write_header(pkt, reply.key, reply.op, reply.flags, 0);
            return Fill::Packet(PKT_HEADER_SIZE as u32);
        }
        let Some(&data) = pkt.data_slice() else {
            return match self.has_packet_for_guest() {
                true => Fill::NoRoom,
                false => Fill::Nothing,
            };
        };
        let ready: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.can_send_to_guest())
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            match conn.read_for_guest(&data) {
                Ok(0) => {
                    conn.host_eof = true;
                    self.write_header(pkt, key, op::SHUTDOWN, SHUTDOWN_SEND, 0);
                    self.settle(key);
                    return Fill::Packet(PKT_HEADER_SIZE as u32);
                }
                Ok(n) => {
                    self.write_header(pkt, key, op::RW, 0, n as u32);
                    return Fill::Packet((PKT_HEADER_SIZE + n) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(?key, "vsock: host read: {e}");
                    self.kill(key);
                    return self.fill_packet(pkt);
                }
            }
        }
        Fill::Nothing
    }

    /// Resets every connection whose deadline has passed by `now`.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!(?key, "vsock: connection expired");
            self.kill(key);
        }
    }

    /// The earliest connection deadline, for the event loop's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter_map(|c| c.deadline).min()
    }

    /// The host stream `fd` became readable and/or writable.
    pub fn host_ready(&mut self, fd: RawFd, readable: bool, writable: bool) {
        if self.handshakes.contains_key(&fd) {
            return self.advance_handshake(fd);
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.readable |= readable;
        if writable {
            if let Err(e) = conn.flush() {
                tracing::debug!(?key, "vsock: host write: {e}");
                return self.kill(key);
            }
        }
        self.settle(key);
    }

    /// Takes every waiting client of the hybrid vsock socket.
    pub fn accept_host_clients(&mut self, listener: &UnixListener) {
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return tracing::warn!("vsock: accept on the hybrid socket: {e}"),
            };
            let full = self.connection_count() >= MAX_CONNECTIONS || self.backlog_full();
            if full || stream.set_nonblocking(true).is_err() {
                continue; // dropping the stream refuses the client
            }
            let fd = stream.as_raw_fd();
            self.handshakes.insert(fd, Handshake::new(stream));
            self.registrations.added.push(fd);
        }
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match handshake.advance() {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(e) => {
                tracing::debug!("vsock: hybrid client: {e}");
                let gone = self.handshakes.remove(&fd).map(|h| h.stream);
                self.registrations.added.retain(|&added| added != fd);
                return self.registrations.removed.extend(gone);
            }
        };
        let Some(Handshake { stream, .. }) = self.handshakes.remove(&fd) else {
            return;
        };
        let key = self.free_host_key(port);
        self.conns
            .insert(key, Connection::new(stream, State::HostConnecting));
        self.by_fd.insert(fd, key);
        self.reply(key, op::REQUEST, 0);
    }

    /// A key for a new host-initiated connection to guest `port`, with a
    /// local port no connection uses (the table is bounded, so one is found).
    fn free_host_key(&mut self, port: u32) -> Key {
        loop {
            let key = Key {
                local: self.next_host_port,
                peer: port,
            };
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.contains_key(&key) {
                return key;
            }
        }
    }

    fn accept_guest(&mut self, key: Key, pkt: &VsockPacket<'_, ()>) {
        if self.backlog_full() {
            // Neither a response nor a reset could be queued.
            return tracing::debug!(?key, "vsock: guest connection dropped: backlog full");
        }
        if self.connection_count() >= MAX_CONNECTIONS {
            tracing::debug!(?key, "vsock: too many connections");
            self.reply(key, op::RST, 0);
            return;
        }
        let stream = self
            .host
            .connect(key.local)
            .and_then(|s| s.set_nonblocking(true).map(|()| s));
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(?key, "vsock: guest connection refused: {e}");
                self.reply(key, op::RST, 0);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        let mut conn = Connection::new(stream, State::Established);
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        self.conns.insert(key, conn);
        self.by_fd.insert(fd, key);
        self.registrations.added.push(fd);
        self.reply(key, op::RESPONSE, 0);
    }

    /// After any change to a connection: close it if both sides are done,
    /// give a closing one a deadline for the host to take the rest, tell the
    /// guest about freed buffer space if it may be waiting.
    fn settle(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.finished() {
            return self.kill(key);
        }
        if conn.closing() && conn.deadline.is_none() {
            conn.deadline = Some(Instant::now() + PATIENCE);
        }
        if conn.credit_update_due() {
            self.queue_credit_update(key);
        }
    }

    fn queue_credit_update(&mut self, key: Key) {
        let queued = self.reply(key, op::CREDIT_UPDATE, 0);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.credit_update_queued = queued;
        }
    }

    /// Closes a connection; the guest gets a reset unless it sent one.
    fn kill(&mut self, key: Key) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        self.by_fd.remove(&fd);
        self.registrations.added.retain(|&added| added != fd);
        if !conn.reset {
            self.reply(key, op::RST, 0);
        }
        self.registrations.removed.push(conn.stream);
    }

    fn reply_rst_unless_rst(&mut self, key: Key, op: u16) {
        if op != op::RST {
            self.reply(key, op::RST, 0);
        }
    }

    /// Queues a header-only packet, unless the backlog is full; says which.
    fn reply(&mut self, key: Key, op: u16, flags: u32) -> bool {
        let room = !self.backlog_full();
        if room {
            self.backlog.push_back(Reply { key, op, flags });
        }
        room
    }

    fn backlog_full(&self) -> bool {
        self.backlog.len() >= MAX_BACKLOG
    }

    fn write_header(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        key: Key,
        op: u16,
        flags: u32,
        len: u32,
    ) {
        let fwd_cnt = self.conns.get_mut(&key).map_or(0, Connection::take_fwd_cnt);
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(key.local)
            .set_dst_port(key.peer)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(BUF_ALLOC)
            .set_fwd_cnt(fwd_cnt);
    }
}
