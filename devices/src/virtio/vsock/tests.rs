//! The vsock device driven through real virtqueues in plain memory, the way
//! a guest driver (or a hostile one) would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::{Desc, Ring, QUEUE_LEN};
use crate::CountingInterrupt;

const GUEST_CID: u64 = 3;
const SERVED_PORT: u32 = 1024;
/// Further served ports, for tests that open many connections (a served
/// port takes one).
const MANY_PORTS: std::ops::Range<u32> = 20_000..20_300;
const HEADER_AREA: u64 = 0x10_0000;
const DATA_AREA: u64 = 0x40_0000;
const RX_AREA: u64 = 0x80_0000;
const RX_BUF: u32 = 4096;

/// A header the guest sends, in wire order (virtio 1.2, 5.10.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn guest(op: u16, guest_port: u32, host_port: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            type_: 1,
            op,
            buf_alloc: 64 * 1024,
            ..Self::default()
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(44);
        b.extend_from_slice(&self.src_cid.to_le_bytes());
        b.extend_from_slice(&self.dst_cid.to_le_bytes());
        b.extend_from_slice(&self.src_port.to_le_bytes());
        b.extend_from_slice(&self.dst_port.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.type_.to_le_bytes());
        b.extend_from_slice(&self.op.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.buf_alloc.to_le_bytes());
        b.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Self {
            src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

const REQUEST: u16 = 1;
const RESPONSE: u16 = 2;
const RST: u16 = 3;
const SHUTDOWN: u16 = 4;
const RW: u16 = 5;

/// A guest driver in miniature: queues in plain memory, one vsock device.
struct Guest {
    mem: &'static GuestMemory,
    rx: Ring,
    tx: Ring,
    events: Ring,
    vsock: Vsock,
    irq: Arc<CountingInterrupt>,
    served: Receiver<UnixStream>,
}

impl Guest {
    fn new() -> Self {
        let mem: &'static GuestMemory = Box::leak(Box::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
        ));
        let (rx, tx, events) = (Ring::new(0), Ring::new(0x2_0000), Ring::new(0x4_0000));
        let (served_tx, served) = mpsc::channel();
        let ports = HostPorts::new(None);
        for port in MANY_PORTS.chain([SERVED_PORT]) {
            ports.serve(port, served_tx.clone());
        }
        let mut vsock = Vsock::new(mem.clone(), GUEST_CID, ports, None).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let queues = vec![rx.queue(), tx.queue(), events.queue()];
        vsock
            .activate(queues, Arc::new(IrqStatus::new(irq.clone())))
            .unwrap();
        Self {
            mem,
            rx,
            tx,
            events,
            vsock,
            irq,
            served,
        }
    }

    /// Sends one well-formed packet and lets the device process it.
    fn send(&mut self, hdr: Hdr, data: &[u8]) {
        let slot = u64::from(self.tx.next_desc);
        let hdr_addr = HEADER_AREA + slot * 64;
        let hdr = Hdr {
            len: data.len() as u32,
            ..hdr
        };
        self.mem
            .write_slice(&hdr.bytes(), GuestAddress(hdr_addr))
            .unwrap();
        if data.is_empty() {
            self.tx.add_chain(self.mem, &[(hdr_addr, 44, 0)]);
        } else {
            let data_addr = DATA_AREA + slot * 0x1000;
            self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
            self.tx.add_chain(
                self.mem,
                &[(hdr_addr, 44, 0), (data_addr, data.len() as u32, 0)],
            );
        }
        self.vsock.process_tx();
        self.vsock.process_rx();
    }

    /// Offers `count` receive buffers and returns the packets the device
    /// put in any buffer.
    fn receive(&mut self, count: u16) -> Vec<(Hdr, Vec<u8>)> {
        for _ in 0..count {
            let addr = RX_AREA + u64::from(self.rx.next_desc) * u64::from(RX_BUF);
            self.rx
                .add_chain(self.mem, &[(addr, RX_BUF, VRING_DESC_F_WRITE as u16)]);
        }
        self.vsock.process_rx();
        let mut packets = Vec::new();
        for (id, len) in self.rx.take_used(self.mem) {
            let mut buf = vec![0u8; len as usize];
            let addr = RX_AREA + u64::from(id) * u64::from(RX_BUF);
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            if buf.len() >= 44 {
                packets.push((Hdr::parse(&buf[..44]), buf[44..].to_vec()));
            }
        }
        packets
    }

    fn tx_used(&self) -> u16 {
        self.tx.used_idx(self.mem)
    }

    /// Connects guest port `guest_port` to the served host port.
    fn connect(&mut self, guest_port: u32) -> UnixStream {
        self.send(Hdr::guest(REQUEST, guest_port, SERVED_PORT), &[]);
        let reply = self.receive(1);
        assert_eq!(reply[0].0.op, RESPONSE, "{reply:?}");
        self.served.try_recv().expect("host end of the connection")
    }
}

fn ops(packets: &[(Hdr, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn data_flows_both_ways_on_a_served_port() {
    let mut guest = Guest::new();
    let mut host = guest.connect(5000);
    guest.send(Hdr::guest(RW, 5000, SERVED_PORT), b"hello");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    host.write_all(b"world").unwrap();
    let fd = guest.vsock.muxer.host_fd(5000).unwrap();
    guest.vsock.muxer.host_ready(fd, true, false);
    let packets = guest.receive(4);
    assert_eq!(ops(&packets), [RW]);
    let (hdr, data) = &packets[0];
    assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((hdr.src_port, hdr.dst_port), (SERVED_PORT, 5000));
    assert_eq!(data.as_slice(), b"world");
    assert!(guest.irq.count() > 0);

    // The guest closes: the host sees end of file, the guest gets its RST.
    let close = Hdr {
        flags: 3,
        ..Hdr::guest(SHUTDOWN, 5000, SERVED_PORT)
    };
    guest.send(close, &[]);
    assert_eq!(ops(&guest.receive(2)), [RST]);
    assert_eq!(host.read(&mut got).unwrap(), 0);
    assert_eq!(guest.vsock.muxer.connection_count(), 0);
}

#[test]
fn host_end_of_file_reaches_the_guest_as_shutdown() {
    let mut guest = Guest::new();
    let host = guest.connect(5001);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let fd = guest.vsock.muxer.host_fd(5001).unwrap();
    guest.vsock.muxer.host_ready(fd, true, false);
    let packets = guest.receive(2);
    assert_eq!(ops(&packets), [SHUTDOWN]);
    assert_eq!(packets[0].0.flags, 2, "host will send no more");
}

#[test]
fn unknown_ports_and_strangers_get_resets() {
    let mut guest = Guest::new();
    guest.send(Hdr::guest(REQUEST, 5000, 9999), &[]);
    guest.send(Hdr::guest(RW, 5001, SERVED_PORT), b"no connection");
    let datagram = Hdr {
        type_: 2,
        ..Hdr::guest(REQUEST, 5002, SERVED_PORT)
    };
    guest.send(datagram, &[]);
    // A packet claiming another source CID is not answered at all.
    let spoofed = Hdr {
        src_cid: 77,
        ..Hdr::guest(REQUEST, 5003, SERVED_PORT)
    };
    guest.send(spoofed, &[]);
    let packets = guest.receive(8);
    assert_eq!(ops(&packets), [RST, RST, RST]);
    assert_eq!(guest.tx_used(), 4, "every packet is given back");
}

#[test]
fn malformed_chains_are_returned_without_harm() {
    let mut guest = Guest::new();
    let good = Hdr::guest(REQUEST, 5000, SERVED_PORT).bytes();
    guest
        .mem
        .write_slice(&good, GuestAddress(HEADER_AREA))
        .unwrap();
    let rw = Hdr {
        len: 0x10_0000,
        ..Hdr::guest(RW, 5000, SERVED_PORT)
    };
    guest
        .mem
        .write_slice(&rw.bytes(), GuestAddress(HEADER_AREA + 64))
        .unwrap();
    let write_only = VRING_DESC_F_WRITE as u16;
    let bad_chains: [&[Desc]; 6] = [
        &[(HEADER_AREA, 44, write_only)], // a header the device may not read
        &[(HEADER_AREA, 10, 0)],          // a header too short
        &[(0xffff_ffff_0000, 44, 0)],     // a header outside guest memory
        &[(16 << 20, 44, 0)],             // a header just past the end of memory
        &[(HEADER_AREA + 64, 44, 0)],     // a data length but no data descriptor
        &[(HEADER_AREA + 64, 44, 0), (DATA_AREA, 16, 0)], // data past the buffer
    ];
    for chain in bad_chains {
        guest.tx.add_chain(guest.mem, chain);
    }
    // A descriptor that points at itself: a loop the queue must cut.
    let looped = guest.tx.next_desc;
    let desc = (HEADER_AREA, 44, VRING_DESC_F_NEXT as u16);
    guest.tx.write_desc(guest.mem, looped, desc, looped);
    guest.tx.publish(guest.mem, looped);
    guest.tx.next_desc += 1;
    guest.vsock.process_tx();
    assert_eq!(guest.tx_used(), 7);

    // Receive buffers the device cannot use are given back empty.
    for desc in [
        (RX_AREA, RX_BUF, 0),                   // read-only
        (RX_AREA, 8, write_only),               // too small for a header
        (0xffff_0000_0000, RX_BUF, write_only), // not guest memory
    ] {
        guest.rx.add_chain(guest.mem, &[desc]);
    }
    guest.send(Hdr::guest(REQUEST, 6000, 9999), &[]); // something to send: a RST
    assert_eq!(
        guest.rx.used_idx(guest.mem),
        3,
        "bad receive buffers are returned"
    );
    // The looped chain's head was a good REQUEST; the replies waited for
    // good buffers.
    assert_eq!(ops(&guest.receive(2)), [RESPONSE, RST]);
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    raise_fd_limit(); // each connection holds two descriptors in this process
    let mut guest = Guest::new();
    let extra = 10;
    let total = (MAX_CONNECTIONS + extra) as u32;
    let mut hosts = Vec::new();
    for (i, host_port) in (0..total).zip(MANY_PORTS) {
        guest.send(Hdr::guest(REQUEST, 10_000 + i, host_port), &[]);
        hosts.extend(guest.served.try_recv());
    }
    let packets = guest.receive(total as u16);
    let responses = packets.iter().filter(|(h, _)| h.op == RESPONSE).count();
    let resets = packets.iter().filter(|(h, _)| h.op == RST).count();
    assert_eq!((responses, resets), (MAX_CONNECTIONS, extra));
    assert_eq!(hosts.len(), MAX_CONNECTIONS);
    assert_eq!(guest.vsock.muxer.connection_count(), MAX_CONNECTIONS);
}

#[test]
fn replies_waiting_for_buffers_are_bounded() {
    let mut guest = Guest::new();
    // No receive buffers at all, and a flood of packets that each earn a RST.
    for round in 0..20u32 {
        for port in 0..u32::from(QUEUE_LEN) {
            guest.send(Hdr::guest(RW, round * 1000 + port, SERVED_PORT), &[]);
        }
    }
    assert!(guest.vsock.muxer.backlog_len() <= 4 * MAX_CONNECTIONS);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mut guest = Guest::new();
    let host = guest.connect(5000);
    let chunk = vec![7u8; 4096];
    // The host never reads; the guest ignores the 256 KiB it was given.
    let mut reset = false;
    for _ in 0..200 {
        guest.send(Hdr::guest(RW, 5000, SERVED_PORT), &chunk);
        if guest.vsock.muxer.connection_count() == 0 {
            reset = true;
            break;
        }
    }
    assert!(reset, "connection survived a credit overrun");
    assert_eq!(ops(&guest.receive(QUEUE_LEN / 2)).last(), Some(&RST));
    drop(host);
}

#[test]
fn config_space_is_the_guest_cid() {
    let guest = Guest::new();
    let mut cid = [0u8; 8];
    guest.vsock.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut past_end = [0xffu8; 4];
    guest.vsock.read_config(6, &mut past_end);
    assert_eq!(past_end, [0, 0, 0, 0]);
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

// Linux sends large writes with the data in several descriptors; the crate's
// packet parser only takes one, so these were once dropped (and the stream
// stalled).
#[test]
fn data_scattered_over_descriptors_is_gathered() {
    let mut guest = Guest::new();
    let mut host = guest.connect(5000);
    let hdr = Hdr {
        len: 9,
        ..Hdr::guest(RW, 5000, SERVED_PORT)
    };
    let slot = u64::from(guest.tx.next_desc);
    let hdr_addr = HEADER_AREA + slot * 64;
    guest
        .mem
        .write_slice(&hdr.bytes(), GuestAddress(hdr_addr))
        .unwrap();
    let parts: [&[u8]; 3] = [b"sca", b"tte", b"red"];
    let mut chain = vec![(hdr_addr, 44, 0)];
    for (i, part) in parts.iter().enumerate() {
        let addr = DATA_AREA + (slot + i as u64) * 0x1000;
        guest.mem.write_slice(part, GuestAddress(addr)).unwrap();
        chain.push((addr, part.len() as u32, 0));
    }
    guest.tx.add_chain(guest.mem, &chain);
    guest.vsock.process_tx();
    let mut got = [0u8; 9];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"scattered");
}

// A guest that claims more available chains than the ring holds made the
// queue loops spin forever (the queue refuses to pop, but reports work).
#[test]
fn a_bogus_available_index_does_not_hang_the_device() {
    let mut guest = Guest::new();
    guest.tx.claim_available(guest.mem, 1000);
    guest.vsock.process_tx();
    guest.rx.claim_available(guest.mem, 1000);
    guest.send(Hdr::guest(REQUEST, 5000, 9999), &[]); // a RST to deliver
    guest.vsock.process_rx();
}

const CREDIT_REQUEST: u16 = 7;
const CREDIT_UPDATE: u16 = 6;

/// Sends stray packets (each earns a reset) until the reply backlog is full.
fn fill_backlog(guest: &mut Guest) {
    for port in 0..muxer::MAX_BACKLOG as u32 + 10 {
        guest.send(Hdr::guest(RW, 30_000 + port, SERVED_PORT), &[]);
    }
    assert_eq!(guest.vsock.muxer.backlog_len(), muxer::MAX_BACKLOG);
}

// Each CREDIT_REQUEST used to queue its own CREDIT_UPDATE: a guest that
// posted no receive buffers grew the backlog without bound.
#[test]
fn credit_requests_earn_one_update_at_a_time() {
    let mut guest = Guest::new();
    let _host = guest.connect(5000);
    for _ in 0..2000 {
        guest.send(Hdr::guest(CREDIT_REQUEST, 5000, SERVED_PORT), &[]);
    }
    assert_eq!(guest.vsock.muxer.backlog_len(), 1);
    assert_eq!(ops(&guest.receive(4)), [CREDIT_UPDATE]);
    // Once delivered, the next request is answered again.
    guest.send(Hdr::guest(CREDIT_REQUEST, 5000, SERVED_PORT), &[]);
    assert_eq!(ops(&guest.receive(4)), [CREDIT_UPDATE]);
}

// A response per connect-and-reset was queued past the backlog's limit.
#[test]
fn a_full_backlog_takes_no_new_connection() {
    let mut guest = Guest::new();
    fill_backlog(&mut guest);
    guest.send(Hdr::guest(REQUEST, 5000, SERVED_PORT), &[]);
    assert_eq!(guest.vsock.muxer.backlog_len(), muxer::MAX_BACKLOG);
    assert_eq!(guest.vsock.muxer.connection_count(), 0);
    assert!(guest.served.try_recv().is_err(), "no host stream was made");
}

/// A host program's connection through the hybrid socket, up to the
/// device's request to the guest.
fn host_connects(guest: &mut Guest, guest_port: u32) -> UnixStream {
    let dir = std::env::temp_dir().join(format!("uvm-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("v{guest_port}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    guest.vsock.muxer.accept_host_clients(&listener);
    let fd = *guest.vsock.muxer.registrations.added.last().unwrap();
    guest.vsock.muxer.host_ready(fd, true, false);
    std::fs::remove_file(&path).unwrap();
    client
}

// A host-initiated connection the guest never answered held its slot in
// the connection table forever.
#[test]
fn an_unanswered_host_connection_expires() {
    let mut guest = Guest::new();
    let mut client = host_connects(&mut guest, 7000);
    assert_eq!(guest.vsock.muxer.connection_count(), 1);
    let deadline = guest.vsock.muxer.next_deadline().expect("a deadline");
    guest
        .vsock
        .muxer
        .expire(deadline - Duration::from_millis(1));
    assert_eq!(guest.vsock.muxer.connection_count(), 1, "not yet");
    guest.vsock.muxer.expire(deadline);
    assert_eq!(guest.vsock.muxer.connection_count(), 0);
    assert_eq!(ops(&guest.receive(4)), [REQUEST, RST]);
    // The event loop closes what the muxer let go.
    guest.vsock.muxer.registrations.removed.clear();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the client never got OK: {rest:?}");
}

#[test]
fn an_answered_host_connection_keeps_no_deadline() {
    let mut guest = Guest::new();
    let mut client = host_connects(&mut guest, 7001);
    let request = guest.receive(1);
    assert_eq!(ops(&request), [REQUEST]);
    let local = request[0].0.src_port;
    guest.send(Hdr::guest(RESPONSE, 7001, local), &[]);
    assert_eq!(guest.vsock.muxer.next_deadline(), None);
    let mut ok = [0u8; 3];
    client.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK ");
}

// A guest that closed with data the host never took kept its connection
// forever.
#[test]
fn a_closed_connection_with_unsent_data_expires() {
    let mut guest = Guest::new();
    let host = guest.connect(5000);
    let chunk = vec![1u8; 4096];
    // More than the host socket buffers, less than the credit (256 KiB).
    for _ in 0..60 {
        guest.send(Hdr::guest(RW, 5000, SERVED_PORT), &chunk);
    }
    let close = Hdr {
        flags: 3,
        ..Hdr::guest(SHUTDOWN, 5000, SERVED_PORT)
    };
    guest.send(close, &[]);
    assert_eq!(guest.vsock.muxer.connection_count(), 1, "data still waits");
    let deadline = guest.vsock.muxer.next_deadline().expect("a deadline");
    assert!(deadline <= std::time::Instant::now() + connection::PATIENCE);
    guest.vsock.muxer.expire(deadline);
    assert_eq!(guest.vsock.muxer.connection_count(), 0);
    assert_eq!(ops(&guest.receive(8)).last(), Some(&RST));
    drop(host);
}

// A receive chain whose data buffer is empty was put back and offered again
// on every event, and the data behind it never went out.
#[test]
fn a_receive_buffer_without_room_for_data_is_given_back() {
    let mut guest = Guest::new();
    let mut host = guest.connect(5000);
    host.write_all(b"data").unwrap();
    let fd = guest.vsock.muxer.host_fd(5000).unwrap();
    guest.vsock.muxer.host_ready(fd, true, false);
    let write = VRING_DESC_F_WRITE as u16;
    let empty = guest
        .rx
        .add_chain(guest.mem, &[(RX_AREA, 44, write), (RX_AREA + 64, 0, write)]);
    let packets = guest.receive(1);
    assert_eq!(ops(&packets), [RW]);
    assert_eq!(packets[0].1, b"data");
    assert!(
        guest.rx.used_idx(guest.mem) >= 2,
        "the empty chain {empty} was used too"
    );
}

#[test]
fn a_restored_device_tells_the_guest_its_connections_are_gone() {
    let mut guest = Guest::new();
    // A guest that posted no event buffer gets nothing, and no harm done.
    guest.vsock.restored();
    assert_eq!(guest.events.used_idx(guest.mem), 0);

    // A packet the saved guest queued for a connection the host no longer
    // has: taken, and not answered with a reset.
    let stale = Hdr::guest(RW, 5001, SERVED_PORT).bytes();
    guest
        .mem
        .write_slice(&stale, GuestAddress(HEADER_AREA))
        .unwrap();
    guest.tx.add_chain(guest.mem, &[(HEADER_AREA, 44, 0)]);
    let sent = guest.tx_used();

    let buffer = 0x9_0000;
    guest.mem.write_obj(u32::MAX, GuestAddress(buffer)).unwrap();
    guest
        .events
        .add_chain(guest.mem, &[(buffer, 8, VRING_DESC_F_WRITE as u16)]);
    let interrupts = guest.irq.count();
    guest.vsock.restored();
    assert_eq!(guest.events.take_used(guest.mem), vec![(0, 4)]);
    let event: u32 = guest.mem.read_obj(GuestAddress(buffer)).unwrap();
    assert_eq!(event, TRANSPORT_RESET);
    assert!(guest.irq.count() > interrupts, "no interrupt");
    assert_eq!(guest.tx_used(), sent.wrapping_add(1), "the stale packet");
    assert_eq!(ops(&guest.receive(4)), Vec::<u16>::new(), "a reply to it");
}
