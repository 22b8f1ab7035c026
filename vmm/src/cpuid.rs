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
/// The LAPIC timer's TSC-deadline mode; the hypervisor backend sets it
/// where the hypervisor supports it (KVM leaves that to the VMM).
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI: u32 = 1 << 22;
const EDX_HTT: u32 = 1 << 28;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
/// Leaf 6 EAX: APIC timer always running; the only power bit we keep.
const EAX_ARAT: u32 = 1 << 2;

// Leaf 0x80000001 ECX (AMD): virtualization and performance counters.
const EXT_ECX_SVM: u32 = 1 << 2;
const EXT_ECX_PERFCTR_CORE: u32 = 1 << 23;
const EXT_ECX_PERFCTR_NB: u32 = 1 << 24;
const EXT_ECX_PERFCTR_LLC: u32 = 1 << 28;

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
            0x8000_0001 => {
                e.ecx &= !(EXT_ECX_SVM | EXT_ECX_PERFCTR_CORE | EXT_ECX_PERFCTR_NB);
                e.ecx &= !EXT_ECX_PERFCTR_LLC;
            }
            // AMD: core count (NC) and how many APIC id bits number cores.
            0x8000_0008 => e.ecx = (core_bits(count) << 12) | (count - 1),
            // SVM features; AMD performance monitoring v2.
            0x8000_000a | 0x8000_0022 => *e = zeroed(e),
            // AMD extended APIC id and topology: one core per compute
            // unit, one thread per core, one node.
            0x8000_001e => {
                *e = CpuidEntry {
                    eax: apic_id,
                    ebx: apic_id & 0xff,
                    ..zeroed(e)
                }
            }
            _ => {}
        }
    }
    complete_topology(&mut entries, apic_id, count);
    entries
}

/// Leaf 0xB needs its SMT and core levels and the invalid level that ends
/// them, whichever subleaves the hypervisor listed (KVM on AMD lists only
/// the first, and a guest then counts one core per package).
fn complete_topology(entries: &mut Vec<CpuidEntry>, apic_id: u32, count: u32) {
    let Some(first) = entries.iter().find(|e| e.function == 0xb).copied() else {
        return;
    };
    for index in 0..3 {
        if !entries
            .iter()
            .any(|e| e.function == 0xb && e.index == index)
        {
            let level = CpuidEntry {
                index,
                indexed: true,
                ..first
            };
            entries.push(topology(&level, apic_id, count));
        }
    }
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

/// How many APIC id bits number `count` cores.
fn core_bits(count: u32) -> u32 {
    u32::BITS - (count - 1).leading_zeros()
}

/// Extended topology: one thread per core, `count` cores in one package.
fn topology(e: &CpuidEntry, apic_id: u32, count: u32) -> CpuidEntry {
    let core_shift = core_bits(count);
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
    fn virtualization_and_amd_pmu_are_hidden() {
        let supported = [
            leaf(1, 0),
            leaf(0x8000_0001, 0),
            leaf(0x8000_000a, 0),
            leaf(0x8000_0022, 0),
        ];
        let out = for_vcpu(&supported, 0, 1);
        assert_eq!(find(&out, 1, 0).ecx & ECX_VMX, 0);
        let ext = find(&out, 0x8000_0001, 0);
        assert_eq!(
            ext.ecx & (EXT_ECX_SVM | EXT_ECX_PERFCTR_CORE | EXT_ECX_PERFCTR_NB),
            0
        );
        assert_eq!(ext.ecx & EXT_ECX_PERFCTR_LLC, 0);
        assert_ne!(ext.ecx, 0, "other extended features stay");
        for hidden in [0x8000_000a, 0x8000_0022] {
            let e = find(&out, hidden, 0);
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0), "{hidden:#x}");
        }
    }

    #[test]
    fn the_tsc_deadline_timer_stays_when_offered() {
        let offered = CpuidEntry {
            ecx: ECX_TSC_DEADLINE,
            ..leaf(1, 0)
        };
        assert_ne!(
            find(&for_vcpu(&[offered], 1, 2), 1, 0).ecx & ECX_TSC_DEADLINE,
            0
        );
        let plain = CpuidEntry {
            ecx: 0,
            ..leaf(1, 0)
        };
        assert_eq!(
            find(&for_vcpu(&[plain], 0, 1), 1, 0).ecx & ECX_TSC_DEADLINE,
            0
        );
    }

    #[test]
    fn amd_topology_matches_the_cpu_count() {
        let supported = [leaf(0x8000_0008, 0), leaf(0x8000_001e, 0)];
        for (id, count, bits) in [(0, 1, 0), (1, 2, 1), (3, 4, 2), (4, 5, 3)] {
            let out = for_vcpu(&supported, id, count);
            let sizes = find(&out, 0x8000_0008, 0);
            assert_eq!(sizes.ecx & 0xff, u32::from(count) - 1, "NC for {count}");
            assert_eq!((sizes.ecx >> 12) & 0xf, bits, "core id bits for {count}");
            let ext = find(&out, 0x8000_001e, 0);
            assert_eq!(ext.eax, u32::from(id), "extended APIC id");
            assert_eq!(ext.ebx, u32::from(id), "core id, one thread per core");
            assert_eq!((ext.ecx, ext.edx), (0, 0), "one node");
        }
    }

    #[test]
    fn topology_has_every_level_even_when_the_hypervisor_lists_one() {
        let out = for_vcpu(&[leaf(0xb, 0)], 1, 2);
        let core = find(&out, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (1, 2, LEVEL_CORE, 1)
        );
        assert!(core.indexed);
        assert_eq!(find(&out, 0xb, 2).ecx >> 8, 0, "the level list ends");
        assert_eq!(out.len(), 3);
        assert!(for_vcpu(&[leaf(1, 0)], 0, 1)
            .iter()
            .all(|e| e.function != 0xb));
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
