//! Normalisation layers: batch normalisation (training and evaluation mode) and local response
//! normalisation across channels. Inputs are NCHW; a flat `[N, n]` activation is passed as
//! `[N, n, 1, 1]`.
//!
//! Batch norm, per channel `c`, over the `M = N*H*W` values `x_i` of that channel:
//!
//! ```text
//! training:  mu = sum x_i / M,  var = sum (x_i - mu)^2 / M           (biased, used to normalise)
//!            xhat_i = (x_i - mu) * istd,  istd = 1 / sqrt(var + eps)
//!            y_i = gamma * xhat_i + beta
//!            running_mean = (1 - m) * running_mean + m * mu
//!            running_var  = (1 - m) * running_var  + m * var * M / (M - 1)   (unbiased, as PyTorch)
//! eval:      y_i = gamma * (x_i - running_mean) / sqrt(running_var + eps) + beta
//! ```
//!
//! PyTorch also keeps a `num_batches_tracked` buffer; it only matters for `momentum=None`
//! (cumulative averaging), which cnnc does not have, so it is not modelled.

use super::{check_dims, kerr, Result, Scalar};
use cnnc_compiler::ir::{BatchNorm, Lrn};
use ndarray::{ArrayView1, ArrayView4, ArrayViewMut1, ArrayViewMut4};

const BN: &str = "batchnorm";
const LRN: &str = "lrn";

fn check_channel_vec(op: &'static str, what: &str, len: usize, c: usize) -> Result<()> {
    check_dims(op, what, &[len], &[c])
}

/// Training-mode batch norm: normalise with the batch statistics, write them to `mean` and
/// `invstd` (kept for the backward pass), and update `running_mean` / `running_var` in place
/// with momentum `attrs.momentum` (formulas in the module header). `out` is overwritten.
///
/// Errors when a channel has a single value (`N*H*W = 1`): its unbiased variance is undefined
/// (PyTorch refuses this case too).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_forward<T: Scalar>(
    mut out: ArrayViewMut4<T>,
    mut mean: ArrayViewMut1<T>,
    mut invstd: ArrayViewMut1<T>,
    mut running_mean: ArrayViewMut1<T>,
    mut running_var: ArrayViewMut1<T>,
    x: ArrayView4<T>,
    gamma: ArrayView1<T>,
    beta: ArrayView1<T>,
    attrs: &BatchNorm,
) -> Result<()> {
    let (n, c, h, w) = x.dim();
    check_dims(BN, "out", out.shape(), x.shape())?;
    for (what, len) in [
        ("mean", mean.len()),
        ("invstd", invstd.len()),
        ("running_mean", running_mean.len()),
        ("running_var", running_var.len()),
        ("gamma", gamma.len()),
        ("beta", beta.len()),
    ] {
        check_channel_vec(BN, what, len, c)?;
    }
    let m = n * h * w;
    if m < 2 {
        return kerr(BN, format!("training needs more than one value per channel, got N*H*W = {m}"));
    }
    let mf = T::of_usize(m);
    let eps = T::of_f32(attrs.eps);
    let mom = T::of_f32(attrs.momentum);
    for ch in 0..c {
        let xc = x.index_axis(ndarray::Axis(1), ch);
        let mu = xc.sum() / mf;
        let var = xc.fold(T::zero(), |acc, &v| acc + (v - mu) * (v - mu)) / mf;
        let is = T::one() / (var + eps).sqrt();
        mean[ch] = mu;
        invstd[ch] = is;
        running_mean[ch] = (T::one() - mom) * running_mean[ch] + mom * mu;
        running_var[ch] = (T::one() - mom) * running_var[ch] + mom * var * mf / (mf - T::one());
        let mut oc = out.index_axis_mut(ndarray::Axis(1), ch);
        oc.zip_mut_with(&xc, |o, &v| *o = gamma[ch] * (v - mu) * is + beta[ch]);
    }
    Ok(())
}

/// Gradients of [`batchnorm_train_forward`] *through the batch statistics*, accumulated.
///
/// With `dy_i = d_out` of the channel, `xhat_i = (x_i - mu) * istd` and `M = N*H*W`:
///
/// ```text
/// d_beta  += sum_i dy_i
/// d_gamma += sum_i dy_i * xhat_i
/// d_x_i   += gamma * istd / M * (M * dy_i - sum_j dy_j - xhat_i * sum_j dy_j * xhat_j)
/// ```
///
/// The last line is the chain rule through `mu` and `var`: with `g_i = gamma * dy_i`,
/// `d var = sum_j g_j (x_j - mu) * (-1/2) istd^3`, `d mu = -istd * sum_j g_j` (the term through
/// `var` vanishes because `sum_j (x_j - mu) = 0`), and
/// `d_x_i = g_i istd + d var * 2 (x_i - mu) / M + d mu / M`, which simplifies to the above.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_backward<T: Scalar>(
    d_x: Option<ArrayViewMut4<T>>,
    d_gamma: Option<ArrayViewMut1<T>>,
    d_beta: Option<ArrayViewMut1<T>>,
    d_out: ArrayView4<T>,
    x: ArrayView4<T>,
    gamma: ArrayView1<T>,
    mean: ArrayView1<T>,
    invstd: ArrayView1<T>,
) -> Result<()> {
    let (n, c, h, w) = x.dim();
    check_dims(BN, "d_out", d_out.shape(), x.shape())?;
    for (what, len) in [("gamma", gamma.len()), ("mean", mean.len()), ("invstd", invstd.len())] {
        check_channel_vec(BN, what, len, c)?;
    }
    let (mut d_x, mut d_gamma, mut d_beta) = (d_x, d_gamma, d_beta);
    if let Some(dx) = &d_x {
        check_dims(BN, "d_x", dx.shape(), x.shape())?;
    }
    for (what, len) in [("d_gamma", d_gamma.as_ref().map(|v| v.len())), ("d_beta", d_beta.as_ref().map(|v| v.len()))] {
        if let Some(len) = len {
            check_channel_vec(BN, what, len, c)?;
        }
    }
    let mf = T::of_usize(n * h * w);
    for ch in 0..c {
        let xc = x.index_axis(ndarray::Axis(1), ch);
        let dyc = d_out.index_axis(ndarray::Axis(1), ch);
        let (mu, is) = (mean[ch], invstd[ch]);
        let sum_dy = dyc.sum();
        let mut sum_dy_xhat = T::zero();
        ndarray::Zip::from(&xc).and(&dyc).for_each(|&v, &dy| sum_dy_xhat += dy * (v - mu) * is);
        if let Some(db) = d_beta.as_mut() {
            db[ch] += sum_dy;
        }
        if let Some(dg) = d_gamma.as_mut() {
            dg[ch] += sum_dy_xhat;
        }
        if let Some(dx) = d_x.as_mut() {
            let mut dxc = dx.index_axis_mut(ndarray::Axis(1), ch);
            let scale = gamma[ch] * is / mf;
            ndarray::Zip::from(&mut dxc).and(&xc).and(&dyc).for_each(|d, &v, &dy| {
                let xhat = (v - mu) * is;
                *d += scale * (mf * dy - sum_dy - xhat * sum_dy_xhat);
            });
        }
    }
    Ok(())
}

/// Evaluation-mode batch norm: normalise with the running statistics (module header).
/// `out` is overwritten; nothing else changes.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval_forward<T: Scalar>(
    mut out: ArrayViewMut4<T>,
    x: ArrayView4<T>,
    gamma: ArrayView1<T>,
    beta: ArrayView1<T>,
    running_mean: ArrayView1<T>,
    running_var: ArrayView1<T>,
    attrs: &BatchNorm,
) -> Result<()> {
    let c = x.dim().1;
    check_dims(BN, "out", out.shape(), x.shape())?;
    for (what, len) in [
        ("gamma", gamma.len()),
        ("beta", beta.len()),
        ("running_mean", running_mean.len()),
        ("running_var", running_var.len()),
    ] {
        check_channel_vec(BN, what, len, c)?;
    }
    let eps = T::of_f32(attrs.eps);
    for ch in 0..c {
        let is = T::one() / (running_var[ch] + eps).sqrt();
        let (g, b, mu) = (gamma[ch], beta[ch], running_mean[ch]);
        let xc = x.index_axis(ndarray::Axis(1), ch);
        out.index_axis_mut(ndarray::Axis(1), ch).zip_mut_with(&xc, |o, &v| *o = g * (v - mu) * is + b);
    }
    Ok(())
}

/// Gradients of [`batchnorm_eval_forward`] (the statistics are constants here), accumulated:
///
/// ```text
/// istd = 1 / sqrt(running_var + eps),  xhat_i = (x_i - running_mean) * istd
/// d_x_i   += gamma * istd * dy_i
/// d_gamma += sum_i dy_i * xhat_i
/// d_beta  += sum_i dy_i
/// ```
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval_backward<T: Scalar>(
    d_x: Option<ArrayViewMut4<T>>,
    d_gamma: Option<ArrayViewMut1<T>>,
    d_beta: Option<ArrayViewMut1<T>>,
    d_out: ArrayView4<T>,
    x: ArrayView4<T>,
    gamma: ArrayView1<T>,
    running_mean: ArrayView1<T>,
    running_var: ArrayView1<T>,
    attrs: &BatchNorm,
) -> Result<()> {
    let c = x.dim().1;
    check_dims(BN, "d_out", d_out.shape(), x.shape())?;
    for (what, len) in [("gamma", gamma.len()), ("running_mean", running_mean.len()), ("running_var", running_var.len())] {
        check_channel_vec(BN, what, len, c)?;
    }
    let (mut d_x, mut d_gamma, mut d_beta) = (d_x, d_gamma, d_beta);
    if let Some(dx) = &d_x {
        check_dims(BN, "d_x", dx.shape(), x.shape())?;
    }
    for (what, len) in [("d_gamma", d_gamma.as_ref().map(|v| v.len())), ("d_beta", d_beta.as_ref().map(|v| v.len()))] {
        if let Some(len) = len {
            check_channel_vec(BN, what, len, c)?;
        }
    }
    let eps = T::of_f32(attrs.eps);
    for ch in 0..c {
        let is = T::one() / (running_var[ch] + eps).sqrt();
        let mu = running_mean[ch];
        let xc = x.index_axis(ndarray::Axis(1), ch);
        let dyc = d_out.index_axis(ndarray::Axis(1), ch);
        if let Some(db) = d_beta.as_mut() {
            db[ch] += dyc.sum();
        }
        if let Some(dg) = d_gamma.as_mut() {
            let mut s = T::zero();
            ndarray::Zip::from(&xc).and(&dyc).for_each(|&v, &dy| s += dy * (v - mu) * is);
            dg[ch] += s;
        }
        if let Some(dx) = d_x.as_mut() {
            let g = gamma[ch];
            dx.index_axis_mut(ndarray::Axis(1), ch).zip_mut_with(&dyc, |d, &dy| *d += g * is * dy);
        }
    }
    Ok(())
}

/// The channels `lo..hi` in the LRN window of channel `c` (PyTorch: `size/2` before,
/// `(size-1)/2` after, clipped to `0..channels`).
fn lrn_window(c: usize, size: usize, channels: usize) -> std::ops::Range<usize> {
    c.saturating_sub(size / 2)..(c + (size - 1) / 2 + 1).min(channels)
}

/// `s[c] = k + alpha / size * sum_{j in window(c)} x[j]^2` for one pixel's channel vector.
fn lrn_scale<T: Scalar>(x: &[T], attrs: &Lrn) -> Vec<T> {
    let (k, a) = (T::of_f32(attrs.k), T::of_f32(attrs.alpha) / T::of_usize(attrs.size));
    (0..x.len())
        .map(|c| k + a * lrn_window(c, attrs.size, x.len()).map(|j| x[j] * x[j]).sum::<T>())
        .collect()
}

fn lrn_check<T>(out: &[usize], x: &ArrayView4<T>, attrs: &Lrn) -> Result<()> {
    if attrs.size == 0 {
        return kerr(LRN, "window size 0");
    }
    check_dims(LRN, "out", out, x.shape())
}

/// Local response normalisation across channels, PyTorch's `LocalResponseNorm`:
///
/// ```text
/// y[c] = x[c] * s[c]^(-beta),  s[c] = k + alpha / size * sum_{j = c - size/2}^{c + (size-1)/2} x[j]^2
/// ```
///
/// (the sum skips channels outside `0..C`, i.e. zero padding; the divisor is always `size`,
/// as PyTorch's average pool over the zero-padded squares). `out` is overwritten.
pub fn lrn_forward<T: Scalar>(mut out: ArrayViewMut4<T>, x: ArrayView4<T>, attrs: &Lrn) -> Result<()> {
    lrn_check(out.shape(), &x, attrs)?;
    let (n, c, h, w) = x.dim();
    let beta = T::of_f32(attrs.beta);
    let mut col = vec![T::zero(); c];
    for ni in 0..n {
        for yi in 0..h {
            for xi in 0..w {
                for (ch, v) in col.iter_mut().enumerate() {
                    *v = x[[ni, ch, yi, xi]];
                }
                let s = lrn_scale(&col, attrs);
                for ch in 0..c {
                    out[[ni, ch, yi, xi]] = col[ch] * s[ch].powf(-beta);
                }
            }
        }
    }
    Ok(())
}

/// Gradient of [`lrn_forward`], accumulated into `d_x`. Per pixel, with `dy = d_out`:
///
/// ```text
/// d y[c] / d x[j] = [c == j] s[c]^(-beta) - beta x[c] s[c]^(-beta-1) * (alpha/size) * 2 x[j] * [j in window(c)]
/// d_x[j] += dy[j] s[j]^(-beta) - (2 alpha beta / size) x[j] sum_{c : j in window(c)} dy[c] x[c] s[c]^(-beta-1)
/// ```
pub fn lrn_backward<T: Scalar>(mut d_x: ArrayViewMut4<T>, d_out: ArrayView4<T>, x: ArrayView4<T>, attrs: &Lrn) -> Result<()> {
    lrn_check(d_out.shape(), &x, attrs)?;
    check_dims(LRN, "d_x", d_x.shape(), x.shape())?;
    let (n, c, h, w) = x.dim();
    let beta = T::of_f32(attrs.beta);
    let coef = -T::lit(2.0) * T::of_f32(attrs.alpha) * beta / T::of_usize(attrs.size);
    let mut col = vec![T::zero(); c];
    for ni in 0..n {
        for yi in 0..h {
            for xi in 0..w {
                for (ch, v) in col.iter_mut().enumerate() {
                    *v = x[[ni, ch, yi, xi]];
                }
                let s = lrn_scale(&col, attrs);
                for ch in 0..c {
                    let dy = d_out[[ni, ch, yi, xi]];
                    d_x[[ni, ch, yi, xi]] += dy * s[ch].powf(-beta);
                    let t = coef * dy * col[ch] * s[ch].powf(-beta - T::one());
                    for j in lrn_window(ch, attrs.size, c) {
                        d_x[[ni, j, yi, xi]] += t * col[j];
                    }
                }
            }
        }
    }
    Ok(())
}
