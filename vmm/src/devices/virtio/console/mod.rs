//! virtio-console (virtio 1.2, 5.3) in multiport mode: named ports (e.g. `org.rayos.agent`)
//! the guest opens as `/dev/vport0pN` (`/dev/virtio-ports/<name>`). Each port's host side is
//! one end of a Unix stream socket pair handed to the VMM, which bridges it to the guest
//! agent logic or to a listening socket. Port 0 (the `hvc0` console port) is not offered:
//! the serial port is the console.
mod device;
pub use device::{ConsoleError, VirtioConsole};
