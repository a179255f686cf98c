//! What the control-API tests share.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A fresh directory for one test's socket that non-root callers can reach.
pub fn socket_dir(prefix: &str, tag: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs rayosctl (as `uid` when given) with its exit status from a reaper: in these test
/// processes the servers' reapers own every wait, so `Command::output` would lose it (ECHILD).
pub async fn rayosctl(args: &[&str], uid: Option<u32>) -> (Option<i32>, String, String) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rayosctl"));
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    if let Some(u) = uid {
        cmd.uid(u).gid(u);
    }
    let mut child = cmd.spawn().unwrap();
    let exit = rayosd::reaper::Reaper::new().watch(child.id());
    let (o, e) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read_all = |mut r: Box<dyn Read + Send>| {
        tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (out, err) = (read_all(Box::new(o)), read_all(Box::new(e)));
    let code = match tokio::time::timeout(Duration::from_secs(30), exit).await.unwrap().unwrap() {
        rayosd::reaper::ExitKind::Exited(c) => Some(c),
        rayosd::reaper::ExitKind::Signaled(_) => None,
    };
    (code, out.await.unwrap(), err.await.unwrap())
}
