//! Elementwise activations on tensors of any shape.
//!
//! | activation   | `y = f(x)`                           | `f'(x)`                              |
//! |--------------|--------------------------------------|--------------------------------------|
//! | relu         | `max(x, 0)`                          | `1` if `x > 0` else `0`              |
//! | leaky relu   | `x` if `x > 0` else `slope * x`      | `1` if `x > 0` else `slope`          |
//! | elu          | `x` if `x > 0` else `a (e^x - 1)`    | `1` if `x > 0` else `a e^x`          |
//! | sigmoid      | `1 / (1 + e^-x)`                     | `y (1 - y)`                          |
//! | tanh         | `tanh x`                             | `1 - y^2`                            |
//!
//! At the kink `x = 0` the derivative from the left is used (PyTorch's choice for relu).

use super::{check_dims, Result, Scalar};
use cnnc_compiler::ir::Activation;
use ndarray::{ArrayViewD, ArrayViewMutD, Zip};

const OP: &str = "activation";

fn f<T: Scalar>(act: &Activation, x: T) -> T {
    let zero = T::zero();
    match *act {
        Activation::Relu => x.max(zero),
        Activation::LeakyRelu { slope } => {
            if x > zero {
                x
            } else {
                T::of_f32(slope) * x
            }
        }
        Activation::Elu { alpha } => {
            if x > zero {
                x
            } else {
                T::of_f32(alpha) * (x.exp() - T::one())
            }
        }
        Activation::Sigmoid => sigmoid(x),
        Activation::Tanh => x.tanh(),
    }
}

/// A numerically stable logistic function (never evaluates `exp` of a large positive number).
fn sigmoid<T: Scalar>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

fn df<T: Scalar>(act: &Activation, x: T) -> T {
    let (zero, one) = (T::zero(), T::one());
    match *act {
        Activation::Relu => {
            if x > zero {
                one
            } else {
                zero
            }
        }
        Activation::LeakyRelu { slope } => {
            if x > zero {
                one
            } else {
                T::of_f32(slope)
            }
        }
        Activation::Elu { alpha } => {
            if x > zero {
                one
            } else {
                T::of_f32(alpha) * x.exp()
            }
        }
        Activation::Sigmoid => {
            let y = sigmoid(x);
            y * (one - y)
        }
        Activation::Tanh => {
            let y = x.tanh();
            one - y * y
        }
    }
}

/// `out = f(x)` elementwise (table in the module header). `out` is overwritten.
pub fn act_forward<T: Scalar>(mut out: ArrayViewMutD<T>, x: ArrayViewD<T>, act: &Activation) -> Result<()> {
    check_dims(OP, "out", out.shape(), x.shape())?;
    Zip::from(&mut out).and(&x).for_each(|o, &v| *o = f(act, v));
    Ok(())
}

/// `d_x += f'(x) * d_out` elementwise (table in the module header).
pub fn act_backward<T: Scalar>(
    mut d_x: ArrayViewMutD<T>,
    d_out: ArrayViewD<T>,
    x: ArrayViewD<T>,
    act: &Activation,
) -> Result<()> {
    check_dims(OP, "d_out", d_out.shape(), x.shape())?;
    check_dims(OP, "d_x", d_x.shape(), x.shape())?;
    Zip::from(&mut d_x).and(&d_out).and(&x).for_each(|d, &dy, &v| *d += df(act, v) * dy);
    Ok(())
}
