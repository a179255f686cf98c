//! Against a real tap device: needs CAP_NET_ADMIN and /dev/net/tun (root on the dev machine
//! and in CI, which runs as root). Where a tap cannot be made the test fails and says why: a
//! virtio-net that never moved a frame is not a pass.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::features::VERSION_1;
use crate::devices::virtio::testing::{guest_mem, wait_for, RecordingIrq, Rings};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A raw AF_PACKET socket on `ifname`: sees what the guest sends, injects what it receives.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket/bind syscalls with checked results and a zeroed sockaddr_ll.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let name = std::ffi::CString::new(ifname).unwrap();
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        let r = libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of_val(&sll) as u32);
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), 16);
        fd
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    f.extend_from_slice(payload);
    f
}

#[test]
fn frames_cross_a_real_tap_both_ways() {
    let name = format!("rvt{}", std::process::id() % 100_000);
    let mut dev = VirtioNet::new(NetConfig { tap: name.clone(), mac: MAC }).unwrap_or_else(|e| {
        panic!(
            "cannot create the tap {name} this test needs: {e}\n\
             run it as root (or with CAP_NET_ADMIN) on a host with /dev/net/tun, as CI does"
        )
    });
    assert_eq!(dev.tap_name(), name);
    let st = Command::new("ip").args(["link", "set", "dev", &name, "up"]).status().unwrap();
    assert!(st.success(), "ip link set up");
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");

    let mem = guest_mem();
    let rings = Rings::new(&mem, 2, 16);
    let irq = Arc::new(RecordingIrq::default());
    // The offloads a Linux guest accepts: the tap must take them.
    let offloads = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
    dev.activate(rings.context(&mem, irq.clone(), VERSION_1 | F_MAC | F_STATUS | offloads)).unwrap();
    let sock = packet_socket(&name);

    // Guest -> host: header and frame in separate descriptors.
    let out = frame([0xff; 6], MAC, b"hello from the guest, padded to a minimum frame size....");
    mem.write_slice(&[0u8; 12], GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&out, GuestAddress(0x11_0000)).unwrap();
    let n = VRING_DESC_F_NEXT as u16;
    rings.add_desc_chains(TX, 
            &[
                RawDescriptor::from(Descriptor::new(0x10_0000, 12, n, 1)),
                RawDescriptor::from(Descriptor::new(0x11_0000, out.len() as u32, 0, 0)),
            ],
            0,
        );
    rings.kick(TX);
    assert!(rings.wait_used(&mem, TX, 1));
    let mut buf = [0u8; 2048];
    let mut seen = false;
    for _ in 0..20 {
        // SAFETY: recv into a valid buffer.
        let r = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r > 0 && buf[..r as usize] == out[..] {
            seen = true;
            break;
        }
    }
    assert!(seen, "the guest's frame came out of the tap");

    // Host -> guest: post receive buffers, inject a frame on the interface. The host's own
    // traffic on a fresh link (IPv6 MLD/ND) may arrive too, so look for ours among them.
    for i in 0..8u16 {
        let addr = 0x20_0000 + u64::from(i) * 0x1000;
        rings.add_desc_chains(RX, &[RawDescriptor::from(Descriptor::new(addr, 2048, VRING_DESC_F_WRITE as u16, 0))], i);
    }
    rings.kick(RX);
    let inbound = frame(MAC, [0x02, 0, 0, 0, 0, 1], b"hello from the host, also padded to a minimum size......");
    // SAFETY: send from a valid buffer.
    let sent = unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
    assert_eq!(sent as usize, inbound.len());
    let found = |n: u16| {
        (0..n).any(|i| {
            let (head, len) = rings.used_elem(&mem, RX, i);
            let base = 0x20_0000 + u64::from(head) * 0x1000;
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(base)).unwrap();
            got.len() == 12 + inbound.len()
                && got[12..] == inbound[..]
                && u16::from_le_bytes([got[10], got[11]]) == 1 // num_buffers
        })
    };
    assert!(wait_for(|| found(rings.used_idx(&mem, RX))), "the host's frame reached the guest's receive buffer");
    std::thread::sleep(Duration::from_millis(10));
    dev.reset();
}

#[test]
fn bad_tap_names_are_clear_errors() {
    let e = VirtioNet::new(NetConfig { tap: "x".repeat(20), mac: MAC }).err().unwrap().to_string();
    assert!(e.contains("xxxxxxxx") && e.contains("1-15 bytes"), "{e}");
}
