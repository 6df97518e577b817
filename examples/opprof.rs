//! Times the pieces of one DiT-XL/2 block at batch 2 (profiling aid).
use candle::{Device, Tensor};
use std::time::Instant;

fn time<F: FnMut() -> candle::Result<Tensor>>(name: &str, mut f: F) {
    let _ = f().unwrap();
    let n = 20;
    let t0 = Instant::now();
    for _ in 0..n {
        let _ = f().unwrap();
    }
    println!(
        "{name:<40} {:8.2} ms",
        t0.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

fn main() -> candle::Result<()> {
    let dev = Device::Cpu;
    let (b, n, c, h): (usize, usize, usize, usize) = {
        let v: Vec<usize> = std::env::args()
            .skip(1)
            .map(|s| s.parse().unwrap())
            .collect();
        if v.len() == 4 {
            (v[0], v[1], v[2], v[3])
        } else {
            (2, 256, 1152, 16)
        }
    };
    let dh = c / h;
    let x = Tensor::randn(0f32, 1.0, (b * n, c), &dev)?;
    let wqkv = Tensor::randn(0f32, 0.03, (3 * c, c), &dev)?;
    let wqkv_t = wqkv.t()?.contiguous()?;
    let bqkv = Tensor::randn(0f32, 0.03, 3 * c, &dev)?;
    let w1 = Tensor::randn(0f32, 0.03, (4 * c, c), &dev)?;
    let w2 = Tensor::randn(0f32, 0.03, (c, 4 * c), &dev)?;
    let hmid = Tensor::randn(0f32, 1.0, (b * n, 4 * c), &dev)?;
    time("qkv x@W^T (strided)", || x.matmul(&wqkv.t()?));
    time("qkv x@Wt (contiguous)", || x.matmul(&wqkv_t));
    time("qkv bias add", || {
        x.matmul(&wqkv.t()?)?.broadcast_add(&bqkv)
    });
    time("fc1", || x.matmul(&w1.t()?));
    time("fc2", || hmid.matmul(&w2.t()?));
    time("gelu candle", || hmid.gelu());
    time("gelu fast", || dydit::nn::kernels::gelu_tanh_fast(&hmid));
    let qkv = x
        .matmul(&wqkv.t()?)?
        .reshape((b, n, 3, h, dh))?
        .permute((2, 0, 3, 1, 4))?;
    time("qkv permute+contig", || qkv.get(0)?.contiguous());
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    time("q@k^T", || q.matmul(&k.t()?));
    let att = q.matmul(&k.t()?)?;
    time("softmax", || candle_nn::ops::softmax_last_dim(&att));
    time("att@v", || att.matmul(&v));
    let o = att.matmul(&v)?;
    time("o transpose reshape", || {
        o.transpose(1, 2)?.reshape((b * n, c))
    });
    let x3 = x.reshape((b, n, c))?;
    time("layer_norm", || dydit::nn::ops::layer_norm(&x3, 1e-6));
    let sh = Tensor::randn(0f32, 1.0, (b, c), &dev)?;
    time("modulate", || dydit::nn::ops::modulate(&x3, &sh, &sh));
    time("gate mul + residual add", || {
        &x3 + x3.broadcast_mul(&sh.unsqueeze(1)?)?
    });
    Ok(())
}
