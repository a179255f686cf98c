//! The display channel: how the compositor sees a VM's screen and types into it.
//!
//! One `SOCK_SEQPACKET` socketpair per running VMM with a display. rayosd makes it when it
//! spawns the VMM and passes one end as `rayos-vmm --display-fd N`; it keeps the other end and
//! hands a duplicate of it to the compositor (`org.rayos.Display1.OpenChannel`). Every
//! datagram is one whole message, so a compositor that dies mid-write leaves nothing half
//! written for the next one, and a new compositor simply sends [`ToVmm::Attach`] again.
//!
//! A datagram starts with a little-endian `u32` tag:
//! - [`TAG_INPUT`] (compositor → VMM): a `u32` [`InputTarget`], then whole 8-byte
//!   `struct virtio_input_event` records ([`InputRecord`]), the crosvm way: no JSON per key.
//!   One datagram is one report and should end with `SYN_REPORT`.
//! - [`TAG_CONTROL`] (both ways): JSON of [`ToVmm`] or [`FromVmm`]. [`FromVmm::Framebuffer`]
//!   carries the framebuffer memfd as `SCM_RIGHTS`; the compositor maps it read-only.
//!
//! Decoding never trusts the peer: a short datagram, an unknown tag or target, a record count
//! that is not whole, or JSON that does not parse is a [`ChannelError`] naming what was wrong.

use serde::{Deserialize, Serialize};

/// Tag of an input datagram.
pub const TAG_INPUT: u32 = 1;
/// Tag of a JSON control datagram.
pub const TAG_CONTROL: u32 = 2;
/// The largest datagram either side sends or accepts.
pub const MAX_DATAGRAM: usize = 16 * 1024;
/// At most this many input records in one datagram.
pub const MAX_RECORDS: usize = 256;

/// evdev constants the channel's users share (linux/input-event-codes.h).
pub mod ev {
    pub const EV_SYN: u16 = 0x00;
    pub const EV_KEY: u16 = 0x01;
    pub const EV_REL: u16 = 0x02;
    pub const EV_ABS: u16 = 0x03;
    pub const EV_LED: u16 = 0x11;
    pub const SYN_REPORT: u16 = 0;
    pub const ABS_X: u16 = 0x00;
    pub const ABS_Y: u16 = 0x01;
    pub const REL_X: u16 = 0x00;
    pub const REL_Y: u16 = 0x01;
    pub const REL_WHEEL: u16 = 0x08;
    pub const BTN_LEFT: u16 = 0x110;
    pub const BTN_RIGHT: u16 = 0x111;
    pub const BTN_MIDDLE: u16 = 0x112;
    pub const LED_NUML: u16 = 0x00;
    pub const LED_CAPSL: u16 = 0x01;
    pub const LED_SCROLLL: u16 = 0x02;
    /// The VM's tablet spans 0..=ABS_MAX on both axes.
    pub const ABS_MAX: u32 = 32767;
}

/// Which of the VM's virtio-input devices an input datagram is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum InputTarget {
    Keyboard = 0,
    Tablet = 1,
}

/// One `struct virtio_input_event` (type, code, value; little endian on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputRecord {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

impl InputRecord {
    pub const fn key(code: u16, pressed: bool) -> Self {
        Self { kind: ev::EV_KEY, code, value: pressed as u32 }
    }
    pub const fn abs(axis: u16, value: u32) -> Self {
        Self { kind: ev::EV_ABS, code: axis, value }
    }
    pub const fn rel(axis: u16, delta: i32) -> Self {
        Self { kind: ev::EV_REL, code: axis, value: delta as u32 }
    }
    pub const fn syn() -> Self {
        Self { kind: ev::EV_SYN, code: ev::SYN_REPORT, value: 0 }
    }
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Self {
            kind: u16::from_le_bytes([b[0], b[1]]),
            code: u16::from_le_bytes([b[2], b[3]]),
            value: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// Pixel layout of a guest framebuffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelFormat {
    /// 32 bpp, bytes B, G, R, X (DRM_FORMAT_XRGB8888); what Linux and OVMF use.
    Xrgb8888,
    /// 32 bpp, bytes X, R, G, B.
    Bgrx8888,
    /// 24 bpp, bytes B, G, R.
    Rgb888,
    /// 16 bpp, 5-6-5.
    Rgb565,
}

impl PixelFormat {
    pub const fn bytes_per_pixel(self) -> u32 {
        match self {
            PixelFormat::Xrgb8888 | PixelFormat::Bgrx8888 => 4,
            PixelFormat::Rgb888 => 3,
            PixelFormat::Rgb565 => 2,
        }
    }
}

/// What the guest shows: `width`×`height` pixels starting `offset` bytes into the memfd,
/// `stride` bytes per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FbMode {
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub offset: u64,
    pub format: PixelFormat,
}

impl FbMode {
    /// Whether every pixel of this mode lies inside a memfd of `size` bytes.
    pub fn fits(&self, size: u64) -> bool {
        let bpp = u64::from(self.format.bytes_per_pixel());
        self.width > 0
            && self.height > 0
            && u64::from(self.stride) >= u64::from(self.width) * bpp
            && self
                .offset
                .checked_add(u64::from(self.stride) * u64::from(self.height - 1) + u64::from(self.width) * bpp)
                .is_some_and(|end| end <= size)
    }
}

/// The keyboard LEDs a guest set (EV_LED on its virtio keyboard's status queue).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leds {
    pub num: bool,
    pub caps: bool,
    pub scroll: bool,
}

impl Leds {
    /// Applies one EV_LED event; false if it is not one of these three LEDs.
    pub fn set(&mut self, code: u16, on: bool) -> bool {
        match code {
            ev::LED_NUML => self.num = on,
            ev::LED_CAPSL => self.caps = on,
            ev::LED_SCROLLL => self.scroll = on,
            _ => return false,
        }
        true
    }
}

/// Compositor → VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToVmm {
    /// A compositor took this channel: send [`FromVmm::Framebuffer`] (with the memfd) now.
    Attach,
    /// Whether the VM is on screen. Only while shown does the VMM watch the framebuffer for
    /// writes and send [`FromVmm::Damage`]; a hidden VM costs nothing here.
    Shown { shown: bool },
}

/// VMM → compositor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromVmm {
    /// The answer to [`ToVmm::Attach`]; the datagram carries the memfd (`size` bytes).
    /// `mode` is `None` while the guest has its display off.
    Framebuffer { size: u64, mode: Option<FbMode> },
    /// The guest changed its mode or scanout offset.
    Mode { mode: Option<FbMode> },
    /// While shown: lines `y0..y1` of the current mode changed since the last message.
    Damage { y0: u32, y1: u32 },
    /// The guest set its keyboard LEDs.
    Leds(Leds),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("display channel: datagram of {0} bytes is too short for a tag")]
    Short(usize),
    #[error("display channel: datagram of {0} bytes is over the {MAX_DATAGRAM}-byte limit")]
    TooLong(usize),
    #[error("display channel: unknown tag {0}")]
    UnknownTag(u32),
    #[error("display channel: unknown input target {0} (0 keyboard, 1 tablet)")]
    UnknownTarget(u32),
    #[error("display channel: input payload of {0} bytes is not whole 8-byte records (at most {MAX_RECORDS})")]
    BadRecords(usize),
    #[error("display channel: control message: {0}")]
    BadJson(String),
    #[error("display channel: an input datagram where a control message was expected")]
    NotControl,
}

/// A datagram the VMM received, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmInbound {
    Input { target: InputTarget, records: Vec<InputRecord> },
    Control(ToVmm),
}

fn tag_of(buf: &[u8]) -> Result<(u32, &[u8]), ChannelError> {
    if buf.len() > MAX_DATAGRAM {
        return Err(ChannelError::TooLong(buf.len()));
    }
    let Some((tag, rest)) = buf.split_first_chunk::<4>() else {
        return Err(ChannelError::Short(buf.len()));
    };
    Ok((u32::from_le_bytes(*tag), rest))
}

fn control<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = TAG_CONTROL.to_le_bytes().to_vec();
    // Serializing these plain enums cannot fail.
    out.extend(serde_json::to_vec(msg).expect("display message serializes"));
    out
}

/// One input datagram for `target`.
pub fn encode_input(target: InputTarget, records: &[InputRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + records.len() * 8);
    out.extend(TAG_INPUT.to_le_bytes());
    out.extend((target as u32).to_le_bytes());
    for r in records {
        out.extend(r.to_bytes());
    }
    out
}

pub fn encode_to_vmm(msg: &ToVmm) -> Vec<u8> {
    control(msg)
}

pub fn encode_from_vmm(msg: &FromVmm) -> Vec<u8> {
    control(msg)
}

/// What the VMM does with a datagram from the compositor.
pub fn decode_to_vmm(buf: &[u8]) -> Result<VmmInbound, ChannelError> {
    let (tag, rest) = tag_of(buf)?;
    match tag {
        TAG_INPUT => {
            let Some((target, records)) = rest.split_first_chunk::<4>() else {
                return Err(ChannelError::Short(buf.len()));
            };
            let target = match u32::from_le_bytes(*target) {
                0 => InputTarget::Keyboard,
                1 => InputTarget::Tablet,
                n => return Err(ChannelError::UnknownTarget(n)),
            };
            if records.len() % 8 != 0 || records.len() / 8 > MAX_RECORDS {
                return Err(ChannelError::BadRecords(records.len()));
            }
            let records = records
                .chunks_exact(8)
                .map(|c| InputRecord::from_bytes(c.try_into().expect("chunks_exact(8)")))
                .collect();
            Ok(VmmInbound::Input { target, records })
        }
        TAG_CONTROL => serde_json::from_slice(rest).map(VmmInbound::Control).map_err(|e| ChannelError::BadJson(e.to_string())),
        n => Err(ChannelError::UnknownTag(n)),
    }
}

/// What the compositor does with a datagram from the VMM.
pub fn decode_from_vmm(buf: &[u8]) -> Result<FromVmm, ChannelError> {
    let (tag, rest) = tag_of(buf)?;
    match tag {
        TAG_CONTROL => serde_json::from_slice(rest).map_err(|e| ChannelError::BadJson(e.to_string())),
        TAG_INPUT => Err(ChannelError::NotControl),
        n => Err(ChannelError::UnknownTag(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_round_trips_as_virtio_input_event_records() {
        let recs = [InputRecord::key(30, true), InputRecord::syn()];
        let d = encode_input(InputTarget::Keyboard, &recs);
        // tag, target, then the records exactly as struct virtio_input_event.
        assert_eq!(&d[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&d[8..16], &[1, 0, 30, 0, 1, 0, 0, 0]);
        assert_eq!(decode_to_vmm(&d).unwrap(), VmmInbound::Input { target: InputTarget::Keyboard, records: recs.to_vec() });
    }

    #[test]
    fn control_messages_have_a_pinned_wire_form() {
        assert_eq!(&encode_to_vmm(&ToVmm::Attach)[4..], br#"{"msg":"attach"}"#);
        assert_eq!(&encode_to_vmm(&ToVmm::Shown { shown: true })[4..], br#"{"msg":"shown","shown":true}"#);
        let m = FromVmm::Framebuffer {
            size: 16 << 20,
            mode: Some(FbMode { width: 1024, height: 768, stride: 4096, offset: 0, format: PixelFormat::Xrgb8888 }),
        };
        let d = encode_from_vmm(&m);
        assert_eq!(
            std::str::from_utf8(&d[4..]).unwrap(),
            r#"{"msg":"framebuffer","size":16777216,"mode":{"width":1024,"height":768,"stride":4096,"offset":0,"format":"xrgb8888"}}"#
        );
        assert_eq!(decode_from_vmm(&d).unwrap(), m);
        let leds = FromVmm::Leds(Leds { num: false, caps: true, scroll: false });
        assert_eq!(&encode_from_vmm(&leds)[4..], br#"{"msg":"leds","num":false,"caps":true,"scroll":false}"#);
        assert_eq!(decode_from_vmm(b"\x02\0\0\0{\"msg\":\"leds\",\"num\":false,\"caps\":true,\"scroll\":false}").unwrap(), leds);
        assert!(decode_from_vmm(b"\x02\0\0\0{\"msg\":\"leds\",\"num\":false,\"caps\":true,\"scroll\":false,\"x\":1}").is_err());
        let dmg = FromVmm::Damage { y0: 3, y1: 9 };
        assert_eq!(decode_from_vmm(&encode_from_vmm(&dmg)).unwrap(), dmg);
    }

    #[test]
    fn hostile_datagrams_are_refused_by_name() {
        assert_eq!(decode_to_vmm(&[1, 0]), Err(ChannelError::Short(2)));
        assert_eq!(decode_to_vmm(&[9, 0, 0, 0]), Err(ChannelError::UnknownTag(9)));
        assert_eq!(decode_to_vmm(&[1, 0, 0, 0, 7, 0, 0, 0]), Err(ChannelError::UnknownTarget(7)));
        assert_eq!(decode_to_vmm(&[1, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]), Err(ChannelError::BadRecords(3)));
        let mut many = encode_input(InputTarget::Tablet, &[InputRecord::syn(); MAX_RECORDS + 1]);
        assert_eq!(decode_to_vmm(&many), Err(ChannelError::BadRecords((MAX_RECORDS + 1) * 8)));
        many.resize(MAX_DATAGRAM + 1, 0);
        assert_eq!(decode_to_vmm(&many), Err(ChannelError::TooLong(MAX_DATAGRAM + 1)));
        assert!(matches!(decode_to_vmm(b"\x02\0\0\0{\"msg\":\"format_disk\"}"), Err(ChannelError::BadJson(_))));
        assert_eq!(decode_from_vmm(&encode_input(InputTarget::Keyboard, &[])), Err(ChannelError::NotControl));
    }

    #[test]
    fn a_mode_must_lie_inside_the_framebuffer() {
        let m = FbMode { width: 1024, height: 768, stride: 4096, offset: 0, format: PixelFormat::Xrgb8888 };
        assert!(m.fits(4096 * 768));
        assert!(!m.fits(4096 * 768 - 1));
        assert!(!FbMode { stride: 100, ..m }.fits(u64::MAX));
        assert!(!FbMode { offset: u64::MAX - 10, ..m }.fits(u64::MAX));
        assert!(!FbMode { height: 0, ..m }.fits(u64::MAX));
    }
}
