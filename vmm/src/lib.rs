//! see Cargo.toml description
pub mod devices;
