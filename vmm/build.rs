//! The VMM's build id (`RAYOS_VMM_BUILD_ID`): the git commit when there is one, and a hash
//! of the sources that define what a snapshot holds (device models, vCPU and VM state, the
//! snapshot format). A snapshot names the build that wrote it; only that build restores it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where saved state is defined: any change here may change a snapshot's meaning.
const STATE_SOURCES: &[&str] = &["src/snapshot.rs", "src/vcpu.rs", "src/vm.rs", "src/spec.rs", "src/memory.rs", "src/devices"];

fn files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p).expect("reading the VMM's sources").flatten().map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            files(&e, out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// FNV-1a, 64 bits: stable across Rust versions (std's hasher is not).
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

fn main() {
    let mut sources = Vec::new();
    for s in STATE_SOURCES {
        println!("cargo:rerun-if-changed={s}");
        files(Path::new(s), &mut sources);
    }
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for f in &sources {
        fnv(&mut hash, f.to_string_lossy().as_bytes());
        fnv(&mut hash, &std::fs::read(f).expect("reading a VMM source"));
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "nogit".into());
    println!("cargo:rustc-env=RAYOS_VMM_BUILD_ID={}-{commit}-state-{hash:016x}", env!("CARGO_PKG_VERSION"));
}
