//! The host end of vsock: where guest connections to host ports go, and the
//! Firecracker "hybrid vsock" Unix socket through which host programs reach
//! guest ports.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

/// Longest handshake line we accept: `CONNECT 4294967295\n` and some slack.
const MAX_HANDSHAKE: usize = 32;

type Served = HashMap<u32, Sender<UnixStream>>;

/// Host ports the guest may connect to.
#[derive(Default)]
pub struct HostPorts {
    /// Ports served inside the VMM: each guest connection arrives as the
    /// other end of a socket pair.
    internal: Arc<Mutex<Served>>,
    /// Hybrid vsock: guest connections to port P go to `{uds}_{P}`.
    uds: Option<PathBuf>,
}

impl HostPorts {
    pub fn new(uds: Option<PathBuf>) -> Self {
        Self {
            internal: Arc::default(),
            uds,
        }
    }

    /// Serves `port` inside the VMM, for one connection; it takes precedence
    /// over the Unix socket.
    pub fn serve(&self, port: u32, connection: Sender<UnixStream>) {
        self.ports().insert(port, connection);
    }

    /// Stops serving `port` if no connection took it.
    pub fn unserve(&self, port: u32) {
        self.ports().remove(&port);
    }

    /// A handle that serves more ports while the device runs; once the
    /// device (which owns this) is gone, nothing is served, and every
    /// served port's receiver sees its end.
    pub fn handle(&self) -> PortsHandle {
        PortsHandle(Arc::downgrade(&self.internal))
    }

    fn ports(&self) -> MutexGuard<'_, Served> {
        lock(&self.internal)
    }

    /// A host stream for a guest connection to `port`. An internal port
    /// takes one connection: a guest cannot pile up sockets for it.
    pub fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        let served = self.ports().remove(&port);
        if let Some(accept) = served {
            let (ours, theirs) = UnixStream::pair()?;
            accept
                .send(theirs)
                .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
            return Ok(ours);
        }
        match &self.uds {
            Some(path) => {
                let mut target = path.clone().into_os_string();
                target.push(format!("_{port}"));
                connect_nonblocking(Path::new(&target))
            }
            None => Err(io::ErrorKind::ConnectionRefused.into()),
        }
    }
}

fn lock(served: &Mutex<Served>) -> MutexGuard<'_, Served> {
    served.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves ports of a running device's [`HostPorts`].
#[derive(Clone, Default)]
pub struct PortsHandle(Weak<Mutex<Served>>);

impl PortsHandle {
    /// Serves `port` for one connection; false once the device is gone.
    pub fn serve(&self, port: u32, connection: Sender<UnixStream>) -> bool {
        let Some(served) = self.0.upgrade() else {
            return false;
        };
        lock(&served).insert(port, connection);
        true
    }

    pub fn unserve(&self, port: u32) {
        if let Some(served) = self.0.upgrade() {
            lock(&served).remove(&port);
        }
    }
}

/// Connects to the Unix socket at `path` without waiting: a listener whose
/// backlog is full refuses instead of stalling the device's event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of the length passed.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// A host client of the hybrid socket that has not yet said which guest port
/// it wants (`CONNECT <port>\n`).
pub struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
}

impl Handshake {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            line: Vec::new(),
        }
    }

    /// Reads what the client sent. `Ok(Some(port))` once the line is
    /// complete, `Ok(None)` while it is not, an error if it is malformed or
    /// the client left. Reads byte by byte so that data after the line stays
    /// in the stream for the guest.
    pub fn advance(&mut self) -> io::Result<Option<u32>> {
        let mut byte = [0u8];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line).map(Some),
                Ok(_) if self.line.len() < MAX_HANDSHAKE => self.line.push(byte[0]),
                Ok(_) => return Err(invalid("handshake line too long")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> io::Result<u32> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
        .and_then(|port| port.trim().parse().ok())
        .ok_or_else(|| invalid("expected `CONNECT <port>`"))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 52\r").unwrap(), 52);
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT x",
            b"connect 5",
            b"CONNECT 99999999999",
            b"\xff",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn handshake_waits_for_the_whole_line_and_leaves_the_rest() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut handshake = Handshake::new(server);
        client.write_all(b"CONNECT 1").unwrap();
        assert_eq!(handshake.advance().unwrap(), None);
        client.write_all(b"234\nhello").unwrap();
        assert_eq!(handshake.advance().unwrap(), Some(1234));
        let mut rest = [0u8; 5];
        handshake.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn handshake_refuses_endless_lines() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut handshake = Handshake::new(server);
        client.write_all(&[b'x'; 100]).unwrap();
        assert!(handshake.advance().is_err());
    }

    #[test]
    fn internal_ports_come_first_and_unknown_ports_are_refused() {
        let (tx, rx) = mpsc::channel();
        let mut ports = HostPorts::new(None);
        ports.serve(7, tx);
        let mut ours = ports.connect(7).unwrap();
        let mut theirs = rx.try_recv().unwrap();
        ours.write_all(b"x").unwrap();
        let mut got = [0u8];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got[0], b'x');
        let refused = ports.connect(8).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        let second = ports.connect(7).unwrap_err();
        assert_eq!(
            second.kind(),
            io::ErrorKind::ConnectionRefused,
            "one connection per port"
        );
    }

    #[test]
    fn uds_ports_connect_to_path_underscore_port() {
        let dir = std::env::temp_dir().join(format!("uvm-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("v.sock");
        let listener = std::os::unix::net::UnixListener::bind(dir.join("v.sock_5000")).unwrap();
        let mut ports = HostPorts::new(Some(base));
        ports.connect(5000).unwrap();
        listener.accept().unwrap();
        assert!(ports.connect(5001).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_listener_refuses_instead_of_blocking() {
        let dir = std::env::temp_dir().join(format!("uvm-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(dir.join("v.sock_7")).unwrap();
        let mut ports = HostPorts::new(Some(dir.join("v.sock")));
        // Nobody accepts: the backlog fills, then connecting must fail at once.
        let mut pending = Vec::new();
        let refused = loop {
            match ports.connect(7) {
                Ok(stream) => pending.push(stream),
                Err(e) => break e,
            }
            assert!(pending.len() < 10_000, "the backlog never filled");
        };
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
