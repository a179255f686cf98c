//! GPT disk images and the FAT32 EFI System Partition on them, written without mounting
//! (gptman for the partition table, fatfs for the filesystem), so builds need no root,
//! no loop devices, and tests can read images back the same way.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fscommon::{BufStream, StreamSlice};
use thiserror::Error;

/// Discoverable Partitions Specification type GUIDs.
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
pub const RAYOS_DATA_TYPE: &str = "bcae553e-c9a9-4fbc-8291-e48c272f7ecf";
pub const SECTOR: u64 = 512;

#[derive(Debug, Error)]
pub enum EspError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: GPT: {1}")]
    Gpt(PathBuf, gptman::Error),
    #[error("{0}: no EFI System Partition in the GPT")]
    NoEsp(PathBuf),
    #[error("{image}: ESP file {file}: {source}")]
    File { image: PathBuf, file: String, source: std::io::Error },
}

/// GUID text → the mixed-endian bytes GPT stores.
pub fn guid_bytes(guid: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(guid).expect("valid GUID constant").to_bytes_le()
}

pub fn guid_string(bytes: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes_le(*bytes).to_string()
}

/// One partition to lay out, in sectors of 512 bytes.
pub struct PartitionSpec {
    pub type_guid: [u8; 16],
    pub name: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

/// Create a sparse disk image of `size` bytes with a protective MBR and a GPT holding `parts`.
pub fn create_gpt_image(path: &Path, size: u64, parts: &[PartitionSpec]) -> Result<(), EspError> {
    let io = |e| EspError::Io(path.to_path_buf(), e);
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(io)?;
    f.set_len(size).map_err(io)?;
    let mut gpt = gptman::GPT::new_from(&mut f, SECTOR, *uuid::Uuid::new_v4().as_bytes())
        .map_err(|e| EspError::Gpt(path.to_path_buf(), e))?;
    for (i, p) in parts.iter().enumerate() {
        gpt[i as u32 + 1] = gptman::GPTPartitionEntry {
            partition_type_guid: p.type_guid,
            unique_partition_guid: *uuid::Uuid::new_v4().as_bytes(),
            starting_lba: p.first_lba,
            ending_lba: p.last_lba,
            attribute_bits: 0,
            partition_name: p.name.as_str().into(),
        };
    }
    gptman::GPT::write_protective_mbr_into(&mut f, SECTOR).map_err(|e| EspError::Gpt(path.to_path_buf(), e))?;
    gpt.write_into(&mut f).map_err(|e| EspError::Gpt(path.to_path_buf(), e))?;
    f.sync_all().map_err(io)
}

/// The byte range of the first ESP on a GPT disk image.
pub fn esp_range(path: &Path) -> Result<(u64, u64), EspError> {
    let mut f = File::open(path).map_err(|e| EspError::Io(path.to_path_buf(), e))?;
    let gpt = gptman::GPT::find_from(&mut f).map_err(|e| EspError::Gpt(path.to_path_buf(), e))?;
    let esp = guid_bytes(ESP_TYPE);
    let range = gpt
        .iter()
        .find(|(_, p)| p.is_used() && p.partition_type_guid == esp)
        .map(|(_, p)| (p.starting_lba * gpt.sector_size, (p.ending_lba + 1) * gpt.sector_size));
    range.ok_or_else(|| EspError::NoEsp(path.to_path_buf()))
}

type Fs = fatfs::FileSystem<BufStream<StreamSlice<File>>>;

/// The FAT filesystem of an image's ESP, opened for reading and writing.
pub struct Esp {
    image: PathBuf,
    fs: Fs,
}

impl Esp {
    /// Format the ESP of `image` as FAT32 with `label` (at most 11 characters).
    pub fn format(image: &Path, label: &str) -> Result<Esp, EspError> {
        let (start, end) = esp_range(image)?;
        let io = |e| EspError::Io(image.to_path_buf(), e);
        let f = OpenOptions::new().read(true).write(true).open(image).map_err(io)?;
        let mut slice = BufStream::new(StreamSlice::new(f, start, end).map_err(io)?);
        let mut l = [b' '; 11];
        for (d, s) in l.iter_mut().zip(label.bytes()) {
            *d = s.to_ascii_uppercase();
        }
        fatfs::format_volume(&mut slice, fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32).volume_label(l))
            .map_err(io)?;
        slice.flush().map_err(io)?;
        drop(slice);
        Esp::open(image)
    }

    pub fn open(image: &Path) -> Result<Esp, EspError> {
        let (start, end) = esp_range(image)?;
        let io = |e| EspError::Io(image.to_path_buf(), e);
        let f = OpenOptions::new().read(true).write(true).open(image).map_err(io)?;
        let slice = BufStream::new(StreamSlice::new(f, start, end).map_err(io)?);
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).map_err(io)?;
        Ok(Esp { image: image.to_path_buf(), fs })
    }

    pub fn fat_type(&self) -> fatfs::FatType {
        self.fs.fat_type()
    }

    pub fn volume_label(&self) -> String {
        self.fs.volume_label()
    }

    fn err(&self, file: &str, source: std::io::Error) -> EspError {
        EspError::File { image: self.image.clone(), file: file.to_string(), source }
    }

    /// Write `data` at `path` (e.g. `EFI/BOOT/BOOTX64.EFI`), creating directories.
    pub fn write(&mut self, path: &str, data: &[u8]) -> Result<(), EspError> {
        let root = self.fs.root_dir();
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let (name, dirs) = comps.split_last().ok_or_else(|| self.err(path, std::io::ErrorKind::InvalidInput.into()))?;
        let mut dir = root;
        for d in dirs {
            dir = match dir.open_dir(d) {
                Ok(x) => x,
                Err(_) => dir.create_dir(d).map_err(|e| self.err(path, e))?,
            };
        }
        let mut f = dir.create_file(name).map_err(|e| self.err(path, e))?;
        f.truncate().map_err(|e| self.err(path, e))?;
        f.write_all(data).map_err(|e| self.err(path, e))?;
        f.flush().map_err(|e| self.err(path, e))?;
        Ok(())
    }

    pub fn read(&self, path: &str) -> Result<Vec<u8>, EspError> {
        let mut f = self.fs.root_dir().open_file(path.trim_start_matches('/')).map_err(|e| self.err(path, e))?;
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(|e| self.err(path, e))?;
        Ok(v)
    }

    pub fn read_string(&self, path: &str) -> Result<String, EspError> {
        let bytes = self.read(path)?;
        String::from_utf8(bytes).map_err(|e| self.err(path, std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }

    /// Every file path on the ESP (directories are not listed), sorted.
    pub fn list(&self) -> Result<Vec<String>, EspError> {
        fn walk<T: fatfs::ReadWriteSeek>(dir: fatfs::Dir<T>, prefix: &str, out: &mut Vec<String>) -> std::io::Result<()> {
            for e in dir.iter() {
                let e = e?;
                let name = e.file_name();
                if name == "." || name == ".." {
                    continue;
                }
                let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
                if e.is_dir() {
                    walk(e.to_dir(), &path, out)?;
                } else {
                    out.push(path);
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(self.fs.root_dir(), "", &mut out).map_err(|e| self.err("/", e))?;
        out.sort();
        Ok(out)
    }

    /// Flush and close the filesystem (marks it clean).
    pub fn close(self) -> Result<(), EspError> {
        let image = self.image.clone();
        self.fs.unmount().map_err(|e| EspError::Io(image, e))
    }
}
