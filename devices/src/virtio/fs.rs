//! virtio-fs (virtio 1.2, 5.11): a host directory shared with the guest
//! live — what the guest writes lands in the directory, what the host
//! changes the guest sees. The guest's FUSE requests are served in the VMM
//! by fuse-backend-rs's passthrough file system, which resolves every name
//! from the directory's own descriptors (`..` at its top is the top), so
//! nothing outside it is reachable — unless the host moves a directory the
//! guest holds out of it: virtiofsd's sandbox (a chroot) would still stop
//! that, this server does not. No DAX window: file data travels in the
//! requests.
//!
//! fuse-backend-rs 0.14 is built on vm-memory 0.17 and virtio-queue 0.17,
//! one release behind the rest of uvm, and takes its requests as those
//! versions' descriptor chains: this device runs its queues on them, over a
//! 0.17 view of the same guest RAM ([`Ram`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OpenIn, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueState};
use virtio_queue_fuse::{DescriptorChain, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{read_config_bytes, ActivateError, GuestMemory, IrqStatus, VirtioDevice};
use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// virtio-fs's device ID (virtio 1.2, 5).
const DEVICE_ID: u32 = 26;
/// The hiprio queue (FORGET, INTERRUPT) and one request queue.
const QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// The tag field of the configuration space.
pub const TAG_LEN: usize = 36;

/// A shared directory, `read_only` or not, that the guest mounts by `tag`.
pub struct Fs {
    tag: String,
    read_only: bool,
    server: Server<Arc<PassthroughFs>>,
    ram: Ram,
    events: [EventFd; QUEUES],
    active: Option<(Vec<virtio_queue_fuse::Queue>, Arc<IrqStatus>)>,
}

type View = vm_memory_fuse::GuestMemoryMmap<()>;

/// Guest RAM as fuse-backend-rs takes it: a vm-memory 0.17 view of uvm's
/// own mapping, which it holds so that the view never outlives it.
struct Ram {
    _mapping: GuestMemory,
    view: View,
}

impl Ram {
    fn new(mem: &GuestMemory) -> io::Result<Self> {
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
        let regions = mem
            .iter()
            .map(|region| {
                let (start, len) = (region.start_addr().0, region.len() as usize);
                // SAFETY: the range is a live mapping of guest RAM that
                // `_mapping` (a clone of `mem`, sharing its regions) keeps
                // mapped for as long as the view exists; a raw region never
                // unmaps it.
                let raw = unsafe {
                    vm_memory_fuse::MmapRegion::build_raw(
                        region.as_ptr(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                    )
                }
                .map_err(io::Error::other)?;
                vm_memory_fuse::GuestRegionMmap::new(raw, vm_memory_fuse::GuestAddress(start))
                    .ok_or_else(|| io::Error::other("a guest RAM region past the address space"))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let view = View::from_regions(regions).map_err(io::Error::other)?;
        Ok(Self {
            _mapping: mem.clone(),
            view,
        })
    }
}

impl Fs {
    /// Shares `dir` (which must be a directory) as `tag` (at most
    /// [`TAG_LEN`] bytes). With `keep_cache` the guest keeps file data
    /// cached across opens (for a directory nothing else changes, as a
    /// container's root); without, each open drops it (close-to-open
    /// consistency with the host's changes).
    pub fn new(
        mem: &GuestMemory,
        dir: &str,
        tag: &str,
        read_only: bool,
        keep_cache: bool,
    ) -> io::Result<Self> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            let e = format!("share tag `{tag}`: 1 to {TAG_LEN} bytes");
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
        }
        let fs = PassthroughFs::<()>::new(Config {
            root_dir: dir.to_string(),
            cache_policy: match keep_cache {
                true => CachePolicy::Always,
                false => CachePolicy::Auto,
            },
            ..Config::default()
        })?;
        fs.import()?;
        Ok(Self {
            tag: tag.to_string(),
            read_only,
            server: Server::new(Arc::new(fs)),
            ram: Ram::new(mem)?,
            events: [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?],
            active: None,
        })
    }

    fn process_queue(&mut self, index: usize) {
        let Some((queues, irq)) = &mut self.active else {
            return;
        };
        let Some(queue) = queues.get_mut(index) else {
            return;
        };
        let mem = &self.ram.view;
        let mut used = false;
        loop {
            let mut progress = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = serve(&self.server, self.read_only, mem, chain);
                if let Err(e) = queue.add_used(mem, head, len) {
                    tracing::warn!("virtio-fs: used ring: {e}");
                }
                (used, progress) = (true, true);
            }
            // As super::drain_queue: a bogus available index makes no
            // progress and ends the loop.
            if !progress || !queue.enable_notification(mem).unwrap_or(false) {
                break;
            }
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            irq.signal_used_queue();
        }
    }
}

/// Serves one request; returns the bytes written into the chain.
fn serve(
    server: &Server<Arc<PassthroughFs>>,
    read_only: bool,
    mem: &View,
    chain: DescriptorChain<&View>,
) -> u32 {
    let (Ok(reader), Ok(mut writer)) = (
        Reader::from_descriptor_chain(mem, chain.clone()),
        VirtioFsWriter::new(mem, chain),
    ) else {
        return 0;
    };
    if let Some((header, errno)) = refusal(reader.clone(), read_only) {
        return answer_error(&mut writer, &header, errno);
    }
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(written) => u32::try_from(written).unwrap_or(0),
        Err(e) => {
            tracing::debug!("virtio-fs: request: {e}");
            0
        }
    }
}

/// Why a request is answered without the server: an opcode FUSE does not
/// have (the server's trace line would transmute it into its enum), or a
/// change to a read-only share.
fn refusal<S>(mut reader: Reader<'_, S>, read_only: bool) -> Option<(InHeader, i32)>
where
    S: vm_memory_fuse::bitmap::BitmapSlice,
{
    // The server answers what it cannot decode.
    let header = reader.read_obj::<InHeader>().ok()?;
    let opcode = header.opcode;
    if opcode >= Opcode::MaxOpcode as u32 || [0, 7, 19].contains(&opcode) {
        return Some((header, libc::ENOSYS));
    }
    (read_only && changes(opcode, &mut reader)).then_some((header, libc::EROFS))
}

/// Whether the request with `opcode` (its body in `reader`) would change
/// the directory.
fn changes<S>(opcode: u32, reader: &mut Reader<'_, S>) -> bool
where
    S: vm_memory_fuse::bitmap::BitmapSlice,
{
    const CHANGING: &[Opcode] = &[
        Opcode::Setattr,
        Opcode::Symlink,
        Opcode::Mknod,
        Opcode::Mkdir,
        Opcode::Unlink,
        Opcode::Rmdir,
        Opcode::Rename,
        Opcode::Link,
        Opcode::Write,
        Opcode::Setxattr,
        Opcode::Removexattr,
        Opcode::Create,
        Opcode::Fallocate,
        Opcode::Rename2,
        Opcode::CopyFileRange,
        Opcode::SetupMapping,
    ];
    if CHANGING.iter().any(|&op| op as u32 == opcode) {
        return true;
    }
    if opcode != Opcode::Open as u32 {
        return false;
    }
    // An open for writing, or one that truncates.
    match reader.read_obj::<OpenIn>() {
        Ok(open) => {
            let flags = open.flags as i32;
            flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
        }
        Err(_) => true,
    }
}

/// Answers the request `header` with `-errno`; returns the bytes written.
fn answer_error<S>(writer: &mut VirtioFsWriter<'_, S>, header: &InHeader, errno: i32) -> u32
where
    S: vm_memory_fuse::bitmap::BitmapSlice,
{
    // FORGET and BATCH_FORGET have no answer.
    if header.opcode == Opcode::Forget as u32 || header.opcode == Opcode::BatchForget as u32 {
        return 0;
    }
    let len = std::mem::size_of::<OutHeader>() as u32;
    let out = OutHeader {
        len,
        error: -errno,
        unique: header.unique,
    };
    match writer.write_obj(out) {
        Ok(()) => len,
        Err(_) => 0,
    }
}

/// A queue's state as the other virtio-queue release spells it (the same
/// fields).
macro_rules! convert_state {
    ($state:expr => $to:path) => {{
        let s = $state;
        $to {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }};
}

/// The 0.17 queue that stands for uvm's `queue`, where it stands.
fn fuse_queue(queue: &Queue) -> Option<virtio_queue_fuse::Queue> {
    let state = convert_state!(queue.state() => virtio_queue_fuse::QueueState);
    virtio_queue_fuse::Queue::try_from(state).ok()
}

/// Where a 0.17 queue stands, as uvm's snapshots keep it.
fn queue_state(queue: &virtio_queue_fuse::Queue) -> QueueState {
    convert_state!(queue.state() => QueueState)
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.events
    }

    /// The event thread serves the queue (this runs on a vCPU thread).
    fn queue_notified(&mut self, queue: usize) {
        if let Some(event) = self.events.get(queue) {
            if let Err(e) = event.write(1) {
                tracing::warn!("virtio-fs: queue notify: {e}");
            }
        }
    }

    /// tag (36 bytes, NUL padded), then num_request_queues (le32).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, queues: Vec<Queue>, irq: Arc<IrqStatus>) -> Result<(), ActivateError> {
        let queues = queues
            .iter()
            .enumerate()
            .map(|(index, queue)| {
                fuse_queue(queue)
                    .filter(|q| q.ready())
                    .ok_or(ActivateError::BadQueue(index))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.active = Some((queues, irq));
        // Anything the driver queued before it said DRIVER_OK.
        (0..QUEUES).for_each(|queue| self.queue_notified(queue));
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|(queues, _)| queues.iter().map(queue_state))
            .collect()
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl event_manager::MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        for event in &self.events {
            let events = event_manager::Events::new(event, event_manager::EventSet::IN);
            if let Err(e) = ops.add(events) {
                tracing::error!("virtio-fs: watching a queue: {e}");
            }
        }
    }

    fn process(&mut self, events: event_manager::Events, _: &mut event_manager::EventOps) {
        let fd = events.fd();
        let Some(index) = self.events.iter().position(|e| e.as_raw_fd() == fd) else {
            return;
        };
        let _ = self.events[index].read();
        self.process_queue(index);
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::Ring;
    use crate::CountingInterrupt;

    /// The root directory's node.
    const ROOT: u64 = 1;

    /// A device sharing a new directory that holds `hello`, activated, and
    /// the driver's view of its request queue.
    struct Shared {
        dir: std::path::PathBuf,
        mem: GuestMemory,
        fs: Fs,
        requests: Ring,
        unique: u64,
    }

    impl Shared {
        /// Shares `base/share`, beside `base/outside`.
        fn new(name: &str, read_only: bool) -> Self {
            let base = std::env::temp_dir().join(format!("uvm-fs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            let dir = base.join("share");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("hello"), "hi there").unwrap();
            std::fs::write(base.join("outside"), "not shared").unwrap();
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut fs = Fs::new(&mem, dir.to_str().unwrap(), "share", read_only, false).unwrap();
            let (hiprio, requests) = (Ring::new(0), Ring::new(0x4_0000));
            let irq = Arc::new(IrqStatus::new(Arc::new(CountingInterrupt::default())));
            fs.activate(vec![hiprio.queue(), requests.queue()], irq)
                .unwrap();
            let mut shared = Self {
                dir,
                mem,
                fs,
                requests,
                unique: 0,
            };
            let init = [7u32, 31, 0, 0].map(u32::to_le_bytes).concat();
            assert_eq!(shared.ask(Opcode::Init as u32, ROOT, &init).0, 0);
            shared
        }

        /// Sends one request; returns its error and the answer's body.
        fn ask(&mut self, opcode: u32, node: u64, body: &[u8]) -> (i32, Vec<u8>) {
            self.unique += 1;
            let len = (40 + body.len()) as u32;
            let mut request = Vec::new();
            request.extend(len.to_le_bytes());
            request.extend(opcode.to_le_bytes());
            request.extend(self.unique.to_le_bytes());
            request.extend(node.to_le_bytes());
            request.extend([0u8; 16]); // uid, gid, pid, padding
            request.extend(body);
            let (at, answer) = (0x8_0000, 0x9_0000);
            self.mem.write_slice(&request, GuestAddress(at)).unwrap();
            let w = VRING_DESC_F_WRITE as u16;
            self.requests
                .add_chain(&self.mem, &[(at, len, 0), (answer, 4096, w)]);
            self.fs.process_queue(1);
            let used = self.requests.take_used(&self.mem);
            assert_eq!(used.len(), 1);
            let mut out = vec![0u8; used[0].1 as usize];
            self.mem.read_slice(&mut out, GuestAddress(answer)).unwrap();
            assert!(out.len() >= 16, "an answer has a header");
            let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
            assert_eq!(
                u64::from_le_bytes(out[8..16].try_into().unwrap()),
                self.unique
            );
            (error, out[16..].to_vec())
        }

        fn lookup(&mut self, name: &str) -> (i32, u64) {
            self.lookup_in(ROOT, name)
        }

        fn lookup_in(&mut self, dir: u64, name: &str) -> (i32, u64) {
            let (error, entry) =
                self.ask(Opcode::Lookup as u32, dir, format!("{name}\0").as_bytes());
            let node = entry
                .get(..8)
                .map_or(0, |n| u64::from_le_bytes(n.try_into().unwrap()));
            (error, node)
        }

        fn open(&mut self, node: u64, flags: i32) -> (i32, u64) {
            let (error, out) = self.ask(
                Opcode::Open as u32,
                node,
                &[flags.to_le_bytes(), [0; 4]].concat(),
            );
            let handle = out
                .get(..8)
                .map_or(0, |h| u64::from_le_bytes(h.try_into().unwrap()));
            (error, handle)
        }

        fn mkdir(&mut self, name: &str) -> i32 {
            let mut body = [0o755u32.to_le_bytes(), [0; 4]].concat();
            body.extend(format!("{name}\0").as_bytes());
            self.ask(Opcode::Mkdir as u32, ROOT, &body).0
        }
    }

    impl Drop for Shared {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.dir.parent().unwrap());
        }
    }

    #[test]
    fn the_guest_reads_and_writes_the_shared_directory() {
        let mut shared = Shared::new("rw", false);
        let (error, node) = shared.lookup("hello");
        assert_eq!(error, 0);
        let (error, handle) = shared.open(node, libc::O_RDONLY);
        assert_eq!(error, 0);
        // fh, offset, size, read_flags, lock_owner, flags, padding
        let read = [
            &handle.to_le_bytes()[..],
            &0u64.to_le_bytes(),
            &64u32.to_le_bytes(),
            &[0; 4],
            &[0; 8],
            &[0; 8],
        ]
        .concat();
        assert_eq!(
            shared.ask(Opcode::Read as u32, node, &read),
            (0, b"hi there".to_vec())
        );
        assert_eq!(shared.mkdir("made"), 0);
        assert!(shared.dir.join("made").is_dir(), "the host sees it");
        assert_eq!(shared.lookup("missing").0, -libc::ENOENT);
    }

    #[test]
    fn nothing_outside_the_shared_directory_is_reachable() {
        let mut shared = Shared::new("confined", false);
        let (error, above) = shared.lookup("..");
        assert_eq!(error, 0, "the root's parent is the root itself");
        assert_eq!(shared.lookup_in(above, "outside").0, -libc::ENOENT);
        assert_eq!(shared.lookup_in(above, "hello").0, 0);
        assert_eq!(shared.lookup("../outside").0, -libc::EINVAL);
    }

    #[test]
    fn a_read_only_share_refuses_changes_and_unknown_requests_are_refused() {
        let mut shared = Shared::new("ro", true);
        let (error, node) = shared.lookup("hello");
        assert_eq!(error, 0);
        assert_eq!(shared.open(node, libc::O_RDONLY).0, 0);
        assert_eq!(shared.open(node, libc::O_WRONLY).0, -libc::EROFS);
        assert_eq!(
            shared.open(node, libc::O_RDONLY | libc::O_TRUNC).0,
            -libc::EROFS
        );
        assert_eq!(shared.mkdir("made"), -libc::EROFS);
        assert!(!shared.dir.join("made").exists());
        assert_eq!(
            std::fs::read_to_string(shared.dir.join("hello")).unwrap(),
            "hi there"
        );
        // Opcodes FUSE does not have.
        for opcode in [7, 19, 50, u32::MAX] {
            assert_eq!(shared.ask(opcode, ROOT, &[]).0, -libc::ENOSYS, "{opcode}");
        }
    }

    #[test]
    fn a_tag_is_one_to_36_bytes() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dir = std::env::temp_dir();
        let dir = dir.to_str().unwrap();
        assert!(Fs::new(&mem, dir, "", false, false).is_err());
        assert!(Fs::new(&mem, dir, &"x".repeat(37), false, true).is_err());
        let fs = Fs::new(&mem, dir, &"x".repeat(36), false, true).unwrap();
        let mut config = [0u8; 40];
        fs.read_config(0, &mut config);
        assert_eq!(&config[..36], "x".repeat(36).as_bytes());
        assert_eq!(config[36..], 1u32.to_le_bytes());
        assert!(Fs::new(&mem, "/nonexistent/dir", "t", false, false).is_err());
    }
}
