//! A Linux VM's first-boot settings: the user the installer's wizard (or answer file) chose,
//! with its password as a SHA-512 crypt hash (`$6$…`, never the password itself), and the
//! time zone, locale and keymap. Kept in the VM's registry record ([`crate::registry::VmRecord`],
//! `firstboot`, in the root-only 0600 `vms.json`); rayosd hands them to the guest agent once
//! it is ready ([`crate::agent::ToAgent::Setup`]) and records the agent's answer here.

use serde::{Deserialize, Serialize};

/// What the agent sets up in the guest (the `setup {json}` line's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSetup {
    pub user: String,
    /// SHA-512 crypt (`$6$[rounds=N$]salt$hash`), as /etc/shadow holds it.
    pub password_hash: String,
    pub timezone: String,
    pub locale: String,
    pub keymap: String,
}

impl GuestSetup {
    /// The first field that is not acceptable, as (field, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        check_user_name(&self.user).map_err(|e| ("user", e))?;
        check_password_hash(&self.password_hash).map_err(|e| ("password_hash", e))?;
        // The agent makes paths of these: no traversal, no spaces, no control characters.
        let plain = |s: &str| !s.is_empty() && s.len() <= 64 && !s.contains("..") && s.chars().all(|c| c.is_ascii_alphanumeric() || "/_-+.@".contains(c));
        for (field, v) in [("timezone", &self.timezone), ("locale", &self.locale), ("keymap", &self.keymap)] {
            if !plain(v) || v.starts_with('/') || v.starts_with('-') {
                return Err((field, format!("{v:?} is not a {field} name")));
            }
        }
        Ok(())
    }
}

/// Where the first-boot setup of a VM stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstBootState {
    /// Not done yet: sent at the next time the agent is ready.
    #[default]
    Pending,
    /// The agent answered `setup ok`; the hash is dropped from the record.
    Done,
    /// The agent answered `setup failed: …` (in `error`); sent again at the next boot.
    Failed,
}

impl FirstBootState {
    pub fn as_str(self) -> &'static str {
        match self {
            FirstBootState::Pending => "pending",
            FirstBootState::Done => "done",
            FirstBootState::Failed => "failed",
        }
    }
}

/// The `firstboot` part of a VM's registry record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstBoot {
    pub setup: GuestSetup,
    #[serde(default)]
    pub state: FirstBootState,
    /// The agent's reason, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the agent could not apply although the setup is done (e.g. a keymap the guest
    /// lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl FirstBoot {
    pub fn new(setup: GuestSetup) -> FirstBoot {
        FirstBoot { setup, state: FirstBootState::Pending, error: None, warning: None }
    }

    /// Still to be sent to the agent.
    pub fn wanted(&self) -> bool {
        self.state != FirstBootState::Done
    }

    /// The agent's answer, recorded. Once done the hash is no longer kept: the guest's
    /// /etc/shadow has it.
    pub fn answered(&mut self, result: &Result<Option<String>, String>) {
        match result {
            Ok(warning) => {
                self.state = FirstBootState::Done;
                self.error = None;
                self.warning = warning.clone();
                self.setup.password_hash.clear();
            }
            Err(why) => {
                self.state = FirstBootState::Failed;
                self.error = Some(why.clone());
            }
        }
    }

    /// One line for `rayosctl vm show`.
    pub fn describe(&self) -> String {
        match (&self.state, &self.error) {
            (FirstBootState::Failed, Some(e)) => format!("failed: {e} (retried at the next boot)"),
            (s, _) => {
                let warning = self.warning.as_ref().map(|w| format!("; but {w}")).unwrap_or_default();
                format!("{} (user {}, {}, {}, keymap {}){warning}", s.as_str(), self.setup.user, self.setup.timezone, self.setup.locale, self.setup.keymap)
            }
        }
    }
}

/// Names a Linux system keeps for itself: a user may not take them.
pub const RESERVED_USER_NAMES: &[&str] = &[
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data", "backup",
    "list", "irc", "gnats", "nobody", "nogroup", "systemd-network", "systemd-resolve", "systemd-timesync", "messagebus",
    "sshd", "_apt", "adm", "sudo", "tty", "disk", "kmem", "dialout", "cdrom", "floppy", "audio", "video", "plugdev",
    "staff", "users", "shadow", "utmp", "operator", "src", "voice", "tape", "fax", "input", "kvm", "render", "netdev",
];

/// A Linux user name as Debian's `useradd` takes it without `--badname`: `[a-z_][a-z0-9_-]*`,
/// at most 32 characters, and not one of [`RESERVED_USER_NAMES`].
pub fn check_user_name(s: &str) -> Result<(), String> {
    let rule = "lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters";
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if s.is_empty() {
        return Err(format!("empty: use {rule}"));
    }
    if !first_ok || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') || s.len() > 32 {
        return Err(format!("{s:?} is not a Linux user name: use {rule}"));
    }
    if RESERVED_USER_NAMES.contains(&s) {
        return Err(format!("{s:?} is a name the system keeps for itself: choose another"));
    }
    Ok(())
}

/// The crypt(3) base64 alphabet.
fn crypt_b64(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '/'
}

/// A SHA-512 crypt hash: `$6$`, an optional `rounds=N$`, a salt of 1-16 characters and the
/// 86-character hash. Anything else (a plain password, an MD5 or yescrypt hash, a ':' that
/// would break /etc/shadow) is refused.
pub fn check_password_hash(s: &str) -> Result<(), String> {
    let bad = || "not a SHA-512 crypt hash (\"$6$salt$…\", 86 characters after the salt): give password_hash as `mkpasswd -m sha-512` prints it".to_string();
    let rest = s.strip_prefix("$6$").ok_or_else(bad)?;
    let rest = match rest.strip_prefix("rounds=") {
        Some(r) => {
            let (n, r) = r.split_once('$').ok_or_else(bad)?;
            n.parse::<u32>().map_err(|_| bad())?;
            r
        }
        None => rest,
    };
    let (salt, hash) = rest.split_once('$').ok_or_else(bad)?;
    if salt.is_empty() || salt.len() > 16 || !salt.chars().all(crypt_b64) || hash.len() != 86 || !hash.chars().all(crypt_b64) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// crypt("secret", "$6$saltsalt$").
    pub const HASH: &str = "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";

    #[test]
    fn user_names_follow_useradds_rule_and_errors_say_what_is_allowed() {
        for ok in ["alice", "_svc", "bob-2", "a_b", &"a".repeat(32)] {
            assert_eq!(check_user_name(ok), Ok(()), "{ok}");
        }
        for bad in ["Alice", "1abc", "-x", "a b", "a:b", "ä", &"a".repeat(33)] {
            let e = check_user_name(bad).unwrap_err();
            assert!(e.contains("is not a Linux user name") && e.contains("lowercase"), "{bad}: {e}");
        }
        assert!(check_user_name("").unwrap_err().starts_with("empty"));
        for reserved in ["root", "daemon", "nobody", "sudo"] {
            assert!(check_user_name(reserved).unwrap_err().contains("keeps for itself"), "{reserved}");
        }
    }

    #[test]
    fn only_sha512_crypt_hashes_are_taken() {
        assert_eq!(check_password_hash(HASH), Ok(()));
        let rounds = HASH.replacen("$6$", "$6$rounds=5000$", 1);
        assert_eq!(check_password_hash(&rounds), Ok(()));
        for bad in ["secret", "", "$1$salt$abc", "$y$j9T$abc$def", &HASH[..HASH.len() - 1], &HASH.replace("salt", "sa:t"), &format!("{HASH}\nroot::")] {
            assert!(check_password_hash(bad).unwrap_err().contains("SHA-512"), "{bad:?}");
        }
    }

    #[test]
    fn setups_are_checked_field_by_field() {
        let s = GuestSetup { user: "alice".into(), password_hash: HASH.into(), timezone: "America/Argentina/Buenos_Aires".into(), locale: "en_US.UTF-8".into(), keymap: "fr".into() };
        assert_eq!(s.check(), Ok(()));
        assert_eq!(GuestSetup { user: "root".into(), ..s.clone() }.check().unwrap_err().0, "user");
        assert_eq!(GuestSetup { password_hash: "hunter2".into(), ..s.clone() }.check().unwrap_err().0, "password_hash");
        assert_eq!(GuestSetup { timezone: "../../etc/shadow".into(), ..s.clone() }.check().unwrap_err().0, "timezone");
        assert_eq!(GuestSetup { locale: "en US".into(), ..s.clone() }.check().unwrap_err().0, "locale");
        assert_eq!(GuestSetup { keymap: "-h".into(), ..s.clone() }.check().unwrap_err().0, "keymap");
        let mut fb = FirstBoot::new(s);
        assert!(fb.wanted());
        fb.answered(&Err("useradd: exit 9".into()));
        assert!(fb.wanted() && fb.describe().contains("useradd: exit 9"));
        fb.answered(&Ok(Some("keymap cz: not in this guest".into())));
        assert!(!fb.wanted());
        assert!(fb.describe().ends_with("keymap fr); but keymap cz: not in this guest"), "{}", fb.describe());
        assert!(fb.setup.password_hash.is_empty(), "the hash is not kept once the guest has it");
        assert!(fb.describe().starts_with("done (user alice"), "{}", fb.describe());
    }
}
