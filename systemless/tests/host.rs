//! rayos-systemless as a user runs it on a development host: it checks host KVM and says
//! what it found, serves the control API with the VM interface under --state-dir, keeps the
//! registry there, and stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rayosd::vm::cli::Vms1Proxy;

#[tokio::test(flavor = "current_thread")]
async fn serves_the_vm_api_from_a_state_folder_and_reports_host_kvm() {
    let dir = std::env::temp_dir().join(format!("systemless-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rayos-systemless"))
        .arg("--state-dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        assert!(out.read_line(&mut l).unwrap() > 0, "systemless ended early: {lines:?}");
        let ready = l.contains("ready socket=");
        lines.push(l);
        if ready {
            break;
        }
    }
    let all = lines.concat();
    // The builder's probe (`kvm_probe::check`, the one that picks QEMU's accelerator), run on
    // its own, decides which verdict this host must get; systemless must give that one, and
    // say why when KVM is unusable.
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_rayos-systemless"));
    match kvm_probe::check(exe, "--kvm-probe-child", kvm_probe::DEFAULT_TIMEOUT) {
        kvm_probe::Verdict::Works { .. } => {
            assert!(all.contains("rayos-systemless: host KVM runs guests"), "the probe says KVM works here:\n{all}")
        }
        kvm_probe::Verdict::Unusable(why) => {
            assert!(all.contains("rayos-systemless: host KVM does NOT run guests: "), "the probe says KVM is unusable ({why}):\n{all}");
            assert!(!all.contains("host KVM runs guests"), "{all}");
            if !std::path::Path::new("/dev/kvm").exists() {
                assert!(all.contains("there is no /dev/kvm"), "{all}");
            } else if why.contains("vmx/svm") {
                // The build machines: /dev/kvm is kvm_pvm, named by the missing CPU flag.
                assert!(all.contains("vmx/svm"), "{all}");
            }
        }
    }

    let sock = dir.join("control.sock");
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let conn = zbus::connection::Builder::unix_stream(stream).p2p().build().await.unwrap();
    let vms = Vms1Proxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await.unwrap();
    assert!(vms.list_vms().await.unwrap().is_empty());
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, b"k").unwrap();
    let req = serde_json::json!({
        "name": "dev",
        "disks": [{"path": dir.join("missing.img")}],
        "config": {"vcpus": 1, "memory_mib": 128, "kernel": kernel},
    });
    let info = vms.create_vm(&req.to_string()).await.unwrap();
    assert_eq!(info.state, "stopped");
    vms.start_vm("dev", false).await.unwrap();
    let mut state = String::new();
    for _ in 0..100 {
        let i = vms.get_vm("dev").await.unwrap();
        state = format!("{} {}", i.state, i.detail);
        if i.state == "broken" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(state.starts_with("broken") && state.contains("missing.img"), "{state}");
    // The registry lives in the state folder, with the VM's UUID.
    let reg = std::fs::read_to_string(dir.join("registry/vms.json")).unwrap();
    assert!(reg.contains(&info.id), "{reg}");

    nix_kill(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "control socket left behind");
}

fn nix_kill(pid: u32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}
