//! The guest physical address map and the I/O-port map. One place, so the ACPI tables,
//! the e820 map and the buses cannot disagree.
//!
//! ```text
//! 0x0000_0500  GDT, IDT            0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack (down)   0x0000_9000  PML4, PDPTE (0xa000), PDE (0xb000)
//! 0x0002_0000  kernel command line 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI: RSDP, XSDT, FADT, MADT, DSDT (reserved in e820)
//! 0x0010_0000  kernel, then RAM up to min(memory, 3 GiB); initramfs at the top of it
//! 0xc000_0000  32-bit PCI MMIO window (BARs, framebuffers) up to 0xf800_0000
//! 0xfec0_0000  IOAPIC              0xfee0_0000  LAPIC
//! 0x1_0000_0000 RAM above 4 GiB (whatever did not fit below the hole)
//! ```

use std::ops::Range;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = RESET_VECTOR;
/// Where a CPU starts after reset in real mode (f000:fff0), and where Linux jumps when it
/// reboots "through the BIOS"; see [`RESET_STUB`].
pub const RESET_VECTOR: u64 = 0xffff0;
pub const HIGH_RAM_START: u64 = 0x100000;
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
pub const PCI_MMIO32: Range<u64> = 0xc000_0000..0xf800_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// I/O ports of the legacy devices.
pub mod pio {
    pub const I8042: u16 = 0x60; // 0x60..0x65 (data 0x60, command 0x64)
    pub const CMOS: u16 = 0x70; // index 0x70, data 0x71
    pub const COM1: u16 = 0x3f8; // 8 registers, IRQ 4
    pub const PCI_CONFIG: u16 = 0xcf8; // 0xcf8..0xd00
    /// Boot timer: the guest's init writes any byte here once (see ARCHITECTURE.md, vmm).
    pub const BOOT_TIMER: u16 = 0x440;
    /// ACPI hardware-reduced sleep control/status register (one byte, FADT X_SLEEP_*).
    pub const ACPI_SLEEP: u16 = 0x600;
    /// ACPI reset register (FADT RESET_REG); writing [`super::ACPI_RESET_VALUE`] reboots.
    pub const ACPI_RESET: u16 = 0x601;
    /// Generic Event Device: reading it returns (and clears) pending event bits.
    pub const ACPI_GED: u16 = 0x602;
}

pub const ACPI_RESET_VALUE: u8 = 0x1;

/// The code at [`RESET_VECTOR`]: `mov al, ACPI_RESET_VALUE; mov dx, ACPI_RESET; out dx, al;
/// hlt; jmp hlt`. There is no BIOS behind the VMM, so "the BIOS reboots" means "ask the VMM".
/// Linux on a hardware-reduced ACPI machine without EFI runtime services reboots this way
/// (reboot_init picks BOOT_EFI, which falls through to BOOT_BIOS: a jump to f000:fff0 in
/// real mode); before this stub the jump ran into zeros and the guest hung.
pub const RESET_STUB: [u8; 10] = [
    0xb0, ACPI_RESET_VALUE,
    0xba, pio::ACPI_RESET as u8, (pio::ACPI_RESET >> 8) as u8,
    0xee,
    0xf4,
    0xeb, 0xfd,
    0x90,
];
const _: () = assert!(RESET_VECTOR + RESET_STUB.len() as u64 <= HIGH_RAM_START);
/// The ACPI S5 sleep type the DSDT's `_S5_` package announces.
pub const ACPI_S5_TYPE: u8 = 5;
pub const COM1_GSI: u32 = 4;
/// GSI of the ACPI Generic Event Device (power button).
pub const GED_GSI: u32 = 9;

// The fixed areas must not overlap; checked when compiling.
const _: () = assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
const _: () = assert!(PDE_START + 4096 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(PCI_MMIO32.end <= IOAPIC_START);

/// Guest RAM ranges for `mem_size` bytes: below the 32-bit hole first, the rest above 4 GiB.
#[allow(clippy::single_range_in_vec_init)] // a list of ranges, not a range of values
pub fn ram_ranges(mem_size: u64) -> Vec<Range<u64>> {
    let low = mem_size.min(MEM_32BIT_GAP_START);
    let mut ranges = vec![0..low];
    if mem_size > low {
        ranges.push(FOUR_GIB..FOUR_GIB + (mem_size - low));
    }
    ranges
}

/// e820 entry types (Linux's `E820_TYPE_*`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map handed to the kernel: (start, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (ACPI_START, HIGH_RAM_START - ACPI_START, E820_RESERVED),
    ];
    for r in ram_ranges(mem_size) {
        let start = r.start.max(HIGH_RAM_START);
        if r.end > start {
            map.push((start, r.end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_fits_below_the_hole() {
        let r = ram_ranges(512 << 20);
        assert_eq!((r.len(), r[0].start, r[0].end), (1, 0, 512 << 20));
    }

    #[test]
    fn large_guest_is_split_around_the_pci_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![0..MEM_32BIT_GAP_START, FOUR_GIB..FOUR_GIB + (1 << 30)]);
        let e820 = e820_map(4 << 30);
        let ram: u64 = e820.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // All RAM but the legacy hole between the EBDA and 1 MiB is usable.
        assert_eq!(ram, (4 << 30) - (HIGH_RAM_START - EBDA_START));
        assert!(!e820.iter().any(|e| e.0 < PCI_MMIO32.end && e.0 + e.1 > PCI_MMIO32.start));
    }

}
