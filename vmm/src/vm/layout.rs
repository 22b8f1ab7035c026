//! Where each virtio device sits: its slot, MMIO window and interrupt line,
//! and where each layer's memory sits in guest physical memory. Decided once
//! here; the kernel command line and the code that attaches devices both
//! read them from the [`Layout`].

use devices::ioapic;
use devices::virtio::mmio::{self, MmioTransport};
use devices::virtio::pmem;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

use crate::memory;

/// virtio-mmio windows, one page per device, in the 32-bit MMIO hole below
/// the IOAPIC.
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_END: u64 = ioapic::BASE;
/// GSIs 0-4 belong to legacy devices (timer, keyboard, cascade, COM2, COM1);
/// the IOAPIC's pins end the range.
const FIRST_GSI: u32 = 5;
const LAST_GSI: u32 = ioapic::PINS - 1;
/// How much guest-physical space layers may take above RAM (Linux's
/// x86-64 physical address space is 46 bits at least).
const DEVICE_MEMORY_LEN: u64 = 1 << 45;

/// What a virtio device slot holds. Devices are numbered in this order:
/// vsock, the layers bottom first, the scratch disk, the shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Vsock,
    /// The N-th `--layer`: `/dev/pmemN` in the guest.
    Layer(usize),
    Scratch,
    /// The N-th shared host directory (virtio-fs).
    Share(usize),
}

/// One virtio device's place on the MMIO bus and its interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub device: Device,
    pub mmio_base: u64,
    pub gsi: u32,
}

/// Where one layer's pages appear in guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPlace {
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "too many devices: {devices} virtio devices ({what}) but the interrupt controller has \
         lines for {limit} (GSIs {FIRST_GSI}-{LAST_GSI}); at most {max_layers} layers fit with \
         this set-up"
    )]
    OutOfLines {
        devices: usize,
        what: String,
        limit: u32,
        max_layers: usize,
    },
    #[error("no room for the MMIO window of device {0}")]
    OutOfMmio(usize),
    #[error("layer {index} ({len} bytes) does not fit in guest physical memory")]
    OutOfDeviceMemory { index: usize, len: u64 },
}

/// The devices of one VM and where each sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub slots: Vec<Slot>,
    pub layers: Vec<LayerPlace>,
}

impl Layout {
    /// Places a vsock device (if `vsock`), one pmem device for each image
    /// of `layer_lens` bytes (already aligned; with `tools`, the last is the
    /// VM's tools), a scratch disk (if `scratch`) and `shares` virtio-fs
    /// devices, for a guest with `ram_size` bytes of RAM.
    pub fn new(
        vsock: bool,
        layer_lens: &[u64],
        tools: bool,
        scratch: bool,
        shares: usize,
        ram_size: u64,
    ) -> Result<Self, Error> {
        let devices: Vec<Device> = vsock
            .then_some(Device::Vsock)
            .into_iter()
            .chain((0..layer_lens.len()).map(Device::Layer))
            .chain(scratch.then_some(Device::Scratch))
            .chain((0..shares).map(Device::Share))
            .collect();
        let limit = LAST_GSI - FIRST_GSI + 1;
        if devices.len() > limit as usize {
            let others = usize::from(vsock) + usize::from(tools) + usize::from(scratch) + shares;
            let layers = layer_lens.len() - usize::from(tools);
            return Err(Error::OutOfLines {
                devices: devices.len(),
                what: describe(vsock, layers, tools, scratch, shares),
                limit,
                max_layers: limit as usize - others,
            });
        }
        let mut lines = IdAllocator::new(FIRST_GSI, LAST_GSI).expect("a valid GSI range");
        let mut windows =
            AddressAllocator::new(MMIO_BASE, MMIO_END - MMIO_BASE).expect("a valid MMIO range");
        let slots = devices
            .into_iter()
            .enumerate()
            .map(|(index, device)| {
                let window = windows
                    .allocate(mmio::WINDOW_LEN, mmio::WINDOW_LEN, AllocPolicy::FirstMatch)
                    .map_err(|_| Error::OutOfMmio(index))?;
                // Counted above: there is a line for every device.
                let gsi = lines.allocate_id().expect("enough interrupt lines");
                Ok(Slot {
                    device,
                    mmio_base: window.start(),
                    gsi,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self {
            slots,
            layers: place_layers(layer_lens, ram_size)?,
        })
    }

    /// The `virtio_mmio.device=` entries that announce every device.
    pub fn cmdline_entries(&self) -> impl Iterator<Item = String> + '_ {
        self.slots
            .iter()
            .map(|slot| MmioTransport::cmdline_entry(slot.mmio_base, slot.gsi))
    }
}

/// "vsock, 20 layers, tools, scratch, 2 shares"
fn describe(vsock: bool, layers: usize, tools: bool, scratch: bool, shares: usize) -> String {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let layers = format!("{layers} layer{}", plural(layers));
    let parts = [vsock.then_some("vsock".to_string()), Some(layers)];
    let parts = parts.into_iter().chain([
        tools.then_some("tools".to_string()),
        scratch.then_some("scratch".to_string()),
        (shares > 0).then(|| format!("{shares} share{}", plural(shares))),
    ]);
    parts.flatten().collect::<Vec<_>>().join(", ")
}

/// Layers one after another above RAM, each aligned for memremap_pages.
fn place_layers(lens: &[u64], ram_size: u64) -> Result<Vec<LayerPlace>, Error> {
    let base = memory::device_memory_start(ram_size);
    let mut space = AddressAllocator::new(base, DEVICE_MEMORY_LEN).expect("a valid range");
    (0..)
        .zip(lens)
        .map(|(index, &len)| {
            let range = space
                .allocate(len, pmem::ALIGNMENT, AllocPolicy::FirstMatch)
                .map_err(|_| Error::OutOfDeviceMemory { index, len })?;
            Ok(LayerPlace {
                start: range.start(),
                len,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB2: u64 = pmem::ALIGNMENT;

    #[test]
    fn slots_windows_lines_and_the_command_line_agree() {
        let layout = Layout::new(true, &[MIB2, 3 * MIB2], false, true, 0, 128 << 20).unwrap();
        let devices: Vec<Device> = layout.slots.iter().map(|s| s.device).collect();
        assert_eq!(
            devices,
            [
                Device::Vsock,
                Device::Layer(0),
                Device::Layer(1),
                Device::Scratch
            ]
        );
        let bases: Vec<u64> = layout.slots.iter().map(|s| s.mmio_base).collect();
        assert_eq!(bases, [0xd000_0000, 0xd000_1000, 0xd000_2000, 0xd000_3000]);
        let gsis: Vec<u32> = layout.slots.iter().map(|s| s.gsi).collect();
        assert_eq!(gsis, [5, 6, 7, 8]);
        let entries: Vec<String> = layout.cmdline_entries().collect();
        assert_eq!(
            entries,
            [
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6",
                "virtio_mmio.device=4K@0xd0002000:7",
                "virtio_mmio.device=4K@0xd0003000:8",
            ]
        );
        let four_gib = 1 << 32;
        assert_eq!(
            layout.layers,
            [
                LayerPlace {
                    start: four_gib,
                    len: MIB2
                },
                LayerPlace {
                    start: four_gib + MIB2,
                    len: 3 * MIB2
                },
            ]
        );
    }

    /// The image store merges layers down to what fits with every other
    /// device a run may add.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_image_s_layers_fit_with_tools_and_scratch() {
        let layers = [MIB2; uvm_image::store::MAX_LAYERS];
        Layout::new(true, &layers, true, true, 0, 128 << 20).unwrap();
    }

    #[test]
    fn every_line_of_the_interrupt_controller_can_be_used_and_no_more() {
        // 19 lines (GSIs 5-23): vsock, 17 layers and a scratch disk fit.
        let layout = Layout::new(true, &[MIB2; 17], false, true, 0, 128 << 20).unwrap();
        assert_eq!(layout.slots.last().unwrap().gsi, LAST_GSI);
        assert_eq!(layout.slots.last().unwrap().mmio_base, 0xd001_2000);
        let err = Layout::new(true, &[MIB2; 20], false, false, 0, 128 << 20).unwrap_err();
        assert_eq!(
            err.to_string(),
            "too many devices: 21 virtio devices (vsock, 20 layers) but the interrupt \
             controller has lines for 19 (GSIs 5-23); at most 18 layers fit with this set-up"
        );
        let err = Layout::new(true, &[MIB2; 18], false, true, 0, 128 << 20).unwrap_err();
        assert!(
            err.to_string().contains("(vsock, 18 layers, scratch)"),
            "{err}"
        );
        assert!(err.to_string().contains("at most 17 layers"), "{err}");
        let err = Layout::new(true, &[MIB2; 18], true, true, 0, 128 << 20).unwrap_err();
        assert!(
            err.to_string()
                .contains("(vsock, 17 layers, tools, scratch)"),
            "{err}"
        );
        assert!(err.to_string().contains("at most 16 layers"), "{err}");
        let err = Layout::new(true, &[MIB2; 16], false, true, 2, 128 << 20).unwrap_err();
        assert!(
            err.to_string()
                .contains("(vsock, 16 layers, scratch, 2 shares)"),
            "{err}"
        );
        assert!(err.to_string().contains("at most 15 layers"), "{err}");
        let layout = Layout::new(true, &[MIB2], false, true, 2, 128 << 20).unwrap();
        let last: Vec<Device> = layout.slots[3..].iter().map(|s| s.device).collect();
        assert_eq!(last, [Device::Share(0), Device::Share(1)]);
    }

    #[test]
    fn layers_start_above_high_ram() {
        let layout = Layout::new(false, &[MIB2], false, false, 0, 4 << 30).unwrap();
        assert_eq!(layout.layers[0].start, memory::device_memory_start(4 << 30));
        assert_eq!(
            layout.slots[0].gsi, FIRST_GSI,
            "the first device gets the first line"
        );
    }
}
