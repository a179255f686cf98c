//! CPUID for each vCPU: what KVM supports, with topology and APIC ids made consistent for
//! `nr` vCPUs (one socket, one thread per core) and the hypervisor bit set.
//!
//! SVM and VMX are hidden: our guests run no VMs of their own, and a guest kernel with KVM
//! built in (ours: one kernel for host and guests) spends ~100 ms of its boot in kvm_amd's
//! set-up when it sees SVM (svm_init, guest initcall_debug, nested); the nested boot
//! benchmark's start-to-init went from 3288 to 2886 ms (medians of 3, A/B in one machine).
//! A spec option can give them back once a guest needs nested virtualization.
//!
//! Not announced, on purpose: the TSC-deadline timer (bit 24 of leaf 1, which KVM leaves to
//! the VMM behind KVM_CAP_TSC_DEADLINE_TIMER). It would spare Linux its 100 ms LAPIC timer
//! calibration, but in the nested test environment (QEMU TCG emulating AMD-V) deadlines
//! fired tens of seconds late: the guest stalled at its first long sleep (RCU "timer wakeup
//! didn't happen for 11316 jiffies"), as if L2's TSC lacked the VMCB's TSC offset.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const EXT1_ECX_SVM: u32 = 1 << 2;

/// Bits needed to number `nr` cores.
fn core_shift(nr: u8) -> u32 {
    (nr.max(1) as u32).next_power_of_two().trailing_zeros()
}

pub fn filter(cpuid: &mut CpuId, cpu: u8, nr: u8) {
    let nr32 = nr as u32;
    let cpu32 = cpu as u32;
    let shift = core_shift(nr);
    for e in cpuid.as_mut_slice().iter_mut() {
        filter_entry(e, cpu32, nr32, shift);
    }
}

fn filter_entry(e: &mut kvm_cpuid_entry2, cpu: u32, nr: u32, shift: u32) {
    match e.function {
        0x1 => {
            // EBX: initial APIC id, logical processors per package; keep CLFLUSH size/brand.
            e.ebx = (e.ebx & 0xffff) | (nr.min(255) << 16) | (cpu << 24);
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            e.ecx &= !LEAF1_ECX_VMX;
            if nr > 1 {
                e.edx |= 1 << 28; // HTT: the EBX count above is valid
            } else {
                e.edx &= !(1 << 28);
            }
        }
        0x4 => {
            // Intel cache leaves: cores per package, and which caches all cores share (L3).
            let level = (e.eax >> 5) & 7;
            e.eax &= 0x3fff;
            if e.eax & 0x1f != 0 {
                e.eax |= (nr - 1) << 26;
                if level >= 3 {
                    e.eax |= (nr - 1) << 14;
                }
            }
        }
        // No virtual PMU: nested performance counters are unreliable and guests probe them.
        0xa => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // x2APIC topology: level 0 = SMT (1 thread), level 1 = core (nr cores).
            e.edx = cpu;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = shift;
                    e.ebx = nr;
                    e.ecx = 1 | (2 << 8);
                }
                i => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = i;
                }
            }
        }
        0x8000_0001 => e.ecx &= !EXT1_ECX_SVM,
        // SVM features: meaningless without SVM.
        0x8000_000a => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0x8000_0008 => {
            // AMD: ApicIdCoreIdSize and NC (cores - 1).
            e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (nr - 1);
        }
        0x8000_001e => {
            // AMD extended APIC id, core id (one thread per core), node 0.
            e.eax = cpu;
            e.ebx &= !0xffff;
            e.ebx |= cpu & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

/// One CPUID entry as the guest was given it (KVM_GET_CPUID2), readable in state.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry { function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx }
    }
}

pub fn entries(cpuid: &CpuId) -> Vec<CpuidEntry> {
    cpuid.as_slice().iter().map(CpuidEntry::from).collect()
}

/// The bits KVM rewrites from the guest's own state (kvm_update_cpuid_runtime): OSXSAVE and
/// OSPKE follow CR4, APIC the APIC base MSR, MONITOR/MWAIT IA32_MISC_ENABLE, and leaf 0xD's
/// EBX the XSAVE area size for XCR0 (and IA32_XSS). They say what the guest turned on, not
/// what the host can do, and a fresh vCPU has them in their reset state: not compared.
fn guest_controlled(function: u32, index: u32, reg: &str) -> u32 {
    match (function, index, reg) {
        (0x1, _, "ecx") => 1 << 27 | 1 << 3,
        (0x1, _, "edx") => 1 << 9,
        (0x7, 0, "ecx") => 1 << 4,
        (0xd, 0 | 1, "ebx") => u32::MAX,
        _ => 0,
    }
}

/// The first way the CPUID a restored guest would see (`now`, what this host's KVM and this
/// filter give) differs from what it saw before the save, named by leaf and register. A
/// guest keeps using the features it found at boot: one that vanished faults (#UD) at once
/// or corrupts state (an XSAVE area of another size), so any difference refuses the restore.
pub fn first_difference(saved: &[CpuidEntry], now: &[CpuidEntry]) -> Option<String> {
    let leaf = |e: &CpuidEntry| format!("CPUID leaf {:#x} subleaf {:#x}", e.function, e.index);
    let key = |e: &CpuidEntry| (e.function, e.index);
    for s in saved {
        let Some(n) = now.iter().find(|n| key(n) == key(s)) else {
            return Some(format!("{}: the guest was given it, this host's KVM has none", leaf(s)));
        };
        for (reg, a, b) in [("eax", s.eax, n.eax), ("ebx", s.ebx, n.ebx), ("ecx", s.ecx, n.ecx), ("edx", s.edx, n.edx), ("flags", s.flags, n.flags)] {
            let mask = !guest_controlled(s.function, s.index, reg);
            if a & mask != b & mask {
                return Some(format!("{}: {reg} was {a:#010x} for the guest, this host gives {b:#010x}", leaf(s)));
            }
        }
    }
    now.iter()
        .find(|n| !saved.iter().any(|s| key(s) == key(n)))
        .map(|n| format!("{}: this host's KVM has it, the guest was not given it", leaf(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpuid_difference_is_named_by_leaf_and_register() {
        let e = |function, index, ebx| CpuidEntry { function, index, flags: 0, eax: 1, ebx, ecx: 2, edx: 3 };
        let saved = vec![e(0, 0, 0x756e_6547), e(7, 0, 0x029c_67af), e(7, 1, 0)];
        assert_eq!(first_difference(&saved, &saved), None);
        let mut reordered = saved.clone();
        reordered.reverse();
        assert_eq!(first_difference(&saved, &reordered), None, "KVM's order does not matter");
        let mut now = saved.clone();
        now[1].ebx &= !(1 << 5); // AVX2 gone
        let d = first_difference(&saved, &now).unwrap();
        assert!(d.contains("leaf 0x7 subleaf 0x0") && d.contains("ebx") && d.contains("0x029c67af") && d.contains("0x029c678f"), "{d}");
        let d = first_difference(&saved, &saved[..2]).unwrap();
        assert!(d.contains("leaf 0x7 subleaf 0x1") && d.contains("has none"), "{d}");
        // What the guest switched on itself (CR4.OSXSAVE, the XSAVE size for its XCR0) is no
        // difference of the host.
        let mut guest_on = saved.clone();
        guest_on.push(CpuidEntry { function: 1, index: 0, flags: 0, eax: 0x806f8, ebx: 0, ecx: 0x8000_0000 | 1 << 27, edx: 1 << 9 });
        guest_on.push(CpuidEntry { function: 0xd, index: 0, flags: 0, eax: 7, ebx: 0x340, ecx: 0x340, edx: 0 });
        let mut fresh = guest_on.clone();
        fresh[3].ecx &= !(1 << 27);
        fresh[3].edx = 0;
        fresh[4].ebx = 0x240;
        assert_eq!(first_difference(&guest_on, &fresh), None);
        fresh[3].ecx &= !(1 << 28); // AVX: the host's
        fresh[3].ecx |= 1 << 26; // XSAVE appears: the host's
        let d = first_difference(&guest_on, &fresh).unwrap();
        assert!(d.contains("leaf 0x1 subleaf 0x0: ecx"), "{d}");
        fresh[4].ecx = 0x240; // the maximum size: the host's
        fresh[3] = guest_on[3];
        let d = first_difference(&guest_on, &fresh).unwrap();
        assert!(d.contains("leaf 0xd subleaf 0x0: ecx"), "{d}");
        let mut more = saved.clone();
        more.push(e(0xd, 0, 0));
        let d = first_difference(&saved, &more).unwrap();
        assert!(d.contains("leaf 0xd subleaf 0x0") && d.contains("not given"), "{d}");
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0008_0800, ..Default::default() }
    }

    #[test]
    fn apic_ids_and_counts_follow_the_vcpu() {
        let mut c = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xa, 0)]).unwrap();
        c.as_mut_slice()[3].eax = 0x0730_0403;
        filter(&mut c, 2, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2);
        assert_eq!((s[0].ebx >> 16) & 0xff, 3);
        assert_eq!(s[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(s[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(s[0].edx & (1 << 28), 0);
        assert_eq!((s[1].ebx, s[1].edx), (1, 2));
        assert_eq!((s[2].eax, s[2].ebx, s[2].edx), (2, 3, 2));
        assert_eq!(s[3].eax, 0, "no PMU");
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = CpuId::from_entries(&[kvm_cpuid_entry2 { function: 1, edx: 1 << 28, ..Default::default() }]).unwrap();
        filter(&mut c, 0, 1);
        assert_eq!(c.as_slice()[0].edx & (1 << 28), 0);
        assert_eq!(core_shift(1), 0);
        assert_eq!(core_shift(2), 1);
        assert_eq!(core_shift(5), 3);
    }

    #[test]
    fn nested_virtualization_is_hidden() {
        let leaves = [
            kvm_cpuid_entry2 { function: 1, ecx: LEAF1_ECX_VMX | 1, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x8000_0001, ecx: EXT1_ECX_SVM | 1, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x8000_000a, eax: 1, ebx: 64, edx: 0xff, ..Default::default() },
        ];
        let mut c = CpuId::from_entries(&leaves).unwrap();
        filter(&mut c, 0, 1);
        let s = c.as_slice();
        assert_eq!(s[0].ecx, 1 | LEAF1_ECX_HYPERVISOR, "VMX cleared, other bits kept");
        assert_eq!(s[1].ecx, 1, "SVM cleared, other bits kept");
        assert_eq!((s[2].eax, s[2].ebx, s[2].edx), (0, 0, 0));
    }
}
