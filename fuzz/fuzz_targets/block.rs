//! virtio-blk requests: any descriptor chains on the request queue, against
//! a real file.
#![no_main]

use devices::virtio::block::Block;
use devices::virtio::{RequestDevice, VirtioDevice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    let block = Block::new(uvm_fuzz::disk(), flags & 1 != 0, "fuzz").expect("block device");
    let mut device = RequestDevice::new(uvm_fuzz::memory(data), block).expect("device");
    let queue = uvm_fuzz::queue(0, flags & 2 != 0);
    // Activation serves what the driver queued; a kick serves it again.
    let _ = device.activate(vec![queue], uvm_fuzz::irq());
    device.queue_notified(0);
});
