//! Linux direct boot: bzImage (linux-loader) at 1 MiB, the initramfs at the top of low RAM,
//! the command line, and boot_params (zero page) with the e820 map and the ACPI RSDP.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::devices::GuestMemory;
use crate::error::{Error, Result};
use crate::layout;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// 64-bit entry point: 0x200 past the protected-mode kernel's load address.
const STARTUP_64_OFFSET: u64 = 0x200;

pub struct BootSetup {
    pub entry: u64,
}

pub fn load(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootSetup> {
    let kerr = |reason: String| Error::Kernel { path: kernel.into(), reason };
    let mut kf = File::open(kernel).map_err(|e| kerr(e.to_string()))?;
    let loaded = BzImage::load(mem, None, &mut kf, Some(GuestAddress(layout::HIGH_RAM_START)))
        .map_err(|e| kerr(format!("not a loadable bzImage: {e}")))?;
    let hdr = loaded.setup_header.ok_or_else(|| kerr("no setup header".into()))?;

    let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| Error::Cmdline(format!("{cmdline:?}: {e}")))?;
    // Linux guests reboot through the i8042 unless told otherwise (as Firecracker does):
    // their default ACPI-first reboot path hung in our nested tests before reaching any
    // reset register, while `reboot=k` and triple faults reset promptly.
    if !cmdline.split_whitespace().any(|w| w.starts_with("reboot=")) {
        cl.insert_str("reboot=k").map_err(|e| Error::Cmdline(e.to_string()))?;
    }
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl).map_err(|e| Error::Cmdline(e.to_string()))?;

    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cl.as_cstring().map(|c| c.as_bytes().len() as u32 + 1).unwrap_or(1);
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.acpi_rsdp_addr = rsdp;

    if let Some(path) = initramfs {
        let (addr, size) = load_initramfs(mem, mem_size, path, hdr.initrd_addr_max as u64, loaded.kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = layout::e820_map(mem_size);
    if e820.len() > params.e820_table.len() {
        return Err(Error::Memory(format!("{} e820 entries do not fit", e820.len())));
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *type_ };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| Error::Memory(format!("writing boot_params: {e}")))?;

    Ok(BootSetup { entry: loaded.kernel_load.raw_value() + STARTUP_64_OFFSET })
}

/// Places the initramfs page-aligned as high as the kernel allows in low RAM.
fn load_initramfs(mem: &GuestMemory, mem_size: u64, path: &Path, addr_max: u64, kernel_end: u64) -> Result<(u64, u64)> {
    let ierr = |reason: String| Error::Initramfs { path: path.into(), reason };
    let mut f = File::open(path).map_err(|e| ierr(e.to_string()))?;
    let size = f.metadata().map_err(|e| ierr(e.to_string()))?.len();
    let low_top = mem_size.min(layout::MEM_32BIT_GAP_START);
    let limit = if addr_max == 0 { low_top } else { low_top.min(addr_max + 1) };
    let addr = limit.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= kernel_end.max(layout::HIGH_RAM_START));
    let addr = addr.ok_or_else(|| {
        ierr(format!("{size} bytes do not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}"))
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| ierr(format!("copying into guest memory at {addr:#x}: {e}")))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_kernel_is_named() {
        let p = std::env::temp_dir().join(format!("vmm-notkernel-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e = load(&mem, 64 << 20, &p, None, "console=ttyS0", 0).err().unwrap().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains("bzImage"), "{e}");
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let p = std::env::temp_dir().join(format!("vmm-initrd-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let (addr, size) = load_initramfs(&mem, 64 << 20, &p, 0x37ff_ffff, 0x200_0000).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + size + 4096 > 64 << 20);
        let big = std::env::temp_dir().join(format!("vmm-initrd-big-{}", std::process::id()));
        std::fs::write(&big, vec![0u8; 40 << 20]).unwrap();
        let e = load_initramfs(&mem, 64 << 20, &big, 0x37ff_ffff, 0x200_0000).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}
