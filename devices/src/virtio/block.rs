//! virtio-blk (virtio 1.2, 5.2) over a raw image file: the container's
//! writable scratch layer. Requests are served synchronously, one at a time;
//! a flush is an fdatasync.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use virtio_queue::{DescriptorChain, Writer};

use super::{GuestMemory, RequestHandler};

pub const SECTOR_SIZE: u64 = 512;

/// The most data one request may carry; larger ones fail with an I/O error.
const MAX_REQUEST: usize = 4 << 20;
/// The driver may use this many data segments per request.
const SEG_MAX: u32 = 254;
/// GET_ID answers with at most this many bytes of the serial number.
const ID_LEN: usize = 20;

mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const FLUSH: u64 = 1 << 9;
}

mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// A disk backed by an image file; served by a [`super::RequestDevice`].
pub struct Block {
    file: File,
    /// Capacity in sectors: the image size, rounded down.
    sectors: u64,
    read_only: bool,
    /// The serial number the guest finds the disk by.
    serial: Vec<u8>,
}

impl Block {
    /// A disk backed by `file`, `read_only` or writable, with `serial`
    /// (cut to 20 bytes).
    pub fn new(file: File, read_only: bool, serial: &str) -> io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        let serial = serial.as_bytes();
        Ok(Self {
            file,
            sectors,
            read_only,
            serial: serial[..serial.len().min(ID_LEN)].to_vec(),
        })
    }
}

impl RequestHandler for Block {
    const NAME: &'static str = "block";
    const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

    fn features(&self) -> u64 {
        let ro = if self.read_only { feature::RO } else { 0 };
        feature::FLUSH | feature::SEG_MAX | ro
    }

    fn config(&self) -> Vec<u8> {
        // capacity (le64), size_max (le32, unused), seg_max (le32).
        let mut config = vec![0u8; 16];
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        config
    }

    /// Serves one request chain; returns the bytes written into it (data
    /// read plus the status byte), 0 for a chain with no room for a status.
    fn serve(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let Ok(mut writer) = chain.clone().writer(mem) else {
            return 0;
        };
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return 0; // no room for the status byte
        };
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return 0;
        };
        let result = match chain.reader(mem) {
            Ok(mut reader) => self.execute(&mut reader, &mut writer),
            Err(_) => Err(status::IOERR),
        };
        let (status, written) = match result {
            Ok(written) => (status::OK, written),
            Err(status) => (status, 0),
        };
        match status_writer.write_all(&[status]) {
            Ok(()) => written as u32 + 1,
            Err(_) => 0,
        }
    }
}

impl Block {
    /// Runs the request; the bytes written into the chain, or a status.
    fn execute(&self, reader: &mut impl Read, data: &mut Writer<'_>) -> Result<usize, u8> {
        let mut header = [0u8; 16];
        reader.read_exact(&mut header).map_err(|_| status::IOERR)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        match kind {
            request::IN => {
                let len = data.available_bytes();
                let offset = self.range(sector, len)?;
                let mut buf = vec![0u8; len];
                self.at(offset)
                    .and_then(|mut file| file.read_exact(&mut buf))
                    .map_err(|_| status::IOERR)?;
                data.write_all(&buf).map_err(|_| status::IOERR)?;
                Ok(len)
            }
            request::OUT if self.read_only => Err(status::IOERR),
            request::OUT => {
                let mut buf = Vec::new();
                reader
                    .take(MAX_REQUEST as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|_| status::IOERR)?;
                let offset = self.range(sector, buf.len())?;
                self.at(offset)
                    .and_then(|mut file| file.write_all(&buf))
                    .map_err(|_| status::IOERR)?;
                Ok(0)
            }
            request::FLUSH => self.file.sync_data().map(|()| 0).map_err(|_| status::IOERR),
            request::GET_ID => {
                let id = &self.serial[..self.serial.len().min(data.available_bytes())];
                data.write_all(id).map_err(|_| status::IOERR)?;
                Ok(id.len())
            }
            _ => Err(status::UNSUPP),
        }
    }

    /// The image positioned at `offset`. Seek-then-transfer instead of
    /// positional I/O works on every host OS; requests are served one at a
    /// time, so nothing moves the position in between.
    fn at(&self, offset: u64) -> io::Result<&File> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        Ok(file)
    }

    /// The byte offset of `len` bytes at `sector`, if all of them are on
    /// the disk and the request is not too large.
    fn range(&self, sector: u64, len: usize) -> Result<u64, u8> {
        let sectors = (len as u64).div_ceil(SECTOR_SIZE);
        let end = sector.checked_add(sectors).ok_or(status::IOERR)?;
        if len > MAX_REQUEST || end > self.sectors {
            return Err(status::IOERR);
        }
        Ok(sector * SECTOR_SIZE)
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

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Driver {
        mem: GuestMemory,
        ring: Ring,
        disk: RequestDevice<Block>,
        path: std::path::PathBuf,
    }

    impl Driver {
        /// A 1 MiB disk image whose byte i is i % 251.
        fn new(name: &str, read_only: bool) -> Self {
            let path = std::env::temp_dir().join(format!("uvm-blk-{name}-{}", std::process::id()));
            let image: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, image).unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let block = Block::new(file, read_only, "uvm-scratch-serial-is-long").unwrap();
            let mut disk = RequestDevice::new(mem.clone(), block).unwrap();
            let ring = Ring::new(0);
            let irq = Arc::new(IrqStatus::new(Arc::new(CountingInterrupt::default())));
            disk.activate(vec![ring.queue()], irq).unwrap();
            Self {
                mem,
                ring,
                disk,
                path,
            }
        }

        /// Sends one request with `data` descriptors; returns (status, used length).
        fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut chain = vec![(HDR, 16, 0)];
            chain.extend_from_slice(data);
            chain.push((STATUS, 1, W));
            self.ring.add_chain(&self.mem, &chain);
            self.disk.process_queue();
            let used = self.ring.take_used(&self.mem);
            let status = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
            (status, used.last().map_or(0, |u| u.1))
        }
    }

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    #[test]
    fn reads_writes_and_flushes_the_image() {
        let mut d = Driver::new("rw", false);
        assert_eq!(
            d.request(request::IN, 2, &[(DATA, 1024, W)]),
            (status::OK, 1025)
        );
        let mut got = vec![0u8; 1024];
        d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((i + 1024) % 251) as u8));

        d.mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(d.request(request::OUT, 4, &[(DATA, 512, 0)]).0, status::OK);
        assert_eq!(d.request(request::FLUSH, 0, &[]).0, status::OK);
        let image = std::fs::read(&d.path).unwrap();
        assert!(image[2048..2560].iter().all(|&b| b == 7));
        assert_eq!(image[2560], (2560 % 251) as u8);
    }

    #[test]
    fn requests_past_the_end_fail_without_touching_the_file() {
        let mut d = Driver::new("end", false);
        let last = (1 << 20) / SECTOR_SIZE;
        assert_eq!(
            d.request(request::IN, last, &[(DATA, 512, W)]).0,
            status::IOERR
        );
        assert_eq!(
            d.request(request::OUT, last - 1, &[(DATA, 1024, 0)]).0,
            status::IOERR
        );
        assert_eq!(
            d.request(request::OUT, u64::MAX, &[(DATA, 512, 0)]).0,
            status::IOERR
        );
        assert_eq!(
            std::fs::metadata(&d.path).unwrap().len(),
            1 << 20,
            "file did not grow"
        );
    }

    #[test]
    fn read_only_disks_refuse_writes_and_say_so() {
        let mut d = Driver::new("ro", true);
        assert_ne!(d.disk.features() & feature::RO, 0);
        assert_eq!(
            d.request(request::OUT, 0, &[(DATA, 512, 0)]).0,
            status::IOERR
        );
        assert_eq!(std::fs::read(&d.path).unwrap()[1], 1);
    }

    #[test]
    fn id_config_and_unknown_requests() {
        let mut d = Driver::new("id", false);
        assert_eq!(
            d.request(request::GET_ID, 0, &[(DATA, 20, W)]),
            (status::OK, 21)
        );
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"uvm-scratch-serial-i", "cut to 20 bytes");
        assert_eq!(d.request(99, 0, &[]).0, status::UNSUPP);
        let mut capacity = [0u8; 8];
        d.disk.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2048);
    }

    #[test]
    fn malformed_chains_are_returned() {
        let mut d = Driver::new("bad", false);
        // No room for a status byte: returned unused.
        d.ring.add_chain(&d.mem, &[(HDR, 16, 0)]);
        // A header outside guest memory.
        d.ring
            .add_chain(&d.mem, &[(0xffff_0000, 16, 0), (STATUS, 1, W)]);
        d.disk.process_queue();
        let used = d.ring.take_used(&d.mem);
        assert_eq!(used.len(), 2);
        assert_eq!(used[0].1, 0);
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            status::IOERR
        );
    }
}
