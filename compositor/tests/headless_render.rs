//! `rayos-compositor --headless-render`: the home screen without DRM or rayosd, as the
//! integration tests and a developer use it to check layout and font.

use std::process::Command;

#[test]
fn renders_the_home_screen_and_says_where_each_vm_went() {
    let out = std::env::temp_dir().join(format!("rayos-comp-home-{}.ppm", std::process::id()));
    let r = Command::new(env!("CARGO_BIN_EXE_rayos-compositor"))
        .args(["--headless-render", out.to_str().unwrap(), "--size", "1280x800", "--machine-name", "desk", "--time", "0"])
        .args(["--vm", "debian:linux:running", "--vm", "win11:windows:stopped"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let log = String::from_utf8(r.stdout).unwrap();
    assert!(log.contains("compositor: layout home title=\"desk\" "), "{log}");
    assert!(log.contains("compositor: layout home clock=\"1970-01-01 00:00 UTC\" "), "{log}");
    let row = log.lines().find(|l| l.contains("vm=win11")).expect("win11 laid out");
    assert!(row.starts_with("compositor: layout home vm=win11 state=stopped key=2 x="), "{row}");
    let ppm = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let header = b"P6\n1280 800\n255\n";
    assert_eq!(&ppm[..header.len()], header);
    assert_eq!(ppm.len(), header.len() + 1280 * 800 * 3);
    // The row's box has ink in it (text lighter than the background).
    let field = |k: &str| row.split(' ').find_map(|f| f.strip_prefix(k)).unwrap().parse::<usize>().unwrap();
    let (x, y, w, h) = (field("x="), field("y="), field("w="), field("h="));
    let px = |x: usize, y: usize| &ppm[header.len() + (y * 1280 + x) * 3..][..3];
    let bright = (y..y + h).flat_map(|yy| (x..x + w).map(move |xx| (xx, yy))).filter(|&(xx, yy)| px(xx, yy).iter().all(|&c| c > 0xc0)).count();
    assert!(bright > 50, "only {bright} bright pixels in win11's row");
    // A bad argument is refused by name.
    let r = Command::new(env!("CARGO_BIN_EXE_rayos-compositor")).args(["--headless-render", "/dev/null", "--vm", "broken"]).output().unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--vm \"broken\""));
}
