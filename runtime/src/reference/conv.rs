//! 2-D convolution (cross-correlation), forward and backward, by direct summation.
//!
//! Notation: input `x[n, c, y, x]` of `C x H x W`, weight `w[o, ci, ky, kx]` of
//! `D x C/G x KH x KW` (PyTorch layout), `G` groups, stride `(sh, sw)`, dilation `(dh, dw)`,
//! padding `(top, bottom, left, right)`. Output channel `o` belongs to group
//! `g = o / (D/G)` and reads input channels `g*(C/G) .. (g+1)*(C/G)`:
//!
//! ```text
//! out[n, o, oy, ox] = b[o] + sum_{ci, ky, kx} w[o, ci, ky, kx] * x[n, g*C/G + ci, iy, ix]
//!     iy = oy*sh + ky*dh - top,  ix = ox*sw + kx*dw - left   (terms outside the image are 0)
//! ```
//!
//! The output size is `(H + top + bottom - (dh*(KH-1)+1)) / sh + 1` (floor), and the same for
//! the width.

use super::{check_dims, explicit_pads, kerr, Result, Scalar};
use cnnc_compiler::ir::Conv2d;
use ndarray::{ArrayView1, ArrayView4, ArrayViewMut1, ArrayViewMut4};

const OP: &str = "conv2d";

/// The validated geometry of one convolution call.
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    d: usize,
    cg: usize,
    dg: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    top: usize,
    left: usize,
}

impl Geom {
    /// Input coordinates read by output `(oy, ox)` and tap `(ky, kx)`, or `None` in the padding.
    fn src(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.sh + ky * self.dh).checked_sub(self.top)?;
        let ix = (ox * self.sw + kx * self.dw).checked_sub(self.left)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }
}

/// The output `[height, width]` of convolution `attrs` on an `[h, w]` input.
pub fn conv2d_output_hw(attrs: &Conv2d, h: usize, w: usize) -> Result<[usize; 2]> {
    let [top, bottom, left, right] = explicit_pads(OP, attrs.padding)?;
    if attrs.kernel.contains(&0) || attrs.stride.contains(&0) || attrs.dilation.contains(&0) {
        return kerr(OP, format!("zero kernel {:?}, stride {:?} or dilation {:?}", attrs.kernel, attrs.stride, attrs.dilation));
    }
    let k = attrs.dilated_kernel();
    let (ph, pw) = (h + top + bottom, w + left + right);
    if k[0] > ph || k[1] > pw {
        return kerr(OP, format!("dilated kernel {}x{} does not fit the padded {ph}x{pw} input", k[0], k[1]));
    }
    Ok([(ph - k[0]) / attrs.stride[0] + 1, (pw - k[1]) / attrs.stride[1] + 1])
}

fn geometry<T>(
    out: &[usize],
    x: &ArrayView4<T>,
    w: &ArrayView4<T>,
    b_len: Option<usize>,
    attrs: &Conv2d,
) -> Result<Geom> {
    let (n, c, h, wd) = x.dim();
    let g = attrs.groups;
    let d = attrs.out_channels;
    if g == 0 || !c.is_multiple_of(g) || !d.is_multiple_of(g) {
        return kerr(OP, format!("groups = {g} must divide input channels {c} and output channels {d}"));
    }
    let [kh, kw] = attrs.kernel;
    check_dims(OP, "w", w.shape(), &[d, c / g, kh, kw])?;
    match (attrs.bias, b_len) {
        (true, Some(len)) => check_dims(OP, "b", &[len], &[d])?,
        (false, None) => {}
        (true, None) => return kerr(OP, "the layer has a bias but none was passed"),
        (false, Some(_)) => return kerr(OP, "a bias was passed to a layer without bias"),
    }
    let [oh, ow] = conv2d_output_hw(attrs, h, wd)?;
    check_dims(OP, "out", out, &[n, d, oh, ow])?;
    let [top, _, left, _] = explicit_pads(OP, attrs.padding)?;
    Ok(Geom {
        n,
        c,
        h,
        w: wd,
        d,
        cg: c / g,
        dg: d / g,
        kh,
        kw,
        oh,
        ow,
        sh: attrs.stride[0],
        sw: attrs.stride[1],
        dh: attrs.dilation[0],
        dw: attrs.dilation[1],
        top,
        left,
    })
}

/// `out = conv2d(x, w) + b` (see the module header for the formula). `out` is overwritten.
pub fn conv2d_forward<T: Scalar>(
    mut out: ArrayViewMut4<T>,
    x: ArrayView4<T>,
    w: ArrayView4<T>,
    b: Option<ArrayView1<T>>,
    attrs: &Conv2d,
) -> Result<()> {
    let g = geometry(out.shape(), &x, &w, b.as_ref().map(|b| b.len()), attrs)?;
    debug_assert_eq!(g.c, g.cg * attrs.groups);
    for n in 0..g.n {
        for o in 0..g.d {
            let c0 = (o / g.dg) * g.cg;
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut acc = b.as_ref().map_or(T::zero(), |b| b[o]);
                    for ci in 0..g.cg {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                if let Some((iy, ix)) = g.src(oy, ox, ky, kx) {
                                    acc += w[[o, ci, ky, kx]] * x[[n, c0 + ci, iy, ix]];
                                }
                            }
                        }
                    }
                    out[[n, o, oy, ox]] = acc;
                }
            }
        }
    }
    Ok(())
}

/// Gradients of [`conv2d_forward`], accumulated (`+=`) into whichever of `d_x`, `d_w`, `d_b`
/// are given.
///
/// Each output element is a sum of products, so with `dy = d_out[n, o, oy, ox]` every term
/// `w[o, ci, ky, kx] * x[n, c0+ci, iy, ix]` of it contributes
///
/// ```text
/// d_x[n, c0+ci, iy, ix] += w[o, ci, ky, kx] * dy      (padding taps contribute nothing)
/// d_w[o, ci, ky, kx]    += x[n, c0+ci, iy, ix] * dy
/// d_b[o]                += dy                         (summed over n, oy, ox)
/// ```
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward<T: Scalar>(
    mut d_x: Option<ArrayViewMut4<T>>,
    mut d_w: Option<ArrayViewMut4<T>>,
    mut d_b: Option<ArrayViewMut1<T>>,
    d_out: ArrayView4<T>,
    x: ArrayView4<T>,
    w: ArrayView4<T>,
    attrs: &Conv2d,
) -> Result<()> {
    let b_len = d_b.as_ref().map(|b| b.len()).or(attrs.bias.then_some(attrs.out_channels));
    let g = geometry(d_out.shape(), &x, &w, b_len, attrs)?;
    if let Some(dx) = &d_x {
        check_dims(OP, "d_x", dx.shape(), x.shape())?;
    }
    if let Some(dw) = &d_w {
        check_dims(OP, "d_w", dw.shape(), w.shape())?;
    }
    for n in 0..g.n {
        for o in 0..g.d {
            let c0 = (o / g.dg) * g.cg;
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let dy = d_out[[n, o, oy, ox]];
                    if let Some(db) = d_b.as_mut() {
                        db[o] += dy;
                    }
                    for ci in 0..g.cg {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                if let Some((iy, ix)) = g.src(oy, ox, ky, kx) {
                                    if let Some(dx) = d_x.as_mut() {
                                        dx[[n, c0 + ci, iy, ix]] += w[[o, ci, ky, kx]] * dy;
                                    }
                                    if let Some(dw) = d_w.as_mut() {
                                        dw[[o, ci, ky, kx]] += x[[n, c0 + ci, iy, ix]] * dy;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
