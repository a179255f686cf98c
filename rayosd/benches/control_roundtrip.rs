//! Control API round trip against the real server on a real unix socket (server on its own
//! thread and single-threaded runtime, as in rayosd). Prints p50/p99 over 1000 calls.
//! Run: `cargo bench -p rayosd --bench control_roundtrip`. Target: p99 ≤ 2 ms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rayosd::client::Client;
use rayosd::api::{control, System, SystemStatus};
use rayosd::reaper::Reaper;
use rayosd::supervisor::{Limits, Supervisor};

fn main() {
    let dir = std::env::temp_dir().join(format!("rayosd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("control.sock");
    let sock2 = sock.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let system = Arc::new(System::new(
                Supervisor::new(Arc::new(Reaper::new()), Limits::default(), tx.clone()),
                SystemStatus { mode: "rescue".into(), ..Default::default() },
                tx,
            ));
            let l = control::bind(&sock2).unwrap();
            ready_tx.send(()).unwrap();
            control::serve(l, system).await;
        });
    });
    ready_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = Client::connect(&sock).await.unwrap();
        for _ in 0..100 {
            c.ping().await.unwrap();
        }
        for (name, n) in [("Ping", 1000), ("Status", 1000), ("ListServices", 1000)] {
            let mut t = Vec::with_capacity(n);
            for _ in 0..n {
                let s = Instant::now();
                match name {
                    "Ping" => drop(c.ping().await.unwrap()),
                    "Status" => drop(c.status().await.unwrap()),
                    _ => drop(c.services().await.unwrap()),
                }
                t.push(s.elapsed());
            }
            t.sort();
            let p = |q: f64| t[((t.len() as f64 * q).ceil() as usize).clamp(1, t.len()) - 1];
            println!("{name:<13} {n} calls: p50 {:>7.1} us  p99 {:>7.1} us  max {:>7.1} us", us(p(0.5)), us(p(0.99)), us(*t.last().unwrap()));
        }
        let s = Instant::now();
        let c2 = Client::connect(&sock).await.unwrap();
        c2.ping().await.unwrap();
        println!("connect + handshake + first call: {:.1} us", us(s.elapsed()));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
