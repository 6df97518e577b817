//! Seeded mutation fuzzing of the real fixtures: every mutated file must load or fail with an
//! error, never panic; a successful load must still be self-consistent.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::{pt_dir, read_entries, write_zip, Rng, ZipEntry, VALID_PT};
use ptfile::read_pt_bytes;

/// Override with `PTFILE_FUZZ_CASES` / `PTFILE_FUZZ_SEED` for a longer campaign.
const CASES_PER_FILE: usize = 300;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Overwrites 4 or 8 bytes at `at` (clamped into `buf`) with a huge or random integer.
fn huge_int(rng: &mut Rng, buf: &mut [u8], at: usize) {
    let width = if rng.below(2) == 0 { 4 } else { 8 };
    if buf.len() < width {
        return;
    }
    let at = at.min(buf.len() - width);
    let v: u64 = match rng.below(5) {
        0 => u64::MAX,
        1 => i64::MAX as u64,
        2 => 1 << 40,
        3 => 0x8000_0000,
        _ => rng.next(),
    };
    buf[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

/// A position in the pickle, biased towards the argument of an opcode that carries a length,
/// an int or a memo index.
fn pickle_pos(rng: &mut Rng, pkl: &[u8]) -> usize {
    if rng.below(3) > 0 {
        for _ in 0..16 {
            let at = rng.below(pkl.len());
            if b"XJMKhqrj\x8a\x8c".contains(&pkl[at]) {
                return at + 1;
            }
        }
    }
    rng.below(pkl.len())
}

#[test]
fn mutated_fixtures_never_panic() {
    let Some(dir) = pt_dir() else { return };
    let started = Instant::now();
    let cases = env_or("PTFILE_FUZZ_CASES", CASES_PER_FILE as u64) as usize;
    let mut rng = Rng::new(env_or("PTFILE_FUZZ_SEED", 1));
    let (mut loaded, mut rejected) = (0usize, 0usize);
    let mut slowest = Duration::ZERO;
    // Panics are caught and reported below with the case that caused them.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for file in VALID_PT {
        let original = std::fs::read(dir.join(file)).unwrap();
        let (mut entries, ranges): (Vec<ZipEntry>, Vec<_>) =
            read_entries(&original).into_iter().unzip();
        let pkl_idx = entries
            .iter()
            .position(|e| e.name.ends_with("/data.pkl"))
            .unwrap();
        let pkl_range = ranges[pkl_idx].clone();
        let pkl = entries[pkl_idx].data.clone();
        let cd_start = {
            let eocd = original.len() - 22;
            u32::from_le_bytes(original[eocd + 16..eocd + 20].try_into().unwrap()) as usize
        };
        for case in 0..cases {
            let kind = case % 8;
            // Kinds 0-2 and 6 mutate the raw file; the others mutate data.pkl and rebuild the
            // archive with a matching CRC, so the mutation reaches the unpickler.
            let input = match kind {
                0 => {
                    let mut m = original.clone();
                    for _ in 0..1 + rng.below(8) {
                        let at = rng.below(m.len());
                        m[at] = rng.next() as u8;
                    }
                    m
                }
                1 => {
                    let mut m = original.clone();
                    let at = pkl_range.start + rng.below(pkl_range.len());
                    m[at] ^= 1 << rng.below(8);
                    m
                }
                2 => original[..rng.below(original.len())].to_vec(),
                6 => {
                    let mut m = original.clone();
                    let at = if rng.below(2) == 0 {
                        cd_start + rng.below(m.len() - cd_start)
                    } else {
                        let r = &ranges[rng.below(ranges.len())];
                        r.start.saturating_sub(30 + rng.below(64))
                    };
                    huge_int(&mut rng, &mut m, at);
                    m
                }
                _ => {
                    let mut p = pkl.clone();
                    match kind {
                        3 => {
                            for _ in 0..1 + rng.below(4) {
                                let at = rng.below(p.len());
                                p[at] = rng.next() as u8;
                            }
                        }
                        4 => {
                            for _ in 0..1 + rng.below(3) {
                                let at = rng.below(p.len());
                                if rng.below(2) == 0 {
                                    p.insert(at, rng.next() as u8);
                                } else {
                                    p.remove(at);
                                }
                            }
                        }
                        5 => {
                            let at = pickle_pos(&mut rng, &p);
                            huge_int(&mut rng, &mut p, at);
                        }
                        _ => p.truncate(rng.below(p.len())),
                    }
                    let mutated = ZipEntry::new(&entries[pkl_idx].name, p);
                    let orig = std::mem::replace(&mut entries[pkl_idx], mutated);
                    let zip = write_zip(&entries, false);
                    entries[pkl_idx] = orig;
                    zip
                }
            };
            let t0 = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| read_pt_bytes(&input, "fuzz.pt")));
            slowest = slowest.max(t0.elapsed());
            match result {
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{file} case {case} (kind {kind}) panicked: {msg}"));
                }
                Ok(Ok(ckpt)) => {
                    loaded += 1;
                    let total: usize = ckpt.tensors.iter().map(|(_, t)| t.data.len()).sum();
                    assert!(total <= 16 * input.len());
                    for (name, t) in &ckpt.tensors {
                        assert_eq!(
                            t.data.len(),
                            t.numel() * t.dtype.size_in_bytes(),
                            "{file} case {case}: {name}"
                        );
                    }
                }
                Ok(Err(e)) => {
                    rejected += 1;
                    let msg = e.to_string();
                    assert!(msg.starts_with("fuzz.pt: "), "{msg}");
                }
            }
        }
    }
    std::panic::set_hook(hook);
    eprintln!(
        "fuzz: {} cases, {loaded} loaded, {rejected} rejected, slowest {slowest:?}, total {:?}",
        loaded + rejected + failures.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random small strided views (including stride 0, empty and 0-d tensors) against a naive
/// reference, with storages that are exactly large enough or one element short.
#[test]
fn random_strided_views_match_reference() {
    use common::{archive, Pk};
    let mut rng = Rng::new(3);
    let (mut ok, mut short) = (0, 0);
    for case in 0..400 {
        let ndim = rng.below(5);
        let shape: Vec<i64> = (0..ndim).map(|_| rng.below(5) as i64).collect();
        let stride: Vec<i64> = (0..ndim).map(|_| rng.below(7) as i64).collect();
        let offset = rng.below(6) as i64;
        let numel: i64 = shape.iter().product();
        let need = if numel == 0 {
            0
        } else {
            offset
                + shape
                    .iter()
                    .zip(&stride)
                    .map(|(d, s)| (d - 1) * s)
                    .sum::<i64>()
                + 1
        };
        let too_short = numel > 0 && rng.below(4) == 0;
        let storage_numel = if too_short {
            need - 1
        } else {
            need + rng.below(3) as i64
        };
        let (ty, es) = if case % 2 == 0 {
            ("IntStorage", 4)
        } else {
            ("DoubleStorage", 8)
        };
        let storage: Vec<u8> = (0..storage_numel)
            .flat_map(|e| {
                if es == 4 {
                    (e as i32).to_le_bytes().to_vec()
                } else {
                    (e as f64).to_le_bytes().to_vec()
                }
            })
            .collect();
        let mut p = Pk::new();
        p.op(b"}(")
            .str("t")
            .tensor(ty, "0", storage_numel, offset, &shape, &stride)
            .op(b"u");
        let result = read_pt_bytes(&archive(p.stop(), &[("0", storage)]), "views.pt");
        if too_short {
            let e = result.expect_err("storage one element short");
            assert!(e.to_string().contains("needs"), "{e}");
            short += 1;
            continue;
        }
        let ck = result.unwrap_or_else(|e| panic!("case {case} {shape:?} {stride:?}: {e}"));
        let t = ck.get("t").unwrap();
        assert_eq!(
            t.shape,
            shape.iter().map(|&d| d as usize).collect::<Vec<_>>()
        );
        // Row-major walk over the multi-index.
        let mut want = Vec::new();
        let mut idx = vec![0i64; ndim];
        for _ in 0..numel {
            let e = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<i64>();
            want.push(e as f64);
            for d in (0..ndim).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let got: Vec<f64> = t
            .data
            .chunks_exact(es)
            .map(|c| {
                if es == 4 {
                    f64::from(i32::from_le_bytes(c.try_into().unwrap()))
                } else {
                    f64::from_le_bytes(c.try_into().unwrap())
                }
            })
            .collect();
        assert_eq!(
            got, want,
            "case {case}: shape {shape:?} stride {stride:?} offset {offset}"
        );
        ok += 1;
    }
    assert!(ok > 200 && short > 30, "{ok} loaded, {short} short");
}

struct Soup {
    rng: Rng,
    memo: u8,
}

const KEYS: [&str; 8] = [
    "ema",
    "model",
    "module",
    "state_dict",
    "w",
    "a.b",
    "args",
    "",
];
const GLOBALS: [(&str, &str); 8] = [
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("torch", "float16"),
    ("argparse", "Namespace"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch", "Size"),
];
const STORAGE_TYPES: [&str; 5] = [
    "FloatStorage",
    "HalfStorage",
    "LongStorage",
    "BoolStorage",
    "QInt8Storage",
];

impl Soup {
    /// Appends a `_rebuild_tensor_v2` call with random (mostly valid) storage and view.
    fn tensor(&mut self, p: &mut common::Pk) {
        let rng = &mut self.rng;
        let ndim = rng.below(4);
        let shape: Vec<i64> = (0..ndim).map(|_| rng.below(6) as i64).collect();
        let stride: Vec<i64> = (0..ndim).map(|_| rng.below(9) as i64).collect();
        let ty = if rng.below(10) == 0 {
            STORAGE_TYPES[rng.below(STORAGE_TYPES.len())]
        } else {
            STORAGE_TYPES[rng.below(2)]
        };
        p.tensor(
            ty,
            ["0", "1", "0", "1", "9"][rng.below(5)],
            rng.below(24) as i64,
            rng.below(4) as i64,
            &shape,
            &stride,
        );
    }

    /// Appends one well-formed value: tensors, dicts, lists, scalars, memo hits, calls.
    fn value(&mut self, p: &mut common::Pk, depth: usize) {
        match self.rng.below(10) {
            0..=3 => self.tensor(p),
            4 | 5 if depth < 3 => {
                let dict = self.rng.below(2) == 0;
                p.op(if dict { b"}(" } else { b"(" });
                for _ in 0..self.rng.below(5) {
                    if dict {
                        p.str(KEYS[self.rng.below(KEYS.len())]);
                    }
                    self.value(p, depth + 1);
                }
                p.op(if dict { b"u" } else { b"l" });
            }
            6 => {
                p.str(KEYS[self.rng.below(KEYS.len())]);
            }
            7 if self.memo > 0 => {
                p.op(&[b'h', self.rng.below(self.memo as usize) as u8]);
            }
            8 if depth < 3 => {
                let (m, n) = GLOBALS[self.rng.below(GLOBALS.len())];
                p.global(m, n).op(b"(");
                for _ in 0..self.rng.below(4) {
                    self.value(p, depth + 1);
                }
                p.op(b"tR");
            }
            9 => {
                p.global("torch._utils", "_rebuild_parameter").op(b"(");
                self.tensor(p);
                p.op(b"\x89")
                    .global("collections", "OrderedDict")
                    .op(b")RtR");
            }
            _ => {
                p.int(self.rng.below(300) as i64);
            }
        }
        if self.memo < 255 && self.rng.below(4) == 0 {
            p.op(&[b'q', self.memo]);
            self.memo += 1;
        }
    }
}

/// Random well-formed pickles built from the fragments torch pickles are made of, half of them
/// then corrupted with a few stray opcodes, so the cases reach selection and tensor validation
/// rather than stopping at the first bad byte.
#[test]
fn opcode_soup_never_panics() {
    use common::{archive, Pk};
    let mut soup = Soup {
        rng: Rng::new(env_or("PTFILE_FUZZ_SEED", 2)),
        memo: 0,
    };
    let storages = [("0", vec![7u8; 64]), ("1", vec![9u8; 256])];
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let (mut loaded, mut failures) = (0, Vec::new());
    let cases = env_or("PTFILE_FUZZ_CASES", 3000) as usize;
    for case in 0..cases {
        soup.memo = 0;
        let mut p = Pk::new();
        p.op(b"}(");
        for _ in 0..1 + soup.rng.below(6) {
            p.str(KEYS[soup.rng.below(KEYS.len())]);
            soup.value(&mut p, 0);
        }
        p.op(b"u");
        let mut pkl = p.stop();
        if case % 2 == 1 {
            for _ in 0..1 + soup.rng.below(3) {
                let at = soup.rng.below(pkl.len());
                let op = b"}])(NaesutlRb012Qhq.\x85\x94\x93"[soup.rng.below(22)];
                if soup.rng.below(2) == 0 {
                    pkl.insert(at, op);
                } else {
                    pkl[at] = op;
                }
            }
        }
        let bytes = archive(pkl, &storages);
        match catch_unwind(AssertUnwindSafe(|| read_pt_bytes(&bytes, "soup.pt"))) {
            Err(_) => failures.push(format!("case {case} panicked")),
            Ok(Ok(ck)) => {
                loaded += 1;
                for (_, t) in &ck.tensors {
                    assert_eq!(t.data.len(), t.numel() * t.dtype.size_in_bytes());
                }
            }
            Ok(Err(e)) => assert!(e.to_string().starts_with("soup.pt: "), "{e}"),
        }
    }
    std::panic::set_hook(hook);
    eprintln!("soup: {cases} cases, {loaded} loaded");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        loaded > cases / 10,
        "too few cases reach tensor loading: {loaded}"
    );
}
