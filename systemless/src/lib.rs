//! systemless: rayosd's VM supervisor and control API as an ordinary process on a Linux
//! host, against the host's `/dev/kvm`, with every file under one folder (`--state-dir`):
//! no PID 1 duties, no mounts.
//!
//! Layout of the state folder (the data volume's names, see ARCHITECTURE.md):
//! `registry/vms.json` (+ `.bak`), `vms/<uuid>/` (disks, serial.log), `run/` (VMM specs and
//! sockets), `control.sock` (the control API: `rayosctl --socket DIR/control.sock …`).

pub mod kvm_check;
