//! `Logs` on a huge serial log costs PID 1 what it returns, not the file: the most memory
//! allocated at once while reading the tail of a 64 MiB log, measured by a counting allocator
//! (this test binary's only test, so nothing else allocates meanwhile).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayosd::vm::serial_tail::{serial_tail, MAX_LINE_BYTES, MAX_TAIL_BYTES};

struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let now = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        NOW.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from this allocator with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most allocated at once during `f`, above what was allocated before it.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = NOW.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed) - base)
}

#[test]
fn the_tail_of_a_64_mib_log_allocates_what_it_returns_not_the_file() {
    let dir = std::env::temp_dir().join(format!("rayos-serial-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("serial.log");
    // A guest's garbage: 64 MiB of bytes with a newline now and then, and a last line.
    let mut f = std::fs::File::create(&log).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for (i, b) in block.iter_mut().enumerate() {
        *b = if i % 997 == 0 { b'\n' } else { b'a' + (i % 26) as u8 };
    }
    for _ in 0..64 {
        f.write_all(&block).unwrap();
    }
    f.write_all(b"\nthe end\n").unwrap();
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), (64 << 20) + 9);
    drop(f);

    for lines in [1usize, 100, 10_000] {
        let (text, peak) = peak_during(|| serial_tail(&log, lines));
        assert!(text.ends_with("\nthe end") || text == "the end", "{lines} lines: {:.80}", text);
        let budget = (lines * (MAX_LINE_BYTES + 1)).min(MAX_TAIL_BYTES);
        // The read buffer, the lines as text, and their joined copy: a few times the budget.
        assert!(peak <= 4 * budget + (64 << 10), "{lines} lines: {peak} bytes allocated at once (budget {budget})");
        println!("{lines} lines: {} bytes returned, {peak} bytes allocated at most (budget {budget})", text.len());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
