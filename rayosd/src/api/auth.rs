//! Who may call what. Anyone who can connect may read the status, services, the system log and
//! the VM list; methods that change something, and those that show what a guest shows (its
//! screen, its serial console), need the caller to be root, or the system's owner where one is
//! configured (systemless runs as an ordinary user and serves that user).
//!
//! The caller is the socket's peer, from SO_PEERCRED as zbus reads it. Over the virtio-serial
//! bridge the peer is rayosd itself (root): whoever can open the host side owns the VM anyway.

/// The methods the screen's own user (the compositor, which runs unprivileged) may call:
/// what the home screen's keys do, and showing a VM. Nothing that creates, deletes or types.
pub const SCREEN_METHODS: &[&str] =
    &["Present", "Hide", "OpenChannel", "ReportPrimaryMode", "ReportNoMonitor", "HoldConsole", "StartVm", "StopVm", "PowerOff", "Reboot"];

/// The uids allowed the privileged methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Allowed as well as root.
    owner: Option<u32>,
    /// Allowed [`SCREEN_METHODS`] only.
    screen: Option<u32>,
}

impl Access {
    /// Root only.
    pub const fn root_only() -> Access {
        Access { owner: None, screen: None }
    }

    /// Root and `uid` (systemless: the user who started it). `root_or(0)` is root only.
    pub const fn root_or(uid: u32) -> Access {
        Access { owner: if uid == 0 { None } else { Some(uid) }, screen: None }
    }

    /// Also lets `uid`, the compositor's user, call [`SCREEN_METHODS`] (rayosd as PID 1).
    pub const fn with_screen(self, uid: u32) -> Access {
        Access { screen: Some(uid), ..self }
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
            Some(uid) if self.screen == Some(uid) && SCREEN_METHODS.contains(&method) => Ok(()),
            Some(uid) if self.screen == Some(uid) => {
                Err(Denied(format!("{method} needs {}; caller uid {uid} is the compositor's, which may call only {}", self.who(), SCREEN_METHODS.join(", "))))
            }
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
    fn the_compositor_may_show_start_and_stop_but_not_create_type_or_delete() {
        let a = Access::root_only().with_screen(1_999_000_001);
        for m in ["Present", "OpenChannel", "StartVm", "StopVm", "PowerOff", "ReportPrimaryMode"] {
            assert_eq!(a.check(m, Some(1_999_000_001)), Ok(()), "{m}");
        }
        for m in ["CreateVm", "DeleteVm", "SetNetwork", "TypeText", "KeyInput", "GuestScreen", "Logs", "SerialInput", "SignalVmm"] {
            let e = a.check(m, Some(1_999_000_001)).unwrap_err().0;
            assert!(e.contains(&format!("{m} needs root")) && e.contains("the compositor's"), "{e}");
        }
        assert!(a.check("Present", Some(1000)).is_err(), "another user is not the compositor");
        assert_eq!(a.check("CreateVm", Some(0)), Ok(()));
    }

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
