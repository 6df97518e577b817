//! Winograd F(4×4, 3×3): the stride-1 3×3 convolutions of the SD-VAE decoder with 4× fewer
//! multiplications than im2col + GEMM (Lavin & Gray, 2016; what oneDNN and cuDNN use for 3×3).
//!
//! A 6×6 input tile `d` and a 3×3 filter `g` give a 4×4 output tile
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. Summed over input channels, the element-wise product becomes
//! 36 GEMMs `M[p] = U[p] · V[p]` (`U[p]` `[Co, Ci]`, `V[p]` `[Ci, tiles]`): 36 multiply-adds per
//! 16 outputs instead of 144. The filter transform `U` depends only on the weights, so a model
//! computes it once at load ([`WinogradConv::new`]).
//!
//! The work is split in bands of tile rows, one band per task, each with its own `V`/`M` scratch
//! and single-threaded GEMMs; the tile transforms run on 16 tiles at a time (one AVX-512 lane
//! each).

use candle::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::f32_slice;
use super::shared_ptr::SharedMut;

/// Positions of the transformed 6×6 tile.
const P: usize = 36;
/// Tiles transformed together (one per f32 lane of an AVX-512 register).
const L: usize = 16;
/// `V` + `M` scratch per band, in f32 values (8 MiB: a band's GEMMs stay in L2 + L3).
const BAND_VALUES: usize = 2 << 20;

type Lanes = [f32; L];

thread_local! {
    /// Per-thread `V`/`M` scratch, kept between calls (fresh 8 MiB buffers every band cost
    /// page faults).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `Bᵀ d` for one 6-vector of lanes (F(4,3) with points 0, ±1, ±2).
#[inline(always)]
fn bt(d: &[Lanes; 6]) -> [Lanes; 6] {
    let mut r = [[0f32; L]; 6];
    for l in 0..L {
        let (d0, d1, d2, d3, d4, d5) = (d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]);
        r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        r[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        r[3][l] = 2.0 * (d3 - d1) - d2 + d4;
        r[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

/// `Aᵀ m` for one 6-vector of lanes.
#[inline(always)]
fn at(m: &[Lanes; 6]) -> [Lanes; 4] {
    let mut r = [[0f32; L]; 4];
    for l in 0..L {
        let (m0, m1, m2, m3, m4, m5) = (m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]);
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        r[0][l] = m0 + s12 + s34;
        r[1][l] = d12 + 2.0 * d34;
        r[2][l] = s12 + 4.0 * s34;
        r[3][l] = d12 + 8.0 * d34 + m5;
    }
    r
}

/// `G g` for one 3-vector.
fn g3(g: [f64; 3]) -> [f64; 6] {
    let [g0, g1, g2] = g;
    [
        g0 / 4.0,
        -(g0 + g1 + g2) / 6.0,
        -(g0 - g1 + g2) / 6.0,
        g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
        g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
        g2,
    ]
}

/// A 3×3 conv layer ready for Winograd: the filter transform `U [36, Co, Ci]` (made once, from
/// the PyTorch-layout weight `[Co, Ci, 3, 3]`, in f64), the bias and the padding. CPU, f32.
pub struct WinogradConv {
    u: Vec<f32>,
    bias: Vec<f32>,
    ci: usize,
    co: usize,
    padding: usize,
}

impl WinogradConv {
    pub fn new(w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Self> {
        let (co, ci, kh, kw) = w.dims4()?;
        if (kh, kw) != (3, 3) {
            candle::bail!("winograd: 3×3 weights only, got {kh}×{kw}");
        }
        let ws: Vec<f32> = w.to_dtype(candle::DType::F32)?.flatten_all()?.to_vec1()?;
        let bias = match b {
            Some(b) => b.to_dtype(candle::DType::F32)?.flatten_all()?.to_vec1()?,
            None => vec![0f32; co],
        };
        if bias.len() != co {
            candle::bail!("winograd: bias of {} for {co} channels", bias.len());
        }
        let mut u = vec![0f32; P * co * ci];
        let plane = co * ci;
        for o in 0..co {
            for i in 0..ci {
                let g = &ws[(o * ci + i) * 9..(o * ci + i + 1) * 9];
                // Columns of G g (6×3), then rows of (G g) Gᵀ (6×6).
                let cols: [[f64; 6]; 3] =
                    std::array::from_fn(|x| g3([g[x] as f64, g[3 + x] as f64, g[6 + x] as f64]));
                for r in 0..6 {
                    let row = g3([cols[0][r], cols[1][r], cols[2][r]]);
                    for (c, v) in row.iter().enumerate() {
                        u[(r * 6 + c) * plane + o * ci + i] = *v as f32;
                    }
                }
            }
        }
        Ok(Self {
            u,
            bias,
            ci,
            co,
            padding,
        })
    }

    /// `conv2d(x, w, padding, stride 1) + b` for `x [N, Ci, H, W]` (f32, CPU).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check(&[x])?;
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `conv2d(x, w) + b + residual`, the residual added in the output transform (the second
    /// conv of a resnet block, saving a pass over the block's output).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.check(&[x, residual])?;
        x.contiguous()?
            .apply_op2_no_bwd(&residual.contiguous()?, self)
    }

    fn check(&self, ts: &[&Tensor]) -> Result<()> {
        if !super::kernels::fast_ok(ts) {
            candle::bail!("winograd conv: f32 CPU tensors without gradient only");
        }
        Ok(())
    }
}

/// Whether the Winograd path pays for a conv: enough channels on both sides that the GEMMs, not
/// the tile transforms, dominate (the VAE's `conv_in` (4 → 512) and `conv_out` (128 → 3) stay on
/// im2col).
pub fn worth_it(ci: usize, co: usize) -> bool {
    ci >= 32 && co >= 32
}

impl WinogradConv {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, ci, h, wd) = x.1.shape().dims4()?;
        let (co, p) = (self.co, self.padding);
        if ci != self.ci || h + 2 * p < 3 || wd + 2 * p < 3 {
            candle::bail!(
                "winograd conv: input [{n}, {ci}, {h}, {wd}] for {} → {co} channels, padding {p}",
                self.ci
            );
        }
        let xs = f32_slice(x.0, x.1, "winograd conv input")?;
        let (ho, wo) = (h + 2 * p - 2, wd + 2 * p - 2);
        let res = match residual {
            Some((s, l)) => {
                if l.shape().dims() != [n, co, ho, wo] {
                    candle::bail!(
                        "winograd conv: residual {:?} for an output [{n}, {co}, {ho}, {wo}]",
                        l.shape()
                    );
                }
                Some(f32_slice(s, l, "winograd conv residual")?)
            }
            None => None,
        };
        let (th, tw) = (ho.div_ceil(4), wo.div_ceil(4));
        let threads = rayon::current_num_threads();
        // Bands of tile rows: within the scratch budget, at least two per thread.
        let per_row = P * (ci + co) * tw.next_multiple_of(L);
        let budget_rows = (BAND_VALUES / per_row).max(1);
        let spread_rows = (th * n).div_ceil(2 * threads).max(1);
        let band = budget_rows.min(spread_rows).min(th);
        let bands: Vec<(usize, usize)> = (0..n)
            .flat_map(|img| (0..th).step_by(band).map(move |t0| (img, t0)))
            .collect();
        let total = n * co * ho * wo;
        let mut out: Vec<f32> = Vec::with_capacity(total);
        // Shared by the band tasks: each writes only its own tile rows.
        let dst = SharedMut(out.as_mut_ptr());
        let geo = Geometry {
            ci,
            co,
            h,
            wd,
            ho,
            wo,
            tw,
            p,
        };
        let image = co * ho * wo;
        bands.par_iter().for_each(|&(img, t0)| {
            let rows = band.min(th - t0);
            let src = &xs[img * ci * h * wd..(img + 1) * ci * h * wd];
            let res = res.map(|r| &r[img * image..(img + 1) * image]);
            // SAFETY: the band writes output rows [4·t0, 4·(t0 + rows)) of image img only.
            let image_out = unsafe { dst.ptr().add(img * image) };
            geo.band(src, &self.u, &self.bias, res, t0, rows, image_out);
        });
        // SAFETY: the bands cover every tile row of every image, and `output_tiles` writes every
        // output pixel of its tiles, so all `total` values are initialised.
        unsafe { out.set_len(total) };
        Ok((CpuStorage::F32(out), Shape::from((n, co, ho, wo))))
    }
}

impl CustomOp1 for WinogradConv {
    fn name(&self) -> &'static str {
        "dydit-winograd-conv3x3"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), None)
    }
}

impl CustomOp2 for WinogradConv {
    fn name(&self) -> &'static str {
        "dydit-winograd-conv3x3-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), Some((s2, l2)))
    }
}

/// Sizes of one conv call.
struct Geometry {
    ci: usize,
    co: usize,
    h: usize,
    wd: usize,
    ho: usize,
    wo: usize,
    tw: usize,
    p: usize,
}

impl Geometry {
    /// Tile rows `[t0, t0 + rows)` of one image: transform in, 36 GEMMs, transform out.
    #[allow(clippy::too_many_arguments)]
    fn band(
        &self,
        src: &[f32],
        us: &[f32],
        bias: &[f32],
        res: Option<&[f32]>,
        t0: usize,
        rows: usize,
        out: *mut f32,
    ) {
        let Self { ci, co, tw, .. } = *self;
        let tiles = rows * tw;
        let tp = tiles.next_multiple_of(L);
        // V [36, Ci, tp] and M [36, Co, tp], in this thread's reused scratch: every value is
        // written before it is read (input transforms fill all tp lanes, the GEMMs all of M).
        SCRATCH.with_borrow_mut(|scratch| {
            let need = P * (ci + co) * tp;
            if scratch.len() < need {
                scratch.resize(need, 0.0);
            }
            let (v, m) = scratch[..need].split_at_mut(P * ci * tp);
            self.band_in(src, us, bias, res, t0, tiles, tp, v, m, out);
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn band_in(
        &self,
        src: &[f32],
        us: &[f32],
        bias: &[f32],
        res: Option<&[f32]>,
        t0: usize,
        tiles: usize,
        tp: usize,
        v: &mut [f32],
        m: &mut [f32],
        out: *mut f32,
    ) {
        let Self { ci, co, .. } = *self;
        for c in 0..ci {
            let plane = &src[c * self.h * self.wd..(c + 1) * self.h * self.wd];
            for g0 in (0..tiles).step_by(L) {
                let vt = self.input_tiles(plane, t0, g0, tiles);
                for (pos, lanes) in vt.iter().enumerate() {
                    let at = (pos * ci + c) * tp + g0;
                    v[at..at + L].copy_from_slice(lanes);
                }
            }
        }
        for pos in 0..P {
            // SAFETY: U[pos] is co×ci row-major, V[pos] ci×tp, M[pos] co×tp, all in bounds.
            unsafe {
                super::blas::sgemm(
                    co,
                    tp,
                    ci,
                    m[pos * co * tp..].as_mut_ptr(),
                    (tp as isize, 1),
                    0.0,
                    us[pos * co * ci..].as_ptr(),
                    (ci as isize, 1),
                    v[pos * ci * tp..].as_ptr(),
                    (tp as isize, 1),
                    1,
                );
            }
        }
        for (o, &bo) in bias.iter().enumerate() {
            for g0 in (0..tiles).step_by(L) {
                let mut mt = [[0f32; L]; P];
                for (pos, lanes) in mt.iter_mut().enumerate() {
                    let at = (pos * co + o) * tp + g0;
                    lanes.copy_from_slice(&m[at..at + L]);
                }
                self.output_tiles(&mt, bo, res, t0, g0, tiles, o, out);
            }
        }
    }

    /// `Bᵀ d B` of the 16 tiles from band index `g0` of one input channel plane; lanes past
    /// `tiles` are zero.
    fn input_tiles(&self, plane: &[f32], t0: usize, g0: usize, tiles: usize) -> [Lanes; P] {
        let (h, wd, p) = (self.h as isize, self.wd as isize, self.p as isize);
        // d[r][c][lane]
        let mut d = [[[0f32; L]; 6]; 6];
        for l in 0..L.min(tiles - g0) {
            let t = g0 + l;
            let (ty, tx) = (t0 + t / self.tw, t % self.tw);
            let (y0, x0) = (4 * ty as isize - p, 4 * tx as isize - p);
            let inside = y0 >= 0 && x0 >= 0 && y0 + 6 <= h && x0 + 6 <= wd;
            for (r, dr) in d.iter_mut().enumerate() {
                let y = y0 + r as isize;
                if !inside && (y < 0 || y >= h) {
                    continue;
                }
                let line = &plane[(y * wd) as usize..((y + 1) * wd) as usize];
                for (c, dc) in dr.iter_mut().enumerate() {
                    let x = x0 + c as isize;
                    if inside || (x >= 0 && x < wd) {
                        dc[l] = line[x as usize];
                    }
                }
            }
        }
        // Columns of the tile (Bᵀ d), then its rows ((Bᵀ d) B).
        let mut col = [[[0f32; L]; 6]; 6]; // col[c][r]
        for (c, cc) in col.iter_mut().enumerate() {
            *cc = bt(&std::array::from_fn(|r| d[r][c]));
        }
        let mut v = [[0f32; L]; P];
        for r in 0..6 {
            let t = bt(&std::array::from_fn(|c| col[c][r]));
            v[r * 6..r * 6 + 6].copy_from_slice(&t);
        }
        v
    }

    /// `Aᵀ m A + bias` of 16 tiles of output channel `o`, written where inside the output.
    #[allow(clippy::too_many_arguments)]
    fn output_tiles(
        &self,
        m: &[Lanes; P],
        bias: f32,
        res: Option<&[f32]>,
        t0: usize,
        g0: usize,
        tiles: usize,
        o: usize,
        out: *mut f32,
    ) {
        // Columns (Aᵀ m: 4×6), then rows (4×4).
        let mut col = [[[0f32; L]; 4]; 6]; // col[c][r]
        for c in 0..6 {
            col[c] = at(&std::array::from_fn(|r| m[r * 6 + c]));
        }
        let mut y = [[[0f32; L]; 4]; 4]; // y[r][c]
        for r in 0..4 {
            y[r] = at(&std::array::from_fn(|c| col[c][r]));
        }
        let plane = o * self.ho * self.wo;
        for l in 0..L.min(tiles - g0) {
            let t = g0 + l;
            let (ty, tx) = (t0 + t / self.tw, t % self.tw);
            for (r, yr) in y.iter().enumerate() {
                let oy = 4 * ty + r;
                if oy >= self.ho {
                    break;
                }
                for (c, yc) in yr.iter().enumerate() {
                    let ox = 4 * tx + c;
                    if ox >= self.wo {
                        break;
                    }
                    let at = plane + oy * self.wo + ox;
                    let r = res.map_or(0.0, |r| r[at]);
                    // SAFETY: (o, oy, ox) is inside this image's output, in this band's rows.
                    unsafe { *out.add(at) = yc[l] + bias + r };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device};

    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        // (n, ci, h, w, co, padding): sizes that are and are not multiples of the tile, maps
        // smaller than one tile, no padding, enough tiles for several bands and lane groups.
        for &(n, ci, h, w, co, p) in &[
            (2, 5, 9, 7, 6, 1),
            (1, 3, 4, 4, 2, 1),
            (1, 4, 3, 5, 3, 0),
            (1, 7, 13, 11, 5, 0),
            (2, 8, 70, 66, 9, 1),
            (1, 64, 32, 32, 48, 1),
        ] {
            let case = (n, ci, h, w, co, p);
            let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (co, ci, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let plain = x.conv2d(&wt, p, 1, 1, 1).unwrap();
            let want = plain
                .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let conv = WinogradConv::new(&wt, Some(&b), p).unwrap();
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = crate::nn::ops::max_rel_err(&got, &want).unwrap();
            assert!(err < 1e-5, "{case:?}: {err}");
            // Without a bias.
            let got = WinogradConv::new(&wt, None, p)
                .unwrap()
                .forward(&x)
                .unwrap();
            let err = crate::nn::ops::max_rel_err(&got, &plain).unwrap();
            assert!(err < 1e-5, "{case:?} no bias: {err}");
            // With the residual added in the output transform.
            let r = Tensor::randn(0f32, 1.0, want.dims(), &dev).unwrap();
            let got = conv.forward_add(&x, &r).unwrap();
            let err = crate::nn::ops::max_rel_err(&got, &(&want + &r).unwrap()).unwrap();
            assert!(err < 1e-5, "{case:?} residual: {err}");
        }
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let dev = Device::Cpu;
        let w5 = Tensor::zeros((2, 2, 5, 5), DType::F32, &dev).unwrap();
        assert!(WinogradConv::new(&w5, None, 2).is_err());
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev).unwrap();
        let bad_bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert!(WinogradConv::new(&w, Some(&bad_bias), 1).is_err());
        let conv = WinogradConv::new(&w, None, 1).unwrap();
        // Wrong input channels, wrong residual shape, a tensor that tracks gradients.
        let x3 = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
        assert!(conv.forward(&x3).is_err());
        let x = Tensor::zeros((1, 2, 8, 8), DType::F32, &dev).unwrap();
        let r = Tensor::zeros((1, 4, 8, 7), DType::F32, &dev).unwrap();
        assert!(conv.forward_add(&x, &r).is_err());
        let v = candle::Var::zeros((1, 2, 8, 8), DType::F32, &dev).unwrap();
        assert!(conv.forward(v.as_tensor()).is_err());
    }
}
