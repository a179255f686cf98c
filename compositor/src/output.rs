//! The monitors: every connected connector of every DRM card, each at its preferred mode with
//! two dumb buffers (XRGB8888), fed from a `Canvas` in ordinary RAM.
//!
//! No Mesa, no udev, no logind: we open /dev/dri/card* ourselves (not just card0: simpledrm's
//! card goes away when a real driver binds) and become DRM master. Only the rows that changed
//! are copied, into the buffer not on screen (dumb buffers are often write-combined, so they are
//! never read back), then flipped. virtio-gpu and simpledrm only send pixels on a flip or
//! DIRTYFB, so DIRTYFB follows each flip where the driver takes it.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drm::buffer::{Buffer as _, DrmFourcc};
use drm::Device as _;
use drm::control::{connector, crtc, dumbbuffer::DumbBuffer, framebuffer, ClipRect, Device as ControlDevice, Event, Mode, ModeTypeFlags, PageFlipFlags};

use crate::canvas::Canvas;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: cannot read its DRM resources: {source}")]
    Resources { path: PathBuf, source: io::Error },
    #[error("{path} {connector}: {what}: {source}")]
    Setup { path: PathBuf, connector: String, what: &'static str, source: io::Error },
}

/// An open DRM card.
pub struct Card {
    file: File,
    pub path: PathBuf,
}

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
impl drm::Device for Card {}
impl ControlDevice for Card {}

struct Buffer {
    dumb: DumbBuffer,
    fb: framebuffer::Handle,
}

/// Which of two buffers is on screen and which rows each lacks. A buffer that was on screen
/// while the canvas changed is behind by every change since it was last written, not just the
/// latest frame's: that is what makes copying only damaged rows correct with double buffering.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Swap {
    front: usize,
    stale: [Option<Range<u32>>; 2],
}

impl Swap {
    /// Two buffers that both lack every row.
    fn new(height: u32) -> Self {
        Self { front: 0, stale: [Some(0..height), Some(0..height)] }
    }

    /// The canvas changed `rows`: both buffers now lack them. Returns the rows to copy into the
    /// back buffer (None: it is up to date).
    fn damage(&mut self, rows: Range<u32>) -> Option<Range<u32>> {
        for s in &mut self.stale {
            *s = union(s.take(), rows.clone());
        }
        self.stale[1 - self.front].take()
    }

    /// The flip after copying `copied` was refused: copy those rows again with the next frame
    /// (cheap, and then certain).
    fn not_shown(&mut self, copied: Range<u32>) {
        let back = 1 - self.front;
        self.stale[back] = union(self.stale[back].take(), copied);
    }

    /// The back buffer is on screen now.
    fn flipped(&mut self) {
        self.front = 1 - self.front;
    }
}

fn union(a: Option<Range<u32>>, b: Range<u32>) -> Option<Range<u32>> {
    if b.is_empty() {
        return a;
    }
    Some(match a {
        Some(a) => a.start.min(b.start)..a.end.max(b.end),
        None => b,
    })
}

/// One monitor.
pub struct Output {
    pub name: String,
    pub connector: connector::Handle,
    pub crtc: crtc::Handle,
    pub mode: Mode,
    buffers: [Buffer; 2],
    swap: Swap,
    /// A flip was queued and its event has not come yet (since when).
    flip_pending: Option<Instant>,
    /// The driver refused DIRTYFB once: it does not need it.
    dirtyfb: bool,
    /// The driver refused page flips: set_crtc instead.
    can_flip: bool,
}

impl Output {
    pub fn size(&self) -> (u32, u32) {
        let (w, h) = self.mode.size();
        (u32::from(w), u32::from(h))
    }

    /// Whether a new frame may be queued now. A driver that never sends the flip event (some fake
    /// vblank) is paced by a timer instead: after 50 ms we stop waiting.
    pub fn ready(&mut self) -> bool {
        match self.flip_pending {
            Some(t) if t.elapsed() < Duration::from_millis(50) => false,
            _ => {
                self.flip_pending = None;
                true
            }
        }
    }
}

/// A card and the monitors on it.
pub struct CardOutputs {
    pub card: Card,
    pub outputs: Vec<Output>,
}

/// Every `/dev/dri/card*`, in name order.
pub fn card_paths(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("card") && n[4..].chars().all(|c| c.is_ascii_digit())))
        .collect();
    v.sort();
    v
}

fn preferred(modes: &[Mode]) -> Option<Mode> {
    modes.iter().find(|m| m.mode_type().contains(ModeTypeFlags::PREFERRED)).or(modes.first()).copied()
}

impl CardOutputs {
    pub fn open(path: &Path) -> Result<Self, OutputError> {
        let file = File::options().read(true).write(true).open(path).map_err(|source| OutputError::Open { path: path.into(), source })?;
        // Flip events are read when the fd says so; a read must never block the loop.
        let fl = nix::fcntl::OFlag::from_bits_truncate(nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0));
        let _ = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl | nix::fcntl::OFlag::O_NONBLOCK));
        let card = Card { file, path: path.into() };
        // Being the first to open a card makes us master already; asking again is for after a VT switch.
        if let Err(e) = card.acquire_master_lock() {
            tracing::debug!("{}: SET_MASTER: {e} (already master, or another one holds it)", path.display());
        }
        let mut c = Self { card, outputs: Vec::new() };
        c.rescan()?;
        Ok(c)
    }

    /// Picks up connectors plugged in and drops unplugged ones. Outputs that stay keep their
    /// mode: switching what is shown never modesets. Returns whether anything changed.
    pub fn rescan(&mut self) -> Result<bool, OutputError> {
        let path = self.card.path.clone();
        let res = self.card.resource_handles().map_err(|source| OutputError::Resources { path: path.clone(), source })?;
        let mut changed = false;
        let mut connected = Vec::new();
        for &h in res.connectors() {
            let Ok(info) = self.card.get_connector(h, false) else { continue };
            if info.state() == connector::State::Connected && !info.modes().is_empty() {
                connected.push(info);
            }
        }
        // Unplugged.
        let before = self.outputs.len();
        let gone: Vec<Output> = {
            let (keep, gone) = std::mem::take(&mut self.outputs).into_iter().partition(|o| connected.iter().any(|c| c.handle() == o.connector));
            self.outputs = keep;
            gone
        };
        for o in gone {
            tracing::info!("{} {}: disconnected", path.display(), o.name);
            self.destroy(o);
        }
        changed |= self.outputs.len() != before;
        // Plugged in.
        for info in connected {
            if self.outputs.iter().any(|o| o.connector == info.handle()) {
                continue;
            }
            let name = format!("{}-{}", info.interface().as_str(), info.interface_id());
            let Some(mode) = preferred(info.modes()) else { continue };
            let used: Vec<crtc::Handle> = self.outputs.iter().map(|o| o.crtc).collect();
            let crtc = info
                .encoders()
                .iter()
                .filter_map(|&e| self.card.get_encoder(e).ok())
                .flat_map(|e| res.filter_crtcs(e.possible_crtcs()))
                .find(|c| !used.contains(c));
            let Some(crtc) = crtc else {
                tracing::warn!("{} {name}: no free CRTC for it", path.display());
                continue;
            };
            match self.setup(&name, info.handle(), crtc, mode) {
                Ok(o) => {
                    let (w, h) = o.size();
                    tracing::info!("{} {name}: {w}x{h}@{}", path.display(), mode.vrefresh());
                    self.outputs.push(o);
                    changed = true;
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(changed)
    }

    fn setup(&self, name: &str, connector: connector::Handle, crtc: crtc::Handle, mode: Mode) -> Result<Output, OutputError> {
        let err = |what, source| OutputError::Setup { path: self.card.path.clone(), connector: name.into(), what, source };
        let (w, h) = mode.size();
        let make = || -> Result<Buffer, OutputError> {
            let mut dumb = self.card.create_dumb_buffer((w.into(), h.into()), DrmFourcc::Xrgb8888, 32).map_err(|e| err("create a dumb buffer", e))?;
            let fb = self.card.add_framebuffer(&dumb, 24, 32).map_err(|e| err("add a framebuffer", e))?;
            // Black, not whatever the last user left in that memory.
            self.card.map_dumb_buffer(&mut dumb).map_err(|e| err("map a dumb buffer", e))?.as_mut().fill(0);
            Ok(Buffer { dumb, fb })
        };
        let buffers = [make()?, make()?];
        self.card.set_crtc(crtc, Some(buffers[0].fb), (0, 0), &[connector], Some(mode)).map_err(|e| err("set its mode", e))?;
        Ok(Output { name: name.into(), connector, crtc, mode, buffers, swap: Swap::new(h.into()), flip_pending: None, dirtyfb: true, can_flip: true })
    }

    fn destroy(&self, o: Output) {
        for b in o.buffers {
            let _ = self.card.destroy_framebuffer(b.fb);
            let _ = self.card.destroy_dumb_buffer(b.dumb);
        }
    }

    /// Shows `canvas` (the whole picture for output `i`) after `rows` of it changed: copies what
    /// the back buffer lacks, flips, and tells the driver which rows are dirty.
    pub fn show(&mut self, i: usize, canvas: &Canvas, rows: Range<u32>) -> io::Result<()> {
        let card = &self.card;
        let o = &mut self.outputs[i];
        let (w, h) = o.size();
        if canvas.width != w || canvas.height != h {
            return Err(io::Error::other(format!("{}: a {}x{} canvas for a {w}x{h} output", o.name, canvas.width, canvas.height)));
        }
        let rows = rows.start.min(h)..rows.end.min(h);
        let Some(copy) = o.swap.damage(rows) else { return Ok(()) };
        let back = 1 - o.swap.front;
        let b = &mut o.buffers[back];
        {
            let pitch = b.dumb.pitch() as usize;
            let mut map = card.map_dumb_buffer(&mut b.dumb)?;
            let dst = map.as_mut();
            for y in copy.clone() {
                let src = &canvas.pixels[y as usize * w as usize..(y as usize + 1) * w as usize];
                // Whole rows in one copy: write-combined memory wants long sequential writes.
                dst[y as usize * pitch..y as usize * pitch + w as usize * 4].copy_from_slice(bytemuck::cast_slice(src));
            }
        }
        let fb = b.fb;
        if o.can_flip {
            match card.page_flip(o.crtc, fb, PageFlipFlags::EVENT, None) {
                Ok(()) => o.flip_pending = Some(Instant::now()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The previous flip is still queued: the rows stay stale for the next frame.
                    o.swap.not_shown(copy);
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!("{} {}: page flip refused ({e}); using set_crtc", card.path.display(), o.name);
                    o.can_flip = false;
                }
            }
        }
        if !o.can_flip {
            card.set_crtc(o.crtc, Some(fb), (0, 0), &[o.connector], Some(o.mode))?;
        }
        o.swap.flipped();
        if o.dirtyfb {
            let clip = ClipRect::new(0, copy.start as u16, w as u16, copy.end as u16);
            if let Err(e) = card.dirty_framebuffer(fb, &[clip]) {
                tracing::debug!("{} {}: no DIRTYFB ({e})", card.path.display(), o.name);
                o.dirtyfb = false;
            }
        }
        Ok(())
    }

    /// Reads the card's pending events (page flips done).
    pub fn drain_events(&mut self) {
        let Ok(events) = self.card.receive_events() else { return };
        for e in events {
            if let Event::PageFlip(f) = e {
                if let Some(o) = self.outputs.iter_mut().find(|o| o.crtc == f.crtc) {
                    o.flip_pending = None;
                }
            }
        }
    }
}

impl Drop for CardOutputs {
    fn drop(&mut self) {
        for o in std::mem::take(&mut self.outputs) {
            self.destroy(o);
        }
        // Hand the screen back to fbcon.
        let _ = self.card.release_master_lock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_card_is_found_not_only_card0() {
        let d = std::env::temp_dir().join(format!("rayos-comp-cards-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for n in ["card1", "renderD128", "card0", "card12", "cardx", "version"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        let names: Vec<String> = card_paths(&d).iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(names, ["card0", "card1", "card12"]);
    }

    #[test]
    fn each_buffer_gets_every_row_it_missed_while_on_screen() {
        let mut s = Swap::new(100);
        // The first frame fills the back buffer entirely.
        assert_eq!(s.damage(10..20), Some(0..100));
        s.flipped();
        // The other buffer also still lacks everything.
        assert_eq!(s.damage(30..31), Some(0..100));
        s.flipped();
        // From now on, each buffer lacks what changed in the frames since it was written.
        assert_eq!(s.damage(50..60), Some(30..60), "frame 2's rows 30..31 and frame 3's 50..60");
        s.flipped();
        assert_eq!(s.damage(5..6), Some(5..60));
        s.flipped();
        assert_eq!(s.damage(5..5), Some(5..6), "nothing new, but the back buffer still lacks row 5");
        s.flipped();
        assert_eq!(s.damage(5..5), None, "both up to date: no copy");
        // A flip refused after the copy: the rows stay owed to that buffer.
        assert_eq!(s.damage(7..8), Some(7..8));
        s.not_shown(7..8);
        assert_eq!(s.damage(0..0), Some(7..8));
    }

    #[test]
    fn stale_rows_accumulate() {
        assert_eq!(union(None, 3..5), Some(3..5));
        assert_eq!(union(Some(3..5), 10..12), Some(3..12));
        assert_eq!(union(Some(3..5), 4..4), Some(3..5));
        assert_eq!(union(None, 4..4), None);
    }
}
