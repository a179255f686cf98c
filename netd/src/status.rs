//! The state rayosd shows: every uplink's [`Uplink`], written whole to one file at each
//! change (write to a temporary name, then rename: a reader never sees half a file).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use rayos_proto::net::{NetStatus, Uplink};
use tracing::warn;

pub struct Board {
    path: PathBuf,
    uplinks: Mutex<BTreeMap<String, Uplink>>,
}

impl Board {
    /// A board writing to `path` (its folder is made); an empty state is written at once, so
    /// rayosd can tell "no wired interface" from "netd has not started".
    pub fn new(path: PathBuf) -> Board {
        let b = Board {
            path,
            uplinks: Mutex::new(BTreeMap::new()),
        };
        b.write(&BTreeMap::new());
        b
    }

    /// Hands the state's folder and file to `uid`, which netd becomes next.
    pub fn give_to(&self, uid: u32) -> std::io::Result<()> {
        let owner = Some(nix::unistd::Uid::from_raw(uid));
        let group = Some(nix::unistd::Gid::from_raw(uid));
        for p in [self.path.parent(), Some(self.path.as_path())].into_iter().flatten() {
            nix::unistd::chown(p, owner, group)?;
        }
        Ok(())
    }

    pub fn set(&self, u: Uplink) {
        let mut m = self.uplinks.lock().unwrap();
        if m.get(&u.name) == Some(&u) {
            return;
        }
        m.insert(u.name.clone(), u);
        self.write(&m);
    }

    pub fn remove(&self, name: &str) {
        let mut m = self.uplinks.lock().unwrap();
        if m.remove(name).is_some() {
            self.write(&m);
        }
    }

    fn write(&self, m: &BTreeMap<String, Uplink>) {
        let s = NetStatus {
            pid: std::process::id(),
            uplinks: m.values().cloned().collect(),
        };
        let tmp = self.path.with_extension("tmp");
        let r = self
            .path
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| std::fs::write(&tmp, s.to_json()))
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        if let Err(e) = r {
            warn!(
                "cannot write the network state to {}: {e}",
                self.path.display()
            );
        }
    }
}
