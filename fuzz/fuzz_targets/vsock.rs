//! virtio-vsock: any transmit chains (packets to host ports served inside
//! the VMM, which accept and answer) and any receive buffers, through the
//! real event loop.
#![no_main]

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};

use devices::virtio::vsock::{HostPorts, Vsock};
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

/// Guest port numbers the inputs can name cheaply.
const SERVED: [u32; 3] = [0, 1, 1024];

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    let ports = HostPorts::new(None);
    let (accepted, streams) = mpsc::channel();
    for port in SERVED {
        ports.serve(port, accepted.clone());
    }
    let vsock = Vsock::new(uvm_fuzz::memory(data), 3, ports, None).expect("vsock");
    let vsock = Arc::new(Mutex::new(vsock));
    let mut events = uvm_fuzz::event_loop(vsock.clone());
    let queues = (0..3).map(|i| uvm_fuzz::queue(i, flags & 2 != 0)).collect();
    let _ = vsock.lock().unwrap().activate(queues, uvm_fuzz::irq());
    uvm_fuzz::serve(&mut events);
    // The host side answers every connection the guest made, then the
    // guest kicks both queues.
    let mut hosts = Vec::new();
    while let Ok(mut stream) = streams.try_recv() {
        let _ = stream.write_all(b"host data");
        hosts.push(stream);
    }
    for queue in [0, 1] {
        let _ = vsock.lock().unwrap().queue_events()[queue].write(1);
    }
    uvm_fuzz::serve(&mut events);
    drop(hosts);
    uvm_fuzz::serve(&mut events);
});
