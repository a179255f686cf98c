//! `rayos-systemless --state-dir DIR`: see the crate docs and README.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rayosd::api::{control, Access, System, SystemStatus};
use rayosd::reaper::Reaper;
use rayosd::supervisor::{Limits, Supervisor};
use rayosd::vm::{Paths, Settings, VmManager};
use systemless::kvm_check::{self, KvmVerdict};

#[derive(Parser)]
#[command(name = "rayos-systemless", version, about = "The RayOS VM supervisor and control API as an ordinary process")]
struct Args {
    /// Every file goes under here: registry/, vms/, run/, control.sock.
    #[arg(long)]
    state_dir: PathBuf,
    /// The control socket (default: STATE_DIR/control.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// rayos-vmm (default: next to this binary, else from PATH).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Start the VMs whose policy says autostart, as RayOS does at boot.
    #[arg(long)]
    autostart: bool,
    /// Exit with an error when host KVM cannot run guests (default: warn and go on).
    #[arg(long)]
    require_kvm: bool,
    /// Skip the host KVM check.
    #[arg(long)]
    no_kvm_check: bool,
    /// How long a guest gets to power off when systemless stops.
    #[arg(long, default_value_t = 20)]
    stop_timeout_secs: u64,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(kvm_check::PROBE_ARG) {
        kvm_check::probe_child();
    }
    let args = Args::parse();
    rayosd::log::sink().set_stderr(true);
    rayosd::log::init_tracing(tracing::Level::INFO);
    let exe = std::env::current_exe().context("finding this binary")?;

    // Before the reaper exists: it would take the probe child's exit status.
    if !args.no_kvm_check {
        match kvm_check::check(&exe, Duration::from_secs(3)) {
            KvmVerdict::Works { ms } => println!("rayos-systemless: host KVM runs guests (probe guest came back in {ms} ms)"),
            KvmVerdict::Unusable(why) => {
                println!("rayos-systemless: host KVM does NOT run guests: {why}");
                println!("rayos-systemless: VMs started here will fail (the VMM reports no progress); run RayOS in QEMU for real guests");
                if args.require_kvm {
                    bail!("--require-kvm: host KVM cannot run guests");
                }
            }
        }
    }

    let vmm = match &args.vmm {
        Some(p) => p.clone(),
        None => {
            let sibling = exe.with_file_name("rayos-vmm");
            if sibling.is_file() { sibling } else { PathBuf::from("rayos-vmm") }
        }
    };
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let state_dir = std::path::absolute(&args.state_dir)?;
    let socket = args.socket.clone().unwrap_or_else(|| state_dir.join("control.sock"));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let reaper = Arc::new(Reaper::new());
        {
            let r = reaper.clone();
            tokio::spawn(async move { r.run().await });
        }
        let mut settings = Settings::new(vmm.clone(), Paths::under(&state_dir));
        settings.stop_timeout = Duration::from_secs(args.stop_timeout_secs);
        let mgr = VmManager::open(reaper.clone(), settings).context("opening the VM registry")?;

        let (power_tx, mut power_rx) = tokio::sync::mpsc::unbounded_channel();
        let supervisor = Supervisor::new(reaper.clone(), Limits::default(), power_tx.clone());
        let status = SystemStatus { mode: "systemless".into(), ..Default::default() };
        // systemless runs as an ordinary user: that user may change things, as root may.
        let system = Arc::new(System::new(supervisor, status, power_tx).with_access(Access::root_or_this_user()));
        system.set_vms(mgr.clone());
        let listener = control::bind(&socket)?;
        tokio::spawn(control::serve(listener, system));
        println!(
            "rayos-systemless: ready socket={} state={} vmm={} vms={}",
            socket.display(),
            state_dir.display(),
            vmm.display(),
            mgr.list().len()
        );
        if args.autostart {
            mgr.autostart();
        }
        wait_for_end(&mut power_rx).await?;
        stop(&mgr, Duration::from_secs(args.stop_timeout_secs)).await;
        let _ = std::fs::remove_file(&socket);
        anyhow::Ok(())
    })
}

/// SIGINT, SIGTERM, or PowerOff/Reboot on the API (which here end systemless, not the host).
async fn wait_for_end(power_rx: &mut tokio::sync::mpsc::UnboundedReceiver<rayosd::power::PowerAction>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        a = power_rx.recv() => tracing::info!("{:?} requested: systemless stops (the host is not touched)", a),
    }
    Ok(())
}

async fn stop(mgr: &VmManager, timeout: Duration) {
    mgr.shutdown_all(timeout).await;
    println!("rayos-systemless: stopped");
}
