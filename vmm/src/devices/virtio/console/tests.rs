use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::features::VERSION_1;
use crate::devices::virtio::testing::{guest_mem, RecordingIrq, Rings};

const CTRL_RX_BUF: u64 = 0x10_0000;
const CTRL_TX_BUF: u64 = 0x20_0000;
const RX_BUF: u64 = 0x30_0000;
const TX_BUF: u64 = 0x40_0000;

fn wdesc(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}
fn rdesc(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
}

struct Guest<'a> {
    mem: &'a GuestMemory,
    rings: Rings,
    ctrl_rx_seen: u16,
    ctrl_tx_sent: u16,
}

impl Guest<'_> {
    fn send_control(&mut self, id: u32, event: u16, value: u16) {
        let i = self.ctrl_tx_sent;
        let addr = CTRL_TX_BUF + u64::from(i) * 16;
        self.mem.write_slice(&control_msg(id, event, value, &[]), GuestAddress(addr)).unwrap();
        self.rings.add_desc_chains(CONTROL_TX, &[rdesc(addr, 8)], i);
        self.ctrl_tx_sent += 1;
        self.rings.kick(CONTROL_TX);
    }

    /// Next control message from the device: (id, event, value, extra bytes).
    fn recv_control(&mut self) -> (u32, u16, u16, Vec<u8>) {
        assert!(self.rings.wait_used(self.mem, CONTROL_RX, self.ctrl_rx_seen + 1), "control message arrives");
        let (head, len) = self.rings.used_elem(self.mem, CONTROL_RX, self.ctrl_rx_seen);
        self.ctrl_rx_seen += 1;
        let mut m = vec![0u8; len as usize];
        self.mem.read_slice(&mut m, GuestAddress(CTRL_RX_BUF + u64::from(head) * 0x100)).unwrap();
        let id = u32::from_le_bytes(m[0..4].try_into().unwrap());
        (id, u16::from_le_bytes([m[4], m[5]]), u16::from_le_bytes([m[6], m[7]]), m[8..].to_vec())
    }
}

#[test]
fn agent_port_handshake_and_round_trip() {
    let mem = guest_mem();
    let (mut dev, mut host) = VirtioConsole::new(&["org.rayos.agent"]).unwrap();
    let mut host = host.remove(0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut cfg = [0u8; 4];
    dev.read_config(4, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 2, "max_nr_ports: port 0 + one named port");
    assert_eq!(dev.queue_max_sizes().len(), 6);

    let rings = Rings::new(&mem, 6, 16);
    let irq = Arc::new(RecordingIrq::default());
    dev.activate(rings.context(&mem, irq.clone(), VERSION_1 | F_MULTIPORT)).unwrap();
    let mut g = Guest { mem: &mem, rings, ctrl_rx_seen: 0, ctrl_tx_sent: 0 };
    for i in 0..8u16 {
        g.rings.add_desc_chains(CONTROL_RX, &[wdesc(CTRL_RX_BUF + u64::from(i) * 0x100, 0x100)], i);
    }
    g.rings.kick(CONTROL_RX);

    g.send_control(0, DEVICE_READY, 1);
    assert_eq!(g.recv_control(), (1, DEVICE_ADD, 0, vec![]));
    g.send_control(1, PORT_READY, 1);
    assert_eq!(g.recv_control(), (1, PORT_NAME, 0, b"org.rayos.agent".to_vec()));
    assert_eq!(g.recv_control(), (1, PORT_OPEN, 1, vec![]), "host side is connected");

    // The guest opens the port and posts receive buffers; the VMM writes.
    g.send_control(1, PORT_OPEN, 1);
    g.rings.add_desc_chains(4, &[wdesc(RX_BUF, 4096)], 0);
    g.rings.kick(4);
    host.write_all(b"hello guest").unwrap();
    assert!(g.rings.wait_used(&mem, 4, 1));
    let (head, len) = g.rings.used_elem(&mem, 4, 0);
    assert_eq!((head, len), (0, 11));
    let mut got = [0u8; 11];
    mem.read_slice(&mut got, GuestAddress(RX_BUF)).unwrap();
    assert_eq!(&got, b"hello guest");

    // Guest to host, split over two descriptors.
    mem.write_slice(b"ping from ", GuestAddress(TX_BUF)).unwrap();
    mem.write_slice(b"agent", GuestAddress(TX_BUF + 0x100)).unwrap();
    let chain = [
        RawDescriptor::from(Descriptor::new(TX_BUF, 10, virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16, 1)),
        rdesc(TX_BUF + 0x100, 5),
    ];
    g.rings.add_desc_chains(5, &chain, 0);
    g.rings.kick(5);
    let mut out = [0u8; 15];
    host.read_exact(&mut out).unwrap();
    assert_eq!(&out, b"ping from agent");
    assert!(g.rings.wait_used(&mem, 5, 1));

    // Data written while the guest has no receive buffers waits in the socket.
    host.write_all(b"later").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.rings.used_idx(&mem, 4), 1);
    g.rings.add_desc_chains(4, &[wdesc(RX_BUF + 0x1000, 4096)], 1);
    g.rings.kick(4);
    assert!(g.rings.wait_used(&mem, 4, 2));
    assert_eq!(g.rings.used_elem(&mem, 4, 1), (1, 5));

    // The VMM closes its end: the guest is told the host disconnected.
    drop(host);
    g.rings.add_desc_chains(4, &[wdesc(RX_BUF + 0x2000, 4096)], 2);
    g.rings.kick(4);
    assert_eq!(g.recv_control(), (1, PORT_OPEN, 0, vec![]));
    dev.reset();
}

#[test]
fn rejects_bad_port_names() {
    assert!(VirtioConsole::new(&[""]).is_err());
    let long = "x".repeat(300);
    assert!(VirtioConsole::new(&[long.as_str()]).err().unwrap().to_string().contains("longer than 255"));
}

#[test]
fn slow_host_reader_never_blocks_the_device() {
    let mem = guest_mem();
    let (mut dev, mut host) = VirtioConsole::new(&["org.rayos.agent"]).unwrap();
    let mut host = host.remove(0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let rings = Rings::new(&mem, 6, 16);
    let irq = Arc::new(RecordingIrq::default());
    dev.activate(rings.context(&mem, irq.clone(), VERSION_1 | F_MULTIPORT)).unwrap();
    // 12 chains of 64 KiB: far more than a Unix socket buffers while nobody reads.
    const CHUNK: u32 = 64 * 1024;
    for i in 0..12u16 {
        let addr = 0x10_0000 + u64::from(i) * u64::from(CHUNK);
        mem.write_slice(&vec![i as u8 + 1; CHUNK as usize], GuestAddress(addr)).unwrap();
        rings.add_desc_chains(5, &[rdesc(addr, CHUNK)], i);
    }
    rings.kick(5);
    std::thread::sleep(Duration::from_millis(100));
    assert!(rings.used_idx(&mem, 5) < 12, "the socket is full, the rest waits in the queue");
    // The host reads everything, in order; the device resumes on socket writability.
    let mut all = vec![0u8; 12 * CHUNK as usize];
    host.read_exact(&mut all).unwrap();
    for i in 0..12usize {
        let c = &all[i * CHUNK as usize..(i + 1) * CHUNK as usize];
        assert!(c.iter().all(|b| *b == i as u8 + 1), "chunk {i}: first {} last {} bad at {:?}", c[0], c[c.len() - 1], c.iter().position(|b| *b != i as u8 + 1));
    }
    assert!(g_wait(&rings, &mem));

    // Stalled again, then a driver reset: it must not hang.
    for i in 0..12u16 {
        let addr = 0x10_0000 + u64::from(i) * u64::from(CHUNK);
        rings.add_desc_chains(5, &[rdesc(addr, CHUNK)], i);
    }
    rings.kick(5);
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    dev.reset();
    assert!(t.elapsed() < Duration::from_secs(1), "reset took {:?}", t.elapsed());
}

fn g_wait(rings: &Rings, mem: &GuestMemory) -> bool {
    rings.wait_used(mem, 5, 12)
}

#[test]
fn open_port_survives_pause_save_and_restore_into_a_new_device() {
    let mem = guest_mem();
    let (mut dev, _old_host) = VirtioConsole::new(&["org.rayos.agent"]).unwrap();
    let rings = Rings::new(&mem, 6, 16);
    let irq = Arc::new(RecordingIrq::default());
    dev.activate(rings.context(&mem, irq.clone(), VERSION_1 | F_MULTIPORT)).unwrap();
    let mut g = Guest { mem: &mem, rings, ctrl_rx_seen: 0, ctrl_tx_sent: 0 };
    for i in 0..4u16 {
        g.rings.add_desc_chains(CONTROL_RX, &[wdesc(CTRL_RX_BUF + u64::from(i) * 0x100, 0x100)], i);
    }
    g.rings.kick(CONTROL_RX);
    g.send_control(0, DEVICE_READY, 1);
    g.recv_control();
    g.send_control(1, PORT_READY, 1);
    g.recv_control();
    g.recv_control();
    g.send_control(1, PORT_OPEN, 1);
    assert!(g.rings.wait_used(&mem, CONTROL_TX, 3));

    dev.pause();
    let state = serde_json::to_string(&dev.save_state()).unwrap();
    drop(dev);
    // The restored VM gets a new device (and a new host end); the guest does not handshake again.
    let (mut dev2, mut host2) = VirtioConsole::new(&["org.rayos.agent"]).unwrap();
    let mut host2 = host2.remove(0);
    dev2.restore_state(&serde_json::from_str(&state).unwrap()).unwrap();
    dev2.activate(g.rings.context_resumed(&mem, irq, VERSION_1 | F_MULTIPORT)).unwrap();
    g.rings.add_desc_chains(4, &[wdesc(RX_BUF, 4096)], 0);
    g.rings.kick(4);
    host2.write_all(b"after restore").unwrap();
    assert!(g.rings.wait_used(&mem, 4, 1), "the restored device knows the port is open");
    let mut got = [0u8; 13];
    mem.read_slice(&mut got, GuestAddress(RX_BUF)).unwrap();
    assert_eq!(&got, b"after restore");
    // A driver reset forgets it.
    dev2.reset();
    assert_eq!(dev2.save_state()["guest_open"], serde_json::json!([false]));
}
