//! Linux direct boot: the kernel (a bzImage, or the uncompressed ELF `vmlinux` of the same
//! build) at its load address, the initramfs at the top of low RAM, the command line, and
//! boot_params (zero page) with the e820 map and the ACPI RSDP.
//!
//! Why both formats: under nested KVM the guest's own zstd decompression of a bzImage runs
//! at emulated speed and was about half of rayos-vmm's start-to-init; a vmlinux is only
//! copied (Firecracker and Cloud Hypervisor boot vmlinux for the same reason).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
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
/// Where the x86-64 setup header says an initramfs may end (`initrd_addr_max` of every
/// x86-64 bzImage); used for an ELF kernel, which has no setup header, so that both formats
/// place the initramfs alike.
const X86_64_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;

/// Offsets in the bzImage's first sector (Documentation/arch/x86/boot.rst).
const BZ_BOOT_FLAG_OFFSET: usize = 0x1fe;
const BZ_HEADER_OFFSET: usize = 0x202;
/// Enough of the file to tell the formats apart and hold an ELF64 header.
const DETECT_BYTES: usize = 0x210;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;
/// More program headers than any kernel has (vmlinux has about five).
const ELF_MAX_PHDRS: u16 = 64;

/// What a `kernel` file is, told by its magic: `\x7fELF` at 0 or `HdrS` at 0x202 (with the
/// 0xaa55 boot flag at 0x1fe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    /// An uncompressed x86-64 `vmlinux` ELF (stripped or not).
    Elf,
}

impl KernelFormat {
    pub fn name(self) -> &'static str {
        match self {
            KernelFormat::BzImage => "bzImage",
            KernelFormat::Elf => "ELF vmlinux",
        }
    }
}

/// Tells the format from the file's first bytes; `Err` says what was found instead.
pub fn detect(head: &[u8]) -> std::result::Result<KernelFormat, String> {
    if head.len() >= 4 && &head[..4] == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    let at = |o: usize, n: usize| head.get(o..o + n);
    if at(BZ_HEADER_OFFSET, 4) == Some(&KERNEL_HDR_MAGIC.to_le_bytes()[..]) {
        if at(BZ_BOOT_FLAG_OFFSET, 2) != Some(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes()[..]) {
            return Err("has a `HdrS` setup header at 0x202 but no 0xaa55 boot flag at 0x1fe: not a bzImage".into());
        }
        return Ok(KernelFormat::BzImage);
    }
    Err(format!(
        "neither an ELF vmlinux (no \\x7fELF magic at 0) nor a bzImage (no `HdrS` setup header at 0x202){}",
        if head.len() < DETECT_BYTES { format!("; the file has only {} bytes", head.len()) } else { String::new() }
    ))
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Checks an ELF kernel before linux-loader copies it: linux-loader's `Elf` checks the
/// magic, byte order and header sizes only, so a 32-bit or foreign-architecture ELF, an entry
/// point outside the loaded segments, a truncated file or a kernel larger than the guest's
/// low RAM would otherwise boot into garbage or fail with a reason that names nothing.
fn check_elf(f: &mut File, head: &[u8], file_len: u64, ram_top: u64) -> std::result::Result<(), String> {
    if head.len() < ELF64_EHDR_SIZE {
        return Err(format!("ELF header truncated: the file has only {} bytes", head.len()));
    }
    if head[4] != ELFCLASS64 {
        return Err(format!("ELF class {} is not ELF64; a 64-bit x86 vmlinux is needed", head[4]));
    }
    if head[5] != ELFDATA2LSB {
        return Err("a big-endian ELF; a little-endian x86-64 vmlinux is needed".into());
    }
    let (e_type, e_machine) = (u16_at(head, 16), u16_at(head, 18));
    if e_machine != EM_X86_64 {
        return Err(format!("ELF machine {e_machine} is not x86-64 ({EM_X86_64})"));
    }
    if e_type != ET_EXEC {
        return Err(format!("ELF type {e_type} is not an executable (ET_EXEC); is this a module or object file?"));
    }
    let (entry, phoff, phentsize, phnum) = (u64_at(head, 24), u64_at(head, 32), u16_at(head, 54), u16_at(head, 56));
    if phentsize as usize != ELF64_PHDR_SIZE || phnum == 0 || phnum > ELF_MAX_PHDRS {
        return Err(format!("ELF program header table is malformed ({phnum} entries of {phentsize} bytes)"));
    }
    let table = phnum as u64 * ELF64_PHDR_SIZE as u64;
    if phoff.checked_add(table).is_none_or(|end| end > file_len) {
        return Err(format!("ELF program headers at {phoff:#x} run past the end of the file ({file_len} bytes)"));
    }
    let mut phdrs = vec![0u8; table as usize];
    f.seek(SeekFrom::Start(phoff)).and_then(|_| f.read_exact(&mut phdrs)).map_err(|e| format!("reading program headers: {e}"))?;
    let mut entry_loaded = false;
    let mut loads = 0;
    for (i, ph) in phdrs.chunks_exact(ELF64_PHDR_SIZE).enumerate() {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        loads += 1;
        let (offset, paddr, filesz, memsz) = (u64_at(ph, 8), u64_at(ph, 24), u64_at(ph, 32), u64_at(ph, 40));
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return Err(format!(
                "segment {i} ({filesz} bytes at file offset {offset:#x}) runs past the end of the file ({file_len} bytes): truncated?"
            ));
        }
        if filesz > memsz {
            // The loader copies filesz bytes but reports the end from memsz: the initramfs
            // placed after it would overlap the kernel.
            return Err(format!("segment {i} has more file bytes ({filesz}) than memory bytes ({memsz})"));
        }
        let end = paddr.checked_add(memsz).ok_or_else(|| format!("segment {i} at {paddr:#x} overflows"))?;
        if paddr < layout::HIGH_RAM_START || end > ram_top {
            return Err(format!(
                "segment {i} needs guest memory {paddr:#x}..{end:#x}, outside the VM's low RAM {:#x}..{ram_top:#x}",
                layout::HIGH_RAM_START
            ));
        }
        entry_loaded |= (paddr..paddr + filesz).contains(&entry);
    }
    if loads == 0 {
        return Err("ELF has no loadable segments".into());
    }
    // The vCPU starts with only the first GiB identity-mapped (vcpu.rs).
    if entry >= 1 << 30 {
        return Err(format!("ELF entry point {entry:#x} is above the first GiB, which is all the boot page tables map"));
    }
    if !entry_loaded {
        return Err(format!(
            "ELF entry point {entry:#x} is in no loaded segment (a vmlinux's e_entry is the physical address of startup_64)"
        ));
    }
    Ok(())
}

pub struct BootSetup {
    pub entry: u64,
    pub format: KernelFormat,
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
    let file_len = kf.metadata().map_err(|e| kerr(e.to_string()))?.len();
    let mut head = Vec::with_capacity(DETECT_BYTES);
    (&mut kf).take(DETECT_BYTES as u64).read_to_end(&mut head).map_err(|e| kerr(e.to_string()))?;
    let format = detect(&head).map_err(kerr)?;
    let ram_top = mem_size.min(layout::MEM_32BIT_GAP_START);

    // Both formats enter at the kernel's 64-bit entry, startup_64, in long mode with the
    // first GiB identity-mapped and RSI = boot_params (the vCPU set-up in vcpu.rs). For a
    // vmlinux that is e_entry (phys_startup_64, at the kernel's physical load address); for a
    // bzImage it is the decompressor's startup_64, 0x200 into the protected-mode kernel.
    // The vmlinux also has a PVH entry (CONFIG_PVH), but PVH starts in 32-bit protected
    // mode with paging off, needs an hvm_start_info beside boot_params, and its first
    // instructions only build the page tables we already give it before jumping to the
    // same startup_64: one register set-up and one boot_params for both formats is simpler
    // and no slower.
    let (loaded, hdr) = match format {
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, &mut kf, Some(GuestAddress(layout::HIGH_RAM_START)))
                .map_err(|e| kerr(format!("not a loadable bzImage: {e}")))?;
            let hdr = loaded.setup_header.ok_or_else(|| kerr("bzImage without a setup header".into()))?;
            (loaded, hdr)
        }
        KernelFormat::Elf => {
            check_elf(&mut kf, &head, file_len, ram_top).map_err(kerr)?;
            let loaded = Elf::load(mem, None, &mut kf, Some(GuestAddress(layout::HIGH_RAM_START)))
                .map_err(|e| kerr(format!("not a loadable ELF vmlinux: {e}")))?;
            // No setup header in the file: what Linux reads from it is filled in below, as
            // the boot protocol's "loader fills in" fields are for a bzImage; the rest stays 0.
            (loaded, setup_header { initrd_addr_max: X86_64_INITRD_ADDR_MAX, ..Default::default() })
        }
    };
    let entry = match format {
        KernelFormat::BzImage => loaded.kernel_load.raw_value() + STARTUP_64_OFFSET,
        KernelFormat::Elf => loaded.kernel_load.raw_value(),
    };
    // One line per start; tests check which format booted.
    tracing::info!("kernel {} ({}): entry {entry:#x}, ends at {:#x}", kernel.display(), format.name(), loaded.kernel_end);

    let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| Error::Cmdline(format!("{cmdline:?}: {e}")))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl).map_err(|e| Error::Cmdline(e.to_string()))?;

    // The fields a loader fills in (Documentation/arch/x86/boot.rst), the same for both
    // formats; Firecracker sets the same ones for its vmlinux boot.
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cl.as_cstring().map(|c| c.as_bytes().len() as u32 + 1).unwrap_or(1);
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.acpi_rsdp_addr = rsdp;

    if let Some(path) = initramfs {
        let (addr, size) = load_initramfs(mem, mem_size, path, params.hdr.initrd_addr_max as u64, loaded.kernel_end)?;
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

    Ok(BootSetup { entry, format })
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

/// Puts [`layout::RESET_STUB`] at the real-mode reset vector, for guests that reboot by
/// jumping there.
pub fn write_reset_stub(mem: &GuestMemory) -> Result<()> {
    mem.write_slice(&layout::RESET_STUB, GuestAddress(layout::RESET_VECTOR))
        .map_err(|e| Error::Acpi(format!("writing the reset stub at {:#x}: {e}", layout::RESET_VECTOR)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file holding `bytes`, removed when dropped (these tests run on every CI run).
    fn tmp(name: &str, bytes: &[u8]) -> tempfile::TempPath {
        let f = tempfile::Builder::new().prefix(&format!("vmm-{name}-")).tempfile().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f.into_temp_path()
    }

    /// A minimal x86-64 ELF kernel: one PT_LOAD of `payload` at `paddr`, entry `entry`.
    fn elf(paddr: u64, entry: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; ELF64_EHDR_SIZE + ELF64_PHDR_SIZE];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&(ELF64_EHDR_SIZE as u64).to_le_bytes());
        b[52..54].copy_from_slice(&(ELF64_EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&(ELF64_PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = ELF64_EHDR_SIZE;
        let offset = b.len() as u64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        // bss: memsz beyond filesz, as a vmlinux has.
        b[ph + 40..ph + 48].copy_from_slice(&(payload.len() as u64 + 0x10000).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn bzimage_head() -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[BZ_BOOT_FLAG_OFFSET..BZ_BOOT_FLAG_OFFSET + 2].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        b[BZ_HEADER_OFFSET..BZ_HEADER_OFFSET + 4].copy_from_slice(b"HdrS");
        b
    }

    /// The reset vector holds `mov al, 1; mov dx, 0x601; out dx, al; hlt; jmp $-3`: the
    /// ACPI reset register write that the VMM turns into a reboot, then a halt loop.
    #[test]
    fn the_reset_vector_writes_the_reset_register() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_reset_stub(&mem).unwrap();
        let mut code = [0u8; 10];
        mem.read_slice(&mut code, GuestAddress(0xffff0)).unwrap();
        assert_eq!(code[0..2], [0xb0, layout::ACPI_RESET_VALUE]);
        assert_eq!(u16::from_le_bytes([code[3], code[4]]), layout::pio::ACPI_RESET);
        assert_eq!(code[2], 0xba);
        assert_eq!(code[5..9], [0xee, 0xf4, 0xeb, 0xfd], "out dx, al; hlt; jmp back to the hlt");
        // The e820 map keeps it away from the kernel's allocator.
        assert!(layout::e820_map(64 << 20)
            .iter()
            .any(|&(start, size, t)| t == layout::E820_RESERVED && start <= 0xffff0 && 0xffff0 + 10 <= start + size));
    }

    #[test]
    fn formats_are_told_by_their_magic() {
        assert_eq!(detect(&elf(0x100_0000, 0x100_0000, &[0x90; 16])), Ok(KernelFormat::Elf));
        assert_eq!(detect(&bzimage_head()), Ok(KernelFormat::BzImage));
        let mut no_flag = bzimage_head();
        no_flag[BZ_BOOT_FLAG_OFFSET] = 0;
        assert!(detect(&no_flag).unwrap_err().contains("0xaa55"));
        let e = detect(&[0u8; 0x400]).unwrap_err();
        assert!(e.contains("ELF") && e.contains("bzImage"), "{e}");
        assert!(detect(b"\x7fEL").unwrap_err().contains("only 3 bytes"));
        assert!(detect(&[]).is_err());
    }

    #[test]
    fn an_elf_kernel_boots_at_its_entry_with_a_filled_in_setup_header() {
        let payload: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let k = tmp("elf-ok", &elf(0x100_0000, 0x100_0000, &payload));
        let initrd = tmp("elf-initrd", &[5u8; 3000]);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let b = load(&mem, 64 << 20, &k, Some(&*initrd), "console=ttyS0", 0xe0000).unwrap();
        assert_eq!((b.entry, b.format), (0x100_0000, KernelFormat::Elf));
        let mut got = vec![0u8; payload.len()];
        mem.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(got, payload);
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let (flag, magic, loader, cl) = (p.hdr.boot_flag, p.hdr.header, p.hdr.type_of_loader, p.hdr.cmd_line_ptr);
        assert_eq!((flag, magic, loader, cl), (0xaa55, KERNEL_HDR_MAGIC, 0xff, layout::CMDLINE_START as u32));
        let (align, rsdp, nr) = (p.hdr.kernel_alignment, p.acpi_rsdp_addr, p.e820_entries);
        assert_eq!((align, rsdp, nr as usize), (KERNEL_MIN_ALIGNMENT_BYTES, 0xe0000, layout::e820_map(64 << 20).len()));
        let cmdline_size = p.hdr.cmdline_size;
        assert_eq!(cmdline_size as usize, "console=ttyS0".len() + 1);
        let (rd, rd_size) = (p.hdr.ramdisk_image as u64, p.hdr.ramdisk_size);
        // Above the kernel's bss, at the top of RAM.
        assert!(rd >= 0x100_0000 + 4096 + 0x10000 && rd + 3000 <= 64 << 20, "{rd:#x}");
        assert_eq!(rd_size, 3000);
    }

    #[test]
    fn malformed_elf_kernels_are_refused_by_name() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let good = elf(0x100_0000, 0x100_0000, &[0x90; 4096]);
        let refused = |name: &str, bytes: &[u8], want: &str| {
            let p = tmp(name, bytes);
            let e = load(&mem, 64 << 20, &p, None, "console=ttyS0", 0).err().unwrap().to_string();
            assert!(e.contains(&p.display().to_string()) && e.contains(want), "{name}: {e}");
        };
        refused("elf-trunc", &good[..good.len() - 100], "truncated");
        refused("elf-hdr", &good[..40], "ELF header truncated");
        let mut c32 = good.clone();
        c32[4] = 1;
        refused("elf-32", &c32, "not ELF64");
        let mut arm = good.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        refused("elf-arm", &arm, "not x86-64");
        refused("elf-entry", &elf(0x100_0000, 0x200_0000, &[0x90; 4096]), "entry point 0x2000000");
        refused("elf-big", &elf(0x3ff_0000, 0x3ff_0000, &[0x90; 4096]), "outside the VM's low RAM");
        let mut no_bss = good.clone();
        let ph = ELF64_EHDR_SIZE;
        no_bss[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes());
        refused("elf-filesz", &no_bss, "more file bytes");
        let mut phnum = good.clone();
        phnum[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        refused("elf-phnum", &phnum, "program header");
    }

    #[test]
    fn not_a_kernel_is_named() {
        let p = tmp("notkernel", &[0u8; 8192]);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e = load(&mem, 64 << 20, &p, None, "console=ttyS0", 0).err().unwrap().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains("bzImage"), "{e}");
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let p = tmp("initrd", &[7u8; 10_000]);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let (addr, size) = load_initramfs(&mem, 64 << 20, &p, 0x37ff_ffff, 0x200_0000).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + size + 4096 > 64 << 20);
        let big = tmp("initrd-big", &vec![0u8; 40 << 20]);
        let e = load_initramfs(&mem, 64 << 20, &big, 0x37ff_ffff, 0x200_0000).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}
