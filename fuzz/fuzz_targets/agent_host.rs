//! The host side of the agent protocol: any bytes a hostile agent writes on
//! its control stream, read as a session reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::agent::read_control_stream(&mut &data[..]);
});
