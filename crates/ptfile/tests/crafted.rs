//! Hand-made archives and pickles: features the fixtures don't exercise (strided views, v3
//! tensors, zip64, memo sharing) and malicious inputs that must fail cleanly without allocating.

mod common;

use std::time::{Duration, Instant};

use common::{archive, f32_bytes, write_zip, Pk, ZipEntry};
use ptfile::{read_pt_bytes, read_pt_bytes_key, Container, DType, PtError, RawTensor};

fn load(bytes: &[u8]) -> Result<ptfile::Checkpoint, PtError> {
    read_pt_bytes(bytes, "crafted.pt")
}

fn f32s(t: &RawTensor) -> Vec<f32> {
    assert_eq!(t.dtype, DType::F32);
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn iota(n: usize) -> Vec<u8> {
    f32_bytes(&(0..n).map(|i| i as f32).collect::<Vec<_>>())
}

/// `{name: tensor}` with one FloatStorage '0' holding `numel` floats.
fn one_tensor(numel: i64, offset: i64, shape: &[i64], stride: &[i64], storage: Vec<u8>) -> Vec<u8> {
    let mut p = Pk::new();
    p.op(b"}(")
        .str("w")
        .tensor("FloatStorage", "0", numel, offset, shape, stride)
        .op(b"u");
    archive(p.stop(), &[("0", storage)])
}

fn err_of(bytes: &[u8]) -> (PtError, String) {
    let started = Instant::now();
    let e = load(bytes).expect_err("must be rejected");
    assert!(started.elapsed() < Duration::from_secs(5), "took too long");
    let msg = e.to_string();
    assert!(msg.starts_with("crafted.pt: "), "{msg}");
    (e, msg)
}

#[test]
fn strided_views_are_gathered() {
    // shape (2, 3, 4), strides (1, 8, 2) over 24 floats: out[i][j][k] = s[i + 8j + 2k].
    let ck = load(&one_tensor(24, 0, &[2, 3, 4], &[1, 8, 2], iota(24))).unwrap();
    let mut want = Vec::new();
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                want.push((i + 8 * j + 2 * k) as f32);
            }
        }
    }
    let t = ck.get("w").unwrap();
    assert_eq!(t.shape, [2, 3, 4]);
    assert_eq!(f32s(t), want);

    // A transpose with a storage offset: (3, 2) with strides (1, 3) from element 2.
    let ck = load(&one_tensor(8, 2, &[3, 2], &[1, 3], iota(8))).unwrap();
    assert_eq!(f32s(ck.get("w").unwrap()), [2., 5., 3., 6., 4., 7.]);

    // Contiguous rows from an offset; a 0-d tensor; an empty tensor.
    let ck = load(&one_tensor(8, 4, &[2, 2], &[2, 1], iota(8))).unwrap();
    assert_eq!(f32s(ck.get("w").unwrap()), [4., 5., 6., 7.]);
    let ck = load(&one_tensor(8, 3, &[], &[], iota(8))).unwrap();
    assert_eq!(ck.get("w").unwrap().shape, Vec::<usize>::new());
    assert_eq!(f32s(ck.get("w").unwrap()), [3.]);
    let ck = load(&one_tensor(8, 0, &[0, 5], &[5, 1], iota(8))).unwrap();
    assert!(ck.get("w").unwrap().data.is_empty());

    // Broadcast (stride 0) within the size budget is materialised.
    let ck = load(&one_tensor(2, 1, &[3, 2], &[0, 0], iota(2))).unwrap();
    assert_eq!(f32s(ck.get("w").unwrap()), [1.; 6]);
}

#[test]
fn parameter_v3_untyped_storage_and_zip64() {
    let mut p = Pk::new();
    p.op(&[0x95])
        .op(&u64::MAX.to_le_bytes()) // FRAME lengths are hints only
        .op(b"}(")
        .str("param")
        .global("torch._utils", "_rebuild_parameter")
        .op(b"(")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .op(&[0x88])
        .global("collections", "OrderedDict")
        .op(b")RtR")
        .str("half")
        .global("torch._utils", "_rebuild_tensor_v3")
        .op(b"((")
        .str("storage")
        .global("torch", "UntypedStorage")
        .str("1")
        .str("cuda:0")
        .int(8)
        .op(b"tQ")
        .int(1)
        .ints(&[3])
        .ints(&[1])
        .op(&[0x89])
        .global("collections", "OrderedDict")
        .op(b")R")
        .global("torch", "float16")
        .op(b"tR")
        .str("evil")
        .global("os", "system")
        .str("echo pwned")
        .op(&[0x85])
        .op(b"R")
        .op(b"u");
    let half: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let entries = vec![
        ZipEntry::new("ckpt/data.pkl", p.stop()),
        ZipEntry::new("ckpt/data/0", iota(4)),
        ZipEntry::new("ckpt/data/1", half),
    ];
    for zip64 in [false, true] {
        let ck = load(&write_zip(&entries, zip64)).unwrap();
        assert_eq!(ck.container, Container::Plain);
        assert_eq!(ck.other_top_level_keys, ["evil"]);
        assert_eq!(f32s(ck.get("param").unwrap()), [0., 1., 2., 3.]);
        let h = ck.get("half").unwrap();
        assert_eq!((h.dtype, h.shape.as_slice()), (DType::F16, &[3][..]));
        assert_eq!(
            h.data,
            [2.0f32, 3.0, 4.0]
                .map(|x| half::f16::from_f32(x).to_le_bytes())
                .concat()
        );
    }
}

#[test]
fn shared_memo_dict_and_selection() {
    // {"ema": D, "model": D, "step": 5, "nested": {"inner": {"w": t}}} with D = {"w": t, "sub": {"b": t2}}
    let mut p = Pk::new();
    p.op(b"}q\x00(")
        .str("ema")
        .op(b"}q\x01(")
        .str("w")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .str("sub")
        .op(b"}")
        .str("b")
        .tensor("FloatStorage", "0", 4, 2, &[2], &[1])
        .op(b"su")
        .str("model")
        .op(b"h\x01")
        .str("step")
        .int(5)
        .op(b"u");
    let bytes = archive(p.stop(), &[("0", iota(4))]);
    let ema = load(&bytes).unwrap();
    assert_eq!(ema.container, Container::Ema);
    assert_eq!(ema.other_top_level_keys, ["model", "step"]);
    let names: Vec<_> = ema.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w", "sub.b"]);
    assert_eq!(f32s(ema.get("sub.b").unwrap()), [2., 3.]);
    let model = read_pt_bytes_key(&bytes, "crafted.pt", Some("model")).unwrap();
    assert_eq!(model.container, Container::Model);
    assert_eq!(model.tensors, ema.tensors);
    let e = read_pt_bytes_key(&bytes, "crafted.pt", Some("step")).unwrap_err();
    assert!(e.to_string().contains("'step' holds an int"), "{e}");

    // "module" (DeepSpeed) is taken when there is no ema/model; an empty "ema" is passed over.
    let mut p = Pk::new();
    p.op(b"}(")
        .str("ema")
        .op(b"}")
        .str("module")
        .op(b"}(")
        .str("w")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .op(b"uu");
    let ck = load(&archive(p.stop(), &[("0", iota(4))])).unwrap();
    assert_eq!(ck.container, Container::Module);
}

#[test]
fn malformed_archives() {
    let good = one_tensor(4, 0, &[4], &[1], iota(4));
    assert!(load(&good).is_ok());

    let (e, m) = err_of(&[]);
    assert!(
        matches!(e, PtError::Malformed { .. }) && m.contains("empty file"),
        "{m}"
    );
    let (_, m) = err_of(b"definitely not a checkpoint, just some text");
    assert!(m.contains("not a zip archive"), "{m}");
    let mut legacy = vec![
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
    ];
    legacy.extend_from_slice(&[0; 64]);
    let (e, m) = err_of(&legacy);
    assert!(
        matches!(e, PtError::Unsupported { .. }) && m.contains("legacy"),
        "{m}"
    );
    let (_, m) = err_of(&good[..good.len() / 2]);
    assert!(m.contains("truncated zip archive"), "{m}");

    // Corrupted tensor bytes are caught by the CRC.
    let mut bad = good.clone();
    let at = bad.windows(16).position(|w| w == iota(4)).unwrap();
    bad[at + 9] ^= 1;
    let (_, m) = err_of(&bad);
    assert!(m.contains("'ckpt/data/0' is corrupt (CRC-32"), "{m}");

    // Deflate-compressed entries, big-endian data, missing storages.
    let mut pkl = Pk::new();
    pkl.op(b"}(")
        .str("w")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .op(b"u");
    let pkl = pkl.stop();
    let mut deflated = ZipEntry::new("ckpt/data/0", iota(4));
    deflated.method = 8;
    let (e, m) = err_of(&write_zip(
        &[ZipEntry::new("ckpt/data.pkl", pkl.clone()), deflated],
        false,
    ));
    assert!(
        matches!(e, PtError::Unsupported { .. }) && m.contains("deflate"),
        "{m}"
    );
    let (e, m) = err_of(&write_zip(
        &[
            ZipEntry::new("ckpt/data.pkl", pkl.clone()),
            ZipEntry::new("ckpt/byteorder", b"big".to_vec()),
            ZipEntry::new("ckpt/data/0", iota(4)),
        ],
        false,
    ));
    assert!(
        matches!(e, PtError::Unsupported { .. }) && m.contains("big-endian"),
        "{m}"
    );
    let (_, m) = err_of(&archive(pkl.clone(), &[]));
    assert!(m.contains("storage 'data/0', which is missing"), "{m}");
    let (_, m) = err_of(&write_zip(&[ZipEntry::new("x/other.pkl", pkl)], false));
    assert!(m.contains("no data.pkl"), "{m}");
}

#[test]
fn tensors_that_do_not_fit_their_storage() {
    const T40: i64 = 1 << 40;
    let (_, m) = err_of(&one_tensor(4, 0, &[T40, T40], &[T40, 1], iota(4)));
    assert!(m.contains("tensor 'w': size overflows"), "{m}");
    let (_, m) = err_of(&one_tensor(4, 0, &[T40], &[1], iota(4)));
    assert!(
        m.contains("tensor 'w' needs 4398046511104 bytes but storage 'data/0' has 16"),
        "{m}"
    );
    let (_, m) = err_of(&one_tensor(4, 1, &[2, 2], &[2, 1], iota(4)));
    assert!(
        m.contains("needs 20 bytes but storage 'data/0' has 16"),
        "{m}"
    );
    // Broadcasting one element to 2^40 elements: within the storage, but far beyond the file.
    let (_, m) = err_of(&one_tensor(1, 0, &[1 << 20, 1 << 20], &[0, 0], iota(1)));
    assert!(m.contains("more than 16x the file size"), "{m}");
    // Storage sizes that lie.
    let (_, m) = err_of(&one_tensor(1 << 62, 0, &[4], &[1], iota(4)));
    assert!(m.contains("size overflows"), "{m}");
    let (_, m) = err_of(&one_tensor(T40, 0, &[4], &[1], iota(4)));
    assert!(
        m.contains("storage 'data/0' declares 4398046511104 bytes but its zip entry holds 16"),
        "{m}"
    );
    let (_, m) = err_of(&one_tensor(4, 0, &[1; 65], &[1; 65], iota(4)));
    assert!(m.contains("tensor has 65 dimensions"), "{m}");
    // Negative sizes and bad storage keys / types.
    let (_, m) = err_of(&one_tensor(4, 0, &[-1], &[1], iota(4)));
    assert!(m.contains("size must be a non-negative int"), "{m}");
    let mut p = Pk::new();
    p.op(b"}(")
        .str("w")
        .tensor("FloatStorage", "../../etc/passwd", 4, 0, &[4], &[1])
        .op(b"u");
    let (_, m) = err_of(&archive(p.stop(), &[("0", iota(4))]));
    assert!(m.contains("not a plain name"), "{m}");
    let mut p = Pk::new();
    p.op(b"}(")
        .str("w")
        .tensor("QInt8Storage", "0", 4, 0, &[4], &[1])
        .op(b"u");
    let (e, m) = err_of(&archive(p.stop(), &[("0", iota(4))]));
    assert!(
        matches!(e, PtError::Unsupported { .. }) && m.contains("QInt8Storage"),
        "{m}"
    );
    let mut p = Pk::new();
    p.op(b"}(")
        .str("q")
        .global("torch._utils", "_rebuild_qtensor")
        .op(b")R")
        .op(b"u");
    let (e, m) = err_of(&archive(p.stop(), &[]));
    assert!(
        matches!(e, PtError::Unsupported { .. }) && m.contains("_rebuild_qtensor"),
        "{m}"
    );
}

#[test]
fn malicious_pickles_fail_without_allocating() {
    let run = |pickle: Vec<u8>| err_of(&archive(pickle, &[("0", iota(4))])).1;

    // Lengths larger than the file.
    for (op, len) in [
        (b'X', &0xFFFF_FFF0u32.to_le_bytes()[..]),
        (0x8d, &u64::MAX.to_le_bytes()[..]),
        (0x8e, &(1u64 << 40).to_le_bytes()[..]),
        (b'B', &0xFFFF_FFFFu32.to_le_bytes()[..]),
        (0x8b, &0xFFFF_FFFFu32.to_le_bytes()[..]),
    ] {
        let mut p = Pk::new();
        p.op(&[op]).op(len).op(b"abc");
        let m = run(p.stop());
        assert!(m.contains("exceeds the"), "{m}");
    }
    // Memo indices that were never stored; a huge one that is.
    let m = run(Pk::new().op(b"j\xff\xff\xff\xff").stop());
    assert!(m.contains("memo key 4294967295 was never stored"), "{m}");
    let m = run(Pk::new().op(b"Nr\xff\xff\xff\xffj\xff\xff\xff\xff").stop());
    assert!(m.contains("top-level object is None"), "{m}");
    // Stack underflow, opcodes outside the subset, no STOP.
    let m = run(Pk::new().op(b"a").stop());
    assert!(m.contains("stack underflow"), "{m}");
    let m = run(Pk::new().op(b"(Ni").stop());
    assert!(m.contains("unsupported pickle opcode 0x69"), "{m}");
    let m = run(Pk::new().op(b"}").0.clone());
    assert!(m.contains("truncated or corrupt pickle"), "{m}");
}

#[test]
fn deep_and_cyclic_structures_are_cheap() {
    const N: usize = 300_000;
    let started = Instant::now();
    // Nested lists via EMPTY_LIST/APPEND, via MARK/LIST, and nested tuples.
    let mut p = Pk::new();
    p.op(&b"]".repeat(N)).op(&b"a".repeat(N - 1));
    let m = err_of(&archive(p.stop(), &[])).1;
    assert!(m.contains("top-level object is a list"), "{m}");
    let mut p = Pk::new();
    p.op(&b"(".repeat(N)).op(&b"l".repeat(N));
    err_of(&archive(p.stop(), &[]));
    let mut p = Pk::new();
    p.op(b")").op(&[0x85].repeat(N));
    err_of(&archive(p.stop(), &[]));
    // A chain of N nested dicts, with a tensor at the bottom that is too deep to be taken.
    let mut p = Pk::new();
    p.op(b"}");
    for _ in 0..N {
        p.str("a").op(b"}");
    }
    p.str("w")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .op(b"s");
    p.op(&b"s".repeat(N));
    let m = err_of(&archive(p.stop(), &[("0", iota(4))])).1;
    assert!(m.contains("no tensors found"), "{m}");
    // A dict that contains itself under every selection key.
    let mut p = Pk::new();
    p.op(b"}q\x00(");
    for k in ["ema", "model", "module", "state_dict", "x"] {
        p.str(k).op(b"h\x00");
    }
    p.op(b"u");
    let m = err_of(&archive(p.stop(), &[])).1;
    assert!(m.contains("no tensors found"), "{m}");
    // One long key set N times: interned, so each SETITEM is O(1).
    let mut p = Pk::new();
    p.op(b"}").str(&"k".repeat(1 << 20)).op(b"q\x010");
    for _ in 0..N {
        p.op(b"h\x01K\x01s");
    }
    let m = err_of(&archive(p.stop(), &[])).1;
    assert!(m.contains("no tensors found"), "{m}");
    // Many names under one very long prefix: the total name length is bounded by the pickle.
    let mut p = Pk::new();
    p.op(b"}")
        .str(&"p".repeat(100_000))
        .op(b"}")
        .str("0")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .op(b"q\x02s");
    for i in 1..50_000 {
        p.str(&i.to_string()).op(b"h\x02s");
    }
    p.op(b"s");
    let m = err_of(&archive(p.stop(), &[("0", iota(4))])).1;
    assert!(m.contains("tensor names are far longer"), "{m}");
    // A memoized huge tuple passed to REDUCE over and over: arguments are never copied whole.
    let mut p = Pk::new();
    p.op(b"(").op(&b"K\x01".repeat(N)).op(b"tq\x03");
    p.global("os", "system").op(b"q\x040");
    p.global("collections", "OrderedDict").op(b"q\x050");
    for _ in 0..N / 2 {
        p.op(b"h\x04h\x03R0h\x05h\x03R0");
    }
    p.op(b"0}");
    let m = err_of(&archive(p.stop(), &[])).1;
    assert!(m.contains("no tensors found"), "{m}");
    assert!(started.elapsed() < Duration::from_secs(20));
}
