//! Checkpoint files: PyTorch `.pt` (zip pickle, read without executing code) and safetensors,
//! into upstream-named tensors. Both formats are untrusted input: every failure is an error that
//! names the file, never a panic.

use anyhow::Context;
use candle::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Named tensors of a checkpoint (upstream `state_dict()` keys) and its text metadata.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
    /// Which sub-dictionary the weights came from (`ema`, `model`, … or the file itself).
    pub container: String,
}

/// Loads `.pt`/`.pth`/`.bin` through the safe unpickler and anything else as safetensors (the
/// format is sniffed from the content, not trusted from the extension).
/// A path that does not exist but names a model embedded in the binary (see [`super::bundled`])
/// loads that model.
pub fn load(path: &Path) -> anyhow::Result<Checkpoint> {
    if !path.exists() {
        if let Some(b) = path.to_str().and_then(super::bundled::find) {
            let name = PathBuf::from(format!("bundled:{}", b.name));
            return load_safetensors_bytes(b.bytes, &name);
        }
    }
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read checkpoint {} (not a file, nor a bundled model: {})",
            path.display(),
            super::bundled::names()
        )
    })?;
    if bytes.starts_with(b"PK") {
        load_pt_bytes(&bytes, path)
    } else {
        load_safetensors_bytes(&bytes, path)
    }
}

fn load_pt_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<Checkpoint> {
    let ck = ptfile::read_pt_bytes(bytes, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tensors = HashMap::new();
    for (name, raw) in ck.tensors {
        let t =
            raw_to_tensor(&raw).with_context(|| format!("{}: tensor {name}", path.display()))?;
        if let Some(t) = t {
            tensors.insert(name, t);
        }
    }
    anyhow::ensure!(
        !tensors.is_empty(),
        "{}: no tensors found in the checkpoint",
        path.display()
    );
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        metadata: HashMap::new(),
        container: match ck.container {
            ptfile::Container::Plain => "file".to_string(),
            ptfile::Container::Ema => "ema".to_string(),
            ptfile::Container::Model => "model".to_string(),
            ptfile::Container::Module => "module".to_string(),
            ptfile::Container::StateDict => "state_dict".to_string(),
            ptfile::Container::Other(k) => k,
        },
    })
}

fn raw_to_tensor(raw: &ptfile::RawTensor) -> anyhow::Result<Option<Tensor>> {
    use ptfile::DType as P;
    let dtype = match raw.dtype {
        P::F32 => DType::F32,
        P::F16 => DType::F16,
        P::BF16 => DType::BF16,
        P::F64 => DType::F64,
        P::I64 => DType::I64,
        P::U8 => DType::U8,
        P::I32 => DType::I32,
        // Integer/bool buffers that no model here reads (e.g. counters) are skipped.
        _ => return Ok(None),
    };
    Ok(Some(Tensor::from_raw_buffer(
        &raw.data,
        dtype,
        &raw.shape,
        &Device::Cpu,
    )?))
}

fn load_safetensors_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<Checkpoint> {
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid safetensors or .pt file: {e}",
            path.display()
        )
    })?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("{}: bad safetensors header: {e}", path.display()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            Dtype::I64 => DType::I64,
            Dtype::U8 => DType::U8,
            Dtype::U32 => DType::U32,
            Dtype::I32 => DType::I32,
            _ => continue,
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        tensors.insert(name, t);
    }
    let mut container = "file".to_string();
    // Files that hold several groups (golden vectors, our training checkpoints) keep the model
    // under a prefix: prefer `ema.`, then `model.`.
    for prefix in ["ema.", "model."] {
        if !tensors.contains_key("x_embedder.proj.weight")
            && tensors.contains_key(&format!("{prefix}x_embedder.proj.weight"))
        {
            tensors = tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v)))
                .collect();
            container = prefix.trim_end_matches('.').to_string();
            break;
        }
    }
    anyhow::ensure!(
        !tensors.is_empty(),
        "{}: no tensors found in the checkpoint",
        path.display()
    );
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
        container,
    })
}

/// Writes tensors (sorted by name) and metadata as safetensors, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> anyhow::Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let cpu: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|k| Ok((k.clone(), tensors[k].to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<(String, TensorView)> = cpu
        .iter()
        .map(|(k, t)| Ok((k.clone(), TensorView::new(t)?)))
        .collect::<anyhow::Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(metadata.clone()))
        .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
    super::atomic::write_atomic(path, &bytes)
}

/// A candle tensor exposed to the safetensors serialiser.
struct TensorView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl TensorView {
    fn new(t: &Tensor) -> anyhow::Result<Self> {
        use safetensors::Dtype as S;
        let (dtype, data) = match t.dtype() {
            DType::F32 => (S::F32, bytes_of(&t.flatten_all()?.to_vec1::<f32>()?)),
            DType::F16 => (S::F16, bytes_of(&t.flatten_all()?.to_vec1::<half::f16>()?)),
            DType::BF16 => (
                S::BF16,
                bytes_of(&t.flatten_all()?.to_vec1::<half::bf16>()?),
            ),
            DType::F64 => (S::F64, bytes_of(&t.flatten_all()?.to_vec1::<f64>()?)),
            DType::I64 => (S::I64, bytes_of(&t.flatten_all()?.to_vec1::<i64>()?)),
            DType::U32 => (S::U32, bytes_of(&t.flatten_all()?.to_vec1::<u32>()?)),
            DType::U8 => (S::U8, t.flatten_all()?.to_vec1::<u8>()?),
            d => anyhow::bail!("cannot save dtype {d:?}"),
        };
        Ok(Self {
            dtype,
            shape: t.dims().to_vec(),
            data,
        })
    }
}

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    let n = std::mem::size_of_val(v);
    // SAFETY: plain-old-data numeric slice reinterpreted as bytes (little-endian hosts only).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n) }.to_vec()
}

impl safetensors::View for TensorView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
