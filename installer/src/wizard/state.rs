//! Wizard state and transitions, independent of any terminal so every step can be tested.
//! Esc always goes back one step; nothing is written before the typed confirmation.

use crate::answers;
use crate::config::{check_keymap, check_user_name, hash_password, LinuxUser, Network, OnShutdown, SystemConfig};
use crate::disks::Disk;
use crate::plan::{make_plan, Plan, Target, VmStorage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    Left,
    Right,
    Enter,
    Esc,
    Backspace,
    Tab,
    BackTab,
    Char(char),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    Welcome,
    Disks,
    Target,
    Filesystem,
    VmStorage,
    FirstBoot,
    LinuxUser,
    Summary,
    Installing,
    Done,
    Failed,
}

impl Screen {
    pub fn title(&self) -> &'static str {
        match self {
            Screen::Welcome => "1/9 Welcome",
            Screen::Disks => "2/9 Disks",
            Screen::Target => "3/9 Target",
            Screen::Filesystem => "4/9 Data filesystem",
            Screen::VmStorage => "5/9 VM storage",
            Screen::FirstBoot => "6/9 First-boot configuration",
            Screen::LinuxUser => "7/9 Linux user",
            Screen::Summary => "8/9 Summary and confirmation",
            Screen::Installing => "9/9 Installing",
            Screen::Done => "9/9 Done",
            Screen::Failed => "9/9 Installation failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    /// The user confirmed: run the plan (the caller reports progress back).
    Install,
    Reboot,
    /// Leave with a failure status (rayosd restarts the installer, which rescans).
    Restart,
    /// The keyboard layout field was accepted: the screen's keys should follow this layout
    /// from now on (the caller loads it; a valid `config::KEYMAPS` name).
    LoadKeymap(String),
}

/// The VM storage choices, in screen order.
pub const VM_CHOICES: [&str; 3] = [
    "On the RayOS data volume (/data/vms)",
    "A dedicated partition of this size:",
    "A directory on the data volume:",
];

/// Autostart of Windows VMs is not offered: RayOS does not run Windows VMs yet.
pub const FIRST_BOOT_FIELDS: [&str; 7] = [
    "Machine name",
    "Time zone",
    "Locale",
    "Keyboard layout",
    "Autostart Linux hidden",
    "Keep Linux running across reboots",
    "Network for Linux (NAT)",
];

/// The first-boot fields from this one on are check boxes (Space, Left or Right toggles), not text.
pub const FIRST_BOOT_FIRST_TOGGLE: usize = 4;

/// The Linux VM's user, as WSL asks at first start: the passwords are typed, never shown.
pub const LINUX_USER_FIELDS: [&str; 3] = ["User name", "Password", "Password again"];

#[derive(Debug, Clone)]
pub struct Wizard {
    pub screen: Screen,
    pub disks: Vec<Disk>,
    pub disk_cursor: usize,
    pub target_cursor: usize,
    pub vm_cursor: usize,
    pub vm_size: String,
    pub vm_path: String,
    pub config: SystemConfig,
    pub field_cursor: usize,
    pub confirm_input: String,
    /// The "Linux user" step's fields. The passwords live here only while typed: Enter
    /// turns them into `config.linux_user`'s hash and clears them.
    pub linux_name: String,
    pub password: String,
    pub password_again: String,
    pub plan: Option<Plan>,
    /// Shown under the current screen until the next key.
    pub message: Option<String>,
    pub progress: u8,
    pub progress_lines: Vec<String>,
    /// Why the screen's keys do not follow the chosen layout (its load failed); shown on the
    /// steps where one types until a load succeeds.
    pub keymap_problem: Option<String>,
}

impl Wizard {
    pub fn new(disks: Vec<Disk>) -> Self {
        // Start on the first eligible disk: the boot medium is listed (with its reason) but
        // never preselected.
        let disk_cursor = disks.iter().position(|d| d.eligible()).unwrap_or(0);
        Wizard {
            screen: Screen::Welcome,
            disks,
            disk_cursor,
            target_cursor: 0,
            vm_cursor: 0,
            vm_size: "64G".into(),
            vm_path: "/data/vmdisks".into(),
            config: SystemConfig::default(),
            field_cursor: 0,
            confirm_input: String::new(),
            linux_name: String::new(),
            password: String::new(),
            password_again: String::new(),
            plan: None,
            message: None,
            progress: 0,
            progress_lines: Vec::new(),
            keymap_problem: None,
        }
    }

    pub fn disk(&self) -> Option<&Disk> {
        self.disks.get(self.disk_cursor)
    }

    /// Target choices for the selected disk, with their labels.
    pub fn targets(&self) -> Vec<(Target, String)> {
        let Some(d) = self.disk() else { return Vec::new() };
        let mut out = vec![(Target::WholeDisk, format!("Whole disk: erase all of {} and use it for RayOS", d.name))];
        if d.gpt_disk_guid.is_some() {
            out.push((Target::LargestFree, "The largest free region (existing partitions are kept)".into()));
            for p in &d.partitions {
                if p.type_guid != crate::guids::ESP {
                    out.push((Target::Partition(p.number), format!("Replace partition {}", p.describe())));
                }
            }
        }
        out
    }

    pub fn vm_storage(&self) -> Result<VmStorage, String> {
        match self.vm_cursor {
            0 => Ok(VmStorage::DataVolume),
            1 => answers::parse_size(&self.vm_size).map(|size_bytes| VmStorage::DedicatedPartition { size_bytes }),
            _ if self.vm_path.starts_with("/data/") && !self.vm_path.contains("..") => Ok(VmStorage::Path(self.vm_path.clone())),
            _ => Err(format!("{:?}: must be a directory under /data/", self.vm_path)),
        }
    }

    /// The text the user must type on the summary screen.
    pub fn required_confirmation(&self) -> Option<String> {
        let plan = self.plan.as_ref()?;
        let verb = if plan.new_table || plan.destroys_anything() { "wipe" } else { "install" };
        Some(format!("{verb} {}", plan.disk.identity()))
    }

    /// The wizard's answers as an answer file (saved on the data volume).
    pub fn answers_toml(&self) -> Option<String> {
        let plan = self.plan.as_ref()?;
        Some(answers::to_toml(&plan.disk, &plan.target, &plan.vm_storage, &self.config, &self.required_confirmation()?))
    }

    fn go(&mut self, s: Screen) {
        self.screen = s;
    }

    fn text_field(&mut self) -> Option<&mut String> {
        match (&self.screen, self.field_cursor, self.vm_cursor) {
            (Screen::VmStorage, _, 1) => Some(&mut self.vm_size),
            (Screen::VmStorage, _, 2) => Some(&mut self.vm_path),
            (Screen::FirstBoot, 0, _) => Some(&mut self.config.hostname),
            (Screen::FirstBoot, 1, _) => Some(&mut self.config.timezone),
            (Screen::FirstBoot, 2, _) => Some(&mut self.config.locale),
            (Screen::FirstBoot, 3, _) => Some(&mut self.config.keymap),
            (Screen::LinuxUser, 0, _) => Some(&mut self.linux_name),
            (Screen::LinuxUser, 1, _) => Some(&mut self.password),
            (Screen::LinuxUser, 2, _) => Some(&mut self.password_again),
            (Screen::Summary, _, _) => Some(&mut self.confirm_input),
            _ => None,
        }
    }

    fn cursor(len: usize, cur: &mut usize, key: Key) {
        match key {
            Key::Up | Key::BackTab if *cur > 0 => *cur -= 1,
            Key::Down | Key::Tab if *cur + 1 < len => *cur += 1,
            _ => {}
        }
    }

    pub fn handle(&mut self, key: Key) -> Action {
        self.message = None;
        if matches!(self.screen, Screen::Installing) {
            return Action::None;
        }
        if key == Key::Esc {
            let back = match self.screen {
                Screen::Disks => Screen::Welcome,
                Screen::Target => Screen::Disks,
                Screen::Filesystem => Screen::Target,
                Screen::VmStorage => Screen::Filesystem,
                Screen::FirstBoot => Screen::VmStorage,
                Screen::LinuxUser => {
                    self.clear_passwords();
                    self.field_cursor = 0;
                    Screen::FirstBoot
                }
                Screen::Summary => {
                    self.confirm_input.clear();
                    // The password is typed again (twice): only its hash was kept.
                    self.config.linux_user = None;
                    self.field_cursor = 0;
                    Screen::LinuxUser
                }
                ref s => s.clone(),
            };
            self.go(back);
            return Action::None;
        }
        // Typing into the focused text field.
        if let Key::Char(c) = key {
            let toggle = matches!(self.screen, Screen::FirstBoot) && self.field_cursor >= FIRST_BOOT_FIRST_TOGGLE && c == ' ';
            if !toggle {
                if let Some(f) = self.text_field() {
                    if !c.is_control() && f.len() < 64 {
                        f.push(c);
                    }
                    return Action::None;
                }
            }
        }
        if key == Key::Backspace {
            if let Some(f) = self.text_field() {
                f.pop();
            }
            return Action::None;
        }
        match self.screen {
            Screen::Welcome => {
                if key == Key::Enter {
                    self.go(Screen::Disks);
                }
            }
            Screen::Disks => {
                Self::cursor(self.disks.len(), &mut self.disk_cursor, key);
                if key == Key::Enter {
                    match self.disk() {
                        None => self.message = Some("No disk found.".into()),
                        Some(d) if !d.eligible() => {
                            self.message = Some(format!(
                                "{} cannot be used: {}",
                                d.name,
                                d.ineligible.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
                            ))
                        }
                        Some(_) => {
                            self.target_cursor = 0;
                            self.go(Screen::Target);
                        }
                    }
                }
            }
            Screen::Target => {
                let n = self.targets().len();
                Self::cursor(n, &mut self.target_cursor, key);
                if key == Key::Enter {
                    let (target, _) = self.targets()[self.target_cursor].clone();
                    match make_plan(self.disk().expect("disk chosen"), target, VmStorage::DataVolume) {
                        Ok(_) => self.go(Screen::Filesystem),
                        Err(e) => self.message = Some(e.to_string()),
                    }
                }
            }
            Screen::Filesystem => {
                if key == Key::Enter {
                    self.go(Screen::VmStorage);
                }
            }
            Screen::VmStorage => {
                Self::cursor(VM_CHOICES.len(), &mut self.vm_cursor, key);
                if key == Key::Enter {
                    let (target, _) = self.targets()[self.target_cursor].clone();
                    let planned = self
                        .vm_storage()
                        .and_then(|vm| make_plan(self.disk().expect("disk chosen"), target, vm).map_err(|e| e.to_string()));
                    match planned {
                        Ok(p) => {
                            self.plan = Some(p);
                            self.field_cursor = 0;
                            self.go(Screen::FirstBoot);
                        }
                        Err(e) => self.message = Some(e),
                    }
                }
            }
            Screen::FirstBoot => {
                let was = self.field_cursor;
                Self::cursor(FIRST_BOOT_FIELDS.len(), &mut self.field_cursor, key);
                match key {
                    Key::Char(' ') | Key::Left | Key::Right if self.field_cursor >= FIRST_BOOT_FIRST_TOGGLE => self.toggle_first_boot(),
                    Key::Enter => match self.config.validate() {
                        Ok(()) => {
                            self.field_cursor = 0;
                            self.go(Screen::LinuxUser);
                            return Action::LoadKeymap(self.config.keymap.clone());
                        }
                        Err((field, msg)) => {
                            self.field_cursor = ["hostname", "timezone", "locale", "keymap"]
                                .iter()
                                .position(|f| *f == field)
                                .unwrap_or(0);
                            self.message = Some(format!("{}: {msg}", FIRST_BOOT_FIELDS[self.field_cursor]));
                        }
                    },
                    // Leaving the layout field accepts it: the next field is typed with it.
                    _ if was == 3 && self.field_cursor != 3 => match check_keymap(&self.config.keymap) {
                        Ok(()) => return Action::LoadKeymap(self.config.keymap.clone()),
                        Err(e) => self.message = Some(format!("{}: {e}", FIRST_BOOT_FIELDS[3])),
                    },
                    _ => {}
                }
            }
            Screen::LinuxUser => {
                Self::cursor(LINUX_USER_FIELDS.len(), &mut self.field_cursor, key);
                if key == Key::Enter {
                    self.linux_user_entered();
                }
            }
            Screen::Summary => {
                if key == Key::Enter {
                    let want = self.required_confirmation().unwrap_or_default();
                    if self.confirm_input.trim() == want {
                        self.progress = 0;
                        self.progress_lines.clear();
                        self.go(Screen::Installing);
                        return Action::Install;
                    }
                    self.message = Some(format!("Type exactly \"{want}\" to confirm, or Esc to go back."));
                }
            }
            Screen::Installing => {}
            Screen::Done => {
                if key == Key::Enter {
                    return Action::Reboot;
                }
            }
            Screen::Failed => {
                if key == Key::Enter {
                    return Action::Restart;
                }
            }
        }
        Action::None
    }

    /// The check box under the cursor on the first-boot screen.
    fn toggle_first_boot(&mut self) {
        let p = &mut self.config.policy;
        match self.field_cursor {
            4 => p.autostart_linux_hidden ^= true,
            5 => {
                p.linux_on_shutdown = match p.linux_on_shutdown {
                    OnShutdown::Save => OnShutdown::Shutdown,
                    OnShutdown::Shutdown => OnShutdown::Save,
                }
            }
            6 => {
                p.linux_network = match p.linux_network {
                    Network::Nat => Network::Off,
                    Network::Off => Network::Nat,
                }
            }
            _ => {}
        }
    }

    fn clear_passwords(&mut self) {
        self.password.clear();
        self.password_again.clear();
    }

    /// Enter on the "Linux user" step: the name checked, the password typed twice and the
    /// same, then hashed; an error names the field and puts the cursor on it.
    fn linux_user_entered(&mut self) {
        let fail = |w: &mut Self, field: usize, msg: String| {
            w.field_cursor = field;
            w.message = Some(format!("{}: {msg}", LINUX_USER_FIELDS[field]));
        };
        if let Err(e) = check_user_name(&self.linux_name) {
            return fail(self, 0, e);
        }
        if self.password.is_empty() {
            return fail(self, 1, "empty: type a password for the Linux user".into());
        }
        if self.password != self.password_again {
            self.clear_passwords();
            return fail(self, 1, "the two passwords differ: type the password again, twice".into());
        }
        match hash_password(&self.password) {
            Ok(password_hash) => {
                self.clear_passwords();
                self.config.linux_user = Some(LinuxUser { name: self.linux_name.clone(), password_hash });
                self.confirm_input.clear();
                self.go(Screen::Summary);
            }
            Err(e) => {
                self.clear_passwords();
                fail(self, 1, e)
            }
        }
    }

    /// One line per step: a step reports its percentage many times with the same text.
    pub fn on_progress(&mut self, pct: u8, line: &str) {
        self.progress = pct;
        if self.progress_lines.last().map(String::as_str) != Some(line) {
            self.progress_lines.push(line.to_string());
        }
    }

    pub fn on_finished(&mut self, result: Result<String, String>) {
        match result {
            Ok(summary) => {
                self.progress = 100;
                self.progress_lines.push(summary);
                self.go(Screen::Done);
            }
            Err(e) => {
                self.progress_lines.push(format!("ERROR: {e}"));
                self.go(Screen::Failed);
            }
        }
    }
}
