//! virtio-pmem requests: any descriptor chains on the request queue,
//! served by the event loop as in the VMM.
#![no_main]

use devices::virtio::pmem::Pmem;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pmem = Pmem {
        start: 1 << 32,
        len: 2 << 20,
    };
    uvm_fuzz::serve_requests(pmem, data);
});
