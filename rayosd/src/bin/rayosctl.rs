//! rayosctl: drives rayosd's control API (or systemless's, or a RayOS in QEMU through the
//! virtio-serial bridge with `--socket HOST_SOCKET`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rayosd::client::{Client, ClientError};
use rayosd::api::control::SOCKET_PATH;
use rayosd::api::SystemStatus;
use rayosd::log::LogRecord;
use rayosd::supervisor::ServiceInfo;

const EXIT_CODES: &str = "Exit codes: 0 success, 1 the call failed, 2 bad usage, 3 cannot connect, \
4 access denied (needs root), 5 no such service, 6 invalid argument, 7 no such VM, \
8 refused (the VM's state does not allow it), 9 no VM supervisor (not installed mode), \
10 timed out (a --wait ran out; the request was made), 11 not supported yet (e.g. vm start --fresh, \
Windows VMs).";

#[derive(Parser)]
#[command(name = "rayosctl", version, about = "Control RayOS: status, services, logs, power", after_help = EXIT_CODES)]
struct Cli {
    /// The control socket (a host-side QEMU chardev socket works too).
    #[arg(long, global = true, env = "RAYOS_CONTROL_SOCKET", default_value = SOCKET_PATH)]
    socket: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Give up when the system does not answer within this many seconds (0 = wait forever;
    /// `logs -f` is never cut short).
    #[arg(long, global = true, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// System status: mode, uptime, data volume, memory.
    Status,
    /// List services and their states.
    Services,
    /// Show or change one service.
    Service {
        #[command(subcommand)]
        action: ServiceCmd,
    },
    /// Show the log (`-f` to follow).
    Logs {
        /// How many lines.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: u32,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
    },
    /// Measure API round trips.
    Ping {
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Orderly power-off.
    Poweroff,
    /// Orderly reboot.
    Reboot,
    /// Show a VM on the screen and route the keyboard and mouse to it (starts it if stopped).
    Present { vm: String },
    /// Back to the home screen.
    Hide,
    /// Which VM the screen shows ("home" for the home screen).
    Presented,
    /// The machine's network: `net status` (wired uplinks, addresses, gateway, DNS).
    Net {
        #[command(subcommand)]
        action: NetCmd,
    },
    /// VMs: list, create, start, stop, pause, resume, delete, logs.
    Vm {
        #[command(subcommand)]
        action: rayosd::vm::cli::VmCmd,
    },
}

#[derive(Subcommand)]
enum NetCmd {
    /// Each wired interface: carrier, DHCP state, address, gateway, DNS servers, lease.
    Status,
}

#[derive(Subcommand)]
enum ServiceCmd {
    Show { name: String },
    Start { name: String },
    Stop { name: String },
    /// Restart now (also clears a crash loop).
    Restart { name: String },
    /// Send a signal to the service's process.
    Kill {
        name: String,
        #[arg(short, long, default_value = "TERM")]
        signal: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rayosctl: {e}");
            return ExitCode::from(1);
        }
    };
    // `logs -f` runs until interrupted; `vm start --wait` has its own deadline. Everything
    // else gives up after --timeout rather than hang on a control channel that went quiet.
    let follow = matches!(
        cli.cmd,
        Cmd::Logs { follow: true, .. }
            | Cmd::Vm { action: rayosd::vm::cli::VmCmd::Start { wait: Some(_), .. } | rayosd::vm::cli::VmCmd::Stop { wait: Some(_), .. } }
    );
    let result = rt.block_on(async {
        if cli.timeout == 0 || follow {
            return run(&cli).await;
        }
        match tokio::time::timeout(Duration::from_secs(cli.timeout), run(&cli)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Connect {
                path: cli.socket.clone().into(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {} s", cli.timeout)),
            }),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "error": e.to_string(), "exit_code": exit_code(&e) }));
            }
            eprintln!("rayosctl: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Connect { .. } | ClientError::Handshake { .. } | ClientError::Session { .. } => 3,
        ClientError::AccessDenied(_) => 4,
        ClientError::NoSuchService(_) => 5,
        ClientError::InvalidArgument(_) => 6,
        ClientError::NoSuchVm(_) => 7,
        ClientError::Refused(_) => 8,
        ClientError::Unavailable(_) => 9,
        ClientError::TimedOut(_) => 10,
        ClientError::NotSupported(_) => 11,
        ClientError::Call(_) | ClientError::VmEnded(_) => 1,
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: &Cli) -> Result<(), ClientError> {
    // One connection only: the virtio-serial bridge serves one session at a time.
    if let Cmd::Vm { action } = &cli.cmd {
        return rayosd::vm::cli::run(&cli.socket, cli.json, action).await;
    }
    let c = Client::connect(&cli.socket).await?;
    match &cli.cmd {
        Cmd::Net { action: NetCmd::Status } => {
            let n = c.net_status().await?;
            if cli.json { print_json(&n) } else { print_net(&n) }
        }
        Cmd::Status => {
            let s = c.status().await?;
            if cli.json { print_json(&s) } else { print_status(&s) }
        }
        Cmd::Services => {
            let list = c.services().await?;
            if cli.json {
                print_json(&list)
            } else {
                println!("{:<16} {:<11} {:>7} {:>8}  LAST EXIT", "SERVICE", "STATE", "PID", "RESTARTS");
                for s in &list {
                    print_service_row(s);
                }
            }
        }
        Cmd::Service { action } => match action {
            ServiceCmd::Show { name } => {
                let s = c.service(name).await?;
                if cli.json {
                    print_json(&s)
                } else {
                    println!("{}: {} pid={} restarts={} command: {}", s.name, s.state.as_str(), s.pid, s.restarts, s.command);
                    if !s.last_exit.is_empty() {
                        println!("last exit: {}", s.last_exit);
                    }
                }
            }
            ServiceCmd::Start { name } => done(cli, c.start_service(name).await?, &format!("started {name}")),
            ServiceCmd::Stop { name } => done(cli, c.stop_service(name).await?, &format!("stopping {name}")),
            ServiceCmd::Restart { name } => done(cli, c.restart_service(name).await?, &format!("restarting {name}")),
            ServiceCmd::Kill { name, signal } => {
                let hit = c.signal_service(name, signal).await?;
                if cli.json {
                    print_json(&serde_json::json!({ "signalled": hit }))
                } else if hit {
                    println!("sent {signal} to {name}")
                } else {
                    println!("{name} is not running; nothing signalled")
                }
            }
        },
        Cmd::Logs { lines, follow } => {
            let mut last = 0;
            for r in c.log_tail(*lines).await? {
                last = r.seq;
                print_log(cli, &r);
            }
            if *follow {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    for r in c.log_since(last).await? {
                        last = r.seq;
                        print_log(cli, &r);
                    }
                }
            }
        }
        Cmd::Ping { count } => {
            let mut times = Vec::with_capacity(*count as usize);
            for _ in 0..(*count).max(1) {
                let t = Instant::now();
                c.ping().await?;
                times.push(t.elapsed());
            }
            times.sort();
            let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
            let (p50, p99) = (pct(0.50), pct(0.99));
            if cli.json {
                print_json(&serde_json::json!({ "count": times.len(), "p50_us": p50.as_micros(), "p99_us": p99.as_micros(), "max_us": times.last().unwrap().as_micros() }))
            } else {
                println!("{} calls: p50 {:?} p99 {:?} max {:?}", times.len(), p50, p99, times.last().unwrap());
            }
        }
        Cmd::Poweroff => done(cli, c.power_off().await?, "powering off"),
        Cmd::Reboot => done(cli, c.reboot().await?, "rebooting"),
        Cmd::Present { vm } => done(cli, c.present(vm).await?, &format!("presenting {vm}")),
        Cmd::Hide => done(cli, c.hide().await?, "home screen"),
        Cmd::Presented => {
            let vm = c.presented().await?;
            if cli.json {
                print_json(&serde_json::json!({ "presented": vm }))
            } else {
                println!("{}", if vm.is_empty() { "home" } else { &vm });
            }
        }
        Cmd::Vm { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

fn done(cli: &Cli, _: (), msg: &str) {
    if cli.json {
        print_json(&serde_json::json!({ "ok": true }))
    } else {
        println!("{msg}")
    }
}

fn print_net(n: &rayosd::api::net::NetInfo) {
    if n.service != "running" {
        println!("network service: {}", n.service);
        return;
    }
    if n.uplinks.is_empty() {
        println!("no wired network interface (Wi-Fi is not supported yet)");
    }
    print_nat(&n.nat);
    for u in &n.uplinks {
        let driver = if u.driver.is_empty() { "?" } else { &u.driver };
        println!("{}  {driver}  {}  cable {}  {}", u.name, u.mac, if u.carrier { "in" } else { "out" }, u.state);
        if !u.address.is_empty() {
            let gw = if u.gateway.is_empty() { "none" } else { &u.gateway };
            let dns = if u.dns.is_empty() { "none".to_string() } else { u.dns.join(" ") };
            println!("    address {}  gateway {gw}  dns {dns}{}", u.address, if u.domain.is_empty() { String::new() } else { format!("  domain {}", u.domain) });
            println!("    lease {} s from {}, {} s left", u.lease_secs, u.server, u.expires_in_secs);
            if !u.gateway.is_empty() {
                match u.gateway_rtt_us {
                    0 => println!("    the gateway has not answered a ping"),
                    us => println!("    the gateway answers a ping in {:.1} ms", us as f64 / 1000.0),
                }
            }
        }
        if !u.problem.is_empty() {
            println!("    problem: {}", u.problem);
        }
    }
}

fn print_nat(n: &rayosd::api::net::NatInfo) {
    let leases: Vec<String> = n.leases.iter().map(|l| format!("{} → {} ({} s left)", l.mac, l.address, l.expires_in_secs)).collect();
    println!(
        "VMs' network (nat): {} {}, DHCP answered {} refused {}, DNS answered {} failed {}",
        n.gateway,
        if n.ready { "ready" } else { "not ready" },
        n.dhcp_answered,
        n.dhcp_refused,
        n.dns_answered,
        n.dns_failed
    );
    if !leases.is_empty() {
        println!("    leases: {}", leases.join(", "));
    }
    if !n.problem.is_empty() {
        println!("    problem: {}", n.problem);
    }
}

fn print_status(s: &SystemStatus) {
    println!("RayOS {} — mode {}", s.version, s.mode);
    if !s.rescue_reason.is_empty() {
        println!("rescue because: {}", s.rescue_reason);
    }
    println!("uptime: {:.1} s (init at {} ms, ready at {} ms)", s.uptime_ms as f64 / 1000.0, s.init_uptime_ms, s.ready_uptime_ms);
    if !s.boot_entry.is_empty() {
        println!("boot entry: {}", s.boot_entry);
    }
    println!("data volume: {}", if s.data_device.is_empty() { "not mounted" } else { &s.data_device });
    println!("watchdog: {}", if s.watchdog.is_empty() { "none" } else { &s.watchdog });
    println!("rayosd memory: {} KiB; orphans reaped: {}; zombies: {}", s.rss_kib, s.orphans_reaped, s.zombies);
    if s.shutting_down {
        println!("shutting down");
    }
}

fn print_service_row(s: &ServiceInfo) {
    let pid = if s.pid == 0 { "-".to_string() } else { s.pid.to_string() };
    println!("{:<16} {:<11} {:>7} {:>8}  {}", s.name, s.state.as_str(), pid, s.restarts, s.last_exit);
}

fn print_log(cli: &Cli, r: &LogRecord) {
    if cli.json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    } else {
        println!("[{:>6}.{:03}] {}", r.uptime_ms / 1000, r.uptime_ms % 1000, r.render());
    }
}
