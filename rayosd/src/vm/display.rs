//! A VM's display as the API sees it: screenshots (the VMM writes the frame, we read it).

use std::sync::atomic::Ordering;
use std::time::Duration;

use rayos_proto::vmm::Request as VmmRequest;

use super::manager::{VmError, VmManager, NEXT_REQUEST};

impl VmManager {
    /// The VM's display as a binary PPM (P6): the VMM writes the frame into the run folder,
    /// we read it back and remove it.
    pub async fn screenshot(&self, id_or_name: &str) -> Result<Vec<u8>, VmError> {
        let (vm, conn) = self.live_vmm(id_or_name, "a screenshot", true)?;
        if vm.config.display.is_none() {
            return Err(VmError::Refused { name: vm.name, reason: "a screenshot needs a display (config.display)".into() });
        }
        let path = self.settings.paths.run_dir.join(format!("{}.screenshot-{}.ppm", vm.id, NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)));
        let failed = |reason: String| VmError::Failed { name: vm.name.clone(), reason };
        // The VMM creates the file and never replaces one (its seccomp filter allows no
        // truncating open); a leftover of ours in our own run folder goes first.
        let _ = std::fs::remove_file(&path);
        // Reading a large frame takes a moment under emulation.
        let r = conn.request(VmmRequest::Screenshot { path: path.clone() }, Duration::from_secs(20)).await;
        let data = r.map_err(|e| failed(e.to_string())).and_then(|_| std::fs::read(&path).map_err(|e| failed(format!("{}: {e}", path.display()))));
        let _ = std::fs::remove_file(&path);
        data
    }
}
