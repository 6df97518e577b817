use mimalloc::MiMalloc;

/// mimalloc: measured 20–30% faster than glibc malloc on whole-model CPU inference (large,
/// short-lived activation buffers).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    // Keep freed pages instead of returning them to the OS after 10 ms (see `dydit::alloc`).
    dydit::alloc::keep_freed_pages();
    // candle runs elementwise ops on its own spinning barrier pool besides the rayon pool that
    // the GEMMs and our kernels use; on few cores the two pools steal each other's time (measured
    // ~20% of CPU spinning). The hot elementwise work is in our rayon kernels, so candle's pool
    // is kept single-threaded unless the user says otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // MKL build: OpenMP threads that spin 200 ms after each GEMM (the default) take the cores
    // our rayon kernels (softmax, GELU, norms) run on between GEMMs; and conditional numerical
    // reproducibility keeps results bit-identical from run to run whatever the buffers'
    // alignment (resume and sample reproducibility rely on it). Both read at MKL's first call.
    #[cfg(feature = "mkl")]
    for (key, value) in [("KMP_BLOCKTIME", "0"), ("MKL_CBWR", "AUTO")] {
        if std::env::var_os(key).is_none() {
            std::env::set_var(key, value);
        }
    }
    flush_denormals();
    // Die quietly on a closed pipe (`dydit flops --all | head`) like other Unix tools, instead
    // of panicking inside println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(dydit::cli::main());
}

/// Flush-to-zero and denormals-are-zero for this thread and the threads it starts (POSIX threads
/// inherit the floating-point environment). Training drives AdamW's second moments and tiny
/// gradients into the subnormal range, where each operation costs ~100 cycles; values below
/// 1.2e-38 are far under every tolerance here. (PyTorch measured 25× faster on the same
/// training step with `torch.set_flush_denormal(True)`.)
fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only sets the FTZ (bit 15) and DAZ (bit 6) flags of MXCSR; SSE2 is baseline on x86-64.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}
