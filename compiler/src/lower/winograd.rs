//! Winograd convolution for 3x3, stride-1, undilated, ungrouped layers (Lavin & Gray 2016):
//! 2.25x fewer multiplications than direct convolution, paid for with input/output transforms.
//! [`ConvKernels`](super::ConvKernels) runs on it, for layers with at least
//! [`WINOGRAD_MIN_CHANNELS`](super::conv::WINOGRAD_MIN_CHANNELS) input and output channels:
//! - the forward, `F(2x2, 3x3)` ([`Winograd`]);
//! - the backward data, as the same forward on the output gradient padded by `2 - pad` with
//!   the flipped, transposed weights (accumulating);
//! - the weight gradient, `F(3x3, 2x2)` ([`WinoWgrad`], below).
//!
//! ## Forward maths (per sample)
//! Output tiles of `2 x 2` pixels, `T = TH * TW = ceil(OH/2) * ceil(OW/2)` of them; tile
//! `(ty, tx)` reads the `4 x 4` input patch at rows `2ty - pt ..`, columns `2tx - pl ..` (zero
//! outside).
//! - filter: `U = G g Gᵀ` (`4 x 4` per `(co, ci)`), `G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]]`,
//!   once per call ([`Winograd::prepare`]);
//! - input: `V = Bᵀ d B`, `Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`;
//! - 16 GEMMs, one per transform position `ξ = 4i + j`: `M_ξ[co, t] = Σ_ci U_ξ[co, ci] ·
//!   V_ξ[ci, t]` on the JIT micro-kernel ([`gemm`](super::gemm), `K = Cin`);
//! - output: `Y = Aᵀ M A`, `Aᵀ = [[1,1,1,0],[0,1,-1,-1]]`, then the fused epilogue (bias,
//!   folded batch-norm scale/shift, residual, activation, accumulate, concat slice).
//!
//! ## Layout and vectorisation
//! Every transform runs on contiguous runs of tiles, so the plain-Rust loops below are simple
//! element-wise slice operations the compiler vectorises (SSE2 on baseline x86-64):
//! - each sample's input channel is copied once into a zero-padded plane of `2TH + 2` rows whose
//!   columns are *split by parity*: a row holds the `TW + 1` even padded columns, then the
//!   `TW + 1` odd ones. Tile `tx`'s patch columns `2tx .. 2tx+4` are then `even[tx], odd[tx],
//!   even[tx+1], odd[tx+1]`: shifted contiguous runs, not a stride-2 gather.
//! - input transform, per channel and tile row: `Bᵀ d` on four whole split rows, then `(·) B` as
//!   four element-wise combinations of the shifted runs; the 16 values of the row's `TW` tiles
//!   come out contiguous over `tx` (`t[c][ξ][tile]` for `CG` channels at a time), and runs of
//!   8 tiles are copied into the packed `Cin x 8` B panels the GEMM reads
//!   (`v[((ξ·NP + q)·Cin + ci)·8 + l]`, tile `8q + l`; `CG x 8` consecutive floats per copy).
//! - the GEMM writes `M` contiguous over tiles (`m[(ξ·Cout + co)·TB + tile]`); the output
//!   transform combines those 16 rows element-wise into the four `2 x 2` outputs per tile
//!   (contiguous over tiles), interleaves each tile row's into two output rows and applies the
//!   epilogue along the contiguous output row.
//!
//! Tiles are processed in blocks of whole tile rows (`TB` tiles, rounded up to a multiple of 8)
//! sized so the block's `V` and `M` (`16 (Cin + Cout)` floats per tile) stay in L2 between the
//! transforms and the GEMMs. Scratch lives in [`WinoScratch`], one per thread, reused across
//! samples, calls and layers (the padded planes' zero border is written when the shape changes).
//!
//! ## Weight gradient: `F(3x3, 2x2)`
//! `dW[co, ci, a, b] = Σ_n Σ_{y,x} dy[co, y, x] · xpad[ci, y + a, x + b]` is, per `2 x 2` tile of
//! `dy` (the forward's tiles), a 3x3-output correlation of the tile's `4 x 4` input patch (the
//! forward's) with the `2 x 2` "filter" `dy`. Toom-Cook at the points `0, 1, -1, ∞` gives
//! `Aᵀ [(G' dy G'ᵀ) ⊙ (B'ᵀ d B')] A` with `B'ᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,-1,0,1]]`,
//! `G' = [[1,0],[½,½],[½,-½],[0,1]]`, `Aᵀ = [[1,1,1,0],[0,1,-1,0],[0,1,1,1]]`. `B'ᵀ` is the
//! forward's `Bᵀ` with its last row negated, and `G'` is `diag(1,½,½,1) [[1,0],[1,1],[1,-1],
//! [0,1]]`; both factors are folded into one scale `c_i c_j`, `c = [1, ½, ½, -1]`, of the sums,
//! so the per-tile transforms are the forward's `V` and the unscaled `dY = G₀ dy G₀ᵀ`
//! (`G₀ = [[1,0],[1,1],[1,-1],[0,1]]`: rows `r0, r0 + r1, r0 - r1, r1`, columns alike). Then
//! - 16 GEMMs with the tiles as reduction, summed over the call's samples:
//!   `Mᵀ_ξ[ci, co] += Σ_t V_ξ[ci, t] · dY_ξ[co, t]`, on the weight-gradient tile kernel
//!   ([`WgradSpec`]: 4 input channels x 8 output channels, `A` = rows of `V` read in place,
//!   contiguous over a block of tiles; `B` = `dY` of 8 output channels, transposed);
//! - once per call, `dW[co, ci] += Aᵀ (c ⊙ M[co, ci]) A`.
//!
//! `dy`'s tile rows are split by parity like the input planes (a missing last row or column
//! is zero), so `dY` too comes out contiguous over tiles. The bias gradient is the caller's.
//!
//! Speed is reported as *effective* GFLOP/s (direct-convolution FLOPs / time); the maths is
//! exact in real arithmetic, its f32 rounding differs from direct convolution by ~1e-6 of the
//! output scale.

use super::gemm::{pack_a, transpose8, EpiArgs, Gemm, GemmPlan, GemmSpec, Wgrad, WgradPlan, WgradSpec, MR, NR};
use super::jit::{Finished, Jit};
use super::FusedAct;
use crate::Result;
use std::cell::RefCell;

/// Bytes of one block's transformed input and GEMM results together: whole tile rows up to
/// this many stay in L2 (at least one tile row per block).
pub(super) const BLOCK_BYTES: usize = 1 << 19;

/// Input channels transformed together: each copy into the packed panels then writes
/// `CG x 8` consecutive floats (whole cache lines).
const CG: usize = 4;

/// The geometry a Winograd layer is specialised to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WinoShape {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Top padding.
    pub pt: usize,
    /// Left padding.
    pub pl: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl WinoShape {
    /// Tile rows and columns `(TH, TW)`.
    fn tiles(&self) -> (usize, usize) {
        (self.oh.div_ceil(2), self.ow.div_ceil(2))
    }

    /// Tile rows per block and the block's tile capacity `TB` (a multiple of 8).
    fn block(&self) -> (usize, usize) {
        let (th, tw) = self.tiles();
        let per_tile = 16 * (self.cin + self.cout) * std::mem::size_of::<f32>();
        let rows = (BLOCK_BYTES / per_tile / tw).clamp(1, th);
        (rows, (rows * tw).next_multiple_of(NR))
    }

    /// Width of a split padded row: `TW + 1` even columns, then `TW + 1` odd ones.
    fn split_width(&self) -> usize {
        2 * (self.tiles().1 + 1)
    }

    /// Rows of a padded plane: every tile's patch, `2TH + 2`.
    fn pad_rows(&self) -> usize {
        2 * self.tiles().0 + 2
    }

    /// Copy sample `x` (`[Cin, H, W]`) into the split padded planes (the border stays zero).
    fn fill_planes(&self, x: &[f32], pad: &mut [f32]) {
        let sh = self;
        let (ph, sw) = (sh.pad_rows(), sh.split_width());
        // Rows and columns past the padded plane (a crop on the bottom / right) are dropped.
        let rows = sh.h.min(ph.saturating_sub(sh.pt));
        let len = sh.w.min(sw.saturating_sub(sh.pl));
        for (ci, plane) in pad.chunks_exact_mut(ph * sw).enumerate() {
            for y in 0..rows {
                let dst = &mut plane[(y + sh.pt) * sw..][..sw];
                split_row(dst, &x[(ci * sh.h + y) * sh.w..][..len], sh.pl, sw / 2);
            }
        }
    }
}

/// The fused epilogue of one call, resolved by the caller (already checked).
#[derive(Clone, Copy, Debug)]
pub struct WinoEpi<'a> {
    /// Per-channel bias (empty: none).
    pub bias: &'a [f32],
    /// Per-channel scale and shift (empty: none).
    pub scale: &'a [f32],
    /// Per-channel shift.
    pub shift: &'a [f32],
    /// This sample's residual `[Cout, OH, OW]` (empty: none).
    pub residual: &'a [f32],
    /// Activation.
    pub act: FusedAct,
    /// `+=` instead of `=`.
    pub accumulate: bool,
}

/// The GEMM of a Winograd layer before finalization.
pub struct WinoPlan {
    shape: WinoShape,
    gemm: GemmPlan,
}

/// A compiled Winograd `F(2x2, 3x3)` forward.
#[derive(Debug)]
pub struct Winograd {
    shape: WinoShape,
    gemm: Gemm,
}

impl WinoPlan {
    /// Define the 16 GEMMs' tile kernels (one plain `Cout x TB x Cin` GEMM shape, `TB` the
    /// block's tile capacity).
    pub fn define(jit: &mut Jit, shape: WinoShape) -> Result<WinoPlan> {
        let tb = shape.block().1;
        let gemm = define_gemm(jit, "conv_winograd", shape.cout, shape.cin, tb)?;
        Ok(WinoPlan { shape, gemm })
    }

    /// Resolve against the finalized module.
    pub fn resolve(&self, fin: &Finished) -> Winograd {
        Winograd { shape: self.shape, gemm: self.gemm.resolve(fin) }
    }
}

/// Scratch of the forward, reused across samples, calls and layers: transformed filters
/// (packed per `ξ`), split padded input planes, one block's transformed input and GEMM
/// results, and the transforms' row buffers. One per thread (the module's `SCRATCH`).
#[derive(Default)]
pub struct WinoScratch {
    /// The shape `pad` was laid out for (its zero border is written only when this changes).
    shape: Option<WinoShape>,
    /// `U` unpacked, `[ξ][Cout][Cin]`.
    u: Vec<f32>,
    /// `U_ξ` packed as the GEMM's `A`.
    up: Vec<Vec<f32>>,
    /// Split padded planes, `[Cin][2TH + 2][2TW + 2]`.
    pad: Vec<f32>,
    /// `Bᵀ d` of one tile row: four split rows.
    e: Vec<f32>,
    /// `CG` channels' transformed block, `[CG][16][TB]`.
    t: Vec<f32>,
    /// The block's `V`, packed B panels.
    v: Vec<f32>,
    /// The block's `M`, `[16][Cout][TB]`.
    m: Vec<f32>,
    /// Output transform: `Aᵀ M` (`[8][TB]`), then `Y` (`[4][TB + 4]`), then one output row.
    y: Vec<f32>,
}

/// `dst = a - b`.
fn sub(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = a - b;
    }
}

/// `dst = a + b`.
fn add(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = a + b;
    }
}

/// `dst = a + b + c`.
fn sum3(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    for (((d, &a), &b), &c) in dst.iter_mut().zip(a).zip(b).zip(c) {
        *d = a + b + c;
    }
}

/// `dst = a - b - c`.
fn dif3(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    for (((d, &a), &b), &c) in dst.iter_mut().zip(a).zip(b).zip(c) {
        *d = a - b - c;
    }
}

/// Copy one input row into a split padded row (`half = TW + 1` even padded columns, then the
/// odd ones): input column `c` is padded column `c + pl`.
fn split_row(dst: &mut [f32], src: &[f32], pl: usize, half: usize) {
    let (even, odd) = dst.split_at_mut(half);
    // src[2k] lands in `first[o1 + k]`, src[2k + 1] in `second[o2 + k]`.
    let (first, second, o1, o2) = if pl.is_multiple_of(2) { (even, odd, pl / 2, pl / 2) } else { (odd, even, pl / 2, pl / 2 + 1) };
    let pairs = src.len() / 2;
    // Index form over exactly-sized slices: vectorised as shuffles.
    let (first, second, s2) = (&mut first[o1..o1 + src.len().div_ceil(2)], &mut second[o2..o2 + pairs], &src[..2 * pairs]);
    for k in 0..pairs {
        first[k] = s2[2 * k];
        second[k] = s2[2 * k + 1];
    }
    if src.len() % 2 == 1 {
        first[pairs] = src[2 * pairs];
    }
}

/// `dst[2k] = left[k]`, `dst[2k + 1] = right[k]` for `k < dst.len() / 2` (`dst.len()` a
/// multiple of 8; `left` and `right` at least half as long).
fn interleave(dst: &mut [f32], left: &[f32], right: &[f32]) {
    for ((o, a), b) in dst.chunks_exact_mut(8).zip(left.chunks_exact(4)).zip(right.chunks_exact(4)) {
        let o: &mut [f32; 8] = o.try_into().expect("8");
        *o = [a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3]];
    }
}

/// Input transform of one tile row of one channel: `rows` holds the four split padded rows of
/// its patches (`4 x 2(TW + 1)`), `e` their `Bᵀ d`; the 16 values of tile `tx` go to
/// `t[ξ·ld + tx]`.
fn input_row(t: &mut [f32], ld: usize, rows: &[f32], e: &mut [f32], tw: usize) {
    let sw = 2 * (tw + 1);
    let (d0, d1, d2, d3) = (&rows[..sw], &rows[sw..2 * sw], &rows[2 * sw..3 * sw], &rows[3 * sw..4 * sw]);
    let (e0, rest) = e[..4 * sw].split_at_mut(sw);
    let (e1, rest) = rest.split_at_mut(sw);
    let (e2, e3) = rest.split_at_mut(sw);
    // Bᵀ d, on whole split rows (the row transform acts on every column alike).
    sub(e0, d0, d2);
    add(e1, d1, d2);
    sub(e2, d2, d1);
    sub(e3, d1, d3);
    // (·) B: patch columns 0..4 of tile tx are even[tx], odd[tx], even[tx+1], odd[tx+1].
    for (i, ei) in [&*e0, &*e1, &*e2, &*e3].into_iter().enumerate() {
        let (even, odd) = ei.split_at(tw + 1);
        let (e_l, e_r, o_l, o_r) = (&even[..tw], &even[1..], &odd[..tw], &odd[1..tw + 1]);
        let row = |j: usize| (4 * i + j) * ld;
        let (t0, rest) = t[row(0)..].split_at_mut(ld);
        let (t1, rest) = rest.split_at_mut(ld);
        let (t2, rest) = rest.split_at_mut(ld);
        let t3 = &mut rest[..tw];
        sub(&mut t0[..tw], e_l, e_r);
        add(&mut t1[..tw], o_l, e_r);
        sub(&mut t2[..tw], e_r, o_l);
        sub(t3, o_l, o_r);
    }
}

/// The rest of the epilogue along one output row: `row` holds the convolution with bias and
/// scale / shift applied; `dst` and `res` (empty: no residual) are the matching output and
/// residual row.
pub(super) fn finish_row(dst: &mut [f32], row: &mut [f32], res: &[f32], act: FusedAct, accumulate: bool) {
    residual_act(row, res, act);
    if accumulate {
        dst.iter_mut().zip(&*row).for_each(|(d, &v)| *d += v);
    } else {
        dst.copy_from_slice(row);
    }
}

/// The residual (empty: none) and the activation, in place along one output row.
pub(super) fn residual_act(row: &mut [f32], res: &[f32], act: FusedAct) {
    if !res.is_empty() {
        row.iter_mut().zip(res).for_each(|(v, &r)| *v += r);
    }
    match act {
        FusedAct::None => {}
        FusedAct::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
        FusedAct::LeakyRelu(s) => row.iter_mut().for_each(|v| *v = v.max(0.0) + s * v.min(0.0)),
    }
}

/// Pack the `n` transformed filter matrices `U_ξ` (`u[(ξ·Cout + co)·Cin + ci]`) as the GEMMs'
/// `A` operands, one per transform position.
pub(super) fn pack_filters(up: &mut Vec<Vec<f32>>, u: &[f32], n: usize, cout: usize, cin: usize) {
    up.resize_with(n, Vec::new);
    for (xi, up) in up.iter_mut().enumerate() {
        pack_a(up, &u[xi * cout * cin..], cout, cin, cin, 1);
    }
}

/// Copy the transformed block of input channels `chans` (`t[(c·n + ξ)·TB + tile]`, `c`
/// counted from `chans.start`, `n` transform positions) into the packed `Cin x 8` B panels
/// `v[((ξ·TB/8 + q)·Cin + ci)·8 + l]` (tile `8q + l`) of the first `np` panels: `chans.len() x 8`
/// consecutive floats per copy.
fn pack_panels(v: &mut [f32], t: &[f32], n: usize, (tb, np): (usize, usize), cin: usize, chans: std::ops::Range<usize>) {
    let vp = tb / NR;
    for xi in 0..n {
        for q in 0..np {
            let o = ((xi * vp + q) * cin + chans.start) * NR;
            for (c, dst) in v[o..o + chans.len() * NR].chunks_exact_mut(NR).enumerate() {
                // Fixed-size copies (a slice copy is a memcpy call).
                let dst: &mut [f32; NR] = dst.try_into().expect("8 floats");
                *dst = t[(c * n + xi) * tb + q * NR..][..NR].try_into().expect("8 floats");
            }
        }
    }
}

/// The block's GEMMs, one per transform position (`up.len()` of them): `M_ξ[co][tile] = U_ξ ·
/// V_ξ` into `m[(ξ·Cout + co)·TB + tile]`, over the first `np` panels of 8 tiles.
pub(super) fn block_gemms(gemm: &Gemm, m: &mut [f32], v: &[f32], up: &[Vec<f32>], (cin, cout): (usize, usize), tb: usize, np: usize) {
    let vp = tb / NR;
    let reps = gemm.row_reps();
    for (xi, a) in up.iter().enumerate() {
        let m = &mut m[xi * cout * tb..(xi + 1) * cout * tb];
        // Groups of `reps` consecutive panels in one call per row panel (the row kernels of
        // `define_gemm`), then the rest one panel at a time.
        let mut q0 = 0;
        while reps > 1 && q0 + reps <= np {
            let b = &v[(xi * vp + q0) * cin * NR..(xi * vp + q0 + reps) * cin * NR];
            gemm.run_row_panels(m, q0 * NR, cout, 0..cout.div_ceil(MR), q0 * NR, a, b, &EpiArgs::default());
            q0 += reps;
        }
        for q in q0..np {
            let b = &v[(xi * vp + q) * cin * NR..(xi * vp + q + 1) * cin * NR];
            gemm.run_panel(m, q * NR, cout, q * NR, a, b, &EpiArgs::default());
        }
    }
}

/// Most panels one row-kernel call of [`block_gemms`] runs.
const GEMM_ROW_REPS: usize = 8;

/// Define the `Cout x TB x Cin` GEMM of a block of tiles ([`block_gemms`]), with row kernels
/// over as many consecutive packed `B` panels as keep their `Cin x 8·reps` floats within
/// 32 KiB of L1 (at most [`GEMM_ROW_REPS`]): a short reduction (`Cin` 48-128 in the CIFAR
/// net's Winograd layers) then pays one call and one set of bounds checks per `reps` tiles
/// rather than per tile.
pub(super) fn define_gemm(jit: &mut Jit, name: &str, cout: usize, cin: usize, tb: usize) -> Result<GemmPlan> {
    let reps = (32768 / (cin * NR * 4)).clamp(1, GEMM_ROW_REPS);
    GemmPlan::define(jit, name, GemmSpec::plain(Some(cout), tb, cin, tb, false))?.with_packed_rows(jit, name, reps)
}

/// Define a Winograd weight gradient's tile kernels: `C[4 x 8] += V_ξ[4 input channels, tiles]
/// · dY_ξᵀ[tiles, 8 output channels]` with `A` rows `kb` apart, over blocks of `kb` tiles and
/// (when `tail > 0`) the last block's `tail` tiles.
pub(super) fn define_wgrad(jit: &mut Jit, name: &str, (cin, cout): (usize, usize), kb: usize, tail: usize) -> Result<(WgradPlan, Option<WgradPlan>)> {
    let spec = |nt: usize| WgradSpec { rows: 1, width: nt, pw: kb, row_off: std::array::from_fn(|r| r * kb), ldc: cout };
    let sizes = |n: usize, full: usize| {
        let mut v = Vec::new();
        if n >= full {
            v.push(full);
        }
        if !n.is_multiple_of(full) {
            v.push(n % full);
        }
        v
    };
    let (mrs, nrs) = (sizes(cin, MR), sizes(cout, NR));
    let main = WgradPlan::define(jit, name, spec(kb), &mrs, &nrs)?;
    let tail = if tail == 0 { None } else { Some(WgradPlan::define(jit, &format!("{name}_tail"), spec(tail), &mrs, &nrs)?) };
    Ok((main, tail))
}

/// Transpose output channels `8jp..8jp + 8`'s `dY` (`dy[(ξ·8 + c)·nt + tile]`, `n` transform
/// positions) into the B panels `b[((ξ·np + jp)·nt + tile)·8 + c]`.
pub(super) fn pack_dy(b: &mut [f32], dy: &[f32], n: usize, (np, jp): (usize, usize), nt: usize) {
    for xi in 0..n {
        transpose8(&mut b[(xi * np + jp) * nt * NR..], &dy[xi * NR * nt..(xi + 1) * NR * nt], nt);
    }
}

/// `M_ξᵀ[ci][co] += V_ξ · dY_ξᵀ` for the `n` transform positions, 4 input x 8 output channels
/// per tile kernel: `v[(ξ·Cin + ci)·kb + tile]`, `b` from [`pack_dy`], `m[(ξ·Cin + ci)·Cout + co]`.
pub(super) fn wgrad_gemms(kern: &Wgrad, m: &mut [f32], v: &[f32], b: &[f32], n: usize, (cin, cout): (usize, usize), (kb, nt): (usize, usize)) {
    let np = cout.div_ceil(NR);
    for xi in 0..n {
        for ip in 0..cin.div_ceil(MR) {
            let mr = MR.min(cin - ip * MR);
            let a = &v[(xi * cin + ip * MR) * kb..];
            for jp in 0..np {
                let nr = NR.min(cout - jp * NR);
                let c = &mut m[(xi * cin + ip * MR) * cout + jp * NR..];
                kern.run(c, mr, nr, a, &b[(xi * np + jp) * nt * NR..(xi * np + jp + 1) * nt * NR]);
            }
        }
    }
}

impl Winograd {
    /// Number of GEMM tile kernels compiled.
    pub fn tile_count(&self) -> usize {
        self.gemm.tile_count()
    }

    /// Transform and pack the filters `w` (`[Cout, Cin, 3, 3]`) into `s`.
    pub fn prepare(&self, w: &[f32], s: &mut WinoScratch) {
        let (cin, cout) = (self.shape.cin, self.shape.cout);
        s.u.resize(16 * cout * cin, 0.0);
        for co in 0..cout {
            for ci in 0..cin {
                let g = &w[(co * cin + ci) * 9..][..9];
                // Gg: 4x3.
                let mut gg = [[0.0f32; 3]; 4];
                for c in 0..3 {
                    let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
                    gg[0][c] = a;
                    gg[1][c] = 0.5 * (a + b + d);
                    gg[2][c] = 0.5 * (a - b + d);
                    gg[3][c] = d;
                }
                for (r, row) in gg.iter().enumerate() {
                    let (a, b, d) = (row[0], row[1], row[2]);
                    let vals = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                    for (c, &v) in vals.iter().enumerate() {
                        s.u[((r * 4 + c) * cout + co) * cin + ci] = v;
                    }
                }
            }
        }
        pack_filters(&mut s.up, &s.u, 16, cout, cin);
    }

    /// Size `s` for this shape; the padded planes are zeroed only when the shape changes.
    fn size_scratch(&self, s: &mut WinoScratch) {
        let sh = &self.shape;
        if s.shape == Some(*sh) {
            return;
        }
        let (_, tw) = sh.tiles();
        let tb = sh.block().1;
        s.pad.clear();
        s.pad.resize(sh.cin * sh.pad_rows() * sh.split_width(), 0.0);
        s.e.resize(4 * sh.split_width(), 0.0);
        s.t.clear();
        s.t.resize(CG * 16 * tb, 0.0);
        s.v.resize(16 * sh.cin * tb, 0.0);
        s.m.resize(16 * sh.cout * tb, 0.0);
        s.y.resize(8 * tb + 4 * (tb + 4) + (2 * tw).next_multiple_of(8), 0.0);
        s.shape = Some(*sh);
    }

    /// One sample: `out` is this sample's `[Cout, OH, OW]` region of the output, starting at
    /// its first channel, with `OH*OW` elements from one channel to the next.
    pub fn forward_sample(&self, out: &mut [f32], x: &[f32], s: &mut WinoScratch, epi: &WinoEpi) {
        self.size_scratch(s);
        let sh = &self.shape;
        let (th, tw) = sh.tiles();
        let (rows_per_block, tb) = sh.block();
        let (cin, cout) = (sh.cin, sh.cout);
        sh.fill_planes(x, &mut s.pad);
        for ty0 in (0..th).step_by(rows_per_block) {
            let rows = rows_per_block.min(th - ty0);
            let np = (rows * tw).div_ceil(NR);
            self.input_block(s, ty0, rows);
            block_gemms(&self.gemm, &mut s.m, &s.v, &s.up, (cin, cout), tb, np);
            self.output_block(out, s, epi, ty0, rows);
        }
    }

    /// `V` of the block of `rows` tile rows from `ty0`, `CG` channels at a time: transformed
    /// into `s.t` (`[c][ξ][tile]`, contiguous over tiles), then copied in runs of 8 tiles into
    /// the packed panels `v[((ξ·NP + q)·Cin + ci)·8 + l]`, whole cache lines at a time.
    fn input_block(&self, s: &mut WinoScratch, ty0: usize, rows: usize) {
        let sh = &self.shape;
        let tw = sh.tiles().1;
        let (tb, cin) = (sh.block().1, sh.cin);
        let sw = sh.split_width();
        let plane = sh.pad_rows() * sw;
        let np = (rows * tw).div_ceil(NR);
        for c0 in (0..cin).step_by(CG) {
            let g = CG.min(cin - c0);
            for c in 0..g {
                let pl = &s.pad[(c0 + c) * plane..(c0 + c + 1) * plane];
                let t = &mut s.t[c * 16 * tb..(c + 1) * 16 * tb];
                for r in 0..rows {
                    let y0 = 2 * (ty0 + r);
                    input_row(&mut t[r * tw..], tb, &pl[y0 * sw..(y0 + 4) * sw], &mut s.e, tw);
                }
            }
            pack_panels(&mut s.v, &s.t, 16, (tb, np), cin, c0..c0 + g);
        }
    }

    /// `Y = Aᵀ M A` for every tile of the block of `rows` tile rows from `ty0`, channel by
    /// channel and contiguous over tiles, then the epilogue along each output row.
    fn output_block(&self, out: &mut [f32], s: &mut WinoScratch, epi: &WinoEpi, ty0: usize, rows: usize) {
        let sh = &self.shape;
        let tw = sh.tiles().1;
        let (tb, cout) = (sh.block().1, sh.cout);
        let n = (rows * tw).next_multiple_of(NR);
        let ys = tb + 4;
        let p = sh.oh * sh.ow;
        for co in 0..cout {
            let mrow = |xi: usize| &s.m[(xi * cout + co) * tb..][..n];
            let (am, rest) = s.y.split_at_mut(8 * tb);
            let (yv, rowbuf) = rest.split_at_mut(4 * ys);
            // Aᵀ M: am[c] = M[0][c] + M[1][c] + M[2][c], am[4 + c] = M[1][c] - M[2][c] - M[3][c].
            for c in 0..4 {
                sum3(&mut am[c * tb..][..n], mrow(c), mrow(4 + c), mrow(8 + c));
                dif3(&mut am[(4 + c) * tb..][..n], mrow(4 + c), mrow(8 + c), mrow(12 + c));
            }
            // (·) A: y[2i] = am[i][0] + am[i][1] + am[i][2], y[2i + 1] = am[i][1] - am[i][2] - am[i][3].
            for i in 0..2 {
                let a = |c: usize| &am[(4 * i + c) * tb..][..n];
                sum3(&mut yv[2 * i * ys..][..n], a(0), a(1), a(2));
                dif3(&mut yv[(2 * i + 1) * ys..][..n], a(1), a(2), a(3));
            }
            // Bias and scale / shift, per channel: on the tiles, before interleaving.
            let b = epi.bias.get(co).copied().unwrap_or(0.0);
            if !epi.scale.is_empty() {
                let (sc, add) = (epi.scale[co], b * epi.scale[co] + epi.shift[co]);
                yv.chunks_exact_mut(ys).for_each(|y| y[..n].iter_mut().for_each(|v| *v = *v * sc + add));
            } else if !epi.bias.is_empty() {
                yv.chunks_exact_mut(ys).for_each(|y| y[..n].iter_mut().for_each(|v| *v += b));
            }
            let row = &mut rowbuf[..(2 * tw).next_multiple_of(8)];
            for r in 0..rows {
                for i in 0..2 {
                    let oy = 2 * (ty0 + r) + i;
                    if oy >= sh.oh {
                        break;
                    }
                    // The tiles' left and right outputs, interleaved into the output row.
                    interleave(row, &yv[2 * i * ys + r * tw..], &yv[(2 * i + 1) * ys + r * tw..]);
                    let o = co * p + oy * sh.ow;
                    let res = if epi.residual.is_empty() { &[][..] } else { &epi.residual[o..o + sh.ow] };
                    finish_row(&mut out[o..o + sh.ow], &mut row[..sh.ow], res, epi.act, epi.accumulate);
                }
            }
        }
    }
}

/// Scale of `M_ξ` (`ξ = 4i + j`) in the weight gradient: `c_i c_j`, `c = [1, ½, ½, -1]` (the
/// halves of `G'` and the sign flip between `F(3,2)`'s `Bᵀ` and the forward's, folded out of
/// the per-tile transforms).
const WGRAD_SCALE: [f32; 4] = [1.0, 0.5, 0.5, -1.0];

/// The weight-gradient tile kernels of a Winograd layer before finalization.
pub struct WinoWgradPlan {
    shape: WinoShape,
    main: WgradPlan,
    tail: Option<WgradPlan>,
}

/// A compiled Winograd weight gradient `F(3x3, 2x2)` (see the module doc).
#[derive(Debug)]
pub struct WinoWgrad {
    shape: WinoShape,
    /// Kernels for a full block of tile rows, and for the last, shorter one.
    main: Wgrad,
    tail: Option<Wgrad>,
}

/// Scratch of the weight gradient, reused across calls and layers: split padded input planes,
/// one block's `V` and packed `dY`, the transforms' row buffers, and the `M_ξᵀ` accumulated
/// over a call's samples. One per thread (the module's `WGRAD_SCRATCH`).
#[derive(Default)]
pub struct WinoWgradScratch {
    /// The shape the buffers were laid out for.
    shape: Option<WinoShape>,
    /// Split padded planes, `[Cin][2TH + 2][2TW + 2]`.
    pad: Vec<f32>,
    /// `Bᵀ d` of one tile row.
    e: Vec<f32>,
    /// The block's `V`, `[ξ][Cin][KB]` (rows contiguous over tiles, read in place).
    v: Vec<f32>,
    /// Eight output channels' `dY`, `[ξ][8][nt]`, before transposition.
    dy: Vec<f32>,
    /// The block's `dY` packed as `B` panels, `[ξ][Cout/8][nt][8]`.
    b: Vec<f32>,
    /// One tile row of `dy`: two rows split by parity, then two row-transform rows.
    rows: Vec<f32>,
    /// `M_ξᵀ`, `[ξ][Cin][Cout]`, summed over samples and tiles.
    m: Vec<f32>,
}

thread_local! {
    /// This thread's forward scratch, shared by every layer run on it (a buffer per call would
    /// be faulted in afresh each time: see `lower::scratch`). Its padded planes' zero border
    /// is rewritten only when the shape changes.
    pub(super) static SCRATCH: RefCell<WinoScratch> = RefCell::new(WinoScratch::default());
    /// This thread's weight-gradient scratch, likewise.
    pub(super) static WGRAD_SCRATCH: RefCell<WinoWgradScratch> = RefCell::new(WinoWgradScratch::default());
}

impl WinoWgradPlan {
    /// Define the tile kernels: `C[4 x 8] += V_ξ[4 input channels, tiles] · dY_ξᵀ[tiles, 8
    /// output channels]` over a block of tile rows, plus the shorter last block.
    pub fn define(jit: &mut Jit, shape: WinoShape) -> Result<WinoWgradPlan> {
        let (th, tw) = shape.tiles();
        let (rows, _) = shape.block();
        let (main, tail) = define_wgrad(jit, "conv_winograd_w", (shape.cin, shape.cout), rows * tw, (th % rows) * tw)?;
        Ok(WinoWgradPlan { shape, main, tail })
    }

    /// Resolve against the finalized module.
    pub fn resolve(&self, fin: &Finished) -> WinoWgrad {
        WinoWgrad { shape: self.shape, main: self.main.resolve(fin), tail: self.tail.as_ref().map(|t| t.resolve(fin)) }
    }
}

/// `dY = G' dy G'ᵀ` (unscaled, see [`WGRAD_SCALE`]) of one tile row of one output channel:
/// `rows` holds the tile row's two `dy` rows split by parity (`[even | odd]`, `TW` each) and
/// room for two more; tile `tx`'s 16 values go to `out[ξ·ld + tx]`. With `G' = [[1,0],[1,1],
/// [1,-1],[0,1]]` on both sides: rows `r0, r0 + r1, r0 - r1, r1`, then the same on the columns.
fn dy_row(out: &mut [f32], ld: usize, rows: &mut [f32], tw: usize) {
    let (r01, r23) = rows[..8 * tw].split_at_mut(4 * tw);
    let (r0, r1) = r01.split_at(2 * tw);
    let (sum, dif) = r23.split_at_mut(2 * tw);
    add(sum, r0, r1);
    sub(dif, r0, r1);
    for (i, r) in [r0, &*sum, &*dif, r1].into_iter().enumerate() {
        let (even, odd) = r.split_at(tw);
        let (t0, rest) = out[4 * i * ld..].split_at_mut(ld);
        let (t1, rest) = rest.split_at_mut(ld);
        let (t2, rest) = rest.split_at_mut(ld);
        t0[..tw].copy_from_slice(even);
        add(&mut t1[..tw], even, odd);
        sub(&mut t2[..tw], even, odd);
        rest[..tw].copy_from_slice(odd);
    }
}

impl WinoWgrad {
    /// Number of tile kernels compiled.
    pub fn tile_count(&self) -> usize {
        self.main.tile_count() + self.tail.as_ref().map_or(0, Wgrad::tile_count)
    }

    /// Size `s` for this shape and zero its sums (once per call).
    pub fn begin(&self, s: &mut WinoWgradScratch) {
        let sh = &self.shape;
        let (cin, cout) = (sh.cin, sh.cout);
        if s.shape != Some(*sh) {
            let tw = sh.tiles().1;
            let kb = sh.block().0 * tw;
            s.pad.clear();
            s.pad.resize(cin * sh.pad_rows() * sh.split_width(), 0.0);
            s.e.resize(4 * sh.split_width(), 0.0);
            s.v.resize(16 * cin * kb, 0.0);
            s.dy.clear();
            s.dy.resize(16 * NR * kb, 0.0);
            s.b.resize(16 * cout.next_multiple_of(NR) * kb, 0.0);
            s.rows.clear();
            s.rows.resize(8 * tw, 0.0);
            s.shape = Some(*sh);
        }
        s.m.clear();
        s.m.resize(16 * cin * cout, 0.0);
    }

    /// Add one sample's `M_ξᵀ[ci, co] = Σ_tiles V_ξ[ci, t] · dY_ξ[co, t]` into `s` (after
    /// [`Self::begin`]): `x` is the sample's input `[Cin, H, W]`, `dy` its output gradient
    /// `[Cout, OH, OW]`.
    pub fn accumulate_sample(&self, x: &[f32], dy: &[f32], s: &mut WinoWgradScratch) {
        let sh = &self.shape;
        let (th, tw) = sh.tiles();
        let (cin, cout) = (sh.cin, sh.cout);
        let rows_per_block = sh.block().0;
        let kb = rows_per_block * tw;
        let sw = sh.split_width();
        let plane = sh.pad_rows() * sw;
        let np = cout.div_ceil(NR);
        sh.fill_planes(x, &mut s.pad);
        for ty0 in (0..th).step_by(rows_per_block) {
            let rows = rows_per_block.min(th - ty0);
            let nt = rows * tw;
            let kern = if rows == rows_per_block { &self.main } else { self.tail.as_ref().expect("tail kernels") };
            // V_ξ[ci][tile] at v[(ξ·Cin + ci)·KB + tile]: the forward's input transform.
            for ci in 0..cin {
                let pl = &s.pad[ci * plane..(ci + 1) * plane];
                for r in 0..rows {
                    let y0 = 2 * (ty0 + r);
                    input_row(&mut s.v[ci * kb + r * tw..], cin * kb, &pl[y0 * sw..(y0 + 4) * sw], &mut s.e, tw);
                }
            }
            // dY, eight output channels at a time, transposed into B panels of `nt x 8`.
            for jp in 0..np {
                for c in 0..NR.min(cout - jp * NR) {
                    let co = jp * NR + c;
                    for r in 0..rows {
                        let oy = 2 * (ty0 + r);
                        let (r01, _) = s.rows.split_at_mut(4 * tw);
                        let (r0, r1) = r01.split_at_mut(2 * tw);
                        split_row(r0, &dy[(co * sh.oh + oy) * sh.ow..][..sh.ow], 0, tw);
                        if oy + 1 < sh.oh {
                            split_row(r1, &dy[(co * sh.oh + oy + 1) * sh.ow..][..sh.ow], 0, tw);
                        } else {
                            r1.fill(0.0);
                        }
                        dy_row(&mut s.dy[c * nt + r * tw..], NR * nt, &mut s.rows, tw);
                    }
                }
                pack_dy(&mut s.b, &s.dy, 16, (np, jp), nt);
            }
            wgrad_gemms(kern, &mut s.m, &s.v, &s.b, 16, (cin, cout), (kb, nt));
        }
    }

    /// `d_w[co, ci] += Aᵀ (c ⊙ M[co, ci]) A` for every channel pair (`[Cout, Cin, 3, 3]`), from
    /// the sums [`Self::accumulate_sample`] left in `s`; `Aᵀ = [[1,1,1,0],[0,1,-1,0],[0,1,1,1]]`,
    /// `c = [1, ½, ½, -1]` the folded scales (module doc).
    pub fn finish(&self, d_w: &mut [f32], s: &WinoWgradScratch) {
        let (cin, cout) = (self.shape.cin, self.shape.cout);
        let mut m = [[0.0f32; 4]; 4];
        for ci in 0..cin {
            for co in 0..cout {
                for (xi, v) in m.as_flattened_mut().iter_mut().enumerate() {
                    *v = s.m[(xi * cin + ci) * cout + co] * WGRAD_SCALE[xi / 4] * WGRAD_SCALE[xi % 4];
                }
                // Aᵀ m: rows m0 + m1 + m2, m1 - m2, m1 + m2 + m3.
                let r: [[f32; 4]; 3] = std::array::from_fn(|a| {
                    std::array::from_fn(|j| match a {
                        0 => m[0][j] + m[1][j] + m[2][j],
                        1 => m[1][j] - m[2][j],
                        _ => m[1][j] + m[2][j] + m[3][j],
                    })
                });
                let dst = &mut d_w[(co * cin + ci) * 9..][..9];
                for (a, ra) in r.iter().enumerate() {
                    dst[3 * a] += ra[0] + ra[1] + ra[2];
                    dst[3 * a + 1] += ra[1] - ra[2];
                    dst[3 * a + 2] += ra[1] + ra[2] + ra[3];
                }
            }
        }
    }
}
