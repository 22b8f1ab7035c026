//! One stream connection between a guest port and a host Unix stream, with
//! virtio-vsock's credit-based flow control (virtio 1.2, 5.10.6.3).

use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{ReadVolatile, VolatileSlice, WriteVolatile};

/// Bytes of guest data we buffer for each connection when the host side is
/// slow to read: the receive buffer we advertise to the guest.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// How long a connection may wait for the guest to answer a host request,
/// or for the host to take what a closing guest left (Firecracker's 2 s):
/// after that it is reset, so it stops counting against the table.
pub const PATIENCE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host side asked for the connection; waiting for the guest's answer.
    HostConnecting,
    Established,
}

/// What the guest told us about a connection it no longer uses fully.
#[derive(Clone, Copy, Debug, Default)]
struct GuestShutdown {
    send: bool,
    recv: bool,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Guest → host data the host stream has not taken yet.
    pending: Vec<u8>,
    /// Guest bytes handed to the host stream (our side of the guest's credit).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Host → guest bytes sent so far.
    rx_cnt: Wrapping<u32>,
    /// The host stream may have data (edge-triggered readiness).
    pub readable: bool,
    /// The host stream reached end of file and the guest was told.
    pub host_eof: bool,
    guest_shutdown: GuestShutdown,
    host_write_shut: bool,
    /// The guest reset the connection: nothing more goes to it.
    pub reset: bool,
    /// A credit update waits in the reply backlog.
    pub credit_update_queued: bool,
    /// When the connection is reset if it has not moved on by then.
    pub deadline: Option<Instant>,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State) -> Self {
        let deadline = (state == State::HostConnecting).then(|| Instant::now() + PATIENCE);
        Self {
            stream,
            state,
            pending: Vec::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            readable: true,
            host_eof: false,
            guest_shutdown: GuestShutdown::default(),
            host_write_shut: false,
            reset: false,
            credit_update_queued: false,
            deadline,
        }
    }

    /// The guest answered a host request.
    pub fn establish(&mut self) {
        self.state = State::Established;
        self.deadline = None;
    }

    /// Every guest packet carries its current credit.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The `fwd_cnt` to put in a packet to the guest; remembers it was sent.
    pub fn take_fwd_cnt(&mut self) -> u32 {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_queued = false;
        self.fwd_cnt.0
    }

    /// The guest may be waiting for credit: enough has drained since we last
    /// told it, and no update is on its way yet.
    pub fn credit_update_due(&self) -> bool {
        !self.credit_update_queued && (self.fwd_cnt - self.fwd_cnt_sent).0 >= BUF_ALLOC / 2
    }

    /// Host data can go to the guest now (given a receive buffer).
    pub fn can_send_to_guest(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.reset
            && !self.guest_shutdown.recv
            && self.peer_credit() > 0
    }

    /// Reads host data into `buf`, at most the guest's credit. `Ok(0)` is EOF.
    pub fn read_for_guest(&mut self, buf: &VolatileSlice) -> io::Result<usize> {
        let max = (self.peer_credit() as usize).min(buf.len());
        let mut window = buf.subslice(0, max).map_err(io::Error::other)?;
        match self.stream.read_volatile(&mut window) {
            Ok(n) => {
                self.rx_cnt += n as u32;
                Ok(n)
            }
            Err(vm_memory::VolatileMemoryError::IOError(e)) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.readable = false;
                }
                Err(e)
            }
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Takes guest data for the host stream. Fails if the guest overran the
    /// credit we gave it, or the host side is gone.
    pub fn write_from_guest(&mut self, data: &VolatileSlice) -> io::Result<()> {
        if self.guest_shutdown.send {
            return Err(io::Error::other("data after the guest shut down sending"));
        }
        // Checked first, so that an overrun delivers nothing at all.
        if self.pending.len() + data.len() > BUF_ALLOC as usize {
            return Err(io::Error::other("guest sent more than its credit"));
        }
        let mut written = 0;
        if self.pending.is_empty() {
            written = match (&self.stream).write_volatile(data) {
                Ok(n) => n,
                Err(vm_memory::VolatileMemoryError::IOError(e))
                    if e.kind() == io::ErrorKind::WouldBlock =>
                {
                    0
                }
                Err(e) => return Err(io::Error::other(e)),
            };
            self.fwd_cnt += written as u32;
        }
        let rest = data.len() - written;
        let start = self.pending.len();
        self.pending.resize(start + rest, 0);
        data.subslice(written, rest)
            .map_err(io::Error::other)?
            .copy_to(&mut self.pending[start..]);
        Ok(())
    }

    /// Writes buffered guest data to the host stream, as much as it takes.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.guest_shutdown.send && !self.host_write_shut {
            self.host_write_shut = true;
            // The host reader sees end of file; it may still send to the guest.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    pub fn guest_shut_down(&mut self, send: bool, recv: bool) {
        self.guest_shutdown.send |= send;
        self.guest_shutdown.recv |= recv;
    }

    /// The guest is done with the connection: only guest data the host has
    /// not taken keeps it open.
    pub fn closing(&self) -> bool {
        self.reset || (self.guest_shutdown.send && self.guest_shutdown.recv)
    }

    /// Both directions are over and every guest byte reached the host.
    pub fn finished(&self) -> bool {
        let drained = self.pending.is_empty();
        let host_done = self.host_eof || self.guest_shutdown.recv;
        drained && (self.reset || (self.guest_shutdown.send && host_done))
    }
}
