//! Max and average pooling, forward and backward (plain Rust over precomputed window tables;
//! pooling is memory-bound, so a JIT buys little here).
//!
//! ## Layouts
//! `x`, `d_x`: `[n, C, H, W]`; `out`, `d_out`: `[n, C, OH, OW]`; `argmax` (max pooling): one
//! `u32` per output element, the winning input's index `iy*W + ix` within its channel plane.
//!
//! ## Semantics (PyTorch's)
//! Windows are clipped to the input: padded cells never win a max. Average pooling divides by
//! the window clipped to the *padded* input when `count_include_pad` (PyTorch's default), else
//! by the number of real input cells. Output size follows the IR's shape inference (floor, or
//! ceil with the last window starting inside the input or its leading padding).
//!
//! ## Maths
//! - max: `out = x[argmax]`; backward `d_x[argmax] += d_out` (gradient switches to the winner);
//! - avg: `out = Σ_window x / count`; backward `d_x[cell] += d_out / count` for every cell.

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
}

/// Output size, clipped input range per output, and padded-window length per output.
type Axis = (usize, Vec<(usize, usize)>, Vec<usize>);

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
        Ok(PoolKernels { layer: layer.to_string(), kind: pool.kind, c, h, w, oh, ow, rows, cols, div, tiled2 })
    }

    /// Output `(C, OH, OW)` per sample.
    pub fn out_shape(&self) -> (usize, usize, usize) {
        (self.c, self.oh, self.ow)
    }

    fn err(&self, m: String) -> Error {
        Error::Codegen { layer: self.layer.clone(), message: m }
    }

    fn planes(&self, x_len: usize, out_len: usize) -> Result<usize> {
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        if !x_len.is_multiple_of(self.c * hw) {
            return Err(self.err(format!("input has {x_len} elements, not a multiple of {}", self.c * hw)));
        }
        let planes = x_len / hw;
        if out_len != planes * ohw {
            return Err(self.err(format!("output has {out_len} elements, expected {}", planes * ohw)));
        }
        Ok(planes)
    }

    /// Forward. Max pooling records winners in `argmax` (required for it, same length as
    /// `out`); average pooling takes `None`.
    pub fn forward(&self, out: &mut [f32], argmax: Option<&mut [u32]>, x: &[f32]) -> Result<()> {
        let planes = self.planes(x.len(), out.len())?;
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        match (self.kind, argmax) {
            (PoolKind::Max, Some(am)) => {
                if am.len() != out.len() {
                    return Err(self.err(format!("argmax has {} elements, expected {}", am.len(), out.len())));
                }
                if self.tiled2 {
                    self.max2x2(out, am, x, planes);
                } else {
                    self.max_separable(out, am, x, planes);
                }
            }
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
            (PoolKind::Max, None) => return Err(self.err("max pooling needs an argmax buffer".into())),
            (PoolKind::Avg, Some(_)) => return Err(self.err("average pooling takes no argmax buffer".into())),
        }
        Ok(())
    }

    /// Max pooling in two passes per plane (lengths checked by `forward`): the winner of each
    /// input row over each output column's window, then the winner over each output row's
    /// window of those. Taking the first maximum in each pass (`>`, a NaN wins over a number)
    /// picks the first maximum in row-major window order, as a single pass over the window
    /// would: `kh + kw` comparisons per output instead of `kh * kw`, and the second pass runs
    /// over whole rows (vectorisable selects).
    fn max_separable(&self, out: &mut [f32], am: &mut [u32], x: &[f32], planes: usize) {
        let (w, hw, ow, ohw) = (self.w, self.h * self.w, self.ow, self.oh * self.ow);
        let wins = |v: f32, best: f32| v > best || v.is_nan() && !best.is_nan();
        let (mut hv, mut hi) = (vec![0.0f32; self.h * ow], vec![0u32; self.h * ow]);
        for pl in 0..planes {
            let xp = &x[pl * hw..(pl + 1) * hw];
            for (iy, (row, (hvr, hir))) in xp.chunks_exact(w).zip(hv.chunks_exact_mut(ow).zip(hi.chunks_exact_mut(ow))).enumerate() {
                for ((&(x0, x1), v), i) in self.cols.iter().zip(hvr.iter_mut()).zip(hir.iter_mut()) {
                    let (mut best, mut bi) = (row[x0], x0);
                    for (ix, &r) in row[x0 + 1..x1].iter().enumerate() {
                        // Selects, not branches: random data mispredicts half of them.
                        let t = wins(r, best);
                        best = if t { r } else { best };
                        bi = if t { x0 + 1 + ix } else { bi };
                    }
                    *v = best;
                    *i = (iy * w + bi) as u32;
                }
            }
            let (op, ap) = (&mut out[pl * ohw..(pl + 1) * ohw], &mut am[pl * ohw..(pl + 1) * ohw]);
            for (&(y0, y1), (orow, arow)) in self.rows.iter().zip(op.chunks_exact_mut(ow).zip(ap.chunks_exact_mut(ow))) {
                orow.copy_from_slice(&hv[y0 * ow..(y0 + 1) * ow]);
                arow.copy_from_slice(&hi[y0 * ow..(y0 + 1) * ow]);
                for iy in y0 + 1..y1 {
                    let (vr, ir) = (&hv[iy * ow..(iy + 1) * ow], &hi[iy * ow..(iy + 1) * ow]);
                    for ((o, a), (&v, &i)) in orow.iter_mut().zip(arow.iter_mut()).zip(vr.iter().zip(ir)) {
                        let t = wins(v, *o);
                        *a = if t { i } else { *a };
                        *o = if t { v } else { *o };
                    }
                }
            }
        }
    }

    /// 2x2 stride-2 max pooling over whole blocks (`tiled2`), lengths checked by `forward`:
    /// the same winner as the general loop (cells in row-major order, `>` keeps the first
    /// maximum, a NaN wins over a number), without its window tables and bounds checks.
    fn max2x2(&self, out: &mut [f32], am: &mut [u32], x: &[f32], planes: usize) {
        let (w, hw, ow, ohw) = (self.w, self.h * self.w, self.ow, self.oh * self.ow);
        let wins = |v: f32, best: f32| v > best || v.is_nan() && !best.is_nan();
        for pl in 0..planes {
            let xp = &x[pl * hw..(pl + 1) * hw];
            let (op, ap) = (&mut out[pl * ohw..(pl + 1) * ohw], &mut am[pl * ohw..(pl + 1) * ohw]);
            for oy in 0..self.oh {
                let (r0, r1) = (&xp[2 * oy * w..2 * oy * w + 2 * ow], &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow]);
                let (orow, arow) = (&mut op[oy * ow..(oy + 1) * ow], &mut ap[oy * ow..(oy + 1) * ow]);
                for (ox, ((o, a), (p0, p1))) in orow.iter_mut().zip(arow.iter_mut()).zip(r0.chunks_exact(2).zip(r1.chunks_exact(2))).enumerate() {
                    let base = 2 * oy * w + 2 * ox;
                    let (mut best, mut bi) = (p0[0], base);
                    for (v, i) in [(p0[1], base + 1), (p1[0], base + w), (p1[1], base + w + 1)] {
                        let t = wins(v, best);
                        best = if t { v } else { best };
                        bi = if t { i } else { bi };
                    }
                    *o = best;
                    *a = bi as u32;
                }
            }
        }
    }

    /// Backward: `d_x += ∂L/∂x` (max: to the recorded winners; avg: spread over the window).
    pub fn backward(&self, d_x: &mut [f32], d_out: &[f32], argmax: Option<&[u32]>) -> Result<()> {
        let planes = self.planes(d_x.len(), d_out.len())?;
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        match (self.kind, argmax) {
            (PoolKind::Max, Some(am)) => {
                if am.len() != d_out.len() {
                    return Err(self.err(format!("argmax has {} elements, expected {}", am.len(), d_out.len())));
                }
                for pl in 0..planes {
                    let dxp = &mut d_x[pl * hw..(pl + 1) * hw];
                    for q in 0..ohw {
                        let i = am[pl * ohw + q] as usize;
                        if i >= hw {
                            return Err(self.err(format!("argmax index {i} outside the {hw}-pixel plane")));
                        }
                        dxp[i] += d_out[pl * ohw + q];
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
            (PoolKind::Max, None) => return Err(self.err("max pooling backward needs the argmax".into())),
            (PoolKind::Avg, Some(_)) => return Err(self.err("average pooling takes no argmax".into())),
        }
        Ok(())
    }
}
