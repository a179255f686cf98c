//! Its own process: the library's unit tests run reapers that would wait for this child.

#[test]
fn a_child_not_yet_waited_for_is_counted_as_a_zombie_until_reaped() {
    assert_eq!(rayosd::procfs::zombies(), 0);
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rayosd::procfs::zombies() == 0 {
        assert!(std::time::Instant::now() < deadline, "zombie not seen");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait().unwrap();
    assert_eq!(rayosd::procfs::zombies(), 0);
}
