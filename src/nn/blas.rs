//! The one f32 GEMM behind the hand-written CPU kernels (fused linear, attention, the FID
//! network), so the build picks the BLAS in one place.
//!
//! - Default build: the `gemm` crate (candle's own CPU GEMM; its AVX-512 kernels are chosen at
//!   run time, so the binary stays portable).
//! - `--features mkl`: Intel MKL's `cblas_sgemm`, the library candle's own `mkl` feature links
//!   for `Tensor::matmul`. On the Sapphire Rapids machine DiT-S/2 and DiT-XL/2 forwards ran
//!   1.1–1.85× faster with it (README, "The fast CPU build"). Operands MKL cannot express
//!   (neither unit row nor unit column stride) still go to the `gemm` crate. On an AMD CPU, where
//!   MKL runs generic kernels 1.8× slower than the `gemm` crate's AVX-512 ones, an MKL build
//!   sends its GEMMs to the `gemm` crate too (`DYDIT_GEMM=mkl|gemm` overrides).

/// `dst ← dst_scale·dst + lhs·rhs` for an `m×n` destination, `lhs` `m×k`, `rhs` `k×n`; strides
/// in elements as `(row, col)`. `dst_scale == 0` means `dst` is written without being read (it
/// may be uninitialised). `threads` is the parallelism this call may use (1 inside callers that
/// already parallelise, e.g. over attention heads).
///
/// # Safety
/// Every element the sizes and strides imply must be addressable; `dst` must not overlap the
/// operands.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_s: (isize, isize),
    dst_scale: f32,
    lhs: *const f32,
    lhs_s: (isize, isize),
    rhs: *const f32,
    rhs_s: (isize, isize),
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(feature = "mkl")]
    if k > 0
        && use_mkl()
        && mkl::sgemm(
            m, n, k, dst, dst_s, dst_scale, lhs, lhs_s, rhs, rhs_s, threads,
        )
    {
        return;
    }
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_s.1,
        dst_s.0,
        dst_scale != 0.0,
        lhs,
        lhs_s.1,
        lhs_s.0,
        rhs,
        rhs_s.1,
        rhs_s.0,
        dst_scale,
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// `x (m×k, row-major) · wᵀ` into a fresh `m×n` buffer, for `w` `n×k` with row stride `w_rs`
/// (a weight in PyTorch layout, or a column slice of one): the product behind every linear layer
/// of the hand-written kernels. The buffer is never zero-filled; the GEMM writes all of it.
pub fn xwt(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    w_rs: usize,
    threads: usize,
) -> Vec<f32> {
    assert!(
        x.len() >= m * k,
        "xwt: x holds {} values, want {m}×{k}",
        x.len()
    );
    assert!(
        n == 0 || k == 0 || w.len() >= (n - 1) * w_rs + k,
        "xwt: weight view too short for {n}×{k} with row stride {w_rs}"
    );
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        return y;
    }
    if k == 0 {
        y.resize(m * n, 0.0);
        return y;
    }
    // SAFETY: y has capacity m·n and with dst_scale 0 the GEMM writes every element without
    // reading any, so it is initialised before set_len. x and w are long enough (asserted).
    unsafe {
        sgemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            (n as isize, 1),
            0.0,
            x.as_ptr(),
            (k as isize, 1),
            w.as_ptr(),
            (1, w_rs as isize),
            threads,
        );
        y.set_len(m * n);
    }
    y
}

/// `y (m×n) = x (m×k) · wᵀ` with `x` and `w` (`n×k`, row stride `w_rs`) in bf16 (`f16 ==
/// false`) or f16, accumulated and written in f32: MKL's `cblas_gemm_bf16bf16f32` /
/// `cblas_gemm_f16f16f32`, which use AMX or AVX512-BF16/FP16 where the CPU has them. Operands
/// are the raw 16-bit patterns.
///
/// # Safety
/// `x` must hold m·k values, `w` (n−1)·w_rs + k, `y` room for m·n.
#[cfg(feature = "mkl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn half_gemm_xwt(
    f16: bool,
    m: usize,
    n: usize,
    k: usize,
    x: *const u16,
    w: *const u16,
    w_rs: usize,
    y: *mut f32,
    threads: usize,
) {
    mkl::half_gemm_xwt(f16, m, n, k, x, w, w_rs, y, threads)
}

/// Whether an MKL build runs [`sgemm`] on MKL: not on an AMD CPU, where MKL picks generic
/// kernels (`mkl_blas_cnr_def_sgemm_kernel_0_zen`) that ran 1.8× slower than the `gemm` crate
/// (README, "MKL on AMD"). `DYDIT_GEMM=mkl` or `=gemm` decides instead. Read once.
pub fn use_mkl() -> bool {
    static USE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USE.get_or_init(|| {
        cfg!(feature = "mkl")
            && match std::env::var("DYDIT_GEMM").as_deref() {
                Ok("mkl") => true,
                Ok("gemm") => false,
                _ => cpu_vendor().as_deref() != Some("AuthenticAMD"),
            }
    })
}

/// Which BLAS [`sgemm`] uses, for benchmark and `inspect` output.
pub fn backend() -> &'static str {
    if use_mkl() {
        "Intel MKL (cblas_sgemm)"
    } else if cfg!(feature = "mkl") {
        "gemm crate (AVX-512 kernels; this MKL build leaves f32 GEMMs to it: MKL runs generic kernels on this CPU)"
    } else {
        "gemm crate (AVX-512 kernels when the CPU has them)"
    }
}

/// The CPU vendor string (`GenuineIntel`, `AuthenticAMD`, …) from /proc/cpuinfo, where there is one.
fn cpu_vendor() -> Option<String> {
    vendor_of(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// Whether /proc/cpuinfo lists `flag` (e.g. `amx_bf16`; std's detection of AMX is unstable).
pub(crate) fn cpu_has_flag(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == flag))
    })
}

fn vendor_of(cpuinfo: &str) -> Option<String> {
    let line = cpuinfo.lines().find(|l| l.starts_with("vendor_id"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

#[cfg(feature = "mkl")]
mod mkl {
    use std::os::raw::c_int;

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        fn cblas_sgemm(
            layout: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        fn MKL_Set_Num_Threads_Local(n: c_int) -> c_int;
        #[allow(clippy::too_many_arguments)]
        fn cblas_gemm_bf16bf16f32(
            layout: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const u16,
            lda: c_int,
            b: *const u16,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        #[allow(clippy::too_many_arguments)]
        fn cblas_gemm_f16f16f32(
            layout: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const u16,
            lda: c_int,
            b: *const u16,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn half_gemm_xwt(
        f16: bool,
        m: usize,
        n: usize,
        k: usize,
        x: *const u16,
        w: *const u16,
        w_rs: usize,
        y: *mut f32,
        threads: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let int = |v: usize| c_int::try_from(v).expect("GEMM size fits MKL_INT");
        let before = MKL_Set_Num_Threads_Local(threads.max(1) as c_int);
        let gemm = if f16 {
            cblas_gemm_f16f16f32
        } else {
            cblas_gemm_bf16bf16f32
        };
        gemm(
            ROW_MAJOR,
            NO_TRANS,
            TRANS,
            int(m),
            int(n),
            int(k),
            1.0,
            x,
            int(k.max(1)),
            w,
            int(w_rs.max(k).max(1)),
            0.0,
            y,
            int(n),
        );
        MKL_Set_Num_Threads_Local(before);
    }

    /// How a `rows × cols` strided operand reads as a row-major BLAS matrix: `(transposed, ld)`.
    fn layout(s: (isize, isize), rows: usize, cols: usize) -> Option<(bool, c_int)> {
        let (rs, cs) = s;
        let fits = |v: usize| c_int::try_from(v).ok();
        if (cs == 1 || cols == 1) && (rows == 1 || rs >= cols.max(1) as isize) {
            let ld = if rows == 1 { cols.max(1) } else { rs as usize };
            return Some((false, fits(ld)?));
        }
        if (rs == 1 || rows == 1) && (cols == 1 || cs >= rows.max(1) as isize) {
            let ld = if cols == 1 { rows.max(1) } else { cs as usize };
            return Some((true, fits(ld)?));
        }
        None
    }

    /// Returns false (and does nothing) when an operand has no BLAS layout.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sgemm(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_s: (isize, isize),
        dst_scale: f32,
        lhs: *const f32,
        lhs_s: (isize, isize),
        rhs: *const f32,
        rhs_s: (isize, isize),
        threads: usize,
    ) -> bool {
        let (Some((false, ldc)), Some((ta, lda)), Some((tb, ldb))) = (
            layout(dst_s, m, n),
            layout(lhs_s, m, k),
            layout(rhs_s, k, n),
        ) else {
            return false;
        };
        let (Ok(mi), Ok(ni), Ok(ki)) = (c_int::try_from(m), c_int::try_from(n), c_int::try_from(k))
        else {
            return false;
        };
        // Small products are not worth waking MKL's thread team.
        let threads = if m * n * k < 1 << 15 {
            1
        } else {
            threads.max(1)
        };
        let before = MKL_Set_Num_Threads_Local(threads as c_int);
        cblas_sgemm(
            ROW_MAJOR,
            if ta { TRANS } else { NO_TRANS },
            if tb { TRANS } else { NO_TRANS },
            mi,
            ni,
            ki,
            1.0,
            lhs,
            lda,
            rhs,
            ldb,
            dst_scale,
            dst,
            ldc,
        );
        MKL_Set_Num_Threads_Local(before);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_vendor_is_read_from_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n";
        assert_eq!(vendor_of(info).as_deref(), Some("AuthenticAMD"));
        assert_eq!(vendor_of("processor : 0\n"), None);
    }

    /// Every stride pattern the callers use (row-major, transposed, strided rows, accumulate),
    /// against a naive product, whichever BLAS the build selected.
    #[test]
    fn sgemm_matches_naive_on_strided_views() {
        let (m, n, k) = (37, 29, 23);
        let a: Vec<f32> = (0..m * k * 2)
            .map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.5)
            .collect();
        let b: Vec<f32> = (0..k * n * 2)
            .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
            .collect();
        // (lhs strides, rhs strides) in elements.
        let cases: [((isize, isize), (isize, isize)); 4] = [
            ((k as isize, 1), (n as isize, 1)),
            ((1, m as isize), (1, k as isize)),
            ((2 * k as isize, 1), (1, 2 * k as isize)),
            ((2, 2 * m as isize), (2 * n as isize, 2)),
        ];
        for (case, &(ls, rs)) in cases.iter().enumerate() {
            for dst_scale in [0.0f32, 1.0, 0.5] {
                let at = |i: usize, j: usize| a[i * ls.0 as usize + j * ls.1 as usize];
                let bt = |i: usize, j: usize| b[i * rs.0 as usize + j * rs.1 as usize];
                let init: Vec<f32> = (0..m * (n + 3)).map(|i| (i % 5) as f32).collect();
                let mut c = init.clone();
                unsafe {
                    sgemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        (n as isize + 3, 1),
                        dst_scale,
                        a.as_ptr(),
                        ls,
                        b.as_ptr(),
                        rs,
                        2,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|l| at(i, l) * bt(l, j)).sum::<f32>()
                            + dst_scale * init[i * (n + 3) + j];
                        let got = c[i * (n + 3) + j];
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "case {case} scale {dst_scale} ({i},{j}): {got} vs {want}"
                        );
                    }
                    for j in n..n + 3 {
                        assert_eq!(c[i * (n + 3) + j], init[i * (n + 3) + j], "padding written");
                    }
                }
            }
        }
    }
}
