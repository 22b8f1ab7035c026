//! virtio-blk requests: any descriptor chains on the request queue, against
//! a real file, served by the event loop as in the VMM.
#![no_main]

use devices::virtio::block::Block;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let read_only = data.first().is_some_and(|flags| flags & 1 != 0);
    let block = Block::new(uvm_fuzz::disk(), read_only, "fuzz").expect("block device");
    uvm_fuzz::serve_requests(block, data);
});
