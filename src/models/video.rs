//! Latte's token layout (Vchitect/Latte `models/latte.py`): one DiT block stack whose blocks
//! alternate between two views of the same `[B, F, N, C]` token grid.
//! * spatial blocks (even index) attend over the N patches of one frame: `[B·F, N, C]`;
//! * temporal blocks (odd index) attend over the F frames at one patch position: `[B·N, F, C]`.
//!
//! A DyLatte "token" for SDT is therefore one patch of one frame in both kinds of block: the
//! token router scores each row of whichever view the block runs on, and the MLP skips it there.
//! Per-sample conditioning (adaLN vectors, TDW masks) is computed once per sample and repeated
//! over that view's sequences, which is what upstream's `repeat(t, 'n d -> (n c) d')` amounts to.

use candle::{Result, Tensor};

/// Shape of a batch of video tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoLayout {
    pub batch: usize,
    pub frames: usize,
    /// Patches per frame.
    pub tokens: usize,
}

impl VideoLayout {
    /// Odd blocks are temporal.
    pub fn is_temporal(layer: usize) -> bool {
        layer % 2 == 1
    }

    /// Sequences per sample in `layer`'s view: F for spatial blocks, N for temporal ones.
    pub fn sequences(&self, layer: usize) -> usize {
        if Self::is_temporal(layer) {
            self.tokens
        } else {
            self.frames
        }
    }

    /// `[B·F, N, C]` → `[B·N, F, C]`.
    pub fn to_temporal(&self, h: &Tensor) -> Result<Tensor> {
        let c = h.dim(2)?;
        h.reshape((self.batch, self.frames, self.tokens, c))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((self.batch * self.tokens, self.frames, c))
    }

    /// `[B·N, F, C]` → `[B·F, N, C]`.
    pub fn to_spatial(&self, h: &Tensor) -> Result<Tensor> {
        let c = h.dim(2)?;
        h.reshape((self.batch, self.tokens, self.frames, c))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((self.batch * self.frames, self.tokens, c))
    }

    /// Per-sample rows `[B, K]` repeated for each sequence of `layer`'s view: `[B·S, K]`.
    pub fn repeat(&self, v: &Tensor, layer: usize) -> Result<Tensor> {
        repeat_rows(v, self.sequences(layer))
    }

    /// A block's token mask `[B·S, T]` in its own view → `[B, F·N]` in (frame, patch) order, so
    /// that masks of both block kinds stack and compare.
    pub fn canonical_tokens(&self, mask: &Tensor, layer: usize) -> Result<Tensor> {
        let (b, f, n) = (self.batch, self.frames, self.tokens);
        if Self::is_temporal(layer) {
            mask.reshape((b, n, f))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, f * n))
        } else {
            mask.reshape((b, f * n))
        }
    }
}

/// `[B, K]` → `[B·r, K]`, each row repeated `r` times consecutively (einops `(n c)` order).
pub fn repeat_rows(v: &Tensor, r: usize) -> Result<Tensor> {
    if r == 1 {
        return Ok(v.clone());
    }
    let (b, k) = v.dims2()?;
    v.unsqueeze(1)?
        .broadcast_as((b, r, k))?
        .contiguous()?
        .reshape((b * r, k))
}

/// `[B, C, F, H, W]` (sampler layout) → `[B·F, C, H, W]` frames.
pub fn frames_of(x: &Tensor) -> Result<Tensor> {
    let (b, c, f, h, w) = x.dims5()?;
    x.permute((0, 2, 1, 3, 4))?
        .contiguous()?
        .reshape((b * f, c, h, w))
}

/// `[B·F, C, H, W]` frames → `[B, C, F, H, W]`.
pub fn video_of(frames: &Tensor, batch: usize) -> Result<Tensor> {
    let (bf, c, h, w) = frames.dims4()?;
    frames
        .reshape((batch, bf / batch, c, h, w))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn views_round_trip_and_match_einops() {
        let l = VideoLayout {
            batch: 2,
            frames: 3,
            tokens: 4,
        };
        let d = Device::Cpu;
        let h = Tensor::arange(0f32, 2. * 3. * 4. * 5., &d)
            .unwrap()
            .reshape((6, 4, 5))
            .unwrap();
        let t = l.to_temporal(&h).unwrap();
        // '(b f) t d -> (b t) f d': row (b=1, token=2), frame 1 is spatial row (b=1, f=1), token 2.
        let got = t.get(4 + 2).unwrap().get(1).unwrap();
        let want = h.get(3 + 1).unwrap().get(2).unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap()
        );
        let back = l.to_spatial(&t).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Canonical token masks agree whichever view produced them.
        let m = Tensor::arange(0f32, 24., &d)
            .unwrap()
            .reshape((6, 4))
            .unwrap();
        let mt = l
            .to_temporal(&m.unsqueeze(2).unwrap())
            .unwrap()
            .squeeze(2)
            .unwrap();
        assert_eq!(
            l.canonical_tokens(&mt, 1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            l.canonical_tokens(&m, 0).unwrap().to_vec2::<f32>().unwrap()
        );
        let r = repeat_rows(&Tensor::new(&[[1f32], [2.]], &d).unwrap(), 3).unwrap();
        assert_eq!(
            r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1., 1., 1., 2., 2., 2.]
        );
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 2, 2), &d).unwrap();
        let y = video_of(&frames_of(&x).unwrap(), 2).unwrap();
        assert_eq!(
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
