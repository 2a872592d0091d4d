//! The only `unsafe` code of the lowering: turning finalized JIT addresses into function
//! pointers, calling them, and freeing the code when the last handle goes (and the few
//! intrinsics and CPU-feature builds listed below).
//!
//! Every generated kernel has the native signature
//! `extern "C" fn(*mut f32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32)`
//! (see [`jit`](super::jit)): argument 0 is written, arguments 1..7 are only read.
//!
//! Bounds this module relies on (and checks):
//! 1. **Extents.** When a kernel is defined, its generator declares, per argument, how many
//!    `f32` elements the code may touch from that pointer ([`Extents`]). [`Kernel::call`]
//!    checks `slice.len() >= extent` for all seven slices before the call and panics otherwise
//!    (a bug in a driver, never a user input error: the public APIs check user buffers and
//!    return errors first). The generators in `gemm.rs`, `naive.rs`, `peak.rs` compute every
//!    address from compile-time constants inside those extents; that is the one fact this
//!    module takes on trust, and every kernel is tested against a scalar reference over its
//!    full extents (`compiler/tests/lower_*.rs`).
//! 2. **Aliasing.** Argument 0 comes from a `&mut [f32]`, the others from `&[f32]`, so the
//!    written memory never overlaps memory read through another argument. Kernels do not keep
//!    pointers after returning.
//! 3. **Lifetime of the code.** Each [`Kernel`] holds an `Arc<CodeOwner>`; the JIT module (and
//!    its executable memory) is freed only when the last kernel of its set is dropped. The
//!    function pointer is private and never leaves a `Kernel`.
//! 4. **Signature.** [`Jit::define`](super::jit::Jit::define) is the only way to create a
//!    kernel, and it always declares the seven-pointer signature above with the module's default
//!    (host C) calling convention, which is what `extern "C"` means on the host.
//! 5. **Clock.** [`thread_cpu_time`] passes a pointer to a local `timespec` to
//!    `clock_gettime`, which writes exactly one `timespec`.
//! 6. **Threads.** Kernels are pure functions of their arguments (no globals, no state), so
//!    calling one from several threads at once is sound; `Kernel` is `Send + Sync`.
//! 7. **Stream kernels** ([`StreamKernel`], defined only by
//!    [`Jit::define_stream`](super::jit::Jit::define_stream), used by the optimiser updates
//!    in [`optim`](super::optim)) have the native signature
//!    `extern "C" fn(usize, *const f32, *const f32, *mut f32, *mut f32, *mut f32, *mut f32)`:
//!    `(n, scalars, read, w0, w1, w2, w3)`. The generator's contract (the one fact taken on
//!    trust, tested against the reference optimiser in `runtime/tests/optim_jit.rs` on odd
//!    lengths) is that the code touches elements `0..n` of `read` and of `w0..w[writes]`, never
//!    the other written pointers, and `scalars[..scalars]`. [`StreamKernel::call`] derives `n`
//!    from `read.len()` and checks every used written slice has exactly `n` elements and the
//!    scalar slice at least the declared count, panicking otherwise (a driver bug: the public
//!    API in `optim.rs` returns errors first). The written slices are distinct `&mut` borrows
//!    and `read`/`scalars` are shared borrows, so no written memory overlaps another argument.
//!    Bounds 3, 4 and 6 hold as for [`Kernel`].
//! 8. **Denormals.** [`flush_denormals`] sets the FTZ and DAZ bits (15 and 6) of this thread's
//!    MXCSR, the SSE control register every f32 instruction of the thread (JIT code included)
//!    obeys; it touches no memory.
//! 9. **Prefetch.** [`prefetch`] issues `prefetcht0` for addresses inside the slice it is
//!    given (`i < s.len()`); a prefetch is a hint that reads nothing architecturally and never
//!    faults.
//! 10. **CPU-feature builds.** `pool_max_avx2` and `pool_back2x2_avx2` call max-pooling
//!     loops compiled with `#[target_feature(enable = "avx2")]` (safe Rust otherwise, bounds
//!     checked like the baseline build) only after `is_x86_feature_detected!("avx2")` said
//!     this CPU has AVX2: the one requirement of calling such a function. Likewise
//!     `pool_back_s1_avx512` calls a loop built with `avx2,avx512f,avx512vl,avx512bw,avx512dq`
//!     only after `is_x86_feature_detected!` said this CPU has each of those five.
//! 11. **Register shuffles.** [`transpose4`] calls the SSE unpack and move intrinsics on
//!     values (no memory access); SSE is part of every x86-64 CPU (the baseline target),
//!     which is all those intrinsics require.

use super::jit::{Extents, KERNEL_ARGS};
use super::pool::{PoolKernels, Scratch};
use cranelift_jit::JITModule;
use std::sync::{Arc, Mutex};

type RawFn = unsafe extern "C" fn(*mut f32, *const f32, *const f32, *const f32, *const f32, *const f32, *const f32);

/// Written pointers of a stream kernel (bound 7).
pub const STREAM_WRITES: usize = 4;

type StreamFn = unsafe extern "C" fn(usize, *const f32, *const f32, *mut f32, *mut f32, *mut f32, *mut f32);

/// Owns a finalized JIT module; frees its code on drop. Shared by every [`Kernel`] of a set.
pub struct CodeOwner(Mutex<Option<JITModule>>);

impl CodeOwner {
    /// Take ownership of a module whose definitions are finalized.
    pub(crate) fn new(module: JITModule) -> CodeOwner {
        CodeOwner(Mutex::new(Some(module)))
    }
}

impl Drop for CodeOwner {
    fn drop(&mut self) {
        let slot = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = slot.take() {
            // SAFETY: we are the last owner (Drop of the Arc's content), so no Kernel — the
            // only holder of pointers into this module — exists any more (bound 3).
            unsafe { module.free_memory() };
        }
    }
}

/// One callable JIT kernel: a function pointer, the extents it may touch, and a share of the
/// code's owner.
#[derive(Clone)]
pub struct Kernel {
    f: RawFn,
    extents: Extents,
    _owner: Arc<CodeOwner>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("extents", &self.extents).finish()
    }
}

impl Kernel {
    /// Wrap the finalized address of a kernel defined by [`Jit::define`](super::jit::Jit::define).
    pub(crate) fn from_finalized(owner: &Arc<CodeOwner>, addr: *const u8, extents: Extents) -> Kernel {
        assert!(!addr.is_null(), "finalized JIT function has a null address");
        // SAFETY: `addr` is the entry of a finalized function of `owner`'s module declared with
        // exactly this seven-pointer, no-result signature in the host calling convention
        // (bound 4); the module outlives the pointer (bound 3).
        let f = unsafe { std::mem::transmute::<*const u8, RawFn>(addr) };
        Kernel { f, extents, _owner: Arc::clone(owner) }
    }

    /// The per-argument element extents the kernel was declared with.
    pub fn extents(&self) -> Extents {
        self.extents
    }

    /// Call the kernel: `out` is argument 0, `ins` arguments 1..7. Panics if any slice is
    /// shorter than the kernel's declared extent for it (bound 1).
    #[inline]
    pub fn call(&self, out: &mut [f32], ins: [&[f32]; KERNEL_ARGS - 1]) {
        assert!(
            out.len() >= self.extents[0],
            "JIT kernel output slice too short: {} < {}",
            out.len(),
            self.extents[0]
        );
        for (i, s) in ins.iter().enumerate() {
            assert!(
                s.len() >= self.extents[i + 1],
                "JIT kernel argument {} too short: {} < {}",
                i + 1,
                s.len(),
                self.extents[i + 1]
            );
        }
        // SAFETY: bounds 1-4 above: every access the code makes is inside the slices whose
        // lengths were checked just now, `out` is exclusive, the code is alive.
        unsafe {
            (self.f)(
                out.as_mut_ptr(),
                ins[0].as_ptr(),
                ins[1].as_ptr(),
                ins[2].as_ptr(),
                ins[3].as_ptr(),
                ins[4].as_ptr(),
                ins[5].as_ptr(),
            )
        };
    }
}

/// One callable elementwise stream kernel (bound 7): a function pointer, how many scalars it
/// reads and how many of its written pointers it uses, and a share of the code's owner.
#[derive(Clone)]
pub struct StreamKernel {
    f: StreamFn,
    scalars: usize,
    writes: usize,
    _owner: Arc<CodeOwner>,
}

impl std::fmt::Debug for StreamKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamKernel").field("scalars", &self.scalars).field("writes", &self.writes).finish()
    }
}

impl StreamKernel {
    /// Wrap the finalized address of a kernel defined by
    /// [`Jit::define_stream`](super::jit::Jit::define_stream).
    pub(crate) fn from_finalized(owner: &Arc<CodeOwner>, addr: *const u8, scalars: usize, writes: usize) -> StreamKernel {
        assert!(!addr.is_null(), "finalized JIT function has a null address");
        assert!((1..=STREAM_WRITES).contains(&writes), "stream kernel writes {writes} buffers");
        // SAFETY: `addr` is the entry of a finalized function of `owner`'s module declared by
        // `define_stream` with exactly the (usize, 6 pointers), no-result signature in the
        // host calling convention (bounds 4, 7); the module outlives the pointer (bound 3).
        let f = unsafe { std::mem::transmute::<*const u8, StreamFn>(addr) };
        StreamKernel { f, scalars, writes, _owner: Arc::clone(owner) }
    }

    /// How many scalars the kernel reads.
    pub fn scalars(&self) -> usize {
        self.scalars
    }

    /// How many written buffers the kernel uses (the first `writes` of `written`).
    pub fn writes(&self) -> usize {
        self.writes
    }

    /// Call the kernel over `n = read.len()` elements. Panics unless `scalars` holds at least
    /// [`scalars`](Self::scalars) values and each of the first [`writes`](Self::writes)
    /// written slices holds exactly `n` (the others are not touched; pass empty slices).
    #[inline]
    pub fn call(&self, scalars: &[f32], read: &[f32], written: [&mut [f32]; STREAM_WRITES]) {
        let n = read.len();
        assert!(scalars.len() >= self.scalars, "stream kernel scalars too short: {} < {}", scalars.len(), self.scalars);
        for (i, w) in written.iter().take(self.writes).enumerate() {
            assert!(w.len() == n, "stream kernel written buffer {i} has {} elements, read has {n}", w.len());
        }
        let [w0, w1, w2, w3] = written;
        // SAFETY: bound 7: the code touches `read[..n]`, `w0..w[writes]` each of exactly `n`
        // elements (checked just now), `scalars[..self.scalars]` (checked); the written slices
        // are exclusive and distinct; the code is alive (bound 3).
        unsafe {
            (self.f)(n, scalars.as_ptr(), read.as_ptr(), w0.as_mut_ptr(), w1.as_mut_ptr(), w2.as_mut_ptr(), w3.as_mut_ptr())
        };
    }
}

/// Flush denormal f32 results to zero and read denormal operands as zero on the calling
/// thread and the threads it starts afterwards, which inherit the setting (x86-64 SSE
/// FTZ/DAZ; nothing elsewhere). Values below 1.2e-38 (late in training: tiny
/// gradients, decayed optimiser state) otherwise take the CPU's slow microcode path, tens of
/// times slower per instruction; deep-learning runtimes run with these bits set. Deterministic:
/// the same inputs still give bit-identical results.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        let mut csr: u32 = 0;
        // SAFETY: bound 8: `stmxcsr`/`ldmxcsr` store and load the 4-byte local `csr` only.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= (1 << 15) | (1 << 6);
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly));
        }
    }
}

/// This thread's CPU time in seconds (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, nanosecond
/// resolution, exact for the running thread), or `None` where unavailable.
pub fn thread_cpu_time() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: bound 5: `ts` is a valid, exclusive `timespec` for the call's duration.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc == 0 {
            return Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9);
        }
    }
    None
}

/// Software prefetch: ask for every 64-byte line of `s` to be brought into the L1 cache
/// (`prefetcht0`, which neither faults nor waits; nothing on other targets). Used to overlap
/// the next block's reads from L3 with the current block's arithmetic (bound 9).
pub fn prefetch(s: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..s.len()).step_by(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: bound 9: `i < s.len()`, so the address lies inside `s`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(i).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// A 4 x 4 block transposed (`out[j][i] = rows[i][j]`): the unpack pairs of SSE's
/// `_MM_TRANSPOSE4_PS`, eight shuffles in registers (bound 11). Written as array moves in
/// safe code, rustc left it sixteen scalar loads and stores.
#[inline(always)]
pub fn transpose4(rows: [[f32; 4]; 4]) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128, _mm_movehl_ps, _mm_movelh_ps, _mm_unpackhi_ps, _mm_unpacklo_ps};
        let [a, b, c, d] = rows.map(bytemuck::cast::<[f32; 4], __m128>);
        // SAFETY: bound 11: register-only SSE shuffles, and SSE is in the x86-64 baseline.
        let out = unsafe {
            let (t0, t1) = (_mm_unpacklo_ps(a, b), _mm_unpackhi_ps(a, b));
            let (t2, t3) = (_mm_unpacklo_ps(c, d), _mm_unpackhi_ps(c, d));
            [_mm_movelh_ps(t0, t2), _mm_movehl_ps(t2, t0), _mm_movelh_ps(t1, t3), _mm_movehl_ps(t3, t1)]
        };
        out.map(bytemuck::cast::<__m128, [f32; 4]>)
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::array::from_fn(|j| std::array::from_fn(|i| rows[i][j]))
}

/// Runs [`PoolKernels::max_avx2`](super::pool::PoolKernels) (max pooling built for AVX2) and
/// returns true where the CPU has AVX2; false, running nothing, elsewhere (bound 10).
pub(super) fn pool_max_avx2<const IDX: bool>(k: &PoolKernels, out: &mut [f32], am: &mut [u8], x: &[f32], planes: usize, sc: &mut Scratch) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: bound 10: the CPU has AVX2, the only feature `max_avx2` is built for.
        unsafe { k.max_avx2::<IDX>(out, am, x, planes, sc) };
        return true;
    }
    let _ = (k, out, am, x, planes, sc);
    false
}

/// Runs the AVX2 build of the 2x2 stride-2 max-pool backward of one plane and returns true
/// where the CPU has AVX2; false, running nothing, elsewhere (bound 10).
pub(super) fn pool_back2x2_avx2<const SET: bool>(k: &PoolKernels, dxp: &mut [f32], ap: &[u8], gp: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: bound 10: the CPU has AVX2, the only feature `back2x2_avx2` is built for.
        unsafe { k.back2x2_avx2::<SET>(dxp, ap, gp) };
        return true;
    }
    let _ = (k, dxp, ap, gp);
    false
}

/// Whether the CPU has AVX2 and AVX-512 F, VL, BW and DQ, the features the stride-1
/// max-pool backward's gather is built for (bound 10): where it does,
/// [`pool_back_s1_avx512`] runs that build.
pub(super) fn has_pool_s1_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs the AVX-512 build (F, VL, BW, DQ) of the stride-1 max-pool backward (gather) of one
/// plane and returns true where the CPU has those ([`has_pool_s1_avx512`]); false, running
/// nothing, elsewhere (bound 10).
pub(super) fn pool_back_s1_avx512<const SET: bool>(k: &PoolKernels, dxp: &mut [f32], ap: &[u8], gp: &[f32], sc: &mut Scratch) -> bool {
    #[cfg(target_arch = "x86_64")]
    if has_pool_s1_avx512() {
        // SAFETY: bound 10: the CPU has AVX2 and AVX-512 F, VL, BW and DQ, the features
        // `back_s1_avx512` is built for.
        unsafe { k.back_s1_avx512::<SET>(dxp, ap, gp, sc) };
        return true;
    }
    let _ = (k, dxp, ap, gp, sc);
    false
}
