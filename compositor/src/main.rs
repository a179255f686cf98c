//! rayos-compositor: started and supervised by rayosd in installed and rescue modes.
//!
//! `--headless-render OUT.ppm --size WxH` draws the home screen from VMs given on the command
//! line, without DRM or rayosd, so layout and font can be checked anywhere.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use compositor::canvas::Canvas;
use compositor::font::Text;
use compositor::home::{self, Home, VmEntry};

#[derive(Parser, Debug)]
#[command(name = "rayos-compositor", about = "The RayOS screen: home screen, present/hide, keyboard and mouse routing")]
struct Args {
    /// rayosd's control socket.
    #[arg(long, default_value = "/run/rayos/control.sock")]
    socket: PathBuf,
    /// Where DRM cards are.
    #[arg(long, default_value = "/dev/dri")]
    dri: PathBuf,
    /// Where evdev devices are.
    #[arg(long, default_value = "/dev/input")]
    input: PathBuf,
    /// Render the home screen to this PPM file and exit (no DRM, no rayosd).
    #[arg(long)]
    headless_render: Option<PathBuf>,
    /// Size for --headless-render, WxH.
    #[arg(long, default_value = "1920x1080")]
    size: String,
    /// Machine name for --headless-render.
    #[arg(long, default_value = "rayos")]
    machine_name: String,
    /// A VM for --headless-render: NAME:KIND:STATE[:nodisplay]; repeat for more.
    #[arg(long = "vm")]
    vms: Vec<String>,
    /// The clock for --headless-render, seconds since the epoch (default: now).
    #[arg(long)]
    time: Option<u64>,
}

fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let (w, h) = s.split_once('x').with_context(|| format!("--size {s:?}: expected WxH"))?;
    let (w, h): (u32, u32) = (w.parse().with_context(|| format!("--size {s:?}: width"))?, h.parse().with_context(|| format!("--size {s:?}: height"))?);
    if !(64..=8192).contains(&w) || !(64..=8192).contains(&h) {
        bail!("--size {s:?}: each side must be 64..=8192");
    }
    Ok((w, h))
}

fn parse_vm(s: &str) -> anyhow::Result<VmEntry> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [name, kind, state] | [name, kind, state, "nodisplay"] => {
            Ok(VmEntry { name: name.to_string(), kind: kind.to_string(), state: state.to_string(), has_display: parts.len() == 3, nat: false, guest_booting: false })
        }
        _ => bail!("--vm {s:?}: expected NAME:KIND:STATE[:nodisplay]"),
    }
}

fn headless(args: &Args, out: &PathBuf) -> anyhow::Result<()> {
    let (w, h) = parse_size(&args.size)?;
    let vms = args.vms.iter().map(|v| parse_vm(v)).collect::<anyhow::Result<Vec<_>>>()?;
    let clock = compositor::clock::format_utc(args.time.unwrap_or_else(compositor::clock::now_secs));
    let home = Home { machine_name: args.machine_name.clone(), clock, vms, ..Default::default() };
    let mut canvas = Canvas::new(w, h);
    for item in home::render(&home, &mut Text::new(), &mut canvas) {
        println!("{item}");
    }
    std::fs::write(out, canvas.to_ppm()).with_context(|| format!("writing {}", out.display()))
}

use tracing_subscriber::fmt::writer::MakeWriterExt;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // rayosd logs a service's stdout at info and its stderr at warn, stamping each line
        // itself: warnings and errors to stderr, the rest to stdout, no time here.
        .with_writer(std::io::stderr.with_max_level(tracing::Level::WARN).or_else(std::io::stdout))
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .init();
    if let Some(out) = &args.headless_render {
        return headless(&args, out);
    }
    tracing::info!("{}", privileges());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let r = local.block_on(&rt, compositor::app::run(args.socket, args.dri, args.input));
    // The D-Bus connection's tasks need the runtime while they are dropped.
    let _rt = rt.enter();
    drop(local);
    r
}

/// Who this process runs as, from the kernel's own view (`/proc/self/status`): rayosd starts
/// the compositor as its own unprivileged user; the log line says so, and tests read it.
fn privileges() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.split_whitespace().next().unwrap_or("?").to_string());
    format!(
        "running as uid {} gid {}, effective capabilities {}",
        field("Uid:").unwrap_or_else(|| "?".into()),
        field("Gid:").unwrap_or_else(|| "?".into()),
        field("CapEff:").unwrap_or_else(|| "?".into())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_by_name() {
        assert_eq!(parse_size("1280x800").unwrap(), (1280, 800));
        assert!(parse_size("1280").unwrap_err().to_string().contains("WxH"));
        assert!(parse_size("10x10").is_err());
        let v = parse_vm("win:windows:stopped:nodisplay").unwrap();
        assert!(!v.has_display && v.state == "stopped");
        assert!(parse_vm("debian:linux").unwrap_err().to_string().contains("NAME:KIND:STATE"));
    }
}
