use super::*;
use crate::vcpu::{FpuState, MsrValue};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-snap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Spec validation wants the kernel and disks to exist; any file will do.
fn spec() -> VmSpec {
    let exe = std::env::current_exe().unwrap();
    serde_json::from_value(serde_json::json!({
        "name": "t", "vcpus": 2, "memory_mib": 64, "kernel": exe, "cmdline": "console=ttyS0",
        "disks": [{"path": exe}],
    }))
    .unwrap()
}

fn vcpu(id: u8) -> VcpuState {
    let mut regs = kvm_bindings::kvm_regs::default();
    regs.rip = 0xffff_ffff_8100_0000 + u64::from(id);
    regs.rax = 42;
    let mut sregs = kvm_bindings::kvm_sregs::default();
    sregs.efer = 0xd01;
    sregs.cr3 = 0x1234_5000;
    let mut lapic = kvm_bindings::kvm_lapic_state::default();
    lapic.regs[0x20] = id as _;
    VcpuState {
        id,
        mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
        sregs,
        regs,
        fpu: FpuState::from(&kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }),
        xsave: kvm_bindings::kvm_xsave::default(),
        xcrs: kvm_bindings::kvm_xcrs::default(),
        debugregs: kvm_bindings::kvm_debugregs::default(),
        lapic,
        msrs: vec![MsrValue { index: 0x10, data: 123_456_789 }, MsrValue { index: 0xc000_0082, data: 0xffff_ffff_8200_0000 }],
        vcpu_events: kvm_bindings::kvm_vcpu_events::default(),
        tsc_khz: Some(2_000_000),
    }
}

fn state() -> SnapshotState {
    let s = spec();
    SnapshotState {
        format_version: FORMAT_VERSION,
        vmm_version: VMM_VERSION.into(),
        created_unix_ms: 1,
        memory: MemoryInfo { file: MEMORY_FILE.into(), size: s.memory_bytes(), data_bytes: 4096 },
        framebuffer: None,
        spec: s,
        vm: VmState {
            pic_master: kvm_bindings::kvm_irqchip { chip_id: 0, ..Default::default() },
            pic_slave: kvm_bindings::kvm_irqchip { chip_id: 1, ..Default::default() },
            ioapic: kvm_bindings::kvm_irqchip { chip_id: 2, ..Default::default() },
            pit2: Default::default(),
            clock: kvm_bindings::kvm_clock_data { clock: 987_654_321, ..Default::default() },
        },
        vcpus: vec![vcpu(0), vcpu(1)],
        legacy: LegacyState {
            serial: SerialRegs { line_control: 3, in_buffer: b"x".to_vec(), ..Default::default() },
            cmos: CmosState { index: 0, nvram: vec![0; 128] },
            boot_ms: Some(900),
        },
        pci: PciState { devices: vec![] },
    }
}

fn json() -> Value {
    serde_json::to_value(state()).unwrap()
}

fn refused(v: &Value) -> String {
    match parse_state(Path::new("/snap/state.json"), &v.to_string()) {
        Ok(_) => panic!("accepted {v}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn state_round_trips_through_json() {
    let text = serde_json::to_string(&state()).unwrap();
    let back = parse_state(Path::new("state.json"), &text).unwrap();
    assert_eq!(back.spec, spec());
    assert_eq!(back.vcpus.len(), 2);
    assert_eq!(back.vcpus[1].regs.rip, 0xffff_ffff_8100_0001);
    assert_eq!(back.vcpus[1].regs.rax, 42);
    assert_eq!(back.vcpus[0].sregs.efer, 0xd01);
    assert_eq!(back.vcpus[0].sregs.cr3, 0x1234_5000);
    assert_eq!(back.vcpus[1].lapic.regs[0x20], 1);
    assert_eq!(back.vcpus[0].msrs, state().vcpus[0].msrs);
    assert_eq!(back.vcpus[0].fpu, state().vcpus[0].fpu);
    assert_eq!(back.vm.clock.clock, 987_654_321);
    assert_eq!(back.vm.ioapic.chip_id, 2);
    assert_eq!(back.legacy, state().legacy);
    assert_eq!(back.memory, state().memory);
}

#[test]
fn another_vmm_version_or_format_is_refused_by_name() {
    let mut v = json();
    v["vmm_version"] = "0.0.1-other".into();
    let e = refused(&v);
    assert!(e.contains("/snap/state.json") && e.contains("`vmm_version`") && e.contains("0.0.1-other"), "{e}");

    let mut v = json();
    v["format_version"] = 99.into();
    let e = refused(&v);
    assert!(e.contains("`format_version`") && e.contains("99"), "{e}");

    // Same package version, another build: the build id tells them apart.
    let (_, hash) = VMM_VERSION.rsplit_once("-state-").expect(VMM_VERSION);
    assert!(VMM_VERSION.starts_with(concat!(env!("CARGO_PKG_VERSION"), "-")) && hash.len() == 16, "{VMM_VERSION}");
    for other in [env!("CARGO_PKG_VERSION").to_string(), VMM_VERSION.replace(hash, "0123456789abcdef")] {
        let mut v = json();
        v["vmm_version"] = other.clone().into();
        let e = refused(&v);
        assert!(e.contains("`vmm_version`") && e.contains(&other) && e.contains(VMM_VERSION), "{e}");
    }

    // The version is checked before anything else fails to parse.
    let mut v = json();
    v["vmm_version"] = "9.9.9".into();
    v["vcpus"] = "garbage".into();
    assert!(refused(&v).contains("`vmm_version`"));
}

#[test]
fn corrupt_state_names_the_field() {
    let e = match parse_state(Path::new("/snap/state.json"), "{\"format_version\": 1,") {
        Err(e) => e.to_string(),
        Ok(_) => panic!(),
    };
    assert!(e.contains("/snap/state.json") && e.contains("(document)"), "{e}");

    let mut v = json();
    v["vcpus"][1]["regs"] = "not registers".into();
    let e = refused(&v);
    assert!(e.contains("`vcpus[1]`"), "{e}");

    let mut v = json();
    v["vcpus"][1]["id"] = 0.into();
    assert!(refused(&v).contains("`vcpus[1].id`"));

    let mut v = json();
    v.as_object_mut().unwrap().remove("pci");
    let e = refused(&v);
    assert!(e.contains("`pci`") && e.contains("missing"), "{e}");

    let mut v = json();
    v["vcpus"].as_array_mut().unwrap().pop();
    let e = refused(&v);
    assert!(e.contains("`vcpus`") && e.contains("1 saved"), "{e}");

    let mut v = json();
    v["memory"]["size"] = 4096.into();
    assert!(refused(&v).contains("`memory.size`"));

    let mut v = json();
    v["spec"]["vcpus"] = 0.into();
    assert!(refused(&v).contains("`spec`"));

    let mut v = json();
    v["legacy"]["serial"]["line_control"] = 300.into();
    assert!(refused(&v).contains("`legacy`"));

    let mut v = json();
    v["surprise"] = true.into();
    assert!(refused(&v).contains("`surprise`"));
}

#[test]
fn load_checks_the_memory_file_and_deletes_nothing() {
    let dir = tmpdir("load");
    std::fs::write(dir.join(STATE_FILE), serde_json::to_vec(&state()).unwrap()).unwrap();
    // Missing memory file.
    let e = load(&dir).err().unwrap().to_string();
    assert!(e.contains(&dir.join(MEMORY_FILE).display().to_string()), "{e}");
    // Wrong length.
    std::fs::write(dir.join(MEMORY_FILE), b"short").unwrap();
    let e = load(&dir).err().unwrap().to_string();
    assert!(e.contains("memory") && e.contains("`length`") && e.contains("5 bytes"), "{e}");
    File::options().write(true).open(dir.join(MEMORY_FILE)).unwrap().set_len(64 << 20).unwrap();
    let l = load(&dir).unwrap();
    assert_eq!(l.state.vcpus.len(), 2);
    // A bad version: refused, and both files are still there.
    let mut v = json();
    v["vmm_version"] = "other".into();
    std::fs::write(dir.join(STATE_FILE), v.to_string()).unwrap();
    assert!(load(&dir).is_err());
    assert!(dir.join(STATE_FILE).exists() && dir.join(MEMORY_FILE).exists());
    // A memory file name that leaves the directory.
    let mut v = json();
    v["memory"]["file"] = "../elsewhere".into();
    std::fs::write(dir.join(STATE_FILE), v.to_string()).unwrap();
    assert!(load(&dir).err().unwrap().to_string().contains("`memory.file`"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_framebuffer_goes_with_the_display_and_is_checked() {
    // A VM with a display saves its pixels; state.json must say so, and only then.
    let mut with_display = json();
    with_display["spec"]["display"] = serde_json::json!({"width": 640, "height": 480});
    assert!(refused(&with_display).contains("`framebuffer`: missing"), "{}", refused(&with_display));
    let mut v = json();
    v["framebuffer"] = serde_json::json!({"file": FRAMEBUFFER_FILE, "size": 1 << 24, "data_bytes": 0});
    assert!(refused(&v).contains("`framebuffer`: present"), "{}", refused(&v));

    let dir = tmpdir("fb");
    with_display["framebuffer"] = serde_json::json!({"file": FRAMEBUFFER_FILE, "size": 1 << 24, "data_bytes": 4096});
    std::fs::write(dir.join(STATE_FILE), with_display.to_string()).unwrap();
    File::create(dir.join(MEMORY_FILE)).unwrap().set_len(64 << 20).unwrap();
    // Missing, then short: named, and nothing deleted.
    let e = load(&dir).err().unwrap().to_string();
    assert!(e.contains(&dir.join(FRAMEBUFFER_FILE).display().to_string()), "{e}");
    std::fs::write(dir.join(FRAMEBUFFER_FILE), b"px").unwrap();
    let e = load(&dir).err().unwrap().to_string();
    assert!(e.contains("`length`") && e.contains("framebuffer.size"), "{e}");
    assert!(dir.join(FRAMEBUFFER_FILE).exists() && dir.join(MEMORY_FILE).exists());
    File::options().write(true).open(dir.join(FRAMEBUFFER_FILE)).unwrap().set_len(1 << 24).unwrap();
    let l = load(&dir).unwrap();
    assert!(l.framebuffer.is_some());
    assert_eq!(l.state.framebuffer.as_ref().map(|f| f.size), Some(1 << 24));
    // A file name that leaves the directory.
    with_display["framebuffer"]["file"] = "../memory".into();
    std::fs::write(dir.join(STATE_FILE), with_display.to_string()).unwrap();
    assert!(load(&dir).err().unwrap().to_string().contains("`framebuffer.file`"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writes_are_atomic_and_never_replace_without_asking() {
    let base = tmpdir("target");
    let dir = VmDir::open(&base).unwrap();
    let path = base.join("snap");
    let t = Target::new(&dir, &path).unwrap();
    let doc = |tag: &str| format!(r#"{{"format_version":2,"vmm_version":"x","spec":{{}},"tag":"{tag}"}}"#);
    let put = |tag: &'static str| {
        move |tmp: &TmpDir| -> Result<(), SnapshotError> {
            tmp.create_new(STATE_FILE)?.write_all(doc(tag).as_bytes()).unwrap();
            tmp.create_new(MEMORY_FILE)?.write_all(tag.as_bytes()).unwrap();
            Ok(())
        }
    };
    t.write(false, put("one")).unwrap();
    assert_eq!(std::fs::read_to_string(path.join(STATE_FILE)).unwrap(), doc("one"));
    let e = t.write(false, put("two")).unwrap_err();
    assert!(matches!(e, SnapshotError::Exists(_)), "{e}");
    assert_eq!(std::fs::read_to_string(path.join(STATE_FILE)).unwrap(), doc("one"));
    t.write(true, put("three")).unwrap();
    assert_eq!(std::fs::read_to_string(path.join(MEMORY_FILE)).unwrap(), "three");
    // A failing writer leaves the old snapshot alone.
    let e = t.write(true, |_: &TmpDir| -> Result<(), SnapshotError> { Err(SnapshotError::NoPci) });
    assert!(e.is_err());
    assert_eq!(std::fs::read_to_string(path.join(STATE_FILE)).unwrap(), doc("three"));
    // Nothing temporary is left next to it.
    let names: Vec<String> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, vec!["snap".to_string()]);
    std::fs::remove_dir_all(&base).unwrap();
}

/// `replace` replaces a snapshot, never a disk image or a directory that is not one; a
/// target outside the VM's directory is refused before anything is written.
#[test]
fn replace_refuses_what_is_not_a_snapshot_and_targets_stay_inside() {
    let base = tmpdir("replace");
    let dir = VmDir::open(&base).unwrap();
    std::fs::write(base.join("disk.img"), b"guest data").unwrap();
    std::fs::create_dir(base.join("photos")).unwrap();
    std::fs::write(base.join("photos/cat.jpg"), b"meow").unwrap();
    std::fs::create_dir(base.join("fake")).unwrap();
    std::fs::write(base.join("fake").join(STATE_FILE), b"not json").unwrap();
    let never = |_: &TmpDir| -> Result<(), SnapshotError> { panic!("nothing may be written") };
    for name in ["disk.img", "photos", "fake"] {
        let t = Target::new(&dir, &base.join(name)).unwrap();
        let e = t.check(true).unwrap_err();
        assert!(matches!(e, SnapshotError::NotSnapshot(_)), "{name}: {e}");
        assert!(e.to_string().contains(name) && e.to_string().contains("not a snapshot"), "{e}");
        assert!(t.write(true, never).is_err());
    }
    assert_eq!(std::fs::read(base.join("disk.img")).unwrap(), b"guest data");
    assert_eq!(std::fs::read(base.join("photos/cat.jpg")).unwrap(), b"meow");
    for outside in ["/tmp/snap", "../snap", "photos/snap"] {
        let e = Target::new(&dir, Path::new(outside)).err().unwrap().to_string();
        assert!(e.contains("outside this VM's directory"), "{outside}: {e}");
    }
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn pvclock_time_is_scaled_like_the_guest_does() {
    // 1 GHz TSC: mul = 2^31 with shift 1 gives 1 ns per cycle.
    assert_eq!(pvclock_ns(1_500, 500, 7_000, 1 << 31, 1), 8_000);
    // 4 GHz TSC: shift -2 and mul 2^32 - 1 (about 0.25 ns per cycle).
    let ns = pvclock_ns(4_000_000_500, 500, 0, u32::MAX, -2);
    assert!((999_999_999..=1_000_000_000).contains(&ns), "{ns}");
    // A TSC behind the timestamp never goes back.
    assert_eq!(pvclock_ns(100, 500, 7_000, 1 << 31, 1), 7_000);
    // A hostile shift does not panic.
    assert_eq!(pvclock_ns(1_500, 500, 7_000, 1 << 31, -128), 7_000);
}
