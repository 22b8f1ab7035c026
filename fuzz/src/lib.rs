//! What the fuzz targets share: guest memory filled from the input, with
//! split virtqueues at fixed places in it, so an input is whatever a
//! hostile driver could write: descriptors, rings, indexes and buffers.

use std::fs::File;
use std::sync::{Arc, Mutex};

use devices::virtio::{GuestMemory, IrqStatus};
use devices::Interrupt;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory for one input: small, so that inputs cover most of it.
pub const MEM_SIZE: usize = 16 * 1024;
/// Queues this small reach the ring's wrap-around with short inputs.
pub const QUEUE_SIZE: u16 = 16;
/// Queue `i` sits at `i * QUEUE_AREA`: descriptors, available, used ring.
const QUEUE_AREA: u64 = 0x400;

/// Guest memory holding `input` from address 0.
pub fn memory(input: &[u8]) -> GuestMemory {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let len = input.len().min(MEM_SIZE);
    mem.write_slice(&input[..len], GuestAddress(0))
        .expect("fits");
    mem
}

/// Queue `index`, ready, with its rings where the input put them.
pub fn queue(index: u64, event_idx: bool) -> Queue {
    let base = index * QUEUE_AREA;
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(base as u32), Some(0));
    queue.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    queue.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

/// An interrupt line that goes nowhere.
pub struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn irq() -> Arc<IrqStatus> {
    Arc::new(IrqStatus::new(Arc::new(NoInterrupt)))
}

/// A 64 KiB disk for block targets: one unlinked file per process (in
/// memory where /dev/shm exists, so that flushes cost nothing), a new
/// descriptor of it per input.
pub fn disk() -> File {
    static DISK: std::sync::OnceLock<File> = std::sync::OnceLock::new();
    let disk = DISK.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let dir = match shm.is_dir() {
            true => shm.to_owned(),
            false => std::env::temp_dir(),
        };
        let path = dir.join(format!("uvm-fuzz-disk-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("fuzz disk");
        std::fs::remove_file(&path).expect("unlink the fuzz disk");
        file.set_len(64 * 1024).expect("size the fuzz disk");
        file
    });
    disk.try_clone().expect("a descriptor of the fuzz disk")
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// An event loop serving `device`, as the VMM's event thread does.
pub fn event_loop(device: Subscriber) -> EventManager<Subscriber> {
    let mut events = EventManager::<Subscriber>::new().expect("event manager");
    events.add_subscriber(device);
    events
}

/// Serves whatever is ready, a few rounds (each can make more ready).
pub fn serve(events: &mut EventManager<Subscriber>) {
    for _ in 0..4 {
        if events.run_with_timeout(0).unwrap_or(0) == 0 {
            return;
        }
    }
}

/// A single-queue device (block, pmem) with the driver's queue in `data`:
/// activated, then served by the event loop as in the VMM.
pub fn serve_requests<H: devices::virtio::RequestHandler + 'static>(handler: H, data: &[u8]) {
    use devices::virtio::{RequestDevice, VirtioDevice};
    let event_idx = data.first().is_some_and(|flags| flags & 2 != 0);
    let device = RequestDevice::new(memory(data), handler).expect("device");
    let device = Arc::new(Mutex::new(device));
    let mut events = event_loop(device.clone());
    // Activation asks the event loop to serve what the driver queued.
    let _ = lock(&device).activate(vec![queue(0, event_idx)], irq());
    serve(&mut events);
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
