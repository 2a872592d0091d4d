//! Finite-difference gradient checking (in `f64`), used by the reference tests and available to
//! the JIT tests.
//!
//! [`numerical_grad`] uses central differences, `(f(x + h e_i) - f(x - h e_i)) / 2h`, whose
//! truncation error is `O(h^2)`; with `h = 1e-5` in `f64` the total error (truncation plus
//! rounding `~ eps |f| / h`) is around `1e-10` relative, far below the `1e-6` tolerance the tests
//! use. [`rel_error`] compares two gradients norm-wise, so a component that is legitimately
//! near zero does not blow the ratio up.

use ndarray::{ArrayD, ArrayViewD, IxDyn, Zip};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A tensor of dimensions `dims` with values uniform in `[-1, 1)`, reproducible from `seed`.
pub fn random_tensor(dims: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(dims), || rng.random_range(-1.0..1.0))
}

/// Like [`random_tensor`] but every value has magnitude in `[min_abs, 1)`: inputs for functions
/// with a kink at 0 (relu, leaky relu, elu), so a finite-difference step never crosses it.
pub fn random_tensor_away_from_zero(dims: &[usize], seed: u64, min_abs: f64) -> ArrayD<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(dims), || {
        let m = rng.random_range(min_abs..1.0);
        if rng.random_bool(0.5) {
            m
        } else {
            -m
        }
    })
}

/// The numerical gradient of scalar `f` at `x` by central differences with step `h`: component
/// `i` is `(f(x + h e_i) - f(x - h e_i)) / (2h)`. `f` is called `2 * x.len()` times with a
/// perturbed copy of `x`.
pub fn numerical_grad(x: ArrayViewD<f64>, h: f64, mut f: impl FnMut(&ArrayD<f64>) -> f64) -> ArrayD<f64> {
    let mut xp = x.to_owned();
    let mut g = ArrayD::zeros(x.raw_dim());
    let idx: Vec<_> = x.indexed_iter().map(|(i, _)| i).collect();
    for i in idx {
        let orig = xp[&i];
        xp[&i] = orig + h;
        let fp = f(&xp);
        xp[&i] = orig - h;
        let fm = f(&xp);
        xp[&i] = orig;
        g[&i] = (fp - fm) / (2.0 * h);
    }
    g
}

/// Norm-wise relative error `max_i |a_i - b_i| / max(max_i |a_i|, max_i |b_i|)` (0 when both are
/// all zero; infinite when the shapes differ or a value is not finite).
pub fn rel_error(a: ArrayViewD<f64>, b: ArrayViewD<f64>) -> f64 {
    if a.shape() != b.shape() {
        return f64::INFINITY;
    }
    let mut diff = 0.0f64;
    let mut scale = 0.0f64;
    let mut finite = true;
    Zip::from(&a).and(&b).for_each(|&x, &y| {
        finite &= x.is_finite() && y.is_finite();
        diff = diff.max((x - y).abs());
        scale = scale.max(x.abs()).max(y.abs());
    });
    if !finite {
        f64::INFINITY
    } else if scale == 0.0 {
        0.0
    } else {
        diff / scale
    }
}
