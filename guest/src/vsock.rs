//! Well-known vsock addresses and, in the guest, AF_VSOCK stream sockets.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The host's context ID, as every guest sees it.
pub const HOST_CID: u32 = 2;

/// Connects to the host's `port`. The socket is close-on-exec, so a child
/// process only gets the ones made its stdio.
pub fn connect(port: u32) -> io::Result<File> {
    let socket = socket()?;
    let addr = address(HOST_CID, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length passed.
    let rc = unsafe { libc::connect(socket.as_raw_fd(), addr.as_ptr(), ADDR_LEN) };
    check(rc).map_err(|e| io::Error::new(e.kind(), format!("vsock port {port}: {e}")))?;
    Ok(File::from(socket))
}

/// A socket listening on `port` of the guest, for host connections.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let socket = socket()?;
    let addr = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length passed.
    check(unsafe { libc::bind(socket.as_raw_fd(), addr.as_ptr(), ADDR_LEN) })?;
    // SAFETY: plain system call on a socket we own.
    check(unsafe { libc::listen(socket.as_raw_fd(), 16) })?;
    Ok(socket)
}

/// The next connection to a listening socket.
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: a null address is allowed; the result is checked.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

struct Address(libc::sockaddr_vm);

impl Address {
    fn as_ptr(&self) -> *const libc::sockaddr {
        (&self.0 as *const libc::sockaddr_vm).cast()
    }
}

fn address(cid: u32, port: u32) -> Address {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    Address(addr)
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` is a new socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
