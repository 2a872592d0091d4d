//! JIT-compiled optimiser updates: one Cranelift kernel per update rule, fused over a whole
//! parameter buffer (one pass reading the parameter, its gradient and the optimiser state and
//! writing the new parameter and state), `f32x4` over blocks of four elements plus a scalar
//! tail.
//!
//! The maths is the runtime's reference optimiser (`cnnc_runtime::optim`,
//! PyTorch's `torch.optim` formulas) operation for operation: the same multiplications,
//! additions, divisions and square roots in the same order, no fused multiply-add, so a
//! kernel's result is **bit-identical** to the reference loop's (both are IEEE-754 `f32`
//! with round-to-nearest; `runtime/tests/optim_jit.rs` checks this on odd lengths). The one
//! exception is centred RMSprop with a NaN in its state: the reference's `max(x, 0)` maps NaN
//! to 0, Cranelift's `fmax` keeps the NaN (training has diverged by then either way).
//!
//! Hyper-parameters that change per step (learning rate, Adam's bias corrections) are kernel
//! arguments (`scalars`), so one kernel serves a whole run. Scalar layouts, all `f32`:
//!
//! | rule | scalars |
//! | --- | --- |
//! | [`UpdateRule::Sgd`] | `lr, weight_decay, momentum` |
//! | [`UpdateRule::RmsProp`] | `lr, weight_decay, alpha, 1 - alpha, eps, momentum` |
//! | [`UpdateRule::Adam`] | `weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr * weight_decay` |
//!
//! With `g = grad + weight_decay * p` (AdamW: `g = grad` and `p *= 1 - lr * weight_decay`
//! first), the written buffers are `p` then the state in the runtime's buffer order:
//! SGD `momentum_buffer`; RMSprop `square_avg`, `momentum_buffer` (with momentum), `grad_avg`
//! (centred); Adam `exp_avg`, `exp_avg_sq`.
//!
//! The kernels are elementwise stream kernels ([`Jit::define_stream`]); the only `unsafe`
//! (calling them) is in [`entry`](super::entry), which checks every buffer length first.

use super::entry::{StreamKernel, STREAM_WRITES};
use super::jit::{emit, Jit};
use crate::{Error, Result};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{self, BlockArg, InstBuilder};
use cranelift_frontend::FunctionBuilder;

/// The shape of an update: which rule, with which optional parts (these change the code; the
/// hyper-parameter values do not, they are passed as scalars).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpdateRule {
    /// SGD, with momentum (`b = mu * b + g`, on the first step `b = g`) and Nesterov
    /// (`d = g + mu * b`).
    Sgd {
        /// Keep a momentum buffer.
        momentum: bool,
        /// Nesterov direction (needs `momentum`).
        nesterov: bool,
        /// The first step: the buffer is set to `g` instead of decayed.
        first_step: bool,
    },
    /// RMSprop, optionally with momentum and centred.
    RmsProp {
        /// Keep a momentum buffer.
        momentum: bool,
        /// Subtract the squared running mean of the gradient.
        centered: bool,
    },
    /// Adam (L2 weight decay in the gradient) or AdamW (`decoupled`).
    Adam {
        /// Decay the weights directly (AdamW).
        decoupled: bool,
    },
}

impl UpdateRule {
    /// How many `f32` scalars the kernel reads (see the module header for the layout).
    pub fn scalars(&self) -> usize {
        match self {
            UpdateRule::Sgd { .. } => 3,
            UpdateRule::RmsProp { .. } => 6,
            UpdateRule::Adam { .. } => 9,
        }
    }

    /// How many state buffers (besides the parameter) the kernel updates.
    pub fn state_buffers(&self) -> usize {
        match *self {
            UpdateRule::Sgd { momentum, .. } => momentum as usize,
            UpdateRule::RmsProp { momentum, centered } => 1 + momentum as usize + centered as usize,
            UpdateRule::Adam { .. } => 2,
        }
    }

    /// A short name for messages, e.g. `sgd+nesterov`.
    pub fn name(&self) -> String {
        match *self {
            UpdateRule::Sgd { momentum, nesterov, first_step } => format!(
                "sgd{}{}{}",
                if momentum { "+momentum" } else { "" },
                if nesterov { "+nesterov" } else { "" },
                if first_step { "(first step)" } else { "" }
            ),
            UpdateRule::RmsProp { momentum, centered } => format!(
                "rmsprop{}{}",
                if momentum { "+momentum" } else { "" },
                if centered { "+centered" } else { "" }
            ),
            UpdateRule::Adam { decoupled: false } => "adam".into(),
            UpdateRule::Adam { decoupled: true } => "adamw".into(),
        }
    }

    fn check(&self) -> Result<()> {
        if let UpdateRule::Sgd { momentum: false, nesterov: true, .. } = self {
            return Err(err(self, "Nesterov momentum needs a momentum buffer".into()));
        }
        Ok(())
    }
}

fn err(rule: &UpdateRule, message: String) -> Error {
    Error::Codegen { layer: format!("optimizer update {}", rule.name()), message }
}

/// A compiled update kernel for one [`UpdateRule`]. Cheap to clone (shares the code), `Send +
/// Sync`.
#[derive(Clone, Debug)]
pub struct UpdateKernel {
    rule: UpdateRule,
    kernel: StreamKernel,
}

impl UpdateKernel {
    /// Compile one kernel per rule, all in one JIT module, in the order given.
    pub fn compile(rules: &[UpdateRule]) -> Result<Vec<UpdateKernel>> {
        let mut jit = Jit::new("optimizer updates")?;
        for r in rules {
            r.check()?;
            let rule = *r;
            jit.define_stream(&rule.name(), rule.scalars(), 1 + rule.state_buffers(), |b, args| {
                emit_update(b, rule, args)
            })?;
        }
        let fin = jit.finish()?;
        Ok(rules.iter().zip(fin.streams).map(|(&rule, kernel)| UpdateKernel { rule, kernel }).collect())
    }

    /// The rule this kernel implements.
    pub fn rule(&self) -> UpdateRule {
        self.rule
    }

    /// Update `param` (and `state`, in the runtime's buffer order) in place from `grad`,
    /// with `scalars` laid out as in the module header. Every length is checked first; a
    /// mismatch is an error naming the buffer.
    pub fn run(&self, scalars: &[f32], param: &mut [f32], grad: &[f32], state: &mut [&mut [f32]]) -> Result<()> {
        let r = &self.rule;
        let n = param.len();
        if scalars.len() != r.scalars() {
            return Err(err(r, format!("{} scalars given, the kernel takes {}", scalars.len(), r.scalars())));
        }
        if grad.len() != n {
            return Err(err(r, format!("parameter has {n} values but gradient has {}", grad.len())));
        }
        if state.len() != r.state_buffers() {
            return Err(err(r, format!("{} state buffers given, the rule keeps {}", state.len(), r.state_buffers())));
        }
        if let Some((i, s)) = state.iter().enumerate().find(|(_, s)| s.len() != n) {
            return Err(err(r, format!("state buffer {i} has {} values but the parameter has {n}", s.len())));
        }
        let mut it = state.iter_mut().map(|s| &mut **s);
        let w1 = it.next().unwrap_or(&mut []);
        let w2 = it.next().unwrap_or(&mut []);
        let w3 = it.next().unwrap_or(&mut []);
        let written: [&mut [f32]; STREAM_WRITES] = [param, w1, w2, w3];
        self.kernel.call(scalars, grad, written);
        Ok(())
    }
}

/// `while i < end { body(i); i += step }` over an i64 index (unsigned compare).
fn while_lt(b: &mut FunctionBuilder, start: ir::Value, end: ir::Value, step: i64, body: impl FnOnce(&mut FunctionBuilder, ir::Value)) {
    let head = b.create_block();
    let work = b.create_block();
    let exit = b.create_block();
    let i = b.append_block_param(head, I64);
    b.ins().jump(head, &[BlockArg::Value(start)]);
    b.switch_to_block(head);
    let more = b.ins().icmp(IntCC::UnsignedLessThan, i, end);
    b.ins().brif(more, work, &[], exit, &[]);
    b.switch_to_block(work);
    b.seal_block(work);
    body(b, i);
    let next = b.ins().iadd_imm_s(i, step);
    b.ins().jump(head, &[BlockArg::Value(next)]);
    b.seal_block(head);
    b.switch_to_block(exit);
    b.seal_block(exit);
}

/// Loads and stores of one element (or one block of four) at a dynamic byte offset plus a
/// constant one.
struct At {
    ty: ir::Type,
    off: ir::Value,
    imm: i32,
}

impl At {
    fn ld(&self, b: &mut FunctionBuilder, p: ir::Value) -> ir::Value {
        let a = b.ins().iadd(p, self.off);
        b.ins().load(self.ty, emit::mem(), a, self.imm)
    }
    fn st(&self, b: &mut FunctionBuilder, v: ir::Value, p: ir::Value) {
        let a = b.ins().iadd(p, self.off);
        b.ins().store(emit::mem(), v, a, self.imm);
    }
}

fn emit_update(b: &mut FunctionBuilder, rule: UpdateRule, args: &[ir::Value; 3 + STREAM_WRITES]) {
    let [n, sc, rd, w0, w1, w2, w3] = *args;
    let scalars: Vec<ir::Value> = (0..rule.scalars()).map(|i| emit::ld(b, sc, i as i64)).collect();
    let splat: Vec<ir::Value> = scalars.iter().map(|&s| b.ins().splat(F32X4, s)).collect();
    let zero = b.ins().iconst(I64, 0);
    let n8 = b.ins().band_imm_s(n, !7i64);
    let n4 = b.ins().band_imm_s(n, !3i64);
    let w = [w0, w1, w2, w3];
    // Two f32x4 blocks per iteration, then at most one more block, then the scalar tail.
    while_lt(b, zero, n8, 8, |b, i| {
        let off = b.ins().ishl_imm_u(i, 2);
        update(b, rule, &At { ty: F32X4, off, imm: 0 }, &splat, rd, w);
        update(b, rule, &At { ty: F32X4, off, imm: 16 }, &splat, rd, w);
    });
    while_lt(b, n8, n4, 4, |b, i| {
        let off = b.ins().ishl_imm_u(i, 2);
        update(b, rule, &At { ty: F32X4, off, imm: 0 }, &splat, rd, w);
    });
    while_lt(b, n4, n, 1, |b, i| {
        let off = b.ins().ishl_imm_u(i, 2);
        update(b, rule, &At { ty: F32, off, imm: 0 }, &scalars, rd, w);
    });
    b.ins().return_(&[]);
}

/// The update of one element or block: exactly the reference optimiser's operations.
fn update(b: &mut FunctionBuilder, rule: UpdateRule, at: &At, s: &[ir::Value], rd: ir::Value, w: [ir::Value; STREAM_WRITES]) {
    let p = at.ld(b, w[0]);
    let grad = at.ld(b, rd);
    match rule {
        UpdateRule::Sgd { momentum, nesterov, first_step } => {
            let (lr, wd, mu) = (s[0], s[1], s[2]);
            let t = b.ins().fmul(wd, p);
            let g = b.ins().fadd(grad, t);
            let d = if momentum {
                let buf = if first_step {
                    g
                } else {
                    let old = at.ld(b, w[1]);
                    let t = b.ins().fmul(mu, old);
                    b.ins().fadd(t, g)
                };
                at.st(b, buf, w[1]);
                if nesterov {
                    let t = b.ins().fmul(mu, buf);
                    b.ins().fadd(g, t)
                } else {
                    buf
                }
            } else {
                g
            };
            let t = b.ins().fmul(lr, d);
            let np = b.ins().fsub(p, t);
            at.st(b, np, w[0]);
        }
        UpdateRule::RmsProp { momentum, centered } => {
            let (lr, wd, alpha, oma, eps, mu) = (s[0], s[1], s[2], s[3], s[4], s[5]);
            let t = b.ins().fmul(wd, p);
            let g = b.ins().fadd(grad, t);
            let sq_old = at.ld(b, w[1]);
            let t1 = b.ins().fmul(alpha, sq_old);
            let t2 = b.ins().fmul(oma, g);
            let t2 = b.ins().fmul(t2, g);
            let sq = b.ins().fadd(t1, t2);
            at.st(b, sq, w[1]);
            let mom_buf = w[2];
            let avg_buf = if momentum { w[3] } else { w[2] };
            let den = if centered {
                let a_old = at.ld(b, avg_buf);
                let t1 = b.ins().fmul(alpha, a_old);
                let t2 = b.ins().fmul(oma, g);
                let a = b.ins().fadd(t1, t2);
                at.st(b, a, avg_buf);
                let aa = b.ins().fmul(a, a);
                let diff = b.ins().fsub(sq, aa);
                let z = if at.ty == F32 { emit::f32c(b, 0.0) } else { emit::f32x4c(b, 0.0) };
                let m = b.ins().fmax(diff, z);
                let r = b.ins().sqrt(m);
                b.ins().fadd(r, eps)
            } else {
                let r = b.ins().sqrt(sq);
                b.ins().fadd(r, eps)
            };
            let np = if momentum {
                let old = at.ld(b, mom_buf);
                let t1 = b.ins().fmul(mu, old);
                let t2 = b.ins().fdiv(g, den);
                let nb = b.ins().fadd(t1, t2);
                at.st(b, nb, mom_buf);
                let t = b.ins().fmul(lr, nb);
                b.ins().fsub(p, t)
            } else {
                let t = b.ins().fmul(lr, g);
                let t = b.ins().fdiv(t, den);
                b.ins().fsub(p, t)
            };
            at.st(b, np, w[0]);
        }
        UpdateRule::Adam { decoupled } => {
            let (wd, b1, omb1, b2, omb2, eps, step_size, bc2_sqrt, decay) =
                (s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]);
            let (p, g) = if decoupled {
                (b.ins().fmul(p, decay), grad)
            } else {
                let t = b.ins().fmul(wd, p);
                (p, b.ins().fadd(grad, t))
            };
            let m_old = at.ld(b, w[1]);
            let t1 = b.ins().fmul(b1, m_old);
            let t2 = b.ins().fmul(omb1, g);
            let m = b.ins().fadd(t1, t2);
            at.st(b, m, w[1]);
            let v_old = at.ld(b, w[2]);
            let t1 = b.ins().fmul(b2, v_old);
            let t2 = b.ins().fmul(omb2, g);
            let t2 = b.ins().fmul(t2, g);
            let v = b.ins().fadd(t1, t2);
            at.st(b, v, w[2]);
            let r = b.ins().sqrt(v);
            let r = b.ins().fdiv(r, bc2_sqrt);
            let den = b.ins().fadd(r, eps);
            let t = b.ins().fmul(step_size, m);
            let t = b.ins().fdiv(t, den);
            let np = b.ins().fsub(p, t);
            at.st(b, np, w[0]);
        }
    }
}
