//! Draws the wizard. Made for a dumb 80x24 serial terminal: no colour is needed to read it
//! (selection is marked with "> " and reverse video), no mouse, every key shown in the footer.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use ratatui::Frame;

use super::state::{Screen, Wizard, FIRST_BOOT_FIELDS, LINUX_USER_FIELDS, VM_CHOICES};
use crate::config::{Network, OnShutdown};
use crate::disks::human_size;

fn selectable(selected: bool, text: String) -> Line<'static> {
    if selected {
        Line::from(Span::styled(format!("> {text}"), Style::default().add_modifier(Modifier::REVERSED)))
    } else {
        Line::from(format!("  {text}"))
    }
}

fn keys(screen: &Screen) -> &'static str {
    match screen {
        Screen::Welcome => "Enter: start",
        Screen::Disks | Screen::Target => "Up/Down: choose  Enter: next  Esc: back",
        Screen::Filesystem => "Enter: next  Esc: back",
        Screen::VmStorage => "Up/Down: choose  type: edit field  Enter: next  Esc: back",
        Screen::FirstBoot => "Up/Down/Tab: field  type/Backspace: edit  Space: toggle  Enter: next  Esc: back",
        Screen::LinuxUser => "Up/Down/Tab: field  type/Backspace: edit  Enter: next  Esc: back",
        Screen::Summary => "type the confirmation  Enter: install  Esc: back",
        Screen::Installing => "please wait",
        Screen::Done => "Enter: reboot (remove the USB stick)",
        Screen::Failed => "Enter: start over",
    }
}

/// `note`: shown instead of the keys on a console that does not drive the wizard.
pub fn render(f: &mut Frame, w: &Wizard, note: Option<&str>) {
    let area = f.area();
    let [title, body, msg, footer] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(2), Constraint::Length(1)])
            .areas(area);
    f.render_widget(
        Paragraph::new(format!("RayOS installer - {}", w.screen.title())).style(Style::default().add_modifier(Modifier::BOLD)),
        title,
    );
    match note {
        Some(n) => f.render_widget(Paragraph::new(n.to_string()).style(Style::default().add_modifier(Modifier::BOLD)), footer),
        None => f.render_widget(Paragraph::new(keys(&w.screen)), footer),
    }
    if let Some(m) = &w.message {
        f.render_widget(Paragraph::new(format!("! {m}")).wrap(Wrap { trim: true }), msg);
    }
    let block = Block::default().borders(Borders::TOP);
    let inner = block.inner(body);
    f.render_widget(block, body);
    match w.screen {
        Screen::Installing | Screen::Done | Screen::Failed => progress(f, w, inner),
        _ => f.render_widget(Paragraph::new(lines(w)).wrap(Wrap { trim: false }), inner),
    }
}

fn progress(f: &mut Frame, w: &Wizard, area: Rect) {
    let [gauge, log] = Layout::vertical([Constraint::Length(2), Constraint::Min(1)]).areas(area);
    f.render_widget(Paragraph::new(progress_bar(w.progress, gauge.width)), gauge);
    let rows = log_rows(&w.progress_lines, log.width as usize, log.height as usize);
    f.render_widget(Paragraph::new(rows.into_iter().map(Line::from).collect::<Vec<_>>()), log);
}

/// The last `height` rows of the install log, each line wrapped at `width` with its further rows
/// indented, so a long line (the ESP's file list, an error) is read whole and the newest line
/// stays at the bottom. Wrapped here rather than by `Paragraph`, which cannot say how many rows
/// a wrapped line takes, and so which lines fit.
pub fn log_rows(lines: &[String], width: usize, height: usize) -> Vec<String> {
    let opts = textwrap::Options::new(width.max(10)).subsequent_indent("  ");
    let mut rows: Vec<String> = Vec::new();
    for line in lines.iter().rev() {
        if rows.len() >= height {
            break;
        }
        rows.extend(textwrap::wrap(line, &opts).into_iter().rev().map(|r| r.into_owned()));
    }
    rows.truncate(height);
    rows.reverse();
    rows
}

/// `[#####.....]  45%`: plain characters, readable on any terminal, the percentage beside the
/// bar rather than on it.
pub fn progress_bar(pct: u8, width: u16) -> String {
    let pct = pct.min(100) as usize;
    let inner = (width as usize).saturating_sub(8).max(10);
    let done = inner * pct / 100;
    format!("[{}{}] {pct:>3}%", "#".repeat(done), ".".repeat(inner - done))
}

fn lines(w: &Wizard) -> Vec<Line<'static>> {
    let mut out: Vec<Line> = Vec::new();
    match w.screen {
        Screen::Welcome => {
            out.push("Welcome to RayOS.".into());
            out.push("".into());
            out.push("This installs RayOS onto a disk of this machine: a boot partition, the".into());
            out.push("RayOS data volume, and a UEFI boot entry. Nothing is written until you".into());
            out.push("type the confirmation on the summary screen.".into());
        }
        Screen::Disks => {
            out.push(format!("{} disk(s) found. The boot medium is listed but cannot be chosen.", w.disks.len()).into());
            for (i, d) in w.disks.iter().enumerate() {
                let state = if d.eligible() {
                    String::new()
                } else {
                    format!("  [not usable: {}]", d.ineligible.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "))
                };
                out.push(selectable(i == w.disk_cursor, format!("{}{state}", d.describe())));
                if d.partitions.is_empty() {
                    out.push(Line::from("      no partitions"));
                }
                for p in &d.partitions {
                    out.push(Line::from(format!("      {}", p.describe())));
                }
            }
        }
        Screen::Target => {
            if let Some(d) = w.disk() {
                out.push(format!("Where on {} ?", d.describe()).into());
            }
            for (i, (_, label)) in w.targets().into_iter().enumerate() {
                out.push(selectable(i == w.target_cursor, label));
            }
        }
        Screen::Filesystem => {
            out.push("Filesystem of the RayOS data volume:".into());
            out.push(selectable(true, "ext4 (the only choice for now)".into()));
        }
        Screen::VmStorage => {
            out.push("Where the Linux and Windows VM disks live:".into());
            for (i, c) in VM_CHOICES.iter().enumerate() {
                let field = match i {
                    1 => format!(" [{}]", w.vm_size),
                    2 => format!(" [{}]", w.vm_path),
                    _ => String::new(),
                };
                out.push(selectable(i == w.vm_cursor, format!("{c}{field}")));
            }
        }
        Screen::FirstBoot => {
            let c = &w.config;
            let yn = |b: bool| if b { "[x]" } else { "[ ]" }.to_string();
            let values = [
                c.hostname.clone(),
                c.timezone.clone(),
                c.locale.clone(),
                c.keymap.clone(),
                yn(c.policy.autostart_linux_hidden),
                yn(c.policy.linux_on_shutdown == OnShutdown::Save),
                yn(c.policy.linux_network == Network::Nat),
            ];
            let width = FIRST_BOOT_FIELDS.iter().map(|f| f.len()).max().unwrap_or(0);
            for (i, (name, v)) in FIRST_BOOT_FIELDS.iter().zip(values).enumerate() {
                out.push(selectable(i == w.field_cursor, format!("{name:<width$} {v}")));
            }
            out.push("".into());
            // What the box means is not obvious from its label: say what each answer does.
            out.push(Line::from(match c.policy.linux_on_shutdown {
                OnShutdown::Save => "Linux is saved when RayOS shuts down and resumes where it was at the next boot.",
                OnShutdown::Shutdown => "Linux is shut down with RayOS and boots afresh at the next boot.",
            }));
            out.push(Line::from(match c.policy.linux_network {
                Network::Nat => "Linux reaches the network through RayOS (NAT); nothing outside reaches it.",
                Network::Off => "Linux has no network card.",
            }));
            keymap_problem(w, &mut out);
        }
        Screen::LinuxUser => {
            out.push("The user of the Linux VM (Debian), with sudo rights. Root gets no password:".into());
            out.push("log in as this user. The password is not shown as you type it.".into());
            out.push("".into());
            // The passwords are not echoed, not even as stars: their length stays unknown.
            let values = [w.linux_name.clone(), String::new(), String::new()];
            for (i, (name, v)) in LINUX_USER_FIELDS.iter().zip(values).enumerate() {
                out.push(selectable(i == w.field_cursor, format!("{name:<25} {v}")));
            }
            keymap_problem(w, &mut out);
        }
        Screen::Summary => {
            if let Some(plan) = &w.plan {
                for l in plan.describe() {
                    out.push(l.into());
                }
                out.push(format!("Data filesystem: ext4; VM storage: {}", vm_label(&plan.vm_storage)).into());
                out.push(
                    format!(
                        "Machine {} | {} | {} | keymap {}",
                        w.config.hostname, w.config.timezone, w.config.locale, w.config.keymap
                    )
                    .into(),
                );
                if let Some(u) = &w.config.linux_user {
                    out.push(format!("Linux VM user: {} (sudo); root is locked", u.name).into());
                }
                out.push(
                    match w.config.policy.linux_on_shutdown {
                        OnShutdown::Save => "Linux VM: kept running across reboots (saved at shutdown, resumed at boot)",
                        OnShutdown::Shutdown => "Linux VM: shut down with RayOS, boots afresh",
                    }
                    .into(),
                );
                out.push(
                    match w.config.policy.linux_network {
                        Network::Nat => "Linux VM network: NAT through RayOS",
                        Network::Off => "Linux VM network: none",
                    }
                    .into(),
                );
                out.push("".into());
                let want = w.required_confirmation().unwrap_or_default();
                out.push(format!("To go ahead, type: {want}").into());
                out.push(selectable(true, format!("{}_", w.confirm_input)));
            }
        }
        _ => {}
    }
    out
}

/// Where one types, a failed layout load stays in sight: a password typed on the screen follows
/// the layout the screen really has.
fn keymap_problem(w: &Wizard, out: &mut Vec<Line<'static>>) {
    if let Some(p) = &w.keymap_problem {
        out.push("".into());
        out.push(Line::from(Span::styled(format!("! {p}"), Style::default().add_modifier(Modifier::BOLD))));
    }
}

fn vm_label(v: &crate::plan::VmStorage) -> String {
    match v {
        crate::plan::VmStorage::DataVolume => "data volume".into(),
        crate::plan::VmStorage::DedicatedPartition { size_bytes } => format!("dedicated partition, {}", human_size(*size_bytes)),
        crate::plan::VmStorage::Path(p) => p.clone(),
    }
}
