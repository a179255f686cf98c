//! The VM spec: the JSON document (one per VM, written by rayosd's registry) that says what
//! `rayos-vmm` builds. The type and its checks live in `rayos_proto::spec`, shared with
//! rayosd, which writes it.

pub use rayos_proto::spec::*;
