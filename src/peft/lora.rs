//! Timestep-dynamic LoRA factors (the building block of TD-LoRA, DyDiT++'s parameter-efficient
//! training): a rank-R update of a frozen linear layer, its rank split into G groups that a
//! router on the timestep embedding switches on or off,
//!
//!   ΔW_t = (α / R) · Σ_g m_g(t) · B_g A_g,   A: [R, in], B: [out, R], group g = rows g·R/G.. of A.
//!
//! Two equivalent forms, as for TDW itself:
//! * training: the frozen GEMM plus a low-rank side path per sample, x·Aᵀ ⊙ m → ·Bᵀ, so that each
//!   sample of a batch can have its own timestep and gates (and the gates can be STE values);
//! * inference: the gates depend on t only, so ΔW_t is merged into the weight once per timestep
//!   of the grid — no cost per step. Plain LoRA is the case G = 1 with the gate always on.

use super::LoraTarget;
use candle::{Result, Tensor, D};

/// LoRA factors of one linear layer.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `[R, in]`
    pub a: Tensor,
    /// `[out, R]`
    pub b: Tensor,
    /// Rank groups the router switches (R must be a multiple).
    pub groups: usize,
    /// α / R.
    pub scale: f64,
}

impl LoraFactors {
    pub fn new(a: Tensor, b: Tensor, groups: usize, alpha: f64) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb || groups == 0 || r % groups != 0 {
            candle::bail!(
                "LoRA: A has rank {r}, B rank {rb}; the rank must match and be a multiple of the \
                 {groups} groups"
            );
        }
        Ok(Self {
            a,
            b,
            groups,
            scale: alpha / r as f64,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// Per-sample gates `[B, G]` → per-rank multipliers `[B, R]`.
    fn rank_gates(&self, gates: &Tensor) -> Result<Tensor> {
        let (b, g) = gates.dims2()?;
        let per = self.rank() / g;
        gates
            .unsqueeze(2)?
            .broadcast_as((b, g, per))?
            .reshape((b, g * per))
    }

    /// The side path of `x [B, N, in]`: scale · ((x·Aᵀ) ⊙ m_b)·Bᵀ → `[B, N, out]`; `gates`
    /// `[B, G]` (None: every group on, plain LoRA). Differentiable in A, B and the gates.
    pub fn side(&self, x: &Tensor, gates: Option<&Tensor>) -> Result<Tensor> {
        let (bsz, n, inp) = x.dims3()?;
        let r = self.rank();
        let mut h = x
            .reshape((bsz * n, inp))?
            .matmul(&self.a.t()?)?
            .reshape((bsz, n, r))?;
        if let Some(g) = gates {
            if g.dims() != [bsz, self.groups] {
                candle::bail!(
                    "LoRA gates {:?} for a batch of {bsz} and {} groups",
                    g.dims(),
                    self.groups
                );
            }
            h = h.broadcast_mul(&self.rank_gates(g)?.unsqueeze(1)?)?;
        }
        let out = h.reshape((bsz * n, r))?.matmul(&self.b.t()?)?;
        (out * self.scale)?.reshape((bsz, n, ()))
    }

    /// ΔW `[out, in]` for one gate pattern (inference: merged into the weight per timestep).
    /// The down-projection of rows `x [B·N, in]` (`n` rows per sample), gated per sample and
    /// scaled: `u = scale · (x·Aᵀ) ⊙ g` `[B·N, R]`, so that the update is `u · Bᵀ`. Everything
    /// per-row stays R wide; the caller adds `u · Bᵀ` inside the frozen linear's own GEMM.
    pub fn down(&self, x: &Tensor, n: usize, gates: Option<&Tensor>) -> Result<Tensor> {
        let (rows, _) = x.dims2()?;
        let r = self.rank();
        let h = (x.matmul(&self.a.t()?)? * self.scale)?;
        let Some(g) = gates else {
            return Ok(h);
        };
        let bsz = rows / n.max(1);
        if g.dims() != [bsz, self.groups] || bsz * n != rows {
            candle::bail!(
                "LoRA gates {:?} for {rows} rows of {n} tokens and {} groups",
                g.dims(),
                self.groups
            );
        }
        h.reshape((bsz, n, r))?
            .broadcast_mul(&self.rank_gates(g)?.unsqueeze(1)?)?
            .reshape((rows, r))
    }

    pub fn delta(&self, gates: &[bool]) -> Result<Tensor> {
        if gates.len() != self.groups {
            candle::bail!("{} gates for {} LoRA groups", gates.len(), self.groups);
        }
        let per = self.rank() / self.groups;
        let keep: Vec<u32> = gates
            .iter()
            .enumerate()
            .filter(|(_, &on)| on)
            .flat_map(|(g, _)| (g * per) as u32..((g + 1) * per) as u32)
            .collect();
        if keep.is_empty() {
            return Tensor::zeros(
                (self.b.dim(0)?, self.a.dim(1)?),
                self.a.dtype(),
                self.a.device(),
            );
        }
        let idx = Tensor::from_vec(keep.clone(), keep.len(), self.a.device())?;
        let a = self.a.index_select(&idx, 0)?;
        let b = self.b.index_select(&idx, D::Minus1)?;
        b.matmul(&a)? * self.scale
    }

    /// `weight + ΔW(gates)`.
    pub fn merged(&self, weight: &Tensor, gates: &[bool]) -> Result<Tensor> {
        weight + self.delta(gates)?.to_dtype(weight.dtype())?
    }
}

/// A block's adapter: factors per target layer and, for TD-LoRA, the router that gates the
/// groups from the timestep embedding (the TDW routers' form: one linear, on iff logit > 0).
#[derive(Debug, Clone)]
pub struct BlockLora {
    /// Indexed like [`LoraTarget::ALL`].
    pub layers: [Option<LoraFactors>; 4],
    /// `t_emb [B, C]` → group logits `[B, G]`; `None`: plain LoRA (every group always on).
    pub router: Option<crate::nn::Linear>,
}

impl BlockLora {
    pub fn factors(&self, t: LoraTarget) -> Option<&LoraFactors> {
        self.layers[t as usize].as_ref()
    }

    /// The groups on at one timestep (inference: logit > 0, as the TDW routers decide).
    pub fn decide(&self, t_emb: &Tensor) -> Result<Option<Vec<bool>>> {
        let Some(r) = &self.router else {
            return Ok(None);
        };
        let logits = r
            .forward(t_emb)?
            .to_dtype(candle::DType::F32)?
            .get(0)?
            .to_vec1::<f32>()?;
        Ok(Some(
            logits
                .iter()
                .map(|&l| crate::dynamic::router::gate_on(l))
                .collect(),
        ))
    }

    /// `lin` with this adapter's update for `gates` folded in (`None`: every group on).
    /// Gates depend on t alone, so this is computed once per distinct pattern of a grid.
    pub fn merged(
        &self,
        t: LoraTarget,
        lin: &crate::nn::Linear,
        gates: Option<&[bool]>,
    ) -> Result<crate::nn::Linear> {
        let Some(f) = self.factors(t) else {
            return Ok(lin.clone());
        };
        let all = vec![true; f.groups];
        let w = f.merged(&lin.weight, gates.unwrap_or(&all))?;
        Ok(crate::nn::Linear::new(w, lin.bias.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ops::max_rel_err;
    use candle::Device;

    fn factors(groups: usize) -> (Tensor, LoraFactors) {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &d).unwrap();
        let a = Tensor::randn(0f32, 1.0, (4, 5), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, (6, 4), &d).unwrap();
        (w, LoraFactors::new(a, b, groups, 8.0).unwrap())
    }

    /// Merged weights equal the frozen layer plus the gated side path, per gate pattern.
    #[test]
    fn merged_equals_unmerged_for_every_gate_pattern() {
        let (w, f) = factors(2);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &Device::Cpu).unwrap();
        for pattern in [[true, true], [true, false], [false, true], [false, false]] {
            let m = Tensor::new(
                &[
                    pattern.map(|p| p as u8 as f32),
                    pattern.map(|p| p as u8 as f32),
                ],
                &Device::Cpu,
            )
            .unwrap();
            let unmerged = (x.broadcast_matmul(&w.t().unwrap()).unwrap()
                + f.side(&x, Some(&m)).unwrap())
            .unwrap();
            let merged = x
                .broadcast_matmul(&f.merged(&w, &pattern).unwrap().t().unwrap())
                .unwrap();
            let err = max_rel_err(&merged, &unmerged).unwrap();
            assert!(err < 1e-5, "{pattern:?}: {err}");
        }
        // All groups off: the frozen layer exactly.
        assert_eq!(
            max_rel_err(&f.merged(&w, &[false, false]).unwrap(), &w).unwrap(),
            0.0
        );
        // Plain LoRA (no gates) is every group on.
        let all = f.side(&x, None).unwrap();
        let on = f
            .side(
                &x,
                Some(&Tensor::ones((2, 2), candle::DType::F32, &Device::Cpu).unwrap()),
            )
            .unwrap();
        assert_eq!(max_rel_err(&all, &on).unwrap(), 0.0);
    }

    /// The side path trains A, B and (STE) gates: each gets the analytic gradient of a linear
    /// loss, checked against central differences along a random direction.
    #[test]
    fn side_path_gradients() {
        let d = Device::Cpu;
        let a = candle::Var::randn(0f64, 1.0, (4, 5), &d).unwrap();
        let b = candle::Var::randn(0f64, 1.0, (6, 4), &d).unwrap();
        let g = candle::Var::new(&[[0.3f64, 0.9], [1.0, 0.2]], &d).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 3, 5), &d).unwrap();
        let wgt = Tensor::randn(0f64, 1.0, (2, 3, 6), &d).unwrap();
        let loss = |a: &Tensor, b: &Tensor, g: &Tensor| -> Tensor {
            let f = LoraFactors::new(a.clone(), b.clone(), 2, 8.0).unwrap();
            (f.side(&x, Some(g)).unwrap() * &wgt)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(a.as_tensor(), b.as_tensor(), g.as_tensor())
            .backward()
            .unwrap();
        let val = |t: Tensor| t.to_scalar::<f64>().unwrap();
        for which in 0..3 {
            let v = [&a, &b, &g][which];
            let grad = grads.get(v.as_tensor()).expect("a gradient");
            let dir = Tensor::randn(0f64, 1.0, v.dims(), &d).unwrap();
            let analytic = val((grad * &dir).unwrap().sum_all().unwrap());
            let shifted = |e: f64| {
                let mut t = [
                    a.as_tensor().clone(),
                    b.as_tensor().clone(),
                    g.as_tensor().clone(),
                ];
                t[which] = (&t[which] + (&dir * e).unwrap()).unwrap();
                val(loss(&t[0], &t[1], &t[2]))
            };
            let numeric = (shifted(1e-6) - shifted(-1e-6)) / 2e-6;
            assert!(
                (analytic - numeric).abs() <= 1e-6 * analytic.abs().max(1.0),
                "tensor {which}: {analytic} vs {numeric}"
            );
        }
    }

    #[test]
    fn shapes_are_checked() {
        let d = Device::Cpu;
        let a = Tensor::zeros((4, 5), candle::DType::F32, &d).unwrap();
        let b = Tensor::zeros((6, 3), candle::DType::F32, &d).unwrap();
        assert!(LoraFactors::new(a.clone(), b, 2, 1.0).is_err());
        let b = Tensor::zeros((6, 4), candle::DType::F32, &d).unwrap();
        assert!(LoraFactors::new(a.clone(), b.clone(), 3, 1.0).is_err());
        let f = LoraFactors::new(a, b, 2, 1.0).unwrap();
        assert!(f.delta(&[true]).is_err());
        let x = Tensor::zeros((2, 3, 5), candle::DType::F32, &d).unwrap();
        let g = Tensor::zeros((1, 2), candle::DType::F32, &d).unwrap();
        assert!(f.side(&x, Some(&g)).is_err());
    }
}
