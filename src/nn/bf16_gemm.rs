//! `y = bf16(x) · wᵀ` with f32 accumulation on AVX512-BF16 (`vdpbf16ps`: 32 bf16 products
//! summed into 16 f32 lanes per instruction, twice the multiply-adds of an f32 FMA). The bf16
//! linear layers' GEMM on CPUs that have the instruction and no AMX to hand MKL (AMD Zen 4/5,
//! Intel Cooper Lake); elsewhere [`crate::nn::blas::half_gemm_xwt`] (MKL) or candle's matmul.
//!
//! The product is computed transposed, `yᵀ[n, m] = Σₖ w[n, k] · x[m, k]`, so that the big operand,
//! the bf16 weight, needs no packing: its rows already hold the (k, k+1) pairs that `vdpbf16ps`
//! multiplies, and a tile broadcasts one 32-bit pair per weight row. The small operand, the f32
//! input, is rounded to bf16 once per call and packed in panels of 32 rows, pair-interleaved (two
//! registers per k-pair). A register tile is 12 weight rows × 32 input rows (24 accumulators);
//! it is written back to `y [M, N]` transposed through a small stack tile. Weight rows are walked in blocks
//! that stay in L2 while every input panel passes over them; blocks are shared among threads.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

/// Input rows per panel (two 16-lane registers).
const NR: usize = 32;
/// Weight rows per register tile.
const MR: usize = 12;
/// Bytes of weight rows per block (kept in L2 while all input panels pass).
const BLOCK_BYTES: usize = 192 << 10;

/// Whether this CPU runs [`gemm_xwt`] (AVX-512F + AVX512-BF16), checked once.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the bf16 linear layers should run on [`gemm_xwt`]: the CPU has it, and this is not
/// an MKL build on a CPU with AMX (where MKL's bf16 GEMM is the faster route).
pub fn preferred() -> bool {
    static PREFERRED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PREFERRED.get_or_init(|| {
        available() && !(cfg!(feature = "mkl") && super::blas::cpu_has_flag("amx_bf16"))
    })
}

/// `y[m, n] = Σₖ bf16(x[m, k]) · w[n, k]` in f32, for `x` `m×k` f32 with row stride `x_rs`, `w`
/// `n×k` bf16 bit patterns with row stride `rs` (a column-sliced view reads in place), `y` `m×n`
/// with row stride `ldy`. `x` is rounded to nearest-even, as `half::bf16::from_f32` does.
///
/// # Safety
/// [`available`] must be true; `x` must hold `(m − 1)·x_rs + k` values, `w` address
/// `(n − 1)·rs + k` values and `y` `(m − 1)·ldy + n` (written without being read).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_xwt(
    m: usize,
    n: usize,
    k: usize,
    (x, x_rs): (&[f32], usize),
    w: *const u16,
    rs: usize,
    (y, ldy): (*mut f32, usize),
    threads: usize,
) {
    use rayon::prelude::*;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            std::ptr::write_bytes(y.add(i * ldy), 0, n);
        }
        return;
    }
    let kp = k.div_ceil(2);
    let panels = m.div_ceil(NR);
    // Packed input: panel q, pair p → 32 u32 (row 32q + r at lane r); zero past m and past k.
    let mut xp = vec![0u32; panels * kp * NR];
    xp.par_chunks_mut(kp * NR)
        .enumerate()
        .for_each(|(q, panel)| pack_panel((x, x_rs), m, k, q, panel));
    let block_rows = (BLOCK_BYTES / (2 * k)).max(MR) / MR * MR;
    let blocks: Vec<usize> = (0..n).step_by(block_rows).collect();
    // Blocks write disjoint column ranges of y and only read w.
    let (dst, src) = (
        super::shared_ptr::SharedMut(y),
        super::shared_ptr::SharedConst(w),
    );
    let run = |&n0: &usize| {
        let rows = block_rows.min(n - n0);
        for q in 0..panels {
            let mv = NR.min(m - q * NR);
            let xq = xp[q * kp * NR..].as_ptr();
            for t0 in (n0..n0 + rows).step_by(MR) {
                let r = MR.min(n0 + rows - t0);
                // SAFETY: rows t0..t0 + r of w and the tile (q·32.., t0..) of y are in bounds.
                unsafe {
                    tile(
                        r,
                        xq,
                        src.ptr().add(t0 * rs),
                        rs,
                        k,
                        dst.ptr().add(q * NR * ldy + t0),
                        ldy,
                        mv,
                    )
                };
            }
        }
    };
    if threads > 1 && blocks.len() > 1 {
        blocks.par_iter().for_each(run);
    } else {
        blocks.iter().for_each(run);
    }
}

/// Panel `q` of the packed input: rows `32q..32q + 32` rounded to bf16 and pair-interleaved.
fn pack_panel(x: (&[f32], usize), m: usize, k: usize, q: usize, panel: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F and AVX512-BF16 checked by available().
        unsafe { pack_panel_avx512(x, m, k, q, panel) };
        return;
    }
    pack_panel_scalar(x, m, k, q, panel)
}

/// [`pack_panel`] 32 values of a row at a time: `vcvtne2ps2bf16` rounds them into 16 pairs
/// (round to nearest even, like `half`), scattered down the panel's lanes for this row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_panel_avx512(
    (x, x_rs): (&[f32], usize),
    m: usize,
    k: usize,
    q: usize,
    panel: &mut [u32],
) {
    use std::arch::x86_64::*;
    let idx = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(NR as i32),
    );
    let kp = k.div_ceil(2);
    assert!(panel.len() >= kp * NR);
    for r in 0..NR.min(m - q * NR) {
        let row = &x[(q * NR + r) * x_rs..(q * NR + r) * x_rs + k];
        for c0 in (0..k).step_by(32) {
            let left = k - c0;
            let (ma, mb): (__mmask16, __mmask16) = if left >= 32 {
                (0xffff, 0xffff)
            } else if left >= 16 {
                (0xffff, ((1u32 << (left - 16)) - 1) as u16)
            } else {
                (((1u32 << left) - 1) as u16, 0)
            };
            let lo = _mm512_maskz_loadu_ps(ma, row.as_ptr().add(c0));
            let hi = _mm512_maskz_loadu_ps(mb, row.as_ptr().add(c0 + 16));
            let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            // Pairs c0/2 .. c0/2 + 16 (fewer at the row's end) of this row.
            let np = (kp - c0 / 2).min(16);
            let mask: __mmask16 = if np == 16 {
                0xffff
            } else {
                ((1u32 << np) - 1) as u16
            };
            _mm512_mask_i32scatter_epi32::<4>(
                panel.as_mut_ptr().add((c0 / 2) * NR + r) as *mut i32,
                mask,
                idx,
                pairs,
            );
        }
    }
}

fn pack_panel_scalar((x, x_rs): (&[f32], usize), m: usize, k: usize, q: usize, panel: &mut [u32]) {
    for r in 0..NR.min(m - q * NR) {
        let row = &x[(q * NR + r) * x_rs..(q * NR + r) * x_rs + k];
        let pairs = row.chunks_exact(2);
        let tail = pairs.remainder().first().copied();
        for (p, pair) in pairs.enumerate() {
            panel[p * NR + r] = bf16_bits(pair[0]) as u32 | (bf16_bits(pair[1]) as u32) << 16;
        }
        if let Some(v) = tail {
            panel[(k / 2) * NR + r] = bf16_bits(v) as u32;
        }
    }
}

#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// One register tile of `r ≤ 12` weight rows: dispatch to the kernel compiled for `r`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    r: usize,
    xq: *const u32,
    w: *const u16,
    rs: usize,
    k: usize,
    y: *mut f32,
    ldy: usize,
    mv: usize,
) {
    match r {
        12 => kernel::<12>(xq, w, rs, k, y, ldy, mv),
        11 => kernel::<11>(xq, w, rs, k, y, ldy, mv),
        10 => kernel::<10>(xq, w, rs, k, y, ldy, mv),
        9 => kernel::<9>(xq, w, rs, k, y, ldy, mv),
        8 => kernel::<8>(xq, w, rs, k, y, ldy, mv),
        7 => kernel::<7>(xq, w, rs, k, y, ldy, mv),
        6 => kernel::<6>(xq, w, rs, k, y, ldy, mv),
        5 => kernel::<5>(xq, w, rs, k, y, ldy, mv),
        4 => kernel::<4>(xq, w, rs, k, y, ldy, mv),
        3 => kernel::<3>(xq, w, rs, k, y, ldy, mv),
        2 => kernel::<2>(xq, w, rs, k, y, ldy, mv),
        _ => kernel::<1>(xq, w, rs, k, y, ldy, mv),
    }
}

/// `R` weight rows × 32 input rows over all of k; `y[i, j]` for input row `i < mv`, weight row
/// `j < R` at `y + i·ldy + j`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize>(
    xq: *const u32,
    w: *const u16,
    rs: usize,
    k: usize,
    y: *mut f32,
    ldy: usize,
    mv: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let full = k / 2;
    let mut xp = xq as *const __m512i;
    for p in 0..full {
        let xa: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp));
        let xb: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp.add(1)));
        xp = xp.add(2);
        for (i, a) in acc.iter_mut().enumerate() {
            let pair = (w.add(i * rs + 2 * p) as *const i32).read_unaligned();
            let wv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            a[0] = _mm512_dpbf16_ps(a[0], xa, wv);
            a[1] = _mm512_dpbf16_ps(a[1], xb, wv);
        }
    }
    if k % 2 == 1 {
        // The last k alone: its pair's high half is zero on both sides.
        let xa: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp));
        let xb: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp.add(1)));
        for (i, a) in acc.iter_mut().enumerate() {
            let pair = *w.add(i * rs + k - 1) as i32;
            let wv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            a[0] = _mm512_dpbf16_ps(a[0], xa, wv);
            a[1] = _mm512_dpbf16_ps(a[1], xb, wv);
        }
    }
    // Lane l of half h is input row 16h + l. Transposed through a stack tile: 24 contiguous
    // stores, then each input row's R values copied out (a strided scatter per register cost
    // a third of the time at k = 768).
    let mut buf = [[0f32; NR]; R];
    for (b, a) in buf.iter_mut().zip(&acc) {
        _mm512_storeu_ps(b.as_mut_ptr(), a[0]);
        _mm512_storeu_ps(b.as_mut_ptr().add(16), a[1]);
    }
    for i in 0..mv {
        let row = y.add(i * ldy);
        for (j, b) in buf.iter().enumerate() {
            *row.add(j) = b[i];
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn round(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    #[test]
    fn vector_and_scalar_packing_agree() {
        if !available() {
            return;
        }
        for &(m, k) in &[(1usize, 1usize), (5, 7), (40, 33), (33, 64), (3, 130)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.377).sin() * 3.0).collect();
            let kp = k.div_ceil(2);
            for q in 0..m.div_ceil(NR) {
                let (mut a, mut b) = (vec![0u32; kp * NR], vec![0u32; kp * NR]);
                pack_panel((&x, k), m, k, q, &mut a);
                pack_panel_scalar((&x, k), m, k, q, &mut b);
                assert_eq!(a, b, "m {m}, k {k}, panel {q}");
            }
        }
    }

    #[test]
    fn matches_the_rounded_product_in_f64() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: kernel not exercised");
            return;
        }
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        // (m, n, k, row stride of w, threads): tile and panel remainders, odd k, a column view
        // (stride > k), one row, several blocks.
        for &(m, n, k, rs, threads, pad) in &[
            (1, 1, 1, 1, 1, 0),
            (5, 13, 7, 7, 1, 0),
            (33, 25, 64, 64, 2, 3),
            (70, 40, 31, 45, 2, 0),
            (64, 600, 96, 128, 2, 5),
            (40, 3000, 130, 130, 2, 0),
        ] {
            // Strided rows of x and y when `pad` > 0 (attention's views of the qkv buffer).
            let (x_rs, ldy) = (k + pad, n + pad);
            let x: Vec<f32> = (0..(m - 1) * x_rs + k).map(|_| rnd()).collect();
            let wf: Vec<f32> = (0..n * rs).map(|_| rnd()).collect();
            let w: Vec<u16> = wf.iter().map(|&v| bf16_bits(v)).collect();
            let mut y = vec![f32::NAN; (m - 1) * ldy + n];
            unsafe {
                gemm_xwt(
                    m,
                    n,
                    k,
                    (&x, x_rs),
                    w.as_ptr(),
                    rs,
                    (y.as_mut_ptr(), ldy),
                    threads,
                )
            };
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| round(x[i * x_rs + c]) as f64 * round(wf[j * rs + c]) as f64)
                        .sum();
                    let got = y[i * ldy + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6 * want.abs(),
                        "{:?} y[{i}, {j}] = {got}, want {want}",
                        (m, n, k, rs, pad)
                    );
                }
            }
        }
    }
}
