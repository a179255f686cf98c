//! Builds the PCI root and the devices the spec asks for (virtio over PCI, the display) and
//! puts them on the buses. Returns the handles the control socket needs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::bus::Bus;
use crate::devices::display::{BochsDisplay, FbDirty, SharedFramebuffer, DEFAULT_FB_SIZE};
use crate::devices::legacy::serial::SerialRing;
use crate::devices::pci::PciRoot;
use crate::devices::virtio::block::{BlockConfig, VirtioBlock};
use crate::devices::virtio::console::VirtioConsole;
use crate::devices::virtio::input::{InputInjector, InputKind, VirtioInput};
use crate::devices::virtio::net::{NetConfig, VirtioNet};
use crate::devices::virtio::rng::VirtioRng;
use crate::devices::virtio::{VirtioDevice, VirtioPciDevice};
use crate::devices::{GuestMemory, VmHandle};
use crate::error::{Error, Result};
use crate::layout::{self, pio};
use crate::events::EventSink;
use crate::spec::VmSpec;
use rayos_proto::agent::LineBuffer;
use rayos_proto::vmm::Event;

/// Name of the virtio-console port the guest agent talks on.
pub const AGENT_PORT: &str = "org.rayos.agent";
/// Longest guest-agent line passed on as an event (a screen answer of a 300x100 console
/// fits); a longer one is dropped whole.
pub const AGENT_LINE_MAX: usize = 64 * 1024;

/// Handles to devices the VMM drives from outside the guest.
#[derive(Default)]
pub struct Attached {
    pub keyboard: Option<InputInjector>,
    pub tablet: Option<InputInjector>,
    pub display: Option<Display>,
    /// Writes go to the guest agent's port.
    pub agent_tx: Option<Mutex<UnixStream>>,
    /// What the guest agent wrote (the last 64 KiB).
    pub agent_rx: SerialRing,
    /// The PCI root with every device, for snapshots (pause, save and restore state).
    pub pci: Option<PciRoot>,
    /// Each disk image as its virtio-blk device opened it, in spec order.
    pub disks: Vec<OpenDisk>,
}

/// A disk image the VM uses: the same open file description as its virtio-blk device's, so
/// a snapshot syncs and identifies exactly what the guest writes to.
pub struct OpenDisk {
    pub path: std::path::PathBuf,
    pub read_only: bool,
    pub file: std::fs::File,
}

/// The display's handles: its framebuffer and what the guest wrote into it.
#[derive(Clone)]
pub struct Display {
    pub framebuffer: SharedFramebuffer,
    pub dirty: FbDirty,
}

fn dev_err(device: &str, reason: impl ToString) -> Error {
    Error::Device { device: device.to_string(), reason: reason.to_string() }
}

/// A locally administered MAC derived from the VM name and NIC index, stable across runs.
fn mac_for(name: &str, index: usize) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes().chain([index as u8]) {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    let b = h.to_le_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

pub fn attach(
    spec: &VmSpec,
    vm: Arc<dyn VmHandle>,
    mem: &GuestMemory,
    pio_bus: &mut Bus,
    mmio_bus: &mut Bus,
    events: &EventSink,
) -> Result<Attached> {
    let mut root = PciRoot::new(vm.clone(), layout::PCI_MMIO32);
    let mut out = Attached::default();
    let add_virtio = |root: &mut PciRoot, name: &str, dev: Box<dyn VirtioDevice>| -> Result<()> {
        let pci = VirtioPciDevice::new(dev, mem.clone(), vm.clone()).map_err(|e| dev_err(name, e))?;
        root.add(Box::new(pci)).map_err(|e| dev_err(name, e))?;
        Ok(())
    };

    for d in &spec.disks {
        let name = format!("virtio-blk {}", d.path.display());
        let blk = VirtioBlock::new(BlockConfig { path: d.path.clone(), read_only: d.read_only, serial: None })
            .map_err(|e| dev_err(&name, e))?;
        let file = blk.file().try_clone().map_err(|e| dev_err(&name, e))?;
        out.disks.push(OpenDisk { path: d.path.clone(), read_only: d.read_only, file });
        add_virtio(&mut root, &name, Box::new(blk))?;
    }
    for (i, n) in spec.net.iter().enumerate() {
        let name = format!("virtio-net {}", n.tap);
        let net = VirtioNet::new(NetConfig { tap: n.tap.clone(), mac: n.mac.unwrap_or_else(|| mac_for(&spec.name, i)) })
            .map_err(|e| dev_err(&name, e))?;
        add_virtio(&mut root, &name, Box::new(net))?;
    }
    if spec.rng {
        add_virtio(&mut root, "virtio-rng", Box::new(VirtioRng::new()))?;
    }
    if let Some(c) = &spec.console {
        if c.agent {
            let (con, mut ends) = VirtioConsole::new(&[AGENT_PORT]).map_err(|e| dev_err("virtio-console", e))?;
            add_virtio(&mut root, "virtio-console", Box::new(con))?;
            let end = ends.remove(0);
            let mut reader = end.try_clone().map_err(|e| dev_err("virtio-console", e))?;
            let rx = out.agent_rx.clone();
            let events = events.clone();
            std::thread::Builder::new()
                .name("agent-rx".into())
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut lines = LineBuffer::new(AGENT_LINE_MAX);
                    let mut dropped = 0;
                    while let Ok(n) = reader.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        rx.push(&buf[..n]);
                        for line in lines.push(&buf[..n]) {
                            events.send(Event::AgentLine { line });
                        }
                        if lines.dropped() != dropped {
                            dropped = lines.dropped();
                            events.warn(format!("the guest agent wrote a line longer than {AGENT_LINE_MAX} bytes; dropped"));
                        }
                    }
                })
                .map_err(|e| dev_err("virtio-console", e))?;
            out.agent_tx = Some(Mutex::new(end));
        }
    }
    if let Some(i) = &spec.input {
        if i.keyboard {
            let (dev, inj) = VirtioInput::new(InputKind::Keyboard, "RayOS Keyboard").map_err(|e| dev_err("virtio-input keyboard", e))?;
            add_virtio(&mut root, "virtio-input keyboard", Box::new(dev))?;
            out.keyboard = Some(inj);
        }
        if i.tablet {
            let (dev, inj) = VirtioInput::new(InputKind::Tablet, "RayOS Tablet").map_err(|e| dev_err("virtio-input tablet", e))?;
            add_virtio(&mut root, "virtio-input tablet", Box::new(dev))?;
            out.tablet = Some(inj);
        }
    }
    if let Some(d) = &spec.display {
        // Room for two frames of the configured mode (double buffering), and a BAR size that
        // is a power of two; the spec check keeps width and height within EDID's 12 bits.
        let need = 2 * u64::from(d.width) * u64::from(d.height) * 4;
        let fb_size = need.next_power_of_two().max(DEFAULT_FB_SIZE);
        let mut disp = BochsDisplay::new(vm.clone(), fb_size).map_err(|e| dev_err("bochs-display", e))?;
        // The configured size is the guest's preferred (native) mode through EDID; without it
        // Linux's bochs driver and OVMF start at 1024x768.
        disp.set_preferred_mode(d.width as u16, d.height as u16).map_err(|e| dev_err("bochs-display", e))?;
        out.display = Some(Display { framebuffer: disp.framebuffer(), dirty: disp.dirty() });
        root.add(Box::new(disp)).map_err(|e| dev_err("bochs-display", e))?;
    }

    pio_bus.insert(pio::PCI_CONFIG as u64, 8, "pci-config", Arc::new(Mutex::new(root.config_io())))?;
    let w = layout::PCI_MMIO32;
    mmio_bus.insert(w.start, w.end - w.start, "pci-mmio", Arc::new(Mutex::new(root.mmio_window())))?;
    out.pci = Some(root);
    Ok(out)
}

impl Attached {
    pub fn framebuffer(&self) -> Option<&SharedFramebuffer> {
        self.display.as_ref().map(|d| &d.framebuffer)
    }

    pub fn agent_send(&self, data: &[u8]) -> std::io::Result<()> {
        match &self.agent_tx {
            Some(s) => s.lock().unwrap_or_else(|p| p.into_inner()).write_all(data),
            None => Err(std::io::Error::other("this VM has no agent port (spec: console.agent)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_local_unicast_and_distinct() {
        let a = mac_for("vm1", 0);
        assert_eq!(a, mac_for("vm1", 0));
        assert_ne!(a, mac_for("vm1", 1));
        assert_ne!(a, mac_for("vm2", 0));
        assert_eq!(a[0] & 0x3, 0x2, "locally administered, unicast");
    }
}
