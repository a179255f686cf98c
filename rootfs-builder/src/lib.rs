//! The RayOS build: kernel, initramfs and USB image, and the QEMU configurations that run them.
//!
//! `cargo rayos …` (the `rayos` binary) is the command-line front; the integration tests use
//! this library directly so that they boot exactly what the user boots.

pub mod accel;
pub mod build;
pub mod cargo_build;
pub mod esp;
pub mod guest;
pub mod hostdeps;
pub mod image;
pub mod initramfs;
pub mod kconfig;
pub mod kernel;
pub mod keymaps;
pub mod manifest;
pub mod paths;
pub mod progress;
pub mod qemu;
pub mod qemu_pkg;

pub use build::{artifacts, Artifacts};
