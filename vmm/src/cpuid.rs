//! The CPU template: what the guest is told about its CPUs. Starts from what
//! the hypervisor supports and, like Firecracker, hides host details a guest
//! must not rely on (power management, performance monitoring, monitor/mwait,
//! host topology) and states our own topology.

use crate::hypervisor::CpuidEntry;

// Leaf 1 ECX / EDX bits.
const ECX_DTES64: u32 = 1 << 2;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_DS_CPL: u32 = 1 << 4;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EIST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_XTPR: u32 = 1 << 14;
const ECX_PDCM: u32 = 1 << 15;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI: u32 = 1 << 22;
const EDX_HTT: u32 = 1 << 28;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
/// Leaf 6 EAX: APIC timer always running; the only power bit we keep.
const EAX_ARAT: u32 = 1 << 2;

const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The CPUID for vCPU `id` of `count`, from the hypervisor's `supported` set.
pub fn for_vcpu(supported: &[CpuidEntry], id: u8, count: u8) -> Vec<CpuidEntry> {
    let apic_id = u32::from(id);
    let count = u32::from(count);
    let mut entries = supported.to_vec();
    for e in &mut entries {
        match e.function {
            0x1 => {
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx &= !(ECX_DTES64 | ECX_MONITOR | ECX_DS_CPL | ECX_VMX | ECX_SMX | ECX_EIST);
                e.ecx &= !(ECX_TM2 | ECX_XTPR | ECX_PDCM);
                e.ecx |= ECX_HYPERVISOR;
                e.edx &= !(EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE | EDX_HTT);
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1 in 31:26; each cache shared by one core.
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
            }
            0x5 => *e = zeroed(e),
            0x6 => {
                *e = CpuidEntry {
                    eax: e.eax & EAX_ARAT,
                    ..zeroed(e)
                }
            }
            0xa => *e = zeroed(e),
            0xb | 0x1f => *e = topology(e, apic_id, count),
            _ => {}
        }
    }
    entries
}

fn zeroed(e: &CpuidEntry) -> CpuidEntry {
    CpuidEntry {
        eax: 0,
        ebx: 0,
        ecx: 0,
        edx: 0,
        ..*e
    }
}

/// Extended topology: one thread per core, `count` cores in one package.
fn topology(e: &CpuidEntry, apic_id: u32, count: u32) -> CpuidEntry {
    let core_shift = u32::BITS - (count - 1).leading_zeros();
    let (eax, ebx, ecx) = match e.index {
        0 => (0, 1, LEVEL_SMT << 8),
        1 => (core_shift, count, (LEVEL_CORE << 8) | 1),
        index => (0, 0, index),
    };
    CpuidEntry {
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..*e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn find(entries: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hides_host_features() {
        let out = for_vcpu(&[leaf(1, 0)], 3, 4);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ecx & (ECX_MONITOR | ECX_VMX | ECX_PDCM), 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = find(&for_vcpu(&[leaf(1, 0)], 0, 1), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn power_and_pmu_leaves_are_hidden() {
        let out = for_vcpu(&[leaf(5, 0), leaf(6, 0), leaf(0xa, 0)], 0, 1);
        assert_eq!(find(&out, 5, 0).ecx, 0);
        assert_eq!(find(&out, 6, 0).eax, EAX_ARAT);
        assert_eq!(find(&out, 0xa, 0).eax, 0);
    }

    #[test]
    fn topology_reports_our_cores() {
        let out = for_vcpu(&[leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)], 2, 3);
        let (smt, core, end) = (find(&out, 0xb, 0), find(&out, 0xb, 1), find(&out, 0xb, 2));
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, LEVEL_SMT, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 3, LEVEL_CORE));
        assert_eq!((end.eax, end.ebx, end.ecx & 0xff), (0, 0, 2));
    }
}
