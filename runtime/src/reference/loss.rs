//! Training losses over `[N, K]` logits and integer labels.
//!
//! The op functions produce one loss per sample (the graph's `Loss` node outputs one scalar per
//! sample); the batch loss is their mean, so the caller seeds the backward pass with
//! `d_losses[n] = 1 / N` ([`interp::loss_and_grad`](super::interp::loss_and_grad) does).

use super::{check_dims, kerr, Result, Scalar};
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2};

fn check_labels(op: &'static str, labels: &[usize], n: usize, k: usize) -> Result<()> {
    if labels.len() != n {
        return kerr(op, format!("{} labels for a batch of {n}", labels.len()));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= k) {
        return kerr(op, format!("label {l} of sample {i} is out of range for {k} classes"));
    }
    Ok(())
}

/// Softmax cross-entropy: `losses[n] = -log softmax(logits[n])[labels[n]]`, computed as
/// `m + log sum_k exp(x_k - m) - x_y` with `m = max_k x_k` (never overflows). The
/// probabilities `softmax(logits)` are written to `probs` for the backward pass. Both outputs
/// are overwritten.
pub fn softmax_cross_entropy_forward<T: Scalar>(
    mut losses: ArrayViewMut1<T>,
    mut probs: ArrayViewMut2<T>,
    logits: ArrayView2<T>,
    labels: &[usize],
) -> Result<()> {
    const OP: &str = "softmax_cross_entropy";
    let (n, k) = logits.dim();
    check_labels(OP, labels, n, k)?;
    check_dims(OP, "losses", losses.shape(), &[n])?;
    check_dims(OP, "probs", probs.shape(), &[n, k])?;
    for i in 0..n {
        let row = logits.row(i);
        let m = row.fold(T::neg_infinity(), |a, &v| a.max(v));
        let z: T = row.iter().map(|&v| (v - m).exp()).sum();
        let log_z = m + z.ln();
        losses[i] = log_z - row[labels[i]];
        probs.row_mut(i).zip_mut_with(&row, |p, &v| *p = (v - log_z).exp());
    }
    Ok(())
}

/// Gradient of [`softmax_cross_entropy_forward`]: `dL_n / dx_{n,k} = p_{n,k} - [k == y_n]`, so
/// `d_logits[n, k] += d_losses[n] * (probs[n, k] - [k == labels[n]])`.
pub fn softmax_cross_entropy_backward<T: Scalar>(
    mut d_logits: ArrayViewMut2<T>,
    d_losses: ArrayView1<T>,
    probs: ArrayView2<T>,
    labels: &[usize],
) -> Result<()> {
    const OP: &str = "softmax_cross_entropy";
    let (n, k) = probs.dim();
    check_labels(OP, labels, n, k)?;
    check_dims(OP, "d_losses", d_losses.shape(), &[n])?;
    check_dims(OP, "d_logits", d_logits.shape(), &[n, k])?;
    for ((i, j), d) in d_logits.indexed_iter_mut() {
        let onehot = if j == labels[i] { T::one() } else { T::zero() };
        *d += d_losses[i] * (probs[[i, j]] - onehot);
    }
    Ok(())
}

/// Multiclass SVM (Weston-Watkins, CS231n):
/// `losses[n] = sum_{j != y} max(0, x_j - x_y + margin)`. `losses` is overwritten.
pub fn multiclass_hinge_forward<T: Scalar>(
    mut losses: ArrayViewMut1<T>,
    logits: ArrayView2<T>,
    labels: &[usize],
    margin: f32,
) -> Result<()> {
    const OP: &str = "multiclass_hinge";
    let (n, k) = logits.dim();
    check_labels(OP, labels, n, k)?;
    check_dims(OP, "losses", losses.shape(), &[n])?;
    let margin = T::of_f32(margin);
    for i in 0..n {
        let y = labels[i];
        let xy = logits[[i, y]];
        losses[i] = (0..k).filter(|&j| j != y).map(|j| (logits[[i, j]] - xy + margin).max(T::zero())).sum();
    }
    Ok(())
}

/// Gradient of [`multiclass_hinge_forward`]: each active term (`x_j - x_y + margin > 0`,
/// `j != y`) has derivative `+1` w.r.t. `x_j` and `-1` w.r.t. `x_y`, so with `g = d_losses[n]`:
/// `d_logits[n, j] += g` and `d_logits[n, y] -= g` per active `j` (a term exactly at the hinge
/// counts as inactive: subgradient 0).
pub fn multiclass_hinge_backward<T: Scalar>(
    mut d_logits: ArrayViewMut2<T>,
    d_losses: ArrayView1<T>,
    logits: ArrayView2<T>,
    labels: &[usize],
    margin: f32,
) -> Result<()> {
    const OP: &str = "multiclass_hinge";
    let (n, k) = logits.dim();
    check_labels(OP, labels, n, k)?;
    check_dims(OP, "d_losses", d_losses.shape(), &[n])?;
    check_dims(OP, "d_logits", d_logits.shape(), &[n, k])?;
    let margin = T::of_f32(margin);
    for i in 0..n {
        let y = labels[i];
        let xy = logits[[i, y]];
        for j in (0..k).filter(|&j| j != y) {
            if logits[[i, j]] - xy + margin > T::zero() {
                d_logits[[i, j]] += d_losses[i];
                d_logits[[i, y]] -= d_losses[i];
            }
        }
    }
    Ok(())
}
