//! Max and average pooling, forward and backward (plain Rust over precomputed window tables;
//! pooling is memory-bound, so a JIT buys little here).
//!
//! ## Layouts
//! `x`, `d_x`: `[n, C, H, W]`; `out`, `d_out`: `[n, C, OH, OW]`; `argmax` (max pooling, training
//! only): one `u8` per output element, the winner's offset `ky*kw + kx` inside its `kh x kw`
//! window, counted from the window's unclipped top-left corner `(oy*sh - top, ox*sw - left)`
//! (so the winner is input cell `(oy*sh - top + ky, ox*sw - left + kx)`). Windows of more than
//! 255 cells are rejected for max pooling. A forward without `argmax` records no winners.
//!
//! ## Semantics (PyTorch's)
//! Windows are clipped to the input: padded cells never win a max. Average pooling divides by
//! the window clipped to the *padded* input when `count_include_pad` (PyTorch's default), else
//! by the number of real input cells. Output size follows the IR's shape inference (floor, or
//! ceil with the last window starting inside the input or its leading padding).
//!
//! ## Maths
//! - max: `out = x[winner]`; backward `d_x[winner] += d_out` (gradient switches to the winner,
//!   decoded from the output pixel and its window offset);
//! - avg: `out = Σ_window x / count`; backward `d_x[cell] += d_out / count` for every cell.
//!
//! ## Max pooling passes
//! Ties go to the first maximum in row-major window order; a NaN wins over a number. Each plane
//! is first scanned for NaNs: a plane without any takes the single compare `v > best` (a
//! `maxps` for the values), one with a NaN the full rule (`!(v <= best)` and `best` not NaN);
//! both pick the same winner where there is no NaN. Max pooling is separable under that rule:
//! the first maximum of each input row over each window's columns, then the first of those
//! over the window's rows. The row pass records each row winner's column offset `kx` and the
//! column pass adds `ky*kw`, so the offsets come out of the same selects as the values; without
//! an argmax buffer the index selects are compiled out (`IDX = false`).
//! - Column stride 1 (`plane_s1`): each row is copied into an edge-padded plane (first cell
//!   repeated into the left padding, last into the right), so one flat pass of vectorised
//!   selects over the plane makes every row maximum with no clipped windows; the column pass
//!   offers each output row its window's rows clamped to the plane (row 0 repeated above,
//!   `H-1` below), in fixed blocks of 8 lanes. A repeated cell never wins where the real one
//!   would not and comes first only in the leading padding, so offsets pointing into the
//!   leading padding are moved to the first real cell (`kx = left - ox`, `ky = top - oy*sh`).
//! - Other column strides: whole (unclipped) windows run as `k` passes of compare-and-select
//!   over contiguous slices (`x[t*s + k]` for every slot `t`; a strided row is first split into
//!   its `s` phases); windows clipped by the padding take scalar loops.
//! - 2x2 stride-2 pooling without padding has its own unrolled loop, its NaN scan fused into
//!   the single-compare pass (a plane that may hold a NaN is pooled again with the full rule).
//!
//! The row maxima, phases and padded planes live in per-thread scratch kept between calls. On
//! x86-64 CPUs with AVX2 the same loops run compiled for AVX2 (runtime dispatch; the baseline
//! build has 4-lane SSE2 only).
//!
//! ## Max pooling backward
//! `backward` adds each output's gradient to its winner (a scatter decoding the offsets, in
//! output order); `backward_overwrite` writes `d_x` whole (zeroing it first). For 2x2 stride-2
//! pooling, where every input cell lies in at most one window, both are one dense pass (each
//! cell gets its window's gradient where it won, else nothing or zero). For stride 1 with
//! output rows as wide as the input's (3x3/1 pad 1, say) each cell gathers instead: it offers
//! itself to the `kh*kw` windows holding it, in the scatter's order, and adds the gradient of
//! each one it won (branch-free compares and masked adds over flat blocks of the plane; only
//! where the CPU runs the AVX-512 build, the AVX2 one measured slower than the scatter). The
//! additions onto each cell are the scatter's, one at a time in the same order, so the results
//! are the same bit for bit; a plane with an offset naming a padding cell (never recorded by a
//! forward) takes the scatter.

use super::entry;
use super::scratch::grow;
use crate::ir::{Pool2d, PoolKind};
use crate::{Error, Result};

/// A pooling layer's resolved geometry and window tables.
#[derive(Clone, Debug)]
pub struct PoolKernels {
    layer: String,
    kind: PoolKind,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// Clipped input row range per output row.
    rows: Vec<(usize, usize)>,
    /// Clipped input column range per output column.
    cols: Vec<(usize, usize)>,
    /// Divisor per output pixel (average pooling).
    div: Vec<f32>,
    /// Every window is the full `2x2` block at `(2*oy, 2*ox)` (2x2 stride-2 pooling without
    /// padding, floor or exact): max pooling takes the unrolled fast path.
    tiled2: bool,
    /// Kernel height and width, row and column stride, top and left padding.
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    top: usize,
    left: usize,
    /// Output columns `lo..up` whose window lies whole inside the input (the vectorised part of
    /// the horizontal max pass); `lo == up` when there is none.
    inner: (usize, usize),
    /// The horizontal max pass runs over whole planes (see `max_separable`): the column stride
    /// divides `W` and `OW <= W/s`.
    flat: bool,
    /// Row stride of the horizontal pass's results: `W/s` when `flat`, else `OW`.
    hs: usize,
    /// Row stride of the edge-padded plane of the stride-1 path ([`Self::plane_s1`]):
    /// `max(left + W, OW - 1 + kw)`.
    wp: usize,
    /// Plane distance `ky*W + kx` of each `u8` window offset `ky*kw + kx` from the window's
    /// corner (max pooling's backward; offsets from `kh*kw` on are rejected before use).
    delta: Box<[usize; 256]>,
    /// `(ky, kx)` of each window offset `ky*kw + kx` (the stride-1 backward's check that a
    /// winner is a real cell, [`Self::winners_real`]; no division per output).
    split: Box<[(u8, u8); 256]>,
    /// Stride-1 max pooling's windows clipped by the padding, for [`Self::winners_real`]: the
    /// output rows clipped at the top or bottom with the offsets `ky0*kw..ky1*kw` of their real
    /// rows `ky0..ky1`; the outputs clipped at the left or right (output index) with the real
    /// columns `kx0..kx1`.
    border_rows: Vec<(u32, u8, u16)>,
    border_cols: Vec<(u32, u8, u8)>,
}

/// Per-thread buffers of the separable max pass, kept between calls (the engine pools one
/// sample per call): row maxima and their columns, a strided row's phases (at column stride 1:
/// the edge-padded plane), and the index plane the forward without winners stores to and never
/// reads.
#[derive(Default)]
pub(super) struct Scratch {
    hv: Vec<f32>,
    hi: Vec<u8>,
    phases: Vec<f32>,
    am: Vec<u8>,
    /// The stride-1 backward's padded planes of window offsets and gradients
    /// ([`PoolKernels::back_s1_avx512`]).
    bam: Vec<u32>,
    bg: Vec<f32>,
    /// The geometry whose padding `bam` holds (see [`PoolKernels::back_s1_avx512`]): the padding is
    /// the same for every plane, so it is written only when the geometry changes.
    bkey: (usize, usize, usize, usize),
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Output size, clipped input range per output, and padded-window length per output.
type Axis = (usize, Vec<(usize, usize)>, Vec<usize>);

/// Whether `v` replaces `best` as a window's maximum so far: it is greater, or a NaN over a
/// number (`!(v <= best)` holds for both; a NaN `best` is never replaced). Branch-free, so the
/// loops that use it vectorise into compare-and-select. Without `NAN` the plane is known to
/// hold no NaN (see [`has_nan`]) and the rule is the single compare `v > best`.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(v <= best)` is meant: true for a NaN `v`
fn wins<const NAN: bool>(v: f32, best: f32) -> bool {
    if NAN {
        !(v <= best) & !best.is_nan()
    } else {
        v > best
    }
}

/// Whether `x` holds a NaN (blocks of 64 cells, vectorised; max pooling then takes the full
/// NaN rule for the plane).
#[inline(always)]
fn has_nan(x: &[f32]) -> bool {
    x.chunks(64).any(|c| c.iter().fold(false, |m, v| m | v.is_nan()))
}

/// `hv[j], hi[j]` = the first maximum of `cells[0][j], .., cells[K-1][j]` and its window column
/// `k`, in one pass (the `K` candidates compared in registers; `hi` untouched unless `IDX`).
/// `K` is 2 or 3; the loops are written with zipped iterators so that they carry no bounds
/// checks and vectorise.
#[inline(always)]
fn hmax_k<const K: usize, const IDX: bool, const NAN: bool>(cells: [&[f32]; K], hv: &mut [f32], hi: &mut [u8]) {
    debug_assert!(K == 2 || K == 3);
    let m = hv.len();
    let (hi, c0, c1, c2) = (&mut hi[..m], &cells[0][..m], &cells[1][..m], &cells[K - 1][..m]);
    let step = |best: f32, bk: u8, v: f32, k: u8| {
        let t = wins::<NAN>(v, best);
        (pick(t, v, best), pick_u8(t, k, bk))
    };
    if K == 2 {
        for ((b, bi), (&v0, &v1)) in hv.iter_mut().zip(hi.iter_mut()).zip(c0.iter().zip(c1)) {
            let (best, bk) = step(v0, 0, v1, 1);
            *b = best;
            if IDX {
                *bi = bk;
            }
        }
    } else {
        for ((b, bi), ((&v0, &v1), &v2)) in hv.iter_mut().zip(hi.iter_mut()).zip(c0.iter().zip(c1).zip(c2)) {
            let (best, bk) = step(v0, 0, v1, 1);
            let (best, bk) = step(best, bk, v2, 2);
            *b = best;
            if IDX {
                *bi = bk;
            }
        }
    }
}

/// `o[j], a[j]` = the first maximum over `rows[0].0[j], .., rows[K-1].0[j]` and its window
/// offset `k*kw + rows[k].1[j]`, in one pass (`a` untouched unless `IDX`; `K` is 2 or 3). The
/// rows are short (one output row), so the loop runs over fixed blocks of 8 lanes that the
/// compiler turns into single vector operations (a vectorised loop over the whole row would
/// leave rows of up to 32 outputs to its scalar remainder), then a scalar tail.
#[inline(always)]
fn vmax_k<const K: usize, const IDX: bool, const NAN: bool>(rows: [(&[f32], &[u8]); K], kw: u8, o: &mut [f32], a: &mut [u8]) {
    debug_assert!(K == 2 || K == 3);
    let m = o.len();
    let a = &mut a[..m];
    let (v0, v1, v2) = (&rows[0].0[..m], &rows[1].0[..m], &rows[K - 1].0[..m]);
    let (i0, i1, i2) = (&rows[0].1[..m], &rows[1].1[..m], &rows[K - 1].1[..m]);
    let kw2 = kw.wrapping_add(kw);
    // The winner of lane `(v0, v1, v2)` with row maxima columns `(i0, i1, i2)`.
    let lane = |v: [f32; 3], i: [u8; 3]| {
        let t = wins::<NAN>(v[1], v[0]);
        let (best, bidx) = (pick(t, v[1], v[0]), pick_u8(t, kw.wrapping_add(i[1]), i[0]));
        if K == 2 {
            return (best, bidx);
        }
        let t = wins::<NAN>(v[2], best);
        (pick(t, v[2], best), pick_u8(t, kw2.wrapping_add(i[2]), bidx))
    };
    let mut j = 0;
    while j + 8 <= m {
        let o8: &mut [f32; 8] = (&mut o[j..j + 8]).try_into().unwrap();
        let a8: &mut [u8; 8] = (&mut a[j..j + 8]).try_into().unwrap();
        let r = |s: &[f32]| -> [f32; 8] { s[j..j + 8].try_into().unwrap() };
        let q = |s: &[u8]| -> [u8; 8] { s[j..j + 8].try_into().unwrap() };
        let (w0, w1, w2, c0, c1, c2) = (r(v0), r(v1), r(v2), q(i0), q(i1), q(i2));
        for l in 0..8 {
            let (best, bidx) = lane([w0[l], w1[l], w2[l]], [c0[l], c1[l], c2[l]]);
            o8[l] = best;
            if IDX {
                a8[l] = bidx;
            }
        }
        j += 8;
    }
    for j in j..m {
        let (best, bidx) = lane([v0[j], v1[j], v2[j]], [i0[j], i1[j], i2[j]]);
        o[j] = best;
        if IDX {
            a[j] = bidx;
        }
    }
}

/// The row pass of the separable max over `kw` columns (`cells(kx)`: the value under column
/// `kx` of every window, as one slice): `hv` gets the first maximum left to right and, with
/// `IDX`, `hi` its column `kx` (windows of 2 and 3 columns compared in registers, [`hmax_k`]).
#[inline(always)]
fn cols_max<'c, const IDX: bool, const NAN: bool>(kw: usize, cells: impl Fn(usize) -> &'c [f32], hv: &mut [f32], hi: &mut [u8]) {
    match kw {
        2 => hmax_k::<2, IDX, NAN>([cells(0), cells(1)], hv, hi),
        3 => hmax_k::<3, IDX, NAN>([cells(0), cells(1), cells(2)], hv, hi),
        _ => {
            hv.copy_from_slice(cells(0));
            if IDX {
                hi.fill(0);
            }
            for kx in 1..kw {
                for ((b, bi), &v) in hv.iter_mut().zip(hi.iter_mut()).zip(cells(kx)) {
                    let t = wins::<NAN>(v, *b);
                    *b = pick(t, v, *b);
                    if IDX {
                        *bi = pick_u8(t, kx as u8, *bi);
                    }
                }
            }
        }
    }
}

/// The column pass of the separable max over `kh` rows of row maxima (`row(ky)`: values and
/// their column offsets): `o` gets the first maximum top to bottom and, with `IDX`, `a` its
/// window offset `ky*kw + column` (2 and 3 rows in registers, [`vmax_k`]; others row by row).
#[inline(always)]
fn rows_max<'r, const IDX: bool, const NAN: bool>(kh: usize, kw: u8, row: impl Fn(usize) -> (&'r [f32], &'r [u8]), o: &mut [f32], a: &mut [u8]) {
    match kh {
        2 => vmax_k::<2, IDX, NAN>([row(0), row(1)], kw, o, a),
        3 => vmax_k::<3, IDX, NAN>([row(0), row(1), row(2)], kw, o, a),
        _ => {
            o.copy_from_slice(row(0).0);
            if IDX {
                a.copy_from_slice(row(0).1);
            }
            for ky in 1..kh {
                let (vr, ir) = row(ky);
                merge_row::<IDX, NAN>(o, a, vr, ir, (ky as u8).wrapping_mul(kw));
            }
        }
    }
}

/// Offer one window row (`vr`, column offsets `ir`, the row's offset `add = ky*kw`) to the
/// outputs so far: a later value wins only if it is greater (or the first NaN).
#[inline(always)]
fn merge_row<const IDX: bool, const NAN: bool>(o: &mut [f32], a: &mut [u8], vr: &[f32], ir: &[u8], add: u8) {
    for ((o, a), (&v, &i)) in o.iter_mut().zip(a.iter_mut()).zip(vr.iter().zip(ir)) {
        let t = wins::<NAN>(v, *o);
        if IDX {
            *a = pick_u8(t, add.wrapping_add(i), *a);
        }
        *o = pick(t, v, *o);
    }
}

/// `if t { a } else { b }` as a bit mask: rustc turns the plain `if` over a slice element into a
/// conditional store, which blocks vectorisation; the masked form stores unconditionally.
#[inline(always)]
fn pick(t: bool, a: f32, b: f32) -> f32 {
    let m = (t as u32).wrapping_neg();
    f32::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
}

/// [`pick`] for window offsets.
#[inline(always)]
fn pick_u8(t: bool, a: u8, b: u8) -> u8 {
    let m = (t as u8).wrapping_neg();
    (a & m) | (b & !m)
}

fn axis(n: usize, k: usize, s: usize, pads: (usize, usize), ceil: bool) -> Option<Axis> {
    if k == 0 || s == 0 || n + pads.0 + pads.1 < k {
        return None;
    }
    let span = n + pads.0 + pads.1 - k;
    let mut out = if ceil { span.div_ceil(s) + 1 } else { span / s + 1 };
    if ceil && (out - 1) * s >= n + pads.0 {
        out -= 1;
    }
    let mut ranges = Vec::with_capacity(out);
    let mut padded = Vec::with_capacity(out);
    for o in 0..out {
        let start = (o * s) as isize - pads.0 as isize;
        let end = start + k as isize;
        // PyTorch: the divisor window is clipped to the padded input.
        let pend = end.min((n + pads.1) as isize);
        padded.push((pend - start) as usize);
        let (a, b) = (start.max(0) as usize, (end.min(n as isize)).max(0) as usize);
        ranges.push((a, b.max(a)));
    }
    Some((out, ranges, padded))
}

impl PoolKernels {
    /// Build the tables for `pool` (named `layer` in errors) on a `(C, H, W)` input.
    pub fn new(layer: &str, pool: &Pool2d, (c, h, w): (usize, usize, usize)) -> Result<PoolKernels> {
        let pads = pool.padding.resolve([h, w], pool.kernel, pool.stride);
        let err = || Error::Codegen {
            layer: layer.to_string(),
            message: format!(
                "pool window {}x{} stride {}x{} does not fit the padded {h}x{w} input",
                pool.kernel[0], pool.kernel[1], pool.stride[0], pool.stride[1]
            ),
        };
        if pool.kind == PoolKind::Max && pool.kernel[0] * pool.kernel[1] > 255 {
            return Err(Error::Codegen {
                layer: layer.to_string(),
                message: format!(
                    "max pooling window {}x{} has {} cells: the argmax records the winner's offset in its window as a u8, so at most 255",
                    pool.kernel[0],
                    pool.kernel[1],
                    pool.kernel[0] * pool.kernel[1]
                ),
            });
        }
        let (oh, rows, ph) = axis(h, pool.kernel[0], pool.stride[0], (pads[0], pads[1]), pool.ceil_mode).ok_or_else(err)?;
        let (ow, cols, pw) = axis(w, pool.kernel[1], pool.stride[1], (pads[2], pads[3]), pool.ceil_mode).ok_or_else(err)?;
        if rows.iter().chain(&cols).any(|&(a, b)| a == b) {
            return Err(Error::Codegen {
                layer: layer.to_string(),
                message: "a pooling window lies entirely in the padding".into(),
            });
        }
        let mut div = Vec::with_capacity(oh * ow);
        for oy in 0..oh {
            for ox in 0..ow {
                let d = if pool.count_include_pad {
                    ph[oy] * pw[ox]
                } else {
                    (rows[oy].1 - rows[oy].0) * (cols[ox].1 - cols[ox].0)
                };
                div.push(1.0 / d as f32);
            }
        }
        let tile = |r: &[(usize, usize)]| r.iter().enumerate().all(|(o, &(a, b))| (a, b) == (2 * o, 2 * o + 2));
        let tiled2 = tile(&rows) && tile(&cols);
        let kw = pool.kernel[1];
        // Whole windows start at `ox*s - left` without clipping: a contiguous run of columns.
        let whole: Vec<usize> = (0..ow).filter(|&ox| cols[ox].1 - cols[ox].0 == kw).collect();
        let inner = match (whole.first(), whole.last()) {
            (Some(&lo), Some(&up)) => (lo, up + 1),
            _ => (0, 0),
        };
        debug_assert_eq!(whole.len(), inner.1 - inner.0);
        let (sh, sw) = (pool.stride[0], pool.stride[1]);
        let flat = w.is_multiple_of(sw) && ow <= w / sw;
        let hs = if flat { w / sw } else { ow };
        #[rustfmt::skip]
        let mut k = PoolKernels {
            layer: layer.to_string(), kind: pool.kind, c, h, w, oh, ow, rows, cols, div, tiled2,
            kh: pool.kernel[0], kw, sh, sw, top: pads[0], left: pads[2], inner, flat, hs, wp: (pads[2] + w).max(ow - 1 + kw),
            delta: Box::new(std::array::from_fn(|a| (a / kw) * w + a % kw)),
            split: Box::new(std::array::from_fn(|a| ((a / kw).min(255) as u8, (a % kw) as u8))),
            border_rows: Vec::new(), border_cols: Vec::new(),
        };
        if k.kind == PoolKind::Max && k.sh == 1 && k.sw == 1 && ow == w {
            // Real cells `y0..y1` are rows `y0 + top - oy..y1 + top - oy` of the window.
            for (oy, &(y0, y1)) in k.rows.iter().enumerate() {
                if y1 - y0 < k.kh {
                    k.border_rows.push((oy as u32, ((y0 + k.top - oy) * kw) as u8, ((y1 + k.top - oy) * kw) as u16));
                }
            }
            for oy in 0..oh {
                for (ox, &(x0, x1)) in k.cols.iter().enumerate() {
                    if x1 - x0 < kw {
                        k.border_cols.push(((oy * ow + ox) as u32, (x0 + k.left - ox) as u8, (x1 + k.left - ox) as u8));
                    }
                }
            }
        }
        Ok(k)
    }

    /// Output `(C, OH, OW)` per sample.
    pub fn out_shape(&self) -> (usize, usize, usize) {
        (self.c, self.oh, self.ow)
    }

    fn err(&self, m: String) -> Error {
        Error::Codegen { layer: self.layer.clone(), message: m }
    }

    /// Planes of an input of `x_len` elements with an output of `out_len`: whole samples of
    /// `C` planes, or with `any`, any number of whole planes.
    fn planes_of(&self, x_len: usize, out_len: usize, any: bool) -> Result<usize> {
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let unit = if any { hw } else { self.c * hw };
        if !x_len.is_multiple_of(unit) {
            return Err(self.err(format!("input has {x_len} elements, not a multiple of {unit}")));
        }
        let planes = x_len / hw;
        if out_len != planes * ohw {
            return Err(self.err(format!("output has {out_len} elements, expected {}", planes * ohw)));
        }
        Ok(planes)
    }

    /// Forward. Max pooling records each winner's window offset in `argmax` when given (same
    /// length as `out`; training) and none with `None` (inference); average pooling takes `None`.
    pub fn forward(&self, out: &mut [f32], argmax: Option<&mut [u8]>, x: &[f32]) -> Result<()> {
        self.planes_of(x.len(), out.len(), false)?;
        self.forward_planes(out, argmax, x)
    }

    /// [`Self::forward`] over any whole number of input planes (a channel range of one
    /// sample, say: what a producer storing a concatenation's slice pools, `passes::pool_fuse`).
    pub fn forward_planes(&self, out: &mut [f32], argmax: Option<&mut [u8]>, x: &[f32]) -> Result<()> {
        let planes = self.planes_of(x.len(), out.len(), true)?;
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        match (self.kind, argmax) {
            (PoolKind::Max, Some(am)) => {
                if am.len() != out.len() {
                    return Err(self.err(format!("argmax has {} elements, expected {}", am.len(), out.len())));
                }
                self.max::<true>(out, am, x, planes);
            }
            // No winners kept: the index selects are compiled out.
            (PoolKind::Max, None) => self.max::<false>(out, &mut [], x, planes),
            (PoolKind::Avg, None) => {
                for pl in 0..planes {
                    let xp = &x[pl * hw..(pl + 1) * hw];
                    for (oy, &(y0, y1)) in self.rows.iter().enumerate() {
                        for (ox, &(x0, x1)) in self.cols.iter().enumerate() {
                            let mut s = 0.0f32;
                            for iy in y0..y1 {
                                s += xp[iy * self.w + x0..iy * self.w + x1].iter().sum::<f32>();
                            }
                            let q = oy * self.ow + ox;
                            out[pl * ohw + q] = s * self.div[q];
                        }
                    }
                }
            }
            (PoolKind::Avg, Some(_)) => return Err(self.err("average pooling takes no argmax buffer".into())),
        }
        Ok(())
    }

    /// Max pooling over `planes` planes; with `IDX`, `am` gets every output's window offset
    /// (`am.len() == out.len()`), else `am` is ignored (empty). Runs the AVX2 build of the same
    /// loops where the CPU has AVX2 (8 lanes instead of the baseline's 4).
    fn max<const IDX: bool>(&self, out: &mut [f32], am: &mut [u8], x: &[f32], planes: usize) {
        SCRATCH.with_borrow_mut(|sc| {
            if !entry::pool_max_avx2::<IDX>(self, out, am, x, planes, sc) {
                self.max_any::<IDX>(out, am, x, planes, sc);
            }
        });
    }

    /// [`Self::max`] compiled with AVX2 (the loops below are inlined into it); called by
    /// [`entry::pool_max_avx2`] where the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(super) fn max_avx2<const IDX: bool>(&self, out: &mut [f32], am: &mut [u8], x: &[f32], planes: usize, sc: &mut Scratch) {
        self.max_any::<IDX>(out, am, x, planes, sc);
    }

    #[inline(always)]
    fn max_any<const IDX: bool>(&self, out: &mut [f32], am: &mut [u8], x: &[f32], planes: usize, sc: &mut Scratch) {
        if self.tiled2 {
            self.max2x2::<IDX>(out, am, x, planes, sc);
        } else {
            self.max_separable::<IDX>(out, am, x, planes, sc);
        }
    }

    /// Max pooling in two passes per plane (lengths checked by `forward`): the winner of each
    /// input row over each output column's window ([`Self::row_max`]), then the winner over
    /// each output row's window of those ([`Self::column_max`]). Taking the first maximum in each
    /// pass (`>`, a NaN wins over a number) picks the first maximum in row-major window order,
    /// as a single pass over the window would: `kh + kw` comparisons per output instead of
    /// `kh * kw`.
    ///
    /// The row maxima `hv` and their window columns `hi` have a row stride `hs`. When the column
    /// stride divides the width and `ow <= W/s` (`flat`), `hs = W/s`: then the window of row
    /// `iy`, column `ox` starts at plane cell `(iy*hs + ox)*s - left`, linear in the flat slot
    /// `t = iy*hs + ox`, and one pass over the whole plane serves every row (long vector loops
    /// even for narrow planes); the slots of clipped windows are redone afterwards. Otherwise
    /// `hs = OW` and the pass runs row by row. Column stride 1 takes [`Self::plane_s1`] (row
    /// stride `wp`) instead.
    #[inline(always)]
    fn max_separable<const IDX: bool>(&self, out: &mut [f32], am: &mut [u8], x: &[f32], planes: usize, sc: &mut Scratch) {
        let (w, hw, ohw) = (self.w, self.h * self.w, self.oh * self.ow);
        let hs = if self.sw == 1 { self.wp } else { self.hs };
        let plen = if self.sw == 1 { self.h * self.wp } else if self.flat { hw } else { w.div_ceil(self.sw) * self.sw };
        grow(&mut sc.hv, self.h * hs);
        grow(&mut sc.hi, self.h * hs);
        grow(&mut sc.phases, plen);
        grow(&mut sc.am, if IDX { 0 } else { ohw });
        let (hv, hi, phases, scratch_am) = (&mut sc.hv[..self.h * hs], &mut sc.hi[..self.h * hs], &mut sc.phases[..plen], &mut sc.am[..]);
        for pl in 0..planes {
            let xp = &x[pl * hw..(pl + 1) * hw];
            let ap = if IDX { &mut am[pl * ohw..(pl + 1) * ohw] } else { &mut scratch_am[..ohw] };
            let op = &mut out[pl * ohw..(pl + 1) * ohw];
            match (self.sw == 1, has_nan(xp)) {
                (true, true) => self.plane_s1::<IDX, true>(xp, op, ap, hv, hi, phases),
                (true, false) => self.plane_s1::<IDX, false>(xp, op, ap, hv, hi, phases),
                (false, true) => self.plane_max::<IDX, true>(xp, op, ap, hv, hi, phases),
                (false, false) => self.plane_max::<IDX, false>(xp, op, ap, hv, hi, phases),
            }
        }
    }

    /// One plane of max pooling with column stride 1, without scalar border windows: each row
    /// is copied into `pad` (row stride `wp`) with its first cell repeated into the left padding
    /// and its last into the right, so that every window has `kw` cells and one flat pass of
    /// vectorised selects over the plane makes the row maxima `hv` (row stride `wp`). A repeated
    /// last cell comes after the real one and never wins; a repeated first cell wins exactly
    /// when the real first cell would (same value, earlier), so only its offset is moved to the
    /// real cell (`kx = left - ox`). The column pass likewise offers each output row the rows
    /// of its window clamped to the plane: row 0 repeated above, row `H-1` below, the offset of
    /// a winner in a repeated top row moved down to row 0's (`ky = top - oy*sh`).
    #[inline(always)]
    fn plane_s1<const IDX: bool, const NAN: bool>(&self, xp: &[f32], op: &mut [f32], ap: &mut [u8], hv: &mut [f32], hi: &mut [u8], pad: &mut [f32]) {
        let (w, h, wp, left, ow) = (self.w, self.h, self.wp, self.left, self.ow);
        let (kh, kw) = (self.kh, self.kw);
        for (row, prow) in xp.chunks_exact(w).zip(pad.chunks_exact_mut(wp)) {
            prow[..left].fill(row[0]);
            prow[left..left + w].copy_from_slice(row);
            prow[left + w..].fill(row[w - 1]);
        }
        let m = (h - 1) * wp + ow;
        let (hvm, him) = (&mut hv[..m], &mut hi[..m]);
        let cells = |k: usize| &pad[k..k + m];
        cols_max::<IDX, NAN>(kw, cells, hvm, him);
        if IDX {
            // Windows clipped on the left: a winner in the repeated cells is the real first cell.
            for r in 0..h {
                for ox in 0..left.min(ow) {
                    let i = &mut hi[r * wp + ox];
                    *i = (*i).max((left - ox) as u8);
                }
            }
        }
        let kw8 = kw as u8;
        for (oy, (o, a)) in op.chunks_exact_mut(ow).zip(ap.chunks_exact_mut(ow)).enumerate() {
            let start = (oy * self.sh) as isize - self.top as isize;
            let y = |k: usize| (start + k as isize).clamp(0, h as isize - 1) as usize * wp;
            let row = |k: usize| (&hv[y(k)..y(k) + ow], &hi[y(k)..y(k) + ow]);
            rows_max::<IDX, NAN>(kh, kw8, row, o, a);
            if IDX && start < 0 {
                // A winner in a repeated top row (always the first of them, `ky = 0`) is row 0's.
                let shift = (-start) as u8 * kw8;
                a.iter_mut().for_each(|a| *a = if *a < kw8 { *a + shift } else { *a });
            }
        }
    }

    /// One plane of [`Self::max_separable`] with column stride 2 or more (stride 1 takes
    /// [`Self::plane_s1`]).
    #[inline(always)]
    fn plane_max<const IDX: bool, const NAN: bool>(&self, xp: &[f32], op: &mut [f32], ap: &mut [u8], hv: &mut [f32], hi: &mut [u8], phases: &mut [f32]) {
        let (w, hs) = (self.w, self.hs);
        if self.flat {
            self.row_max::<IDX, NAN>(xp, hv, hi, phases);
        } else {
            for (row, (hvr, hir)) in xp.chunks_exact(w).zip(hv.chunks_exact_mut(hs).zip(hi.chunks_exact_mut(hs))) {
                self.row_max::<IDX, NAN>(row, hvr, hir, phases);
            }
        }
        self.column_max::<IDX, NAN>(op, ap, hv, hi);
    }

    /// The horizontal pass of [`Self::max_separable`] over `src`: one input row, or a whole
    /// plane when `flat`. For every output column `ox` of every row `r`, `hv[r*hs + ox]` = the
    /// first maximum of the row over the column's window and (with `IDX`) `hi[r*hs + ox]` its
    /// column `kx` in the unclipped window (cell `ox*sw - left + kx`).
    ///
    /// Whole windows (columns `lo..up`) run as `kw` passes of vectorisable selects over
    /// contiguous slices, over the slots `t = lo..(rows-1)*hs + up`: pass `k` offers slot `t`
    /// the cell `t*s - left + k`, so each window still sees its cells left to right. `src` is
    /// first split into its `s` phases (`phases[p*len + j] = src[j*s + p]`), where those cells
    /// are contiguous (stride 1 never comes here: [`Self::plane_s1`] pools it). Clipped border
    /// windows then take a scalar loop.
    #[inline(always)]
    fn row_max<const IDX: bool, const NAN: bool>(&self, src: &[f32], hv: &mut [f32], hi: &mut [u8], phases: &mut [f32]) {
        let (w, s, hs, (lo, up)) = (self.w, self.sw, self.hs, self.inner);
        debug_assert!(s >= 2, "stride-1 rows are pooled by plane_s1");
        let rows = src.len() / w;
        if lo < up {
            let m = (rows - 1) * hs + up - lo;
            let len = src.len().div_ceil(s);
            if s == 2 {
                let (even, odd) = phases.split_at_mut(len);
                for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
                    *e = pair[0];
                    *o = pair[1];
                }
                if src.len() % 2 == 1 {
                    even[len - 1] = src[src.len() - 1];
                }
            } else {
                for (i, &v) in src.iter().enumerate() {
                    phases[(i % s) * len + i / s] = v;
                }
            }
            // Cells `t*s - left + k` for t in lo..lo + m: contiguous in one phase.
            let cells = |k: usize| -> &[f32] {
                let off = k as isize - self.left as isize;
                let start = (off.rem_euclid(s as isize) as usize) * len + (lo as isize + off.div_euclid(s as isize)) as usize;
                &phases[start..start + m]
            };
            let (hvm, him) = (&mut hv[lo..lo + m], &mut hi[lo..lo + m]);
            cols_max::<IDX, NAN>(self.kw, cells, hvm, him);
        }
        for (r, row) in src.chunks_exact(w).enumerate() {
            for ox in (0..lo).chain(up..self.ow) {
                let (x0, x1) = self.cols[ox];
                // Column of the window's first real cell, counted from its unclipped start.
                let k0 = (x0 + self.left - ox * s) as u8;
                let (mut best, mut bk) = (row[x0], k0);
                for (k, &v) in (k0 + 1..).zip(&row[x0 + 1..x1]) {
                    let t = wins::<NAN>(v, best);
                    best = pick(t, v, best);
                    bk = if t { k } else { bk };
                }
                hv[r * hs + ox] = best;
                if IDX {
                    hi[r * hs + ox] = bk;
                }
            }
        }
    }

    /// The vertical pass of [`Self::max_separable`] over one plane's row maxima: output row `oy`
    /// takes the first maximum over its window's rows of `hv`, top to bottom, and (with `IDX`)
    /// its window offset `ky*kw + hi` (row `ky` of the unclipped window). With row stride 1 and
    /// `hs == OW`, the rows whose window is whole form one contiguous block of the output that
    /// `kh` long passes fill; the others (and every row otherwise) go one by one.
    #[inline(always)]
    fn column_max<const IDX: bool, const NAN: bool>(&self, op: &mut [f32], ap: &mut [u8], hv: &[f32], hi: &[u8]) {
        let (ow, hs) = (self.ow, self.hs);
        let (kh, kw) = (self.kh, self.kw as u8);
        let whole = |oy: usize| self.rows[oy].1 - self.rows[oy].0 == kh;
        let block = if self.sh == 1 && hs == ow {
            let lo = (0..self.oh).find(|&oy| whole(oy)).unwrap_or(0);
            let up = (lo..self.oh).find(|&oy| !whole(oy)).unwrap_or(self.oh);
            lo..up.max(lo)
        } else {
            0..0
        };
        let merge = |o: &mut [f32], a: &mut [u8], vr: &[f32], ir: &[u8], ky: u8| merge_row::<IDX, NAN>(o, a, vr, ir, ky.wrapping_mul(kw));
        if !block.is_empty() {
            let (y0, len) = (self.rows[block.start].0, block.len() * ow);
            let (o, a) = (&mut op[block.start * ow..block.end * ow], &mut ap[block.start * ow..block.end * ow]);
            let rows = |k: usize| (&hv[(y0 + k) * hs..(y0 + k) * hs + len], &hi[(y0 + k) * hs..(y0 + k) * hs + len]);
            rows_max::<IDX, NAN>(kh, kw, rows, o, a);
        }
        for (oy, (orow, arow)) in op.chunks_exact_mut(ow).zip(ap.chunks_exact_mut(ow)).enumerate() {
            if block.contains(&oy) {
                continue;
            }
            let (y0, y1) = self.rows[oy];
            // Row of the window's first real cell, counted from its unclipped start.
            let k0 = y0 + self.top - oy * self.sh;
            orow.copy_from_slice(&hv[y0 * hs..y0 * hs + ow]);
            if IDX {
                let add = k0 as u8 * kw;
                arow.iter_mut().zip(&hi[y0 * hs..y0 * hs + ow]).for_each(|(a, &i)| *a = add + i);
            }
            for iy in y0 + 1..y1 {
                merge(orow, arow, &hv[iy * hs..iy * hs + ow], &hi[iy * hs..iy * hs + ow], (k0 + iy - y0) as u8);
            }
        }
    }

    /// 2x2 stride-2 max pooling over whole blocks (`tiled2`), lengths checked by `forward`:
    /// the same winner as the general loop (cells in row-major order, `>` keeps the first
    /// maximum, a NaN wins over a number), without its window tables and bounds checks.
    #[inline(always)]
    fn max2x2<const IDX: bool>(&self, out: &mut [f32], am: &mut [u8], x: &[f32], planes: usize, sc: &mut Scratch) {
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        grow(&mut sc.am, if IDX { 0 } else { ohw });
        for pl in 0..planes {
            let xp = &x[pl * hw..(pl + 1) * hw];
            let op = &mut out[pl * ohw..(pl + 1) * ohw];
            let ap = if IDX { &mut am[pl * ohw..(pl + 1) * ohw] } else { &mut sc.am[..ohw] };
            // The NaN scan rides along the single-compare pass (one pass over the plane
            // instead of two); a plane that may hold a NaN is pooled again with the full rule.
            if self.plane2x2::<IDX, false>(op, ap, xp) {
                self.plane2x2::<IDX, true>(op, ap, xp);
            }
        }
    }

    /// One plane of [`Self::max2x2`]. Without `NAN`, returns whether the plane may hold a NaN
    /// (a window whose cells sum to NaN: a NaN, or infinities of both signs), when the result
    /// must be redone with `NAN`.
    #[inline(always)]
    fn plane2x2<const IDX: bool, const NAN: bool>(&self, op: &mut [f32], ap: &mut [u8], xp: &[f32]) -> bool {
        let (w, ow) = (self.w, self.ow);
        let mut nan = false;
        for oy in 0..self.oh {
            let (r0, r1) = (&xp[2 * oy * w..2 * oy * w + 2 * ow], &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow]);
            let (orow, arow) = (&mut op[oy * ow..(oy + 1) * ow], &mut ap[oy * ow..(oy + 1) * ow]);
            for ((o, a), (p0, p1)) in orow.iter_mut().zip(arow.iter_mut()).zip(r0.chunks_exact(2).zip(r1.chunks_exact(2))) {
                if !NAN {
                    nan |= (p0[0] + p0[1] + p1[0] + p1[1]).is_nan();
                }
                let (mut best, mut bi) = (p0[0], 0u8);
                for (v, i) in [(p0[1], 1u8), (p1[0], 2), (p1[1], 3)] {
                    let t = wins::<NAN>(v, best);
                    best = if t { v } else { best };
                    bi = if t { i } else { bi };
                }
                *o = best;
                if IDX {
                    *a = bi;
                }
            }
        }
        nan
    }

    /// 2x2 stride-2 backward of one plane (`tiled2`, offsets checked `< 4`): every input cell
    /// lies in at most one window, so each gets its window's gradient where it is the winner
    /// (`+=`, or `=` with `SET`), nothing (or zero) elsewhere; a dense pass instead of a
    /// scatter. AVX2 build where the CPU has it.
    fn back2x2<const SET: bool>(&self, dxp: &mut [f32], ap: &[u8], gp: &[f32]) {
        if !entry::pool_back2x2_avx2::<SET>(self, dxp, ap, gp) {
            self.back2x2_any::<SET>(dxp, ap, gp);
        }
    }

    /// [`Self::back2x2`] compiled with AVX2; called by [`entry::pool_back2x2_avx2`] where
    /// the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(super) fn back2x2_avx2<const SET: bool>(&self, dxp: &mut [f32], ap: &[u8], gp: &[f32]) {
        self.back2x2_any::<SET>(dxp, ap, gp);
    }

    #[inline(always)]
    fn back2x2_any<const SET: bool>(&self, dxp: &mut [f32], ap: &[u8], gp: &[f32]) {
        let (w, oh, ow) = (self.w, self.oh, self.ow);
        if SET {
            // Cells in no window (an odd last row or column, floor mode).
            for row in dxp.chunks_exact_mut(w).take(2 * oh) {
                row[2 * ow..].fill(0.0);
            }
            dxp[2 * oh * w..].fill(0.0);
        }
        // Cell `d` of a window with offset `a` and gradient `g`, the cell's own offset `k`
        // (branch-free: the mask form vectorises).
        let cell = |d: f32, a: u8, g: f32, k: u8| {
            let m = ((a == k) as u32).wrapping_neg();
            if SET {
                f32::from_bits(g.to_bits() & m)
            } else {
                f32::from_bits(((d + g).to_bits() & m) | (d.to_bits() & !m))
            }
        };
        for (oy, (arow, grow)) in ap.chunks_exact(ow).zip(gp.chunks_exact(ow)).enumerate() {
            let (r0, r1) = dxp[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
            for (dy, r) in [(0u8, r0), (2, r1)] {
                // 8 outputs -> 16 cells of the row at a time (fixed blocks the compiler
                // vectorises), then the tail.
                let mut blocks = r[..2 * ow].chunks_exact_mut(16);
                let (mut ab, mut gb) = (arow.chunks_exact(8), grow.chunks_exact(8));
                for ((d, a), g) in (&mut blocks).zip(&mut ab).zip(&mut gb) {
                    let d: &mut [f32; 16] = d.try_into().unwrap();
                    let (a, g): (&[u8; 8], &[f32; 8]) = (a.try_into().unwrap(), g.try_into().unwrap());
                    let (mut aa, mut gg) = ([0u8; 16], [0.0f32; 16]);
                    for c in 0..16 {
                        (aa[c], gg[c]) = (a[c / 2].wrapping_sub((c % 2) as u8), g[c / 2]);
                    }
                    for c in 0..16 {
                        d[c] = cell(d[c], aa[c], gg[c], dy);
                    }
                }
                for ((d, &a), &g) in blocks.into_remainder().chunks_exact_mut(2).zip(ab.remainder()).zip(gb.remainder()) {
                    d[0] = cell(d[0], a, g, dy);
                    d[1] = cell(d[1], a, g, dy + 1);
                }
            }
        }
    }

    /// Max-pool backward of one plane (offsets `ap`, gradients `gp`). Offsets are checked to be
    /// in the window (`a < kh*kw`, one pass). With `s1` (stride 1; `d_x` not zeroed beforehand
    /// with `SET`), a plane whose offsets all name real cells of their clipped windows (what a
    /// forward records) takes the gather [`Self::back_s1_avx512`] where the CPU runs it
    /// ([`entry::has_pool_s1_avx512`]); otherwise, and for other strides, the scatter [`Self::scatter`]
    /// (`tiled2`: [`Self::back2x2`]).
    fn back_max_plane<const SET: bool>(&self, s1: bool, dxp: &mut [f32], ap: &[u8], gp: &[f32]) -> Result<()> {
        let cells = self.kh * self.kw;
        if ap.iter().fold(0, |m, &a| m.max(a)) as usize >= cells {
            if SET && s1 {
                dxp.fill(0.0);
            }
            let q = ap.iter().position(|&a| a as usize >= cells).unwrap_or(0);
            return Err(self.err(format!("argmax offset {} of output {q} is outside its {cells}-cell window", ap[q])));
        }
        if self.tiled2 {
            self.back2x2::<SET>(dxp, ap, gp);
            return Ok(());
        }
        if s1 {
            if self.winners_real(ap) && SCRATCH.with_borrow_mut(|sc| entry::pool_back_s1_avx512::<SET>(self, dxp, ap, gp, sc)) {
                return Ok(());
            }
            if SET {
                dxp.fill(0.0);
            }
        }
        self.scatter(dxp, ap, gp)
    }

    /// Whether every offset of the plane (all `< kh*kw`) names a real cell of its output's
    /// clipped window: only windows clipped by the padding need looking at.
    fn winners_real(&self, ap: &[u8]) -> bool {
        let ow = self.ow;
        // Rows clipped at the top or bottom: `ky` in range is `a` in `ky0*kw..ky1*kw`.
        self.border_rows.iter().all(|&(oy, lo, up)| {
            let row = &ap[oy as usize * ow..(oy as usize + 1) * ow];
            row.iter().fold(u8::MAX, |m, &a| m.min(a)) >= lo && (row.iter().fold(0, |m, &a| m.max(a)) as u16) < up
        }) && self.border_cols.iter().all(|&(q, x0, x1)| (x0..x1).contains(&self.split[ap[q as usize] as usize].1))
    }

    /// The scatter: each output's gradient added to its winner, in output order (window offset
    /// `a = ky*kw + kx` of output `(oy, ox)` -> input cell `(oy*sh - top + ky, ox*sw - left +
    /// kx)`: the window's corner plus `delta[a]`, wrapping: a clipped window's corner lies in the
    /// padding). Offsets are `< kh*kw` (checked by the caller); a cell outside the plane is an
    /// error.
    fn scatter(&self, dxp: &mut [f32], ap: &[u8], gp: &[f32]) -> Result<()> {
        let (w, sw) = (self.w, self.sw);
        for (oy, (arow, grow)) in ap.chunks_exact(self.ow).zip(gp.chunks_exact(self.ow)).enumerate() {
            let corner = (oy * self.sh).wrapping_sub(self.top).wrapping_mul(w).wrapping_sub(self.left);
            for (ox, (&a, &g)) in arow.iter().zip(grow).enumerate() {
                match dxp.get_mut(corner.wrapping_add(ox * sw).wrapping_add(self.delta[a as usize])) {
                    Some(v) => *v += g,
                    None => return Err(self.err(format!("argmax offset {a} of output ({oy}, {ox}) names no input cell"))),
                }
            }
        }
        Ok(())
    }

    /// Stride-1 max-pool backward of one plane as a gather (offsets checked to name real cells
    /// of their windows, [`Self::winners_real`]): cell `(iy, ix)` is in the windows of outputs
    /// `(iy + top - ky, ix + left - kx)`, and takes each one's gradient where that output's
    /// offset is `ky*kw + kx`, in the scatter's order (outputs ascending: `ky`, then `kx`
    /// descending), one addition at a time onto the cell (a non-winner leaves it untouched),
    /// so the sums are the scatter's bit for bit. `=` with `SET` (starting from `+0.0`), else
    /// `+=`. Compiled with AVX-512 (`F`, `VL`, `BW`, `DQ`: compares into mask registers and
    /// masked adds) and called by [`entry::pool_back_s1_avx512`] where the CPU has them
    /// ([`entry::has_pool_s1_avx512`]); elsewhere the scatter runs (the AVX2 build of the same loops measured
    /// slower than it: a compare, an add and a three-µop blend per vector and candidate).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
    pub(super) fn back_s1_avx512<const SET: bool>(&self, dxp: &mut [f32], ap: &[u8], gp: &[f32], sc: &mut Scratch) {
        self.back_s1_any::<SET>(dxp, ap, gp, sc);
    }

    /// Output rows have the input's width here (`OW == W`), so output `(oy, ox)` and cell
    /// `(iy, ix)` are both flat in one row stride `W`. The offsets (as `u32`) and gradients are
    /// copied into planes with `P0 = (kh-1 - top)*W + (kw-1 - left)` cells of padding before
    /// them (offsets `u32::MAX` there and after them: they match nothing). Cell `f = iy*W + ix`
    /// then finds its candidate `(ky, kx)`, output `(iy + top - ky, ix + left - kx)`, at padded
    /// `f + dy*W + dx` with `dy = kh-1 - ky`, `dx = kw-1 - kx`: the scatter's order is `dy`,
    /// then `dx`, ascending, and the offset to match is `kh*kw - 1 - (dy*kw + dx)`. Near a row's
    /// ends `ix + left - kx` leaves the row and the flat index lands in the next or previous
    /// output row; a match there would name the winner column `ix ± W`, outside the plane, which
    /// the caller's check ([`Self::winners_real`]) excludes. One flat pass over the plane in
    /// blocks of `B` cells, several independent vectors in flight (each cell's additions form
    /// a chain of dependent adds), then blocks of 16 and single cells.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn back_s1_any<const SET: bool>(&self, dxp: &mut [f32], ap: &[u8], gp: &[f32], sc: &mut Scratch) {
        let (w, kh, kw, hw) = (self.w, self.kh, self.kw, self.h * self.w);
        debug_assert_eq!(self.ow, w);
        let cells = (kh * kw) as u32;
        let p0 = (kh - 1 - self.top) * w + kw - 1 - self.left;
        let n = (self.h + kh) * w + kw;
        grow(&mut sc.bam, n);
        grow(&mut sc.bg, n);
        let (pa, pg) = (&mut sc.bam[..n], &mut sc.bg[..n]);
        // The gradients' padding is never selected: left as it is (finite or not). The offsets'
        // padding is the same for every plane of a geometry: written when the geometry changes.
        let key = (w, n, p0, ap.len());
        if sc.bkey != key {
            pa.fill(u32::MAX);
            sc.bkey = key;
        }
        pa[p0..p0 + ap.len()].iter_mut().zip(ap).for_each(|(p, &a)| *p = a as u32);
        pg[p0..p0 + gp.len()].copy_from_slice(gp);
        let (pa, pg) = (&*pa, &*pg);
        // One candidate onto the cell's value `d`: `d + g` where the offset `a` is `t`, else
        // `d` untouched (branch-free: the mask form vectorises).
        let term = |d: f32, a: u32, g: f32, t: u32| {
            let m = ((a == t) as u32).wrapping_neg();
            f32::from_bits(((d + g).to_bits() & m) | (d.to_bits() & !m))
        };
        #[inline(always)]
        fn block<const B: usize, const SET: bool>(d: &mut [f32], c: usize, pa: &[u32], pg: &[f32], (w, kh, kw, cells): (usize, usize, usize, u32), term: impl Fn(f32, u32, f32, u32) -> f32) {
            let d: &mut [f32; B] = d.try_into().unwrap();
            let mut v = if SET { [0.0f32; B] } else { *d };
            for dy in 0..kh {
                let (a_row, g_row) = (&pa[c + dy * w..c + dy * w + kw - 1 + B], &pg[c + dy * w..c + dy * w + kw - 1 + B]);
                for dx in 0..kw {
                    let a: &[u32; B] = a_row[dx..dx + B].try_into().unwrap();
                    let g: &[f32; B] = g_row[dx..dx + B].try_into().unwrap();
                    let t = cells - 1 - (dy * kw + dx) as u32;
                    for j in 0..B {
                        v[j] = term(v[j], a[j], g[j], t);
                    }
                }
            }
            *d = v;
        }
        let geo = (w, kh, kw, cells);
        let mut c = 0;
        for d in dxp[..hw / 128 * 128].chunks_exact_mut(128) {
            block::<128, SET>(d, c, pa, pg, geo, term);
            c += 128;
        }
        for d in dxp[c..c + (hw - c) / 16 * 16].chunks_exact_mut(16) {
            block::<16, SET>(d, c, pa, pg, geo, term);
            c += 16;
        }
        for d in dxp[c..].chunks_exact_mut(1) {
            block::<1, SET>(d, c, pa, pg, geo, term);
            c += 1;
        }
    }

    /// Backward: `d_x += ∂L/∂x` (max: to the recorded winners; avg: spread over the window).
    pub fn backward(&self, d_x: &mut [f32], d_out: &[f32], argmax: Option<&[u8]>) -> Result<()> {
        self.backward_into::<false>(d_x, d_out, argmax)
    }

    /// Backward that overwrites: `d_x = ∂L/∂x` (the previous contents of `d_x` are ignored),
    /// for a step that starts the input gradient's life (no zeroing needed before it). For 2x2
    /// stride-2 max pooling (every input cell in at most one window) each cell is written once
    /// with its gradient or zero, and the stride-1 gather sums from zero; other geometries zero
    /// `d_x` and accumulate. Same results as
    /// zeroing `d_x` and calling [`Self::backward`], the same checks.
    pub fn backward_overwrite(&self, d_x: &mut [f32], d_out: &[f32], argmax: Option<&[u8]>) -> Result<()> {
        self.backward_into::<true>(d_x, d_out, argmax)
    }

    fn backward_into<const SET: bool>(&self, d_x: &mut [f32], d_out: &[f32], argmax: Option<&[u8]>) -> Result<()> {
        let planes = self.planes_of(d_x.len(), d_out.len(), false)?;
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        // Max pooling with stride 1 (not `tiled2`) gathers per plane and writes `d_x` itself
        // (only where the AVX-512 build runs: the AVX2 build measured slower than the scatter).
        let s1 = self.kind == PoolKind::Max && !self.tiled2 && self.sh == 1 && self.sw == 1 && self.ow == self.w && argmax.is_some() && entry::has_pool_s1_avx512();
        if SET && !(self.kind == PoolKind::Max && self.tiled2) && !s1 {
            d_x.fill(0.0);
        }
        match (self.kind, argmax) {
            (PoolKind::Max, Some(am)) => {
                if am.len() != d_out.len() {
                    if SET && s1 {
                        d_x.fill(0.0);
                    }
                    return Err(self.err(format!("argmax has {} elements, expected {}", am.len(), d_out.len())));
                }
                for pl in 0..planes {
                    let dxp = &mut d_x[pl * hw..(pl + 1) * hw];
                    let (ap, gp) = (&am[pl * ohw..(pl + 1) * ohw], &d_out[pl * ohw..(pl + 1) * ohw]);
                    if let Err(e) = self.back_max_plane::<SET>(s1, dxp, ap, gp) {
                        if SET && s1 {
                            // As if `d_x` had been zeroed whole first (what the other paths do).
                            d_x[(pl + 1) * hw..].fill(0.0);
                        }
                        return Err(e);
                    }
                }
            }
            (PoolKind::Avg, None) => {
                for pl in 0..planes {
                    let dxp = &mut d_x[pl * hw..(pl + 1) * hw];
                    for (oy, &(y0, y1)) in self.rows.iter().enumerate() {
                        for (ox, &(x0, x1)) in self.cols.iter().enumerate() {
                            let q = oy * self.ow + ox;
                            let g = d_out[pl * ohw + q] * self.div[q];
                            for iy in y0..y1 {
                                for v in &mut dxp[iy * self.w + x0..iy * self.w + x1] {
                                    *v += g;
                                }
                            }
                        }
                    }
                }
            }
            (PoolKind::Max, None) => return Err(self.err("max pooling backward needs the argmax of a forward that recorded it".into())),
            (PoolKind::Avg, Some(_)) => return Err(self.err("average pooling takes no argmax".into())),
        }
        Ok(())
    }
}
