//! uvm-vsock-test: a guest program for uvm's integration tests (it is only in
//! the test initrd).
//!
//! - `echo PORT`: listen on guest vsock PORT, print `listening`, echo one
//!   connection's bytes back until it ends.
//! - `flood PORT N`: open N connections to host PORT and hold them all;
//!   print how many the host accepted and refused.

#[cfg(target_os = "linux")]
use std::io::{self, Read, Write};

#[cfg(target_os = "linux")]
use guest::vsock;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("uvm-vsock-test runs in a Linux guest only");
    std::process::exit(1);
}

#[cfg(target_os = "linux")]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["echo", port] => echo(parse(port)),
        ["flood", port, count] => flood(parse(port), parse(count)),
        _ => Err(io::Error::other(
            "usage: uvm-vsock-test echo PORT | flood PORT N",
        )),
    };
    if let Err(e) = result {
        eprintln!("uvm-vsock-test: {e}");
        std::process::exit(1);
    }
}

#[cfg(target_os = "linux")]
fn parse(arg: &str) -> u32 {
    arg.parse().unwrap_or_else(|_| {
        eprintln!("uvm-vsock-test: not a number: {arg}");
        std::process::exit(2)
    })
}

#[cfg(target_os = "linux")]
fn echo(port: u32) -> io::Result<()> {
    let listener = vsock::listen(port)?;
    println!("listening");
    let mut conn = vsock::accept(&listener)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

#[cfg(target_os = "linux")]
fn flood(port: u32, count: u32) -> io::Result<()> {
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..count {
        match vsock::connect(port) {
            Ok(conn) => open.push(conn),
            Err(_) => refused += 1,
        }
    }
    println!("connected={} refused={refused}", open.len());
    Ok(())
}
