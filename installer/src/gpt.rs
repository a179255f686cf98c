//! Writes the planned partition table with gptman, in an order that survives a power cut.
//!
//! gptman's `GPT::write_into` writes the primary header, then the primary entries, then the
//! backup header and entries. A cut between the primary header and its entries would leave a
//! primary header whose entry-array CRC does not match (readers then fall back to the old
//! backup, so even that is "old"), but a cut after the primary and before the backup leaves
//! primary new and backup old, and some firmware "repairs" the primary from the backup.
//! So the writes gptman produces are captured and replayed as: backup entries, backup header,
//! flush, primary entries, protective MBR, primary header, flush. Until the primary header
//! lands every reader sees the old primary table; after it, the new one; and a rerun of the
//! installer plans again from whichever table it finds.

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::plan::{Plan, PlanError};

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("{disk}: reading the partition table: {source}")]
    Read { disk: String, source: gptman::Error },
    #[error("{disk}: building the partition table: {source}")]
    Build { disk: String, source: gptman::Error },
    #[error("{disk}: writing the partition table: {source}")]
    Write { disk: String, source: io::Error },
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Write+Seek sink that records every write with its offset, so they can be replayed in
/// an order of our choosing.
#[derive(Default)]
struct Recorder {
    pos: u64,
    /// Disk size, for gptman's protective MBR which seeks to the end to size itself.
    end: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // gptman encodes field by field; contiguous pieces are merged so each header and each
        // entry array reaches the disk as one write.
        match self.writes.last_mut() {
            Some((off, data)) if *off + data.len() as u64 == self.pos => data.extend_from_slice(buf),
            _ => self.writes.push((self.pos, buf.to_vec())),
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Recorder {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        match to {
            SeekFrom::Start(p) => self.pos = p,
            SeekFrom::Current(d) => {
                self.pos = self.pos.checked_add_signed(d).ok_or_else(|| io::Error::other("seek before start"))?
            }
            SeekFrom::End(d) => {
                self.pos = self.end.checked_add_signed(d).ok_or_else(|| io::Error::other("seek before start"))?
            }
        }
        Ok(self.pos)
    }
}

/// Builds the new table: the old one with destroyed entries cleared and ours added, or a fresh
/// one for a whole-disk install.
pub fn build<D: Read + Seek>(dev: &mut D, plan: &Plan) -> Result<gptman::GPT, GptError> {
    let disk = plan.disk.name.clone();
    let ss = plan.sector();
    let mut gpt = if plan.new_table {
        gptman::GPT::new_from(dev, ss, *uuid::Uuid::new_v4().as_bytes())
            .map_err(|source| GptError::Build { disk: disk.clone(), source })?
    } else {
        gptman::GPT::read_from(dev, ss).map_err(|source| GptError::Read { disk: disk.clone(), source })?
    };
    // Our partitions are placed on 1 MiB boundaries already; gptman's default alignment would
    // only matter for its own placement helpers.
    gpt.align = 1;
    for p in &plan.destroy {
        gpt[p.number] = gptman::GPTPartitionEntry::empty();
    }
    for p in &plan.create {
        gpt[p.number] = gptman::GPTPartitionEntry {
            partition_type_guid: p.type_guid.to_bytes_le(),
            unique_partition_guid: p.part_uuid.to_bytes_le(),
            starting_lba: p.first_lba,
            ending_lba: p.last_lba,
            attribute_bits: 0,
            partition_name: p.name.as_str().into(),
        };
    }
    Ok(gpt)
}

/// Writes `gpt` to the disk in the power-cut-safe order described above. Returns bytes written.
pub fn write<D: Write + Seek>(
    dev: &mut D,
    gpt: &mut gptman::GPT,
    plan: &Plan,
    flush: &mut dyn FnMut(&mut D) -> io::Result<()>,
) -> Result<u64, GptError> {
    let disk = plan.disk.name.clone();
    let ss = gpt.sector_size;
    let end = (gpt.header.primary_lba.max(gpt.header.backup_lba) + 1) * ss;
    let mut rec = Recorder { end, ..Default::default() };
    gpt.write_into(&mut rec).map_err(|source| GptError::Build { disk: disk.clone(), source })?;
    let mut mbr = Recorder { end, ..Default::default() };
    if plan.new_table {
        gptman::GPT::write_protective_mbr_into(&mut mbr, ss)
            .map_err(|source| GptError::Build { disk: disk.clone(), source })?;
    }

    // gptman may have read the table from the backup (a damaged primary), in which case
    // `header` describes the backup: tell the two apart by position, not by role.
    let primary_header = gpt.header.primary_lba.min(gpt.header.backup_lba) * ss;
    let backup_header = gpt.header.primary_lba.max(gpt.header.backup_lba) * ss;
    let first_usable = gpt.header.first_usable_lba * ss;
    let is_backup = |off: u64| off >= first_usable;
    let (backup, primary): (Vec<_>, Vec<_>) = rec.writes.into_iter().partition(|(off, _)| is_backup(*off));
    let (backup_hdr, backup_entries): (Vec<_>, Vec<_>) = backup.into_iter().partition(|(off, _)| *off == backup_header);
    let (primary_hdr, primary_entries): (Vec<_>, Vec<_>) =
        primary.into_iter().partition(|(off, _)| *off == primary_header);

    let mut total = 0u64;
    let mut put = |dev: &mut D, writes: &[(u64, Vec<u8>)]| -> io::Result<()> {
        for (off, data) in writes {
            dev.seek(SeekFrom::Start(*off))?;
            dev.write_all(data)?;
            total += data.len() as u64;
        }
        Ok(())
    };
    let err = |source| GptError::Write { disk: disk.clone(), source };
    put(dev, &backup_entries).map_err(err)?;
    put(dev, &backup_hdr).map_err(err)?;
    flush(dev).map_err(err)?;
    put(dev, &primary_entries).map_err(err)?;
    put(dev, &mbr.writes).map_err(err)?;
    put(dev, &primary_hdr).map_err(err)?;
    flush(dev).map_err(err)?;
    Ok(total)
}
