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
        cpuid: vec![crate::cpuid::CpuidEntry { function: 1, index: 0, flags: 0, eax: 0x806f8, ebx: u32::from(id) << 24, ecx: 0x8000_0000, edx: 0 }],
    }
}

fn state() -> SnapshotState {
    let s = spec();
    SnapshotState {
        format_version: FORMAT_VERSION,
        vmm_version: VMM_VERSION.into(),
        created_unix_ms: 1,
        generation: 7,
        disks: s.disks.iter().map(|d| DiskIdentity { path: d.path.clone(), dev: 1, inode: 2, size: 3, mtime_ns: 4, ctime_ns: 5 }).collect(),
        memory: MemoryInfo {
            file: MEMORY_FILE.into(),
            size: s.memory_bytes(),
            data_bytes: 4096,
            chunk_size: memfile::CHUNK,
            chunks: vec![None; memfile::chunk_count(s.memory_bytes())],
        },
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

/// state.json as written, read back as one JSON value (with `required` and `checksums`).
fn json() -> Value {
    serde_json::from_slice(&encode_state(&state()).unwrap()).unwrap()
}

/// `v` laid out as state.json with fresh checksums (as a writer of `v` would), so that a
/// test reaches the check after the checksums; `required` as `v` has it.
fn sealed(v: &Value) -> String {
    let doc = v.as_object().unwrap().clone();
    let required = serde_json::from_value(doc[REQUIRED].clone()).unwrap();
    String::from_utf8(seal(doc, required)).unwrap()
}

fn refused(v: &Value) -> String {
    match parse_state(Path::new("/snap/state.json"), &sealed(v)) {
        Ok(_) => panic!("accepted {v}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn state_round_trips_through_json() {
    let text = String::from_utf8(encode_state(&state()).unwrap()).unwrap();
    let back = parse_state(Path::new("state.json"), &text).unwrap();
    assert_eq!(back.generation, 7);
    assert_eq!(back.disks, state().disks);
    assert_eq!(back.spec, spec());
    assert_eq!(back.vcpus.len(), 2);
    assert_eq!(back.vcpus[1].regs.rip, 0xffff_ffff_8100_0001);
    assert_eq!(back.vcpus[1].regs.rax, 42);
    assert_eq!(back.vcpus[0].sregs.efer, 0xd01);
    assert_eq!(back.vcpus[0].sregs.cr3, 0x1234_5000);
    assert_eq!(back.vcpus[1].lapic.regs[0x20], 1);
    assert_eq!(back.vcpus[0].msrs, state().vcpus[0].msrs);
    assert_eq!(back.vcpus[1].cpuid, state().vcpus[1].cpuid);
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
    v["disks"][0]["path"] = "/elsewhere.img".into();
    assert!(refused(&v).contains("`disks`"));
}

#[test]
fn load_checks_the_memory_file_and_deletes_nothing() {
    let dir = tmpdir("load");
    std::fs::write(dir.join(STATE_FILE), encode_state(&state()).unwrap()).unwrap();
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
    std::fs::write(dir.join(STATE_FILE), sealed(&v)).unwrap();
    assert!(load(&dir).is_err());
    assert!(dir.join(STATE_FILE).exists() && dir.join(MEMORY_FILE).exists());
    // A memory file name that leaves the directory.
    let mut v = json();
    v["memory"]["file"] = "../elsewhere".into();
    std::fs::write(dir.join(STATE_FILE), sealed(&v)).unwrap();
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
    v["framebuffer"] = serde_json::json!({"file": FRAMEBUFFER_FILE, "size": 1 << 24, "data_bytes": 0, "chunk_size": memfile::CHUNK, "chunks": vec![Value::Null; 8]});
    assert!(refused(&v).contains("`framebuffer`: present"), "{}", refused(&v));

    let dir = tmpdir("fb");
    with_display["framebuffer"] = serde_json::json!({"file": FRAMEBUFFER_FILE, "size": 1 << 24, "data_bytes": 4096, "chunk_size": memfile::CHUNK, "chunks": vec![Value::Null; 8]});
    std::fs::write(dir.join(STATE_FILE), sealed(&with_display)).unwrap();
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
    std::fs::write(dir.join(STATE_FILE), sealed(&with_display)).unwrap();
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

/// The line of state.json that holds section `name` (one per line, as written).
fn section_line(text: &str, name: &str) -> std::ops::Range<usize> {
    let key = format!("\"{name}\":");
    let start = text.find(&format!("\n{key}")).map(|i| i + 1).unwrap_or_else(|| panic!("no section {name}"));
    let end = start + text[start..].find('\n').unwrap();
    start..end
}

/// One flipped bit anywhere in a section of state.json, a low one (still ASCII: a digit, a
/// letter or a quote changes) or the high one (no longer UTF-8), is refused naming it.
#[test]
fn a_flipped_bit_in_any_section_names_that_section() {
    let dir = tmpdir("flip");
    let good = encode_state(&state()).unwrap();
    let text = String::from_utf8(good.clone()).unwrap();
    let sections: Vec<String> = KNOWN_SECTIONS.iter().map(|s| s.to_string()).chain([REQUIRED.to_string()]).collect();
    let mut tried = 0;
    for name in &sections {
        let line = section_line(&text, name);
        // Inside the value: after `"name":`, before the line's separator.
        let value = line.start + name.len() + 3..line.end - 1;
        let step = (value.len() / 7).max(1);
        for at in value.step_by(step) {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[at] ^= bit;
                std::fs::write(dir.join(STATE_FILE), &bad).unwrap();
                let e = load(&dir).err().unwrap_or_else(|| panic!("{name}: byte {at} ^ {bit:#x} accepted")).to_string();
                assert!(e.contains(&format!("`{name}`")), "{name}: byte {at} ({:?}) ^ {bit:#x}: {e}", good[at] as char);
                tried += 1;
            }
        }
    }
    assert!(tried > 100, "{tried}");
    std::fs::write(dir.join(STATE_FILE), &good).unwrap();
    File::create(dir.join(MEMORY_FILE)).unwrap().set_len(64 << 20).unwrap();
    assert!(load(&dir).is_ok(), "the unflipped state loads");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_flipped_checksum_or_a_stray_section_is_refused() {
    let mut v = json();
    v["created_unix_ms"] = 2.into();
    // Not resealed: the section no longer matches its checksum.
    let e = parse_state(Path::new("/snap/state.json"), &v.to_string()).err().unwrap().to_string();
    assert!(e.contains("`created_unix_ms`") && e.contains("damaged"), "{e}");
    // A section without a checksum.
    let mut doc = json();
    doc["extra"] = 1.into();
    let e = parse_state(Path::new("/snap/state.json"), &doc.to_string()).err().unwrap().to_string();
    assert!(e.contains("`extra`") && e.contains("no checksum"), "{e}");
    // No checksums at all (a format 2 writer's document with the version bumped).
    let mut doc = json();
    doc.as_object_mut().unwrap().remove(CHECKSUMS);
    let e = parse_state(Path::new("/snap/state.json"), &doc.to_string()).err().unwrap().to_string();
    assert!(e.contains("`checksums`") && e.contains("missing"), "{e}");
}

#[test]
fn an_unknown_required_section_is_refused_by_name_and_an_optional_one_ignored() {
    let mut v = json();
    v["hotplug"] = serde_json::json!({"slots": 2});
    let text = sealed(&v);
    assert!(parse_state(Path::new("s"), &text).is_ok(), "not required: read without it");
    v[REQUIRED].as_array_mut().unwrap().push("hotplug".into());
    let e = refused(&v);
    assert!(e.contains("`hotplug`") && e.contains("does not know"), "{e}");
    // A required section that is not there.
    let mut v = json();
    v.as_object_mut().unwrap().remove("legacy");
    let e = refused(&v);
    assert!(e.contains("`legacy`") && e.contains("missing"), "{e}");
}

#[test]
fn the_generation_goes_into_the_state_and_back() {
    for generation in [0, 1, u64::MAX] {
        let mut s = state();
        s.generation = generation;
        let back = parse_state(Path::new("s"), std::str::from_utf8(&encode_state(&s).unwrap()).unwrap()).unwrap();
        assert_eq!(back.generation, generation);
    }
    let mut v = json();
    v["generation"] = (-1).into();
    assert!(refused(&v).contains("`generation`"));
}

/// A memfd holding `pages` (offset, byte) and a snapshot file of it.
fn memory_snapshot(tag: &str, len: u64, pages: &[(u64, u8)]) -> (PathBuf, File, ChunkSums, u64) {
    use std::os::unix::fs::FileExt;
    let src = crate::memory::create_memfd(tag, len).unwrap();
    for (off, b) in pages {
        src.write_all_at(&vec![*b; 4096], *off).unwrap();
    }
    let dir = tmpdir(tag);
    let path = dir.join(MEMORY_FILE);
    let out = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    let mut seen = Vec::new();
    let (written, sums) = memfile::save(&src, &out, len, &mut |n| seen.push(n)).unwrap();
    assert_eq!(seen.len(), memfile::chunk_count(len));
    assert!(seen.windows(2).all(|w| w[0] < w[1]) && seen.last() == Some(&len), "progress rises to the total: {seen:?}");
    (dir, out, sums, written)
}

#[test]
fn memory_round_trips_sparse_with_a_checksum_per_chunk() {
    use std::os::unix::fs::FileExt;
    let len = (5 << 20) + (1 << 20); // 3 chunks, the last one short
    let (dir, out, sums, written) = memory_snapshot("mem-rt", len, &[(0x1000, 0x11), (0x40_0000, 0x22), (0x50_3000, 0x33)]);
    assert_eq!(written, 3 * 4096, "only the non-zero pages");
    assert_eq!(sums.len(), 3);
    assert!(sums[0].is_some() && sums[1].is_none() && sums[2].is_some(), "chunk 1 (2-4 MiB) is a hole: {sums:?}");
    assert!(out.metadata().unwrap().len() == len);
    // A guest RAM of zeros: every chunk a hole.
    let (dir2, _, zero_sums, zero_written) = memory_snapshot("mem-zero", 4 << 20, &[]);
    assert_eq!((zero_sums, zero_written), (vec![None, None], 0));
    let back = crate::memory::create_memfd("back", len).unwrap();
    assert_eq!(memfile::load(&out, &back, len, &sums).unwrap(), written);
    let mut b = [0u8; 1];
    for (off, want) in [(0x1000, 0x11), (0x1fff, 0x11), (0x40_0000, 0x22), (0x50_3000, 0x33), (0x2000, 0)] {
        back.read_exact_at(&mut b, off).unwrap();
        assert_eq!(b[0], want, "{off:#x}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

#[test]
fn a_flipped_byte_in_memory_names_the_chunk() {
    use std::os::unix::fs::FileExt;
    let len = 8 << 20;
    let (dir, out, sums, _) = memory_snapshot("mem-flip", len, &[(0x1000, 0x11), (0x40_0000, 0x22)]);
    let fresh = || crate::memory::create_memfd("back", len).unwrap();
    // In a chunk with data.
    out.write_all_at(&[0x23], 0x40_0800).unwrap();
    let e = memfile::load(&out, &fresh(), len, &sums).unwrap_err().to_string();
    assert!(e.contains("offset 0x400000"), "{e}");
    out.write_all_at(&[0x22], 0x40_0800).unwrap();
    memfile::load(&out, &fresh(), len, &sums).unwrap();
    // In a chunk saved as a hole.
    out.write_all_at(&[1], 0x60_0000 + 77).unwrap();
    let e = memfile::load(&out, &fresh(), len, &sums).unwrap_err().to_string();
    assert!(e.contains("offset 0x600000") && e.contains("all zero"), "{e}");
    out.write_all_at(&[0], 0x60_0000 + 77).unwrap();
    // A byte zeroed in a page that had data.
    out.write_all_at(&vec![0; 4096], 0x1000).unwrap();
    let e = memfile::load(&out, &fresh(), len, &sums).unwrap_err().to_string();
    assert!(e.contains("offset 0x0 ") && e.contains("has all zero"), "{e}");
    // Checksums for another size.
    let e = memfile::load(&out, &fresh(), len, &sums[1..]).unwrap_err().to_string();
    assert!(e.contains("3 chunk checksums"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_truncated_memory_file_is_refused_naming_file_and_offset() {
    let len = 64 << 20;
    let (dir, out, sums, _) = memory_snapshot("mem-trunc", len, &[(0x1000, 0x11), (0x1e0_0000, 0x22)]);
    let mut s = state();
    s.memory.chunks = sums.clone();
    std::fs::write(dir.join(STATE_FILE), encode_state(&s).unwrap()).unwrap();
    assert!(load(&dir).is_ok());
    out.set_len(0x1a0_0000).unwrap();
    let e = load(&dir).err().unwrap().to_string();
    assert!(e.contains(&dir.join(MEMORY_FILE).display().to_string()) && e.contains("`length`") && e.contains("offset 0x1a00000"), "{e}");
    // Even past the length check, the copy refuses the chunk that lost its data.
    let e = memfile::load(&out, &crate::memory::create_memfd("back", len).unwrap(), len, &sums).unwrap_err().to_string();
    assert!(e.contains("offset 0x1e00000"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_progress_is_paced_and_ends_at_the_total() {
    let t0 = Instant::now();
    let mut p = ProgressPacer::new(100, Duration::from_millis(250));
    let at = |ms| t0 + Duration::from_millis(ms);
    let sent: Vec<u64> = [(10, 0), (20, 100), (30, 249), (40, 250), (50, 300), (60, 600), (100, 610)]
        .into_iter()
        .filter(|(w, ms)| p.due(*w, at(*ms)))
        .map(|(w, _)| w)
        .collect();
    assert_eq!(sent, vec![10, 40, 60, 100], "the first, one per 250 ms, and the end");
}

/// A disk image as the VM would have opened it.
fn open_disk(path: &Path) -> crate::attach::OpenDisk {
    let file = File::options().read(true).write(true).open(path).unwrap();
    crate::attach::OpenDisk { path: path.to_path_buf(), read_only: false, file }
}

#[test]
fn a_disk_changed_since_the_save_is_refused_naming_disk_and_field() {
    use std::os::unix::fs::FileExt;
    let dir = tmpdir("disks");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&a, vec![1u8; 8192]).unwrap();
    std::fs::write(&b, vec![2u8; 8192]).unwrap();
    let saved = disks::sync_and_identify(&[open_disk(&a), open_disk(&b)]).unwrap();
    assert_eq!(saved[1].path, b);
    assert_eq!(saved[1].size, 8192);
    disks::check(&saved, &[open_disk(&a), open_disk(&b)]).unwrap();
    let refused = |disks: &[crate::attach::OpenDisk]| disks::check(&saved, disks).unwrap_err().to_string();

    // Written (same size): mtime moves. Set explicitly, so a coarse clock cannot hide it.
    let f = open_disk(&b);
    f.file.write_all_at(b"x", 100).unwrap();
    f.file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    let e = refused(&[open_disk(&a), open_disk(&b)]);
    assert!(e.contains(&b.display().to_string()) && e.contains("`mtime_ns`") && e.contains("changed since"), "{e}");
    // Renamed over by another file: another inode.
    std::fs::write(dir.join("new"), vec![1u8; 8192]).unwrap();
    std::fs::rename(dir.join("new"), &a).unwrap();
    let e = refused(&[open_disk(&a), open_disk(&b)]);
    assert!(e.contains(&a.display().to_string()) && e.contains("`inode`"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_disk_resized_or_rechmodded_since_the_save_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("disks2");
    let a = dir.join("a.img");
    std::fs::write(&a, vec![1u8; 8192]).unwrap();
    let saved = disks::sync_and_identify(&[open_disk(&a)]).unwrap();
    // Metadata only (mtime untouched): ctime moves. Wait out a coarse ctime clock.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = disks::check(&saved, &[open_disk(&a)]).unwrap_err().to_string();
    assert!(e.contains("`ctime_ns`"), "{e}");
    let saved = disks::sync_and_identify(&[open_disk(&a)]).unwrap();
    File::options().write(true).open(&a).unwrap().set_len(4096).unwrap();
    let e = disks::check(&saved, &[open_disk(&a)]).unwrap_err().to_string();
    assert!(e.contains("`size`") && e.contains("8192 at the save, 4096 now"), "{e}");
    // A disk fewer than saved.
    let e = disks::check(&saved, &[]).unwrap_err().to_string();
    assert!(e.contains("`disks`") && e.contains("1 saved"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_refusals_of_the_state_exit_as_rejected() {
    let f = |field: &str| SnapshotError::Field { file: "/s".into(), field: field.into(), reason: "x".into() };
    assert!(f("memory.chunks").rejects_state());
    assert!(SnapshotError::Vmm(crate::Error::StateRejected { file: "/d".into(), field: "inode".into(), reason: "x".into() }).rejects_state());
    assert!(!SnapshotError::Vmm(crate::Error::KvmCapability("KVM_CAP_IRQCHIP")).rejects_state());
    assert!(!SnapshotError::PauseTimeout.rejects_state());
}
