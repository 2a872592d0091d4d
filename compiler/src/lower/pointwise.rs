//! Elementwise activations and batch normalisation, forward and backward (plain Rust loops
//! written so rustc auto-vectorises them; these ops are memory-bound).
//!
//! All functions follow the `X_forward`/`X_backward` convention: outputs first, gradients
//! accumulated with `+=`, lengths checked (an error names `layer`).
//!
//! Batch norm works on a whole batch `[n, C, H, W]` (statistics span the batch); a runtime can
//! split it over threads by channel with [`batchnorm_forward_train`]'s `channels` range.

use crate::ir::Activation;
use crate::{Error, Result};
use std::ops::Range;

fn err(layer: &str, m: String) -> Error {
    Error::Codegen { layer: layer.to_string(), message: m }
}

fn same_len(layer: &str, what: &[(&str, usize)]) -> Result<()> {
    let n = what[0].1;
    for &(name, len) in what {
        if len != n {
            return Err(err(layer, format!("{name} has {len} elements, expected {n} (as {})", what[0].0)));
        }
    }
    Ok(())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = act(x)`.
pub fn activation_forward(layer: &str, act: Activation, out: &mut [f32], x: &[f32]) -> Result<()> {
    same_len(layer, &[("input", x.len()), ("output", out.len())])?;
    match act {
        Activation::Relu => out.iter_mut().zip(x).for_each(|(o, &v)| *o = v.max(0.0)),
        Activation::LeakyRelu { slope } => {
            out.iter_mut().zip(x).for_each(|(o, &v)| *o = if v > 0.0 { v } else { slope * v })
        }
        Activation::Elu { alpha } => {
            out.iter_mut().zip(x).for_each(|(o, &v)| *o = if v > 0.0 { v } else { alpha * v.exp_m1() })
        }
        Activation::Sigmoid => out.iter_mut().zip(x).for_each(|(o, &v)| *o = sigmoid(v)),
        Activation::Tanh => out.iter_mut().zip(x).for_each(|(o, &v)| *o = v.tanh()),
    }
    Ok(())
}

/// `d_x += d_out * act'(x)`, from the activation's input `x`:
/// relu `[x>0]`; leaky `x>0 ? 1 : slope`; elu `x>0 ? 1 : alpha*e^x`; sigmoid `s(1-s)`;
/// tanh `1 - tanh²x`.
pub fn activation_backward(layer: &str, act: Activation, d_x: &mut [f32], d_out: &[f32], x: &[f32]) -> Result<()> {
    same_len(layer, &[("input", x.len()), ("input gradient", d_x.len()), ("output gradient", d_out.len())])?;
    let it = d_x.iter_mut().zip(d_out).zip(x);
    match act {
        Activation::Relu => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { 0.0 }),
        Activation::LeakyRelu { slope } => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { slope * g }),
        Activation::Elu { alpha } => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { g * alpha * v.exp() }),
        Activation::Sigmoid => it.for_each(|((d, &g), &v)| {
            let s = sigmoid(v);
            *d += g * s * (1.0 - s)
        }),
        Activation::Tanh => it.for_each(|((d, &g), &v)| {
            let t = v.tanh();
            *d += g * (1.0 - t * t)
        }),
    }
    Ok(())
}

/// `d_x += d_out * act'(x)` computed from the activation's *output* `y` (what a GEMM epilogue
/// with a fused activation leaves behind): relu `[y>0]`; leaky `y>0 ? 1 : slope` (needs
/// `slope > 0`); elu `y>0 ? 1 : y + alpha`; sigmoid `y(1-y)`; tanh `1 - y²`.
pub fn activation_backward_from_output(layer: &str, act: Activation, d_x: &mut [f32], d_out: &[f32], y: &[f32]) -> Result<()> {
    same_len(layer, &[("output", y.len()), ("input gradient", d_x.len()), ("output gradient", d_out.len())])?;
    let it = d_x.iter_mut().zip(d_out).zip(y);
    match act {
        Activation::Relu => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { 0.0 }),
        Activation::LeakyRelu { slope } => {
            if slope <= 0.0 {
                return Err(err(layer, format!("leaky_relu slope {slope} <= 0: the gradient is not a function of the output")));
            }
            it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { slope * g })
        }
        Activation::Elu { alpha } => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { g * (v + alpha) }),
        Activation::Sigmoid => it.for_each(|((d, &g), &v)| *d += g * v * (1.0 - v)),
        Activation::Tanh => it.for_each(|((d, &g), &v)| *d += g * (1.0 - v * v)),
    }
    Ok(())
}

/// Batch statistics saved by the training forward pass for the backward pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BnSaved {
    /// Per-channel batch mean.
    pub mean: Vec<f32>,
    /// Per-channel `1 / sqrt(var + eps)` (biased batch variance).
    pub rstd: Vec<f32>,
}

/// Shape of a batch-norm call: `n` samples of `c` channels of `hw` pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    /// Samples.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Pixels per channel (`H*W`; 1 after a dense layer).
    pub hw: usize,
}

impl BnShape {
    fn numel(&self) -> usize {
        self.n * self.c * self.hw
    }
    fn check(&self, layer: &str, what: &str, len: usize, want: usize) -> Result<()> {
        if len != want {
            return Err(err(layer, format!("batchnorm {what} has {len} elements, expected {want}")));
        }
        Ok(())
    }
}

/// Training forward over channels `channels` (use `0..c` for all):
/// `mean_c = E[x]`, `var_c = E[(x-mean)²]`, `out = gamma * (x - mean) / sqrt(var + eps) + beta`;
/// saves `mean`, `rstd` into `saved` (resized to `c`) and updates the running statistics
/// PyTorch's way: `running = (1-m)*running + m*batch`, with the unbiased variance.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward_train(
    layer: &str,
    shape: BnShape,
    channels: Range<usize>,
    out: &mut [f32],
    saved: &mut BnSaved,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    momentum: f32,
) -> Result<()> {
    let BnShape { n, c, hw } = shape;
    shape.check(layer, "input", x.len(), shape.numel())?;
    shape.check(layer, "output", out.len(), shape.numel())?;
    for (w, l) in [("gamma", gamma.len()), ("beta", beta.len()), ("running mean", running_mean.len()), ("running var", running_var.len())] {
        shape.check(layer, w, l, c)?;
    }
    if channels.end > c || n * hw == 0 {
        return Err(err(layer, format!("batchnorm channels {channels:?} of {c}, {n} samples x {hw} pixels")));
    }
    saved.mean.resize(c, 0.0);
    saved.rstd.resize(c, 0.0);
    let m = (n * hw) as f64;
    for ch in channels {
        let plane = |s: usize| s * c * hw + ch * hw;
        let mut sum = 0.0f64;
        for s in 0..n {
            sum += x[plane(s)..plane(s) + hw].iter().map(|&v| v as f64).sum::<f64>();
        }
        let mean = sum / m;
        let mut ss = 0.0f64;
        for s in 0..n {
            ss += x[plane(s)..plane(s) + hw].iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
        }
        let var = ss / m;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let (mean32, rstd32) = (mean as f32, rstd as f32);
        saved.mean[ch] = mean32;
        saved.rstd[ch] = rstd32;
        let (a, bb) = (gamma[ch] * rstd32, beta[ch] - gamma[ch] * rstd32 * mean32);
        for s in 0..n {
            let p = plane(s);
            for (o, &v) in out[p..p + hw].iter_mut().zip(&x[p..p + hw]) {
                *o = v * a + bb;
            }
        }
        let unbiased = if m > 1.0 { ss / (m - 1.0) } else { var };
        running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mean32;
        running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * unbiased as f32;
    }
    Ok(())
}

/// Backward of the training forward, with `xhat = (x - mean) * rstd` and `M = n*hw`:
/// `d_beta += Σ d_out`, `d_gamma += Σ d_out*xhat`,
/// `d_x += gamma*rstd/M * (M*d_out - Σd_out - xhat*Σ(d_out*xhat))`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    layer: &str,
    shape: BnShape,
    channels: Range<usize>,
    d_x: &mut [f32],
    d_gamma: &mut [f32],
    d_beta: &mut [f32],
    d_out: &[f32],
    x: &[f32],
    saved: &BnSaved,
    gamma: &[f32],
) -> Result<()> {
    let BnShape { n, c, hw } = shape;
    for (w, l) in [("input", x.len()), ("input gradient", d_x.len()), ("output gradient", d_out.len())] {
        shape.check(layer, w, l, shape.numel())?;
    }
    for (w, l) in [("gamma", gamma.len()), ("gamma gradient", d_gamma.len()), ("beta gradient", d_beta.len()), ("saved mean", saved.mean.len()), ("saved rstd", saved.rstd.len())] {
        shape.check(layer, w, l, c)?;
    }
    if channels.end > c {
        return Err(err(layer, format!("batchnorm channels {channels:?} of {c}")));
    }
    let m = (n * hw) as f32;
    for ch in channels {
        let (mean, rstd) = (saved.mean[ch], saved.rstd[ch]);
        let plane = |s: usize| s * c * hw + ch * hw;
        let (mut sg, mut sgx) = (0.0f64, 0.0f64);
        for s in 0..n {
            let p = plane(s);
            for (&g, &v) in d_out[p..p + hw].iter().zip(&x[p..p + hw]) {
                sg += g as f64;
                sgx += (g * (v - mean) * rstd) as f64;
            }
        }
        let (sg, sgx) = (sg as f32, sgx as f32);
        d_beta[ch] += sg;
        d_gamma[ch] += sgx;
        let k = gamma[ch] * rstd / m;
        for s in 0..n {
            let p = plane(s);
            for ((d, &g), &v) in d_x[p..p + hw].iter_mut().zip(&d_out[p..p + hw]).zip(&x[p..p + hw]) {
                let xhat = (v - mean) * rstd;
                *d += k * (m * g - sg - xhat * sgx);
            }
        }
    }
    Ok(())
}

/// Inference forward with running statistics: `out = gamma*(x - rm)/sqrt(rv + eps) + beta`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward_infer(
    layer: &str,
    shape: BnShape,
    out: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) -> Result<()> {
    shape.check(layer, "input", x.len(), shape.numel())?;
    shape.check(layer, "output", out.len(), shape.numel())?;
    let (scale, shift) = batchnorm_fold(layer, gamma, beta, running_mean, running_var, eps)?;
    shape.check(layer, "gamma", scale.len(), shape.c)?;
    let BnShape { n, c, hw } = shape;
    for s in 0..n {
        for ch in 0..c {
            let p = s * c * hw + ch * hw;
            for (o, &v) in out[p..p + hw].iter_mut().zip(&x[p..p + hw]) {
                *o = v * scale[ch] + shift[ch];
            }
        }
    }
    Ok(())
}

/// Fold inference batch norm into a per-channel affine map `y = x*scale + shift` (what a
/// convolution's [`Epilogue::affine`](super::conv::Epilogue::affine) applies):
/// `scale = gamma / sqrt(rv + eps)`, `shift = beta - rm * scale`.
pub fn batchnorm_fold(
    layer: &str,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    same_len(layer, &[("gamma", gamma.len()), ("beta", beta.len()), ("running mean", running_mean.len()), ("running var", running_var.len())])?;
    let scale: Vec<f32> = gamma.iter().zip(running_var).map(|(&g, &v)| g / (v + eps).sqrt()).collect();
    let shift = beta.iter().zip(running_mean).zip(&scale).map(|((&b, &m), &s)| b - m * s).collect();
    Ok((scale, shift))
}
