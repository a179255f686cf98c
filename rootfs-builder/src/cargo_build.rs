//! RayOS's own programs, built as static binaries for the initramfs.

use std::path::PathBuf;
use std::process::Command;

use thiserror::Error;

/// glibc's static libc (crt-static) works on the stock target; no musl toolchain needed.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, Error)]
pub enum CargoError {
    #[error("could not run cargo: {0}")]
    Spawn(std::io::Error),
    #[error("building the RayOS binaries failed ({0}); see the cargo output above")]
    Failed(String),
}

/// Where static release binaries land.
pub fn bin_dir() -> PathBuf {
    crate::paths::target_dir().join(TARGET).join("release")
}

/// `cargo build --release` of `packages`, statically linked. With an explicit `--target`,
/// RUSTFLAGS reach only the target binaries, not build scripts or proc macros.
pub fn build_static<I: IntoIterator<Item = S>, S: AsRef<str>>(packages: I) -> Result<PathBuf, CargoError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::paths::workspace()).args(["build", "--release", "--target", TARGET]);
    let mut names = Vec::new();
    for p in packages {
        cmd.args(["-p", p.as_ref()]);
        names.push(p.as_ref().to_string());
    }
    crate::progress::step("binaries", format!("cargo build --release (static) of {}", names.join(", ")));
    let mut flags = std::env::var("RAYOS_RUSTFLAGS").unwrap_or_default();
    flags.push_str(" -C target-feature=+crt-static");
    cmd.env("RUSTFLAGS", flags.trim());
    // Inside `cargo test`/`cargo run` these point at the outer build; the inner one is separate.
    cmd.env_remove("CARGO_TARGET_DIR").env("CARGO_TARGET_DIR", crate::paths::target_dir());
    let status = cmd.status().map_err(CargoError::Spawn)?;
    if !status.success() {
        return Err(CargoError::Failed(status.to_string()));
    }
    Ok(bin_dir())
}
