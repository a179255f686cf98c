use super::*;

/// The build host's console-data (gzip'd, as rootfs-builder reads it to ship it).
const HOST: &str = "/usr/share/keymaps";

fn host(name: &str) -> Keymap {
    Keymap::load(name, Path::new(HOST)).unwrap_or_else(|e| panic!("{name}: {e} (console-data is a build host package)"))
}

fn at(code: u16, mods: Mods) -> Option<Stroke> {
    Some(Stroke { code, mods })
}

/// Files in memory: `keymap` is the layout, the rest are includes by name.
struct Mem(&'static [(&'static str, &'static str)]);

impl Source for Mem {
    fn keymap(&self, name: &str) -> Result<(PathBuf, String), KeymapError> {
        self.include(Path::new("/"), name).map_err(|_| KeymapError::NotFound { name: name.into(), dir: "/mem".into() })
    }
    fn include(&self, from: &Path, name: &str) -> Result<(PathBuf, String), KeymapError> {
        let (n, text) = self.0.iter().find(|(n, _)| *n == name).ok_or_else(|| KeymapError::Include { file: from.into(), include: name.into() })?;
        Ok((PathBuf::from(format!("/mem/{n}")), text.to_string()))
    }
}

fn mem(files: &'static [(&'static str, &'static str)]) -> Result<Keymap, KeymapError> {
    Keymap::parse("test", &Mem(files))
}

/// Shift on 42 and AltGr on 100 in every map, as console-data's includes make them.
const MODS: &str = "keycode 42 = Shift\nkeycode 100 = AltGr\n";

#[test]
fn german_layouts_type_what_their_keys_say() {
    let de = host("de-latin1");
    assert_eq!(de.stroke('z'), at(21, Mods::None), "z is on KEY_Y");
    assert_eq!(de.stroke('y'), at(44, Mods::None), "y is on KEY_Z");
    assert_eq!(de.stroke('Z'), at(21, Mods::Shift));
    assert_eq!(de.stroke('@'), at(16, Mods::AltGr), "@ is AltGr+Q");
    assert_eq!(de.stroke('ß'), at(12, Mods::None));
    assert_eq!(de.stroke('ä'), at(40, Mods::None));
    assert_eq!(de.stroke('Ä'), at(40, Mods::Shift));
    assert_eq!(de.stroke('ü'), at(26, Mods::None));
    assert_eq!(de.stroke('"'), at(3, Mods::Shift));
    assert_eq!(de.stroke('\\'), at(12, Mods::AltGr));
    assert_eq!(de.stroke('µ'), at(50, Mods::AltGr));
    assert_eq!(de.stroke('\n'), at(28, Mods::None));
    // console-data's euro.inc puts "currency" on AltGr+E: in Unicode that is ¤ (U+00A4), not €.
    assert_eq!(de.stroke('¤'), at(18, Mods::AltGr));
    assert_eq!(de.stroke('€'), None);
    // Its ´ and ` are dead keys: the characters need a second key, which text entry does not do.
    assert_eq!(de.stroke('´'), None);

    // console-data's "de" is the 7-bit German layout: z and y swapped, but @ on the Ü key
    // (also AltGr+Q, less plain), and no ß or umlauts.
    let de = host("de");
    assert_eq!(de.stroke('z'), at(21, Mods::None));
    assert_eq!(de.stroke('y'), at(44, Mods::None));
    assert_eq!(de.stroke('@'), at(26, Mods::None));
    assert_eq!(de.stroke('ä'), None);
}

#[test]
fn french_and_euro_layouts() {
    let fr = host("fr");
    assert_eq!(fr.stroke('a'), at(16, Mods::None), "a is on KEY_Q");
    assert_eq!(fr.stroke('q'), at(30, Mods::None));
    assert_eq!(fr.stroke('1'), at(2, Mods::Shift), "digits take Shift");
    assert_eq!(fr.stroke('&'), at(2, Mods::None));
    assert_eq!(host("fr-latin1").stroke('é'), at(3, Mods::None));
    assert_eq!(host("fr-latin9").stroke('€'), at(18, Mods::AltGr));
}

#[test]
fn us_from_its_file_is_the_table_built_in() {
    let us = host("us");
    let mut differ = Vec::new();
    for ch in (' '..='~').chain(['\n', '\t']) {
        let built_in = crate::vm::keys::us_key(ch).map(|(code, shift)| Stroke { code, mods: if shift { Mods::Shift } else { Mods::None } });
        assert!(us.stroke(ch).is_some(), "{ch:?}");
        if us.stroke(ch) != built_in {
            differ.push((ch, us.stroke(ch).unwrap()));
        }
    }
    // Only where the file has a plainer key: its 102nd key (KEY_102ND, between left Shift and
    // Z on ISO keyboards; the guest's virtio keyboard has it) types < without Shift.
    assert_eq!(differ, [('<', Stroke { code: 86, mods: Mods::None })]);
}

/// Every layout the installer offers parses, and gives exactly what kbd's own loadkeys puts
/// in the kernel's plain, Shift, AltGr and Shift+AltGr maps: for each character, the plainest
/// stroke.
#[test]
fn every_offered_layout_types_what_loadkeys_loads() {
    // A reaper another test runs would take loadkeys's exit status.
    let _only_reaper = crate::reaper::exclusive_for_test();
    for &name in installer::config::KEYMAPS {
        let ours = host(name);
        let want = loadkeys_strokes(name);
        let mut diff: Vec<String> = Vec::new();
        for (ch, w) in &want {
            if ours.stroke(*ch) != Some(*w) {
                diff.push(format!("{ch:?}: loadkeys {w:?}, ours {:?}", ours.stroke(*ch)));
            }
        }
        for (ch, o) in &ours.strokes {
            if !want.contains_key(ch) {
                diff.push(format!("{ch:?}: not in loadkeys's maps, ours {o:?}"));
            }
        }
        diff.sort();
        assert!(diff.is_empty(), "{name}: {} differences: {diff:#?}", diff.len());
        // Not an empty comparison (console-data's lv-latin7 is a partial map: 35 characters).
        assert!(want.len() >= 30, "{name}: only {} characters", want.len());
    }
}

/// kbd's `loadkeys --mktable --unicode NAME`: the kernel maps as C arrays, read back into
/// the plainest stroke per character, as the guest's kernel would turn keys into text.
fn loadkeys_strokes(name: &str) -> HashMap<char, Stroke> {
    let out = std::process::Command::new("loadkeys")
        .args(["--mktable", "--unicode", name])
        .output()
        .unwrap_or_else(|e| panic!("running kbd's loadkeys (a build host package, like console-data): {e}"));
    assert!(out.status.success(), "loadkeys {name}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut maps: [Option<Vec<u16>>; 4] = Default::default();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(map) = ["plain_map[", "shift_map[", "altgr_map[", "shift_altgr_map["].iter().position(|m| line.contains(&format!(" {m}"))) else {
            continue;
        };
        let mut values = Vec::new();
        for l in lines.by_ref().take_while(|l| !l.starts_with('}')) {
            values.extend(l.split(',').map(str::trim).filter(|v| !v.is_empty()).map(|v| u16::from_str_radix(&v[2..], 16).unwrap()));
        }
        assert_eq!(values.len(), 256, "{name}: map {map}");
        maps[map] = Some(values);
    }
    let get = |map: usize, key: u16| maps[map].as_ref().map(|m| m[key as usize]);
    const SHIFT: u16 = 0xf700;
    const ALTGR: u16 = 0xf701;
    let reachable = |mods: Mods| match mods {
        Mods::None => true,
        Mods::Shift => get(0, 42) == Some(SHIFT) && get(1, 42) == Some(SHIFT),
        Mods::AltGr => get(0, 100) == Some(ALTGR) && get(2, 100) == Some(ALTGR),
        Mods::ShiftAltGr => get(0, 42) == Some(SHIFT) && get(1, 100) == Some(ALTGR) && get(3, 100) == Some(ALTGR) && get(1, 42) == Some(SHIFT),
    };
    let mut strokes = HashMap::new();
    for mods in Mods::ALL {
        if !reachable(mods) {
            continue;
        }
        for code in 1..=MAX_KEY {
            let Some(v) = get(mods.map(), code) else { continue };
            let ch = match v {
                // K(KT_SPEC, 1): Enter.
                0xf201 => '\n',
                // K(KT_LATIN or KT_LETTER, byte): the byte as Latin-1.
                _ if v >> 8 == 0xf0 || v >> 8 == 0xfb => char::from(v as u8),
                _ if v < 0xf000 => char::from_u32(u32::from(v)).unwrap(),
                _ => continue,
            };
            if matches!(ch, '\t' | '\n') || !ch.is_control() {
                strokes.entry(ch).or_insert(Stroke { code, mods });
            }
        }
    }
    strokes
}

#[test]
fn columns_fill_the_keymaps_line_in_order_and_one_symbol_fills_all() {
    let k = mem(&[(
        "test",
        "keymaps 0-3,4\n\
         keycode 42 = Shift\n\
         keycode 100 = AltGr\n\
         keycode 30 = a\n\
         keycode 2 = one exclam onesuperior exclamdown\n\
         keycode 3 = two at\n\
         altgr keycode 3 = twosuperior\n\
         keycode 4 = U+20ac\n\
         keycode 5 = 0x24 0244 +U+00E4\n",
    )])
    .unwrap();
    assert_eq!(k.stroke('a'), at(30, Mods::None));
    assert_eq!(k.stroke('A'), at(30, Mods::Shift), "one ASCII letter gets its capital under Shift");
    assert_eq!(k.stroke('1'), at(2, Mods::None));
    assert_eq!(k.stroke('!'), at(2, Mods::Shift));
    assert_eq!(k.stroke('¹'), at(2, Mods::AltGr));
    assert_eq!(k.stroke('¡'), at(2, Mods::ShiftAltGr));
    assert_eq!(k.stroke('@'), at(3, Mods::Shift));
    assert_eq!(k.stroke('²'), at(3, Mods::AltGr));
    // One non-letter symbol is the key in every map: plainest is plain.
    assert_eq!(k.stroke('€'), at(4, Mods::None));
    // Hexadecimal, octal (Latin-1 ¤) and Unicode.
    assert_eq!(k.stroke('$'), at(5, Mods::None));
    assert_eq!(k.stroke('¤'), at(5, Mods::Shift));
    assert_eq!(k.stroke('ä'), at(5, Mods::AltGr));
}

#[test]
fn later_lines_override_includes_and_holes_clear_unless_alt_is_meta() {
    let files: &'static [(&str, &str)] = &[
        ("test", "keymaps 0-2\ninclude \"mods\"\ninclude \"layout\"\nkeycode 16 = q Q\n\tkeycode 17 = w\naltgr keycode 17 = at\n"),
        ("mods", MODS),
        ("layout", "keycode 16 = q Q at\nkeycode 17 = z Z\n"),
    ];
    let k = mem(files).unwrap();
    // The later full line left AltGr+Q a hole; the one-symbol line for 17 was cleared and
    // refilled, its AltGr map kept from the modifier line after it.
    assert_eq!(k.stroke('@'), at(17, Mods::AltGr));
    assert_eq!(k.stroke('z'), None);
    assert_eq!(k.stroke('W'), at(17, Mods::Shift));

    let files: &'static [(&str, &str)] = &[("test", "keymaps 0-2\nalt_is_meta\ninclude \"mods\"\nkeycode 16 = q Q at\nkeycode 16 = x X\n"), ("mods", MODS)];
    assert_eq!(mem(files).unwrap().stroke('@'), at(16, Mods::AltGr), "alt_is_meta keeps what a hole would clear");
}

#[test]
fn modifiers_that_cannot_be_held_give_no_strokes() {
    // No AltGr key: AltGr's map exists but nothing reaches it.
    let files: &'static [(&str, &str)] = &[("test", "keymaps 0-2\nkeycode 42 = Shift\nkeycode 100 = Alt\nkeycode 16 = q Q at\n")];
    let k = mem(files).unwrap();
    assert_eq!(k.stroke('Q'), at(16, Mods::Shift));
    assert_eq!(k.stroke('@'), None);
}

#[test]
fn greek_names_follow_the_charset() {
    let files: &'static [(&str, &str)] = &[("test", "keymaps 0-1\nkeycode 42 = Shift\ncharset \"iso-8859-7\"\nkeycode 50 = mu Mu\nkeycode 30 = alpha Alpha\nkeycode 31 = 0xf3\n")];
    let k = mem(files).unwrap();
    assert_eq!(k.stroke('μ'), at(50, Mods::None), "Greek mu under iso-8859-7");
    assert_eq!(k.stroke('Α'), at(30, Mods::Shift));
    assert_eq!(k.stroke('σ'), at(31, Mods::None), "0xf3 in iso-8859-7");
    let files: &'static [(&str, &str)] = &[("test", "keymaps 0-1\nkeycode 50 = mu\n")];
    assert_eq!(mem(files).unwrap().stroke('µ'), at(50, Mods::None), "the micro sign in Latin-1");
}

#[test]
fn bad_files_are_refused_naming_the_file_and_line() {
    let e = mem(&[("test", "keymaps 0-1\n\nkeycode 16 = q nosuchsym\n")]).unwrap_err().to_string();
    assert_eq!(e, "/mem/test:3: unknown keysym \"nosuchsym\"");
    let e = mem(&[("test", "keymaps 0-1\naltgr keycode 16 = at\n")]).unwrap_err().to_string();
    assert_eq!(e, "/mem/test:2: adding map 2 violates explicit keymaps line");
    let e = mem(&[("test", "keymaps 0-1\nkeycode 16 = q Q at\n")]).unwrap_err().to_string();
    assert_eq!(e, "/mem/test:2: too many (3) entries on one line");
    let e = mem(&[("test", "include \"gone\"\n")]).unwrap_err().to_string();
    assert_eq!(e, "/mem/test: include \"gone\" not found next to it or in the include directories");
    let e = mem(&[("test", "keycode = q\n")]).unwrap_err().to_string();
    assert_eq!(e, "/mem/test:1: not a keycode line: \"keycode = q\"");
    let e = mem(&[("test", "charset \"ebcdic\"\n")]).unwrap_err().to_string();
    assert_eq!(e, "/mem/test:1: unknown charset \"ebcdic\"");
    let e = mem(&[("test", "include \"test\"\n")]).unwrap_err().to_string();
    assert!(e.contains("nested too deeply"), "{e}");
    let e = Keymap::load("no-such-layout", Path::new(HOST)).unwrap_err().to_string();
    assert_eq!(e, "keymap \"no-such-layout\" is not in /usr/share/keymaps/i386");
    assert!(Keymap::load("../../../etc/passwd", Path::new(HOST)).is_err());
    // Strings, compose lines and comments are skipped, whatever they quote.
    let files: &'static [(&str, &str)] = &[("test", "# c\n! c\nstring F1 = \"#!\"\ncompose '!' '!' to U+00a1\nstrings as usual\nkeycode 16 = q # comment\n")];
    assert_eq!(mem(files).unwrap().stroke('q'), at(16, Mods::None));
}

#[test]
fn an_unusable_system_keymap_says_why_and_us_is_built_in() {
    assert_eq!(SystemKeymap::load("us", Path::new("/nonexistent")), SystemKeymap::Us);
    let SystemKeymap::Unusable { name, reason } = SystemKeymap::load("de", Path::new("/nonexistent")) else { panic!("loaded from nowhere") };
    assert_eq!(name, "de");
    assert!(reason.contains("/nonexistent/i386"), "{reason}");
    let SystemKeymap::Loaded(k) = SystemKeymap::load("de", Path::new(HOST)) else { panic!("de did not load") };
    assert_eq!(k.name(), "de");
}

/// Scripts behind a toggle key (AltGr_Lock, a Ctrl key that switches maps) are not in the four
/// maps text entry uses: refused, as console-data's layouts put them; mk has Cyrillic on AltGr.
#[test]
fn scripts_behind_a_layout_toggle_are_not_typed() {
    for (name, ch) in [("gr", 'α'), ("il", 'א'), ("ru", 'я'), ("ua", 'а'), ("by", 'а'), ("bg", 'а'), ("sr-cy", 'а')] {
        assert_eq!(host(name).stroke(ch), None, "{name} {ch}");
        assert_eq!(host(name).stroke('a'), at(30, Mods::None), "{name}");
    }
    assert_eq!(host("mk").stroke('а'), at(30, Mods::AltGr));
}

/// The charset tables are the Encoding Standard's ISO 8859 (its ISO-8859-9 is windows-1254,
/// the same from 0xA0 up), byte for byte.
#[test]
fn charset_tables_are_the_iso_8859_charsets() {
    use encoding_rs::*;
    let pairs = [
        (Charset::Latin2, ISO_8859_2),
        (Charset::Latin3, ISO_8859_3),
        (Charset::Latin4, ISO_8859_4),
        (Charset::Cyrillic, ISO_8859_5),
        (Charset::Greek, ISO_8859_7),
        (Charset::Hebrew, ISO_8859_8),
        (Charset::Turkish, WINDOWS_1254),
        (Charset::Nordic, ISO_8859_10),
        (Charset::Latin9, ISO_8859_15),
        (Charset::Latin1, WINDOWS_1252),
    ];
    for (cs, enc) in pairs {
        for byte in 0xa0..=0xffu8 {
            let bytes = [byte];
            let (text, had_errors) = enc.decode_without_bom_handling(&bytes);
            let want = (!had_errors).then(|| text.chars().next()).flatten();
            assert_eq!(cs.decode(byte), want, "{cs:?} {byte:#x}");
        }
        assert_eq!(cs.decode(0x9f), None);
    }
    assert_eq!(Charset::Undecoded.decode(0xe4), None);
}
