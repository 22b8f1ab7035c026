//! Support for kvm_pvm hosts: /dev/kvm backed by software virtualization
//! (cloud VMs without nested VMX). There the guest runs in hardware user
//! mode, sees the host's CPUID whatever we set, and cannot emulate a few
//! instructions, so uvm adds guest command-line flags that avoid them and
//! switch on the guest kernel's PVM fixes (kernel-config/patches/).

use std::path::Path;

/// Which kind of KVM host we run on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum HostKind {
    /// Hardware virtualization (VMX/SVM): no guest changes.
    Hardware,
    /// kvm_pvm: add the PVM guest flags.
    Pvm,
}

const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Guest flags for PVM hosts. CPUID is not intercepted there, so features
/// whose instructions the PVM emulator cannot handle are masked in the guest
/// (cx16: SLUB's cmpxchg16b runs inside emulated irq-off sections and KVM's
/// emulator has no cmpxchg16b). One `clearcpuid=`: the kernel reads only the last.
/// The clock is kvm-clock, which KVM sets on restore: the guest's TSC is
/// the host's (no offset), so a TSC clock would jump by the time a
/// snapshot waited and expire every timer the guest had.
const PVM_GUEST_FLAGS: &str = "noxsave \
    clearcpuid=popcnt,smap,fsgsbase,rdrand,rdseed,rdpid,pku,pcid,invpcid,la57,ibt,cx16 \
    clocksource=kvm-clock pvm_host";

pub fn detect() -> HostKind {
    detect_at(Path::new(KVM_PVM_MODULE))
}

fn detect_at(module: &Path) -> HostKind {
    if module.exists() {
        HostKind::Pvm
    } else {
        HostKind::Hardware
    }
}

/// Command-line flags this host needs in every guest.
pub fn guest_flags(kind: HostKind) -> Option<&'static str> {
    (kind == HostKind::Pvm).then_some(PVM_GUEST_FLAGS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_module_presence() {
        let dir = std::env::temp_dir();
        assert_eq!(detect_at(&dir), HostKind::Pvm);
        assert_eq!(
            detect_at(&dir.join("no-such-module-uvm")),
            HostKind::Hardware
        );
    }

    #[test]
    fn flags_only_on_pvm() {
        assert_eq!(guest_flags(HostKind::Hardware), None);
        let flags = guest_flags(HostKind::Pvm).unwrap();
        assert!(flags.contains("noxsave") && flags.contains("pvm_host"));
        assert!(flags.contains("clearcpuid=popcnt"));
    }
}
