//! Data-movement and small elementwise ops: dropout, flatten, concat, add, channel-wise
//! multiply and softmax. Axis 0 is always the batch; concat joins along axis 1 (channels of an
//! NCHW tensor, features of an `[N, n]` one).

use super::{check_dims, kerr, Result, Scalar};
use ndarray::{concatenate, ArrayD, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut2, ArrayViewMut4, ArrayViewMutD, Axis, IxDyn, Zip};
use rand::Rng;

/// A dropout keep-mask of dimensions `dims`: each element is kept (`true`) with probability
/// `1 - p`, independently.
pub fn dropout_mask<R: Rng + ?Sized>(dims: &[usize], p: f32, rng: &mut R) -> ArrayD<bool> {
    let keep = (1.0 - p as f64).clamp(0.0, 1.0);
    ArrayD::from_shape_simple_fn(IxDyn(dims), || rng.random_bool(keep))
}

fn check_p(p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return kerr("dropout", format!("probability {p} is outside [0, 1)"));
    }
    Ok(())
}

/// Inverted dropout with a given keep-mask: `out = x * mask / (1 - p)`, so the expected value
/// of `out` equals `x` and inference is the identity. `out` is overwritten.
pub fn dropout_forward<T: Scalar>(mut out: ArrayViewMutD<T>, x: ArrayViewD<T>, mask: ArrayViewD<bool>, p: f32) -> Result<()> {
    check_p(p)?;
    check_dims("dropout", "out", out.shape(), x.shape())?;
    check_dims("dropout", "mask", mask.shape(), x.shape())?;
    let scale = T::one() / (T::one() - T::of_f32(p));
    Zip::from(&mut out).and(&x).and(&mask).for_each(|o, &v, &k| *o = if k { v * scale } else { T::zero() });
    Ok(())
}

/// Gradient of [`dropout_forward`] (linear in `x`): `d_x += d_out * mask / (1 - p)`.
pub fn dropout_backward<T: Scalar>(mut d_x: ArrayViewMutD<T>, d_out: ArrayViewD<T>, mask: ArrayViewD<bool>, p: f32) -> Result<()> {
    check_p(p)?;
    check_dims("dropout", "d_out", d_out.shape(), d_x.shape())?;
    check_dims("dropout", "mask", mask.shape(), d_x.shape())?;
    let scale = T::one() / (T::one() - T::of_f32(p));
    Zip::from(&mut d_x).and(&d_out).and(&mask).for_each(|d, &dy, &k| {
        if k {
            *d += dy * scale
        }
    });
    Ok(())
}

/// `[N, ...] -> [N, prod(...)]` in row-major (C, H, W) order, PyTorch's `flatten(1)`.
/// `out` is overwritten.
pub fn flatten_forward<T: Scalar>(mut out: ArrayViewMut2<T>, x: ArrayViewD<T>) -> Result<()> {
    let n = x.shape().first().copied().unwrap_or(0);
    let per: usize = x.shape().iter().skip(1).product();
    check_dims("flatten", "out", out.shape(), &[n, per])?;
    for (mut row, sample) in out.outer_iter_mut().zip(x.outer_iter()) {
        row.iter_mut().zip(sample.iter()).for_each(|(o, &v)| *o = v);
    }
    Ok(())
}

/// Gradient of [`flatten_forward`] (a permutation-free reshape): `d_x += reshape(d_out)`.
pub fn flatten_backward<T: Scalar>(mut d_x: ArrayViewMutD<T>, d_out: ArrayView2<T>) -> Result<()> {
    let n = d_x.shape().first().copied().unwrap_or(0);
    let per: usize = d_x.shape().iter().skip(1).product();
    check_dims("flatten", "d_out", d_out.shape(), &[n, per])?;
    for (mut sample, row) in d_x.outer_iter_mut().zip(d_out.outer_iter()) {
        sample.iter_mut().zip(row.iter()).for_each(|(d, &dy)| *d += dy);
    }
    Ok(())
}

/// Concatenation along axis 1 of tensors that agree on every other axis. `out` is
/// overwritten.
pub fn concat_forward<T: Scalar>(mut out: ArrayViewMutD<T>, xs: &[ArrayViewD<T>]) -> Result<()> {
    if xs.is_empty() {
        return kerr("concat", "no operands");
    }
    let joined = concatenate(Axis(1), xs).map_err(|e| super::Error::Kernel {
        op: "concat",
        message: format!("operands do not fit along axis 1: {e}"),
    })?;
    check_dims("concat", "out", out.shape(), joined.shape())?;
    out.assign(&joined);
    Ok(())
}

/// Gradient of [`concat_forward`]: operand `i` receives its slice of `d_out` along axis 1,
/// `d_xs[i] += d_out[:, off_i .. off_i + C_i, ...]`.
pub fn concat_backward<T: Scalar>(d_xs: &mut [ArrayViewMutD<T>], d_out: ArrayViewD<T>) -> Result<()> {
    let total: usize = d_xs.iter().map(|d| d.shape().get(1).copied().unwrap_or(0)).sum();
    if d_out.ndim() < 2 || d_out.shape()[1] != total {
        return kerr("concat", format!("`d_out` has dimensions {:?} but the operands have {total} channels", d_out.shape()));
    }
    let mut off = 0;
    for (i, d) in d_xs.iter_mut().enumerate() {
        let Some(&ci) = d.shape().get(1) else {
            return kerr("concat", format!("`d_xs[{i}]` has no axis 1"));
        };
        let part = d_out.slice_axis(Axis(1), (off..off + ci).into());
        check_dims("concat", &format!("d_xs[{i}]"), d.shape(), part.shape())?;
        *d += &part;
        off += ci;
    }
    Ok(())
}

/// Elementwise sum of two or more tensors of one shape. `out` is overwritten.
pub fn add_forward<T: Scalar>(mut out: ArrayViewMutD<T>, xs: &[ArrayViewD<T>]) -> Result<()> {
    if xs.is_empty() {
        return kerr("add", "no operands");
    }
    for (i, x) in xs.iter().enumerate() {
        check_dims("add", &format!("xs[{i}]"), x.shape(), out.shape())?;
    }
    out.fill(T::zero());
    for x in xs {
        out += x;
    }
    Ok(())
}

/// Gradient of [`add_forward`]: every operand gets the whole output gradient,
/// `d_xs[i] += d_out`.
pub fn add_backward<T: Scalar>(d_xs: &mut [ArrayViewMutD<T>], d_out: ArrayViewD<T>) -> Result<()> {
    for (i, d) in d_xs.iter_mut().enumerate() {
        check_dims("add", &format!("d_xs[{i}]"), d.shape(), d_out.shape())?;
        *d += &d_out;
    }
    Ok(())
}

fn channel_mul_check<T>(out: &[usize], x: &ArrayView4<T>, s: &ArrayView2<T>) -> Result<()> {
    let (n, c, _, _) = x.dim();
    check_dims("channel_mul", "s", s.shape(), &[n, c])?;
    check_dims("channel_mul", "out", out, x.shape())
}

/// Channel-wise scaling (squeeze-and-excitation): `out[n, c, y, x] = x[n, c, y, x] * s[n, c]`.
/// `out` is overwritten.
pub fn channel_mul_forward<T: Scalar>(mut out: ArrayViewMut4<T>, x: ArrayView4<T>, s: ArrayView2<T>) -> Result<()> {
    channel_mul_check(out.shape(), &x, &s)?;
    for ((n, c, yi, xi), o) in out.indexed_iter_mut() {
        *o = x[[n, c, yi, xi]] * s[[n, c]];
    }
    Ok(())
}

/// Gradients of [`channel_mul_forward`], accumulated:
///
/// ```text
/// d_x[n, c, y, x] += d_out[n, c, y, x] * s[n, c]
/// d_s[n, c]       += sum_{y, x} d_out[n, c, y, x] * x[n, c, y, x]
/// ```
pub fn channel_mul_backward<T: Scalar>(
    mut d_x: Option<ArrayViewMut4<T>>,
    mut d_s: Option<ArrayViewMut2<T>>,
    d_out: ArrayView4<T>,
    x: ArrayView4<T>,
    s: ArrayView2<T>,
) -> Result<()> {
    channel_mul_check(d_out.shape(), &x, &s)?;
    if let Some(dx) = &d_x {
        check_dims("channel_mul", "d_x", dx.shape(), x.shape())?;
    }
    if let Some(ds) = &d_s {
        check_dims("channel_mul", "d_s", ds.shape(), s.shape())?;
    }
    for ((n, c, yi, xi), &dy) in d_out.indexed_iter() {
        if let Some(dx) = d_x.as_mut() {
            dx[[n, c, yi, xi]] += dy * s[[n, c]];
        }
        if let Some(ds) = d_s.as_mut() {
            ds[[n, c]] += dy * x[[n, c, yi, xi]];
        }
    }
    Ok(())
}

/// Softmax over axis 1 of `[N, K]` scores, with the row maximum subtracted first so `exp`
/// never overflows: `out[n, k] = exp(x[n, k] - m) / sum_j exp(x[n, j] - m)`. `out` is
/// overwritten.
pub fn softmax_forward<T: Scalar>(mut out: ArrayViewMut2<T>, x: ArrayView2<T>) -> Result<()> {
    check_dims("softmax", "out", out.shape(), x.shape())?;
    for (mut o, row) in out.outer_iter_mut().zip(x.outer_iter()) {
        let m = row.fold(T::neg_infinity(), |a, &v| a.max(v));
        o.zip_mut_with(&row, |o, &v| *o = (v - m).exp());
        let z = o.sum();
        o.mapv_inplace(|v| v / z);
    }
    Ok(())
}

/// Gradient of [`softmax_forward`], from its *output* `y`: the Jacobian is
/// `dy_k / dx_j = y_k ([k == j] - y_j)`, so
/// `d_x[n, j] += y[n, j] * (d_out[n, j] - sum_k d_out[n, k] * y[n, k])`.
pub fn softmax_backward<T: Scalar>(mut d_x: ArrayViewMut2<T>, d_out: ArrayView2<T>, y: ArrayView2<T>) -> Result<()> {
    check_dims("softmax", "d_out", d_out.shape(), y.shape())?;
    check_dims("softmax", "d_x", d_x.shape(), y.shape())?;
    for ((mut dx, dy), yr) in d_x.outer_iter_mut().zip(d_out.outer_iter()).zip(y.outer_iter()) {
        let dot: T = dy.iter().zip(yr.iter()).map(|(&a, &b)| a * b).sum();
        Zip::from(&mut dx).and(&dy).and(&yr).for_each(|d, &g, &p| *d += p * (g - dot));
    }
    Ok(())
}
