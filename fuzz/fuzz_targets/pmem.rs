//! virtio-pmem requests: any descriptor chains on the request queue.
#![no_main]

use devices::virtio::pmem::Pmem;
use devices::virtio::{RequestDevice, VirtioDevice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    let pmem = Pmem {
        start: 1 << 32,
        len: 2 << 20,
    };
    let mut device = RequestDevice::new(uvm_fuzz::memory(data), pmem).expect("device");
    let queue = uvm_fuzz::queue(0, flags & 2 != 0);
    let _ = device.activate(vec![queue], uvm_fuzz::irq());
    device.queue_notified(0);
});
