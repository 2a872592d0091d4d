//! One-dimensional Winograd convolution for 1x3 and 3x1, stride-1, undilated, ungrouped layers
//! (the factored convolutions of Inception-v3-style modules): `F(m, 3)` along the filtered
//! axis, `m = 4` (6 multiplications per 4 outputs instead of 12) or `m = 2` (4 per 2 instead
//! of 6). [`ConvKernels`](super::ConvKernels) runs on it, for layers with at least
//! [`WINOGRAD_1D_MIN_CHANNELS`](super::conv::WINOGRAD_1D_MIN_CHANNELS) input and output
//! channels, with the tile size [`WINOGRAD_1D_TILE`](super::conv::WINOGRAD_1D_TILE):
//! - the forward, `F(m, 3)` ([`Winograd1d`]);
//! - the backward data, as the same forward on the output gradient padded by `2 - pad` along
//!   the filtered axis with the flipped, transposed weights (accumulating);
//! - the weight gradient, `F(3, m)` ([`Winograd1dWgrad`], below).
//!
//! It shares the GEMM plumbing of the 2-D [`winograd`](super::winograd) (packed B panels, the
//! JIT micro-kernel, blocks of tiles sized for L2, the weight-gradient tile kernels).
//!
//! ## Maths (per sample, along the filtered axis)
//! Output tiles of `m` pixels, `T = ceil(L/m)` per line (`L` the output length along the
//! axis); tile `t` reads the `α = m + 2` padded inputs `d_j = xpad[m t + j]` (input position
//! `m t + j - pad`, zero outside). With a filter `g` (3 taps) and the Toom-Cook matrices
//! `Bᵀ` (`α x α`), `G` (`α x 3`), `Aᵀ` (`m x α`), `y = Aᵀ [(G g) ⊙ (Bᵀ d)]`:
//! - `F(2, 3)`, points `0, 1, -1, ∞`: `Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`,
//!   `G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]]`, `Aᵀ = [[1,1,1,0],[0,1,-1,-1]]`;
//! - `F(4, 3)`, points `0, 1, -1, 2, -2, ∞` (Lavin & Gray 2016):
//!   `Bᵀ = [[4,0,-5,0,1,0],[0,-4,-4,1,1,0],[0,4,-4,-1,1,0],[0,-2,-1,2,1,0],[0,2,-1,-2,1,0],
//!   [0,4,0,-5,0,1]]`, `G = [[¼,0,0],[-⅙,-⅙,-⅙],[-⅙,⅙,-⅙],[1/24,1/12,⅙],[1/24,-1/12,⅙],
//!   [0,0,1]]`, `Aᵀ = [[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],[0,1,-1,8,-8,1]]`.
//!
//! Per layer: `U_ξ[co, ci] = (G g[co, ci])_ξ` once per call ([`Winograd1d::prepare`]); per
//! tile `V_ξ[ci, t] = (Bᵀ d[ci, t])_ξ`; `α` GEMMs `M_ξ = U_ξ · V_ξ` (`K = Cin`, on the JIT
//! micro-kernel); `y[co, t] = Aᵀ M[co, t]`, then the fused epilogue (bias, folded batch-norm
//! scale/shift, residual, activation, accumulate, concat slice).
//!
//! ## Layout
//! Tiles are numbered so that every transform is an element-wise combination of contiguous
//! runs (vectorised by the compiler): a *unit* is a run of tiles that are contiguous in
//! memory, `tile = unit · TPU + k`:
//! - 3x1 ([`Axis::Rows`], the filter runs down the columns): unit = tile row `ty` (`T` of
//!   them), `k` = the column (`TPU = W`); `d_j` of unit `ty` is the whole padded input row
//!   `m ty + j`, and output `i` of the unit is the whole output row `m ty + i`.
//! - 1x3 ([`Axis::Cols`]): unit = the row `y` (`H` of them), `k` = the tile column `tx`
//!   (`TPU = T`); `d_j[tx] = xpad[y, m tx + j]`, gathered by phase (a stride-`m` read), and
//!   output `i` of the unit's tiles interleaves into the output row (`out[y, m tx + i]`).
//!
//! Blocks of whole units (`TB` tiles, a multiple of 8, `α (Cin + Cout)` floats per tile within
//! L2) are gathered channel by channel into `α` runs `d_j[unit, k]`, transformed into
//! `V_ξ` (contiguous over the block's tiles), copied into packed panels, multiplied, and
//! `Aᵀ M` runs over the whole block before the epilogue scatters it into output rows.
//!
//! ## Weight gradient: `F(3, m)`
//! `dW[co, ci, k] = Σ_n Σ_t Σ_{i<m} dy[co, m t + i] · xpad[ci, m t + i + k]` is, per tile, a
//! 3-output correlation of the tile's `α` inputs with the `m`-long "filter" `dy`. The
//! forward's identity `Σ_i a_i Σ_k g_k d_{i+k} = Σ_ξ (A a)_ξ (G g)_ξ (Bᵀ d)_ξ` (trilinear in
//! `a`, `g`, `d`) read as a function of `g` gives `dW_k = Σ_ξ G_ξk (A dy)_ξ (Bᵀ d)_ξ`: the
//! forward's `V = Bᵀ d`, `dY = A dy` (`A = (Aᵀ)ᵀ`, `α x m`), then
//! - `α` GEMMs with the tiles as reduction, summed over the call's samples:
//!   `Mᵀ_ξ[ci, co] += Σ_t V_ξ[ci, t] · dY_ξ[co, t]` on the weight-gradient tile kernel
//!   ([`WgradSpec`](super::gemm::WgradSpec), as the 2-D weight gradient);
//! - once per call, `dW[co, ci, k] += Σ_ξ G_ξk M_ξ[co, ci]`.
//!
//! `dy` is gathered into units exactly like the input (`m` runs, no padding, zero past its
//! end). The bias gradient is the caller's.
//!
//! The maths is exact in real arithmetic; in f32 `F(4, 3)`'s larger coefficients give errors
//! of a few 1e-6 of the output scale (`F(2, 3)`: ~1e-7), the weight gradient a few times that.

use super::entry;
use super::gemm::{Gemm, GemmPlan, Wgrad, WgradPlan, NR};
use super::jit::{Finished, Jit};
use super::winograd::{
    block_gemms, define_gemm, define_wgrad, finish_row, pack_dy, residual_act, pack_filters, wgrad_gemms, WinoEpi, BLOCK_BYTES,
};
use crate::{Error, Result};
use std::cell::RefCell;

pub use crate::algo::Axis;

/// The geometry a one-dimensional Winograd layer is specialised to. Across the filtered
/// axis there is no padding (the output is as long as the input there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wino1dShape {
    /// The filtered axis.
    pub axis: Axis,
    /// Outputs per tile, 2 or 4 (`F(2, 3)` or `F(4, 3)`).
    pub m: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Padding before the input along the filtered axis (after it: whatever the output length
    /// implies; input past the last tile's patch is dropped).
    pub pad: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

/// `F(2, 3)`'s `Bᵀ` (points `0, 1, -1, ∞`).
#[cfg_attr(not(test), allow(dead_code))] // the specification of the lane-wise transforms, checked in the tests
const BT2: [[f32; 4]; 4] = [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]];
/// `F(2, 3)`'s `G`.
const G2: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
/// `F(2, 3)`'s `Aᵀ`.
#[cfg_attr(not(test), allow(dead_code))] // the specification of the lane-wise transforms, checked in the tests
const AT2: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];

/// `F(4, 3)`'s `Bᵀ` (points `0, 1, -1, 2, -2, ∞`).
#[cfg_attr(not(test), allow(dead_code))] // the specification of the lane-wise transforms, checked in the tests
const BT4: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
/// `F(4, 3)`'s `G`.
const G4: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
/// `F(4, 3)`'s `Aᵀ`.
#[cfg_attr(not(test), allow(dead_code))] // the specification of the lane-wise transforms, checked in the tests
const AT4: [[f32; 6]; 4] =
    [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 0.0], [0.0, 1.0, 1.0, 4.0, 4.0, 0.0], [0.0, 1.0, -1.0, 8.0, -8.0, 1.0]];

/// `aᵀ`.
#[cfg_attr(not(test), allow(dead_code))] // the specification of the lane-wise transforms, checked in the tests
const fn transpose<const R: usize, const C: usize>(a: [[f32; C]; R]) -> [[f32; R]; C] {
    let mut t = [[0.0; R]; C];
    let mut i = 0;
    while i < R {
        let mut j = 0;
        while j < C {
            t[j][i] = a[i][j];
            j += 1;
        }
        i += 1;
    }
    t
}

/// `A = (Aᵀ)ᵀ` of `F(2, 3)`: the weight gradient's transform of `dy`.
#[cfg_attr(not(test), allow(dead_code))] // the specification of the lane-wise transforms, checked in the tests
const A2: [[f32; 2]; 4] = transpose(AT2);
/// `A` of `F(4, 3)`.
#[cfg_attr(not(test), allow(dead_code))] // the specification of the lane-wise transforms, checked in the tests
const A4: [[f32; 4]; 6] = transpose(AT4);

/// Eight lanes.
type L = [f32; 8];

/// `a + b` lane-wise.
#[inline(always)]
fn ad(a: L, b: L) -> L {
    std::array::from_fn(|l| a[l] + b[l])
}

/// `a - b` lane-wise.
#[inline(always)]
fn sb(a: L, b: L) -> L {
    std::array::from_fn(|l| a[l] - b[l])
}

/// `k a` lane-wise.
#[inline(always)]
fn sc(k: f32, a: L) -> L {
    a.map(|v| k * v)
}

/// `Bᵀ d` of `F(2, 3)` ([`BT2`]).
#[inline(always)]
fn bt2(d: &[L; 4]) -> [L; 4] {
    [sb(d[0], d[2]), ad(d[1], d[2]), sb(d[2], d[1]), sb(d[1], d[3])]
}

/// `Aᵀ M` of `F(2, 3)` ([`AT2`]).
#[inline(always)]
fn at2(m: &[L; 4]) -> [L; 2] {
    [ad(ad(m[0], m[1]), m[2]), sb(sb(m[1], m[2]), m[3])]
}

/// `A dy` of `F(2, 3)` ([`A2`]).
#[inline(always)]
fn a2(y: &[L; 2]) -> [L; 4] {
    [y[0], ad(y[0], y[1]), sb(y[0], y[1]), sc(-1.0, y[1])]
}

/// `Bᵀ d` of `F(4, 3)` ([`BT4`]).
#[inline(always)]
fn bt4(d: &[L; 6]) -> [L; 6] {
    let (s12, d12) = (ad(d[1], d[2]), sb(d[1], d[2]));
    let (s34, d43, d42, d31) = (ad(d[3], d[4]), sb(d[4], d[3]), sb(d[4], d[2]), sb(d[3], d[1]));
    [
        ad(sb(sc(4.0, d[0]), sc(5.0, d[2])), d[4]),
        sb(s34, sc(4.0, s12)),
        ad(d43, sc(4.0, d12)),
        ad(d42, sc(2.0, d31)),
        sb(d42, sc(2.0, d31)),
        ad(sb(sc(4.0, d[1]), sc(5.0, d[3])), d[5]),
    ]
}

/// `Aᵀ M` of `F(4, 3)` ([`AT4`]).
#[inline(always)]
fn at4(m: &[L; 6]) -> [L; 4] {
    let (s12, d12, s34, d34) = (ad(m[1], m[2]), sb(m[1], m[2]), ad(m[3], m[4]), sb(m[3], m[4]));
    [ad(ad(m[0], s12), s34), ad(d12, sc(2.0, d34)), ad(s12, sc(4.0, s34)), ad(ad(d12, sc(8.0, d34)), m[5])]
}

/// `A dy` of `F(4, 3)` ([`A4`]).
#[inline(always)]
fn a4(y: &[L; 4]) -> [L; 6] {
    let (s02, s13) = (ad(y[0], y[2]), ad(y[1], y[3]));
    let (t02, t13) = (ad(y[0], sc(4.0, y[2])), ad(sc(2.0, y[1]), sc(8.0, y[3])));
    [y[0], ad(s02, s13), sb(s02, s13), ad(t02, t13), sb(t02, t13), y[3]]
}

/// A lane-wise transform `[L; I] -> [L; O]`, for [`apply`].
trait Lanes<const I: usize, const O: usize> {
    fn map(x: &[L; I]) -> [L; O];
}

/// `$t`: the [`Lanes`] of function `$f`.
macro_rules! lanes {
    ($($t:ident = $f:ident: $i:literal -> $o:literal),* $(,)?) => {$(
        #[doc = concat!("[`", stringify!($f), "`] as [`Lanes`].")]
        struct $t;
        impl Lanes<$i, $o> for $t {
            #[inline(always)]
            fn map(x: &[L; $i]) -> [L; $o] {
                $f(x)
            }
        }
    )*};
}

lanes!(LBt2 = bt2: 4 -> 4, LBt4 = bt4: 6 -> 6, LAt2 = at2: 4 -> 2, LAt4 = at4: 6 -> 4, LA2 = a2: 2 -> 4, LA4 = a4: 4 -> 6);

/// `dst[o·dld + (i / 8)·dq + i % 8] = f(src[· sld + i])[o]` for `i < n`: one pass, eight lanes
/// at a time, every output of a lane group from the same loaded inputs. `dq = 8` writes
/// contiguous rows; a larger `dq` writes packed GEMM panels (`dq = Cin·8`) directly.
///
/// The transform is a type ([`Lanes`]) rather than a closure or function value: called
/// through `Fn`, LLVM left some instances out of line, passing the lanes through a 192-byte
/// `memcpy` per call. Whole groups of eight and the tail are separate loops: with one loop
/// choosing per group between a whole and a partial store, LLVM merged the two into a
/// `memcpy` call of a selected length for every group, copying lanes it had just stored on
/// the stack (perf: 4-12% of a 1x3 layer's time in `memmove`, 5% of a 3x1's).
#[inline(always)]
fn apply<T: Lanes<I, O>, const I: usize, const O: usize>(src: &[f32], sld: usize, dst: &mut [f32], (dld, dq): (usize, usize), n: usize) {
    let whole = n / 8;
    for q in 0..whole {
        let x: [L; I] = std::array::from_fn(|j| lanes8(&src[j * sld + 8 * q..]));
        for (o, y) in T::map(&x).iter().enumerate() {
            store8(&mut dst[o * dld + dq * q..], y);
        }
    }
    let len = n - 8 * whole;
    if len > 0 {
        let q = whole;
        let x: [L; I] = std::array::from_fn(|j| {
            let mut a = [0.0; 8];
            a[..len].copy_from_slice(&src[j * sld + 8 * q..][..len]);
            a
        });
        for (o, y) in T::map(&x).iter().enumerate() {
            dst[o * dld + dq * q..][..len].copy_from_slice(&y[..len]);
        }
    }
}

/// The first eight values of `s` as lanes.
#[inline(always)]
fn lanes8(s: &[f32]) -> L {
    let (c, _) = s.as_chunks::<8>();
    c[0]
}

/// `d[..8] = y`.
#[inline(always)]
fn store8(d: &mut [f32], y: &L) {
    let (c, _) = d.as_chunks_mut::<8>();
    c[0] = *y;
}

/// How one channel's plane (`src_h x src_w`) maps onto units of tiles: [`Self::gather`].
#[derive(Clone, Copy, Debug)]
struct Lay {
    axis: Axis,
    m: usize,
    src_h: usize,
    src_w: usize,
    pad: usize,
    /// Tiles per unit.
    tpu: usize,
}

/// `xpad[start .. start + n]`, `row` padded by `pad` zeros before it, where that lies inside
/// the row (`None` where it reaches into the padding on either side).
fn inside(row: &[f32], pad: usize, start: usize, n: usize) -> Option<&[f32]> {
    start.checked_sub(pad).and_then(|b| row.get(b..b + n))
}

/// `xpad[i]`: `row[i - pad]`, zero outside the row.
fn padded(row: &[f32], pad: usize, i: usize) -> f32 {
    i.checked_sub(pad).and_then(|i| row.get(i)).copied().unwrap_or(0.0)
}

/// `dst[j·ld + tx] = xpad[M tx + j]` for the `R` runs `j` and `tx < tpu`, in one pass over
/// the row `row` padded by `pad` zeros before it (and zeros past its end): the tiles whose
/// patch lies inside the row read it in place, the others (at its ends) test each position.
/// (Copying the row into a zeroed buffer first cost a `memcpy` call per row, 128 bytes for the
/// CIFAR net's 32-wide rows: perf put 8-14% of a 1x3 layer's time in `memmove`.)
fn phases<const M: usize, const R: usize>(dst: &mut [f32], ld: usize, tpu: usize, row: &[f32], pad: usize) {
    let mut rows = dst.chunks_mut(ld);
    let mut d: [&mut [f32]; R] = std::array::from_fn(|_| &mut rows.next().expect("run")[..tpu]);
    for tx in 0..tpu {
        match inside(row, pad, M * tx, R) {
            Some(w) => {
                for (d, &v) in d.iter_mut().zip(w) {
                    d[tx] = v;
                }
            }
            None => {
                for (j, d) in d.iter_mut().enumerate() {
                    d[tx] = padded(row, pad, M * tx + j);
                }
            }
        }
    }
}

/// [`phases`] for `M = 4` (`F(4, 3)`), four tiles at a time: the four 4-value chunks
/// `xpad[4t .. 4t + 4]` of tiles `t0 .. t0 + 4`, transposed in registers, are runs 0-3 of those
/// tiles, and the chunks of tiles `t0 + 1 .. t0 + 5` likewise give runs 4 and 5 (`xpad[4t + 4
/// + j]`); a chunk at an end of the row is assembled value by value (zeros outside). Tiles
/// past the last whole group of four go through [`phases`].
fn phases4<const R: usize>(dst: &mut [f32], ld: usize, tpu: usize, row: &[f32], pad: usize) {
    // Chunk `t`: `xpad[4t + k]`, `k < 4`.
    let chunk = |t: usize| -> [f32; 4] {
        match inside(row, pad, 4 * t, 4) {
            Some(c) => [c[0], c[1], c[2], c[3]],
            None => std::array::from_fn(|k| padded(row, pad, 4 * t + k)),
        }
    };
    let groups = tpu / 4;
    for gi in 0..groups {
        let t0 = 4 * gi;
        let c: [[f32; 4]; 5] = std::array::from_fn(|i| chunk(t0 + i));
        let v = entry::transpose4([c[0], c[1], c[2], c[3]]);
        for (j, vj) in v.iter().enumerate().take(R.min(4)) {
            dst[j * ld + t0..][..4].copy_from_slice(vj);
        }
        if R > 4 {
            let u = entry::transpose4([c[1], c[2], c[3], c[4]]);
            for (j, uj) in u.iter().enumerate().take(R - 4) {
                dst[(4 + j) * ld + t0..][..4].copy_from_slice(uj);
            }
        }
    }
    if groups * 4 < tpu {
        // The remaining tiles: the row as seen from tile `4 · groups` on.
        let t0 = 4 * groups;
        let (skip, pad0) = match (4 * t0).checked_sub(pad) {
            Some(b) => (b.min(row.len()), 0),
            None => (0, pad - 4 * t0),
        };
        phases::<4, R>(&mut dst[t0..], ld, tpu - t0, &row[skip..], pad0);
    }
}

/// [`interleave`] for `M = 4`, four tiles at a time: the four outputs of tiles `tx .. tx + 4`
/// (`ys[i·ld + tx ..]`), transposed in registers, are the row's next 16 values.
fn interleave4(row: &mut [f32], ys: &[f32], ld: usize) {
    let tiles = row.len() / 4;
    let groups = tiles / 4;
    for gi in 0..groups {
        let tx = 4 * gi;
        let y: [[f32; 4]; 4] = std::array::from_fn(|i| {
            let c = &ys[i * ld + tx..][..4];
            [c[0], c[1], c[2], c[3]]
        });
        for (k, ck) in entry::transpose4(y).iter().enumerate() {
            row[16 * gi + 4 * k..][..4].copy_from_slice(ck);
        }
    }
    let t0 = 4 * groups;
    interleave::<4>(&mut row[4 * t0..4 * tiles], &ys[t0..], ld);
}

impl Lay {
    /// `W` where every unit's runs can be read in place (3x1: a unit's run `j` is the whole
    /// row `m ty + j - pad`) and a unit holds whole groups of eight tiles, else `None`.
    fn rows_in_place(&self) -> Option<usize> {
        (self.axis == Axis::Rows && self.tpu.is_multiple_of(NR)).then_some(self.tpu)
    }

    /// The plane row of unit `u`'s run 0 (3x1) when its `runs` runs all lie inside the
    /// plane, else `None` (the unit reaches into the padding).
    fn unit_rows(&self, u: usize, runs: usize) -> Option<usize> {
        (u * self.m).checked_sub(self.pad).filter(|&y| y + runs <= self.src_h)
    }

    /// `T` over the runs of the units `u0 .. u0 + rows` of plane `src` (its `I` runs per
    /// unit), into `t[o·ld.0 + (tile / 8)·ld.1 + tile % 8]` over `n` tiles ([`apply`]): read
    /// in place unit by unit where [`Self::rows_in_place`] (a unit reaching into the padding
    /// gathered alone into `g`), else gathered into `g` (`[I][gld]`) first.
    #[allow(clippy::too_many_arguments)]
    fn transform<T: Lanes<I, O>, const I: usize, const O: usize>(&self, t: &mut [f32], ld: (usize, usize), g: &mut [f32], gld: usize, src: &[f32], (u0, rows): (usize, usize), n: usize) {
        if let Some(w) = self.rows_in_place() {
            for r in 0..rows {
                // Tile r·TPU onwards, a whole number of eight-tile groups in.
                let t = &mut t[r * w / NR * ld.1..];
                match self.unit_rows(u0 + r, I) {
                    Some(y0) => apply::<T, I, O>(&src[y0 * w..], w, t, ld, w),
                    None => {
                        self.gather(g, w, I, src, u0 + r, 1);
                        apply::<T, I, O>(g, w, t, ld, w);
                    }
                }
            }
            return;
        }
        self.gather(g, gld, I, src, u0, rows);
        apply::<T, I, O>(g, gld, t, ld, n);
    }

    /// `dst[j·ld + r·TPU + k] = src` at position `m t + j - pad` along the axis, for `j <
    /// runs`, the units `u0 .. u0 + rows` (`r` counted from `u0`) and their tiles `k` (zero
    /// outside the plane).
    fn gather(&self, dst: &mut [f32], ld: usize, runs: usize, src: &[f32], u0: usize, rows: usize) {
        let (m, tpu, w) = (self.m, self.tpu, self.src_w);
        match self.axis {
            Axis::Rows => {
                for j in 0..runs {
                    for r in 0..rows {
                        // Unit u0 + r is tile row ty; run j is the whole padded row m ty + j.
                        let d = &mut dst[j * ld + r * tpu..][..tpu];
                        match ((u0 + r) * m + j).checked_sub(self.pad).filter(|&y| y < self.src_h) {
                            Some(y) => d.copy_from_slice(&src[y * w..][..w]),
                            None => d.fill(0.0),
                        }
                    }
                }
            }
            Axis::Cols => {
                for r in 0..rows {
                    let row = &src[(u0 + r) * w..][..w];
                    let d = &mut dst[r * tpu..];
                    match (m, runs) {
                        (4, 6) => phases4::<6>(d, ld, tpu, row, self.pad),
                        (4, _) => phases4::<4>(d, ld, tpu, row, self.pad),
                        (_, 4) => phases::<2, 4>(d, ld, tpu, row, self.pad),
                        _ => phases::<2, 2>(d, ld, tpu, row, self.pad),
                    }
                }
            }
        }
    }
}

impl Wino1dShape {
    /// Transform positions `α = m + 2`.
    fn alpha(&self) -> usize {
        self.m + 2
    }

    /// Tiles along the filtered axis, `T`.
    fn tiles(&self) -> usize {
        match self.axis {
            Axis::Rows => self.oh,
            Axis::Cols => self.ow,
        }
        .div_ceil(self.m)
    }

    /// Units and tiles per unit `(U, TPU)` (module doc).
    fn units(&self) -> (usize, usize) {
        match self.axis {
            Axis::Rows => (self.tiles(), self.ow),
            Axis::Cols => (self.oh, self.tiles()),
        }
    }

    /// Units per block and the block's tile capacity `TB` (a multiple of 8).
    fn block(&self) -> (usize, usize) {
        let (u, tpu) = self.units();
        let per_tile = self.alpha() * (self.cin + self.cout) * std::mem::size_of::<f32>();
        let rows = (BLOCK_BYTES / per_tile / tpu).clamp(1, u);
        (rows, (rows * tpu).next_multiple_of(NR))
    }

    /// Scratch for [`Self::input_transform`]'s gathered runs.
    fn gather_len(&self) -> usize {
        self.alpha() * self.block().1
    }

    /// The input's layout.
    fn input_lay(&self) -> Lay {
        Lay { axis: self.axis, m: self.m, src_h: self.h, src_w: self.w, pad: self.pad, tpu: self.units().1 }
    }

    /// The output gradient's layout (weight gradient).
    fn grad_lay(&self) -> Lay {
        Lay { src_h: self.oh, src_w: self.ow, pad: 0, ..self.input_lay() }
    }

    /// Check the shape is one this module handles.
    fn check(&self) -> Result<()> {
        let ok = matches!(self.m, 2 | 4)
            && self.cin > 0
            && self.cout > 0
            && self.oh > 0
            && self.ow > 0
            && match self.axis {
                Axis::Rows => self.ow == self.w,
                Axis::Cols => self.oh == self.h,
            };
        if ok {
            Ok(())
        } else {
            Err(Error::Codegen { layer: "winograd1d".into(), message: format!("unsupported shape {self:?}") })
        }
    }

    /// `V_ξ` of channel plane `src` for the block's units `u0 .. u0 + rows`: the `α` runs
    /// gathered into `g` (`[α][TB]`), transformed into
    /// `t[ξ·ld + (tile / 8)·dq + tile % 8]` over `n` tiles ([`apply`]).
    ///
    /// A 3x1 layer whose units hold whole groups of eight tiles (`TPU = W` a multiple of 8)
    /// transforms each unit straight from the plane: its runs are `α` consecutive rows, so
    /// only the units reaching into the padding rows are gathered first.
    #[allow(clippy::too_many_arguments)]
    fn input_transform(&self, t: &mut [f32], ld: (usize, usize), g: &mut [f32], src: &[f32], u0: usize, rows: usize, n: usize) {
        let tb = self.block().1;
        let lay = self.input_lay();
        if self.m == 4 {
            lay.transform::<LBt4, 6, 6>(t, ld, g, tb, src, (u0, rows), n);
        } else {
            lay.transform::<LBt2, 4, 4>(t, ld, g, tb, src, (u0, rows), n);
        }
    }
}

/// `row[M tx + i] = ys[i·ld + tx]` for `tx < row.len() / M`: a 1x3 unit's outputs, in
/// order along the output row.
fn interleave<const M: usize>(row: &mut [f32], ys: &[f32], ld: usize) {
    for (tx, c) in row.chunks_exact_mut(M).enumerate() {
        for (i, v) in c.iter_mut().enumerate() {
            *v = ys[i * ld + tx];
        }
    }
}

/// The GEMM of a one-dimensional Winograd layer before finalization.
pub struct Wino1dPlan {
    shape: Wino1dShape,
    gemm: GemmPlan,
}

/// A compiled one-dimensional Winograd `F(m, 3)` forward (see the module doc).
#[derive(Debug)]
pub struct Winograd1d {
    shape: Wino1dShape,
    gemm: Gemm,
}

impl Wino1dPlan {
    /// Define the `α` GEMMs' tile kernels (one plain `Cout x TB x Cin` GEMM shape).
    pub fn define(jit: &mut Jit, shape: Wino1dShape) -> Result<Wino1dPlan> {
        shape.check()?;
        let tb = shape.block().1;
        let gemm = define_gemm(jit, "conv_winograd1d", shape.cout, shape.cin, tb)?;
        Ok(Wino1dPlan { shape, gemm })
    }

    /// Resolve against the finalized module.
    pub fn resolve(&self, fin: &Finished) -> Winograd1d {
        Winograd1d { shape: self.shape, gemm: self.gemm.resolve(fin) }
    }
}

/// Scratch of the forward, reused across samples, calls and layers: transformed filters, one
/// block's gathered runs, transformed input, packed panels and GEMM results, and the output
/// rows. One per thread (the module's `SCRATCH`).
#[derive(Default)]
pub struct Wino1dScratch {
    /// The shape the buffers were sized for.
    shape: Option<Wino1dShape>,
    /// `U` unpacked, `[ξ][Cout][Cin]`.
    u: Vec<f32>,
    /// `U_ξ` packed as the GEMM's `A`.
    up: Vec<Vec<f32>>,
    /// One channel's gathered runs, `[α][TB]`.
    g: Vec<f32>,
    /// The block's `V`, packed B panels.
    v: Vec<f32>,
    /// The block's `M`, `[α][Cout][TB]`.
    m: Vec<f32>,
    /// One channel's `Aᵀ M`, `[m][TB]`, then one output row.
    y: Vec<f32>,
}

impl Winograd1d {
    /// Number of GEMM tile kernels compiled.
    pub fn tile_count(&self) -> usize {
        self.gemm.tile_count()
    }

    /// Transform and pack the filters `w` (`[Cout, Cin, 3, 1]` or `[Cout, Cin, 1, 3]`: three
    /// taps per channel pair) into `s`.
    pub fn prepare(&self, w: &[f32], s: &mut Wino1dScratch) {
        let sh = &self.shape;
        let (cin, cout, a) = (sh.cin, sh.cout, sh.alpha());
        let gm: &[[f32; 3]] = if sh.m == 4 { &G4 } else { &G2 };
        s.u.resize(a * cout * cin, 0.0);
        for co in 0..cout {
            for ci in 0..cin {
                let g = &w[(co * cin + ci) * 3..][..3];
                for (xi, row) in gm.iter().enumerate().take(a) {
                    s.u[(xi * cout + co) * cin + ci] = row[0] * g[0] + row[1] * g[1] + row[2] * g[2];
                }
            }
        }
        pack_filters(&mut s.up, &s.u, a, cout, cin);
    }

    /// Size `s` for this shape.
    fn size_scratch(&self, s: &mut Wino1dScratch) {
        let sh = &self.shape;
        if s.shape == Some(*sh) {
            return;
        }
        let (a, tb) = (sh.alpha(), sh.block().1);
        s.g.clear();
        s.g.resize(sh.gather_len(), 0.0);
        s.v.resize(a * sh.cin * tb, 0.0);
        s.m.resize(a * sh.cout * tb, 0.0);
        s.y.resize(sh.m * tb + (sh.m * sh.tiles()).max(sh.ow), 0.0);
        s.shape = Some(*sh);
    }

    /// One sample: `out` is this sample's `[Cout, OH, OW]` region of the output, starting at
    /// its first channel, with `OH*OW` elements from one channel to the next; `x` its input
    /// `[Cin, H, W]`.
    pub fn forward_sample(&self, out: &mut [f32], x: &[f32], s: &mut Wino1dScratch, epi: &WinoEpi) {
        self.size_scratch(s);
        let sh = &self.shape;
        let (units, tpu) = sh.units();
        let (rows_per_block, tb) = sh.block();
        let (cin, cout) = (sh.cin, sh.cout);
        let plane = sh.h * sh.w;
        for u0 in (0..units).step_by(rows_per_block) {
            let rows = rows_per_block.min(units - u0);
            let n = (rows * tpu).next_multiple_of(NR);
            let np = n / NR;
            // Straight into the packed panels v[((ξ·TB/8 + q)·Cin + ci)·8 + l], tile 8q + l.
            for ci in 0..cin {
                let src = &x[ci * plane..][..plane];
                sh.input_transform(&mut s.v[ci * NR..], (tb * cin, cin * NR), &mut s.g, src, u0, rows, n);
            }
            block_gemms(&self.gemm, &mut s.m, &s.v, &s.up, (cin, cout), tb, np);
            self.output_block(out, s, epi, u0, rows);
        }
    }

    /// `Y = Aᵀ M` for every tile of the block of units `u0 .. u0 + rows`, channel by channel
    /// over the whole block, then the epilogue along each output row.
    fn output_block(&self, out: &mut [f32], s: &mut Wino1dScratch, epi: &WinoEpi, u0: usize, rows: usize) {
        let sh = &self.shape;
        let (tpu, tb, m) = (sh.units().1, sh.block().1, sh.m);
        let n = (rows * tpu).next_multiple_of(NR);
        let (p, cout) = (sh.oh * sh.ow, sh.cout);
        for co in 0..cout {
            let (yv, rowbuf) = s.y.split_at_mut(m * tb);
            let mc = &s.m[co * tb..];
            if m == 4 {
                apply::<LAt4, 6, 4>(mc, cout * tb, yv, (tb, NR), n);
            } else {
                apply::<LAt2, 4, 2>(mc, cout * tb, yv, (tb, NR), n);
            }
            // Bias and scale / shift, per channel, on the tiles.
            let b = epi.bias.get(co).copied().unwrap_or(0.0);
            if !epi.scale.is_empty() {
                let (sc, add) = (epi.scale[co], b * epi.scale[co] + epi.shift[co]);
                yv.chunks_exact_mut(tb).for_each(|y| y[..n].iter_mut().for_each(|v| *v = *v * sc + add));
            } else if !epi.bias.is_empty() {
                yv.chunks_exact_mut(tb).for_each(|y| y[..n].iter_mut().for_each(|v| *v += b));
            }
            for r in 0..rows {
                match sh.axis {
                    // Output i of tile row ty is the whole output row m ty + i.
                    Axis::Rows => {
                        for i in 0..m {
                            let oy = m * (u0 + r) + i;
                            if oy < sh.oh {
                                let o = co * p + oy * sh.ow;
                                let res = if epi.residual.is_empty() { &[][..] } else { &epi.residual[o..o + sh.ow] };
                                finish_row(&mut out[o..o + sh.ow], &mut yv[i * tb + r * tpu..][..tpu], res, epi.act, epi.accumulate);
                            }
                        }
                    }
                    // Output i of tile tx is column m tx + i of row u0 + r: interleaved
                    // straight into the output row where it holds whole tiles and is
                    // overwritten, else through the row buffer.
                    Axis::Cols => {
                        let o = co * p + (u0 + r) * sh.ow;
                        let res = if epi.residual.is_empty() { &[][..] } else { &epi.residual[o..o + sh.ow] };
                        let direct = !epi.accumulate && sh.ow == m * tpu;
                        let ys = &yv[r * tpu..];
                        let interleave = |row: &mut [f32]| {
                            if m == 4 {
                                interleave4(row, ys, tb);
                            } else {
                                interleave::<2>(row, ys, tb);
                            }
                        };
                        if direct {
                            let row = &mut out[o..o + sh.ow];
                            interleave(row);
                            residual_act(row, res, epi.act);
                        } else {
                            let row = &mut rowbuf[..m * tpu];
                            interleave(row);
                            finish_row(&mut out[o..o + sh.ow], &mut row[..sh.ow], res, epi.act, epi.accumulate);
                        }
                    }
                }
            }
        }
    }
}

/// The weight-gradient tile kernels of a one-dimensional Winograd layer before finalization.
pub struct Wino1dWgradPlan {
    shape: Wino1dShape,
    main: WgradPlan,
    tail: Option<WgradPlan>,
}

/// A compiled one-dimensional Winograd weight gradient `F(3, m)` (see the module doc).
#[derive(Debug)]
pub struct Winograd1dWgrad {
    shape: Wino1dShape,
    /// Kernels for a full block of units, and for the last, shorter one.
    main: Wgrad,
    tail: Option<Wgrad>,
}

/// Scratch of the weight gradient, reused across calls and layers: gathered runs, one block's
/// `V` and packed `dY`, and the `M_ξᵀ` accumulated over a call's samples. One per thread
/// (the module's `WGRAD_SCRATCH`).
#[derive(Default)]
pub struct Wino1dWgradScratch {
    /// The shape the buffers were laid out for.
    shape: Option<Wino1dShape>,
    /// One channel's gathered runs, `[α][TB]`.
    g: Vec<f32>,
    /// The block's `V`, `[ξ][Cin][KB]` (rows contiguous over tiles, read in place).
    v: Vec<f32>,
    /// Eight output channels' `dY`, `[ξ][8][nt]`, before transposition.
    dy: Vec<f32>,
    /// The block's `dY` packed as `B` panels, `[ξ][Cout/8][nt][8]`.
    b: Vec<f32>,
    /// `M_ξᵀ`, `[ξ][Cin][Cout]`, summed over samples and tiles.
    m: Vec<f32>,
}

thread_local! {
    /// This thread's forward scratch, shared by every layer run on it (a buffer per call would
    /// be faulted in afresh each time: see `lower::scratch`).
    pub(super) static SCRATCH: RefCell<Wino1dScratch> = RefCell::new(Wino1dScratch::default());
    /// This thread's weight-gradient scratch, likewise.
    pub(super) static WGRAD_SCRATCH: RefCell<Wino1dWgradScratch> = RefCell::new(Wino1dWgradScratch::default());
}

impl Wino1dWgradPlan {
    /// Define the tile kernels: `C[4 x 8] += V_ξ[4 input channels, tiles] · dY_ξᵀ[tiles, 8
    /// output channels]` over a block of units, plus the shorter last block.
    pub fn define(jit: &mut Jit, shape: Wino1dShape) -> Result<Wino1dWgradPlan> {
        shape.check()?;
        let ((units, tpu), rows) = (shape.units(), shape.block().0);
        let (main, tail) = define_wgrad(jit, "conv_winograd1d_w", (shape.cin, shape.cout), rows * tpu, (units % rows) * tpu)?;
        Ok(Wino1dWgradPlan { shape, main, tail })
    }

    /// Resolve against the finalized module.
    pub fn resolve(&self, fin: &Finished) -> Winograd1dWgrad {
        Winograd1dWgrad { shape: self.shape, main: self.main.resolve(fin), tail: self.tail.as_ref().map(|t| t.resolve(fin)) }
    }
}

impl Winograd1dWgrad {
    /// Number of tile kernels compiled.
    pub fn tile_count(&self) -> usize {
        self.main.tile_count() + self.tail.as_ref().map_or(0, Wgrad::tile_count)
    }

    /// Size `s` for this shape and zero its sums (once per call).
    pub fn begin(&self, s: &mut Wino1dWgradScratch) {
        let sh = &self.shape;
        let (cin, cout, a) = (sh.cin, sh.cout, sh.alpha());
        if s.shape != Some(*sh) {
            let kb = sh.block().0 * sh.units().1;
            s.g.clear();
            // Gathered like the forward's: runs `TB` apart.
            s.g.resize(sh.gather_len(), 0.0);
            s.v.resize(a * cin * kb, 0.0);
            s.dy.clear();
            s.dy.resize(a * NR * kb, 0.0);
            s.b.resize(a * cout.next_multiple_of(NR) * kb, 0.0);
            s.shape = Some(*sh);
        }
        s.m.clear();
        s.m.resize(a * cin * cout, 0.0);
    }

    /// Add one sample's `M_ξᵀ[ci, co] = Σ_tiles V_ξ[ci, t] · dY_ξ[co, t]` into `s` (after
    /// [`Self::begin`]): `x` is the sample's input `[Cin, H, W]`, `dy` its output gradient
    /// `[Cout, OH, OW]`.
    pub fn accumulate_sample(&self, x: &[f32], dy: &[f32], s: &mut Wino1dWgradScratch) {
        let sh = &self.shape;
        let (units, tpu) = sh.units();
        let (cin, cout, a, m) = (sh.cin, sh.cout, sh.alpha(), sh.m);
        let rows_per_block = sh.block().0;
        let kb = rows_per_block * tpu;
        let (plane, oplane) = (sh.h * sh.w, sh.oh * sh.ow);
        let np = cout.div_ceil(NR);
        let glay = sh.grad_lay();
        for u0 in (0..units).step_by(rows_per_block) {
            let rows = rows_per_block.min(units - u0);
            let nt = rows * tpu;
            let kern = if rows == rows_per_block { &self.main } else { self.tail.as_ref().expect("tail kernels") };
            // V_ξ[ci][tile] at v[(ξ·Cin + ci)·KB + tile]: the forward's input transform.
            for ci in 0..cin {
                sh.input_transform(&mut s.v[ci * kb..], (cin * kb, NR), &mut s.g, &x[ci * plane..][..plane], u0, rows, nt);
            }
            // dY_ξ = Σ_i Aᵀ[i][ξ] dy_i, eight output channels at a time, transposed into B panels
            // (3x1 units inside the plane read in place, as in the input transform).
            for jp in 0..np {
                for c in 0..NR.min(cout - jp * NR) {
                    let co = jp * NR + c;
                    let dyc = &dy[co * oplane..][..oplane];
                    let d = &mut s.dy[c * nt..];
                    if m == 4 {
                        glay.transform::<LA4, 4, 6>(d, (NR * nt, NR), &mut s.g, kb, dyc, (u0, rows), nt);
                    } else {
                        glay.transform::<LA2, 2, 4>(d, (NR * nt, NR), &mut s.g, kb, dyc, (u0, rows), nt);
                    }
                }
                pack_dy(&mut s.b, &s.dy, a, (np, jp), nt);
            }
            wgrad_gemms(kern, &mut s.m, &s.v, &s.b, a, (cin, cout), (kb, nt));
        }
    }

    /// `d_w[co, ci, k] += Σ_ξ G[ξ][k] M_ξ[co, ci]` for every channel pair (`[Cout, Cin, 3]`
    /// taps), from the sums [`Self::accumulate_sample`] left in `s`.
    pub fn finish(&self, d_w: &mut [f32], s: &Wino1dWgradScratch) {
        let sh = &self.shape;
        let (cin, cout, a) = (sh.cin, sh.cout, sh.alpha());
        let g: &[[f32; 3]] = if sh.m == 4 { &G4 } else { &G2 };
        for ci in 0..cin {
            for co in 0..cout {
                let dst = &mut d_w[(co * cin + ci) * 3..][..3];
                for (xi, row) in g.iter().enumerate().take(a) {
                    let mv = s.m[(xi * cin + ci) * cout + co];
                    for k in 0..3 {
                        dst[k] += row[k] * mv;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Aᵀ[(G g) ⊙ (Bᵀ d)]` equals the direct 3-tap correlation.
    fn check<const A: usize, const M: usize>(bt: &[[f32; A]; A], g: &[[f32; 3]; A], at: &[[f32; A]; M]) {
        let w = [0.3f64, -1.1, 0.7];
        let d: Vec<f64> = (0..A).map(|j| (j as f64 * 0.37 - 0.5).sin()).collect();
        let gg: Vec<f64> = (0..A).map(|x| (0..3).map(|k| g[x][k] as f64 * w[k]).sum()).collect();
        let bd: Vec<f64> = (0..A).map(|x| (0..A).map(|j| bt[x][j] as f64 * d[j]).sum()).collect();
        for i in 0..M {
            let y: f64 = (0..A).map(|x| at[i][x] as f64 * gg[x] * bd[x]).sum();
            let want: f64 = (0..3).map(|k| w[k] * d[i + k]).sum();
            assert!((y - want).abs() < 1e-6, "F({M},3) output {i}: {y} vs {want}");
        }
    }

    /// `f(x)` equals `c x` on random lanes.
    fn check_fn<const I: usize, const O: usize>(f: impl Fn(&[L; I]) -> [L; O], c: &[[f32; I]; O]) {
        let x: [L; I] = std::array::from_fn(|j| std::array::from_fn(|l| ((j * 8 + l) as f32 * 0.731).sin()));
        let y = f(&x);
        for o in 0..O {
            for l in 0..8 {
                let want: f32 = (0..I).map(|j| c[o][j] * x[j][l]).sum();
                assert!((y[o][l] - want).abs() < 1e-5, "row {o} lane {l}: {} vs {want}", y[o][l]);
            }
        }
    }

    #[test]
    fn transforms_match_matrices() {
        check_fn(bt2, &BT2);
        check_fn(at2, &AT2);
        check_fn(a2, &A2);
        check_fn(bt4, &BT4);
        check_fn(at4, &AT4);
        check_fn(a4, &A4);
    }

    #[test]
    fn toom_cook_matrices_are_exact() {
        check(&BT2, &G2, &AT2);
        check(&BT4, &G4, &AT4);
        assert_eq!(A4[3], [1.0, 2.0, 4.0, 8.0]);
    }
}
