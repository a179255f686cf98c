//! The kernel command line: which boot mode, and the rayos.* options rayosd understands.
//!
//! Bad input never stops a boot: an unknown or malformed `rayos.*` option is reported in
//! [`BootOptions::warnings`] and the default is used.

use std::fmt;
use std::str::FromStr;

/// What rayosd starts (`rayos.mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Runs `rayos-installer` on the console.
    Installer,
    /// Mounts the data volume and runs the system.
    Installed,
    /// Control API, logs and a console status screen; nothing autostarts.
    Rescue,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Installer => "installer",
            Mode::Installed => "installed",
            Mode::Rescue => "rescue",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "installer" => Ok(Mode::Installer),
            "installed" => Ok(Mode::Installed),
            "rescue" => Ok(Mode::Rescue),
            other => Err(format!(
                "unknown mode {other:?} (expected installer, installed or rescue)"
            )),
        }
    }
}

/// The parsed `rayos.*` options of a kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// The boot mode; `rescue` when `rayos.mode=` is absent or invalid.
    pub mode: Mode,
    /// Whether `rayos.mode=` was given and valid.
    pub mode_given: bool,
    /// `rayos.testsvc=<scenario>`: start the test-only service (integration tests).
    pub testsvc: Option<String>,
    /// `rayos.watchdog=0` disables the hardware watchdog.
    pub watchdog: bool,
    /// Problems found, one human-readable sentence each, naming the option.
    pub warnings: Vec<String>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions { mode: Mode::Rescue, mode_given: false, testsvc: None, watchdog: true, warnings: Vec::new() }
    }
}

impl BootOptions {
    /// Parses a kernel command line (the contents of /proc/cmdline).
    pub fn parse(cmdline: &str) -> BootOptions {
        let mut opts = BootOptions::default();
        for word in split_words(cmdline) {
            let Some(rest) = word.strip_prefix("rayos.") else { continue };
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (rest, None),
            };
            match (key, value) {
                ("mode", Some(v)) => match v.parse::<Mode>() {
                    Ok(m) => {
                        opts.mode = m;
                        opts.mode_given = true;
                    }
                    Err(e) => opts.warnings.push(format!("kernel command line: rayos.mode: {e}; using rescue")),
                },
                ("testsvc", Some(v)) if !v.is_empty() => opts.testsvc = Some(v.to_string()),
                ("watchdog", Some("0" | "off" | "no")) => opts.watchdog = false,
                ("watchdog", Some("1" | "on" | "yes")) => opts.watchdog = true,
                (k, Some(v)) => opts.warnings.push(format!(
                    "kernel command line: option rayos.{k}={v:?} is unknown or malformed; ignored"
                )),
                (k, None) => opts.warnings.push(format!(
                    "kernel command line: option rayos.{k} needs a value (rayos.{k}=…); ignored"
                )),
            }
        }
        if !opts.mode_given && !opts.warnings.iter().any(|w| w.contains("rayos.mode")) {
            opts.warnings.push("kernel command line: no rayos.mode=; using rescue".to_string());
        }
        opts
    }
}

/// Splits like the kernel does: on whitespace, with double quotes grouping a value.
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mode_among_other_options() {
        let o = BootOptions::parse("console=ttyS0,115200 panic=10 rayos.mode=installer quiet\n");
        assert_eq!(o.mode, Mode::Installer);
        assert!(o.mode_given);
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    }

    #[test]
    fn unknown_mode_falls_back_to_rescue_with_a_warning() {
        let o = BootOptions::parse("rayos.mode=bogus");
        assert_eq!(o.mode, Mode::Rescue);
        assert!(!o.mode_given);
        assert_eq!(o.warnings.len(), 1);
        assert!(o.warnings[0].contains("rayos.mode") && o.warnings[0].contains("bogus"));
    }

    #[test]
    fn missing_mode_is_rescue() {
        let o = BootOptions::parse("console=ttyS0");
        assert_eq!(o.mode, Mode::Rescue);
        assert!(o.warnings[0].contains("no rayos.mode"));
    }

    #[test]
    fn unknown_and_valueless_options_are_reported_not_fatal() {
        let o = BootOptions::parse("rayos.mode=installed rayos.frobnicate=1 rayos.testsvc rayos.watchdog=0");
        assert_eq!(o.mode, Mode::Installed);
        assert!(!o.watchdog);
        assert_eq!(o.testsvc, None);
        assert_eq!(o.warnings.len(), 2, "{:?}", o.warnings);
        assert!(o.warnings[0].contains("rayos.frobnicate"));
        assert!(o.warnings[1].contains("rayos.testsvc"));
    }

    #[test]
    fn quoted_values_keep_their_spaces() {
        let o = BootOptions::parse("foo=\"a b\" rayos.testsvc=\"crash loop\"");
        assert_eq!(o.testsvc.as_deref(), Some("crash loop"));
    }
}
