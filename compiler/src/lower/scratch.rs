//! Per-thread scratch buffers of the kernel drivers.
//!
//! The executor calls a layer's kernels once per chunk of samples on each thread, every step.
//! Buffers allocated per call are mostly large enough that freeing them hands them back to the
//! OS (glibc's mmap threshold, heap trimming), so each call would fault fresh zero-filled pages
//! in again. Each kind of driver keeps its buffers in a `thread_local!` cell instead (a
//! holder per kind: [`super::conv`]'s, each Winograd scratch, [`super::dense`]'s, and the max
//! pool's own), grown to the largest need of any layer run on that thread and reused by the
//! next call; a steady-state step allocates nothing large.
//!
//! [`with`] moves a holder out of its cell for the call and back after, so no `RefCell`
//! borrow is held while kernels run: a nested use on the same thread would find an empty
//! holder and allocate rather than panic. (None happens: the drivers never call into rayon,
//! the only way another task could run on a thread mid-call.)

use std::cell::RefCell;
use std::thread::LocalKey;

/// Run `f` on this thread's holder in `key`, moved out of the cell for the call (an empty one
/// stays behind) and put back after; buffers it grew stay for the next call. A panic in `f`
/// drops the holder (the next call starts empty).
pub(super) fn with<T: Default, R>(key: &'static LocalKey<RefCell<T>>, f: impl FnOnce(&mut T) -> R) -> R {
    let mut held = key.take();
    let r = f(&mut held);
    key.set(held);
    r
}

/// The first `n` elements of `v`, grown with default values (zeros) if it is shorter. Never
/// shrinks, and elements already there keep what an earlier call left: for buffers written
/// before read.
pub(super) fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}
