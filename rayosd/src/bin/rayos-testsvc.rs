//! A test-only service rayosd starts when the kernel command line has
//! `rayos.testsvc=<scenario>`. Integration tests use it for what no real service does on
//! purpose: crash, leave orphans, call the API as a non-root user.
//!
//! Scenarios: `sleep` (runs until killed), `crashloop` (exits 1 at once), `orphans` (leaves 5
//! orphaned grandchildren that exit after 1 s, then sleeps), `nonroot` (as uid 65534, asks
//! for a power-off and reports the answer, then sleeps).

use std::time::Duration;

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    let pid = std::process::id();
    match scenario.as_str() {
        "sleep" => {
            println!("rayos-testsvc: sleeping pid={pid}");
            sleep_forever();
        }
        "crashloop" => {
            println!("rayos-testsvc: crashing pid={pid}");
            std::process::exit(1);
        }
        "orphans" => {
            use nix::unistd::{fork, ForkResult};
            // SAFETY: single-threaded here; the child only forks, sleeps and exits.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    for _ in 0..5 {
                        // SAFETY: as above.
                        if let Ok(ForkResult::Child) = unsafe { fork() } {
                            std::thread::sleep(Duration::from_secs(1));
                            std::process::exit(0);
                        }
                    }
                    // Exit at once: the grandchildren are re-parented to PID 1.
                    std::process::exit(0);
                }
                Ok(ForkResult::Parent { child }) => {
                    let _ = nix::sys::wait::waitpid(child, None);
                    println!("rayos-testsvc: left 5 orphans pid={pid}");
                    sleep_forever();
                }
                Err(e) => {
                    eprintln!("rayos-testsvc: fork: {e}");
                    std::process::exit(2);
                }
            }
        }
        "nonroot" => {
            let nobody = nix::unistd::Uid::from_raw(65534);
            if let Err(e) = nix::unistd::setgid(nix::unistd::Gid::from_raw(65534)).and_then(|_| nix::unistd::setuid(nobody)) {
                eprintln!("rayos-testsvc: cannot become uid 65534: {e}");
                std::process::exit(2);
            }
            let answer = rayosd::client::blocking::Client::connect(rayosd::api::control::SOCKET_PATH).and_then(|c| c.power_off());
            match answer {
                Err(rayosd::client::ClientError::AccessDenied(m)) => println!("rayos-testsvc: nonroot power_off refused: {m}"),
                Ok(()) => println!("rayos-testsvc: nonroot power_off ALLOWED"),
                Err(e) => println!("rayos-testsvc: nonroot power_off failed otherwise: {e}"),
            }
            sleep_forever();
        }
        other => {
            eprintln!("rayos-testsvc: unknown scenario {other:?} (sleep, crashloop, orphans, nonroot)");
            std::process::exit(2);
        }
    }
}
