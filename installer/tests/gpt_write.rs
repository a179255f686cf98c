//! Writing the partition table: other partitions untouched, and every prefix of the write
//! sequence (a power cut) leaves a readable old or new table.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};

use common::*;
use installer::disks;
use installer::guids;
use installer::plan::{make_plan, Target, VmStorage};

fn table(img: &std::path::Path) -> Vec<(u32, u64, u64, [u8; 16])> {
    let mut f = File::open(img).unwrap();
    let gpt = gptman::GPT::find_from(&mut f).unwrap();
    gpt.iter().filter(|(_, e)| e.is_used()).map(|(n, e)| (n, e.starting_lba, e.ending_lba, e.partition_type_guid)).collect()
}

#[test]
fn new_table_keeps_neighbour_partition_bytes_and_is_valid_on_both_copies() {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "NV-1", 12 * GIB));
    write_gpt(&img, &[(guids::LINUX_DATA, "home", 2048, 2048 + 2 * 2097152 - 1)]);
    // The pattern covers the partition's first and last 64 MiB (sha256 is slow in debug builds).
    let sum = fill_pattern(&img, 2048 * 512, 64 * MIB);
    let sum_end = fill_pattern(&img, 2048 * 512 + 2 * GIB - 64 * MIB, 64 * MIB);
    let d = disks::enumerate(&m.paths, None).unwrap().remove(0);
    let plan = make_plan(&d, Target::LargestFree, VmStorage::DataVolume).unwrap();

    let mut f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut gpt = installer::gpt::build(&mut f, &plan).unwrap();
    let n = installer::gpt::write(&mut f, &mut gpt, &plan, &mut |d: &mut File| d.sync_data()).unwrap();
    assert!(n > 2 * 16384, "both entry arrays and headers written ({n} bytes)");
    drop(f);

    assert_eq!(checksum(&img, 2048 * 512, 64 * MIB), sum, "the existing partition's bytes are unchanged");
    assert_eq!(checksum(&img, 2048 * 512 + 2 * GIB - 64 * MIB, 64 * MIB), sum_end);
    let t = table(&img);
    assert_eq!(t.len(), 3);
    assert_eq!(t[0], (1, 2048, 2048 + 2 * 2097152 - 1, guids::LINUX_DATA.to_bytes_le()));
    assert_eq!(t[1].3, guids::ESP.to_bytes_le());
    assert_eq!(t[2].3, guids::RAYOS_DATA.to_bytes_le());

    // The backup alone must describe the same table: wipe the primary header and read again.
    let mut f = OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(512)).unwrap();
    f.write_all(&[0u8; 512]).unwrap();
    drop(f);
    assert_eq!(table(&img), t);
}

/// A disk that loses power after `budget` sectors: a sector is written whole or not at all
/// (what disks guarantee), later writes fail and reach nothing.
struct PowerCut {
    f: File,
    budget: usize,
}
impl Write for PowerCut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let sectors = buf.len().div_ceil(512);
        if sectors > self.budget {
            let n = self.budget * 512;
            self.f.write_all(&buf[..n])?;
            self.budget = 0;
            return Err(io::Error::other("power cut"));
        }
        self.budget -= sectors;
        self.f.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl Seek for PowerCut {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.f.seek(to)
    }
}

#[test]
fn power_cut_at_any_write_leaves_old_or_new_table() {
    let m = FakeMachine::new();
    let img = m.add_disk(&nvme("nvme0n1", "NV-1", 8 * GIB));
    write_gpt(&img, &[(guids::LINUX_DATA, "home", 2048, 2048 + 2097152 - 1)]);
    let old = table(&img);
    let d = disks::enumerate(&m.paths, None).unwrap().remove(0);

    for target in [Target::LargestFree, Target::WholeDisk] {
        let plan = make_plan(&d, target.clone(), VmStorage::DataVolume).unwrap();
        let mut f = OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let built = installer::gpt::build(&mut f, &plan).unwrap();
        let expected: Vec<_> = built
            .iter()
            .filter(|(_, e)| e.is_used())
            .map(|(n, e)| (n, e.starting_lba, e.ending_lba, e.partition_type_guid))
            .collect();
        // Save the first and last MiB (both tables) to restore between runs.
        let save = |f: &mut File| {
            let mut head = vec![0u8; 1 << 20];
            let mut tail = vec![0u8; 1 << 20];
            use std::io::Read;
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_exact(&mut head).unwrap();
            f.seek(SeekFrom::End(-(1 << 20))).unwrap();
            f.read_exact(&mut tail).unwrap();
            (head, tail)
        };
        let (head, tail) = save(&mut f);
        let mut new = None;
        let mut cuts = 0;
        for budget in 0.. {
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(&head).unwrap();
            f.seek(SeekFrom::End(-(1 << 20))).unwrap();
            f.write_all(&tail).unwrap();
            let mut disk = PowerCut { f: f.try_clone().unwrap(), budget };
            let mut gpt = built.clone();
            let res = installer::gpt::write(&mut disk, &mut gpt, &plan, &mut |_| Ok(()));
            let done = match res {
                Ok(_) => true,
                Err(e) if e.to_string().contains("power cut") => false,
                Err(e) => panic!("{target:?}: {e}"),
            };
            let now = table(&img);
            if done {
                new = Some(now);
                break;
            }
            cuts += 1;
            // Until the primary is complete, readers see either the old primary or (once the
            // old primary's entries no longer match its CRC) the complete new backup.
            assert!(now == old || now == expected, "{target:?}: after {budget} sectors the table is neither old nor new: {now:?}");
        }
        let new = new.unwrap();
        assert_ne!(new, old);
        assert_eq!(new, expected);
        assert!(cuts >= 66, "{target:?}: every sector of both entry arrays was a cut point ({cuts})");
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&head).unwrap();
        f.seek(SeekFrom::End(-(1 << 20))).unwrap();
        f.write_all(&tail).unwrap();
    }
}
