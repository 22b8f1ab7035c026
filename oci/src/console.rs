//! A terminal container's pty, runc's way: the master goes to the caller's
//! console socket (SCM_RIGHTS, with the pty's name as the message), the
//! slave is the container's stdio, raw, because the guest's own pty does
//! the line discipline.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Opens a pty, sends its master to `socket` and returns its slave.
pub fn open(socket: &Path) -> anyhow::Result<File> {
    let (master, slave, name) = openpty().context("opening a pty")?;
    make_raw(&slave).context("the pty")?;
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("console socket {}", socket.display()))?;
    stream
        .send_with_fd(name.as_bytes(), master.as_raw_fd())
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        .with_context(|| format!("sending the pty to {}", socket.display()))?;
    Ok(File::from(slave))
}

fn openpty() -> std::io::Result<(OwnedFd, OwnedFd, String)> {
    let (mut master, mut slave) = (-1, -1);
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: valid pointers to two ints and a 64-byte name buffer (PATH
    // of a pty is far shorter); no termios or size is given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty made both descriptors for us alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: openpty wrote a NUL-terminated name into the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok((master, slave, name.to_string_lossy().into_owned()))
}

fn make_raw(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: termios is plain data, filled by tcgetattr before use.
    let mut termios = unsafe { std::mem::zeroed::<libc::termios>() };
    // SAFETY: a valid descriptor and termios struct.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only edits the struct.
    unsafe { libc::cfmakeraw(&mut termios) };
    // SAFETY: a valid descriptor and termios struct.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &termios) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn the_master_goes_to_the_socket_and_the_slave_is_raw() {
        let path = std::env::temp_dir().join(format!("uvm-oci-console-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let mut slave = open(&path).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let mut name = [0u8; 64];
        let (n, fd) = stream.recv_with_fd(&mut name).unwrap();
        assert!(std::str::from_utf8(&name[..n])
            .unwrap()
            .starts_with("/dev/pts/"));
        let mut master = fd.unwrap();
        // Raw: no echo, no CR added to the newline.
        master.write_all(b"in\n").unwrap();
        let mut got = [0u8; 3];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"in\n");
        slave.write_all(b"out\n").unwrap();
        let mut got = [0u8; 4];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out\n");
        std::fs::remove_file(&path).unwrap();
    }
}
