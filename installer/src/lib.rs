//! RayOS installer library: disk discovery, install planning, and the writers (GPT, ESP,
//! UEFI boot entry, data volume), plus the answer file and the wizard.

pub mod answers;
pub mod blockio;
pub mod bls;
pub mod config;
pub mod console;
pub mod datafs;
pub mod diskpack;
pub mod disks;
pub mod efiboot;
pub mod esp;
pub mod fatfix;
pub mod gpt;
pub mod guids;
pub mod install;
pub mod keymap;
pub mod plan;
pub mod probe;
pub mod wizard;
