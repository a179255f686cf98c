//! Who may call what. Anyone who can connect may read the status, services, the system log and
//! the VM list; methods that change something, and those that show what a guest shows (its
//! screen, its serial console), need the caller to be root, or the system's owner where one is
//! configured (systemless runs as an ordinary user and serves that user).
//!
//! The caller is the socket's peer, from SO_PEERCRED as zbus reads it. Over the virtio-serial
//! bridge the peer is rayosd itself (root): whoever can open the host side owns the VM anyway.

/// The uids allowed the privileged methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Allowed as well as root.
    owner: Option<u32>,
}

impl Access {
    /// rayosd as PID 1: root only.
    pub const fn root_only() -> Access {
        Access { owner: None }
    }

    /// Root and `uid` (systemless: the user who started it). `root_or(0)` is root only.
    pub const fn root_or(uid: u32) -> Access {
        Access { owner: if uid == 0 { None } else { Some(uid) } }
    }

    /// Root and the user this process runs as (systemless).
    pub fn root_or_this_user() -> Access {
        Access::root_or(nix::unistd::getuid().as_raw())
    }

    pub fn owner(&self) -> Option<u32> {
        self.owner
    }

    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || self.owner == Some(uid)
    }

    fn who(&self) -> String {
        match self.owner {
            None => "root".into(),
            Some(o) => format!("root or uid {o} (the owner of this system)"),
        }
    }

    /// The decision for a caller whose uid is `uid` (None: the credentials did not say).
    pub fn check(&self, method: &str, uid: Option<u32>) -> Result<(), Denied> {
        match uid {
            Some(uid) if self.allows(uid) => Ok(()),
            Some(uid) => Err(Denied(format!("{method} needs {}; caller uid is {uid}", self.who()))),
            None => Err(Denied(format!("{method} needs {}; the caller's uid is unknown", self.who()))),
        }
    }
}

/// A refused call; each interface turns it into its `org.rayos.Error.AccessDenied`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// The uid of the process at the other end of `conn` (None when the transport has none).
pub async fn peer_uid(conn: &zbus::Connection) -> Result<Option<u32>, Denied> {
    let creds = conn.peer_creds().await.map_err(|e| Denied(format!("cannot read the caller's credentials: {e}")))?;
    Ok(creds.unix_user_id())
}

/// Refuses `method` unless the caller on `conn` is root or `access`'s owner.
pub async fn require_root(conn: &zbus::Connection, access: Access, method: &str) -> Result<(), Denied> {
    let uid = peer_uid(conn).await.map_err(|Denied(e)| Denied(format!("{method}: {e}")))?;
    let verdict = access.check(method, uid);
    if let Err(Denied(why)) = &verdict {
        tracing::info!("control: refused: {why}");
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid1_allows_only_root() {
        let a = Access::root_only();
        assert!(a.check("PowerOff", Some(0)).is_ok());
        let e = a.check("PowerOff", Some(1000)).unwrap_err().0;
        assert_eq!(e, "PowerOff needs root; caller uid is 1000");
        assert!(a.check("PowerOff", None).unwrap_err().0.contains("uid is unknown"));
        assert_eq!(Access::root_or(0), Access::root_only());
    }

    #[test]
    fn systemless_allows_root_and_its_owner_only() {
        let a = Access::root_or(1000);
        assert!(a.check("StartVm", Some(0)).is_ok());
        assert!(a.check("StartVm", Some(1000)).is_ok());
        let e = a.check("StartVm", Some(1001)).unwrap_err().0;
        assert!(e.contains("StartVm needs root or uid 1000") && e.contains("caller uid is 1001"), "{e}");
        assert!(a.check("StartVm", None).is_err());
    }
}
