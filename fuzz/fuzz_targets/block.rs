//! virtio-blk requests: any descriptor chains on the request queue, against
//! a real file, served by the event loop as in the VMM.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::block::Block;
use devices::virtio::{RequestDevice, VirtioDevice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    let block = Block::new(uvm_fuzz::disk(), flags & 1 != 0, "fuzz").expect("block device");
    let device = RequestDevice::new(uvm_fuzz::memory(data), block).expect("device");
    let device = Arc::new(Mutex::new(device));
    let mut events = uvm_fuzz::event_loop(device.clone());
    let queue = uvm_fuzz::queue(0, flags & 2 != 0);
    // Activation asks the event loop to serve what the driver queued.
    let _ = device.lock().unwrap().activate(vec![queue], uvm_fuzz::irq());
    uvm_fuzz::serve(&mut events);
});
