//! A least-recently-used map under a byte budget: what the slice caches of the DiT and FLUX
//! share. Entries of size 0 (views into weights that exist anyway) are kept for free and never
//! evicted; an entry larger than the whole budget is handed back without being kept.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
pub struct ByteLru<K, V> {
    budget: usize,
    used: usize,
    tick: u64,
    map: HashMap<K, (V, usize, u64)>,
    pub hits: u64,
    pub misses: u64,
}

impl<K: Hash + Eq + Copy, V: Clone> ByteLru<K, V> {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Bytes held by sized entries.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The value of `key`, or `make()`'s `(value, bytes)` on a miss, kept if it fits (older
    /// sized entries are evicted to make room).
    pub fn get_or_make<E>(
        &mut self,
        key: K,
        make: impl FnOnce() -> Result<(V, usize), E>,
    ) -> Result<V, E> {
        self.tick += 1;
        if let Some(e) = self.map.get_mut(&key) {
            e.2 = self.tick;
            self.hits += 1;
            return Ok(e.0.clone());
        }
        self.misses += 1;
        let (v, size) = make()?;
        if size > self.budget {
            return Ok(v);
        }
        while self.used + size > self.budget {
            let oldest = self
                .map
                .iter()
                .filter(|(_, e)| e.1 > 0)
                .min_by_key(|(_, e)| e.2)
                .map(|(k, _)| *k)
                .expect("used > 0 implies a sized entry");
            let (_, s, _) = self.map.remove(&oldest).expect("key just found");
            self.used -= s;
        }
        self.used += size;
        self.map.insert(key, (v.clone(), size, self.tick));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_sized_entry() {
        let mut c: ByteLru<u32, u32> = ByteLru::new(10);
        let ok = |v: u32, s: usize| move || Ok::<_, ()>((v, s));
        c.get_or_make(1, ok(1, 4)).unwrap();
        c.get_or_make(2, ok(2, 4)).unwrap();
        c.get_or_make(0, ok(0, 0)).unwrap(); // a view: free
        c.get_or_make(1, ok(9, 4)).unwrap(); // hit: 1 is now the most recent
        c.get_or_make(3, ok(3, 4)).unwrap(); // evicts 2
        assert_eq!((c.hits, c.misses, c.used_bytes(), c.len()), (1, 4, 8, 3));
        assert_eq!(c.get_or_make(2, ok(7, 4)).unwrap(), 7, "2 was evicted");
        assert_eq!(c.get_or_make(0, ok(5, 0)).unwrap(), 0, "views stay");
        assert_eq!(c.get_or_make(4, ok(4, 11)).unwrap(), 4);
        assert_eq!(c.len(), 3, "too big for the budget: not kept");
    }
}
