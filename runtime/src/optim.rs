//! Optimisers as pure update functions built from a config, with PyTorch-identical formulas,
//! per-tensor learning-rate multipliers and learning-rate schedules.
//!
//! [`OptimizerConfig::step`] updates one parameter tensor in place from its gradient and its
//! [`State`] (moment buffers); `t` is the 1-based step number and `lr` the learning rate for
//! this step (from a [`Schedule`], times a per-tensor multiplier). The formulas follow
//! `torch.optim` (PyTorch 2.x, single-tensor path, `maximize=False`, `dampening=0`,
//! `amsgrad=False`); with `g = grad + weight_decay * p` (L2 penalty folded into the gradient):
//!
//! - **SGD**: `b = mu * b + g` (on step 1, `b = g`); the update direction is
//!   `d = g + mu * b` with Nesterov, else `d = b` (with `mu = 0`, `d = g`); `p -= lr * d`.
//! - **RMSprop**: `v = alpha * v + (1 - alpha) * g^2`; centred: `a = alpha * a + (1 - alpha) * g`,
//!   `den = sqrt(v - a^2) + eps`, else `den = sqrt(v) + eps`; with momentum
//!   `b = mu * b + g / den`, `p -= lr * b`, else `p -= lr * g / den`.
//! - **Adam**: `m = b1 * m + (1 - b1) * g`, `v = b2 * v + (1 - b2) * g^2`,
//!   `p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//!   **AdamW** (`decoupled_weight_decay`): the gradient is *not* penalised; instead
//!   `p *= 1 - lr * weight_decay` before the Adam update.
//!
//! Results match PyTorch up to `f32` rounding: coefficients such as `1 - beta2` and the bias
//! corrections are computed in `f64` from the decimal value of the `f32` hyper-parameter (as
//! Python would hold it) and rounded once, like PyTorch's scalar arguments.
//!
//! [`Optimizer`] keeps one state per named tensor, the step counter and the per-tensor
//! learning-rate multipliers ([`LrMultipliers`], e.g. a small rate for a pretrained backbone
//! and 0 to freeze it) for a whole model.
//!
//! ## Two implementations of the same update
//! [`OptimizerConfig::step`] is plain Rust, the oracle. [`Optimizer`] by default
//! ([`UpdateBackend::Auto`]) runs JIT-compiled kernels instead
//! (`cnnc_compiler::lower::optim`: one Cranelift kernel per rule, one fused `f32x4` pass over
//! parameter, gradient and state), fed with the very same coefficients
//! ([`OptimizerConfig::scalars`]) and doing the same operations in the same order, so both
//! give bit-identical weights (tested in `runtime/tests/optim_jit.rs`). `Auto` keeps the Rust
//! loop for plain SGD without momentum, which is memory-bound and where the kernel does not
//! win (`cargo bench --bench optim`); it also falls back to Rust if the host cannot JIT.

use cnnc_compiler::lower::optim::{UpdateKernel, UpdateRule};
use std::collections::BTreeMap;

/// An invalid optimiser or schedule configuration, or a call that does not fit the state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct OptimError(pub String);

/// Values per piece of a compiled update run on its own (on all threads, a large tensor's
/// update being memory-bound): 64Ki values, 256 KiB per buffer.
const UPDATE_PIECE: usize = 1 << 16;

fn err<T>(msg: String) -> Result<T, OptimError> {
    Err(OptimError(msg))
}

/// The `f64` the user meant by an `f32` hyper-parameter: its shortest decimal form parsed as
/// `f64` (`0.999f32` -> `0.999`), as Python holds it. Used for `1 - beta` style coefficients,
/// which PyTorch computes in double precision before rounding to `f32`.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// `(beta, 1 - beta)` rounded to `f32` the way PyTorch does.
fn decay_pair(beta: f32) -> (f32, f32) {
    let b = decimal(beta);
    (b as f32, (1.0 - b) as f32)
}

/// Which optimiser, and its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerConfig {
    /// Stochastic gradient descent (`torch.optim.SGD`, dampening 0).
    Sgd {
        /// Base learning rate.
        lr: f32,
        /// Momentum factor `mu` (0 = plain SGD).
        momentum: f32,
        /// Nesterov momentum (needs `momentum > 0`).
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// RMSprop (`torch.optim.RMSprop`).
    RmsProp {
        /// Base learning rate (PyTorch default 0.01).
        lr: f32,
        /// Smoothing constant of the squared-gradient average (default 0.99).
        alpha: f32,
        /// Added to the denominator (default 1e-8).
        eps: f32,
        /// Momentum factor (0 = none).
        momentum: f32,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
        /// Normalise by the estimated variance instead of the raw second moment.
        centered: bool,
    },
    /// Adam, or AdamW with `decoupled_weight_decay` (`torch.optim.Adam` / `AdamW`).
    Adam {
        /// Base learning rate (default 1e-3).
        lr: f32,
        /// First-moment decay (default 0.9).
        beta1: f32,
        /// Second-moment decay (default 0.999).
        beta2: f32,
        /// Added to the denominator (default 1e-8).
        eps: f32,
        /// Weight decay: L2 in the gradient (Adam) or decoupled (AdamW).
        weight_decay: f32,
        /// AdamW: decay the weights directly, `p *= 1 - lr * weight_decay`.
        decoupled_weight_decay: bool,
    },
}

impl OptimizerConfig {
    /// Plain SGD.
    pub fn sgd(lr: f32) -> Self {
        OptimizerConfig::Sgd { lr, momentum: 0.0, nesterov: false, weight_decay: 0.0 }
    }

    /// SGD with (optionally Nesterov) momentum.
    pub fn sgd_momentum(lr: f32, momentum: f32, nesterov: bool) -> Self {
        OptimizerConfig::Sgd { lr, momentum, nesterov, weight_decay: 0.0 }
    }

    /// RMSprop with PyTorch's defaults (alpha 0.99, eps 1e-8, no momentum).
    pub fn rmsprop(lr: f32) -> Self {
        OptimizerConfig::RmsProp { lr, alpha: 0.99, eps: 1e-8, momentum: 0.0, weight_decay: 0.0, centered: false }
    }

    /// Adam with PyTorch's defaults (0.9, 0.999, 1e-8).
    pub fn adam(lr: f32) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
        }
    }

    /// AdamW: Adam with decoupled weight decay (PyTorch's default decay is 0.01).
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decoupled_weight_decay: true,
        }
    }

    /// Returns a copy with this weight decay.
    pub fn with_weight_decay(mut self, wd: f32) -> Self {
        match &mut self {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::RmsProp { weight_decay, .. }
            | OptimizerConfig::Adam { weight_decay, .. } => *weight_decay = wd,
        }
        self
    }

    /// The PyTorch class name: `SGD`, `RMSprop`, `Adam` or `AdamW`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "SGD",
            OptimizerConfig::RmsProp { .. } => "RMSprop",
            OptimizerConfig::Adam { decoupled_weight_decay: false, .. } => "Adam",
            OptimizerConfig::Adam { decoupled_weight_decay: true, .. } => "AdamW",
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            OptimizerConfig::Sgd { lr, .. }
            | OptimizerConfig::RmsProp { lr, .. }
            | OptimizerConfig::Adam { lr, .. } => *lr,
        }
    }

    /// Checks the hyper-parameters (the same constraints PyTorch enforces).
    pub fn validate(&self) -> Result<(), OptimError> {
        let nonneg = |name: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                err(format!("{}: {name} must be finite and >= 0, got {v}", self.name()))
            }
        };
        let unit = |name: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                err(format!("{}: {name} must be in [0, 1), got {v}", self.name()))
            }
        };
        match *self {
            OptimizerConfig::Sgd { lr, momentum, nesterov, weight_decay } => {
                nonneg("lr", lr)?;
                nonneg("momentum", momentum)?;
                nonneg("weight_decay", weight_decay)?;
                if nesterov && momentum <= 0.0 {
                    return err("SGD: Nesterov momentum requires momentum > 0".into());
                }
            }
            OptimizerConfig::RmsProp { lr, alpha, eps, momentum, weight_decay, .. } => {
                nonneg("lr", lr)?;
                nonneg("alpha", alpha)?;
                if alpha > 1.0 {
                    return err(format!("RMSprop: alpha must be <= 1, got {alpha}"));
                }
                nonneg("eps", eps)?;
                nonneg("momentum", momentum)?;
                nonneg("weight_decay", weight_decay)?;
            }
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, .. } => {
                nonneg("lr", lr)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                nonneg("eps", eps)?;
                nonneg("weight_decay", weight_decay)?;
            }
        }
        Ok(())
    }

    /// Names of the state buffers this optimiser uses (PyTorch's state keys).
    pub fn buffer_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::Sgd { momentum, .. } if *momentum > 0.0 => &["momentum_buffer"],
            OptimizerConfig::Sgd { .. } => &[],
            OptimizerConfig::RmsProp { momentum, centered, .. } => match (*momentum > 0.0, *centered) {
                (false, false) => &["square_avg"],
                (true, false) => &["square_avg", "momentum_buffer"],
                (false, true) => &["square_avg", "grad_avg"],
                (true, true) => &["square_avg", "momentum_buffer", "grad_avg"],
            },
            OptimizerConfig::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    /// A zeroed state for a tensor of `n` values.
    pub fn new_state(&self, n: usize) -> State {
        State {
            buffers: self.buffer_names().iter().map(|b| (b.to_string(), vec![0.0; n])).collect(),
        }
    }

    /// The shape of this optimiser's update at step `t` for the JIT kernels (SGD with momentum
    /// has a separate first-step kernel).
    pub fn update_rule(&self, t: u64) -> UpdateRule {
        match *self {
            OptimizerConfig::Sgd { momentum, nesterov, .. } => {
                UpdateRule::Sgd { momentum: momentum > 0.0, nesterov, first_step: momentum > 0.0 && t == 1 }
            }
            OptimizerConfig::RmsProp { momentum, centered, .. } => UpdateRule::RmsProp { momentum: momentum > 0.0, centered },
            OptimizerConfig::Adam { decoupled_weight_decay, .. } => UpdateRule::Adam { decoupled: decoupled_weight_decay },
        }
    }

    /// The `f32` coefficients of step `t` (1-based) at learning rate `lr`, in the layout of
    /// `cnnc_compiler::lower::optim` (SGD: `lr, wd, mu`; RMSprop: `lr, wd, alpha, 1 - alpha,
    /// eps, mu`; Adam: `wd, beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1^t),
    /// sqrt(1 - beta2^t), 1 - lr * wd`). [`step`](Self::step) uses exactly these values.
    pub fn scalars(&self, t: u64, lr: f32) -> Vec<f32> {
        match *self {
            OptimizerConfig::Sgd { momentum, weight_decay, .. } => vec![lr, weight_decay, momentum],
            OptimizerConfig::RmsProp { alpha, eps, momentum, weight_decay, .. } => {
                let (alpha, one_m_alpha) = decay_pair(alpha);
                vec![lr, weight_decay, alpha, one_m_alpha, eps, momentum]
            }
            OptimizerConfig::Adam { beta1, beta2, eps, weight_decay, .. } => {
                let ti = i32::try_from(t).unwrap_or(i32::MAX);
                let bc1 = 1.0 - decimal(beta1).powi(ti);
                let bc2_sqrt = (1.0 - decimal(beta2).powi(ti)).sqrt();
                let (beta1, one_m_b1) = decay_pair(beta1);
                let (beta2, one_m_b2) = decay_pair(beta2);
                let step_size = (lr as f64 / bc1) as f32;
                vec![weight_decay, beta1, one_m_b1, beta2, one_m_b2, eps, step_size, bc2_sqrt as f32, 1.0 - lr * weight_decay]
            }
        }
    }

    /// The checks shared by both implementations: sizes, step number, learning rate, config,
    /// and the state's buffers (an empty state is initialised).
    fn prepare(&self, param: &[f32], grad: &[f32], state: &mut State, t: u64, lr: f32) -> Result<(), OptimError> {
        let n = param.len();
        if grad.len() != n {
            return err(format!("{}: parameter has {n} values but gradient has {}", self.name(), grad.len()));
        }
        if t == 0 {
            return err(format!("{}: step numbers start at 1", self.name()));
        }
        if !(lr.is_finite() && lr >= 0.0) {
            return err(format!("{}: learning rate must be finite and >= 0, got {lr}", self.name()));
        }
        self.validate()?;
        if state.buffers.is_empty() && !self.buffer_names().is_empty() {
            *state = self.new_state(n);
        }
        let names = self.buffer_names();
        if state.buffers.len() != names.len()
            || state.buffers.iter().zip(names).any(|((bn, b), want)| bn != want || b.len() != n)
        {
            return err(format!(
                "{}: state has buffers {:?} but a tensor of {n} values needs {names:?}",
                self.name(),
                state.buffers.iter().map(|(k, b)| format!("{k}[{}]", b.len())).collect::<Vec<_>>()
            ));
        }
        Ok(())
    }

    /// [`step`](Self::step) with a compiled kernel for [`update_rule(t)`](Self::update_rule):
    /// the same checks, the same coefficients, bit-identical results. A tensor of more than
    /// 64Ki values is updated in pieces at once on the current rayon pool.
    pub fn step_jit(&self, kernel: &UpdateKernel, param: &mut [f32], grad: &[f32], state: &mut State, t: u64, lr: f32) -> Result<(), OptimError> {
        self.prepare(param, grad, state, t, lr)?;
        if kernel.rule() != self.update_rule(t) {
            return err(format!("{}: kernel for {} used for {}", self.name(), kernel.rule().name(), self.update_rule(t).name()));
        }
        let scalars = self.scalars(t, lr);
        let k = kernel.rule().state_buffers();
        let fail = |e: cnnc_compiler::Error| OptimError(format!("{}: {e}", self.name()));
        // Every value's update reads and writes only that value's own slots, so pieces run
        // at once give the same bits as one call over the whole tensor.
        let mut states = state.buffers.iter_mut().map(|(_, b)| b.chunks_mut(UPDATE_PIECE));
        let mut pieces: [_; 3] = std::array::from_fn(|_| states.next());
        let jobs: Vec<_> = param
            .chunks_mut(UPDATE_PIECE)
            .zip(grad.chunks(UPDATE_PIECE))
            .map(|(p, g)| {
                let bufs: [&mut [f32]; 3] = std::array::from_fn(|i| pieces[i].as_mut().and_then(Iterator::next).unwrap_or(&mut []));
                (p, g, bufs)
            })
            .collect();
        let run = |(p, g, mut bufs): (&mut [f32], &[f32], [&mut [f32]; 3])| kernel.run(&scalars, p, g, &mut bufs[..k]);
        if jobs.len() > 1 {
            use rayon::prelude::*;
            jobs.into_par_iter().try_for_each(run).map_err(fail)
        } else {
            jobs.into_iter().try_for_each(run).map_err(fail)
        }
    }

    /// Updates `param` in place from `grad` at step `t` (1-based) with learning rate `lr`.
    /// `state` must come from [`new_state`](Self::new_state) for this config and size (an
    /// empty `State::default()` is initialised here).
    pub fn step(&self, param: &mut [f32], grad: &[f32], state: &mut State, t: u64, lr: f32) -> Result<(), OptimError> {
        self.prepare(param, grad, state, t, lr)?;
        let n = param.len();
        let bufs = &mut state.buffers;
        let sc = self.scalars(t, lr);
        match *self {
            OptimizerConfig::Sgd { momentum: mu, nesterov, weight_decay: wd, .. } => {
                if mu > 0.0 {
                    let b = &mut bufs[0].1;
                    for i in 0..n {
                        let g = grad[i] + wd * param[i];
                        b[i] = if t == 1 { g } else { mu * b[i] + g };
                        let d = if nesterov { g + mu * b[i] } else { b[i] };
                        param[i] -= lr * d;
                    }
                } else {
                    for i in 0..n {
                        let g = grad[i] + wd * param[i];
                        param[i] -= lr * g;
                    }
                }
            }
            OptimizerConfig::RmsProp { eps, momentum: mu, weight_decay: wd, centered, .. } => {
                let (alpha, one_m_alpha) = (sc[2], sc[3]);
                let (sq, rest) = bufs.split_at_mut(1);
                let sq = &mut sq[0].1;
                let mut it = rest.iter_mut();
                let mut mom = if mu > 0.0 { it.next().map(|b| &mut b.1) } else { None };
                let mut gavg = if centered { it.next().map(|b| &mut b.1) } else { None };
                for i in 0..n {
                    let g = grad[i] + wd * param[i];
                    sq[i] = alpha * sq[i] + one_m_alpha * g * g;
                    let den = match gavg.as_deref_mut() {
                        Some(a) => {
                            a[i] = alpha * a[i] + one_m_alpha * g;
                            (sq[i] - a[i] * a[i]).max(0.0).sqrt() + eps
                        }
                        None => sq[i].sqrt() + eps,
                    };
                    match mom.as_deref_mut() {
                        Some(b) => {
                            b[i] = mu * b[i] + g / den;
                            param[i] -= lr * b[i];
                        }
                        None => param[i] -= lr * g / den,
                    }
                }
            }
            OptimizerConfig::Adam { eps, weight_decay: wd, decoupled_weight_decay, .. } => {
                let (m, v) = bufs.split_at_mut(1);
                let (m, v) = (&mut m[0].1, &mut v[0].1);
                let (beta1, one_m_b1, beta2, one_m_b2) = (sc[1], sc[2], sc[3], sc[4]);
                let (step_size, bc2_sqrt, decay) = (sc[6], sc[7], sc[8]);
                for i in 0..n {
                    let g = if decoupled_weight_decay {
                        param[i] *= decay;
                        grad[i]
                    } else {
                        grad[i] + wd * param[i]
                    };
                    m[i] = beta1 * m[i] + one_m_b1 * g;
                    v[i] = beta2 * v[i] + one_m_b2 * g * g;
                    let den = v[i].sqrt() / bc2_sqrt + eps;
                    param[i] -= step_size * m[i] / den;
                }
            }
        }
        Ok(())
    }
}

/// The optimiser state of one parameter tensor: named buffers of the tensor's size
/// (PyTorch's state keys: `momentum_buffer`, `square_avg`, `grad_avg`, `exp_avg`, `exp_avg_sq`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    /// `(name, values)` in [`OptimizerConfig::buffer_names`] order.
    pub buffers: Vec<(String, Vec<f32>)>,
}

impl State {
    /// The buffer called `name`.
    pub fn buffer(&self, name: &str) -> Option<&[f32]> {
        self.buffers.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice())
    }
}

/// Per-tensor learning-rate multipliers by name prefix (longest matching prefix wins,
/// default 1). A multiplier of 0 freezes the tensor: [`Optimizer::update`] leaves it and its
/// state untouched (no weight decay either).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LrMultipliers {
    rules: Vec<(String, f32)>,
}

impl LrMultipliers {
    /// No rules: every tensor gets multiplier 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tensors whose name starts with `prefix` get `multiplier` (finite, >= 0).
    pub fn set(mut self, prefix: &str, multiplier: f32) -> Result<Self, OptimError> {
        if !(multiplier.is_finite() && multiplier >= 0.0) {
            return err(format!("learning-rate multiplier for '{prefix}' must be finite and >= 0, got {multiplier}"));
        }
        self.rules.retain(|(p, _)| p != prefix);
        self.rules.push((prefix.to_string(), multiplier));
        Ok(self)
    }

    /// The multiplier of tensor `name`.
    pub fn get(&self, name: &str) -> f32 {
        self.rules
            .iter()
            .filter(|(p, _)| name.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map_or(1.0, |(_, m)| *m)
    }
}

/// Which implementation [`Optimizer::update`] runs. Both give bit-identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdateBackend {
    /// JIT kernels where they are faster (every rule but plain SGD without momentum), Rust
    /// elsewhere or when the host cannot JIT.
    #[default]
    Auto,
    /// Always the Rust reference loops ([`OptimizerConfig::step`]).
    Reference,
    /// Always the JIT kernels ([`OptimizerConfig::step_jit`]); an error if they cannot be built.
    Jit,
}

/// The compiled kernels of an [`Optimizer`]: one per [`UpdateRule`] its config can need.
/// They are a pure function of the config, so they take no part in equality.
#[derive(Debug, Clone, Default)]
struct Kernels(Vec<UpdateKernel>);

impl PartialEq for Kernels {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Kernels {
    fn build(config: &OptimizerConfig, backend: UpdateBackend) -> Result<Kernels, OptimError> {
        let rules = match config.update_rule(2) {
            UpdateRule::Sgd { momentum: false, .. } if backend == UpdateBackend::Auto => return Ok(Kernels::default()),
            r @ UpdateRule::Sgd { momentum: true, .. } => vec![config.update_rule(1), r],
            r => vec![r],
        };
        match (backend, UpdateKernel::compile(&rules)) {
            (UpdateBackend::Reference, _) => Ok(Kernels::default()),
            (_, Ok(k)) => Ok(Kernels(k)),
            (UpdateBackend::Auto, Err(_)) => Ok(Kernels::default()),
            (UpdateBackend::Jit, Err(e)) => err(format!("{}: cannot JIT-compile the update: {e}", config.name())),
        }
    }

    fn for_rule(&self, rule: UpdateRule) -> Option<&UpdateKernel> {
        self.0.iter().find(|k| k.rule() == rule)
    }
}

/// A whole-model optimiser: the config, the step counter, per-tensor multipliers and one
/// [`State`] per named tensor. Per training step: [`begin_step`](Self::begin_step), then
/// [`update`](Self::update) for each parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    config: OptimizerConfig,
    multipliers: LrMultipliers,
    states: BTreeMap<String, State>,
    t: u64,
    kernels: Kernels,
}

impl Optimizer {
    /// A fresh optimiser (step 0, empty states) with [`UpdateBackend::Auto`].
    pub fn new(config: OptimizerConfig) -> Result<Self, OptimError> {
        Self::with_backend(config, UpdateBackend::Auto)
    }

    /// A fresh optimiser running its updates on `backend`.
    pub fn with_backend(config: OptimizerConfig, backend: UpdateBackend) -> Result<Self, OptimError> {
        config.validate()?;
        let kernels = if backend == UpdateBackend::Reference { Kernels::default() } else { Kernels::build(&config, backend)? };
        Ok(Optimizer { config, multipliers: LrMultipliers::new(), states: BTreeMap::new(), t: 0, kernels })
    }

    /// `"jit"` when the updates run compiled kernels, `"reference"` when they run Rust loops.
    pub fn backend_in_use(&self) -> &'static str {
        if self.kernels.0.is_empty() {
            "reference"
        } else {
            "jit"
        }
    }

    /// Sets the per-tensor learning-rate multipliers.
    pub fn with_multipliers(mut self, multipliers: LrMultipliers) -> Self {
        self.multipliers = multipliers;
        self
    }

    /// The config.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Steps taken so far (the `t` of the last step).
    pub fn step_count(&self) -> u64 {
        self.t
    }

    /// Starts a new step (increments `t`).
    pub fn begin_step(&mut self) {
        self.t += 1;
    }

    /// Updates tensor `name` with learning rate `lr * multiplier(name)` at the current step.
    pub fn update(&mut self, name: &str, param: &mut [f32], grad: &[f32], lr: f32) -> Result<(), OptimError> {
        if self.t == 0 {
            return err("Optimizer::update called before begin_step".into());
        }
        let mult = self.multipliers.get(name);
        if mult == 0.0 {
            return Ok(());
        }
        let state = self
            .states
            .entry(name.to_string())
            .or_insert_with(|| self.config.new_state(param.len()));
        let result = match self.kernels.for_rule(self.config.update_rule(self.t)) {
            Some(k) => self.config.step_jit(k, param, grad, state, self.t, lr * mult),
            None => self.config.step(param, grad, state, self.t, lr * mult),
        };
        result.map_err(|e| OptimError(format!("tensor {name}: {e}")))
    }

    /// The state of tensor `name` (after its first update).
    pub fn state(&self, name: &str) -> Option<&State> {
        self.states.get(name)
    }

    /// Every state buffer as a named 1-D tensor `"{tensor}.{buffer}"`, for checkpoints
    /// (the step count is [`step_count`](Self::step_count), to be saved alongside).
    pub fn export_state(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut v = Vec::new();
        for (name, st) in &self.states {
            for (b, data) in &st.buffers {
                v.push((format!("{name}.{b}"), vec![data.len()], data.clone()));
            }
        }
        v
    }

    /// Restores what [`export_state`](Self::export_state) produced, plus the step count.
    /// `tensors` maps each model tensor name to its size; every expected buffer must be
    /// present with that size, and nothing else.
    pub fn import_state(
        &mut self,
        exported: &[(String, Vec<usize>, Vec<f32>)],
        tensors: &[(String, usize)],
        step_count: u64,
    ) -> Result<(), OptimError> {
        let mut by_name: BTreeMap<&str, &Vec<f32>> = BTreeMap::new();
        for (k, _, d) in exported {
            by_name.insert(k.as_str(), d);
        }
        let mut states = BTreeMap::new();
        let mut used = 0;
        for (name, n) in tensors {
            let mut st = State::default();
            let mut found = 0;
            for b in self.config.buffer_names() {
                let key = format!("{name}.{b}");
                if let Some(d) = by_name.get(key.as_str()) {
                    if d.len() != *n {
                        return err(format!("optimizer state {key} has {} values but the tensor has {n}", d.len()));
                    }
                    st.buffers.push((b.to_string(), (*d).clone()));
                    found += 1;
                }
            }
            if found == 0 {
                continue; // never updated (e.g. frozen)
            }
            if found != self.config.buffer_names().len() {
                return err(format!(
                    "optimizer state of {name} is incomplete: {} needs {:?}",
                    self.config.name(),
                    self.config.buffer_names()
                ));
            }
            used += found;
            states.insert(name.clone(), st);
        }
        if used != exported.len() {
            let unknown: Vec<&str> = by_name
                .keys()
                .filter(|k| !tensors.iter().any(|(n, _)| self.config.buffer_names().iter().any(|b| **k == format!("{n}.{b}"))))
                .copied()
                .collect();
            return err(format!("optimizer state has entries for no known tensor: {unknown:?}"));
        }
        self.states = states;
        self.t = step_count;
        Ok(())
    }
}

/// How the learning rate decays after the warm-up.
#[derive(Debug, Clone, PartialEq)]
pub enum Decay {
    /// Constant.
    Constant,
    /// `base * gamma^floor(t / every)` (`torch.optim.lr_scheduler.StepLR`).
    Step {
        /// Factor applied every `every` units.
        gamma: f32,
        /// Period (> 0).
        every: u64,
    },
    /// `min + (base - min) * (1 + cos(pi * t / total)) / 2` for `t <= total`, then `min`
    /// (`CosineAnnealingLR`'s closed form, held at the minimum after `total`).
    Cosine {
        /// Units to anneal over (> 0).
        total: u64,
        /// Final learning rate.
        min_lr: f32,
    },
}

/// A learning-rate schedule over a unit of the caller's choice (epochs or steps): an
/// optional linear warm-up, then a [`Decay`].
///
/// Warm-up of `W` units: `lr(t) = base * (t + 1) / W` for `t < W` (so the first unit already
/// trains and unit `W - 1` reaches `base`); afterwards the decay runs on `t - W`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub base_lr: f32,
    /// Decay after the warm-up.
    pub decay: Decay,
    /// Warm-up length in units (0 = none).
    pub warmup: u64,
}

impl Schedule {
    /// A constant rate.
    pub fn constant(lr: f32) -> Self {
        Schedule { base_lr: lr, decay: Decay::Constant, warmup: 0 }
    }

    /// Step decay by `gamma` every `every` units.
    pub fn step(lr: f32, gamma: f32, every: u64) -> Self {
        Schedule { base_lr: lr, decay: Decay::Step { gamma, every }, warmup: 0 }
    }

    /// Cosine annealing from `lr` to `min_lr` over `total` units.
    pub fn cosine(lr: f32, total: u64, min_lr: f32) -> Self {
        Schedule { base_lr: lr, decay: Decay::Cosine { total, min_lr }, warmup: 0 }
    }

    /// Adds a linear warm-up of `units`.
    pub fn with_warmup(mut self, units: u64) -> Self {
        self.warmup = units;
        self
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), OptimError> {
        if !(self.base_lr.is_finite() && self.base_lr >= 0.0) {
            return err(format!("schedule base lr must be finite and >= 0, got {}", self.base_lr));
        }
        match self.decay {
            Decay::Constant => {}
            Decay::Step { gamma, every } => {
                if every == 0 || !(gamma.is_finite() && gamma >= 0.0) {
                    return err(format!("step schedule needs every > 0 and gamma >= 0, got every {every}, gamma {gamma}"));
                }
            }
            Decay::Cosine { total, min_lr } => {
                if total == 0 || !(min_lr.is_finite() && min_lr >= 0.0) {
                    return err(format!("cosine schedule needs total > 0 and min_lr >= 0, got total {total}, min_lr {min_lr}"));
                }
            }
        }
        Ok(())
    }

    /// The learning rate at unit `t` (0-based).
    pub fn lr_at(&self, t: u64) -> f32 {
        let base = self.base_lr as f64;
        if t < self.warmup {
            return (base * (t + 1) as f64 / self.warmup as f64) as f32;
        }
        let t = t - self.warmup;
        let lr = match self.decay {
            Decay::Constant => base,
            Decay::Step { gamma, every } => {
                let k = (t / every.max(1)).min(i32::MAX as u64) as i32;
                base * (gamma as f64).powi(k)
            }
            Decay::Cosine { total, min_lr } => {
                let min = min_lr as f64;
                if t >= total {
                    min
                } else {
                    min + (base - min) * (1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos()) / 2.0
                }
            }
        };
        lr as f32
    }
}
