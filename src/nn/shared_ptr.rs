//! Raw pointers that rayon tasks may share, for the kernels whose tasks each write a disjoint
//! region of one output buffer (or only read one input). Every use site states which region.

/// A pointer to a buffer whose disjoint regions parallel tasks write.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: the users write disjoint regions only (see each call site).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Through a method, so closures capture the whole (Send + Sync) wrapper.
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

/// A pointer to a buffer that parallel tasks only read.
#[derive(Clone, Copy)]
pub(crate) struct SharedConst<T>(pub(crate) *const T);
// SAFETY: the users only read through it.
unsafe impl<T> Send for SharedConst<T> {}
unsafe impl<T> Sync for SharedConst<T> {}

impl<T> SharedConst<T> {
    pub(crate) fn ptr(self) -> *const T {
        self.0
    }
}
