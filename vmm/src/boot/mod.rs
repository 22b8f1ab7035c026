//! Loading a Linux guest: kernel (ELF vmlinux via PVH, or bzImage via the
//! 64-bit Linux boot protocol), initrd, command line, memory map, MP table,
//! and the boot vCPU's entry state.

pub mod mptable;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::hypervisor::regs::Table;
use crate::hypervisor::{EntryState, Segment};
use crate::memory::GuestMemory;

// Guest physical layout of the boot structures (below 1 MiB, as Firecracker).
const GDT_START: u64 = 0x500;
const IDT_START: u64 = 0x520;
const PVH_INFO_START: u64 = 0x6000;
const PVH_MODLIST_START: u64 = 0x6040;
const PVH_MEMMAP_START: u64 = 0x6080;
const ZERO_PAGE_START: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const PML4_START: u64 = 0x9000;
const PDPTE_START: u64 = 0xa000;
const PDE_START: u64 = 0xb000;
const CMDLINE_START: u64 = 0x20000;
/// x86 COMMAND_LINE_SIZE, including the NUL.
pub const CMDLINE_MAX: usize = 2048;
const EBDA_START: u64 = mptable::MPTABLE_START;
pub const HIMEM_START: u64 = 0x10_0000;

const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// The 64-bit entry point is 0x200 past the protected-mode kernel's start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const RFLAGS_RESERVED: u64 = 0x2;

// GDT: null, code, data, TSS; selectors are index * 8.
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x0000_8b00_0000_0067;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {}: {reason}", path.display())]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {}: {reason}", path.display())]
    Initrd { path: PathBuf, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot structures into guest memory: {0}")]
    Memory(String),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
}

type Result<T> = std::result::Result<T, Error>;

/// How the guest kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// ELF vmlinux through its PVH entry point (32-bit, paging off).
    Pvh { entry: u64 },
    /// bzImage through the 64-bit Linux boot protocol.
    Linux { entry: u64 },
}

/// Where the loaded pieces landed.
struct Loaded {
    protocol: Protocol,
    setup_header: Option<setup_header>,
    kernel_end: u64,
}

/// Loads kernel, initrd and command line into `mem` and returns the boot
/// vCPU's entry state.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    cpus: u8,
) -> Result<EntryState> {
    let loaded = load_kernel(mem, kernel)?;
    let (initrd_start, initrd_size) = load_initrd(mem, initrd, &loaded)?;
    let cmdline_len = load_cmdline(mem, cmdline)?;
    mptable::write(mem, cpus)?;
    let memmap = memory_map(mem);
    let state = match loaded.protocol {
        Protocol::Pvh { entry } => {
            write_pvh_info(mem, &memmap, initrd_start, initrd_size)?;
            write_gdt(mem, GDT_CODE32)?;
            pvh_entry_state(entry)
        }
        Protocol::Linux { entry } => {
            let hdr = loaded.setup_header.unwrap_or_default();
            write_zero_page(mem, hdr, &memmap, cmdline_len, initrd_start, initrd_size)?;
            write_gdt(mem, GDT_CODE64)?;
            write_page_tables(mem)?;
            linux64_entry_state(entry)
        }
    };
    Ok(state)
}

/// Kernel image formats we boot, told apart by their magic numbers.
#[derive(Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn detect_format(head: &[u8]) -> Option<Format> {
    const BZIMAGE_MAGIC_AT: usize = 0x202;
    if head.starts_with(b"\x7fELF") {
        Some(Format::Elf)
    } else if head.get(BZIMAGE_MAGIC_AT..BZIMAGE_MAGIC_AT + 4) == Some(b"HdrS") {
        Some(Format::BzImage)
    } else {
        None
    }
}

fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<Loaded> {
    let fail = |reason: String| Error::Kernel {
        path: path.to_owned(),
        reason,
    };
    let mut file = File::open(path)
        .and_then(image)
        .map_err(|e| fail(e.to_string()))?;
    let mut head = Vec::with_capacity(0x210);
    (&mut file)
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(|e| fail(e.to_string()))?;
    let format =
        detect_format(&head).ok_or_else(|| fail("neither an ELF vmlinux nor a bzImage".into()))?;
    let himem = Some(GuestAddress(HIMEM_START));
    if format == Format::BzImage {
        let res = BzImage::load(mem, None, &mut file, himem).map_err(|e| fail(loader_reason(e)))?;
        return bzimage_loaded(res).map_err(fail);
    }
    let res = Elf::load(mem, None, &mut file, himem).map_err(|e| fail(loader_reason(e)))?;
    let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
        return Err(fail(
            "ELF kernel has no PVH entry point (build with CONFIG_PVH)".into(),
        ));
    };
    Ok(Loaded {
        protocol: Protocol::Pvh {
            entry: entry.raw_value(),
        },
        setup_header: None,
        kernel_end: res.kernel_end,
    })
}

fn bzimage_loaded(res: KernelLoaderResult) -> std::result::Result<Loaded, String> {
    let hdr = res.setup_header.ok_or("bzImage without a setup header")?;
    const XLF_KERNEL_64: u16 = 1;
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err("bzImage has no 64-bit entry point".into());
    }
    // The kernel decompresses itself to pref_address and needs init_size there.
    let decompressed_end = hdr.pref_address.saturating_add(hdr.init_size.into());
    Ok(Loaded {
        protocol: Protocol::Linux {
            entry: res.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
        },
        setup_header: Some(hdr),
        kernel_end: res.kernel_end.max(decompressed_end),
    })
}

fn loader_reason(e: loader::Error) -> String {
    match e {
        loader::Error::Elf(_) | loader::Error::Bzimage(_) => {
            format!("not a loadable kernel image ({e})")
        }
        e => format!("does not fit in guest memory ({e})"),
    }
}

/// A kernel or initrd to copy into guest memory: on Unix the file itself,
/// which vm-memory reads straight into guest memory; elsewhere its bytes,
/// read first, because vm-memory reads only from Unix files.
#[cfg(unix)]
type Image = File;
#[cfg(not(unix))]
type Image = std::io::Cursor<Vec<u8>>;

#[cfg(unix)]
fn image(file: File) -> std::io::Result<Image> {
    Ok(file)
}

#[cfg(not(unix))]
fn image(mut file: File) -> std::io::Result<Image> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(std::io::Cursor::new(bytes))
}

/// Places the initrd at the top of low RAM, page aligned, above the kernel.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel: &Loaded) -> Result<(u64, u64)> {
    let fail = |reason: String| Error::Initrd {
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(|e| fail(e.to_string()))?;
    let size = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let mut file = image(file).map_err(|e| fail(e.to_string()))?;
    if size == 0 {
        return Err(fail("empty file".into()));
    }
    let addr_max = kernel
        .setup_header
        .map_or(u64::MAX, |h| h.initrd_addr_max.into());
    let low_ram_end = mem
        .iter()
        .next()
        .map_or(0, |r| r.start_addr().raw_value() + r.len());
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let start = top
        .checked_sub(size)
        .map(|s| s & !0xfff)
        .filter(|&s| s >= kernel.kernel_end)
        .ok_or_else(|| {
            fail(format!(
                "{} bytes do not fit in guest memory above the kernel; raise --memory",
                size
            ))
        })?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| fail(format!("reading into guest memory: {e}")))?;
    Ok((start, size))
}

fn load_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<usize> {
    let cmdline =
        Cmdline::try_from(cmdline, CMDLINE_MAX).map_err(|e| Error::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    Ok(cmdline.as_cstring().map_or(0, |c| c.as_bytes().len()))
}

/// The e820 map: conventional memory below the EBDA, then all RAM from 1 MiB.
fn memory_map(mem: &GuestMemory) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

fn write_pvh_info(mem: &GuestMemory, memmap: &[(u64, u64)], initrd: u64, size: u64) -> Result<()> {
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: 1,
        modlist_paddr: PVH_MODLIST_START,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let entries: Vec<_> = memmap
        .iter()
        .map(|&(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let module = hvm_modlist_entry {
        paddr: initrd,
        size,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&entries, GuestAddress(PVH_MEMMAP_START));
    params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| Error::Memory(e.to_string()))
}

fn write_zero_page(
    mem: &GuestMemory,
    hdr: setup_header,
    memmap: &[(u64, u64)],
    cmdline_len: usize,
    initrd: u64,
    initrd_size: u64,
) -> Result<()> {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.ramdisk_image = initrd as u32;
    params.hdr.ramdisk_size = initrd_size as u32;
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(memmap) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = memmap.len() as u8;
    let params = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&params, mem).map_err(|e| Error::Memory(e.to_string()))
}

fn write_gdt(mem: &GuestMemory, code: u64) -> Result<()> {
    let gdt = [0, code, GDT_DATA, GDT_TSS];
    let write = |value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    for (i, entry) in gdt.iter().enumerate() {
        write(*entry, GDT_START + 8 * i as u64)?;
    }
    write(0, IDT_START)
}

/// Identity-maps the first GiB with 2 MiB pages for the 64-bit entry.
fn write_page_tables(mem: &GuestMemory) -> Result<()> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let write = |value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    write(PDPTE_START | PRESENT_RW, PML4_START)?;
    write(PDE_START | PRESENT_RW, PDPTE_START)?;
    for i in 0..512u64 {
        write((i << 21) | PRESENT_RW | PAGE_SIZE_2M, PDE_START + i * 8)?;
    }
    Ok(())
}

/// Flat segments from our GDT with `code` as the code descriptor, entering
/// at `entry`: what both boot protocols start from.
fn flat_state(code: u64, entry: u64) -> EntryState {
    EntryState {
        rip: entry,
        rflags: RFLAGS_RESERVED,
        code: Segment::from_gdt_entry(code, 0x08),
        data: Segment::from_gdt_entry(GDT_DATA, 0x10),
        tss: Segment::from_gdt_entry(GDT_TSS, 0x18),
        gdt: Table {
            base: GDT_START,
            limit: 4 * 8 - 1,
        },
        idt: Table {
            base: IDT_START,
            limit: 8 - 1,
        },
        ..Default::default()
    }
}

/// PVH: 32-bit protected mode, paging off, RBX = hvm_start_info.
pub fn pvh_entry_state(entry: u64) -> EntryState {
    EntryState {
        rbx: PVH_INFO_START,
        cr0: X86_CR0_PE | X86_CR0_ET,
        ..flat_state(GDT_CODE32, entry)
    }
}

/// Linux 64-bit boot protocol: long mode, identity paging, RSI = boot_params.
pub fn linux64_entry_state(entry: u64) -> EntryState {
    EntryState {
        rsp: BOOT_STACK,
        rsi: ZERO_PAGE_START,
        cr0: X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
        cr3: PML4_START,
        cr4: X86_CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        ..flat_state(GDT_CODE64, entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_is_flat_32bit_protected_mode() {
        let s = pvh_entry_state(0x100_0000);
        assert_eq!((s.rip, s.rbx), (0x100_0000, PVH_INFO_START));
        assert_eq!(s.cr0 & X86_CR0_PG, 0, "paging off");
        assert_eq!(s.efer, 0);
        assert!(s.code.db && !s.code.l, "32-bit code segment");
        assert_eq!((s.code.base, s.code.limit), (0, 0xffff_ffff));
        assert_eq!(s.data.selector, 0x10);
    }

    #[test]
    fn linux64_entry_is_long_mode_with_boot_params_in_rsi() {
        let s = linux64_entry_state(0x100_200);
        assert_eq!(
            (s.rip, s.rsi, s.cr3),
            (0x100_200, ZERO_PAGE_START, PML4_START)
        );
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert!(s.code.l && !s.code.db, "64-bit code segment");
    }

    #[test]
    fn detects_kernel_formats_by_magic() {
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(Format::BzImage));
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(Format::Elf));
        assert_eq!(detect_format(b"this is not a kernel\n"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn memory_map_skips_the_bios_hole() {
        let mem = crate::memory::create(64 << 20).unwrap();
        assert_eq!(
            memory_map(&mem),
            vec![(0, EBDA_START), (HIMEM_START, (64 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = crate::memory::create(64 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pde = |i: u64| {
            mem.read_obj::<u64>(GuestAddress(PDE_START + 8 * i))
                .unwrap()
        };
        assert_eq!(pde(0), 0x83);
        assert_eq!(pde(511), (511 << 21) | 0x83);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(),
            PDPTE_START | 3
        );
    }
}
