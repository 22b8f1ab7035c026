//! virtio-pmem (virtio 1.2, 5.19): a range of guest physical memory backed
//! by a host file — one read-only container image layer. The guest maps the
//! range straight into its address space (DAX); the device itself only
//! describes the range and answers flush requests.

use virtio_queue::DescriptorChain;
use vm_memory::Le32;

use super::{GuestMemory, RequestHandler};

/// Linux maps the range with memremap_pages, which wants 2 MiB alignment of
/// its start and size.
pub const ALIGNMENT: u64 = 2 << 20;

const REQ_TYPE_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;

/// The guest-physical range `start..start + len`, which the VMM maps
/// (read-only) itself; served by a [`super::RequestDevice`].
pub struct Pmem {
    pub start: u64,
    pub len: u64,
}

impl RequestHandler for Pmem {
    const NAME: &'static str = "pmem";
    const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_PMEM;

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        [self.start.to_le_bytes(), self.len.to_le_bytes()].concat()
    }

    /// A flush succeeds (the range is a read-only mapping of the file, there
    /// is nothing to write back); anything else is an error. 0 bytes for a
    /// chain that cannot hold an answer.
    fn serve(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            return 0;
        };
        let status = match reader.read_obj::<Le32>() {
            Ok(kind) if kind.to_native() == REQ_TYPE_FLUSH => RESP_OK,
            _ => RESP_EIO,
        };
        match writer.write_obj(Le32::from(status)) {
            Ok(()) => 4,
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::Ring;
    use crate::virtio::{IrqStatus, RequestDevice, VirtioDevice};
    use crate::CountingInterrupt;

    #[test]
    fn describes_its_range_and_answers_flushes() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let pmem = Pmem {
            start: 1 << 32,
            len: 4 << 20,
        };
        let mut pmem = RequestDevice::new(mem.clone(), pmem).unwrap();
        let mut config = [0u8; 16];
        pmem.read_config(0, &mut config);
        assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), 1 << 32);
        assert_eq!(u64::from_le_bytes(config[8..].try_into().unwrap()), 4 << 20);

        let mut ring = Ring::new(0);
        let irq = Arc::new(IrqStatus::new(Arc::new(CountingInterrupt::default())));
        pmem.activate(vec![ring.queue()], irq).unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        for (i, kind) in [REQ_TYPE_FLUSH, 7].into_iter().enumerate() {
            let (req, resp) = (0x8_0000 + i as u64 * 16, 0x9_0000 + i as u64 * 16);
            mem.write_obj(kind, GuestAddress(req)).unwrap();
            ring.add_chain(&mem, &[(req, 4, 0), (resp, 4, w)]);
        }
        ring.add_chain(&mem, &[(0x8_0100, 4, 0)]); // no room for an answer
        pmem.process_queue();
        let used = ring.take_used(&mem);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [4, 4, 0]);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x9_0000)).unwrap(),
            RESP_OK
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x9_0010)).unwrap(),
            RESP_EIO
        );
    }
}
