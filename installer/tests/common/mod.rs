//! A fake machine for host tests: a sysfs tree in a temp dir whose disks are sparse image
//! files (made like `truncate`), written and read by the real gptman, fatfs and mke2fs.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use installer::disks::SystemPaths;
use installer::esp::BootFiles;
use installer::install::Environment;
use sha2::{Digest, Sha256};

pub struct FakeMachine {
    pub dir: tempfile::TempDir,
    pub paths: SystemPaths,
}

pub struct DiskSpec<'a> {
    pub name: &'a str,
    /// Device path below /sys/devices, which decides the transport.
    pub devpath: &'a str,
    pub model: &'a str,
    pub serial: &'a str,
    /// Put the serial in VPD page 0x80 (SCSI/ATA) instead of device/serial (NVMe).
    pub serial_in_vpd: bool,
    pub size: u64,
    pub removable: bool,
}

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

pub fn nvme(name: &str, serial: &str, size: u64) -> DiskSpec<'static> {
    DiskSpec {
        name: Box::leak(name.to_string().into_boxed_str()),
        devpath: Box::leak(format!("pci0000:00/0000:00:04.0/nvme/nvme0/{name}").into_boxed_str()),
        model: "QEMU NVMe Ctrl",
        serial: Box::leak(serial.to_string().into_boxed_str()),
        serial_in_vpd: false,
        size,
        removable: false,
    }
}

impl FakeMachine {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = SystemPaths { sys_class_block: dir.path().join("sys/class/block"), dev: dir.path().join("dev") };
        fs::create_dir_all(&paths.sys_class_block).unwrap();
        fs::create_dir_all(&paths.dev).unwrap();
        fs::create_dir_all(dir.path().join("run")).unwrap();
        FakeMachine { dir, paths }
    }

    pub fn add_disk(&self, d: &DiskSpec) -> PathBuf {
        let real = self.dir.path().join("sys/devices").join(d.devpath);
        fs::create_dir_all(real.join("device")).unwrap();
        fs::create_dir_all(real.join("queue")).unwrap();
        let w = |p: &str, v: &str| fs::write(real.join(p), format!("{v}\n")).unwrap();
        w("size", &(d.size / 512).to_string());
        w("removable", if d.removable { "1" } else { "0" });
        w("ro", "0");
        w("queue/logical_block_size", "512");
        w("queue/rotational", "0");
        w("device/model", d.model);
        w("stat", "0 0 0 0 0 0 0 0 0 0 0");
        if d.serial_in_vpd {
            let mut vpd = vec![0, 0x80, 0, d.serial.len() as u8];
            vpd.extend_from_slice(d.serial.as_bytes());
            fs::write(real.join("device/vpd_pg80"), vpd).unwrap();
        } else {
            w("device/serial", d.serial);
        }
        symlink(&real, self.paths.sys_class_block.join(d.name)).unwrap();
        let img = self.paths.dev.join(d.name);
        let f = fs::File::create(&img).unwrap();
        f.set_len(d.size).unwrap();
        img
    }

    /// Adds sysfs partition entries as the kernel would after reading the table.
    pub fn add_partition_node(&self, disk: &str, part: &str, number: u32, start: u64, sectors: u64) {
        let sys = fs::canonicalize(self.paths.sys_class_block.join(disk)).unwrap().join(part);
        fs::create_dir_all(&sys).unwrap();
        fs::write(sys.join("partition"), format!("{number}\n")).unwrap();
        fs::write(sys.join("start"), format!("{start}\n")).unwrap();
        fs::write(sys.join("size"), format!("{sectors}\n")).unwrap();
        symlink(&sys, self.paths.sys_class_block.join(part)).unwrap();
    }

    pub fn env(&self) -> Environment {
        Environment {
            paths: self.paths.clone(),
            efivars: Some(self.dir.path().join("efivars")),
            staging_base: self.dir.path().join("run"),
            mke2fs: which("mke2fs"),
        }
    }
}

pub fn which(tool: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} not found; install e2fsprogs/dosfstools");
}

/// Writes a GPT with the given (type, name, first_lba, last_lba) partitions, using gptman.
pub fn write_gpt(img: &Path, parts: &[(uuid::Uuid, &str, u64, u64)]) -> Vec<uuid::Uuid> {
    let mut f = fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut gpt = gptman::GPT::new_from(&mut f, 512, *uuid::Uuid::new_v4().as_bytes()).unwrap();
    let mut uuids = Vec::new();
    for (i, (t, name, first, last)) in parts.iter().enumerate() {
        let u = uuid::Uuid::new_v4();
        uuids.push(u);
        gpt[(i + 1) as u32] = gptman::GPTPartitionEntry {
            partition_type_guid: t.to_bytes_le(),
            unique_partition_guid: u.to_bytes_le(),
            starting_lba: *first,
            ending_lba: *last,
            attribute_bits: 0,
            partition_name: (*name).into(),
        };
    }
    gptman::GPT::write_protective_mbr_into(&mut f, 512).unwrap();
    gpt.write_into(&mut f).unwrap();
    uuids
}

/// Fills a byte range with a deterministic pattern and returns its checksum.
pub fn fill_pattern(img: &Path, offset: u64, len: u64) -> String {
    let mut f = fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut x: u32 = 0x1234_5678;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    checksum(img, offset, len)
}

pub fn checksum(img: &Path, offset: u64, len: u64) -> String {
    let mut f = fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    format!("{:x}", h.finalize())
}

/// Boot files like the USB medium's: the real systemd-boot when installed, small stand-ins
/// for kernel and initramfs.
pub fn boot_files() -> BootFiles {
    let sdboot = fs::read("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").unwrap_or_else(|_| b"MZ systemd-boot".to_vec());
    BootFiles {
        systemd_boot: sdboot,
        kernel: (0..3_000_000u32).map(|i| (i * 7) as u8).collect(),
        initramfs: (0..5_000_000u32).map(|i| (i * 13) as u8).collect(),
        answers: None,
        default_linux: Some(default_linux_packed()),
        default_linux_kernel: Some(b"\x7fELF stand-in vmlinux".iter().copied().cycle().take(1_000_000).collect()),
    }
}

/// The bytes the stand-in default Linux disk holds at `GUEST_MARK_OFFSET` (the rest are holes).
pub const GUEST_MARK: &[u8] = b"stand-in guest root filesystem";
pub const GUEST_MARK_OFFSET: u64 = 3 << 20;
pub const GUEST_DISK_SIZE: u64 = 16 << 20;

/// A packed stand-in for the default Linux VM's disk: 16 MiB, one block of data.
pub fn default_linux_packed() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut f = fs::File::create(&disk).unwrap();
    f.set_len(GUEST_DISK_SIZE).unwrap();
    f.seek(SeekFrom::Start(GUEST_MARK_OFFSET)).unwrap();
    f.write_all(GUEST_MARK).unwrap();
    drop(f);
    let packed = dir.path().join("disk.rdisk.zst");
    installer::diskpack::pack(&disk, &packed, 3).unwrap();
    fs::read(&packed).unwrap()
}

/// Copies a byte range to its own file (sparse) so e2fsck/debugfs/fsck.vfat can check it.
pub fn extract(img: &Path, offset: u64, len: u64, out: &Path) {
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "conv=sparse", "status=none", "iflag=skip_bytes,count_bytes"])
        .arg(format!("skip={offset}"))
        .arg(format!("count={len}"))
        .status()
        .unwrap();
    assert!(status.success());
}

pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(which(cmd)).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
