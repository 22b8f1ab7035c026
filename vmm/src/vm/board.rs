//! The VM's devices: the port-I/O bus (serial console, i8042 reset, boot
//! timer) and the virtio devices on the MMIO bus, each at the place the
//! [`Layout`] gave it.

use std::fs::File;
use std::sync::{Arc, Mutex};

use devices::boot_timer::BootTimer;
use devices::i8042::{self, I8042};
use devices::serial::{self, Serial, SerialSnapshot};
use devices::virtio::block::Block;
use devices::virtio::mmio::{self, MmioTransport, TransportState};
use devices::virtio::pmem::Pmem;
use devices::virtio::RequestDevice;
use devices::Bus;
use guest::boot_mark;
use serde::{Deserialize, Serialize};

use super::layout::{Device, Layout, Slot};
use super::threads::Ending;
use super::{Error, Exit, Share};
use crate::console::Console;
use crate::hypervisor::{IoHandler, Vm};
use crate::memory::GuestMemory;
use crate::sys::{self, AgentLink, DeviceLoop, Served};

/// The port-I/O and MMIO buses the vCPUs dispatch to, and the devices on
/// them that keep state.
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
    // For snapshots, which Unix hosts alone take (as below).
    #[cfg_attr(not(unix), allow(dead_code))]
    pub com1: Arc<Mutex<Serial>>,
    /// The virtio transports in layout order.
    #[cfg_attr(not(unix), allow(dead_code))]
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// What a snapshot keeps of the devices the VMM emulates: the console UART
/// and every virtio transport with its queues, in layout order. (The i8042
/// and the boot timer keep nothing.)
#[derive(Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialSnapshot,
    pub transports: Vec<TransportState>,
}

#[cfg_attr(not(unix), allow(dead_code))]
impl Buses {
    /// Of a paused VM.
    pub fn save(&self) -> DeviceState {
        DeviceState {
            serial: crate::lock(&self.com1).save(),
            transports: self
                .transports
                .iter()
                .map(|t| crate::lock(t).save())
                .collect(),
        }
    }

    /// Before the VM first runs; `state` is untrusted.
    pub fn restore(&self, state: &DeviceState) -> Result<(), Error> {
        if state.transports.len() != self.transports.len() {
            return Err(Error::DeviceState(format!(
                "{} virtio devices saved for a VM with {}",
                state.transports.len(),
                self.transports.len()
            )));
        }
        let failed = |e: &dyn std::fmt::Display| Error::DeviceState(e.to_string());
        crate::lock(&self.com1)
            .restore(&state.serial)
            .map_err(|e| failed(&e))?;
        for (index, (transport, saved)) in self.transports.iter().zip(&state.transports).enumerate()
        {
            crate::lock(transport)
                .restore(saved)
                .map_err(|e| failed(&format!("virtio device {index}: {e}")))?;
        }
        Ok(())
    }
}

impl IoHandler for Buses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(port.into(), data) {
            data.fill(0xff); // nothing there: the bus floats high
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(port.into(), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

/// What attaching a virtio device needs (vmm-reference's environment
/// bundle): the VM, guest memory, the MMIO bus and the loop that serves it.
pub struct DeviceEnv<'a, V: Vm> {
    pub vm: &'a V,
    pub mem: &'a GuestMemory,
    pub mmio: &'a mut Bus,
    pub transports: &'a mut Vec<Arc<Mutex<MmioTransport>>>,
    pub events: &'a mut DeviceLoop,
}

impl<V: Vm> DeviceEnv<'_, V> {
    /// Puts `device` on the MMIO bus at `slot`: its register window, its
    /// interrupt line, its queue notifications (straight to the device's
    /// events where the hypervisor can) and its place in the event loop.
    pub fn attach<D: Served>(&mut self, slot: &Slot, device: D) -> Result<(), Error> {
        sys::register_notifiers(self.vm, &device, slot.mmio_base + mmio::NOTIFY_OFFSET)?;
        let device = Arc::new(Mutex::new(device));
        let line = self.vm.interrupt(slot.gsi)?;
        let transport = MmioTransport::new(device.clone(), self.mem.clone(), line);
        let window = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(window.clone(), slot.mmio_base, mmio::WINDOW_LEN)?;
        self.transports.push(window);
        self.events.serve(device);
        Ok(())
    }

    /// Every device of `layout`: the agent's link, a pmem device for each
    /// layer (mapped where the layout placed it), the scratch disk, the
    /// shares.
    pub fn attach_all(
        &mut self,
        layout: &Layout,
        link: &mut AgentLink,
        mut scratch: Option<File>,
        shares: &[Share],
    ) -> Result<(), Error> {
        let devices_err = Error::Devices;
        for slot in &layout.slots {
            match slot.device {
                Device::Vsock => link.attach(self, slot)?,
                Device::Layer(index) => {
                    let place = layout.layers[index];
                    let range = Pmem {
                        start: place.start,
                        len: place.len,
                    };
                    let pmem = RequestDevice::new(self.mem.clone(), range).map_err(devices_err)?;
                    self.attach(slot, pmem)?;
                }
                Device::Scratch => {
                    let file = scratch.take().expect("the layout has a scratch slot");
                    let serial = guest::disk_serial::SCRATCH;
                    let block = Block::new(file, false, serial).map_err(devices_err)?;
                    let disk = RequestDevice::new(self.mem.clone(), block).map_err(devices_err)?;
                    self.attach(slot, disk)?;
                }
                Device::Share(index) => sys::attach_share(self, slot, index, &shares[index])?,
            }
        }
        Ok(())
    }
}

/// The legacy devices on ports: COM1 (the console, also returned), the
/// i8042 whose reset ends the VM, and the boot timer the agent marks.
pub fn pio_bus<V: Vm>(
    vm: &V,
    ending: &Arc<Ending>,
    console: &Console,
    boot_timer: &Arc<Mutex<BootTimer>>,
) -> Result<(Bus, Arc<Mutex<Serial>>), Error> {
    let mut bus = Bus::new();
    let irq = vm.interrupt(serial::COM1_IRQ)?;
    let com1 = Arc::new(Mutex::new(Serial::new(irq, Box::new(console.clone()))));
    bus.insert(com1.clone(), serial::COM1_PORT, serial::PORT_LEN)?;
    let ending = ending.clone();
    let i8042 = I8042::new(Box::new(move || ending.end(Exit::Reset)));
    bus.insert(
        Arc::new(Mutex::new(i8042)),
        i8042::PORT_BASE,
        i8042::PORT_LEN,
    )?;
    bus.insert(boot_timer.clone(), boot_mark::PORT.into(), 1)?;
    Ok((bus, com1))
}
