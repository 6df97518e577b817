//! Settings of the binary's allocator (mimalloc, linked by this crate's `mimalloc` dependency).
//!
//! The CLI keeps freed pages instead of returning them to the OS: every forward pass allocates
//! the same large activation buffers again, and re-faulting fresh zeroed pages cost ~10 % of CPU
//! time (measured: 16× fewer page faults). After loading a model, though, the buffers freed
//! while building it (f32 originals of bf16 weights, checkpoint staging) are given back once.

use std::os::raw::{c_int, c_long};

// Links mimalloc into every binary of this crate (tests included), which the `extern` functions
// below need even where it is not the global allocator.
extern crate mimalloc as _;

extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
    fn mi_collect(force: bool);
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// Never return freed pages to the OS (call once at start-up, before heavy allocation).
pub fn keep_freed_pages() {
    // SAFETY: plain option setter of the linked allocator.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Runs `f` (loading a model) with freed pages returned to the OS at once, then keeps freed
/// pages again. Buffers freed while a model is built — the f32 originals of bf16/f16 weights,
/// checkpoint staging — would otherwise stay resident for the whole run.
pub fn returning_freed_pages<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: option setter and collection entry point of the linked allocator.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let out = f();
    // SAFETY: as above.
    unsafe {
        mi_collect(true);
        mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
    out
}
