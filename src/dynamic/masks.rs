//! Width masks: which heads and MLP groups each layer runs at a timestep, and the per-grid table.

use serde::Serialize;

/// A set of active units (heads or MLP groups) of one layer, at most 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct UnitMask {
    bits: u64,
    len: u8,
}

impl UnitMask {
    pub fn full(len: usize) -> Self {
        assert!(len <= 64, "at most 64 heads/groups per layer");
        let bits = if len == 64 {
            u64::MAX
        } else {
            (1u64 << len) - 1
        };
        Self {
            bits,
            len: len as u8,
        }
    }
    pub fn from_bools(v: &[bool]) -> Self {
        assert!(v.len() <= 64, "at most 64 heads/groups per layer");
        let bits = v
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &on)| acc | ((on as u64) << i));
        Self {
            bits,
            len: v.len() as u8,
        }
    }
    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bits(&self) -> u64 {
        self.bits
    }
    pub fn count(&self) -> usize {
        self.bits.count_ones() as usize
    }
    pub fn is_full(&self) -> bool {
        self.count() == self.len()
    }
    pub fn get(&self, i: usize) -> bool {
        (self.bits >> i) & 1 == 1
    }
    pub fn to_bools(&self) -> Vec<bool> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
    /// Active unit indices in increasing order.
    pub fn active(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.get(i)).collect()
    }
    /// `(start, len)` when the active units form one contiguous run (new-format masks always
    /// contain unit 0, so a run is a prefix): such a slice is a zero-copy view of the weights.
    pub fn contiguous_run(&self) -> Option<(usize, usize)> {
        if self.bits == 0 {
            return None;
        }
        let start = self.bits.trailing_zeros() as usize;
        let len = self.count();
        let run = if len == 64 {
            u64::MAX
        } else {
            ((1u64 << len) - 1) << start
        };
        (run == self.bits).then_some((start, len))
    }
    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i) as u8 as f32).collect()
    }
}

/// Width of one layer at one timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct LayerWidth {
    pub heads: UnitMask,
    pub groups: UnitMask,
    /// TD-LoRA: the adapter groups on at this timestep (empty without a TD-LoRA adapter). Not a
    /// width, but a function of t alike, so it rides in the same table and picks the merged
    /// weights.
    #[serde(skip_serializing_if = "UnitMask::is_empty")]
    pub lora: UnitMask,
}

impl LayerWidth {
    pub fn full(heads: usize, groups: usize) -> Self {
        Self {
            heads: UnitMask::full(heads),
            groups: UnitMask::full(groups),
            lora: UnitMask::full(0),
        }
    }
}

/// Every layer's width at every timestep of a sampling grid, computed once before sampling.
/// TDW masks depend on t alone, so this is exact for every sample and both CFG halves.
#[derive(Debug, Clone, Serialize)]
pub struct MaskTable {
    /// The timesteps the model sees (original DDPM steps, or continuous t for flow models).
    pub timesteps: Vec<f32>,
    /// `widths[step][layer]`.
    pub widths: Vec<Vec<LayerWidth>>,
}

impl MaskTable {
    pub fn step(&self, t: f32) -> Option<&[LayerWidth]> {
        self.timesteps
            .iter()
            .position(|&x| x == t)
            .map(|i| self.widths[i].as_slice())
    }

    /// Distinct (layer, width) patterns: what the slice cache has to hold for the whole grid.
    pub fn distinct_patterns(&self) -> usize {
        let mut set = std::collections::HashSet::new();
        for step in &self.widths {
            for (l, w) in step.iter().enumerate() {
                set.insert((l, *w));
            }
        }
        set.len()
    }

    /// Mean active fraction of heads and of groups per step.
    pub fn active_fractions(&self) -> Vec<(f64, f64)> {
        self.widths
            .iter()
            .map(|layers| {
                let (mut h, mut hn, mut g, mut gn) = (0, 0, 0, 0);
                for w in layers {
                    h += w.heads.count();
                    hn += w.heads.len();
                    g += w.groups.count();
                    gn += w.groups.len();
                }
                (h as f64 / hn.max(1) as f64, g as f64 / gn.max(1) as f64)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn unit_mask_roundtrip() {
        let m = UnitMask::from_bools(&[true, false, true, true]);
        assert_eq!(m.active(), vec![0, 2, 3]);
        assert_eq!(m.count(), 3);
        assert!(!m.is_full());
        assert_eq!(m.to_f32(), vec![1.0, 0.0, 1.0, 1.0]);
        assert!(UnitMask::full(16).is_full());
        assert_eq!(UnitMask::full(64).count(), 64);
        assert_eq!(
            UnitMask::from_bools(&[false, true, true, false]).contiguous_run(),
            Some((1, 2))
        );
        assert_eq!(
            UnitMask::from_bools(&[true, false, true]).contiguous_run(),
            None
        );
        assert_eq!(UnitMask::full(5).contiguous_run(), Some((0, 5)));
    }
}
