//! The order in which a trainer reads its dataset: every epoch a fresh permutation seeded by
//! (seed, epoch), so a run resumed at any step reads exactly what the uninterrupted run would.

use super::trainer::mix;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub struct EpochOrder {
    seed: u64,
    len: usize,
    /// The permutation of the epoch last asked for.
    cached: (u64, Vec<usize>),
}

impl EpochOrder {
    pub fn new(seed: u64, len: usize) -> Self {
        Self {
            seed,
            len,
            cached: (u64::MAX, vec![]),
        }
    }

    /// The dataset index read at position `pos` of the whole run (`pos / len` is the epoch).
    pub fn index(&mut self, pos: u64) -> usize {
        let n = self.len as u64;
        let epoch = pos / n;
        if self.cached.0 != epoch {
            let mut p: Vec<usize> = (0..self.len).collect();
            p.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, 0xDA7A ^ epoch)));
            self.cached = (epoch, p);
        }
        self.cached.1[(pos % n) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let mut o = EpochOrder::new(3, 50);
        let e0: Vec<usize> = (0..50).map(|p| o.index(p)).collect();
        let e1: Vec<usize> = (50..100).map(|p| o.index(p)).collect();
        let mut s = e0.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        // Asking out of order gives the same answer (resume).
        assert_eq!(EpochOrder::new(3, 50).index(57), e1[7]);
    }
}
