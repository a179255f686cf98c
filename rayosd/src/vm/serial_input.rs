//! Typing on a VM's serial console (`rayosctl vm type --serial`): the bytes go into the VMM's UART
//! receive FIFO, which holds 64 bytes; longer text is fed as the guest drains it.

use std::time::{Duration, Instant};

use rayos_proto::vmm::{Reply, Request as VmmRequest};

use super::manager::{VmError, VmManager};

/// The most `type` takes at once: a login, a command line, not a file.
pub const MAX_INPUT: usize = 4096;

/// Text in pieces of at most `max` bytes, cut on character boundaries.
fn pieces(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        // A character wider than `max` still goes whole.
        if end == 0 {
            end = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

impl VmManager {
    /// Queues `text` on the VM's serial port, waiting for the guest to read the FIFO when it
    /// is full (up to 10 s without progress). Returns the bytes queued.
    pub async fn serial_input(&self, id_or_name: &str, text: &str) -> Result<usize, VmError> {
        if text.len() > MAX_INPUT {
            return Err(VmError::Invalid(format!("serial input is {} bytes; at most {MAX_INPUT} at once", text.len())));
        }
        let (vm, conn) = self.live_vmm(id_or_name, "typing on the serial console", false)?;
        let failed = |reason: String| VmError::Failed { name: vm.name.clone(), reason };
        let mut queued = 0;
        for piece in pieces(text, 16) {
            let mut left = piece;
            let mut progress_at = Instant::now();
            while !left.is_empty() {
                let reply = conn.request(VmmRequest::SerialInput { data: left.into() }, Duration::from_secs(3)).await.map_err(|e| failed(e.to_string()))?;
                let n = match reply {
                    Reply::Queued { queued } => queued,
                    other => return Err(failed(format!("unexpected answer to serial input: {other:?}"))),
                };
                // The VMM queues whole bytes; a piece is cut only where a character ends,
                // since our pieces are ASCII-sized and the FIFO takes what fits.
                let n = (0..=n.min(left.len())).rev().find(|&i| left.is_char_boundary(i)).unwrap_or(0);
                if n > 0 {
                    queued += n;
                    left = &left[n..];
                    progress_at = Instant::now();
                    continue;
                }
                if progress_at.elapsed() > Duration::from_secs(10) {
                    return Err(failed(format!("the guest has not read its serial port for 10 s; {queued} of {} bytes typed", text.len())));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_cut_on_character_boundaries() {
        assert_eq!(super::pieces("abcdef", 4), ["abcd", "ef"]);
        assert_eq!(super::pieces("aé€b", 3), ["aé", "€", "b"]);
        assert_eq!(super::pieces("€", 1), ["€"]);
        assert!(super::pieces("", 4).is_empty());
    }
}
