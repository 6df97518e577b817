//! Profiling aid: only dynamic (or only static with STATIC=1) DiT-S/2 forwards.
use candle::{DType, Device, Tensor};
use dydit::diffusion::sampler::ConditionalModel;
use dydit::models::dit::{build, DynamicSpec};
use dydit::models::init::{init_tensors, Init};
use dydit::models::DitConfig;
use dydit::runner::{DynamicOptions, DynamicRunner, StaticRunner};
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<()> {
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    let name = std::env::args().nth(1).unwrap_or("DiT-S/2".into());
    let cfg = DitConfig::preset(&name, 256)?;
    let spec = DynamicSpec {
        format: dydit::dynamic::router::RouterFormat::New,
        token_hidden: cfg.hidden_size / 16,
    };
    let mut dit = build(
        &cfg,
        &init_tensors(&cfg, Some(spec), Init::Random, 0)?,
        DType::F32,
        &Device::Cpu,
    )?;
    let grid: Vec<f32> = dydit::diffusion::Schedule::new("250")?
        .timestep_map
        .iter()
        .map(|&t| t as f32)
        .collect();
    dydit::dynamic::synthetic::fit_routers(&mut dit, &grid, 0.5, 0.7, 0)?;
    let x = Tensor::randn(0f32, 1.0, (2, 4, 32, 32), &Device::Cpu)?;
    let y = [1u32, 2];
    let ts: Vec<f32> = (0..8).map(|i| grid[i * 30]).collect();
    let mut dy = DynamicRunner::new(&dit, Some(&grid), DynamicOptions::default())?;
    let mut st = StaticRunner(&dit);
    let stat = std::env::var("STATIC").is_ok();
    let t0 = std::time::Instant::now();
    for _ in 0..4 {
        for &t in &ts {
            if stat {
                st.forward_t(&x, t, &y)?;
            } else {
                dy.forward_t(&x, t, &y)?;
            }
        }
    }
    println!("{} ms/step", t0.elapsed().as_secs_f64() * 1e3 / 32.0);
    Ok(())
}
