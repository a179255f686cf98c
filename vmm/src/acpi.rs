//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced), MADT, DSDT. Written into the
//! reserved 0xe0000 area; the RSDP address also goes into boot_params.
//!
//! Hardware-reduced ACPI needs no PM1 block or SCI: power-off is a write of
//! `SLP_TYP(5) << 2 | SLP_EN` to the sleep control register, reboot a write of the reset
//! value to the reset register (both I/O ports, see `layout::pio`), and the power button is a
//! Generic Event Device whose `_EVT` notifies `\_SB.PWRB`.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, FieldAccessType, FieldEntry,
    FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Method, Name, Notify, OpRegion,
    OpRegionSpace, Package, ResourceTemplate, Scope, Store, IO,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::GuestMemory;
use crate::error::{Error, Result};
use crate::layout::{self, pio};

const OEM_ID: [u8; 6] = *b"RAYOS ";

/// What the tables describe beyond the fixed layout.
pub struct AcpiConfig {
    pub vcpus: u8,
    /// Whether a PCI host bridge answers at 0xcf8 (it does once the PCI root is wired).
    pub pci: bool,
}

fn fadt(dsdt: u64) -> Sdt {
    let mut f = Sdt::new(*b"FACP", 276, 6, OEM_ID, *b"RAYOSFAC", 1);
    // IAPC_BOOT_ARCH: legacy devices present; no 8042 keyboard (only its reset line), no VGA.
    f.write(109, (1u16 << 0) | (1 << 2));
    // Flags: WBINVD | HW_REDUCED_ACPI | RESET_REG_SUP | PWR_BUTTON (control-method button).
    let flags: u32 = (1 << 0) | (1 << 20) | (1 << 10) | (1 << 4);
    f.write(112, flags);
    f.write(116, GenericAddress::io_port_address::<u8>(pio::ACPI_RESET));
    f.write(128, layout::ACPI_RESET_VALUE);
    f.write(131, 3u8); // FADT minor version
    f.write(140, dsdt); // X_DSDT
    f.write(244, GenericAddress::io_port_address::<u8>(pio::ACPI_SLEEP)); // X_SLEEP_CONTROL_REG
    f.write(256, GenericAddress::io_port_address::<u8>(pio::ACPI_SLEEP)); // X_SLEEP_STATUS_REG
    f.write(268, *b"RAYOSVMM"); // hypervisor vendor identity
    f.update_checksum();
    f
}

fn madt(vcpus: u8) -> Sdt {
    let mut m = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"RAYOSMAD", 1);
    m.write(36, layout::LAPIC_START as u32);
    m.write(40, 1u32); // PCAT_COMPAT: the 8259s exist (KVM's in-kernel PIC); Linux masks them.
    for cpu in 0..vcpus {
        // Processor Local APIC: type 0, length 8, ACPI uid, APIC id, flags (enabled).
        m.append_slice(&[0, 8, cpu, cpu]);
        m.append(1u32);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    m.append_slice(&[1, 12, vcpus, 0]);
    m.append(layout::IOAPIC_START as u32);
    m.append(0u32);
    m.update_checksum();
    m
}

/// Already-serialized AML, so each device is built in one statement (the aml types borrow
/// their children, which would otherwise have to outlive the whole function).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(a: &dyn Aml) -> Raw {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    Raw(v)
}

fn dsdt(cfg: &AcpiConfig) -> Sdt {
    let mut d = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RAYOSDSD", 1);

    let mmio_min = layout::PCI_MMIO32.start as u32;
    let mmio_max = (layout::PCI_MMIO32.end - 1) as u32;
    let pci_crs = raw(&ResourceTemplate::new(vec![
        &AddressSpace::new_bus_number(0u16, 0u16),
        &IO::new(pio::PCI_CONFIG, pio::PCI_CONFIG, 1, 8),
        &AddressSpace::new_io(0u16, 0x0cf7u16, None),
        &AddressSpace::new_io(0x0d00u16, 0xffffu16, None),
        &AddressSpace::<u32>::new_memory(AddressSpaceCacheable::NotCacheable, true, mmio_min, mmio_max, None),
    ]));
    let pci0 = raw(&Device::new(
        "PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_SEG".into(), &0u8),
            &Name::new("_BBN".into(), &0u8),
            &Name::new("_ADR".into(), &0u8),
            &Name::new("_CRS".into(), &pci_crs),
        ],
    ));

    let com1_crs = raw(&ResourceTemplate::new(vec![
        &Interrupt::new(true, true, false, false, layout::COM1_GSI),
        &IO::new(pio::COM1, pio::COM1, 1, 8),
    ]));
    let com1 = raw(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &1u8),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    ));

    let rtc_crs = raw(&ResourceTemplate::new(vec![&IO::new(pio::CMOS, pio::CMOS, 1, 2)]));
    let rtc = raw(&Device::new(
        "RTC_".into(),
        vec![&Name::new("_HID".into(), &EISAName::new("PNP0B00")), &Name::new("_CRS".into(), &rtc_crs)],
    ));

    // No PNP0303 keyboard device: the i8042 model is only a reset line, and announcing it
    // makes Linux spend seconds probing a controller that never answers.
    // Generic Event Device: the VMM raises GED_GSI, _EVT reads which events are pending.
    let ged_crs = raw(&ResourceTemplate::new(vec![&Interrupt::new(true, true, false, false, layout::GED_GSI)]));
    let ged_region = raw(&OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &(pio::ACPI_GED as u32), &1u8));
    let ged_field = raw(&aml::Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    ));
    let read_events = raw(&Store::new(&Local(0), &aml::Path::new("GDAT")));
    let if_pwrb = raw(&If::new(
        &aml::And::new(&Local(1), &Local(0), &1u8),
        vec![&Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
    ));
    let evt = raw(&Method::new("_EVT".into(), 1, true, vec![&read_events, &if_pwrb]));
    let ged = raw(&Device::new(
        "GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &ged_crs),
            &ged_region,
            &ged_field,
            &evt,
        ],
    ));
    let pwrb = raw(&Device::new(
        "PWRB".into(),
        vec![&Name::new("_HID".into(), &EISAName::new("PNP0C0C")), &Name::new("_UID".into(), &0u8)],
    ));

    let mut sb: Vec<&dyn Aml> = vec![&com1, &rtc, &ged, &pwrb];
    if cfg.pci {
        sb.insert(0, &pci0);
    }
    Scope::new("\\_SB_".into(), sb).to_aml_bytes(&mut d);
    Name::new("_S5_".into(), &Package::new(vec![&layout::ACPI_S5_TYPE])).to_aml_bytes(&mut d);
    d.update_checksum();
    d
}

/// Writes all tables and returns the RSDP's guest address.
pub fn write_tables(mem: &GuestMemory, cfg: &AcpiConfig) -> Result<u64> {
    let rsdp_addr = layout::ACPI_START;
    let mut next = rsdp_addr + Rsdp::len() as u64;
    let align = |a: u64| (a + 15) & !15;
    let put = |addr: u64, bytes: &[u8], what: &str| -> Result<()> {
        if addr + bytes.len() as u64 > layout::ACPI_END {
            return Err(Error::Acpi(format!("{what} does not fit below {:#x}", layout::ACPI_END)));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Acpi(format!("writing {what} at {addr:#x}: {e}")))
    };

    let dsdt_addr = align(next);
    let dsdt = dsdt(cfg);
    put(dsdt_addr, dsdt.as_slice(), "DSDT")?;
    next = dsdt_addr + dsdt.len() as u64;

    let fadt_addr = align(next);
    let fadt = fadt(dsdt_addr);
    put(fadt_addr, fadt.as_slice(), "FADT")?;
    next = fadt_addr + fadt.len() as u64;

    let madt_addr = align(next);
    let madt = madt(cfg.vcpus);
    put(madt_addr, madt.as_slice(), "MADT")?;
    next = madt_addr + madt.len() as u64;

    let xsdt_addr = align(next);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, *b"RAYOSXSD", 1);
    xsdt.append(fadt_addr);
    xsdt.append(madt_addr);
    xsdt.update_checksum();
    put(xsdt_addr, xsdt.as_slice(), "XSDT")?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let mut bytes = Vec::new();
    rsdp.to_aml_bytes(&mut bytes);
    put(rsdp_addr, &bytes, "RSDP")?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_tables(&mem, &AcpiConfig { vcpus: 3, pci: true }).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "checksum of {:?}", std::str::from_utf8(&t[..4]));
            t
        };
        let x = read_table(xsdt);
        let entries: Vec<u64> =
            x[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let sigs: Vec<_> = entries.iter().map(|a| read_table(*a)[..4].to_vec()).collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let madt = read_table(entries[1]);
        let lapics = madt[44..].chunks(8).take_while(|c| c[0] == 0).count();
        assert_eq!(lapics, 3);
        let fadt = read_table(entries[0]);
        let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let d = read_table(dsdt);
        let find = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"PCI0") && find(b"_S5_") && find(b"GED_") && find(b"COM1"));
        assert!(mem.num_regions() == 1);
    }
}
