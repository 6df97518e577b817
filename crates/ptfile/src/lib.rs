//! Load PyTorch checkpoints (`torch.save` zip format, torch >= 1.6) without executing pickled code.
//!
//! A `.pt` file is a zip archive holding a pickle (`<name>/data.pkl`) plus one entry per tensor
//! storage (`<name>/data/<key>`). Python's unpickler would import and call whatever the pickle names,
//! so a downloaded checkpoint is treated here as untrusted data: a restricted unpickler interprets
//! the opcodes `torch.save` writes as plain data, recognises only torch's tensor rebuild functions,
//! and every length, shape, stride and offset is checked (with overflow checks) against the real
//! bytes before anything is allocated. Malformed input yields a [`PtError`], never a panic or a hang.
//!
//! Which weights are returned follows the upstream DiT/DyDiT loaders: a training checkpoint's
//! `ema` dict if present, else `model`, else `module` (DeepSpeed) or `state_dict`, else the top-level
//! dict itself. Non-tensor entries (optimizer state, `argparse.Namespace`, numbers) are skipped.
//!
//! TorchScript archives (`torch.jit.save`) share the zip layout but pickle a tree of
//! `__torch__.*` module objects instead of a dict; [`read_torchscript`] reads that tree as data
//! (parameters, buffers and plain attributes such as a conv's `stride`/`padding`), again without
//! running any of the archive's code.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::Path;

mod pickle;
mod script;
mod zip;

pub use script::{read_torchscript, read_torchscript_bytes, Attr, ScriptModule};

use pickle::{Obj, Pickle, TensorRef, Value};
use zip::{Archive, BytesSource, FileSource, Source};

/// Element type of a tensor, as torch storages can hold them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// `torch.uint16`/`uint32`/`uint64` (torch >= 2.3, saved through `_rebuild_tensor_v3`).
    U16,
    U32,
    U64,
    /// `torch.complex64`: interleaved (re, im) f32 pairs.
    C64,
    /// `torch.complex128`: interleaved (re, im) f64 pairs.
    C128,
    /// `torch.float8_e4m3fn`.
    F8E4M3,
    /// `torch.float8_e5m2`.
    F8E5M2,
}

impl DType {
    /// Bytes per element, so callers can interpret [`RawTensor::data`].
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 | DType::C64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::C128 => 16,
        }
    }

    /// From a legacy typed-storage class name (`torch.FloatStorage`, ...).
    fn from_storage_name(name: &str) -> Option<DType> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            "ComplexFloatStorage" => DType::C64,
            "ComplexDoubleStorage" => DType::C128,
            _ => return None,
        })
    }

    /// From a `torch.<dtype>` attribute name, as `_rebuild_tensor_v3` receives it.
    fn from_torch_name(name: &str) -> Option<DType> {
        Some(match name {
            "float64" | "double" => DType::F64,
            "float32" | "float" => DType::F32,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "bool" => DType::Bool,
            "uint16" => DType::U16,
            "uint32" => DType::U32,
            "uint64" => DType::U64,
            "complex64" | "cfloat" => DType::C64,
            "complex128" | "cdouble" => DType::C128,
            "float8_e4m3fn" => DType::F8E4M3,
            "float8_e5m2" => DType::F8E5M2,
            _ => return None,
        })
    }
}

/// One tensor's bytes, already made contiguous, so callers never deal with strides or storages.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Row-major, little-endian, `numel() * dtype.size_in_bytes()` bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Which dict of the checkpoint the tensors came from, so callers can log or check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Container {
    /// The top-level dict itself (a plain `state_dict()`).
    Plain,
    /// `ckpt["ema"]`: the EMA weights DiT/DyDiT sample with.
    Ema,
    /// `ckpt["model"]`.
    Model,
    /// `ckpt["module"]` (DeepSpeed).
    Module,
    /// `ckpt["state_dict"]` (Lightning and others).
    StateDict,
    /// Another key, chosen explicitly through [`read_pt_key`].
    Other(String),
}

impl Container {
    fn from_key(key: &str) -> Container {
        match key {
            "ema" => Container::Ema,
            "model" => Container::Model,
            "module" => Container::Module,
            "state_dict" => Container::StateDict,
            k => Container::Other(k.to_owned()),
        }
    }
}

/// The tensors of a checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// In the order they appear in the file; nested dicts are flattened with '.'.
    pub tensors: Vec<(String, RawTensor)>,
    pub container: Container,
    /// Top-level keys that were not taken: all the others when a sub-dict was selected, or the
    /// entries holding no tensors (`epoch`, `args`, ...) for [`Container::Plain`].
    pub other_top_level_keys: Vec<String>,
}

impl Checkpoint {
    /// Looks a tensor up by name (linear scan; convert `tensors` to a map for many lookups).
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// Why a checkpoint could not be loaded. Every message starts with the file name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PtError {
    /// The file could not be opened or read.
    #[error("{file}: {context}: {source}")]
    Io {
        file: String,
        context: String,
        #[source]
        source: io::Error,
    },
    /// Truncated or corrupt: the zip structure, the pickle, or a tensor that does not fit its
    /// storage.
    #[error("{file}: {msg}")]
    Malformed { file: String, msg: String },
    /// Well-formed but outside what this loader reads (pre-1.6 format, compressed entries,
    /// big-endian data, quantized tensors, ...).
    #[error("{file}: {msg}")]
    Unsupported { file: String, msg: String },
    /// The file is fine but holds no dict of tensors where one was expected.
    #[error("{file}: {msg}")]
    NoTensors { file: String, msg: String },
}

/// Loads the weights of a checkpoint, picking the dict the upstream loaders use (see the crate
/// docs). Reads only the storages it returns, so a training checkpoint's optimizer state is never
/// loaded.
pub fn read_pt(path: &Path) -> Result<Checkpoint, PtError> {
    read_pt_key(path, None)
}

/// Like [`read_pt`], but `Some(key)` takes `ckpt[key]` instead of applying the selection rule.
pub fn read_pt_key(path: &Path, key: Option<&str>) -> Result<Checkpoint, PtError> {
    let name = path.display().to_string();
    let io_err = |context: &str, source| PtError::Io {
        file: name.clone(),
        context: context.to_owned(),
        source,
    };
    let file = File::open(path).map_err(|e| io_err("opening", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_err("reading metadata", e))?
        .len();
    load(&FileSource { file, len }, key).map_err(|b| b.named(&name))
}

/// Loads a checkpoint already in memory; `name_for_errors` prefixes every error message.
pub fn read_pt_bytes(bytes: &[u8], name_for_errors: &str) -> Result<Checkpoint, PtError> {
    read_pt_bytes_key(bytes, name_for_errors, None)
}

/// [`read_pt_bytes`] with an explicit sub-dict, as in [`read_pt_key`].
pub fn read_pt_bytes_key(
    bytes: &[u8],
    name_for_errors: &str,
    key: Option<&str>,
) -> Result<Checkpoint, PtError> {
    load(&BytesSource(bytes), key).map_err(|b| b.named(name_for_errors))
}

/// A name from the file as it appears in an error message: control characters escaped and long
/// names cut, so a hostile file cannot inject terminal escapes or megabyte-long messages.
pub(crate) fn show(s: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Internal error: the file name is attached once, at the API boundary.

#[derive(Clone, Copy)]
enum Kind {
    Malformed,
    Unsupported,
    NoTensors,
}

pub(crate) struct Bad {
    kind: Kind,
    msg: String,
    io: Option<io::Error>,
}

impl Bad {
    pub(crate) fn malformed(msg: impl Into<String>) -> Bad {
        Bad {
            kind: Kind::Malformed,
            msg: msg.into(),
            io: None,
        }
    }
    pub(crate) fn unsupported(msg: impl Into<String>) -> Bad {
        Bad {
            kind: Kind::Unsupported,
            msg: msg.into(),
            io: None,
        }
    }
    fn no_tensors(msg: impl Into<String>) -> Bad {
        Bad {
            kind: Kind::NoTensors,
            msg: msg.into(),
            io: None,
        }
    }
    pub(crate) fn io(context: String, e: io::Error) -> Bad {
        Bad {
            kind: Kind::Malformed,
            msg: context,
            io: Some(e),
        }
    }
    fn named(self, file: &str) -> PtError {
        let file = file.to_owned();
        let msg = self.msg;
        match (self.io, self.kind) {
            (Some(source), _) => PtError::Io {
                file,
                context: msg,
                source,
            },
            (None, Kind::Malformed) => PtError::Malformed { file, msg },
            (None, Kind::Unsupported) => PtError::Unsupported { file, msg },
            (None, Kind::NoTensors) => PtError::NoTensors { file, msg },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Materialised tensors may exceed the file size only through views that share a storage (tied
/// weights, `expand()`); this factor bounds that, so a small file cannot demand huge allocations.
const EXPANSION_LIMIT: u64 = 16;
/// How many levels of nested dicts below the selected one are searched for tensors.
const MAX_NESTING: usize = 1;

fn load(src: &dyn Source, key: Option<&str>) -> Result<Checkpoint, Bad> {
    with_pickle(src, |store, p, name_budget, is_torchscript| {
        let sel = select(p, key, name_budget).map_err(|e| {
            if is_torchscript && matches!(e.kind, Kind::NoTensors) {
                Bad::unsupported(
                    "this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; \
                     read it with ptfile::read_torchscript (or load it with torch.jit.load and \
                     save its state_dict())",
                )
            } else {
                e
            }
        })?;

        let mut budget = src.len().saturating_mul(EXPANSION_LIMIT);
        let mut tensors = Vec::with_capacity(sel.tensors.len());
        for (name, t) in sel.tensors {
            let raw = store.tensor(p, &name, t, &mut budget)?;
            tensors.push((name, raw));
        }
        Ok(Checkpoint {
            tensors,
            container: sel.container,
            other_top_level_keys: sel.other_keys,
        })
    })
}

/// Opens the archive, checks its byte order, unpickles `data.pkl` and hands the pieces to `f`:
/// the storage reader, the pickle, a budget for the total length of tensor names (bounded by the
/// pickle's size, so shared references cannot multiply work), and whether the archive is a
/// TorchScript one (it has `constants.pkl`). Shared by [`read_pt`] and [`read_torchscript`].
pub(crate) fn with_pickle<T>(
    src: &dyn Source,
    f: impl FnOnce(&mut Store<'_>, &Pickle, u64, bool) -> Result<T, Bad>,
) -> Result<T, Bad> {
    let archive = Archive::open(src)?;
    let prefix = find_prefix(&archive)?;
    let mut store = Store {
        src,
        archive: &archive,
        prefix: &prefix,
        ranges: HashMap::new(),
        verified: HashSet::new(),
    };
    if let Some(idx) = archive.find(&format!("{prefix}byteorder")) {
        let bytes = store.entry_bytes(idx, 16)?;
        match &*bytes {
            b"little" => {}
            b"big" => {
                return Err(Bad::unsupported(
                    "big-endian checkpoint (byteorder 'big') is not supported",
                ))
            }
            other => {
                return Err(Bad::malformed(format!(
                    "byteorder record is {:?}, expected \"little\"",
                    show(&String::from_utf8_lossy(other))
                )))
            }
        }
    }
    let pkl_idx = archive
        .find(&format!("{prefix}data.pkl"))
        .ok_or_else(|| Bad::malformed("data.pkl not found"))?;
    let pkl = store.entry_bytes(pkl_idx, u64::MAX)?;
    let p = pickle::load(&pkl)?;
    let name_budget = (pkl.len() as u64).saturating_mul(8).saturating_add(1 << 16);
    let is_torchscript = archive.find(&format!("{prefix}constants.pkl")).is_some();
    f(&mut store, &p, name_budget, is_torchscript)
}

/// The archive's top folder (the file stem at save time): the one holding `data.pkl`.
fn find_prefix(archive: &Archive) -> Result<String, Bad> {
    let mut found = archive.entries.iter().filter_map(|e| {
        let dir = e.name.strip_suffix("data.pkl")?;
        (dir.is_empty() || (dir.ends_with('/') && dir.matches('/').count() == 1))
            .then(|| dir.to_owned())
    });
    match (found.next(), found.next()) {
        (Some(p), None) => Ok(p),
        (None, _) => Err(Bad::malformed(
            "no data.pkl in the zip archive: not a torch.save checkpoint",
        )),
        (Some(_), Some(_)) => Err(Bad::malformed(
            "several */data.pkl records in the zip archive",
        )),
    }
}

/// Reads storages out of the archive, checking each entry's CRC once.
pub(crate) struct Store<'a> {
    src: &'a dyn Source,
    archive: &'a Archive,
    prefix: &'a str,
    ranges: HashMap<usize, (u64, u64)>,
    verified: HashSet<usize>,
}

impl<'a> Store<'a> {
    fn range(&mut self, idx: usize) -> Result<(u64, u64), Bad> {
        if let Some(&r) = self.ranges.get(&idx) {
            return Ok(r);
        }
        let r = self.archive.data_range(self.src, idx)?;
        self.ranges.insert(idx, r);
        Ok(r)
    }

    /// Checks an entry's CRC the first time it is used; `whole` is the entry's bytes when the
    /// caller has already read all of them (saves a second read of a file).
    fn verify(&mut self, idx: usize, whole: Option<&[u8]>) -> Result<(), Bad> {
        if self.verified.contains(&idx) {
            return Ok(());
        }
        let (start, len) = self.range(idx)?;
        let e = &self.archive.entries[idx];
        // torch >= 2.6 can skip checksums (`compute_crc32=False`) and then writes 0.
        if e.crc != 0 {
            let crc = match whole {
                Some(bytes) => crc32fast::hash(bytes),
                None => zip::crc32(self.src, start, len, &show(&e.name))?,
            };
            if crc != e.crc {
                return Err(Bad::malformed(format!(
                    "zip entry '{}' is corrupt (CRC-32 {crc:08x}, expected {:08x})",
                    show(&e.name),
                    e.crc
                )));
            }
        }
        self.verified.insert(idx);
        Ok(())
    }

    /// A whole (small) entry, checked.
    fn entry_bytes(&mut self, idx: usize, max: u64) -> Result<Cow<'a, [u8]>, Bad> {
        let (start, len) = self.range(idx)?;
        let name = show(&self.archive.entries[idx].name);
        if len > max {
            return Err(Bad::malformed(format!(
                "zip entry '{name}' is {len} bytes, more than the expected {max}"
            )));
        }
        let len = usize::try_from(len).map_err(|_| Bad::unsupported("data.pkl is too large"))?;
        let src: &'a dyn Source = self.src;
        let bytes = src
            .read_at(start, len)
            .map_err(|e| Bad::io(format!("reading '{name}'"), e))?;
        self.verify(idx, Some(&bytes))?;
        Ok(bytes)
    }

    /// Validates a tensor view against its storage and copies it out contiguously.
    fn tensor(
        &mut self,
        p: &Pickle,
        name: &str,
        t: &TensorRef,
        budget: &mut u64,
    ) -> Result<RawTensor, Bad> {
        let name = &show(name);
        let Some(Obj::Storage(st)) = p.objs.get(t.storage as usize) else {
            return Err(Bad::malformed(format!("tensor '{name}' has no storage")));
        };
        let storage_name = format!("data/{}", show(&st.key));
        let idx = self
            .archive
            .find(&format!("{}data/{}", self.prefix, st.key))
            .ok_or_else(|| {
                Bad::malformed(format!(
                    "tensor '{name}' uses storage '{storage_name}', which is missing from the archive"
                ))
            })?;
        let (start, entry_len) = self.range(idx)?;
        let st_es = st.dtype.map_or(1, DType::size_in_bytes) as u64;
        let overflow = || Bad::malformed(format!("tensor '{name}': size overflows"));
        let declared = st.numel.checked_mul(st_es).ok_or_else(overflow)?;
        if declared > entry_len {
            return Err(Bad::malformed(format!(
                "storage '{storage_name}' declares {declared} bytes but its zip entry holds {entry_len}"
            )));
        }

        let es = t.dtype.size_in_bytes() as u64;
        let numel = if t.shape.contains(&0) {
            0
        } else {
            t.shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(overflow)?
        };
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| overflow()))
            .collect::<Result<Vec<_>, _>>()?;
        if numel == 0 {
            return Ok(RawTensor {
                dtype: t.dtype,
                shape,
                data: Vec::new(),
            });
        }
        // Highest element index the view touches, then the bytes it needs from the storage.
        let mut last = t.offset;
        for (&d, &s) in t.shape.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(overflow)?;
        }
        let need = last
            .checked_add(1)
            .and_then(|n| n.checked_mul(es))
            .ok_or_else(overflow)?;
        if need > declared {
            return Err(Bad::malformed(format!(
                "tensor '{name}' needs {need} bytes but storage '{storage_name}' has {declared}"
            )));
        }
        let out_bytes = numel.checked_mul(es).ok_or_else(overflow)?;
        if out_bytes > *budget {
            return Err(Bad::malformed(format!(
                "tensor '{name}' ({out_bytes} bytes) exceeds what the file can hold: overlapping views \
                 or shared storages would expand to more than {EXPANSION_LIMIT}x the file size"
            )));
        }
        *budget -= out_bytes;
        let begin = t.offset * es; // <= need, so no overflow
        let to_usize = |x: u64| usize::try_from(x).map_err(|_| overflow());
        let raw = self
            .src
            .read_at(start + begin, to_usize(need - begin)?)
            .map_err(|e| Bad::io(format!("reading '{storage_name}'"), e))?;
        let whole = (begin == 0 && need == entry_len).then_some(&*raw);
        self.verify(idx, whole)?;
        let stride = t
            .stride
            .iter()
            .map(|&s| to_usize(s))
            .collect::<Result<Vec<_>, _>>()?;
        let data = gather(raw, &shape, &stride, es as usize, to_usize(out_bytes)?)
            .map_err(|m| Bad::malformed(format!("tensor '{name}': {m}")))?;
        Ok(RawTensor {
            dtype: t.dtype,
            shape,
            data,
        })
    }
}

/// Copies a strided view (element offsets relative to `raw`) into a row-major buffer.
/// Callers have checked that every touched element lies inside `raw`; the checks here only turn
/// a bug into an error instead of a panic.
fn gather(
    raw: Cow<'_, [u8]>,
    shape: &[usize],
    stride: &[usize],
    es: usize,
    out_bytes: usize,
) -> Result<Vec<u8>, String> {
    let oom = || format!("out of memory allocating {out_bytes} bytes");
    let oob = || "strided view runs outside its storage".to_owned();
    let mut expect = 1;
    let contiguous = shape.iter().zip(stride).rev().all(|(&d, &s)| {
        let ok = d == 1 || s == expect;
        expect *= d;
        ok
    });
    if contiguous {
        if let Cow::Owned(v) = raw {
            if v.len() == out_bytes {
                return Ok(v);
            }
            return copy(v.get(..out_bytes).ok_or_else(oob)?).ok_or_else(oom);
        }
        return copy(raw.get(..out_bytes).ok_or_else(oob)?).ok_or_else(oom);
    }
    let mut out = Vec::new();
    out.try_reserve_exact(out_bytes).map_err(|_| oom())?;
    let nd = shape.len();
    let (inner_n, inner_s) = (shape[nd - 1], stride[nd - 1]);
    let mut idx = vec![0usize; nd - 1];
    let mut base = 0usize;
    loop {
        if inner_s == 1 {
            out.extend_from_slice(raw.get(base * es..(base + inner_n) * es).ok_or_else(oob)?);
        } else {
            for i in 0..inner_n {
                let at = (base + i * inner_s) * es;
                out.extend_from_slice(raw.get(at..at + es).ok_or_else(oob)?);
            }
        }
        // Advance the odometer over the outer dimensions.
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            base += stride[d];
            if idx[d] < shape[d] {
                break;
            }
            base -= stride[d] * shape[d];
            idx[d] = 0;
        }
    }
}

fn copy(s: &[u8]) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(s.len()).ok()?;
    v.extend_from_slice(s);
    Some(v)
}

// ---------------------------------------------------------------------------------------------
// Selecting the dict of tensors.

struct Selection<'p> {
    tensors: Vec<(String, &'p TensorRef)>,
    container: Container,
    other_keys: Vec<String>,
}

const AUTO_KEYS: [&str; 4] = ["ema", "model", "module", "state_dict"];

fn select<'p>(p: &'p Pickle, key: Option<&str>, name_budget: u64) -> Result<Selection<'p>, Bad> {
    let Some(Obj::Dict(root)) = p.obj(p.root) else {
        return Err(Bad::no_tensors(format!(
            "the top-level object is {}, not a dict of tensors",
            p.describe(p.root)
        )));
    };
    let key_name = |k: Value| match k {
        Value::Str(s) => Some(p.strings.get(s).to_owned()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    };
    let top_keys: Vec<String> = root
        .items
        .iter()
        .filter_map(|&(k, _)| key_name(k))
        .collect();
    let list = || {
        let mut s = top_keys
            .iter()
            .take(20)
            .map(|k| show(k))
            .collect::<Vec<_>>()
            .join(", ");
        if top_keys.len() > 20 {
            s.push_str(", ...");
        }
        s
    };
    let mut flat = Flattener {
        p,
        seen: HashSet::new(),
        names: HashSet::new(),
        out: Vec::new(),
        name_budget,
    };
    let sub = |flat: &mut Flattener<'p>, k: &str| -> Result<Option<Vec<_>>, Bad> {
        let Some(v) = root.get_str(&p.strings, k) else {
            return Ok(None);
        };
        let Value::Ref(id) = v else { return Ok(None) };
        if !matches!(p.obj(v), Some(Obj::Dict(_))) {
            return Ok(None);
        }
        flat.reset();
        flat.dict(id, "", 0)?;
        Ok(Some(std::mem::take(&mut flat.out)))
    };
    let others = |k: &str| top_keys.iter().filter(|n| *n != k).cloned().collect();

    if let Some(k) = key {
        let Some(v) = root.get_str(&p.strings, k) else {
            return Err(Bad::no_tensors(format!(
                "no top-level key '{}' (keys: {})",
                show(k),
                list()
            )));
        };
        return match sub(&mut flat, k)? {
            Some(t) if !t.is_empty() => Ok(Selection {
                tensors: t,
                container: Container::from_key(k),
                other_keys: others(k),
            }),
            Some(_) => Err(Bad::no_tensors(format!("'{}' holds no tensors", show(k)))),
            None => Err(Bad::no_tensors(format!(
                "'{}' holds {}, not a dict of tensors",
                show(k),
                p.describe(v)
            ))),
        };
    }
    for k in AUTO_KEYS {
        if let Some(t) = sub(&mut flat, k)? {
            if !t.is_empty() {
                return Ok(Selection {
                    tensors: t,
                    container: Container::from_key(k),
                    other_keys: others(k),
                });
            }
        }
    }
    // The top-level dict itself; remember which entries contributed nothing.
    flat.reset();
    let mut other_keys = Vec::new();
    for &(k, v) in &root.items {
        let Some(name) = key_name(k) else { continue };
        let before = flat.out.len();
        flat.value(v, &name, 0)?;
        if flat.out.len() == before {
            other_keys.push(name);
        }
    }
    if flat.out.is_empty() {
        return Err(Bad::no_tensors(format!(
            "no tensors found: the top-level dict (keys: {}) has none, and no ema/model/module/state_dict \
             entry holds a dict of tensors",
            list()
        )));
    }
    Ok(Selection {
        tensors: flat.out,
        container: Container::Plain,
        other_keys,
    })
}

/// Collects the tensors of a dict and of the dicts one level below it (named `outer.inner`);
/// deeper nesting, such as optimizer state, is skipped. Each dict is visited once, and the total
/// length of the names built is bounded by the pickle's size, so shared or cyclic references
/// cannot multiply the work.
struct Flattener<'p> {
    p: &'p Pickle,
    seen: HashSet<u32>,
    names: HashSet<String>,
    out: Vec<(String, &'p TensorRef)>,
    name_budget: u64,
}

impl<'p> Flattener<'p> {
    fn reset(&mut self) {
        self.seen.clear();
        self.names.clear();
        self.out.clear();
    }

    fn dict(&mut self, id: u32, prefix: &str, depth: usize) -> Result<(), Bad> {
        let p = self.p;
        let Some(Obj::Dict(d)) = p.objs.get(id as usize) else {
            return Ok(());
        };
        if depth > MAX_NESTING || !self.seen.insert(id) {
            return Ok(());
        }
        for &(k, v) in &d.items {
            let key = match k {
                Value::Str(s) => Cow::Borrowed(p.strings.get(s)),
                Value::Int(i) => Cow::Owned(i.to_string()),
                _ => continue,
            };
            let cost = (prefix.len() + key.len()) as u64 + 1;
            if cost > self.name_budget {
                return Err(Bad::malformed(
                    "tensor names are far longer than the pickle could hold (corrupt file)",
                ));
            }
            self.name_budget -= cost;
            let name = if prefix.is_empty() {
                key.into_owned()
            } else {
                format!("{prefix}.{key}")
            };
            self.value(v, &name, depth)?;
        }
        Ok(())
    }

    fn value(&mut self, v: Value, name: &str, depth: usize) -> Result<(), Bad> {
        let p = self.p;
        match (v, p.obj(v)) {
            (_, Some(Obj::Tensor(t))) => {
                if !self.names.insert(name.to_owned()) {
                    return Err(Bad::malformed(format!(
                        "tensor name '{}' appears twice",
                        show(name)
                    )));
                }
                self.out.push((name.to_owned(), t));
            }
            (Value::Ref(id), Some(Obj::Dict(_))) => self.dict(id, name, depth + 1)?,
            (_, Some(Obj::Object { class, .. })) => {
                if let Some((m, n)) = p.global(*class) {
                    if m.starts_with("torch") && n.starts_with("_rebuild") {
                        return Err(Bad::unsupported(format!(
                            "tensor '{}' is rebuilt by {}.{}, which is not supported \
                             (quantized, sparse or device-specific tensor)",
                            show(name),
                            show(m),
                            show(n)
                        )));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
