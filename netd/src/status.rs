//! The state rayosd shows: every uplink's [`Uplink`], written whole to one file at each
//! change (write to a temporary name, then rename: a reader never sees half a file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use std::net::Ipv4Addr;

use rayos_proto::net::{NatStatus, NetStatus, Uplink};
use tracing::warn;

/// As root, before dropping to `uid`: the state's folder made anew and given to `uid`. Anew,
/// because the folder a previous netd owned may hold anything that netd put there (a
/// symlink to a file root would then write through); std's `remove_dir_all` does not follow
/// symlinks. Root does no other file I/O in it.
pub fn fresh_folder(status: &Path, uid: u32) -> Result<(), FolderError> {
    let dir = status.parent().ok_or_else(|| {
        FolderError(
            status.to_path_buf(),
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let err = |e| FolderError(dir.to_path_buf(), e);
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir).map_err(err)?,
        Ok(_) => std::fs::remove_file(dir).map_err(err)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| FolderError(parent.to_path_buf(), e))?;
    }
    std::fs::create_dir(dir).map_err(err)?;
    let id = (
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    );
    nix::unistd::chown(dir, id.0, id.1).map_err(|e| err(e.into()))?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("preparing the network state folder {path}: {err}", path = .0.display(), err = .1)]
pub struct FolderError(PathBuf, std::io::Error);

pub struct Board {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    uplinks: BTreeMap<String, Uplink>,
    nat: NatStatus,
}

impl Board {
    /// A board writing to `path` (its folder is made); an empty state is written at once, so
    /// rayosd can tell "no wired interface" from "netd has not started".
    pub fn new(path: PathBuf) -> Board {
        let b = Board {
            path,
            state: Mutex::new(State::default()),
        };
        b.write(&State::default());
        b
    }

    pub fn set(&self, u: Uplink) {
        let mut m = self.state.lock().unwrap();
        if m.uplinks.get(&u.name) == Some(&u) {
            return;
        }
        m.uplinks.insert(u.name.clone(), u);
        self.write(&m);
    }

    pub fn remove(&self, name: &str) {
        let mut m = self.state.lock().unwrap();
        if m.uplinks.remove(name).is_some() {
            self.write(&m);
        }
    }

    /// Changes the NAT side's state with `f`, written when it changed.
    pub fn nat(&self, f: impl FnOnce(&mut NatStatus)) {
        let mut m = self.state.lock().unwrap();
        let before = m.nat.clone();
        f(&mut m.nat);
        if m.nat != before {
            self.write(&m);
        }
    }

    /// The state of the uplink `name`, as last published.
    pub fn uplink(&self, name: &str) -> Option<Uplink> {
        self.state.lock().unwrap().uplinks.get(name).cloned()
    }

    /// The NAT side's state, as last published.
    pub fn nat_status(&self) -> NatStatus {
        self.state.lock().unwrap().nat.clone()
    }

    /// The DNS servers of the uplinks' leases, the bound ones first in name order: where the
    /// VMs' DNS forwarder asks.
    pub fn dns_servers(&self) -> Vec<Ipv4Addr> {
        let m = self.state.lock().unwrap();
        let mut out = Vec::new();
        for u in m.uplinks.values() {
            for d in u.lease.iter().flat_map(|l| l.dns.iter()) {
                if !out.contains(d) {
                    out.push(*d);
                }
            }
        }
        out
    }

    fn write(&self, m: &State) {
        let s = NetStatus {
            pid: std::process::id(),
            uplinks: m.uplinks.values().cloned().collect(),
            nat: m.nat.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_is_made_anew_and_what_was_planted_in_it_is_not_followed() {
        let t = std::env::temp_dir().join(format!("netd-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let dir = t.join("run/net");
        std::fs::create_dir_all(&dir).unwrap();
        let victim = t.join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("status.tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("status.json")).unwrap();
        let me = nix::unistd::getuid().as_raw();
        fresh_folder(&dir.join("status.json"), me).unwrap();
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the folder is empty"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        // A folder replaced by a symlink is replaced by a real folder again.
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&t, &dir).unwrap();
        fresh_folder(&dir.join("status.json"), me).unwrap();
        assert!(std::fs::symlink_metadata(&dir).unwrap().is_dir());
        assert!(victim.exists());
        let b = Board::new(dir.join("status.json"));
        b.remove("none");
        let s =
            NetStatus::parse(&std::fs::read_to_string(dir.join("status.json")).unwrap()).unwrap();
        assert_eq!(s.uplinks, vec![]);
        std::fs::remove_dir_all(&t).unwrap();
    }
}
