//! Backend-neutral half of the WHP backend: register lists, bit layouts of
//! WHP's C bitfields, CPUID tables and the exit-translation table. Nothing
//! here touches Windows types, so all of it is unit-tested on Linux; `whp`
//! only converts these values to and from the `windows` crate's structs.
// Built on other hosts for its tests only.
#![cfg_attr(not(windows), allow(dead_code))]

use super::regs::Table;
use super::{CpuidEntry, EntryState, Segment};

/// Registers this backend writes. `whp` maps each to a `WHV_REGISTER_NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Rax,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rsp,
    Rip,
    Rflags,
    Cr0,
    Cr3,
    Cr4,
    Efer,
    Cs,
    Ds,
    Es,
    Fs,
    Gs,
    Ss,
    Tr,
    Gdtr,
    Idtr,
    ApicBase,
    Pat,
    MtrrDefType,
    FpControlStatus,
    XmmControlStatus,
}

/// A segment register in WHP's layout (`WHV_X64_SEGMENT_REGISTER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentValue {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// VMX-style access rights, see [`segment_attributes`].
    pub attributes: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    U64(u64),
    Segment(SegmentValue),
    Table(Table),
    /// x87 control word; status and abridged tag are written as zero (empty stack).
    FpControl {
        fcw: u16,
    },
    Mxcsr(u32),
}

/// Packs a segment's attributes the way WHP (and VMX access rights) want
/// them: type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15.
/// AVL is left clear: nothing in uvm uses it.
pub fn segment_attributes(seg: &Segment) -> u16 {
    u16::from(seg.type_ & 0xf)
        | u16::from(seg.s) << 4
        | u16::from(seg.dpl & 3) << 5
        | u16::from(seg.present) << 7
        | u16::from(seg.l) << 13
        | u16::from(seg.db) << 14
        | u16::from(seg.g) << 15
}

fn segment(seg: &Segment) -> Value {
    Value::Segment(SegmentValue {
        base: seg.base,
        limit: seg.limit,
        selector: seg.selector,
        attributes: segment_attributes(seg),
    })
}

/// The registers that load `state`, in the order they are handed to
/// `WHvSetVirtualProcessorRegisters`: control registers and EFER first so
/// the mode is settled before the segments that depend on it, RIP last.
/// FS/GS/ES/SS get the data segment like DS; LDTR keeps its reset value.
pub fn entry_registers(state: &EntryState) -> Vec<(Reg, Value)> {
    let data = segment(&state.data);
    vec![
        (Reg::Cr0, Value::U64(state.cr0)),
        (Reg::Cr3, Value::U64(state.cr3)),
        (Reg::Cr4, Value::U64(state.cr4)),
        (Reg::Efer, Value::U64(state.efer)),
        (Reg::Gdtr, Value::Table(state.gdt)),
        (Reg::Idtr, Value::Table(state.idt)),
        (Reg::Cs, segment(&state.code)),
        (Reg::Ds, data),
        (Reg::Es, data),
        (Reg::Fs, data),
        (Reg::Gs, data),
        (Reg::Ss, data),
        (Reg::Tr, segment(&state.tss)),
        (Reg::Rflags, Value::U64(state.rflags)),
        (Reg::Rsp, Value::U64(state.rsp)),
        (Reg::Rbx, Value::U64(state.rbx)),
        (Reg::Rsi, Value::U64(state.rsi)),
        (Reg::Rip, Value::U64(state.rip)),
    ]
}

pub const APIC_DEFAULT_BASE: u64 = 0xfee0_0000;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_BSP: u64 = 1 << 8;
/// Power-on PAT (WB, WT, UC-, UC repeated).
const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// MTRRs enabled, fixed ranges off, default type write-back: all RAM is WB
/// without the guest having to program variable ranges.
const MTRR_DEF_TYPE_WB: u64 = (1 << 11) | 6;
const FCW_RESET: u16 = 0x37f;
const MXCSR_RESET: u32 = 0x1f80;

/// MSR and FPU state `Vcpu::init` writes, mirroring what the KVM backend
/// sets through KVM_SET_MSRS / KVM_SET_FPU.
pub fn init_registers(vcpu_id: u8) -> Vec<(Reg, Value)> {
    let bsp = if vcpu_id == 0 { APIC_BASE_BSP } else { 0 };
    vec![
        (
            Reg::ApicBase,
            Value::U64(APIC_DEFAULT_BASE | APIC_BASE_ENABLE | bsp),
        ),
        (Reg::Pat, Value::U64(PAT_RESET)),
        (Reg::MtrrDefType, Value::U64(MTRR_DEF_TYPE_WB)),
        (Reg::FpControlStatus, Value::FpControl { fcw: FCW_RESET }),
        (Reg::XmmControlStatus, Value::Mxcsr(MXCSR_RESET)),
    ]
}

/// Size of the xAPIC register page WHP exchanges through
/// `WHv{Get,Set}VirtualProcessorInterruptControllerState2`.
pub const LAPIC_PAGE_SIZE: usize = 4096;
const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_LINT1: usize = 0x360;
const LVT_DELIVERY_MODE_MASK: u32 = 0x7 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_EXTINT: u32 = 0x7 << 8;
const LVT_DELIVERY_NMI: u32 = 0x4 << 8;

fn set_lvt_delivery(page: &mut [u8; LAPIC_PAGE_SIZE], offset: usize, mode: u32) {
    let reg: &mut [u8; 4] = (&mut page[offset..offset + 4]).try_into().unwrap();
    let value = u32::from_le_bytes(*reg) & !(LVT_DELIVERY_MODE_MASK | LVT_MASKED);
    *reg = (value | mode).to_le_bytes();
}

/// Puts the LAPIC in virtual-wire mode (LINT0 = ExtINT, LINT1 = NMI), the
/// state firmware leaves it in and the KVM backend sets with KVM_SET_LAPIC.
pub fn set_virtual_wire(page: &mut [u8; LAPIC_PAGE_SIZE]) {
    set_lvt_delivery(page, LAPIC_LVT_LINT0, LVT_DELIVERY_EXTINT);
    set_lvt_delivery(page, LAPIC_LVT_LINT1, LVT_DELIVERY_NMI);
}

/// `WHV_CAPABILITY_FEATURES.LocalApicEmulation`.
pub const FEATURE_LOCAL_APIC_EMULATION: u64 = 1 << 1;
/// `WHV_EXTENDED_VM_EXITS.X64CpuidExit`.
pub const EXTENDED_EXIT_CPUID: u64 = 1 << 0;

const MAX_BASIC_LEAF: u32 = 0x3f;
const EXTENDED_BASE: u32 = 0x8000_0000;
const MAX_EXTENDED_LEAF: u32 = EXTENDED_BASE + 0x3f;
const MAX_SUBLEAF: u32 = 63;

/// Leaves put in `WHvPartitionPropertyCodeCpuidExitList`. The list has to
/// be fixed before `WHvSetupPartition`, long before `Vcpu::init` sees the
/// table, so it covers every leaf a table from `supported_cpuid` can hold.
pub fn cpuid_exit_leaves() -> Vec<u32> {
    (0..=MAX_BASIC_LEAF)
        .chain(EXTENDED_BASE..=MAX_EXTENDED_LEAF)
        .collect()
}

/// How the subleaves of an indexed CPUID leaf are enumerated.
enum Subleaves {
    /// Cache descriptors (4, 0x8000_001d): until the cache type is null.
    UntilNullCache,
    /// Topology levels (0xb, 0x1f): until the level type is invalid.
    UntilNullLevel,
    /// Subleaf 0's EAX is the highest subleaf (7, 0x14, 0x17, 0x18, 0x1d).
    CountInEax,
    /// Sparse bitmaps (0xd, 0xf, 0x10, 0x12): scan, keep 0, 1 and non-zero.
    Scan,
}

fn subleaves(function: u32) -> Option<Subleaves> {
    match function {
        0x4 | 0x8000_001d => Some(Subleaves::UntilNullCache),
        0xb | 0x1f => Some(Subleaves::UntilNullLevel),
        0x7 | 0x14 | 0x17 | 0x18 | 0x1d => Some(Subleaves::CountInEax),
        0xd | 0xf | 0x10 | 0x12 => Some(Subleaves::Scan),
        _ => None,
    }
}

fn entry(function: u32, index: u32, indexed: bool, r: [u32; 4]) -> CpuidEntry {
    let [eax, ebx, ecx, edx] = r;
    CpuidEntry {
        function,
        index,
        indexed,
        eax,
        ebx,
        ecx,
        edx,
    }
}

/// Builds a KVM-style supported-CPUID table by asking `query(function,
/// index)` -> [eax, ebx, ecx, edx] for every basic and extended leaf and
/// the subleaves of the indexed ones.
pub fn enumerate_cpuid<E>(
    mut query: impl FnMut(u32, u32) -> Result<[u32; 4], E>,
) -> Result<Vec<CpuidEntry>, E> {
    let max_basic = query(0, 0)?[0].min(MAX_BASIC_LEAF);
    let max_ext = query(EXTENDED_BASE, 0)?[0].clamp(EXTENDED_BASE, MAX_EXTENDED_LEAF);
    let mut table = Vec::new();
    for function in (0..=max_basic).chain(EXTENDED_BASE..=max_ext) {
        let first = query(function, 0)?;
        let Some(rule) = subleaves(function) else {
            table.push(entry(function, 0, false, first));
            continue;
        };
        table.push(entry(function, 0, true, first));
        let last = match rule {
            Subleaves::CountInEax => first[0].min(MAX_SUBLEAF),
            _ => MAX_SUBLEAF,
        };
        let done = |r: &[u32; 4]| match rule {
            Subleaves::UntilNullCache => r[0] & 0x1f == 0,
            Subleaves::UntilNullLevel => (r[2] >> 8) & 0xff == 0,
            Subleaves::CountInEax | Subleaves::Scan => false,
        };
        if done(&first) {
            continue;
        }
        for index in 1..=last {
            let r = query(function, index)?;
            if done(&r) {
                break;
            }
            if matches!(rule, Subleaves::Scan) && index > 1 && r == [0; 4] {
                continue;
            }
            table.push(entry(function, index, true, r));
        }
    }
    Ok(table)
}

/// Answer to a CPUID exit: the table's entry for (function, index) if it
/// has one, else what the hypervisor would have returned. [eax, ebx, ecx, edx].
pub fn cpuid_result(
    table: &[CpuidEntry],
    function: u32,
    index: u32,
    default: [u32; 4],
) -> [u32; 4] {
    table
        .iter()
        .find(|e| e.function == function && (!e.indexed || e.index == index))
        .map_or(default, |e| [e.eax, e.ebx, e.ecx, e.edx])
}

/// `WHV_X64_IO_PORT_ACCESS_INFO`, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAccess {
    pub write: bool,
    /// Bytes: 1, 2 or 4 for well-formed exits.
    pub size: u8,
    pub string: bool,
    pub rep: bool,
}

impl PortAccess {
    /// IsWrite 0, AccessSize 3:1, StringOp 4, RepPrefix 5.
    pub fn from_bits(bits: u32) -> Self {
        PortAccess {
            write: bits & 1 != 0,
            size: ((bits >> 1) & 0x7) as u8,
            string: bits & (1 << 4) != 0,
            rep: bits & (1 << 5) != 0,
        }
    }
}

/// `WHV_VP_EXIT_CONTEXT`'s InstructionLength (bits 3:0 of its bitfield byte).
pub fn instruction_length(bits: u8) -> u64 {
    u64::from(bits & 0xf)
}

/// RAX after an IN of `data.len()` bytes: AL/AX keep the rest of RAX, a
/// 32-bit IN zero-extends into the upper half like any 32-bit write.
pub fn merge_port_read(rax: u64, data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..data.len()].copy_from_slice(data);
    let value = u64::from_le_bytes(bytes);
    match data.len() {
        1 => (rax & !0xff) | value,
        2 => (rax & !0xffff) | value,
        _ => value,
    }
}

/// `WHV_EMULATOR_STATUS`: None when EmulationSuccessful (bit 0) is set,
/// else the names of the failure bits for an InternalError detail.
pub fn emulator_failure(bits: u32) -> Option<String> {
    const NAMES: [&str; 9] = [
        "InternalEmulationFailure",
        "IoPortCallbackFailed",
        "MemoryCallbackFailed",
        "TranslateGvaPageCallbackFailed",
        "TranslateGvaPageCallbackGpaIsNotAligned",
        "GetVirtualProcessorRegistersCallbackFailed",
        "SetVirtualProcessorRegistersCallbackFailed",
        "InterruptCausedIntercept",
        "GuestCannotBeFaulted",
    ];
    if bits & 1 != 0 {
        return None;
    }
    let set: Vec<&str> = NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << (i + 1)) != 0)
        .map(|(_, name)| *name)
        .collect();
    Some(format!(
        "instruction emulation failed (status {bits:#x}: {})",
        set.join(", ")
    ))
}

/// The WHV_INTERRUPT_TYPE for an IOAPIC delivery mode; None for those WHP
/// cannot request (SMI, ExtINT, reserved).
pub fn interrupt_type(delivery_mode: u8) -> Option<u8> {
    match delivery_mode {
        0 => Some(0), // fixed
        1 => Some(1), // lowest priority
        4 => Some(4), // NMI
        5 => Some(5), // INIT
        _ => None,
    }
}

/// `WHV_INTERRUPT_CONTROL`'s first word: Type 7:0, DestinationMode 11:8,
/// TriggerMode 15:12, the rest reserved.
pub fn interrupt_control(kind: u8, destination_mode: u8, trigger_mode: u8) -> u64 {
    u64::from(kind) | u64::from(destination_mode & 0xf) << 8 | u64::from(trigger_mode & 0xf) << 12
}

/// A mapped guest RAM range, kept because WHP has no slots and the
/// instruction emulator reads and writes guest RAM through us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub slot: u32,
    pub guest: u64,
    /// Host virtual address of `guest`.
    pub host: usize,
    pub size: u64,
    pub read_only: bool,
}

/// Host address backing guest bytes gpa..gpa+len when they all lie in one
/// RAM region that allows the access; None means "treat as MMIO" (like KVM,
/// writes to read-only regions go to the device model).
pub fn ram_address(regions: &[Region], gpa: u64, len: u64, write: bool) -> Option<usize> {
    regions.iter().find_map(|r| {
        let offset = gpa.checked_sub(r.guest)?;
        let end = offset.checked_add(len)?;
        (end <= r.size && !(write && r.read_only)).then(|| r.host + offset as usize)
    })
}

/// The WHV exit reasons the run loop tells apart, with the context it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    IoPortAccess(PortAccess),
    MemoryAccess,
    Halt,
    UnrecoverableException,
    Canceled,
    InvalidVpRegisterValue,
    UnsupportedFeature { feature: i32, parameter: u64 },
    InterruptWindow,
    ApicEoi { vector: u32 },
    Cpuid,
    MsrAccess { msr: u32 },
    Other(i32),
}

/// What the run loop does about an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Plain IN/OUT: answer through IoHandler, advance RIP, return Io.
    PortIo(PortAccess),
    /// INS/OUTS (maybe REP): run the instruction emulator, return Io.
    EmulateIo,
    /// MMIO: run the instruction emulator, return Io.
    EmulateMmio,
    /// HLT with IF set: wait for an interrupt or cancel, then re-enter.
    WaitForInterrupt,
    /// Answer CPUID from the vCPU's table and re-enter.
    AnswerCpuid,
    /// Nothing to do; re-enter.
    Resume,
    Shutdown,
    Interrupted,
    InternalError(String),
    Unexpected(String),
}

pub fn exit_action(kind: ExitKind) -> ExitAction {
    match kind {
        ExitKind::IoPortAccess(access) if access.string => ExitAction::EmulateIo,
        ExitKind::IoPortAccess(access) if matches!(access.size, 1 | 2 | 4) => {
            ExitAction::PortIo(access)
        }
        ExitKind::IoPortAccess(access) => {
            ExitAction::InternalError(format!("port access of {} bytes", access.size))
        }
        ExitKind::MemoryAccess => ExitAction::EmulateMmio,
        // With interrupts off too (`cli; hlt`: Linux parks the other CPUs
        // so on a reboot while the boot CPU resets through the i8042): the
        // vCPU waits, as a halted CPU would, instead of ending the VM.
        ExitKind::Halt => ExitAction::WaitForInterrupt,
        // Triple fault.
        ExitKind::UnrecoverableException => ExitAction::Shutdown,
        ExitKind::Canceled => ExitAction::Interrupted,
        ExitKind::InvalidVpRegisterValue => {
            ExitAction::InternalError("invalid virtual processor register value".into())
        }
        ExitKind::UnsupportedFeature { feature, parameter } => ExitAction::InternalError(format!(
            "unsupported feature {feature} (parameter {parameter:#x})"
        )),
        // Only delivered if asked for through DeliverabilityNotifications,
        // or for level-triggered interrupts; we use neither, so just go on.
        ExitKind::InterruptWindow | ExitKind::ApicEoi { .. } => ExitAction::Resume,
        ExitKind::Cpuid => ExitAction::AnswerCpuid,
        ExitKind::MsrAccess { msr } => {
            ExitAction::Unexpected(format!("MSR {msr:#x} exit, MSR exits are not enabled"))
        }
        ExitKind::Other(code) => ExitAction::Unexpected(format!("WHV exit reason {code:#x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(selector: u16, type_: u8, s: bool, db: bool, l: bool) -> Segment {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: true,
            dpl: 0,
            db,
            s,
            l,
            g: true,
        }
    }

    #[test]
    fn flat_64bit_code_attributes() {
        assert_eq!(
            segment_attributes(&seg(0x08, 0xb, true, false, true)),
            0xa09b
        );
    }

    #[test]
    fn flat_32bit_code_and_data_attributes() {
        assert_eq!(
            segment_attributes(&seg(0x10, 0xb, true, true, false)),
            0xc09b
        );
        assert_eq!(
            segment_attributes(&seg(0x18, 0x3, true, true, false)),
            0xc093
        );
    }

    #[test]
    fn tss_attributes() {
        let tss = Segment {
            base: 0,
            limit: 0x67,
            selector: 0x20,
            type_: 0xb,
            present: true,
            ..Segment::default()
        };
        assert_eq!(segment_attributes(&tss), 0x008b);
    }

    #[test]
    fn dpl_and_type_are_masked() {
        let s = Segment {
            type_: 0xff,
            dpl: 0xff,
            ..Segment::default()
        };
        assert_eq!(segment_attributes(&s), 0x006f);
    }

    fn pvh_state() -> EntryState {
        EntryState {
            rip: 0x100_0000,
            rsp: 0,
            rflags: 0x2,
            rbx: 0x6000,
            rsi: 0,
            cr0: 0x11,
            cr3: 0,
            cr4: 0,
            efer: 0,
            code: seg(0x10, 0xb, true, true, false),
            data: seg(0x18, 0x3, true, true, false),
            tss: Segment {
                limit: 0x67,
                selector: 0x20,
                type_: 0xb,
                present: true,
                ..Segment::default()
            },
            gdt: Table {
                base: 0x500,
                limit: 0x27,
            },
            idt: Table { base: 0, limit: 0 },
        }
    }

    fn long_mode_state() -> EntryState {
        EntryState {
            rip: 0x100_0200,
            rsp: 0x8ff0,
            rbx: 0,
            rsi: 0x7000,
            cr0: 0x8000_0011,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            code: seg(0x08, 0xb, true, false, true),
            data: seg(0x10, 0x3, true, true, false),
            ..pvh_state()
        }
    }

    fn value(list: &[(Reg, Value)], reg: Reg) -> Value {
        list.iter().find(|(r, _)| *r == reg).unwrap().1
    }

    const ORDER: [Reg; 18] = [
        Reg::Cr0,
        Reg::Cr3,
        Reg::Cr4,
        Reg::Efer,
        Reg::Gdtr,
        Reg::Idtr,
        Reg::Cs,
        Reg::Ds,
        Reg::Es,
        Reg::Fs,
        Reg::Gs,
        Reg::Ss,
        Reg::Tr,
        Reg::Rflags,
        Reg::Rsp,
        Reg::Rbx,
        Reg::Rsi,
        Reg::Rip,
    ];

    #[test]
    fn pvh_register_list() {
        let list = entry_registers(&pvh_state());
        let regs: Vec<Reg> = list.iter().map(|(r, _)| *r).collect();
        assert_eq!(regs, ORDER);
        assert_eq!(value(&list, Reg::Rbx), Value::U64(0x6000));
        assert_eq!(value(&list, Reg::Rsi), Value::U64(0));
        assert_eq!(value(&list, Reg::Cr0), Value::U64(0x11));
        assert_eq!(value(&list, Reg::Cr4), Value::U64(0));
        assert_eq!(value(&list, Reg::Efer), Value::U64(0));
        assert_eq!(value(&list, Reg::Rip), Value::U64(0x100_0000));
        let Value::Segment(cs) = value(&list, Reg::Cs) else {
            panic!("CS is not a segment")
        };
        assert_eq!((cs.selector, cs.attributes), (0x10, 0xc09b));
        for r in [Reg::Ds, Reg::Es, Reg::Fs, Reg::Gs, Reg::Ss] {
            let Value::Segment(s) = value(&list, r) else {
                panic!("{r:?} is not a segment")
            };
            assert_eq!(
                (s.selector, s.attributes, s.limit),
                (0x18, 0xc093, 0xffff_ffff)
            );
        }
        let Value::Segment(tr) = value(&list, Reg::Tr) else {
            panic!("TR is not a segment")
        };
        assert_eq!((tr.selector, tr.attributes, tr.limit), (0x20, 0x008b, 0x67));
        assert_eq!(
            value(&list, Reg::Gdtr),
            Value::Table(Table {
                base: 0x500,
                limit: 0x27
            })
        );
    }

    #[test]
    fn long_mode_register_list() {
        let list = entry_registers(&long_mode_state());
        let regs: Vec<Reg> = list.iter().map(|(r, _)| *r).collect();
        assert_eq!(regs, ORDER);
        assert_eq!(value(&list, Reg::Rsi), Value::U64(0x7000));
        assert_eq!(value(&list, Reg::Rbx), Value::U64(0));
        assert_eq!(value(&list, Reg::Cr0), Value::U64(0x8000_0011));
        assert_eq!(value(&list, Reg::Cr3), Value::U64(0x9000));
        assert_eq!(value(&list, Reg::Cr4), Value::U64(0x20));
        assert_eq!(value(&list, Reg::Efer), Value::U64(0x500));
        assert_eq!(value(&list, Reg::Rsp), Value::U64(0x8ff0));
        let Value::Segment(cs) = value(&list, Reg::Cs) else {
            panic!("CS is not a segment")
        };
        assert_eq!((cs.selector, cs.attributes), (0x08, 0xa09b));
    }

    #[test]
    fn init_registers_bsp_and_ap() {
        let bsp = init_registers(0);
        assert_eq!(value(&bsp, Reg::ApicBase), Value::U64(0xfee0_0900));
        assert_eq!(
            value(&init_registers(1), Reg::ApicBase),
            Value::U64(0xfee0_0800)
        );
        assert_eq!(value(&bsp, Reg::Pat), Value::U64(0x0007_0406_0007_0406));
        assert_eq!(value(&bsp, Reg::MtrrDefType), Value::U64(0x806));
        assert_eq!(
            value(&bsp, Reg::FpControlStatus),
            Value::FpControl { fcw: 0x37f }
        );
        assert_eq!(value(&bsp, Reg::XmmControlStatus), Value::Mxcsr(0x1f80));
    }

    #[test]
    fn virtual_wire_lint_setup() {
        let mut page = [0u8; LAPIC_PAGE_SIZE];
        // Reset value: masked. Vector bits must survive.
        page[0x350..0x354].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        page[0x360..0x364].copy_from_slice(&0x0001_0002u32.to_le_bytes());
        set_virtual_wire(&mut page);
        let read = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
        assert_eq!(read(0x350), 0x700);
        assert_eq!(read(0x360), 0x402);
        assert!(page[..0x350].iter().all(|b| *b == 0));
    }

    #[test]
    fn cpuid_exit_list_covers_basic_and_extended() {
        let leaves = cpuid_exit_leaves();
        assert_eq!(leaves.len(), 128);
        assert!(leaves.contains(&0) && leaves.contains(&0x3f));
        assert!(leaves.contains(&0x8000_0000) && leaves.contains(&0x8000_003f));
        assert!(!leaves.contains(&0x4000_0000));
    }

    /// A small fake CPU: max basic leaf 0xd, max extended 0x8000_0008.
    fn fake_cpu(function: u32, index: u32) -> Result<[u32; 4], ()> {
        Ok(match (function, index) {
            (0, _) => [0xd, 1, 2, 3],
            (4, i) if i < 3 => [0x121 + i, 0, 0, 0],
            (4, _) => [0; 4],
            (7, 0) => [1, 0xaa, 0, 0],
            (7, 1) => [0xbb, 0, 0, 0],
            (0xb, 0) => [1, 1, 0x100, 0],
            (0xb, 1) => [4, 2, 0x201, 0],
            (0xb, _) => [0, 0, index, 0],
            (0xd, 0) => [7, 0, 0, 0],
            (0xd, 1) => [0, 0, 0, 0],
            (0xd, 2) => [0x100, 0x240, 0, 0],
            (0xd, _) => [0; 4],
            (0x8000_0000, _) => [0x8000_0008, 0, 0, 0],
            (f, i) => [f, i, 0, 0],
        })
    }

    #[test]
    fn enumerate_cpuid_follows_subleaf_rules() {
        let table = enumerate_cpuid(fake_cpu).unwrap();
        let find = |f: u32, i: u32| table.iter().find(|e| e.function == f && e.index == i);
        let count = |f: u32| table.iter().filter(|e| e.function == f).count();
        assert_eq!(count(4), 3);
        assert_eq!(count(7), 2);
        assert_eq!(count(0xb), 2);
        // 0xd keeps subleaves 0 and 1 (even when zero) and non-zero ones.
        assert_eq!(count(0xd), 3);
        assert!(find(0xd, 1).is_some() && find(0xd, 2).is_some());
        assert!(find(1, 0).is_some_and(|e| !e.indexed));
        assert!(find(7, 1).is_some_and(|e| e.indexed && e.eax == 0xbb));
        assert!(find(0xe, 0).is_none());
        assert!(find(0x8000_0008, 0).is_some());
        assert!(find(0x8000_0009, 0).is_none());
    }

    #[test]
    fn enumerate_cpuid_propagates_errors() {
        let r = enumerate_cpuid(|f, _| {
            if f == 2 {
                Err("boom")
            } else {
                fake_cpu(f, 0).map_err(|_| "x")
            }
        });
        assert_eq!(r, Err("boom"));
    }

    #[test]
    fn cpuid_result_uses_table_then_default() {
        let table = [
            CpuidEntry {
                function: 1,
                eax: 0x11,
                ebx: 0x22,
                ecx: 0x33,
                edx: 0x44,
                ..CpuidEntry::default()
            },
            CpuidEntry {
                function: 7,
                index: 1,
                indexed: true,
                eax: 0x77,
                ..CpuidEntry::default()
            },
        ];
        let default = [9, 9, 9, 9];
        // Non-indexed leaves ignore ECX.
        assert_eq!(
            cpuid_result(&table, 1, 5, default),
            [0x11, 0x22, 0x33, 0x44]
        );
        assert_eq!(cpuid_result(&table, 7, 1, default), [0x77, 0, 0, 0]);
        assert_eq!(cpuid_result(&table, 7, 0, default), default);
        assert_eq!(cpuid_result(&table, 2, 0, default), default);
    }

    #[test]
    fn port_access_bits() {
        // out dx, al
        assert_eq!(
            PortAccess::from_bits(0b00_0011),
            PortAccess {
                write: true,
                size: 1,
                string: false,
                rep: false
            }
        );
        // rep insd
        assert_eq!(
            PortAccess::from_bits(0b11_1000),
            PortAccess {
                write: false,
                size: 4,
                string: true,
                rep: true
            }
        );
    }

    #[test]
    fn instruction_length_is_low_nibble() {
        assert_eq!(instruction_length(0xa2), 2);
        assert_eq!(instruction_length(0x0f), 15);
    }

    #[test]
    fn port_read_merges_into_rax() {
        let rax = 0x1122_3344_5566_7788;
        assert_eq!(merge_port_read(rax, &[0xab]), 0x1122_3344_5566_77ab);
        assert_eq!(merge_port_read(rax, &[0xab, 0xcd]), 0x1122_3344_5566_cdab);
        assert_eq!(merge_port_read(rax, &[1, 2, 3, 4]), 0x0403_0201);
    }

    #[test]
    fn emulator_status() {
        assert_eq!(emulator_failure(1), None);
        assert_eq!(emulator_failure(1 | 1 << 3), None);
        let detail = emulator_failure(1 << 3 | 1 << 9).unwrap();
        assert!(detail.contains("MemoryCallbackFailed"), "{detail}");
        assert!(detail.contains("GuestCannotBeFaulted"), "{detail}");
        assert!(!detail.contains("IoPortCallbackFailed"), "{detail}");
    }

    #[test]
    fn ioapic_delivery_modes_map_to_whp_types() {
        assert_eq!(interrupt_type(0), Some(0));
        assert_eq!(interrupt_type(1), Some(1));
        assert_eq!(interrupt_type(4), Some(4));
        assert_eq!(interrupt_type(5), Some(5));
        assert_eq!(interrupt_type(2), None, "SMI");
        assert_eq!(interrupt_type(7), None, "ExtINT");
    }

    #[test]
    fn interrupt_control_layout() {
        // Fixed, physical, edge.
        assert_eq!(interrupt_control(0, 0, 0), 0);
        // Nmi, logical, level.
        assert_eq!(interrupt_control(4, 1, 1), 0x1104);
    }

    #[test]
    fn ram_lookup() {
        let regions = [
            Region {
                slot: 0,
                guest: 0,
                host: 0x10_0000,
                size: 0x1000,
                read_only: false,
            },
            Region {
                slot: 1,
                guest: 0xf000,
                host: 0x20_0000,
                size: 0x1000,
                read_only: true,
            },
        ];
        assert_eq!(ram_address(&regions, 0x10, 4, true), Some(0x10_0010));
        assert_eq!(ram_address(&regions, 0xffc, 4, false), Some(0x10_0ffc));
        // Straddles the end of the region.
        assert_eq!(ram_address(&regions, 0xffe, 4, false), None);
        assert_eq!(ram_address(&regions, 0xf010, 8, false), Some(0x20_0010));
        assert_eq!(ram_address(&regions, 0xf010, 8, true), None);
        assert_eq!(ram_address(&regions, 0x8000, 1, false), None);
        assert_eq!(ram_address(&regions, u64::MAX, 2, false), None);
    }

    #[test]
    fn exit_table() {
        let io = |bits| ExitKind::IoPortAccess(PortAccess::from_bits(bits));
        let cases: Vec<(ExitKind, ExitAction)> = vec![
            (
                io(0b0011),
                ExitAction::PortIo(PortAccess::from_bits(0b0011)),
            ),
            (
                io(0b1000),
                ExitAction::PortIo(PortAccess::from_bits(0b1000)),
            ),
            (io(0b1_0011), ExitAction::EmulateIo),
            (io(0b11_0101), ExitAction::EmulateIo),
            (ExitKind::MemoryAccess, ExitAction::EmulateMmio),
            (ExitKind::Halt, ExitAction::WaitForInterrupt),
            (ExitKind::UnrecoverableException, ExitAction::Shutdown),
            (ExitKind::Canceled, ExitAction::Interrupted),
            (ExitKind::InterruptWindow, ExitAction::Resume),
            (ExitKind::ApicEoi { vector: 0x34 }, ExitAction::Resume),
            (ExitKind::Cpuid, ExitAction::AnswerCpuid),
        ];
        for (kind, action) in cases {
            assert_eq!(exit_action(kind), action, "{kind:?}");
        }
        assert!(matches!(
            exit_action(io(0b0110)),
            ExitAction::InternalError(d) if d.contains("3 bytes")
        ));
        assert!(matches!(
            exit_action(ExitKind::InvalidVpRegisterValue),
            ExitAction::InternalError(d) if d.contains("register")
        ));
        assert!(matches!(
            exit_action(ExitKind::UnsupportedFeature { feature: 1, parameter: 0x10 }),
            ExitAction::InternalError(d) if d.contains("feature 1") && d.contains("0x10")
        ));
        assert!(matches!(
            exit_action(ExitKind::MsrAccess { msr: 0x1b }),
            ExitAction::Unexpected(r) if r.contains("0x1b")
        ));
        assert!(matches!(
            exit_action(ExitKind::Other(0x1003)),
            ExitAction::Unexpected(r) if r.contains("0x1003")
        ));
    }
}
