//! The agent's side of the protocol: any bytes a hostile host writes on the
//! control stream, framed and decoded as the agent does (its requests), and
//! the run request a VMM without vsock puts on the kernel command line.
#![no_main]

use guest::protocol::{self, Exec, Message, Resize, Run, Signal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    while let Ok(Some(frame)) = protocol::receive(&mut stream) {
        let _ = match frame.kind {
            Run::KIND => frame.decode::<Run>().map(drop),
            Exec::KIND => frame.decode::<Exec>().map(drop),
            Signal::KIND => frame.decode::<Signal>().map(drop),
            Resize::KIND => frame.decode::<Resize>().map(drop),
            _ => Ok(()),
        };
    }
    if let Ok(cmdline) = std::str::from_utf8(data) {
        let _ = protocol::from_cmdline(cmdline);
    }
});
