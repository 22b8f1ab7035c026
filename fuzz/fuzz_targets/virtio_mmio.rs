//! The virtio-mmio transport: register reads and writes in any order and
//! of any width (the guest driver's whole interface to a device), with a
//! block device behind it whose queues, once the driver sets them up and
//! says DRIVER_OK, are wherever the writes put them (served by the event
//! loop, as in the VMM).
#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::RequestDevice;
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;

/// Each access: width and direction (1 byte), offset (2), value (4).
const OP_LEN: usize = 7;

fuzz_target!(|data: &[u8]| {
    let mem = uvm_fuzz::memory(data);
    let block = Block::new(uvm_fuzz::disk(), false, "fuzz").expect("block device");
    let device = Arc::new(Mutex::new(
        RequestDevice::new(mem.clone(), block).expect("device"),
    ));
    let mut events = uvm_fuzz::event_loop(device.clone());
    let mut transport = MmioTransport::new(device, mem, Arc::new(uvm_fuzz::NoInterrupt));
    for op in data.chunks_exact(OP_LEN) {
        let width = [1, 2, 4, 8][usize::from(op[0] >> 1) & 3];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x200);
        let value = [op[3], op[4], op[5], op[6], op[3], op[4], op[5], op[6]];
        if op[0] & 1 == 0 {
            let mut out = [0u8; 8];
            transport.read(offset, &mut out[..width]);
        } else {
            transport.write(offset, &value[..width]);
        }
    }
    // What the driver's DRIVER_OK and notifications asked the device for.
    uvm_fuzz::serve(&mut events);
});
