//! Answer-file validation: each wrong or missing field is rejected with its name, and disk
//! selection/confirmation refuse what they must.

mod common;

use common::*;
use installer::answers::{parse, to_toml};
use installer::config::{Network, OnShutdown};
use installer::disks;
use installer::plan::{make_plan, Target, VmStorage};

const GOOD: &str = r#"version = 1
[disk]
match = { serial = "NV-1" }
target = "whole-disk"
confirm = "wipe NV-1"
[linux_user]
name = "alice"
password_hash = "$6$rayostestsalt$IU/hlK7ZQjeRIP2O3MMET0d1BP6g7JyoiNZtxu8C2NioljB5lphidcPuoRBJAqnnirtwi73pKAcnpwLxKQSzT/"
"#;

fn err(text: &str) -> String {
    parse("answers.toml", text).unwrap_err().to_string()
}

#[test]
fn minimal_file_is_valid_with_defaults() {
    let a = parse("answers.toml", GOOD).unwrap();
    // Absent or false: Windows autostart is not offered, and nothing asks for it.
    assert!(parse("answers.toml", &format!("{GOOD}[policy]\nautostart_windows_hidden = false\n")).is_ok());
    assert_eq!(a.target, Target::WholeDisk);
    assert_eq!(a.vm_storage, VmStorage::DataVolume);
    assert_eq!(a.config.hostname, "rayos");
    assert_eq!(a.config.linux_user.as_ref().unwrap().name, "alice");
}

#[test]
fn the_linux_vm_is_saved_at_shutdown_unless_the_file_says_shutdown() {
    let policy = |p: &str| parse("answers.toml", &format!("{GOOD}[policy]\n{p}")).unwrap().config.policy.linux_on_shutdown;
    assert_eq!(parse("answers.toml", GOOD).unwrap().config.policy.linux_on_shutdown, OnShutdown::Save, "absent: save");
    assert_eq!(policy("linux_on_shutdown = \"save\"\n"), OnShutdown::Save);
    assert_eq!(policy("linux_on_shutdown = \"shutdown\"\n"), OnShutdown::Shutdown);
    assert_eq!(policy("autostart_linux_hidden = false\n"), OnShutdown::Save, "another policy key alone keeps the default");
}

#[test]
fn the_linux_vm_gets_nat_unless_the_file_says_off() {
    let net = |p: &str| parse("answers.toml", &format!("{GOOD}[policy]\n{p}")).unwrap().config.policy.linux_network;
    assert_eq!(parse("answers.toml", GOOD).unwrap().config.policy.linux_network, Network::Nat, "absent: the wizard's suggestion");
    assert_eq!(net("linux_network = \"off\"\n"), Network::Off);
    assert_eq!(net("linux_network = \"nat\"\n"), Network::Nat);
}

#[test]
fn the_linux_user_section_is_required_and_takes_only_a_hash() {
    let without = GOOD.split("[linux_user]").next().unwrap().to_string();
    let user = |body: &str| format!("{without}[linux_user]\n{body}");
    let hash = "$6$rayostestsalt$IU/hlK7ZQjeRIP2O3MMET0d1BP6g7JyoiNZtxu8C2NioljB5lphidcPuoRBJAqnnirtwi73pKAcnpwLxKQSzT/";
    for (text, want) in [
        (without.clone(), "answers.toml: linux_user: missing: the [linux_user] section names the Linux VM's user"),
        (user(&format!("password_hash = \"{hash}\"\n")), "answers.toml: linux_user.name: missing"),
        (user("name = \"alice\"\n"), "answers.toml: linux_user.password_hash: missing"),
        (user("name = \"alice\"\npassword = \"hunter2\"\n"), "answers.toml: linux_user.password: a plain password is not taken"),
        (user(&format!("name = \"root\"\npassword_hash = \"{hash}\"\n")), "answers.toml: linux_user.name: \"root\" is a name the system keeps"),
        (user(&format!("name = \"Bob Smith\"\npassword_hash = \"{hash}\"\n")), "answers.toml: linux_user.name: \"Bob Smith\" is not a Linux user name"),
        (user("name = \"alice\"\npassword_hash = \"$1$md5$abc\"\n"), "answers.toml: linux_user.password_hash: not a SHA-512 crypt hash"),
        (user(&format!("name = \"alice\"\npassword_hash = \"{hash}\"\nshell = \"/bin/zsh\"\n")), "answers.toml: linux_user.shell: unknown field `shell`"),
        (format!("{without}linux_user = \"alice\"\n"), "answers.toml: disk.linux_user: unknown field"),
    ] {
        let got = err(&text);
        assert!(got.starts_with(want), "for\n{text}\nwant prefix {want:?}\ngot {got:?}");
    }
    // The inline-table form of the same section.
    let inline = format!("version = 1\nlinux_user = {{ name = \"alice\", password_hash = \"{hash}\" }}\n{}", &without["version = 1\n".len()..]);
    assert_eq!(parse("answers.toml", &inline).unwrap().config.linux_user.unwrap().password_hash, hash);
}

#[test]
fn each_invalid_field_is_named() {
    let cases: &[(&str, &str)] = &[
        ("", "answers.toml: version: missing"),
        ("version = 2\n", "answers.toml: version: 2 is not supported"),
        ("version = 1\n", "answers.toml: disk: missing"),
        ("version = 1\n[disk]\ntarget = \"whole-disk\"\n", "answers.toml: disk.match: missing"),
        ("version = 1\n[disk]\nmatch = {}\n", "answers.toml: disk.match: empty"),
        ("version = 1\n[disk]\nmatch = { serial = \"X\" }\n", "answers.toml: disk.target: missing"),
        ("version = 1\n[disk]\nmatch = { serial = \"X\" }\ntarget = \"everything\"\n", "answers.toml: disk.target: \"everything\""),
        ("version = 1\n[disk]\nmatch = { serial = \"X\" }\ntarget = \"partition\"\n", "answers.toml: disk.partition: missing"),
        ("version = 1\n[disk]\nmatch = { serial = \"X\" }\ntarget = \"whole-disk\"\n", "answers.toml: disk.confirm: missing"),
        ("version = 1\n[disk]\nmatch = { size = \"big\" }\n", "answers.toml: disk.match.size: \"big\""),
        ("version = 1\n[disk]\nmatch = { colour = \"red\" }\n", "answers.toml: disk.match: unknown field `colour`"),
        ("version = 1\n[disk]\nmatch = { serial = 5 }\n", "answers.toml: disk.match: invalid type: integer `5`, expected a string"),
        ("version = 1\n[disk]\nmatch = { serial = \"X\" }\ntarget = \"whole-disk\"\nconfirm = \"wipe X\"\nfrobnicate = true\n", "answers.toml: disk.frobnicate: unknown field `frobnicate`"),
    ];
    for (text, want) in cases {
        let got = err(text);
        assert!(got.starts_with(want), "for\n{text}\nwant prefix {want:?}\ngot {got:?}");
    }
    let with = |extra: &str| format!("{GOOD}{extra}");
    for (extra, want) in [
        ("[storage]\nfilesystem = \"btrfs\"\n", "answers.toml: storage.filesystem: \"btrfs\": only \"ext4\""),
        ("[storage]\nvm_storage = \"cloud\"\n", "answers.toml: storage.vm_storage: \"cloud\""),
        ("[storage]\nvm_storage = \"partition\"\n", "answers.toml: storage.vm_storage_size: missing"),
        ("[storage]\nvm_storage = \"path\"\nvm_storage_path = \"/etc\"\n", "answers.toml: storage.vm_storage_path: \"/etc\": must be a directory under /data/"),
        ("[system]\nhostname = \"bad name\"\n", "answers.toml: system.hostname: \"bad name\""),
        ("[system]\ntimezone = \"../../x\"\n", "answers.toml: system.timezone"),
        ("[system]\nlocale = \"klingon\"\n", "answers.toml: system.locale"),
        ("[system]\nkeymap = \"a b\"\n", "answers.toml: system.keymap"),
        ("[policy]\nautostart_linux_hidden = \"yes\"\n", "answers.toml: policy.autostart_linux_hidden: invalid type: string \"yes\", expected a boolean"),
        (
            "[policy]\nautostart_windows_hidden = true\n",
            "answers.toml: policy.autostart_windows_hidden: RayOS does not run Windows VMs yet, so there is none to \
             autostart: remove this key or set it to false",
        ),
        (
            "[policy]\nlinux_on_shutdown = \"hibernate\"\n",
            "answers.toml: policy.linux_on_shutdown: \"hibernate\": expected \"save\" (the Linux VM is saved at shutdown and \
             resumed at boot) or \"shutdown\" (it is shut down and boots afresh)",
        ),
        ("[policy]\nlinux_on_shutdown = \"Save\"\n", "answers.toml: policy.linux_on_shutdown: \"Save\": expected \"save\""),
        ("[policy]\nlinux_on_shutdown = false\n", "answers.toml: policy.linux_on_shutdown: invalid type: boolean `false`, expected a string"),
        ("[policy]\nlinux_network = \"bridged\"\n", "answers.toml: policy.linux_network: \"bridged\": expected \"nat\""),
        ("[system]\ntimezone = \"Mars/Olympus_Mons\"\n", "answers.toml: system.timezone: \"Mars/Olympus_Mons\" is not a time zone"),
        ("[system]\nlocale = \"xx_YY.UTF-8\"\n", "answers.toml: system.locale: \"xx_YY.UTF-8\" is not a locale RayOS knows"),
        ("[system]\nkeymap = \"qwertz\"\n", "answers.toml: system.keymap: \"qwertz\" is not a keyboard layout RayOS knows"),
        // A name RayOS once offered, which the guest could not load: refused with the one to use.
        (
            "[system]\nkeymap = \"cz\"\n",
            "answers.toml: system.keymap: \"cz\" is no longer offered (Debian's console-data has no such keymap): use \"cz-lat2\" instead",
        ),
    ] {
        let got = err(&with(extra));
        assert!(got.starts_with(want), "for {extra:?}: want prefix {want:?}, got {got:?}");
    }
}

fn machine() -> (FakeMachine, Vec<installer::disks::Disk>) {
    let m = FakeMachine::new();
    m.add_disk(&nvme("nvme0n1", "NV-1", 16 * GIB));
    m.add_disk(&nvme("nvme1n1", "NV-2", 16 * GIB));
    m.add_disk(&DiskSpec {
        name: "sda",
        devpath: "pci0000:00/0000:00:0d.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sda",
        model: "USB STICK",
        serial: "USB-1",
        serial_in_vpd: true,
        size: 16 * GIB,
        removable: true,
    });
    let d = disks::enumerate(&m.paths, None).unwrap();
    (m, d)
}

#[test]
fn disk_selection_errors_name_the_match_and_list_the_disks() {
    let (_m, disks) = machine();
    let sel = |m: &str| {
        let user = GOOD.split_once("[linux_user]").unwrap().1;
        let text = format!("version = 1\n[disk]\nmatch = {{ {m} }}\ntarget = \"whole-disk\"\nconfirm = \"wipe X\"\n[linux_user]{user}");
        parse("answers.toml", &text).unwrap().select_disk("answers.toml", &disks).map(|d| d.name.clone())
    };
    let e = sel("serial = \"X\"").unwrap_err().to_string();
    assert!(
        e.starts_with("answers.toml: disk.match: no disk with serial \"X\" (found: nvme0n1 \"QEMU NVMe Ctrl\" serial \"NV-1\" 16.0 GiB;"),
        "{e}"
    );
    assert!(e.contains("USB-1"), "{e}");
    let e = sel("model = \"QEMU NVMe Ctrl\"").unwrap_err().to_string();
    assert!(e.contains("matches 2 disks (nvme0n1, nvme1n1)"), "{e}");
    assert_eq!(sel("model = \"QEMU NVMe Ctrl\", serial = \"NV-2\"").unwrap(), "nvme1n1");
    assert_eq!(sel("size = \"16G\", serial = \"NV-1\"").unwrap(), "nvme0n1");
    assert_eq!(sel("device = \"nvme1n1\"").unwrap(), "nvme1n1");
    let e = sel("serial = \"USB-1\"").unwrap_err().to_string();
    assert!(e.contains("which is refused: removable disk"), "{e}");
}

#[test]
fn confirmation_must_name_the_disk_and_say_wipe_when_destroying() {
    let (_m, disks) = machine();
    let with_confirm = |c: &str| {
        parse("answers.toml", &GOOD.replace("confirm = \"wipe NV-1\"", &format!("confirm = \"{c}\""))).unwrap()
    };
    let plan = make_plan(&disks[0], Target::WholeDisk, VmStorage::DataVolume).unwrap();
    assert!(with_confirm("wipe NV-1").check_confirm("answers.toml", &plan).is_ok());
    for bad in ["yes", "wipe NV-2", "install NV-1", "wipe nv-1"] {
        let e = with_confirm(bad).check_confirm("answers.toml", &plan).unwrap_err().to_string();
        assert!(e.starts_with(&format!("answers.toml: disk.confirm: \"{bad}\" does not confirm")), "{e}");
        assert!(e.contains("write confirm = \"wipe NV-1\""), "{e}");
    }
}

#[test]
fn wizard_answers_round_trip_through_the_parser() {
    let (_m, disks) = machine();
    let user = installer::config::LinuxUser { name: "bob".into(), password_hash: installer::config::hash_password("pw").unwrap() };
    let mut cfg = installer::config::SystemConfig { hostname: "saved".into(), linux_user: Some(user), ..Default::default() };
    cfg.policy.autostart_linux_hidden = false;
    cfg.policy.linux_on_shutdown = OnShutdown::Shutdown;
    let text = to_toml(&disks[1], &Target::Partition(3), &VmStorage::DedicatedPartition { size_bytes: 8 * GIB }, &cfg, "wipe NV-2");
    assert!(text.contains("\nlinux_on_shutdown = \"shutdown\"\n"), "{text}");
    let a = parse("saved.toml", &text).unwrap();
    assert_eq!(a.target, Target::Partition(3));
    assert_eq!(a.vm_storage, VmStorage::DedicatedPartition { size_bytes: 8 * GIB });
    assert_eq!(a.config, cfg);
    assert_eq!(a.confirm, "wipe NV-2");
    assert_eq!(a.select_disk("saved.toml", &disks).unwrap().name, "nvme1n1");
}
