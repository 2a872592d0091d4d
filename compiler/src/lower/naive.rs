//! Naive kernels: the same convolution and dense maths as the blocked path, JIT-compiled by
//! Cranelift as straightforward scalar loop nests (one kernel per op and sample, no
//! vectorisation, no blocking, no fusion). They exist as the baseline that the benchmarks
//! compare the blocked kernels against, and as a second implementation for the tests.
//!
//! All kernels process one sample; shapes are compile-time constants. Argument order follows
//! the `X_forward`/`X_backward` convention (outputs first):
//! - conv forward `(out[Cout*P], x[Cin*H*W], w, b)`: `out = conv(x, w) + b`;
//! - conv backward data `(d_x, d_out, w)`: `d_x += Σ w * d_out` scattered to the read pixels;
//! - conv backward weight `(d_w, d_out, x)`: `d_w += Σ_p d_out * x`;
//! - dense forward `(out[O], x[I], w[O*I], b)`, backward data `(d_x, d_out, w)`,
//!   backward weight `(d_w, d_out, x)`.

use super::conv::ConvGeometry;
use super::jit::{emit, Jit, KernelId};
use crate::Result;
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{self, InstBuilder};
use cranelift_frontend::FunctionBuilder;

fn muladd(b: &mut FunctionBuilder, v: ir::Value, k: usize, c: ir::Value) -> ir::Value {
    let kc = b.ins().iconst(I64, k as i64);
    let m = b.ins().imul(v, kc);
    b.ins().iadd(m, c)
}

fn addc(b: &mut FunctionBuilder, v: ir::Value, c: i64) -> ir::Value {
    if c == 0 {
        v
    } else {
        b.ins().iadd_imm_s(v, c)
    }
}

fn load_at(b: &mut FunctionBuilder, p: ir::Value, idx: ir::Value) -> ir::Value {
    let a = emit::index(b, p, idx);
    emit::ld(b, a, 0)
}

fn store_at(b: &mut FunctionBuilder, v: ir::Value, p: ir::Value, idx: ir::Value) {
    let a = emit::index(b, p, idx);
    emit::st(b, v, a, 0);
}

/// Input coordinate `o*s + k*d - pad` for output coordinate `o` and tap `k`.
fn tap(b: &mut FunctionBuilder, o: ir::Value, s: usize, k: ir::Value, d: usize, pad: usize) -> ir::Value {
    let zero = b.ins().iconst(I64, 0);
    let os = muladd(b, o, s, zero);
    let kd = muladd(b, k, d, os);
    addc(b, kd, -(pad as i64))
}

/// Which conv kernel a loop nest implements.
#[derive(Clone, Copy, PartialEq)]
enum ConvKind {
    Fwd { bias: bool },
    BwdData,
}

/// Emit the forward / backward-data loop nest (they share the iteration space).
fn conv_nest(b: &mut FunctionBuilder, a: &[ir::Value; 7], g: &ConvGeometry, kind: ConvKind) {
    let (mg, cg) = (g.cout / g.groups, g.cin / g.groups);
    let [kh, kw] = g.kernel;
    let p = g.pixels();
    let hw = g.h * g.w;
    let acc = b.declare_var(F32);
    emit::for_n(b, g.groups, |b, gi| {
        emit::for_n(b, mg, |b, co| {
            let zero = b.ins().iconst(I64, 0);
            let gm = muladd(b, gi, mg, zero);
            let oc = b.ins().iadd(gm, co);
            emit::for_n(b, g.oh, |b, oy| {
                emit::for_n(b, g.ow, |b, ox| {
                    let zero = b.ins().iconst(I64, 0);
                    let pix = muladd(b, oy, g.ow, ox);
                    let oidx = muladd(b, oc, p, pix);
                    let dout = match kind {
                        ConvKind::Fwd { bias } => {
                            let init = if bias { load_at(b, a[3], oc) } else { emit::f32c(b, 0.0) };
                            b.def_var(acc, init);
                            None
                        }
                        ConvKind::BwdData => Some(load_at(b, a[1], oidx)),
                    };
                    let _ = zero;
                    emit::for_n(b, cg, |b, ci| {
                        let zero = b.ins().iconst(I64, 0);
                        let gc = muladd(b, gi, cg, zero);
                        let ic = b.ins().iadd(gc, ci);
                        let ocg = muladd(b, oc, cg, ci);
                        emit::for_n(b, kh, |b, ky| {
                            let iy = tap(b, oy, g.stride[0], ky, g.dilation[0], g.pads[0]);
                            let ok = emit::in_range(b, iy, g.h);
                            emit::when(b, ok, |b| {
                                emit::for_n(b, kw, |b, kx| {
                                    let ix = tap(b, ox, g.stride[1], kx, g.dilation[1], g.pads[2]);
                                    let ok = emit::in_range(b, ix, g.w);
                                    emit::when(b, ok, |b| {
                                        let row = muladd(b, ic, hw, ix);
                                        let xi = muladd(b, iy, g.w, row);
                                        let wr = muladd(b, ocg, kh, ky);
                                        let wi = muladd(b, wr, kw, kx);
                                        let wv = load_at(b, a[2], wi);
                                        match kind {
                                            ConvKind::Fwd { .. } => {
                                                let xv = load_at(b, a[1], xi);
                                                let old = b.use_var(acc);
                                                let new = b.ins().fma(xv, wv, old);
                                                b.def_var(acc, new);
                                            }
                                            ConvKind::BwdData => {
                                                let old = load_at(b, a[0], xi);
                                                let new = b.ins().fma(wv, dout.unwrap(), old);
                                                store_at(b, new, a[0], xi);
                                            }
                                        }
                                    });
                                });
                            });
                        });
                    });
                    if let ConvKind::Fwd { .. } = kind {
                        let v = b.use_var(acc);
                        store_at(b, v, a[0], oidx);
                    }
                });
            });
        });
    });
    b.ins().return_(&[]);
}

/// Emit the backward-weight loop nest: `d_w[oc, ci, ky, kx] += Σ_{oy,ox} d_out * x`.
fn conv_wgrad(b: &mut FunctionBuilder, a: &[ir::Value; 7], g: &ConvGeometry) {
    let (mg, cg) = (g.cout / g.groups, g.cin / g.groups);
    let [kh, kw] = g.kernel;
    let p = g.pixels();
    let hw = g.h * g.w;
    let acc = b.declare_var(F32);
    emit::for_n(b, g.groups, |b, gi| {
        emit::for_n(b, mg, |b, co| {
            let zero = b.ins().iconst(I64, 0);
            let gm = muladd(b, gi, mg, zero);
            let oc = b.ins().iadd(gm, co);
            emit::for_n(b, cg, |b, ci| {
                let zero = b.ins().iconst(I64, 0);
                let gc = muladd(b, gi, cg, zero);
                let ic = b.ins().iadd(gc, ci);
                let ocg = muladd(b, oc, cg, ci);
                emit::for_n(b, kh, |b, ky| {
                    emit::for_n(b, kw, |b, kx| {
                        let wr = muladd(b, ocg, kh, ky);
                        let wi = muladd(b, wr, kw, kx);
                        let init = load_at(b, a[0], wi);
                        b.def_var(acc, init);
                        emit::for_n(b, g.oh, |b, oy| {
                            let iy = tap(b, oy, g.stride[0], ky, g.dilation[0], g.pads[0]);
                            let ok = emit::in_range(b, iy, g.h);
                            emit::when(b, ok, |b| {
                                emit::for_n(b, g.ow, |b, ox| {
                                    let ix = tap(b, ox, g.stride[1], kx, g.dilation[1], g.pads[2]);
                                    let ok = emit::in_range(b, ix, g.w);
                                    emit::when(b, ok, |b| {
                                        let row = muladd(b, ic, hw, ix);
                                        let xi = muladd(b, iy, g.w, row);
                                        let pix = muladd(b, oy, g.ow, ox);
                                        let oi = muladd(b, oc, p, pix);
                                        let xv = load_at(b, a[2], xi);
                                        let dv = load_at(b, a[1], oi);
                                        let old = b.use_var(acc);
                                        let new = b.ins().fma(xv, dv, old);
                                        b.def_var(acc, new);
                                    });
                                });
                            });
                        });
                        let v = b.use_var(acc);
                        store_at(b, v, a[0], wi);
                    });
                });
            });
        });
    });
    b.ins().return_(&[]);
}

/// Define the three naive conv kernels (forward, backward data, backward weight).
pub fn define_conv(jit: &mut Jit, g: &ConvGeometry, bias: bool) -> Result<(KernelId, KernelId, KernelId)> {
    let (outn, inn, wn) = (g.cout * g.pixels(), g.in_numel(), g.weight_numel());
    let g2 = *g;
    let f = jit.define("conv_fwd_naive", [outn, inn, wn, if bias { g.cout } else { 0 }, 0, 0, 0], move |b, a| {
        conv_nest(b, a, &g2, ConvKind::Fwd { bias })
    })?;
    let d = jit.define("conv_bwd_data_naive", [inn, outn, wn, 0, 0, 0, 0], move |b, a| {
        conv_nest(b, a, &g2, ConvKind::BwdData)
    })?;
    let w = jit.define("conv_bwd_w_naive", [wn, outn, inn, 0, 0, 0, 0], move |b, a| conv_wgrad(b, a, &g2))?;
    Ok((f, d, w))
}

/// Define the naive dense forward kernel for `in_f -> out_f` (one sample).
pub fn define_dense_forward(jit: &mut Jit, in_f: usize, out_f: usize, bias: bool) -> Result<KernelId> {
    let wn = in_f * out_f;
    jit.define("dense_fwd_naive", [out_f, in_f, wn, if bias { out_f } else { 0 }, 0, 0, 0], move |b, a| {
        let acc = b.declare_var(F32);
        emit::for_n(b, out_f, |b, o| {
            let init = if bias { load_at(b, a[3], o) } else { emit::f32c(b, 0.0) };
            b.def_var(acc, init);
            emit::for_n(b, in_f, |b, i| {
                let wi = muladd(b, o, in_f, i);
                let wv = load_at(b, a[2], wi);
                let xv = load_at(b, a[1], i);
                let old = b.use_var(acc);
                let new = b.ins().fma(xv, wv, old);
                b.def_var(acc, new);
            });
            let v = b.use_var(acc);
            store_at(b, v, a[0], o);
        });
        b.ins().return_(&[]);
    })
}

/// Define the three naive dense kernels for `in_f -> out_f` (one sample each): forward,
/// backward data, weight gradient.
pub fn define_dense(jit: &mut Jit, in_f: usize, out_f: usize, bias: bool) -> Result<(KernelId, KernelId, KernelId)> {
    let wn = in_f * out_f;
    let f = define_dense_forward(jit, in_f, out_f, bias)?;
    // d_x[i] += Σ_o d_out[o] w[o][i]; d_w[o][i] += d_out[o] x[i].
    let d = jit.define("dense_bwd_data_naive", [in_f, out_f, wn, 0, 0, 0, 0], move |b, a| {
        emit::for_n(b, out_f, |b, o| {
            let dv = load_at(b, a[1], o);
            emit::for_n(b, in_f, |b, i| {
                let wi = muladd(b, o, in_f, i);
                let wv = load_at(b, a[2], wi);
                let old = load_at(b, a[0], i);
                let new = b.ins().fma(wv, dv, old);
                store_at(b, new, a[0], i);
            });
        });
        b.ins().return_(&[]);
    })?;
    let w = jit.define("dense_bwd_w_naive", [wn, out_f, in_f, 0, 0, 0, 0], move |b, a| {
        emit::for_n(b, out_f, |b, o| {
            let dv = load_at(b, a[1], o);
            emit::for_n(b, in_f, |b, i| {
                let wi = muladd(b, o, in_f, i);
                let xv = load_at(b, a[2], i);
                let old = load_at(b, a[0], wi);
                let new = b.ins().fma(xv, dv, old);
                store_at(b, new, a[0], wi);
            });
        });
        b.ins().return_(&[]);
    })?;
    Ok((f, d, w))
}
