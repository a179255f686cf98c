//! rayosd, the PID 1 of RayOS. See ARCHITECTURE.md ("Console lines tests rely on").

mod pid1;

fn main() {
    // First thing: the boot timeline's "init start".
    let init_uptime_ms = rayosd::timeline::uptime_ms();
    if nix::unistd::getpid().as_raw() != 1 {
        eprintln!(
            "rayosd: must run as PID 1 (the kernel's /init); on an ordinary host use rayos-systemless"
        );
        std::process::exit(2);
    }
    pid1::boot(init_uptime_ms)
}
