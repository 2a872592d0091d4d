//! Spatial pooling: max, average and global average, NCHW.
//!
//! # Windows
//!
//! Output `(oy, ox)` covers input rows `oy*sh - top .. oy*sh - top + kh` and the matching
//! columns. The output size follows PyTorch (and [`cnnc_compiler::ir::infer`]):
//! `span = H + top + bottom - kh`, `out = span / sh + 1` (floor) or `ceil(span / sh) + 1`
//! (ceil mode), and in ceil mode a last window that would start at or past
//! `H + top` (entirely in the bottom padding) is dropped.
//!
//! # Max pooling
//!
//! Only real pixels compete: padding never wins, even when every pixel of the window is
//! negative (PyTorch pads with `-inf`). Ties go to the first maximum in row-major order, and a
//! NaN wins (it propagates), as in PyTorch. The forward pass records the winner of each window
//! as a flat index `iy * W + ix` into its input plane (PyTorch's `return_indices` convention);
//! the backward pass routes each output gradient to that pixel.
//!
//! # Average pooling (PyTorch's exact divisor rule)
//!
//! For a window starting at row `h0 = oy*sh - top` (possibly negative) PyTorch computes
//!
//! ```text
//! h1 = min(h0 + kh, H + bottom)          -- clipped to the *padded* extent
//! pool_size = (h1 - h0) * (w1 - w0)      -- window size counting padding
//! then clips h0, h1 to 0..H (w likewise) and sums the real pixels inside.
//! divisor = pool_size                     if count_include_pad
//!         = (h1 - h0) * (w1 - w0)         (clipped, real pixels only) otherwise
//! ```
//!
//! So with `count_include_pad` padding cells count, but a ceil-mode window hanging past the
//! padded border is divided only by its part inside `input + padding`, not by `kh * kw`.
//! (PyTorch pads symmetrically; cnnc's asymmetric padding uses `top`/`left` for `h0`/`w0` and
//! `bottom`/`right` for the clip, which reduces to PyTorch's rule when they are equal.)
//! A window with no real pixel would output 0; shape inference never creates one.

use super::{check_dims, explicit_pads, kerr, Result, Scalar};
use cnnc_compiler::ir::{Pool2d, PoolKind};
use ndarray::{ArrayView4, ArrayViewMut4, Axis};

/// Output extent along one axis (PyTorch's rule, see the module header), `None` when the window
/// does not fit.
fn window_out(n: usize, before: usize, after: usize, k: usize, s: usize, ceil: bool) -> Option<usize> {
    let span = (n + before + after).checked_sub(k)?;
    let mut out = if ceil { span.div_ceil(s) + 1 } else { span / s + 1 };
    if ceil && (out - 1) * s >= n + before {
        out -= 1;
    }
    Some(out)
}

/// The output `[height, width]` of pooling `attrs` on an `[h, w]` input.
pub fn pool_output_hw(attrs: &Pool2d, h: usize, w: usize) -> Result<[usize; 2]> {
    let op = op_name(attrs);
    let [t, b, l, r] = explicit_pads(op, attrs.padding)?;
    if attrs.kernel.contains(&0) || attrs.stride.contains(&0) {
        return kerr(op, format!("zero kernel {:?} or stride {:?}", attrs.kernel, attrs.stride));
    }
    match (
        window_out(h, t, b, attrs.kernel[0], attrs.stride[0], attrs.ceil_mode),
        window_out(w, l, r, attrs.kernel[1], attrs.stride[1], attrs.ceil_mode),
    ) {
        (Some(oh), Some(ow)) => Ok([oh, ow]),
        _ => kerr(op, format!("{}x{} window does not fit the padded {h}x{w} input", attrs.kernel[0], attrs.kernel[1])),
    }
}

fn op_name(attrs: &Pool2d) -> &'static str {
    match attrs.kind {
        PoolKind::Max => "maxpool",
        PoolKind::Avg => "avgpool",
    }
}

/// One window along one axis: `start` (may be negative), the real-pixel range `lo..hi`, and the
/// window length clipped to the padded extent (PyTorch's `pool_size` factor).
struct Span {
    lo: usize,
    hi: usize,
    padded_len: usize,
}

fn span(o: usize, s: usize, k: usize, before: usize, after: usize, n: usize) -> Span {
    let start = (o * s) as isize - before as isize;
    let end_padded = (start + k as isize).min((n + after) as isize);
    Span {
        lo: start.max(0) as usize,
        hi: end_padded.clamp(0, n as isize) as usize,
        padded_len: (end_padded - start).max(0) as usize,
    }
}

struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    pads: [usize; 4],
}

impl Geom {
    fn rows(&self, a: &Pool2d, oy: usize) -> Span {
        span(oy, a.stride[0], a.kernel[0], self.pads[0], self.pads[1], self.h)
    }
    fn cols(&self, a: &Pool2d, ox: usize) -> Span {
        span(ox, a.stride[1], a.kernel[1], self.pads[2], self.pads[3], self.w)
    }
}

fn geometry<T>(out: &[usize], x: &ArrayView4<T>, attrs: &Pool2d, kind: PoolKind) -> Result<Geom> {
    let op = op_name(attrs);
    if attrs.kind != kind {
        return kerr(op, format!("called with a {:?} pool's attributes", attrs.kind));
    }
    let (n, c, h, w) = x.dim();
    let [oh, ow] = pool_output_hw(attrs, h, w)?;
    check_dims(op, "out", out, &[n, c, oh, ow])?;
    Ok(Geom { n, c, h, w, oh, ow, pads: explicit_pads(op, attrs.padding)? })
}

/// Max pooling: `out` gets each window's maximum over real pixels and `argmax` the winner's
/// flat index `iy * W + ix` in its input plane (module header). Both are overwritten.
pub fn maxpool_forward<T: Scalar>(
    mut out: ArrayViewMut4<T>,
    mut argmax: ArrayViewMut4<usize>,
    x: ArrayView4<T>,
    attrs: &Pool2d,
) -> Result<()> {
    let g = geometry(out.shape(), &x, attrs, PoolKind::Max)?;
    check_dims("maxpool", "argmax", argmax.shape(), out.shape())?;
    for n in 0..g.n {
        for c in 0..g.c {
            for oy in 0..g.oh {
                let rows = g.rows(attrs, oy);
                for ox in 0..g.ow {
                    let cols = g.cols(attrs, ox);
                    let mut best: Option<(T, usize)> = None;
                    for iy in rows.lo..rows.hi {
                        for ix in cols.lo..cols.hi {
                            let v = x[[n, c, iy, ix]];
                            // First maximum wins; a NaN wins and then stays.
                            let better = match best {
                                None => true,
                                Some((m, _)) => !m.is_nan() && (v > m || v.is_nan()),
                            };
                            if better {
                                best = Some((v, iy * g.w + ix));
                            }
                        }
                    }
                    let Some((m, i)) = best else {
                        return kerr("maxpool", format!("window ({oy}, {ox}) holds no input pixel"));
                    };
                    out[[n, c, oy, ox]] = m;
                    argmax[[n, c, oy, ox]] = i;
                }
            }
        }
    }
    Ok(())
}

/// Gradient of [`maxpool_forward`]: `out[n, c, oy, ox] = x[n, c, argmax]`, so
/// `d_x[n, c, argmax[n, c, oy, ox]] += d_out[n, c, oy, ox]` (overlapping windows that share a
/// winner add up); every other pixel gets nothing.
pub fn maxpool_backward<T: Scalar>(
    mut d_x: ArrayViewMut4<T>,
    d_out: ArrayView4<T>,
    argmax: ArrayView4<usize>,
    attrs: &Pool2d,
) -> Result<()> {
    let g = geometry(d_out.shape(), &d_x.view(), attrs, PoolKind::Max)?;
    check_dims("maxpool", "argmax", argmax.shape(), d_out.shape())?;
    for ((n, c, oy, ox), &i) in argmax.indexed_iter() {
        let (iy, ix) = (i / g.w, i % g.w);
        if iy >= g.h {
            return kerr("maxpool", format!("argmax {i} at ({n}, {c}, {oy}, {ox}) is outside the {}x{} input", g.h, g.w));
        }
        d_x[[n, c, iy, ix]] += d_out[[n, c, oy, ox]];
    }
    Ok(())
}

/// The divisor of one average-pooling window (PyTorch's rule, module header).
fn avg_divisor(rows: &Span, cols: &Span, count_include_pad: bool) -> usize {
    if count_include_pad {
        rows.padded_len * cols.padded_len
    } else {
        (rows.hi - rows.lo) * (cols.hi - cols.lo)
    }
}

/// Average pooling with PyTorch's divisor rule (module header). `out` is overwritten.
pub fn avgpool_forward<T: Scalar>(mut out: ArrayViewMut4<T>, x: ArrayView4<T>, attrs: &Pool2d) -> Result<()> {
    let g = geometry(out.shape(), &x, attrs, PoolKind::Avg)?;
    for n in 0..g.n {
        for c in 0..g.c {
            for oy in 0..g.oh {
                let rows = g.rows(attrs, oy);
                for ox in 0..g.ow {
                    let cols = g.cols(attrs, ox);
                    let div = avg_divisor(&rows, &cols, attrs.count_include_pad);
                    let mut sum = T::zero();
                    for iy in rows.lo..rows.hi {
                        for ix in cols.lo..cols.hi {
                            sum += x[[n, c, iy, ix]];
                        }
                    }
                    out[[n, c, oy, ox]] = if div == 0 { T::zero() } else { sum / T::of_usize(div) };
                }
            }
        }
    }
    Ok(())
}

/// Gradient of [`avgpool_forward`]: each output is `sum(window) / divisor`, so every real pixel
/// of the window gets `d_x[n, c, iy, ix] += d_out[n, c, oy, ox] / divisor`.
pub fn avgpool_backward<T: Scalar>(mut d_x: ArrayViewMut4<T>, d_out: ArrayView4<T>, attrs: &Pool2d) -> Result<()> {
    let g = geometry(d_out.shape(), &d_x.view(), attrs, PoolKind::Avg)?;
    for n in 0..g.n {
        for c in 0..g.c {
            for oy in 0..g.oh {
                let rows = g.rows(attrs, oy);
                for ox in 0..g.ow {
                    let cols = g.cols(attrs, ox);
                    let div = avg_divisor(&rows, &cols, attrs.count_include_pad);
                    if div == 0 {
                        continue;
                    }
                    let share = d_out[[n, c, oy, ox]] / T::of_usize(div);
                    for iy in rows.lo..rows.hi {
                        for ix in cols.lo..cols.hi {
                            d_x[[n, c, iy, ix]] += share;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Global average pooling: `out[n, c, 0, 0] = sum_{y, x} x[n, c, y, x] / (H * W)`.
/// `out` (`[N, C, 1, 1]`) is overwritten.
pub fn global_avgpool_forward<T: Scalar>(mut out: ArrayViewMut4<T>, x: ArrayView4<T>) -> Result<()> {
    let (n, c, h, w) = x.dim();
    check_dims("gap", "out", out.shape(), &[n, c, 1, 1])?;
    let hw = T::of_usize(h * w);
    for ni in 0..n {
        for ci in 0..c {
            out[[ni, ci, 0, 0]] = x.index_axis(Axis(0), ni).index_axis(Axis(0), ci).sum() / hw;
        }
    }
    Ok(())
}

/// Gradient of [`global_avgpool_forward`]: `d_x[n, c, y, x] += d_out[n, c, 0, 0] / (H * W)`.
pub fn global_avgpool_backward<T: Scalar>(mut d_x: ArrayViewMut4<T>, d_out: ArrayView4<T>) -> Result<()> {
    let (n, c, h, w) = d_x.dim();
    check_dims("gap", "d_out", d_out.shape(), &[n, c, 1, 1])?;
    let hw = T::of_usize(h * w);
    for ni in 0..n {
        for ci in 0..c {
            let share = d_out[[ni, ci, 0, 0]] / hw;
            d_x.index_axis_mut(Axis(0), ni).index_axis_mut(Axis(0), ci).mapv_inplace(|v| v + share);
        }
    }
    Ok(())
}

