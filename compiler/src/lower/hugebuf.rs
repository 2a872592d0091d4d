//! Large `f32` buffers on transparent huge pages: the runtime's arena, and the kernel
//! benchmarks' operands (so that kernels are measured on the memory the engine gives them).
//!
//! A program's arena is tens to hundreds of megabytes that every step streams through. With
//! 4 KiB pages each pass over it misses the TLB every 4 KiB, and on a virtual machine (nested
//! paging) each miss is a two-dimensional page walk: measured on this project's 2-core VM, a
//! 64 MiB copy ran at 0.2-1.0 GB/s on 4 KiB pages and 15-16 GB/s on 2 MiB pages, a 16 MiB one
//! at 1.8-2.5 against 27 GB/s. So the arena is an anonymous mapping advised `MADV_HUGEPAGE`
//! (which the kernel honours when transparent huge pages are `always` or `madvise`), aligned
//! to 2 MiB so that every whole 2 MiB of it can be one page.
//!
//! Everything here is safe code: `memmap2` maps and advises, `bytemuck` views the bytes as
//! `f32` (checking alignment and length). Where mapping fails, or off Linux, the buffer is a
//! plain `Vec`; the advice is a hint, so a kernel that ignores it costs speed, never results.

use memmap2::MmapMut;
use std::ops::{Deref, DerefMut};

/// Huge-page size the mapping is aligned to (x86-64 and aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// A zero-initialised `f32` buffer of fixed length, huge-page backed where the OS allows;
/// dereferences to `[f32]`. The default is empty.
#[derive(Default)]
pub struct HugeBuf {
    store: Store,
}

#[derive(Default)]
enum Store {
    /// An anonymous mapping; the buffer is `len` floats from byte `off` (2 MiB aligned).
    Map { map: MmapMut, off: usize, len: usize },
    /// Small buffers, and the fallback.
    Vec(Vec<f32>),
    #[default]
    Empty,
}

impl HugeBuf {
    /// `len` zeros. Buffers under one huge page are plain vectors (nothing to gain).
    pub fn zeroed(len: usize) -> HugeBuf {
        let bytes = len * std::mem::size_of::<f32>();
        if len == 0 {
            return HugeBuf::default();
        }
        if bytes < HUGE {
            return HugeBuf { store: Store::Vec(vec![0.0; len]) };
        }
        match map(bytes) {
            Some((map, off)) => HugeBuf { store: Store::Map { map, off, len } },
            None => HugeBuf { store: Store::Vec(vec![0.0; len]) },
        }
    }

    /// A copy of `src`.
    pub fn from_slice(src: &[f32]) -> HugeBuf {
        let mut b = HugeBuf::zeroed(src.len());
        b.copy_from_slice(src);
        b
    }

    /// Whether the buffer is a mapping advised for huge pages (not the `Vec` fallback).
    pub fn is_mapped(&self) -> bool {
        matches!(self.store, Store::Map { .. })
    }
}

/// An anonymous zeroed mapping of `bytes` plus alignment slack, advised for huge pages, and
/// the offset of its first 2 MiB boundary.
fn map(bytes: usize) -> Option<(MmapMut, usize)> {
    let map = MmapMut::map_anon(bytes.checked_add(HUGE)?).ok()?;
    let off = map.as_ptr().align_offset(HUGE);
    if off > HUGE {
        return None;
    }
    #[cfg(target_os = "linux")]
    {
        // A hint: where transparent huge pages are off, the mapping stays on 4 KiB pages.
        let _ = map.advise_range(memmap2::Advice::HugePage, off, bytes);
    }
    Some((map, off))
}

impl Deref for HugeBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.store {
            Store::Map { map, off, len } => bytemuck::cast_slice(&map[*off..*off + *len * 4]),
            Store::Vec(v) => v,
            Store::Empty => &[],
        }
    }
}

impl DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.store {
            Store::Map { map, off, len } => bytemuck::cast_slice_mut(&mut map[*off..*off + *len * 4]),
            Store::Vec(v) => v,
            Store::Empty => &mut [],
        }
    }
}

impl std::fmt::Debug for HugeBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} floats{})", self.len(), if matches!(self.store, Store::Map { .. }) { ", mapped" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_writable_and_aligned() {
        for len in [0, 1, 1000, (HUGE / 4) + 3, 3 * HUGE / 4 + 17] {
            let mut b = HugeBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0), "len {len}: not zeroed");
            for (i, v) in b.iter_mut().enumerate() {
                *v = i as f32;
            }
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as f32), "len {len}: lost writes");
            if len * 4 >= HUGE && cfg!(unix) {
                assert!(b.is_mapped(), "len {len}: expected a mapping");
                assert_eq!(b.as_ptr() as usize % HUGE, 0, "len {len}: not 2 MiB aligned");
            }
        }
    }

    #[test]
    fn an_empty_buffer_swaps_with_a_full_one() {
        let mut a = HugeBuf::zeroed(HUGE);
        a[5] = 2.0;
        let mut e = HugeBuf::default();
        std::mem::swap(&mut a, &mut e);
        assert!(a.is_empty());
        assert_eq!(e[5], 2.0);
    }
}
