//! The Gaussian diffusion schedule of ADM/DiT: 1000 linear betas, timestep respacing, and every
//! coefficient the samplers and losses read, computed in f64 as upstream does with numpy.

/// Linear betas from 1e-4 to 0.02 over `steps` (ADM scales them by 1000/steps).
pub fn linear_betas(steps: usize) -> Vec<f64> {
    let scale = 1000.0 / steps as f64;
    let (start, end) = (scale * 0.0001, scale * 0.02);
    if steps == 1 {
        return vec![start];
    }
    (0..steps)
        .map(|i| start + (end - start) * i as f64 / (steps - 1) as f64)
        .collect()
}

/// Python's `round()`: half to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Which of `num_timesteps` original steps a respacing string keeps, in increasing order:
/// `"250"` (even spacing; `"10,20"` per section) or `"ddim50"` (fixed stride). Mirrors upstream
/// `space_timesteps`, including its float accumulation and half-to-even rounding.
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> anyhow::Result<Vec<usize>> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok((0..num_timesteps).collect());
    }
    if let Some(n) = spec.strip_prefix("ddim") {
        let want: usize = n
            .parse()
            .map_err(|_| anyhow::anyhow!("bad respacing '{spec}': expected ddimN"))?;
        for stride in 1..num_timesteps {
            if num_timesteps.div_ceil(stride) == want {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        anyhow::bail!(
            "cannot create exactly {want} steps with an integer stride from {num_timesteps}"
        );
    }
    let counts: Vec<usize> = spec
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("bad respacing '{spec}': expected N, N,M,… or ddimN"))?;
    anyhow::ensure!(
        counts.iter().all(|&c| c > 0),
        "respacing '{spec}': every section needs at least one step"
    );
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0usize;
    let mut all = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        anyhow::ensure!(
            size >= count,
            "cannot divide a section of {size} steps into {count}"
        );
        let frac = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            all.push(start + round_half_even(cur) as usize);
            cur += frac;
        }
        start += size;
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// Coefficients of a (respaced) diffusion, indexed by the respaced step.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Original timestep of each respaced step (what the model sees).
    pub timestep_map: Vec<usize>,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
    pub log_betas: Vec<f64>,
}

impl Schedule {
    /// `create_diffusion(timestep_respacing)`: 1000 linear steps, respaced by `spec` ("" keeps all).
    pub fn new(spec: &str) -> anyhow::Result<Self> {
        Self::respaced(&linear_betas(1000), spec)
    }

    pub fn respaced(base_betas: &[f64], spec: &str) -> anyhow::Result<Self> {
        let keep = space_timesteps(base_betas.len(), spec)?;
        let mut ac = 1.0f64;
        let base_ac: Vec<f64> = base_betas
            .iter()
            .map(|b| {
                ac *= 1.0 - b;
                ac
            })
            .collect();
        let mut last = 1.0f64;
        let mut betas = Vec::with_capacity(keep.len());
        for &k in &keep {
            betas.push(1.0 - base_ac[k] / last);
            last = base_ac[k];
        }
        Ok(Self::from_betas(betas, keep))
    }

    fn from_betas(betas: Vec<f64>, timestep_map: Vec<usize>) -> Self {
        let n = betas.len();
        let mut ac = Vec::with_capacity(n);
        let mut acc = 1.0f64;
        for b in &betas {
            acc *= 1.0 - b;
            ac.push(acc);
        }
        let prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..n - 1].iter().copied())
            .collect();
        let pv: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - prev[i]) / (1.0 - ac[i]))
            .collect();
        let pv_clipped: Vec<f64> = (0..n)
            .map(|i| {
                if i == 0 && n > 1 {
                    pv[1].ln()
                } else {
                    pv[i].ln()
                }
            })
            .collect();
        Self {
            sqrt_alphas_cumprod: ac.iter().map(|a| a.sqrt()).collect(),
            sqrt_one_minus_alphas_cumprod: ac.iter().map(|a| (1.0 - a).sqrt()).collect(),
            sqrt_recip_alphas_cumprod: ac.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_alphas_cumprod: ac.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            posterior_mean_coef1: (0..n)
                .map(|i| betas[i] * prev[i].sqrt() / (1.0 - ac[i]))
                .collect(),
            posterior_mean_coef2: (0..n)
                .map(|i| (1.0 - prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i]))
                .collect(),
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            posterior_variance: pv,
            posterior_log_variance_clipped: pv_clipped,
            alphas_cumprod_prev: prev,
            alphas_cumprod: ac,
            betas,
            timestep_map,
        }
    }

    pub fn num_steps(&self) -> usize {
        self.betas.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respacing_matches_upstream() {
        assert_eq!(
            space_timesteps(1000, "7").unwrap(),
            vec![0, 166, 333, 500, 666, 832, 999]
        );
        let s = space_timesteps(1000, "ddim8").unwrap();
        assert_eq!(s, vec![0, 125, 250, 375, 500, 625, 750, 875]);
        let s250 = space_timesteps(1000, "250").unwrap();
        assert_eq!(s250.len(), 250);
        assert_eq!((s250[1], s250[248], s250[249]), (4, 995, 999));
        assert_eq!(space_timesteps(1000, "ddim50").unwrap().len(), 50);
        assert!(space_timesteps(1000, "0").is_err());
        assert!(space_timesteps(1000, "abc").is_err());
        assert!(space_timesteps(10, "20").is_err());
        assert_eq!(space_timesteps(1000, "").unwrap().len(), 1000);
    }

    #[test]
    fn half_even() {
        assert_eq!(round_half_even(499.5), 500.0);
        assert_eq!(round_half_even(832.5), 832.0);
        assert_eq!(round_half_even(166.5), 166.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }
}
