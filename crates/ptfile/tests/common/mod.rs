//! Shared test helpers: fixture paths, a tiny stored-zip reader/writer, a pickle builder and a
//! deterministic PRNG.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

/// `/work/shared/golden/pt`, or `None` (with a note) when the fixtures are not checked out.
pub fn pt_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/golden/pt"
    ));
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "note: {} is missing; skipping the golden-file checks",
            dir.display()
        );
        None
    }
}

pub const VALID_PT: [&str; 6] = [
    "dit_forward_1.state_dict.pt",
    "dit_forward_1.train_ckpt.pt",
    "dit_forward_1.fp16.pt",
    "dit_forward_1.bf16.pt",
    "dydit_forward_1.ema.pt",
    "dydit_forward_old_1.state_dict.pt",
];

/// `model.*` tensors of a safetensors golden file: name (prefix removed) -> (shape, f32 values).
pub fn golden_model(file: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let path = pt_dir().expect("checked by caller").join("..").join(file);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let Some(key) = name.strip_prefix("model.") else {
            continue;
        };
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let vals = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(key.to_owned(), (view.shape().to_vec(), vals));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Stored zip archives.

pub struct ZipEntry {
    pub name: String,
    pub data: Vec<u8>,
    pub crc: u32,
    /// Compression method written into the headers (0 = stored; the data is written as is).
    pub method: u16,
}

impl ZipEntry {
    pub fn new(name: &str, data: Vec<u8>) -> ZipEntry {
        let crc = crc32fast::hash(&data);
        ZipEntry {
            name: name.to_owned(),
            data,
            crc,
            method: 0,
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Entries of a valid, comment-less, non-zip64 archive, with the byte range of each entry's data.
pub fn read_entries(zip: &[u8]) -> Vec<(ZipEntry, std::ops::Range<usize>)> {
    let eocd = zip.len() - 22;
    assert_eq!(u32_at(zip, eocd), 0x0605_4b50);
    let count = u16_at(zip, eocd + 10) as usize;
    let mut pos = u32_at(zip, eocd + 16) as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(u32_at(zip, pos), 0x0201_4b50);
        let crc = u32_at(zip, pos + 16);
        let size = u32_at(zip, pos + 20) as usize;
        let (n, m, k) = (
            u16_at(zip, pos + 28) as usize,
            u16_at(zip, pos + 30) as usize,
            u16_at(zip, pos + 32) as usize,
        );
        let name = String::from_utf8(zip[pos + 46..pos + 46 + n].to_vec()).unwrap();
        let local = u32_at(zip, pos + 42) as usize;
        let start =
            local + 30 + u16_at(zip, local + 26) as usize + u16_at(zip, local + 28) as usize;
        out.push((
            ZipEntry {
                name,
                data: zip[start..start + size].to_vec(),
                crc,
                method: 0,
            },
            start..start + size,
        ));
        pos += 46 + n + m + k;
    }
    out
}

/// Writes a stored archive; with `zip64`, sizes and offsets go through zip64 records as torch
/// writes them for files over 4 GiB.
pub fn write_zip(entries: &[ZipEntry], zip64: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u64;
        let size = e.data.len() as u64;
        let (size32, off32) = if zip64 {
            (0xFFFF_FFFFu32, 0xFFFF_FFFFu32)
        } else {
            (size as u32, offset as u32)
        };
        let mut extra = Vec::new();
        if zip64 {
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
        }
        // Local header.
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[45, 0, 0, 0]);
        out.extend_from_slice(&e.method.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&e.crc.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(&e.data);
        // Central record.
        if zip64 {
            extra.extend_from_slice(&offset.to_le_bytes());
            extra[2..4].copy_from_slice(&24u16.to_le_bytes());
        }
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[45, 0, 45, 0, 0, 0]);
        central.extend_from_slice(&e.method.to_le_bytes());
        central.extend_from_slice(&[0; 4]);
        central.extend_from_slice(&e.crc.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 10]);
        central.extend_from_slice(&off32.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
        central.extend_from_slice(&extra);
    }
    let cd_offset = out.len() as u64;
    let cd_size = central.len() as u64;
    out.extend_from_slice(&central);
    let n = entries.len() as u64;
    if zip64 {
        let rec = out.len() as u64;
        out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
        out.extend_from_slice(&44u64.to_le_bytes());
        out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&cd_size.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&rec.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
    }
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let (n16, size32, off32) = if zip64 {
        (0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)
    } else {
        (n as u16, cd_size as u32, cd_offset as u32)
    };
    out.extend_from_slice(&n16.to_le_bytes());
    out.extend_from_slice(&n16.to_le_bytes());
    out.extend_from_slice(&size32.to_le_bytes());
    out.extend_from_slice(&off32.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// A checkpoint archive named `ckpt/` with the given pickle and storages `data/<key>`.
pub fn archive(pickle: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = vec![
        ZipEntry::new("ckpt/data.pkl", pickle),
        ZipEntry::new("ckpt/byteorder", b"little".to_vec()),
    ];
    for (key, data) in storages {
        entries.push(ZipEntry::new(&format!("ckpt/data/{key}"), data.clone()));
    }
    write_zip(&entries, false)
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Pickle builder (protocol 2, as torch.save writes).

pub struct Pk(pub Vec<u8>);

impl Pk {
    pub fn new() -> Pk {
        Pk(vec![0x80, 2])
    }
    pub fn op(&mut self, b: &[u8]) -> &mut Pk {
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Pk {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub fn int(&mut self, v: i64) -> &mut Pk {
        if (0..256).contains(&v) {
            self.0.extend_from_slice(&[b'K', v as u8]);
        } else {
            self.0.extend_from_slice(&[0x8a, 8]);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        self
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Pk {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    pub fn ints(&mut self, v: &[i64]) -> &mut Pk {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }
    /// Pushes `_rebuild_tensor_v2(('storage', torch.<storage_type>, key, 'cpu', numel), offset,
    /// shape, stride, False, OrderedDict())`.
    pub fn tensor(
        &mut self,
        storage_type: &str,
        key: &str,
        numel: i64,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> &mut Pk {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", storage_type)
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(stride)
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")RtR")
    }
    pub fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
}

// ---------------------------------------------------------------------------------------------

/// xorshift64*: deterministic, dependency-free randomness for the fuzz loop.
pub struct Rng(pub u64);

impl Rng {
    /// Any seed works (a zero state would stick at zero, so it is mixed first).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
