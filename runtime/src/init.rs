//! Weight initialisers: Xavier/Glorot and He/Kaiming (uniform and normal), constants, and
//! PyTorch's defaults, all seeded and reproducible.
//!
//! # Fans
//!
//! As PyTorch's `_calculate_fan_in_and_fan_out`: for a weight of shape `[out, in, kh, kw]`
//! (conv; `in` is already divided by the groups) or `[out, in]` (dense),
//! `fan_in = in * kh * kw` and `fan_out = out * kh * kw`. A bias uses its layer's weight fans.
//!
//! # Formulas (`U(-b, b)` has standard deviation `b / sqrt(3)`)
//!
//! | init                          | distribution                                            |
//! |-------------------------------|---------------------------------------------------------|
//! | `XavierUniform { gain }`      | `U(-b, b)`, `b = gain * sqrt(6 / (fan_in + fan_out))`   |
//! | `XavierNormal { gain }`       | `N(0, s^2)`, `s = gain * sqrt(2 / (fan_in + fan_out))`  |
//! | `KaimingUniform { a, mode }`  | `U(-b, b)`, `b = sqrt(3) * gain / sqrt(fan)`            |
//! | `KaimingNormal { a, mode }`   | `N(0, s^2)`, `s = gain / sqrt(fan)`                     |
//! | `PyTorchBias`                 | `U(-b, b)`, `b = 1 / sqrt(fan_in)`                      |
//!
//! with `gain = sqrt(2 / (1 + a^2))` (leaky-relu gain; `a = 0` is He's relu gain `sqrt(2)`)
//! and `fan` = `fan_in` or `fan_out` by `mode`.
//!
//! PyTorch's default for `Conv2d` and `Linear` weights is `kaiming_uniform_(a = sqrt(5))`:
//! `gain = sqrt(1/3)`, hence `b = 1 / sqrt(fan_in)`; their bias is `PyTorchBias`. Batch-norm
//! layers always start at `gamma = 1`, `beta = 0`, `running_mean = 0`, `running_var = 1`.
//!
//! # Seeding
//!
//! Values are drawn in `f32` from [`rand::rngs::StdRng`] seeded with
//! [`SeedableRng::seed_from_u64`]; [`crate::params::ParamStore::for_graph`] derives one seed per
//! tensor from the model seed and the tensor's name, so a tensor's initial values depend only on
//! `(seed, name, shape, init)`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

/// `sqrt(5)`: the `a` of PyTorch's default `kaiming_uniform_`.
pub const PYTORCH_DEFAULT_A: f32 = 2.236_068;

/// Which fan Kaiming initialisation preserves the variance of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FanMode {
    /// Forward-pass variance (PyTorch's default).
    FanIn,
    /// Backward-pass variance.
    FanOut,
}

/// The fans of one weight tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fans {
    /// Inputs feeding one output: `in/groups * kh * kw` (conv) or `in` (dense).
    pub fan_in: usize,
    /// Outputs fed by one input: `out * kh * kw` (conv) or `out` (dense).
    pub fan_out: usize,
}

impl Fans {
    /// PyTorch's fans for a weight of shape `[out, in, receptive...]`; `None` for fewer than two
    /// dimensions (PyTorch refuses those too).
    pub fn of_weight(shape: &[usize]) -> Option<Fans> {
        if shape.len() < 2 {
            return None;
        }
        let receptive: usize = shape[2..].iter().product();
        Some(Fans { fan_in: shape[1] * receptive, fan_out: shape[0] * receptive })
    }
}

/// An initialiser: how to fill one tensor.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Init {
    /// Every value `v`.
    Constant(f32),
    /// `U(low, high)`.
    Uniform {
        /// Lower bound.
        low: f32,
        /// Upper bound.
        high: f32,
    },
    /// `N(mean, std^2)`.
    Normal {
        /// Mean.
        mean: f32,
        /// Standard deviation.
        std: f32,
    },
    /// Glorot & Bengio (2010), uniform.
    XavierUniform {
        /// Scale factor (1 for linear/tanh layers).
        gain: f32,
    },
    /// Glorot & Bengio (2010), normal.
    XavierNormal {
        /// Scale factor.
        gain: f32,
    },
    /// He et al. (2015), uniform.
    KaimingUniform {
        /// Negative slope of the following leaky relu (0 for relu).
        a: f32,
        /// Which fan to normalise by.
        mode: FanMode,
    },
    /// He et al. (2015), normal.
    KaimingNormal {
        /// Negative slope of the following leaky relu (0 for relu).
        a: f32,
        /// Which fan to normalise by.
        mode: FanMode,
    },
    /// PyTorch's default bias: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` with the weight's `fan_in`.
    PyTorchBias,
}

/// Why a tensor could not be initialised.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot initialise: {0}")]
pub struct InitError(pub String);

impl Init {
    /// PyTorch's default weight initialiser, `kaiming_uniform_(a = sqrt(5))`.
    pub const PYTORCH_WEIGHT: Init = Init::KaimingUniform { a: PYTORCH_DEFAULT_A, mode: FanMode::FanIn };
    /// All zeros.
    pub const ZEROS: Init = Init::Constant(0.0);

    /// He uniform for relu networks (`a = 0`, fan-in).
    pub const fn he_uniform() -> Init {
        Init::KaimingUniform { a: 0.0, mode: FanMode::FanIn }
    }
    /// He normal for relu networks (`a = 0`, fan-in).
    pub const fn he_normal() -> Init {
        Init::KaimingNormal { a: 0.0, mode: FanMode::FanIn }
    }
    /// Xavier uniform with gain 1.
    pub const fn xavier_uniform() -> Init {
        Init::XavierUniform { gain: 1.0 }
    }
    /// Xavier normal with gain 1.
    pub const fn xavier_normal() -> Init {
        Init::XavierNormal { gain: 1.0 }
    }

    /// The distribution's mean and standard deviation for a tensor with fans `fans`
    /// (the formulas in the module header).
    pub fn moments(&self, fans: Fans) -> Result<(f64, f64), InitError> {
        let fan = |mode: FanMode| -> Result<f64, InitError> {
            let f = match mode {
                FanMode::FanIn => fans.fan_in,
                FanMode::FanOut => fans.fan_out,
            };
            if f == 0 {
                return Err(InitError(format!("{mode:?} is 0")));
            }
            Ok(f as f64)
        };
        let leaky_gain = |a: f32| (2.0 / (1.0 + (a as f64).powi(2))).sqrt();
        let sum = (fans.fan_in + fans.fan_out) as f64;
        if sum == 0.0 && matches!(self, Init::XavierUniform { .. } | Init::XavierNormal { .. }) {
            return Err(InitError("fan_in + fan_out is 0".into()));
        }
        Ok(match *self {
            Init::Constant(v) => (v as f64, 0.0),
            Init::Uniform { low, high } => {
                if low.partial_cmp(&high).is_none_or(|o| o == std::cmp::Ordering::Greater) {
                    return Err(InitError(format!("uniform bounds {low} > {high}")));
                }
                (((low + high) / 2.0) as f64, (high - low) as f64 / 12f64.sqrt())
            }
            Init::Normal { mean, std } => (mean as f64, std as f64),
            Init::XavierUniform { gain } | Init::XavierNormal { gain } => (0.0, gain as f64 * (2.0 / sum).sqrt()),
            Init::KaimingUniform { a, mode } | Init::KaimingNormal { a, mode } => (0.0, leaky_gain(a) / fan(mode)?.sqrt()),
            Init::PyTorchBias => (0.0, 1.0 / fan(FanMode::FanIn)?.sqrt() / 3f64.sqrt()),
        })
    }

    /// Fill `out` with independent draws (the module header's formulas) using `rng`.
    pub fn fill<R: Rng + ?Sized>(&self, out: &mut [f32], fans: Fans, rng: &mut R) -> Result<(), InitError> {
        let (mean, std) = self.moments(fans)?;
        let uniform = |out: &mut [f32], rng: &mut R, low: f64, high: f64| -> Result<(), InitError> {
            if low == high {
                out.fill(low as f32);
                return Ok(());
            }
            let d = Uniform::new(low as f32, high as f32).map_err(|e| InitError(format!("uniform({low}, {high}): {e}")))?;
            out.iter_mut().for_each(|v| *v = d.sample(rng));
            Ok(())
        };
        match *self {
            Init::Constant(v) => out.fill(v),
            Init::Uniform { low, high } => uniform(out, rng, low as f64, high as f64)?,
            Init::XavierUniform { .. } | Init::KaimingUniform { .. } | Init::PyTorchBias => {
                let b = std * 3f64.sqrt();
                uniform(out, rng, -b, b)?
            }
            Init::Normal { .. } | Init::XavierNormal { .. } | Init::KaimingNormal { .. } => {
                let d = Normal::new(mean as f32, std as f32).map_err(|e| InitError(format!("normal({mean}, {std}): {e}")))?;
                out.iter_mut().for_each(|v| *v = d.sample(rng));
            }
        }
        Ok(())
    }
}

/// How [`crate::params::ParamStore::for_graph`] initialises convolution and dense layers
/// (batch norm always starts at `gamma = 1`, `beta = 0`, `running_mean = 0`,
/// `running_var = 1`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InitConfig {
    /// Convolution weights.
    pub conv_weight: Init,
    /// Convolution biases.
    pub conv_bias: Init,
    /// Dense weights.
    pub dense_weight: Init,
    /// Dense biases.
    pub dense_bias: Init,
}

impl InitConfig {
    /// PyTorch's defaults: `kaiming_uniform_(a = sqrt(5))` weights, `U(+-1/sqrt(fan_in))` biases.
    pub const fn pytorch() -> InitConfig {
        InitConfig {
            conv_weight: Init::PYTORCH_WEIGHT,
            conv_bias: Init::PyTorchBias,
            dense_weight: Init::PYTORCH_WEIGHT,
            dense_bias: Init::PyTorchBias,
        }
    }
    /// He normal weights (relu networks), zero biases.
    pub const fn he() -> InitConfig {
        InitConfig { conv_weight: Init::he_normal(), conv_bias: Init::ZEROS, dense_weight: Init::he_normal(), dense_bias: Init::ZEROS }
    }
    /// Xavier uniform weights (tanh/sigmoid networks), zero biases.
    pub const fn xavier() -> InitConfig {
        InitConfig {
            conv_weight: Init::xavier_uniform(),
            conv_bias: Init::ZEROS,
            dense_weight: Init::xavier_uniform(),
            dense_bias: Init::ZEROS,
        }
    }
}

impl Default for InitConfig {
    /// [`InitConfig::pytorch`].
    fn default() -> Self {
        InitConfig::pytorch()
    }
}

/// The RNG for one named tensor: `StdRng::seed_from_u64` of the model seed mixed with a hash
/// (FNV-1a) of the name, so each tensor's values are independent of the other layers.
pub fn tensor_rng(seed: u64, name: &str) -> StdRng {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    StdRng::seed_from_u64(seed ^ h.rotate_left(17))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fans_match_pytorch() {
        assert_eq!(Fans::of_weight(&[64, 3, 7, 5]), Some(Fans { fan_in: 105, fan_out: 64 * 35 }));
        assert_eq!(Fans::of_weight(&[10, 84]), Some(Fans { fan_in: 84, fan_out: 10 }));
        assert_eq!(Fans::of_weight(&[10]), None);
    }

    #[test]
    fn pytorch_default_bound_is_one_over_sqrt_fan_in() {
        let fans = Fans { fan_in: 400, fan_out: 120 };
        let (_, std) = Init::PYTORCH_WEIGHT.moments(fans).unwrap();
        assert!((std * 3f64.sqrt() - 1.0 / 20.0).abs() < 1e-7, "{std}");
        let mut v = vec![0.0f32; 1000];
        Init::PYTORCH_WEIGHT.fill(&mut v, fans, &mut tensor_rng(1, "w")).unwrap();
        assert!(v.iter().all(|x| x.abs() <= 0.05));
        assert!(v.iter().any(|x| x.abs() > 0.045), "draws should reach close to the bound");
    }

    #[test]
    fn zero_fan_is_an_error() {
        let e = Init::he_normal().fill(&mut [0.0], Fans { fan_in: 0, fan_out: 3 }, &mut tensor_rng(0, "x"));
        assert!(e.is_err());
    }
}
