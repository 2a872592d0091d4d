//! Fully connected layers: `out[n, o] = b[o] + sum_i w[o, i] * x[n, i]`, weight `[out, in]`
//! (PyTorch's `nn.Linear` layout), input `[N, in]`.

use super::{check_dims, kerr, Result, Scalar};
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

const OP: &str = "dense";

fn check<T>(out: &[usize], x: &ArrayView2<T>, w: &ArrayView2<T>, b_len: Option<usize>) -> Result<()> {
    let (n, i) = x.dim();
    let (o, wi) = w.dim();
    if wi != i {
        return kerr(OP, format!("`w` is {o}x{wi} but the input has {i} features"));
    }
    if let Some(len) = b_len {
        check_dims(OP, "b", &[len], &[o])?;
    }
    check_dims(OP, "out", out, &[n, o])
}

/// `out = x w^T + b`. `out` is overwritten.
pub fn dense_forward<T: Scalar>(
    mut out: ArrayViewMut2<T>,
    x: ArrayView2<T>,
    w: ArrayView2<T>,
    b: Option<ArrayView1<T>>,
) -> Result<()> {
    check(out.shape(), &x, &w, b.as_ref().map(|b| b.len()))?;
    out.assign(&x.dot(&w.t()));
    if let Some(b) = b {
        out += &b;
    }
    Ok(())
}

/// Gradients of [`dense_forward`], accumulated into the given `d_` tensors:
///
/// ```text
/// d_x[n, i] += sum_o d_out[n, o] * w[o, i]      (d_x += d_out w)
/// d_w[o, i] += sum_n d_out[n, o] * x[n, i]      (d_w += d_out^T x)
/// d_b[o]    += sum_n d_out[n, o]
/// ```
pub fn dense_backward<T: Scalar>(
    d_x: Option<ArrayViewMut2<T>>,
    d_w: Option<ArrayViewMut2<T>>,
    d_b: Option<ArrayViewMut1<T>>,
    d_out: ArrayView2<T>,
    x: ArrayView2<T>,
    w: ArrayView2<T>,
) -> Result<()> {
    check(d_out.shape(), &x, &w, d_b.as_ref().map(|b| b.len()))?;
    if let Some(mut dx) = d_x {
        check_dims(OP, "d_x", dx.shape(), x.shape())?;
        dx += &d_out.dot(&w);
    }
    if let Some(mut dw) = d_w {
        check_dims(OP, "d_w", dw.shape(), w.shape())?;
        dw += &d_out.t().dot(&x);
    }
    if let Some(mut db) = d_b {
        db += &d_out.sum_axis(Axis(0));
    }
    Ok(())
}
