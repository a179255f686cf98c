//! `rayos-vmm --spec vm.json` (or `--restore <snapshot dir>`): runs one VM and exits with its outcome:
//! 0 = the guest powered off, 10 = the guest rebooted (start it again), 1 = error,
//! 12 = `--restore` refused the saved state (nothing ran), 31 = killed by the seccomp filter.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use vmm::spec::VmSpec;
use rayos_proto::vmm::{exit_code, Event, FromVmm};
use std::os::unix::net::UnixStream;
use vmm::{ExitReason, Vmm};

#[derive(Parser)]
#[command(name = "rayos-vmm", about = "RayOS KVM virtual machine monitor (one VM per process)")]
struct Args {
    /// The VM spec (JSON).
    #[arg(long, required_unless_present = "restore", conflicts_with = "restore")]
    spec: Option<PathBuf>,
    /// Continue the VM saved in this snapshot directory (the `snapshot` control command's
    /// `path`), with the spec saved there.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// With --restore: keep the vCPUs paused until the control socket's `resume`.
    #[arg(long, requires = "restore")]
    paused: bool,
    /// One end of a socketpair the supervisor made, inherited as this fd: the VMM pushes its
    /// events over it and answers requests on it (rayos_proto::vmm::FromVmm / Envelope).
    #[arg(long, value_name = "FD")]
    control_fd: Option<i32>,
    /// One end of a SOCK_SEQPACKET socketpair, inherited as this fd: the display channel to
    /// the compositor (framebuffer, damage, LEDs out; input in; rayos_proto::display). The VM
    /// must have a display.
    #[arg(long, value_name = "FD")]
    display_fd: Option<i32>,
}

fn main() {
    let start = Instant::now();
    let inherited = vmm::isolation::inherited_fds();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAYOS_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    // The supervisor connection and the display channel are inherited on purpose: isolation
    // must not close them.
    let mut inherited = inherited;
    for fd in [args.control_fd, args.display_fd].into_iter().flatten() {
        inherited.remove(&fd);
    }
    let supervisor = match args.control_fd.map(vmm::events::from_fd).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rayos-vmm: error: {e}");
            std::process::exit(exit_code::ERROR);
        }
    };
    match run(&args, start, &inherited, supervisor) {
        Ok(reason) => {
            match &reason {
                ExitReason::PowerOff => eprintln!("rayos-vmm: guest powered off"),
                ExitReason::Reboot(why) => eprintln!("rayos-vmm: guest rebooted ({why})"),
                ExitReason::Failed(why) => eprintln!("rayos-vmm: error: {why}"),
                ExitReason::GuestHung(why) => eprintln!("rayos-vmm: guest hung: {why}"),
            }
            std::process::exit(reason.exit_code());
        }
        Err(Failure::Rejected(reason, supervisor)) => {
            eprintln!("rayos-vmm: saved state refused: {reason}");
            if let Some(mut s) = supervisor {
                use std::io::Write;
                let event = Event::Exiting { code: exit_code::STATE_REJECTED, reason };
                let _ = s.write_all(rayos_proto::vmm::to_line(&FromVmm::Event { event }).as_bytes());
            }
            std::process::exit(exit_code::STATE_REJECTED);
        }
        Err(Failure::Other(e)) => {
            eprintln!("rayos-vmm: error: {e:#}");
            std::process::exit(exit_code::ERROR);
        }
    }
}

enum Failure {
    /// `--restore` refused the saved state (the reason names file, field, saved and found
    /// values); the supervisor connection, not yet served, still to be told.
    Rejected(String, Option<UnixStream>),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(e.into())
    }
}

fn run(
    args: &Args,
    start: Instant,
    inherited: &std::collections::BTreeSet<i32>,
    supervisor: Option<UnixStream>,
) -> Result<ExitReason, Failure> {
    let vmm = match (&args.spec, &args.restore) {
        (_, Some(dir)) => {
            let restored = vmm::snapshot::load(dir).and_then(|snap| Vmm::restore(&snap, start));
            let vmm = match restored {
                Ok(vmm) => vmm,
                Err(e) if e.rejects_state() => return Err(Failure::Rejected(format!("snapshot {}: {e}", dir.display()), supervisor)),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("restoring {}", dir.display())).into()),
            };
            if args.paused {
                vmm.shared().control.set_paused(true);
            }
            vmm
        }
        (Some(spec), None) => Vmm::build(VmSpec::from_file(spec)?, start).context("setting up the VM")?,
        (None, None) => return Err(anyhow::anyhow!("give --spec or --restore").into()),
    };
    let display = args.display_fd.map(vmm::display_channel::from_fd).transpose()?;
    Ok(vmm.run(inherited, supervisor, display)?)
}
