//! Backend-neutral register state for a boot protocol's entry point.

/// A segment register with its hidden (descriptor cache) part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
}

impl Segment {
    /// Decodes a GDT entry as the CPU would load it for `selector`. The
    /// limit is in bytes, as in the descriptor cache: scaled by 4 KiB when G is set.
    pub fn from_gdt_entry(entry: u64, selector: u16) -> Self {
        let bits = |shift: u32, len: u32| (entry >> shift) & ((1 << len) - 1);
        let raw_limit = (bits(0, 16) | (bits(48, 4) << 16)) as u32;
        let g = bits(55, 1) == 1;
        Segment {
            base: bits(16, 24) | (bits(56, 8) << 24),
            limit: if g {
                (raw_limit << 12) | 0xfff
            } else {
                raw_limit
            },
            selector,
            type_: bits(40, 4) as u8,
            s: bits(44, 1) == 1,
            dpl: bits(45, 2) as u8,
            present: bits(47, 1) == 1,
            l: bits(53, 1) == 1,
            db: bits(54, 1) == 1,
            g,
        }
    }
}

/// Descriptor table register (GDTR/IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub base: u64,
    pub limit: u16,
}

/// Everything a backend sets on the boot vCPU before its first run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    /// Boot-protocol argument registers: PVH passes start_info in RBX,
    /// the Linux 64-bit protocol passes boot_params in RSI.
    pub rbx: u64,
    pub rsi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub code: Segment,
    pub data: Segment,
    pub tss: Segment,
    pub gdt: Table,
    pub idt: Table,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_flat_code_and_data_descriptors() {
        let code64 = Segment::from_gdt_entry(0x00af_9b00_0000_ffff, 0x08);
        assert_eq!(
            (code64.base, code64.limit),
            (0, 0xffff_ffff),
            "4 KiB granular"
        );
        assert!(code64.l && !code64.db && code64.g && code64.present && code64.s);
        assert_eq!(code64.type_, 0xb);

        let data32 = Segment::from_gdt_entry(0x00cf_9300_0000_ffff, 0x10);
        assert!(data32.db && !data32.l && data32.g);
        assert_eq!(data32.type_, 0x3);
        assert_eq!(data32.selector, 0x10);

        let tss = Segment::from_gdt_entry(0x0000_8b00_0000_0067, 0x18);
        assert_eq!((tss.limit, tss.g, tss.type_), (0x67, false, 0xb));
    }
}
