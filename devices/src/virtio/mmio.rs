//! The virtio-mmio transport, version 2 ("modern") register layout (virtio
//! 1.2, section 4.2.2). The guest finds each device through a
//! `virtio_mmio.device=` command-line entry ([`MmioTransport::cmdline_entry`]).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{
    ActivateError, GuestMemory, IrqStatus, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::{BusDevice, Interrupt};

/// Size of one device's register window.
pub const WINDOW_LEN: u64 = 0x1000;
/// Offset of the queue-notify register, where ioeventfds are attached.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_5655; // "UVMU"
const CONFIG_OFFSET: u64 = 0x100;

/// Offsets of the 32-bit registers.
mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = super::NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
}

/// The register file of one virtio device. Guest accesses arrive on vCPU
/// threads; after activation the device processes its queues elsewhere,
/// holding its lock while it does host I/O. So the registers a vCPU reads
/// while it handles an interrupt (and every identification register) are
/// answered from here without that lock.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// The device's type and offered features, which never change.
    device_type: u32,
    device_features: u64,
    mem: GuestMemory,
    irq: Arc<IrqStatus>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// The queues as the driver configures them; handed to the device on
    /// DRIVER_OK, rebuilt on reset.
    queues: Vec<Queue>,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        line: Arc<dyn Interrupt>,
    ) -> Self {
        let (queues, device_type, device_features) = {
            let device = lock(&device);
            let features = device.features() | VIRTIO_F_VERSION_1;
            (fresh_queues(&*device), device.device_type(), features)
        };
        Self {
            device,
            device_type,
            device_features,
            mem,
            irq: Arc::new(IrqStatus::new(line)),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            activated: false,
        }
    }

    /// The kernel command-line entry that announces a device at `base` with
    /// interrupt `gsi`.
    pub fn cmdline_entry(base: u64, gsi: u32) -> String {
        format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues are only configurable before the driver says it is ready.
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Takes no device lock (see [`MmioTransport`]).
    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => queue.is_some_and(|q| q.ready()).into(),
            reg::INTERRUPT_STATUS => self.irq.get(),
            reg::STATUS => self.status,
            // CONFIG_GENERATION: our configuration spaces never change.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.set_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.with_queue(|q| q.set_size(value as u16)),
            reg::QUEUE_READY => self.with_queue(|q| q.set_ready(value == 1)),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.irq.ack(value),
            reg::STATUS => self.set_status(value),
            _ => tracing::debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(queue) = self.selected_queue() {
            f(queue);
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return; // features are frozen once accepted
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    /// Reached only when the hypervisor did not take the write itself
    /// (no ioeventfd): pass the notification on to the device.
    fn notify(&self, queue: u32) {
        let mut device = lock(&self.device);
        if (queue as usize) < device.queue_max_sizes().len() {
            device.queue_notified(queue as usize);
        }
    }

    /// Driver status transitions (virtio 1.2, 3.1.1).
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            return; // the driver may only add bits, or write 0 to reset
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let wanted = self.driver_features;
        wanted & !self.device_features == 0 && wanted & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        const READY: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        let bad_queue = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem));
        let result = match (self.status & READY == READY, bad_queue) {
            (false, _) => Err("DRIVER_OK before FEATURES_OK".to_string()),
            (true, Some(index)) => Err(format!("queue {index} is not set up correctly")),
            (true, None) => {
                let mut device = lock(&self.device);
                let mut queues = std::mem::replace(&mut self.queues, fresh_queues(&*device));
                let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                queues.iter_mut().for_each(|q| q.set_event_idx(event_idx));
                device
                    .activate(queues, self.irq.clone())
                    .map_err(|e| e.to_string())
            }
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!("virtio-mmio: cannot activate device: {e}");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED;
            }
        }
    }

    fn reset(&mut self) {
        let mut device = lock(&self.device);
        if self.activated {
            device.reset();
        }
        self.queues = fresh_queues(&*device);
        drop(device);
        self.irq.ack(u32::MAX);
        self.status = 0;
        self.activated = false;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

/// What a snapshot keeps of a transport: its registers, and its queues as
/// the driver set them up (before activation: the transport's; after: the
/// device's, with their ring positions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<SavedQueue>,
}

/// One queue's configuration and ring positions: virtio-queue's
/// [`QueueState`], which has no serde of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue(#[serde(with = "QueueStateDef")] pub QueueState);

#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// Why a saved transport state does not fit this device.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("a state of device type {saved} for a device of type {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("driver features {0:#x} that the device does not offer")]
    Features(u64),
    #[error("{saved} queues for a device with {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
    #[error("activating the device: {0}")]
    Activate(#[from] ActivateError),
}

impl MmioTransport {
    /// The transport's state, for a snapshot of the paused VM.
    pub fn save(&self) -> TransportState {
        let queues = match self.activated {
            true => lock(&self.device).queue_states(),
            false => self.queues.iter().map(Queue::state).collect(),
        };
        TransportState {
            device_type: self.device_type,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.irq.get(),
            activated: self.activated,
            queues: queues.into_iter().map(SavedQueue).collect(),
        }
    }

    /// Puts a fresh transport where `state` says (a snapshot's, so
    /// untrusted: every queue is checked as the driver's would be), and
    /// activates its device again if it was active.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        if state.device_type != self.device_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                device: self.device_type,
            });
        }
        if state.driver_features & !self.device_features != 0 {
            return Err(RestoreError::Features(state.driver_features));
        }
        let queues = self.restored_queues(&state.queues)?;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.irq.ack(u32::MAX);
        self.irq.raise(state.interrupt_status);
        if state.activated {
            // The device gets its queues back as at DRIVER_OK.
            let mut device = lock(&self.device);
            self.queues = fresh_queues(&*device);
            device.activate(queues, self.irq.clone())?;
            device.restored();
            self.activated = true;
        } else {
            self.queues = queues;
        }
        Ok(())
    }

    fn restored_queues(&self, saved: &[SavedQueue]) -> Result<Vec<Queue>, RestoreError> {
        let device = self.queues.len();
        if saved.len() != device {
            return Err(RestoreError::QueueCount {
                saved: saved.len(),
                device,
            });
        }
        let bad = |index, reason: String| RestoreError::Queue { index, reason };
        saved
            .iter()
            .zip(&self.queues)
            .enumerate()
            .map(|(index, (SavedQueue(saved), fresh))| {
                if saved.max_size != fresh.max_size() {
                    return Err(bad(index, format!("max size {}", saved.max_size)));
                }
                let queue = Queue::try_from(*saved).map_err(|e| bad(index, e.to_string()))?;
                if queue.ready() && !queue.is_valid(&self.mem) {
                    return Err(bad(index, "rings outside guest memory".into()));
                }
                Ok(queue)
            })
            .collect()
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            tracing::debug!("virtio-mmio: {}-byte register read", data.len());
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            return; // no device we have has a writable configuration
        }
        match <[u8; 4]>::try_from(data) {
            Ok(data) => self.write_register(offset, u32::from_le_bytes(data)),
            Err(_) => tracing::debug!("virtio-mmio: {}-byte register write", data.len()),
        }
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("queue sizes are powers of two from the device"))
        .collect()
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::virtio::{ActivateError, INT_VRING};

    const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    struct FakeDevice {
        events: [EventFd; 2],
        notified: Vec<usize>,
        activated: Option<usize>,
        queues: Vec<Queue>,
        resets: usize,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn queue_notified(&mut self, queue: usize) {
            self.notified.push(queue);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn activate(&mut self, queues: Vec<Queue>, _: Arc<IrqStatus>) -> Result<(), ActivateError> {
            self.activated = Some(queues.len());
            self.queues = queues;
            Ok(())
        }
        fn queue_states(&self) -> Vec<QueueState> {
            self.queues.iter().map(Queue::state).collect()
        }
        fn reset(&mut self) {
            self.activated = None;
            self.queues.clear();
            self.resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        let device = Arc::new(Mutex::new(FakeDevice {
            events: [
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ],
            notified: Vec::new(),
            activated: None,
            queues: Vec::new(),
            resets: 0,
        }));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let line: Arc<dyn Interrupt> = Arc::new(crate::CountingInterrupt::default());
        (MmioTransport::new(device.clone(), mem, line), device)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// What Linux's virtio_mmio driver does, up to DRIVER_OK.
    fn bring_up(t: &mut MmioTransport, queue_addr: u64) {
        write(t, reg::STATUS, S_ACK);
        write(t, reg::STATUS, S_ACK | S_DRIVER);
        write(t, reg::DRIVER_FEATURES_SEL, 1);
        write(t, reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        write(t, reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        for queue in 0..2u32 {
            let base = queue_addr + u64::from(queue) * 0x1000;
            write(t, reg::QUEUE_SEL, queue);
            write(t, reg::QUEUE_NUM, 16);
            write(t, reg::QUEUE_DESC_LOW, base as u32);
            write(t, reg::QUEUE_DRIVER_LOW, base as u32 + 0x100);
            write(t, reg::QUEUE_DEVICE_LOW, base as u32 + 0x200);
            write(t, reg::QUEUE_READY, 1);
        }
        write(
            t,
            reg::STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    #[test]
    fn identifies_as_a_modern_device() {
        let (mut t, _) = transport();
        assert_eq!(read(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(read(&mut t, reg::VERSION), 2);
        assert_eq!(read(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(read(&mut t, reg::DEVICE_FEATURES), 1 << 3);
        write(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read(&mut t, reg::DEVICE_FEATURES),
            1,
            "VERSION_1 in the high word"
        );
        write(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 16);
        write(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
        let mut config = [0u8; 2];
        t.read(CONFIG_OFFSET + 5, &mut config);
        assert_eq!(config, [5, 5]);
    }

    #[test]
    fn activates_on_driver_ok_and_resets_on_zero() {
        let (mut t, device) = transport();
        bring_up(&mut t, 0x1_0000);
        assert_eq!(device.lock().unwrap().activated, Some(2));
        assert_eq!(read(&mut t, reg::STATUS) & S_DRIVER_OK, S_DRIVER_OK);
        // Queues cannot be changed under the running device.
        write(&mut t, reg::QUEUE_SEL, 0);
        write(&mut t, reg::QUEUE_READY, 0);
        write(&mut t, reg::STATUS, 0);
        assert_eq!(device.lock().unwrap().resets, 1);
        assert_eq!(read(&mut t, reg::STATUS), 0);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0);
        bring_up(&mut t, 0x1_0000);
        assert_eq!(
            device.lock().unwrap().activated,
            Some(2),
            "works again after reset"
        );
    }

    #[test]
    fn refuses_features_it_did_not_offer_or_a_legacy_driver() {
        let (mut t, device) = transport();
        write(&mut t, reg::STATUS, S_ACK | S_DRIVER);
        write(&mut t, reg::DRIVER_FEATURES, 1 << 5); // not offered, no VERSION_1
        write(&mut t, reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(read(&mut t, reg::STATUS) & S_FEATURES_OK, 0);
        write(&mut t, reg::STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
        assert_eq!(device.lock().unwrap().activated, None);
        assert_ne!(read(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_fails_activation() {
        let (mut t, device) = transport();
        bring_up(&mut t, 0xfff0_0000); // beyond the 1 MiB of guest memory
        assert_eq!(device.lock().unwrap().activated, None);
        assert_ne!(read(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    }

    #[test]
    fn notify_without_ioeventfd_goes_to_the_device() {
        let (mut t, device) = transport();
        write(&mut t, reg::QUEUE_NOTIFY, 1);
        write(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
        assert_eq!(device.lock().unwrap().notified, [1]);
    }

    #[test]
    fn odd_sized_register_accesses_are_harmless() {
        let (mut t, _) = transport();
        let mut byte = [0xaau8];
        t.read(reg::MAGIC, &mut byte);
        assert_eq!(byte, [0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(read(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn registers_read_while_the_device_is_busy_take_no_device_lock() {
        let (t, device) = transport();
        t.irq.signal_used_queue();
        let t = Mutex::new(t);
        // The event thread holds the device during host I/O (a flush, a
        // socket write); a vCPU handling the interrupt must not wait.
        let busy = device.lock().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut t = t.lock().unwrap();
                let regs = [
                    reg::MAGIC,
                    reg::VERSION,
                    reg::DEVICE_ID,
                    reg::DEVICE_FEATURES,
                ];
                let values = regs.map(|r| read(&mut t, r));
                let status = read(&mut t, reg::INTERRUPT_STATUS);
                write(&mut t, reg::INTERRUPT_ACK, status);
                done.send((values, status)).unwrap();
            });
            let got = finished.recv_timeout(std::time::Duration::from_secs(10));
            drop(busy);
            let (values, status) = got.expect("a register read waited for the device lock");
            assert_eq!(values, [MAGIC, VERSION, 42, 1 << 3]);
            assert_eq!(status, INT_VRING);
        });
    }

    #[test]
    fn a_saved_transport_restores_into_a_fresh_one() {
        let (mut t, device) = transport();
        bring_up(&mut t, 0x1_0000);
        device.lock().unwrap().queues[1].set_next_avail(5);
        device.lock().unwrap().queues[1].set_next_used(4);
        t.irq.signal_used_queue();
        write(&mut t, reg::QUEUE_SEL, 1);
        let saved = t.save();
        assert!(saved.activated);
        let queue = |i: usize| saved.queues[i].0;
        assert_eq!((queue(1).next_avail, queue(1).next_used), (5, 4));
        assert_eq!(queue(0).desc_table, 0x1_0000);
        let json = serde_json::to_string(&saved).unwrap();
        let saved: TransportState = serde_json::from_str(&json).unwrap();

        let (mut fresh, fresh_device) = transport();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh_device.lock().unwrap().activated, Some(2));
        assert_eq!(
            fresh.save(),
            saved,
            "what is saved again is what was restored"
        );
        assert_eq!(read(&mut fresh, reg::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(read(&mut fresh, reg::STATUS) & S_DRIVER_OK, S_DRIVER_OK);
        assert_eq!(read(&mut fresh, reg::QUEUE_NUM_MAX), 16, "queue 1 selected");
        // The driver can still reset it and start over.
        write(&mut fresh, reg::STATUS, 0);
        assert_eq!(fresh_device.lock().unwrap().resets, 1);
    }

    #[test]
    fn a_transport_saved_before_driver_ok_keeps_its_queues_unactivated() {
        let (mut t, _) = transport();
        write(&mut t, reg::STATUS, S_ACK | S_DRIVER);
        write(&mut t, reg::QUEUE_SEL, 0);
        write(&mut t, reg::QUEUE_NUM, 8);
        let saved = t.save();
        let (mut fresh, fresh_device) = transport();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh_device.lock().unwrap().activated, None);
        assert_eq!(fresh.save(), saved);
    }

    #[test]
    fn a_saved_state_that_does_not_fit_is_refused() {
        let (mut t, _) = transport();
        bring_up(&mut t, 0x1_0000);
        let good = t.save();
        type Spoil = fn(&mut TransportState);
        let spoiled: [(&str, Spoil); 5] = [
            ("device type", |s| s.device_type = 7),
            ("features", |s| s.driver_features |= 1 << 40),
            ("queues", |s| {
                s.queues.pop();
            }),
            ("queue 0", |s| s.queues[0].0.size = 3),
            ("queue 1", |s| s.queues[1].0.used_ring = 0xffff_0000),
        ];
        for (what, spoil) in spoiled {
            let mut state = good.clone();
            spoil(&mut state);
            let (mut fresh, fresh_device) = transport();
            let err = fresh.restore(&state).unwrap_err().to_string();
            assert!(
                err.contains(what.split(' ').next().unwrap()),
                "{what}: {err}"
            );
            assert_eq!(fresh_device.lock().unwrap().activated, None, "{what}");
            assert_eq!(read(&mut fresh, reg::STATUS), 0, "{what}: nothing restored");
        }
    }

    #[test]
    fn interrupt_status_is_acknowledged_by_bits() {
        let (mut t, _) = transport();
        t.irq.signal_used_queue();
        assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        write(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(read(&mut t, reg::INTERRUPT_STATUS), 0);
    }
}
