//! VM snapshots: a directory with the guest's RAM (`memory`, sparse), the display's pixels
//! (`framebuffer`, sparse, when the VM has a display) and everything else as one versioned
//! `state.json`. Each part saves itself (Firecracker style): vCPUs in
//! [`crate::vcpu::save_state`], the in-kernel irqchip/PIT/clock in [`crate::vm::Vm::save_state`],
//! PCI and virtio devices in [`crate::devices::pci::PciRoot::save_state`], legacy devices in
//! their own modules. This module puts the parts together, writes them atomically, and
//! checks a snapshot before a restore uses it.
//!
//! A snapshot is taken with the vCPUs parked and the device workers paused; the VM stays
//! paused afterwards (`resume` continues it). It is restored by `rayos-vmm --restore <dir>`
//! in a new process, on the same host (same KVM, same disk images at the same paths).
//!
//! Format 3 makes a stale or damaged state impossible to resume unnoticed: every top-level
//! section of state.json has a crc32c in `checksums` (over its serialized JSON, keys
//! sorted), `required` lists the sections a reader must understand, each section sits on
//! its own line (a syntax error's line names the section), RAM and framebuffer carry a
//! crc32c per 2 MiB chunk ([`memfile`]) and every disk image its identity ([`disks`]).
//! Any refusal is a [`SnapshotError::rejects_state`] error naming file, field and values.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::devices::legacy::cmos::{Cmos, CmosState};
use crate::devices::legacy::serial::SerialRegs;
use crate::devices::pci::PciState;
use crate::spec::VmSpec;
use crate::vcpu::{SharedVcpu, VcpuState};
use crate::vm::{Vm, VmState};
use crate::vmdir::{VmDir, VmDirError};
use crate::VmShared;

pub mod disks;
pub mod memfile;

pub use disks::DiskIdentity;
use memfile::{ChunkSums, ProgressPacer};

/// Bumped whenever the layout of `state.json` or `memory` changes meaning.
pub const FORMAT_VERSION: u32 = 3;
/// Device models and their saved state change between builds: only the VMM build that
/// wrote a snapshot restores it. The build id is `<version>-<git commit>-state-<hash>`, the
/// hash over the sources that define saved state (see `vmm/build.rs`).
pub const VMM_VERSION: &str = env!("RAYOS_VMM_BUILD_ID");
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";
pub const FRAMEBUFFER_FILE: &str = "framebuffer";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} already exists; send \"replace\": true to overwrite it")]
    Exists(PathBuf),
    #[error("{file}: field `{field}`: {reason}")]
    Field { file: PathBuf, field: String, reason: String },
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{0} is not a snapshot (no state.json of rayos-vmm in a directory); \"replace\" replaces only a snapshot")]
    NotSnapshot(PathBuf),
    #[error(transparent)]
    Dir(#[from] VmDirError),
    #[error("vCPUs did not stop within 2 s")]
    PauseTimeout,
    #[error("this VM has no PCI root to save")]
    NoPci,
    #[error(transparent)]
    Vmm(#[from] crate::Error),
}

impl SnapshotError {
    /// Whether this refuses the saved state itself (unreadable, damaged, from another build,
    /// for another CPU or other disks), as opposed to a failure of this host or process:
    /// `rayos-vmm --restore` exits [`rayos_proto::vmm::exit_code::STATE_REJECTED`] for these.
    pub fn rejects_state(&self) -> bool {
        matches!(self, SnapshotError::Field { .. } | SnapshotError::Io { .. } | SnapshotError::Vmm(crate::Error::StateRejected { .. }))
    }
}

fn io_err(file: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { file: file.to_path_buf(), source }
}

/// Guest RAM (or the display's framebuffer) as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryInfo {
    /// File name inside the snapshot directory.
    pub file: String,
    /// Bytes of guest RAM (the file's length; most of it holes).
    pub size: u64,
    /// Bytes actually written (non-zero pages).
    pub data_bytes: u64,
    /// Bytes per checksummed chunk ([`memfile::CHUNK`]).
    pub chunk_size: u64,
    /// crc32c of each chunk in order, `null` for an all-zero chunk (a hole).
    pub chunks: ChunkSums,
}

/// Port I/O devices with state worth keeping. The i8042 is only a reset line and the ACPI
/// registers only latch the power button, so neither is saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyState {
    pub serial: SerialRegs,
    pub cmos: CmosState,
    /// When the guest reached init, in ms after the original VMM's start.
    pub boot_ms: Option<u64>,
}

/// `state.json`.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub format_version: u32,
    pub vmm_version: String,
    pub created_unix_ms: u64,
    /// The supervisor's save generation (`snapshot` request), 0 when none was given: the
    /// supervisor resumes a state only with the generation it recorded for it.
    pub generation: u64,
    /// Every disk image in spec order, synced before RAM was saved.
    pub disks: Vec<DiskIdentity>,
    /// The spec the VM was started from; a restore builds the same devices from it.
    pub spec: VmSpec,
    pub memory: MemoryInfo,
    /// The display's pixels; present exactly when `spec.display` is, so that a restored
    /// screen shows what the guest drew (it does not redraw an unchanged console).
    pub framebuffer: Option<MemoryInfo>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub legacy: LegacyState,
    pub pci: PciState,
}

/// What the snapshot writer reaches at run time, besides [`VmShared`]'s other fields.
pub struct Sources {
    pub spec: VmSpec,
    pub vm: Arc<Vm>,
    pub memfd: Arc<File>,
    pub mem_size: u64,
    pub vcpus: Vec<SharedVcpu>,
    /// From [`crate::vcpu::saveable_msrs`] at set-up.
    pub msrs: Vec<u32>,
    pub cmos: Arc<Mutex<Cmos>>,
}

/// What `snapshot` answers.
#[derive(Debug, Serialize)]
pub struct Report {
    pub path: PathBuf,
    pub generation: u64,
    pub memory_bytes: u64,
    pub memory_written: u64,
    pub state_bytes: u64,
    pub ms: u64,
}

/// Pauses the VM (if it runs), saves it into the directory `path` and leaves it paused,
/// devices included (the control socket's `resume` continues both).
/// `path` must name a directory directly inside the VM's own directory (`spec.vm_dir`).
pub fn take(vm: &VmShared, path: &Path, replace: bool, generation: u64) -> Result<Report, SnapshotError> {
    let t0 = Instant::now();
    let dir = vm.vm_dir.as_deref().ok_or(VmDirError::NoDir)?;
    let target = Target::new(dir, path)?;
    target.check(replace)?;
    if !vm.pause(Duration::from_secs(2)) {
        return Err(SnapshotError::PauseTimeout);
    }
    let pci = vm.devices.pci.as_ref().ok_or(SnapshotError::NoPci)?;
    // Device workers stop taking requests; what they took is complete (see VirtioDevice).
    pci.pause();
    let r = save_paused(vm, pci, &target, replace, generation);
    // Saved, the devices stay paused with the vCPUs until `resume`: a request the guest had
    // queued would otherwise reach the disk after its identity was recorded, and a state
    // whose VMM is then stopped (a save at shutdown) would be refused as stale.
    if r.is_err() {
        pci.resume();
    }
    let (memory_written, state_bytes) = r?;
    let report = Report {
        path: dir.path().join(&target.name),
        generation,
        memory_bytes: vm.snapshot.mem_size,
        memory_written,
        state_bytes,
        ms: t0.elapsed().as_millis() as u64,
    };
    tracing::info!(?report, "snapshot written");
    Ok(report)
}

fn save_paused(
    vm: &VmShared,
    pci: &crate::devices::pci::PciRoot,
    target: &Target,
    replace: bool,
    generation: u64,
) -> Result<(u64, u64), SnapshotError> {
    let src = &vm.snapshot;
    // The disks first: once the state exists, what it describes is on stable storage.
    let disks = disks::sync_and_identify(&vm.devices.disks)?;
    let vm_state = src.vm.save_state()?;
    let vcpus = src
        .vcpus
        .iter()
        .enumerate()
        .map(|(id, v)| crate::vcpu::save_state(v, id as u8, &src.msrs))
        .collect::<crate::Result<Vec<_>>>()?;
    let legacy = LegacyState {
        serial: vm.serial.lock().unwrap_or_else(|p| p.into_inner()).save_state(),
        cmos: src.cmos.lock().unwrap_or_else(|p| p.into_inner()).save_state(),
        boot_ms: vm.boot_time.get(),
    };
    let pci_state = pci.save_state();
    if vcpus.first().and_then(|v| v.msrs.iter().find(|m| m.index == 0x10)).is_some_and(|m| m.data == 0) {
        // Seen under nested KVM on TCG: KVM's idea of the guest TSC is not what the guest
        // reads, and kvmclock (which KVM derives from it) cannot be carried over exactly.
        tracing::warn!("vCPU 0's TSC reads 0 from KVM (a nested KVM without working TSC scaling?): the restored guest's clock may jump");
    }
    let mut vm_state = vm_state;
    let stable = vm_state.clock.flags & kvm_bindings::KVM_CLOCK_TSC_STABLE != 0;
    let guest_ns = guest_kvmclock_ns(src, vcpus.first());
    tracing::info!("kvmclock: KVM_GET_CLOCK {} ns (TSC stable: {stable}), guest pvclock {guest_ns:?} ns", vm_state.clock.clock);
    if let (false, Some(ns)) = (stable, guest_ns) {
        // Without a stable TSC, KVM_GET_CLOCK is the host's monotonic clock plus an offset,
        // which drifts from the TSC-based time the guest computes from its pvclock page
        // (seconds under nested emulation). Restoring it would jump the guest's clock; the
        // guest's own reading, as QEMU does, continues it.
        vm_state.clock.clock = ns;
    }
    target.write(replace, |tmp| {
        let total = src.mem_size;
        let mut pacer = ProgressPacer::new(total, ProgressPacer::EVERY);
        let mut progress = |written: u64| {
            if pacer.due(written, Instant::now()) {
                vm.events.send(rayos_proto::vmm::Event::SaveProgress { written, total });
            }
        };
        let memory = save_part(tmp, MEMORY_FILE, &src.memfd, src.mem_size, &mut progress)?;
        let framebuffer = match vm.devices.framebuffer() {
            Some(fb) => Some(save_part(tmp, FRAMEBUFFER_FILE, fb.file(), fb.size(), &mut |_| {})?),
            None => None,
        };
        let data_bytes = memory.data_bytes;
        let state = SnapshotState {
            format_version: FORMAT_VERSION,
            vmm_version: VMM_VERSION.into(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            generation,
            disks,
            spec: src.spec.clone(),
            memory,
            framebuffer,
            vm: vm_state,
            vcpus,
            legacy,
            pci: pci_state,
        };
        let state_path = tmp.path().join(STATE_FILE);
        let text = encode_state(&state).map_err(|e| SnapshotError::Field {
            file: state_path.clone(),
            field: "(document)".into(),
            reason: e.to_string(),
        })?;
        let mut f = tmp.create_new(STATE_FILE)?;
        f.write_all(&text).map_err(io_err(&state_path))?;
        f.sync_all().map_err(io_err(&state_path))?;
        Ok((data_bytes, text.len() as u64))
    })
}

/// Writes `size` bytes of `src` (a memfd) sparsely into a new file `name` in the snapshot
/// being written, checksummed per chunk, and syncs it.
fn save_part(tmp: &TmpDir, name: &str, src: &File, size: u64, progress: &mut dyn FnMut(u64)) -> Result<MemoryInfo, SnapshotError> {
    let path = tmp.path().join(name);
    let out = tmp.create_new(name)?;
    let (data_bytes, chunks) = memfile::save(src, &out, size, progress).map_err(io_err(&path))?;
    out.sync_all().map_err(io_err(&path))?;
    Ok(MemoryInfo { file: name.into(), size, data_bytes, chunk_size: memfile::CHUNK, chunks })
}

/// The sections of state.json that are not state but describe the others.
const REQUIRED: &str = "required";
const CHECKSUMS: &str = "checksums";
/// The sections this build reads (all of [`SnapshotState`]'s fields).
const KNOWN_SECTIONS: [&str; 12] = [
    "format_version",
    "vmm_version",
    "created_unix_ms",
    "generation",
    "disks",
    "spec",
    "memory",
    "framebuffer",
    "vm",
    "vcpus",
    "legacy",
    "pci",
];

fn section_crc(v: &Value) -> u32 {
    // serde_json's map is ordered by key, so a section reads back to the same bytes.
    crc32c::crc32c(&serde_json::to_vec(v).expect("a JSON value serializes"))
}

/// state.json's bytes for `state`: all its sections required and checksummed.
pub fn encode_state(state: &SnapshotState) -> serde_json::Result<Vec<u8>> {
    let Value::Object(doc) = serde_json::to_value(state)? else {
        unreachable!("SnapshotState is a struct");
    };
    let required = doc.keys().cloned().collect();
    Ok(seal(doc, required))
}

/// Lays out `doc` as state.json: `required` set, a crc32c of every other section in
/// `checksums`, one section per line (versions first, for a reader with `head`).
fn seal(mut doc: serde_json::Map<String, Value>, required: Vec<String>) -> Vec<u8> {
    doc.remove(CHECKSUMS);
    doc.insert(REQUIRED.into(), required.into());
    let sums: serde_json::Map<String, Value> = doc.iter().map(|(k, v)| (k.clone(), section_crc(v).into())).collect();
    doc.insert(CHECKSUMS.into(), Value::Object(sums));
    let first = ["format_version", "vmm_version", REQUIRED, CHECKSUMS];
    let order = first.iter().copied().filter(|k| doc.contains_key(*k)).chain(doc.keys().map(String::as_str).filter(|k| !first.contains(k)));
    let mut out = b"{".to_vec();
    for (i, k) in order.enumerate() {
        out.extend_from_slice(if i == 0 { b"\n" } else { b",\n" });
        out.extend(serde_json::to_vec(k).expect("a string serializes"));
        out.push(b':');
        out.extend(serde_json::to_vec(&doc[k]).expect("a JSON value serializes"));
    }
    out.extend_from_slice(b"\n}\n");
    out
}

/// The kvmclock time vCPU 0's guest reads now: its pvclock structure (at the GPA in
/// MSR_KVM_SYSTEM_TIME_NEW, or the legacy MSR) applied to its saved TSC.
fn guest_kvmclock_ns(src: &Sources, vcpu0: Option<&VcpuState>) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    const MSR_IA32_TSC: u32 = 0x10;
    let v = vcpu0?;
    let msr = |i| v.msrs.iter().find(|m| m.index == i).map(|m| m.data);
    let system_time_msr = msr(MSR_KVM_SYSTEM_TIME_NEW).filter(|m| m & 1 == 1).or(msr(MSR_KVM_SYSTEM_TIME).filter(|m| m & 1 == 1))?;
    let tsc = msr(MSR_IA32_TSC)?;
    let off = crate::memory::memfd_offset(src.mem_size, system_time_msr & !1)?;
    // struct pvclock_vcpu_time_info: version, pad, tsc_timestamp, system_time,
    // tsc_to_system_mul, tsc_shift, flags, pad[2].
    let mut b = [0u8; 32];
    src.memfd.read_exact_at(&mut b, off).ok()?;
    let version = u32::from_le_bytes(b[0..4].try_into().ok()?);
    if version & 1 == 1 {
        return None; // mid-update: cannot happen with the vCPUs parked, but never trust it
    }
    let tsc_timestamp = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let system_time = u64::from_le_bytes(b[16..24].try_into().ok()?);
    let mul = u32::from_le_bytes(b[24..28].try_into().ok()?);
    let shift = b[28] as i8;
    Some(pvclock_ns(tsc, tsc_timestamp, system_time, mul, shift))
}

/// Linux's `pvclock_scale_delta` plus the base: what a guest's kvmclock reads at `tsc`.
fn pvclock_ns(tsc: u64, tsc_timestamp: u64, system_time: u64, mul: u32, shift: i8) -> u64 {
    let delta = tsc.saturating_sub(tsc_timestamp);
    let shift = i32::from(shift);
    let delta = if shift < 0 { delta.checked_shr(shift.unsigned_abs()) } else { delta.checked_shl(shift as u32) }.unwrap_or(0);
    system_time.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64)
}

/// Where a snapshot goes (a name in the VM's directory), and the temporary names next to
/// it that make the write atomic. Every change is an `*at` call on the directory's fd.
pub(crate) struct Target<'a> {
    dir: &'a VmDir,
    name: String,
    tmp: String,
    old: String,
}

/// The snapshot directory being filled, as `fill` in [`Target::write`] sees it.
pub(crate) struct TmpDir<'a> {
    dir: &'a VmDir,
    rel: &'a str,
}

impl TmpDir<'_> {
    fn path(&self) -> PathBuf {
        self.dir.path().join(self.rel)
    }
    pub(crate) fn create_new(&self, name: &str) -> Result<File, SnapshotError> {
        Ok(self.dir.create_new(&format!("{}/{name}", self.rel))?)
    }
}

impl<'a> Target<'a> {
    pub(crate) fn new(dir: &'a VmDir, path: &Path) -> Result<Self, SnapshotError> {
        let name = dir.name_of(path)?;
        let pid = std::process::id();
        Ok(Target { dir, tmp: format!(".{name}.partial-{pid}"), old: format!(".{name}.old-{pid}"), name })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// An existing target is replaced only when asked, and only if it is a snapshot: a
    /// directory with our `state.json` (never a disk image, a log or someone's folder).
    fn check(&self, replace: bool) -> Result<(), SnapshotError> {
        if !self.dir.exists(&self.name) {
            return Ok(());
        }
        if !replace {
            return Err(SnapshotError::Exists(self.path()));
        }
        if !is_snapshot(self.dir, &self.name) {
            return Err(SnapshotError::NotSnapshot(self.path()));
        }
        Ok(())
    }

    /// Fills a temporary directory with `fill`, then renames it to the target: a reader
    /// sees the old snapshot or the complete new one, never a mix. An existing target is
    /// replaced only with `replace`, and only if it is a snapshot.
    pub(crate) fn write<T>(&self, replace: bool, fill: impl FnOnce(&TmpDir) -> Result<T, SnapshotError>) -> Result<T, SnapshotError> {
        self.check(replace)?;
        remove_snapshot_dir(self.dir, &self.tmp);
        self.dir.mkdir(&self.tmp)?;
        let r = fill(&TmpDir { dir: self.dir, rel: &self.tmp }).and_then(|v| {
            self.dir.sync(Some(&self.tmp))?;
            Ok(v)
        });
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                remove_snapshot_dir(self.dir, &self.tmp);
                return Err(e);
            }
        };
        // Checked again: the target may have appeared while the parts were written.
        if let Err(e) = self.check(replace) {
            remove_snapshot_dir(self.dir, &self.tmp);
            return Err(e);
        }
        let had_old = self.dir.exists(&self.name);
        if had_old {
            self.dir.rename(&self.name, &self.old)?;
        }
        if let Err(e) = self.dir.rename(&self.tmp, &self.name) {
            if had_old {
                let _ = self.dir.rename(&self.old, &self.name);
            }
            remove_snapshot_dir(self.dir, &self.tmp);
            return Err(e.into());
        }
        self.dir.sync(None)?;
        if had_old {
            remove_snapshot_dir(self.dir, &self.old);
        }
        Ok(v)
    }
}

/// Whether `name` in `dir` is a snapshot directory: it holds a `state.json` that is a JSON
/// object with our version fields.
fn is_snapshot(dir: &VmDir, name: &str) -> bool {
    use std::io::Read;
    if !dir.is_dir(name) {
        return false;
    }
    let Ok(f) = dir.open_read(&format!("{name}/{STATE_FILE}")) else { return false };
    // state.json holds registers and device state: a few MiB at most.
    let mut text = Vec::new();
    if f.take(64 << 20).read_to_end(&mut text).is_err() {
        return false;
    }
    serde_json::from_slice::<Value>(&text).ok().and_then(|v| {
        let o = v.as_object()?;
        Some(o.contains_key("format_version") && o.contains_key("vmm_version") && o.contains_key("spec"))
    }) == Some(true)
}

/// Removes a snapshot directory we made: only the files a snapshot has (no directory
/// listing, so nothing else a user put there goes), then the directory if empty.
fn remove_snapshot_dir(dir: &VmDir, rel: &str) {
    for f in [MEMORY_FILE, FRAMEBUFFER_FILE, STATE_FILE] {
        let _ = dir.unlink(&format!("{rel}/{f}"));
    }
    if let Err(e) = dir.rmdir(rel) {
        if !matches!(&e, VmDirError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound) {
            tracing::warn!("leaving {}: {e}", dir.path().join(rel).display());
        }
    }
}

/// A snapshot read back and checked, ready for [`crate::Vmm::restore`].
pub struct Loaded {
    pub dir: PathBuf,
    pub state: SnapshotState,
    pub memory: File,
    /// The saved pixels, when the VM has a display.
    pub framebuffer: Option<File>,
}

/// Reads `dir/state.json` and opens `dir/memory`, refusing anything this VMM cannot restore
/// exactly. Errors name the file and the field. Nothing is changed or deleted.
pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(io_err(&state_path))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // A flipped high bit: name the section whose line holds it.
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
        let section = section_at_line(&String::from_utf8_lossy(bytes), line).unwrap_or_else(|| "(document)".into());
        field(&state_path, &section, format!("damaged: not UTF-8 at byte {at}"))
    })?;
    let state = parse_state(&state_path, &text)?;
    let memory = open_part(dir, &state_path, "memory", &state.memory)?;
    let framebuffer = match &state.framebuffer {
        Some(info) => Some(open_part(dir, &state_path, "framebuffer", info)?),
        None => None,
    };
    Ok(Loaded { dir: dir.to_path_buf(), state, memory, framebuffer })
}

/// Opens the data file `info` names (field `name` of state.json), checking that it stays
/// inside the snapshot directory and has the recorded length.
fn open_part(dir: &Path, state_path: &Path, name: &str, info: &MemoryInfo) -> Result<File, SnapshotError> {
    if info.file.is_empty() || info.file.contains('/') || info.file == ".." || info.file == "." {
        return Err(field(state_path, &format!("{name}.file"), "must name a file inside the snapshot directory"));
    }
    let path = dir.join(&info.file);
    let f = File::open(&path).map_err(io_err(&path))?;
    let len = f.metadata().map_err(io_err(&path))?.len();
    if len != info.size {
        let first_bad = (len.min(info.size) / memfile::CHUNK) * memfile::CHUNK;
        return Err(SnapshotError::Field {
            file: path,
            field: "length".into(),
            reason: format!(
                "{len} bytes, state.json's {name}.size says {} (truncated or extended: the chunks from offset {first_bad:#x} on are not the saved ones)",
                info.size
            ),
        });
    }
    Ok(f)
}

/// A memory part's chunk list must cover its size exactly.
fn check_chunks(file: &Path, name: &str, m: &MemoryInfo) -> Result<(), SnapshotError> {
    if m.chunk_size != memfile::CHUNK {
        return Err(field(file, &format!("{name}.chunk_size"), format!("{}; this rayos-vmm uses {}", m.chunk_size, memfile::CHUNK)));
    }
    let want = memfile::chunk_count(m.size);
    if m.chunks.len() != want {
        return Err(field(file, &format!("{name}.chunks"), format!("{} checksums for {} bytes, which take {want}", m.chunks.len(), m.size)));
    }
    Ok(())
}

fn field(file: &Path, name: &str, reason: impl ToString) -> SnapshotError {
    SnapshotError::Field { file: file.to_path_buf(), field: name.to_string(), reason: reason.to_string() }
}

fn take_field<T: DeserializeOwned>(file: &Path, obj: &serde_json::Map<String, Value>, name: &str) -> Result<T, SnapshotError> {
    let v = obj.get(name).ok_or_else(|| field(file, name, "missing"))?;
    T::deserialize(v).map_err(|e| field(file, name, e))
}

/// The section whose line (1-based) of state.json `line` is, as [`seal`] lays it out.
fn section_at_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let rest = l.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

/// The first section of a state.json that is not JSON, read line by line (each section is
/// one, see [`seal`]): where serde_json stops can be lines later (a lost closing quote).
fn damaged_section(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let inner = lines.get(1..lines.len().checked_sub(1)?)?;
    let bad = inner.iter().position(|l| serde_json::from_str::<Value>(&format!("{{{}}}", l.strip_suffix(',').unwrap_or(l))).is_err())?;
    Some(section_at_line(text, bad + 2).unwrap_or_else(|| format!("(line {})", bad + 2)))
}

/// Checks every section's crc32c against `checksums` (before anything is read from them), and
/// that every section `required` lists is one this build knows.
fn check_sections(file: &Path, obj: &serde_json::Map<String, Value>) -> Result<(), SnapshotError> {
    let sums = obj.get(CHECKSUMS).and_then(Value::as_object).ok_or_else(|| field(file, CHECKSUMS, "missing or not an object"))?;
    for (name, v) in obj.iter().filter(|(k, _)| *k != CHECKSUMS) {
        let want = sums.get(name).ok_or_else(|| field(file, name, "section has no checksum in `checksums`"))?;
        let want = want.as_u64().and_then(|w| u32::try_from(w).ok()).ok_or_else(|| field(file, &format!("{CHECKSUMS}.{name}"), "not a crc32c"))?;
        let got = section_crc(v);
        if got != want {
            return Err(field(file, name, format!("damaged: its crc32c is {got:#010x}, `checksums` says {want:#010x}")));
        }
    }
    if let Some(k) = sums.keys().find(|k| !obj.contains_key(*k)) {
        return Err(field(file, k, "checksummed in `checksums` but missing"));
    }
    let required: Vec<String> = take_field(file, obj, REQUIRED)?;
    if let Some(r) = required.iter().find(|r| !KNOWN_SECTIONS.contains(&r.as_str())) {
        return Err(field(file, r, "a required section this rayos-vmm build does not know"));
    }
    if let Some(r) = required.iter().find(|r| !obj.contains_key(*r)) {
        return Err(field(file, r, "required but missing"));
    }
    Ok(())
}

/// Parses and checks `state.json` field by field, so that an error says which one is wrong.
pub fn parse_state(file: &Path, text: &str) -> Result<SnapshotState, SnapshotError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| match damaged_section(text) {
        Some(s) => field(file, &s, format!("damaged, not JSON: {e}")),
        None => field(file, "(document)", e),
    })?;
    let obj = doc.as_object().ok_or_else(|| field(file, "(document)", "not a JSON object"))?;
    // Versions first: a snapshot from another VMM fails on them, not on some field that
    // happened to change shape.
    let format_version: u32 = take_field(file, obj, "format_version")?;
    if format_version != FORMAT_VERSION {
        return Err(field(file, "format_version", format!("{format_version}; this rayos-vmm reads {FORMAT_VERSION}")));
    }
    let vmm_version: String = take_field(file, obj, "vmm_version")?;
    if vmm_version != VMM_VERSION {
        return Err(field(
            file,
            "vmm_version",
            format!("snapshot made by rayos-vmm build {vmm_version}; this is build {VMM_VERSION}, which restores only its own snapshots"),
        ));
    }
    check_sections(file, obj)?;
    // Sections not required are ones a newer build adds for information: ignored.
    let spec: VmSpec = take_field(file, obj, "spec")?;
    spec.validate().map_err(|e| field(file, "spec", e))?;
    let memory: MemoryInfo = take_field(file, obj, "memory")?;
    if memory.size != spec.memory_bytes() {
        return Err(field(file, "memory.size", format!("{} bytes, spec.memory_mib says {}", memory.size, spec.memory_bytes())));
    }
    check_chunks(file, "memory", &memory)?;
    let framebuffer: Option<MemoryInfo> = take_field(file, obj, "framebuffer")?;
    if let Some(fb) = &framebuffer {
        check_chunks(file, "framebuffer", fb)?;
    }
    let disks: Vec<DiskIdentity> = take_field(file, obj, "disks")?;
    let spec_disks: Vec<&Path> = spec.disks.iter().map(|d| d.path.as_path()).collect();
    if disks.iter().map(|d| d.path.as_path()).collect::<Vec<_>>() != spec_disks {
        return Err(field(file, "disks", format!("{} saved, not the spec's {} disks in its order", disks.len(), spec_disks.len())));
    }
    match (&spec.display, &framebuffer) {
        (Some(_), None) => return Err(field(file, "framebuffer", "missing, but spec.display has a display")),
        (None, Some(_)) => return Err(field(file, "framebuffer", "present, but spec.display has no display")),
        _ => {}
    }
    let raw_vcpus = obj.get("vcpus").and_then(Value::as_array).ok_or_else(|| field(file, "vcpus", "missing or not a list"))?;
    if raw_vcpus.len() != usize::from(spec.vcpus) {
        return Err(field(file, "vcpus", format!("{} saved, spec.vcpus says {}", raw_vcpus.len(), spec.vcpus)));
    }
    let mut vcpus = Vec::new();
    for (i, v) in raw_vcpus.iter().enumerate() {
        let name = format!("vcpus[{i}]");
        let s = VcpuState::deserialize(v).map_err(|e| field(file, &name, e))?;
        if usize::from(s.id) != i {
            return Err(field(file, &format!("{name}.id"), format!("{} where {i} belongs", s.id)));
        }
        vcpus.push(s);
    }
    Ok(SnapshotState {
        format_version,
        vmm_version,
        created_unix_ms: take_field(file, obj, "created_unix_ms")?,
        generation: take_field(file, obj, "generation")?,
        disks,
        spec,
        memory,
        framebuffer,
        vm: take_field(file, obj, "vm")?,
        vcpus,
        legacy: take_field(file, obj, "legacy")?,
        pci: take_field(file, obj, "pci")?,
    })
}

#[cfg(test)]
mod tests;
