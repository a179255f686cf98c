//! A VM's display as the API sees it: screenshots (the VMM writes the frame, we read it).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rayos_proto::vmm::Request as VmmRequest;

use super::manager::{VmError, VmManager, NEXT_REQUEST};

impl VmManager {
    /// The VM's display as a binary PPM (P6): the VMM writes the frame into the VM's own
    /// folder (the only place it may write), we read it back and remove it.
    pub async fn screenshot(&self, id_or_name: &str) -> Result<Vec<u8>, VmError> {
        let (vm, conn) = self.live_vmm(id_or_name, "a screenshot", true)?;
        if vm.config.display.is_none() {
            return Err(VmError::Refused { name: vm.name, reason: "a screenshot needs a display (config.display)".into() });
        }
        let path = self.vm_dir(vm.id).join(format!("screenshot-{}.ppm", NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)));
        let failed = |reason: String| VmError::Failed { name: vm.name.clone(), reason };
        // The VMM creates the file and never replaces one (its seccomp filter allows no
        // truncating open); a leftover goes first.
        let _ = std::fs::remove_file(&path);
        // Reading a large frame takes a moment under emulation.
        let r = conn.request(VmmRequest::Screenshot { path: path.clone() }, Duration::from_secs(20)).await;
        let data = r.map_err(|e| failed(e.to_string())).and_then(|_| read_screenshot(&path).map_err(|e| failed(format!("{}: {e}", path.display()))));
        let _ = std::fs::remove_file(&path);
        data
    }
}

/// The largest PPM a display can give: 4095x4095 pixels (EDID's limit), 3 bytes each, and
/// its header.
const MAX_SCREENSHOT: u64 = 4095 * 4095 * 3 + 64;

/// Reads the screenshot the VMM wrote into its folder, which its user owns: not through a
/// symlink (to a file only root may read), and not more than a frame can be.
fn read_screenshot(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut data = Vec::new();
    f.take(MAX_SCREENSHOT + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_SCREENSHOT {
        return Err(std::io::Error::other(format!("larger than any frame ({MAX_SCREENSHOT} bytes)")));
    }
    Ok(data)
}
