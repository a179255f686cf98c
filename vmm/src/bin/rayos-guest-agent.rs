//! The guest side of the VMM's tests: the `/init` of a tiny guest initramfs.
//!
//! It mounts the API filesystems, hits the boot-timer port, then runs the checks named in
//! `rayos.agent=check1,check2,…` on the kernel command line, printing one
//! `agent: <check> ok …` or `agent: <check> FAIL …` line each on the console, and powers
//! the VM off (ACPI S5) — or reboots with `rayos.agent_end=reboot`.
//! Checks: `cpus` (prints the online CPU count), `sleepN` (waits N ms), `powerbutton` (waits
//! for the ACPI power button's KEY_POWER, then goes on to power off), `rng` (reads
//! /dev/hwrng), `disk-write` / `disk-read` (a marker in the first sector of /dev/vda),
//! `input` (waits for KEY_A from "RayOS Keyboard" and a position from "RayOS Tablet"),
//! `display` (draws a test pattern on /dev/fb0), `dmesg` (prints the kernel log, for boot
//! profiling), `nowarn` (fails on kernel warnings in the log), `agent` (greets the VMM on the
//! `org.rayos.agent` port and prints the line it gets back), `heartbeatN` (prints N numbered
//! lines 200 ms apart with the guest's monotonic clock: a restored snapshot continues the
//! count), `floodN` (a misbehaving guest for N seconds, see [`flood`]), `hang` (stops making
//! progress for good, see [`hang`]).
//!
//! With `rayos.agent_boot_timer=late` the boot-timer port is written after the checks instead
//! of first, as a distribution's agent service writes it late in its boot: a guest that hangs
//! in a check then never reaches "init", like the default VM seen stopping after its disk.

use std::fs;
use std::time::Duration;

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (s, t, f) = (c(src), c(target), c(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

/// Tell the VMM that init runs (see `layout::pio::BOOT_TIMER`). The port write happens in a
/// child process: under other VMMs the OUT can fault (seen with QEMU -M pc nested), and init
/// must survive that. The marker line follows either way, for the serial fallback and for
/// benchmarks that time other VMMs by the same line.
fn boot_timer() {
    const PORT: u16 = 0x440;
    // SAFETY: fork in a single-threaded init; the child only calls ioperm, OUT and _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: ioperm changes only this process's I/O bitmap; OUT to the granted port;
        // _exit ends the child without running destructors.
        unsafe {
            let ok = libc::ioperm(PORT as libc::c_ulong, 1, 1) == 0;
            if ok {
                std::arch::asm!("out dx, al", in("dx") PORT, in("al") 0x01u8, options(nomem, nostack));
            }
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    let mut status = 0;
    if pid > 0 {
        // SAFETY: waiting for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    let how = if pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        "port 0x440 written"
    } else {
        "no port access"
    };
    println!("agent: RAYOS-BOOT-TIMER ({how})");
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')).map(String::from))
}

fn online_cpus() -> usize {
    // "0-1" or "0,2-3": count every CPU in the list.
    let s = fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum()
}

/// The input devices whose name matches, as opened files.
fn input_devices(name_matches: impl Fn(&str) -> bool) -> Vec<(String, fs::File)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/class/input").into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if !n.starts_with("event") {
            continue;
        }
        let dev_name = fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
        if name_matches(dev_name.trim()) {
            if let Ok(f) = fs::File::open(format!("/dev/input/{n}")) {
                out.push((dev_name.trim().to_string(), f));
            }
        }
    }
    out
}

/// Reads one `struct input_event` (24 bytes on x86_64): (type, code, value).
fn read_event(f: &mut fs::File) -> Option<(u16, u16, i32)> {
    use std::io::Read;
    let mut b = [0u8; 24];
    f.read_exact(&mut b).ok()?;
    Some((
        u16::from_le_bytes([b[16], b[17]]),
        u16::from_le_bytes([b[18], b[19]]),
        i32::from_le_bytes([b[20], b[21], b[22], b[23]]),
    ))
}

fn power_button() {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let devs = input_devices(|n| n == "Power Button");
    let Some((_, mut f)) = devs.into_iter().next() else {
        println!("agent: powerbutton FAIL no \"Power Button\" input device");
        return;
    };
    println!("agent: powerbutton waiting");
    while let Some((t, c, v)) = read_event(&mut f) {
        if t == EV_KEY && c == KEY_POWER && v == 1 {
            println!("agent: powerbutton ok pressed");
            return;
        }
    }
    println!("agent: powerbutton FAIL read error");
}

fn report(check: &str, r: Result<String, String>) {
    match r {
        Ok(s) => println!("agent: {check} ok {s}"),
        Err(e) => println!("agent: {check} FAIL {e}"),
    }
}

fn rng() -> Result<String, String> {
    use std::io::Read;
    let current = fs::read_to_string("/sys/class/misc/hw_random/rng_current").unwrap_or_default();
    let mut f = fs::File::open("/dev/hwrng").map_err(|e| format!("/dev/hwrng: {e}"))?;
    let mut b = [0u8; 64];
    f.read_exact(&mut b).map_err(|e| format!("reading /dev/hwrng: {e}"))?;
    let distinct = b.iter().collect::<std::collections::BTreeSet<_>>().len();
    if distinct < 16 {
        return Err(format!("64 bytes with only {distinct} distinct values"));
    }
    Ok(format!("source={} distinct={distinct}", current.trim()))
}

const DISK: &str = "/dev/vda";

fn disk_write() -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let nonce = fs::read_to_string("/proc/sys/kernel/random/uuid").map_err(|e| e.to_string())?;
    let mut sector = format!("RAYOS-DISK {}\n", nonce.trim()).into_bytes();
    sector.resize(512, 0);
    let mut f = fs::OpenOptions::new().write(true).custom_flags(libc::O_SYNC).open(DISK).map_err(|e| format!("{DISK}: {e}"))?;
    f.write_all(&sector).map_err(|e| format!("writing {DISK}: {e}"))?;
    f.sync_all().map_err(|e| format!("flushing {DISK}: {e}"))?;
    Ok(format!("marker=RAYOS-DISK {}", nonce.trim()))
}

fn disk_read() -> Result<String, String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut f = fs::File::open(DISK).map_err(|e| format!("{DISK}: {e}"))?;
    // Drop the page cache, so the sector really comes from the device (a disk-write in the
    // same boot left it cached).
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: BLKFLSBUF takes no argument; the fd is an open block device.
    unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF, 0) };
    let mut sector = [0u8; 512];
    f.read_exact(&mut sector).map_err(|e| format!("reading {DISK}: {e}"))?;
    let text = String::from_utf8_lossy(&sector);
    let line = text.split('\n').next().unwrap_or("");
    if !line.starts_with("RAYOS-DISK ") {
        return Err(format!("no marker in the first sector ({:?}…)", &line[..line.len().min(20)]));
    }
    Ok(format!("marker={line}"))
}

/// Sequential O_DIRECT throughput on /dev/vda: writes then reads 64 MiB in 1 MiB requests.
fn disk_bench() -> Result<String, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 1 << 20;
    const TOTAL: usize = 64 << 20;
    let f = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(DISK)
        .map_err(|e| format!("{DISK}: {e}"))?;
    let layout = std::alloc::Layout::from_size_align(CHUNK, 4096).unwrap();
    // SAFETY: a non-zero-sized, 4 KiB-aligned allocation, freed below.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: buf is CHUNK bytes.
    unsafe { std::ptr::write_bytes(buf, 0xa5, CHUNK) };
    let run = |write: bool| -> Result<f64, String> {
        let t0 = std::time::Instant::now();
        for i in 0..TOTAL / CHUNK {
            let off = (i * CHUNK) as i64;
            // SAFETY: buf holds CHUNK bytes; O_DIRECT needs the 4 KiB alignment it has.
            let n = unsafe {
                if write {
                    libc::pwrite(f.as_raw_fd(), buf.cast(), CHUNK, off)
                } else {
                    libc::pread(f.as_raw_fd(), buf.cast(), CHUNK, off)
                }
            };
            if n != CHUNK as isize {
                return Err(format!("{} at {off}: {}", if write { "write" } else { "read" }, std::io::Error::last_os_error()));
            }
        }
        if write {
            f.sync_all().map_err(|e| e.to_string())?;
        }
        Ok(TOTAL as f64 / (1 << 20) as f64 / t0.elapsed().as_secs_f64())
    };
    let w = run(true);
    let r = run(false);
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    Ok(format!("write_mib_s={:.1} read_mib_s={:.1}", w?, r?))
}

/// A cheap stream of garbage (xorshift64*), seeded from the kernel's RNG so each boot differs.
struct Garbage(u64);

impl Garbage {
    fn new() -> Garbage {
        let mut seed = [0u8; 8];
        let _ = fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        Garbage(u64::from_le_bytes(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A guest that misbehaves as fast as it can for `secs` seconds, on every vCPU it has:
/// - serial: random bytes straight into COM1's transmit register (`out` to 0x3f8 after
///   ioperm: the fastest a guest can push bytes at the VMM's 16550, no tty, no flow control);
/// - virtio-blk: random-length O_DIRECT writes of random bytes at random offsets of
///   /dev/vda, each followed by a read of another random range;
/// - virtio-blk notifications: the device's notify register (the virtio-pci notify
///   capability's BAR region, mapped from sysfs) written with queue indexes the device does
///   not have and spurious kicks of its real queue. Bogus descriptor indexes in the ring
///   itself are out of reach from user space (the ring is the kernel driver's memory and
///   /dev/mem is strict), so the notify register is the rawest garbage a guest process can
///   send; where the kernel refuses the mapping, that part is skipped and said so.
/// Prints the totals; fails only if nothing at all could be flooded.
fn flood(secs: u64) -> Result<String, String> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let serial_bytes = Arc::new(AtomicU64::new(0));
    let disk_ops = Arc::new(AtomicU64::new(0));
    let notifies = Arc::new(AtomicU64::new(0));
    let mut threads = vec![];
    println!("agent: flood started for {secs} s");

    const COM1: u16 = 0x3f8;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    let serial = unsafe { libc::ioperm(COM1 as libc::c_ulong, 8, 1) } == 0;
    if serial {
        let (stop, count) = (stop.clone(), serial_bytes.clone());
        threads.push(("serial", std::thread::spawn(move || {
            let mut g = Garbage::new();
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..4096 {
                    let b = g.next() as u8;
                    // SAFETY: OUT to COM1's data register, granted by ioperm above.
                    unsafe { std::arch::asm!("out dx, al", in("dx") COM1, in("al") b, options(nomem, nostack)) };
                }
                count.fetch_add(4096, Ordering::Relaxed);
            }
        })));
    }

    let disk = flood_disk_setup();
    if let Ok((f, sectors)) = &disk {
        let (stop, count, f, sectors) = (stop.clone(), disk_ops.clone(), f.try_clone().map_err(|e| e.to_string())?, *sectors);
        threads.push(("disk", std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            const MAX: usize = 256 << 10;
            let layout = std::alloc::Layout::from_size_align(MAX, 4096).unwrap();
            // SAFETY: a non-zero-sized, 4 KiB-aligned allocation, never freed (the thread
            // runs until the guest powers off).
            let buf = unsafe { std::alloc::alloc(layout) };
            if buf.is_null() {
                return;
            }
            // SAFETY: buf holds MAX bytes.
            let slice = unsafe { std::slice::from_raw_parts_mut(buf, MAX) };
            let mut g = Garbage::new();
            let pages = (sectors / 8).max(1);
            while !stop.load(Ordering::Relaxed) {
                let len = ((g.next() % (MAX as u64 / 4096)) as usize + 1) * 4096;
                let at = |g: &mut Garbage| ((g.next() % pages).min(pages.saturating_sub((len / 4096) as u64)) * 4096) as i64;
                g.fill(&mut slice[..len]);
                let off = at(&mut g);
                // SAFETY: buf holds at least len bytes, 4 KiB-aligned for O_DIRECT.
                unsafe { libc::pwrite(f.as_raw_fd(), buf.cast(), len, off) };
                let off = at(&mut g);
                // SAFETY: as above.
                unsafe { libc::pread(f.as_raw_fd(), buf.cast(), len, off) };
                count.fetch_add(2, Ordering::Relaxed);
            }
        })));
    }

    let notify = flood_notify_region();
    if let Ok((ptr, len)) = notify {
        let (stop, count) = (stop.clone(), notifies.clone());
        let ptr = ptr as usize;
        threads.push(("notify", std::thread::spawn(move || {
            let mut g = Garbage::new();
            while !stop.load(Ordering::Relaxed) {
                // Mostly queues that do not exist; every 8th a spurious kick of queue 0.
                let v = g.next();
                let queue = if v % 8 == 0 { 0 } else { (v >> 8) as u16 | 1 };
                let at = ((v >> 32) as usize % (len / 2)) * 2;
                // SAFETY: `at` is 2-aligned and inside the mapped notify region of `len` bytes.
                unsafe { std::ptr::write_volatile((ptr + at) as *mut u16, queue) };
                count.fetch_add(1, Ordering::Relaxed);
            }
        })));
    }

    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    // Each thread gets 30 s to see `stop`: one blocked in a request the device never
    // completes is named in the result instead of silencing the guest (a CI run once saw no
    // result at all, with nothing to tell why).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while threads.iter().any(|(_, t)| !t.is_finished()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stuck: Vec<&str> = threads.iter().filter(|(_, t)| !t.is_finished()).map(|(name, _)| *name).collect();
    let (s, d, n) = (serial_bytes.load(Ordering::Relaxed), disk_ops.load(Ordering::Relaxed), notifies.load(Ordering::Relaxed));
    let skipped = [
        (!serial).then(|| format!("serial: ioperm: {}", std::io::Error::last_os_error())),
        disk.err().map(|e| format!("disk: {e}")),
        notify.err().map(|e| format!("notify: {e}")),
    ];
    let skipped: Vec<String> = skipped.into_iter().flatten().collect();
    // A line of its own: the serial garbage above may have left the console mid-line.
    println!();
    if s == 0 && d == 0 && n == 0 {
        return Err(format!("nothing flooded: {}", skipped.join("; ")));
    }
    Ok(format!("serial_bytes={s} disk_ops={d} notifies={n} skipped=[{}] stuck=[{}]", skipped.join("; "), stuck.join(",")))
}

/// /dev/vda for O_DIRECT garbage, and its size in 512-byte sectors.
fn flood_disk_setup() -> Result<(fs::File, u64), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let sectors: u64 = fs::read_to_string("/sys/block/vda/size")
        .map_err(|e| format!("/sys/block/vda/size: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("/sys/block/vda/size: {e}"))?;
    let f = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(DISK).map_err(|e| format!("{DISK}: {e}"))?;
    Ok((f, sectors))
}

/// Maps the notify region of /dev/vda's virtio-pci function (its vendor capability with
/// cfg_type 2: BAR, offset, length) from sysfs; returns its address and length.
fn flood_notify_region() -> Result<(*mut u8, usize), String> {
    use std::os::fd::AsRawFd;
    let pci = fs::canonicalize("/sys/block/vda/device/..").map_err(|e| format!("/sys/block/vda/device: {e}"))?;
    let cfg = fs::read(pci.join("config")).map_err(|e| format!("{}/config: {e}", pci.display()))?;
    if cfg.len() < 256 {
        return Err(format!("{}/config: {} bytes, capabilities unreadable", pci.display(), cfg.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
    let mut cap = cfg[0x34] as usize;
    let mut hops = 0;
    while cap != 0 && cap + 16 <= cfg.len() && hops < 48 {
        // Vendor-specific capability, virtio cfg_type 2 = notify.
        if cfg[cap] == 0x09 && cfg[cap + 3] == 2 {
            let (bar, offset, length) = (cfg[cap + 4], u32_at(cap + 8) as usize, u32_at(cap + 12) as usize);
            let res = pci.join(format!("resource{bar}"));
            let f = fs::OpenOptions::new().read(true).write(true).open(&res).map_err(|e| format!("{}: {e}", res.display()))?;
            let page = 4096;
            let start = offset / page * page;
            let maplen = (offset - start + length.max(2)).div_ceil(page) * page;
            // SAFETY: a shared mapping of the BAR through its sysfs resource file; checked
            // for MAP_FAILED; never unmapped (the guest powers off after the flood).
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), maplen, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), start as i64)
            };
            if p == libc::MAP_FAILED {
                return Err(format!("mmap {}: {}", res.display(), std::io::Error::last_os_error()));
            }
            // SAFETY: offset - start < maplen, inside the mapping.
            return Ok((unsafe { (p as *mut u8).add(offset - start) }, length.max(2)));
        }
        cap = cfg[cap + 1] as usize;
        hops += 1;
    }
    Err(format!("{}: no virtio notify capability", pci.display()))
}

/// Waits up to `ms` for `f` to be readable.
fn readable(f: &fs::File, ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn input() -> Result<String, String> {
    const EV_KEY: u16 = 1;
    const EV_ABS: u16 = 3;
    const KEY_A: u16 = 30;
    let t0 = std::time::Instant::now();
    let (mut kbd, mut tab) = loop {
        let k = input_devices(|n| n == "RayOS Keyboard").into_iter().next();
        let t = input_devices(|n| n == "RayOS Tablet").into_iter().next();
        match (k, t) {
            (Some(k), Some(t)) => break (k.1, t.1),
            _ if t0.elapsed() > Duration::from_secs(10) => return Err("no RayOS Keyboard/Tablet input devices".into()),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    println!("agent: input ready");
    let (mut key_down, mut key_up) = (false, false);
    while !(key_down && key_up) {
        if !readable(&kbd, 30_000) {
            return Err(format!("no KEY_A from the keyboard within 30 s (down={key_down} up={key_up})"));
        }
        let (t, c, v) = read_event(&mut kbd).ok_or("keyboard read failed")?;
        if t == EV_KEY && c == KEY_A {
            key_down |= v == 1;
            key_up |= v == 0 && key_down;
        }
    }
    let (mut x, mut y) = (None, None);
    while x.is_none() || y.is_none() {
        if !readable(&tab, 30_000) {
            return Err("no absolute position from the tablet within 30 s".into());
        }
        let (t, c, v) = read_event(&mut tab).ok_or("tablet read failed")?;
        if t == EV_ABS && c == 0 {
            x = Some(v);
        }
        if t == EV_ABS && c == 1 {
            y = Some(v);
        }
    }
    Ok(format!("key=30 abs={},{}", x.unwrap_or(-1), y.unwrap_or(-1)))
}

/// Draws pixel(x, y) = 0x00RRGGBB with R = x & 0xff, G = y & 0xff, B = 0x5a on /dev/fb0.
fn display() -> Result<String, String> {
    use std::os::fd::AsRawFd;
    // Keep fbcon's cursor and text off the pattern.
    for e in fs::read_dir("/sys/class/vtconsole").into_iter().flatten().flatten() {
        if fs::read_to_string(e.path().join("name")).unwrap_or_default().contains("frame buffer") {
            let _ = fs::write(e.path().join("bind"), "0");
        }
    }
    let t0 = std::time::Instant::now();
    let f = loop {
        match fs::OpenOptions::new().read(true).write(true).open("/dev/fb0") {
            Ok(f) => break f,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => return Err(format!("/dev/fb0: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let driver = fs::read_to_string("/sys/class/graphics/fb0/name").unwrap_or_default();
    // struct fb_var_screeninfo: xres, yres, xres_virtual, yres_virtual, xoffset, yoffset, bits_per_pixel…
    let mut var = [0u32; 40];
    // SAFETY: FBIOGET_VSCREENINFO fills a 160-byte fb_var_screeninfo; var is that large.
    if unsafe { libc::ioctl(f.as_raw_fd(), 0x4600, var.as_mut_ptr()) } != 0 {
        return Err(format!("FBIOGET_VSCREENINFO: {}", std::io::Error::last_os_error()));
    }
    // struct fb_fix_screeninfo: id[16], smem_start (8), smem_len (4), type, type_aux, visual,
    // xpanstep, ypanstep (2 each), ywrapstep (2), line_length (4) at byte 48.
    let mut fix = [0u8; 80];
    // SAFETY: FBIOGET_FSCREENINFO fills a 68/80-byte fb_fix_screeninfo; fix is 80 bytes.
    if unsafe { libc::ioctl(f.as_raw_fd(), 0x4602, fix.as_mut_ptr()) } != 0 {
        return Err(format!("FBIOGET_FSCREENINFO: {}", std::io::Error::last_os_error()));
    }
    let (w, h, bpp) = (var[0] as usize, var[1] as usize, var[6]);
    let stride = u32::from_le_bytes(fix[48..52].try_into().unwrap()) as usize;
    if bpp != 32 {
        return Err(format!("{w}x{h} at {bpp} bpp; the pattern needs 32"));
    }
    let len = stride * h;
    // SAFETY: maps the framebuffer device; checked for MAP_FAILED below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap /dev/fb0: {}", std::io::Error::last_os_error()));
    }
    for y in 0..h {
        for x in 0..w {
            let v: u32 = (((x & 0xff) as u32) << 16) | (((y & 0xff) as u32) << 8) | 0x5a;
            // SAFETY: (y * stride + 4x) + 4 <= len, inside the mapping.
            unsafe { std::ptr::write_volatile((p as *mut u8).add(y * stride + x * 4) as *mut u32, v) };
        }
    }
    // SAFETY: p/len are the mapping made above.
    unsafe { libc::munmap(p, len) };
    Ok(format!("{w}x{h} stride={stride} driver={}", driver.trim()))
}

fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn heartbeat(count: u64) {
    let cs = fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource").unwrap_or_default();
    println!("agent: heartbeat clocksource={}", cs.trim());
    for n in 1..=count {
        println!("agent: heartbeat n={n} uptime_ms={}", monotonic_ms());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn agent_channel() -> Result<String, String> {
    use std::io::{BufRead, Write};
    let t0 = std::time::Instant::now();
    let dev = loop {
        let found = fs::read_dir("/sys/class/virtio-ports").into_iter().flatten().flatten().find(|e| {
            fs::read_to_string(e.path().join("name")).unwrap_or_default().trim() == "org.rayos.agent"
        });
        match found {
            Some(e) => break format!("/dev/{}", e.file_name().to_string_lossy()),
            None if t0.elapsed() > Duration::from_secs(10) => return Err("no org.rayos.agent virtio port".into()),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut f = fs::OpenOptions::new().read(true).write(true).open(&dev).map_err(|e| format!("{dev}: {e}"))?;
    f.write_all(b"hello from guest\n").map_err(|e| format!("writing {dev}: {e}"))?;
    println!("agent: agent sent hello");
    if !readable(&f, 30_000) {
        return Err("no answer from the host within 30 s".into());
    }
    let mut line = String::new();
    std::io::BufReader::new(f).read_line(&mut line).map_err(|e| format!("reading {dev}: {e}"))?;
    Ok(format!("got={}", line.trim()))
}

#[path = "common/netcfg.rs"]
mod netcfg;

/// virtio-net both ways: eth0 gets 10.0.2.2/24, sends a UDP datagram to the host side of
/// the tap (10.0.2.1:5555, where rayos-vmm-testinit answers) and waits for the echo.
fn net() -> Result<String, String> {
    let t0 = std::time::Instant::now();
    while !std::path::Path::new("/sys/class/net/eth0").exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("no eth0 (virtio-net) after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    netcfg::configure("eth0", std::net::Ipv4Addr::new(10, 0, 2, 2), 24)?;
    let sock = std::net::UdpSocket::bind("10.0.2.2:0").map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
    let payload = format!("rayos-net-{}", std::process::id() ^ 0x5a5a);
    let mut buf = [0u8; 256];
    // The host configures its side once the VMM has created the tap: resend until it answers.
    while t0.elapsed() < Duration::from_secs(60) {
        sock.send_to(payload.as_bytes(), "10.0.2.1:5555").map_err(|e| format!("send: {e}"))?;
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let got = String::from_utf8_lossy(&buf[..n]).to_string();
            if got == format!("echo {payload}") {
                return Ok(format!("echo={payload} from={from}"));
            }
            return Err(format!("unexpected answer {got:?} from {from}"));
        }
    }
    Err("no echo from 10.0.2.1:5555 within 60 s".into())
}

/// A guest that stops making progress: PID 1 spins without a system call, forever. Nothing
/// exits to the VMM (the timer interrupts are the in-kernel LAPIC's) and no device is
/// notified, which is what the VMM's hang check must notice.
fn hang() -> ! {
    use std::io::Write;
    println!("agent: hanging: spinning with no system call from now on");
    let _ = std::io::stdout().flush();
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

/// The kernel log's records (text only), oldest first.
fn kernel_log() -> Result<Vec<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("/dev/kmsg: {e}"))?;
    let mut buf = vec![0u8; 8192];
    let mut out = Vec::new();
    // One record per read ("prio,seq,usec,flags;text\n"); EAGAIN at the end of the buffer.
    while let Ok(n) = f.read(&mut buf) {
        let rec = String::from_utf8_lossy(&buf[..n]);
        if let Some((head, text)) = rec.split_once(';') {
            let usec = head.split(',').nth(2).unwrap_or("?");
            out.push(format!("{usec} {}", text.lines().next().unwrap_or("")));
        }
    }
    Ok(out)
}

/// Fails with the offending lines if the kernel warned while booting on this VMM (a WARN()
/// splat, a firmware bug report, an XSAVE/CPUID inconsistency).
fn kernel_warnings() -> Result<String, String> {
    let log = kernel_log()?;
    let bad: Vec<&String> = log
        .iter()
        .filter(|l| ["WARNING:", "[Firmware Bug]", "consistency problem", "BUG:"].iter().any(|m| l.contains(m)))
        .collect();
    if bad.is_empty() {
        Ok(format!("{} records", log.len()))
    } else {
        Err(bad.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(" | "))
    }
}

/// Prints the kernel log as `agent: kmsg <µs> <text>` (for boot profiling with
/// `initcall_debug quiet`: the lines reach the log buffer, not the slow serial console).
fn dmesg() {
    match kernel_log() {
        Ok(lines) => lines.iter().for_each(|l| println!("agent: kmsg {l}")),
        Err(e) => println!("agent: dmesg FAIL {e}"),
    }
}

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let late_boot_timer = cmdline_value(&cmdline, "rayos.agent_boot_timer").as_deref() == Some("late");
    if !late_boot_timer {
        boot_timer();
    }
    println!("agent: started, cmdline: {}", cmdline.trim());
    let checks = cmdline_value(&cmdline, "rayos.agent").unwrap_or_default();
    for check in checks.split(',').filter(|c| !c.is_empty()) {
        match check {
            "cpus" => println!("agent: cpus ok online={}", online_cpus()),
            "powerbutton" => power_button(),
            "rng" => report("rng", rng()),
            "disk-write" => report("disk-write", disk_write()),
            "disk-read" => report("disk-read", disk_read()),
            "disk-bench" => report("disk-bench", disk_bench()),
            "input" => report("input", input()),
            "display" => report("display", display()),
            "agent" => report("agent", agent_channel()),
            other if other.starts_with("heartbeat") => heartbeat(other[9..].parse().unwrap_or(10)),
            "net" => report("net", net()),
            "dmesg" => dmesg(),
            "nowarn" => report("nowarn", kernel_warnings()),
            "hang" => hang(),
            other if other.starts_with("flood") => report("flood", flood(other[5..].parse().unwrap_or(60))),
            other if other.starts_with("sleep") => {
                let ms = other[5..].parse().unwrap_or(0);
                println!("agent: sleeping {ms} ms");
                std::thread::sleep(Duration::from_millis(ms));
            }
            other => println!("agent: {other} FAIL unknown check"),
        }
    }
    if late_boot_timer {
        boot_timer();
    }
    let end = cmdline_value(&cmdline, "rayos.agent_end").unwrap_or_else(|| "poweroff".into());
    println!("agent: done, {end}");
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(10));
    let how = if end == "reboot" { libc::RB_AUTOBOOT } else { libc::RB_POWER_OFF };
    // SAFETY: we are PID 1 of a throwaway guest; ending it is the point.
    unsafe { libc::reboot(how) };
}
