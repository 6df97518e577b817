use candle::{Device, Tensor};
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> candle::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (512, 1152, 4608),
        (512, 4608, 1152),
        (512, 1152, 3456),
        (512, 384, 1536),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?; // torch layout
        let wt = w.t()?.contiguous()?; // [k, n]
        for (name, rhs) in [("W.t() strided", w.t()?), ("Wt contiguous", wt.clone())] {
            let _ = x.matmul(&rhs)?;
            let reps = 10;
            let t0 = Instant::now();
            for _ in 0..reps {
                let _ = x.matmul(&rhs)?;
            }
            let s = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{m}x{k}x{n} {name:<15} {:7.2} ms {:6.1} GFLOP/s",
                s * 1e3,
                2.0 * (m * k * n) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
