//! Winograd `F(2x2, 3x3)` convolution for 3x3, stride-1, undilated, ungrouped layers
//! (Lavin & Gray 2016): 2.25x fewer multiplications than direct convolution, paid for with
//! input/output transforms. [`ConvKernels`](super::ConvKernels) runs its forward on it and,
//! as a convolution of the output gradient padded by `2 - pad` with the flipped, transposed
//! weights (accumulating), its backward data; used for layers with at least
//! [`WINOGRAD_MIN_CHANNELS`](super::conv::WINOGRAD_MIN_CHANNELS) input and output channels.
//!
//! ## Maths (per sample)
//! Output tiles of `2 x 2` pixels, `T = ceil(OH/2) * ceil(OW/2)` of them; tile `(ty, tx)` reads
//! the `4 x 4` input patch at rows `2ty - pt ..`, columns `2tx - pl ..` (zero outside).
//! - filter: `U = G g Gᵀ` (`4 x 4` per `(co, ci)`), `G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]]`;
//! - input: `V = Bᵀ d B`, `Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`;
//! - 16 GEMMs, one per transform position `ξ`: `M_ξ[co, t] = Σ_ci U_ξ[co, ci] · V_ξ[ci, t]`
//!   on the JIT micro-kernel ([`gemm`](super::gemm), `K = Cin`);
//! - output: `Y = Aᵀ M A`, `Aᵀ = [[1,1,1,0],[0,1,-1,-1]]`, then the fused epilogue (bias,
//!   folded batch-norm scale/shift, residual, activation, accumulate, concat slice) in plain
//!   Rust as each `2 x 2` tile is stored.
//!
//! Speed is reported as *effective* GFLOP/s (direct-convolution FLOPs / time); the maths is
//! exact in real arithmetic, its f32 rounding differs from direct convolution by ~1e-6 of the
//! output scale.

use super::gemm::{pack_a, EpiArgs, Gemm, GemmPlan, GemmSpec, NR};
use super::jit::{Finished, Jit};
use super::FusedAct;
use crate::Result;

/// Tiles per block (a multiple of 8): the transformed input and the GEMM results of one block
/// stay in L2.
const TILE_BLOCK: usize = 32;

/// The geometry a Winograd layer is specialised to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WinoShape {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Top and left padding.
    pub pt: usize,
    /// Left padding.
    pub pl: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl WinoShape {
    fn tiles(&self) -> (usize, usize) {
        (self.oh.div_ceil(2), self.ow.div_ceil(2))
    }
}

/// The fused epilogue of one call, resolved by the caller (already checked).
#[derive(Clone, Copy, Debug)]
pub struct WinoEpi<'a> {
    /// Per-channel bias (empty: none).
    pub bias: &'a [f32],
    /// Per-channel scale and shift (empty: none).
    pub scale: &'a [f32],
    /// Per-channel shift.
    pub shift: &'a [f32],
    /// This sample's residual `[Cout, OH, OW]` (empty: none).
    pub residual: &'a [f32],
    /// Activation.
    pub act: FusedAct,
    /// `+=` instead of `=`.
    pub accumulate: bool,
}

/// The GEMM of a Winograd layer before finalization.
pub struct WinoPlan {
    shape: WinoShape,
    gemm: GemmPlan,
}

/// A compiled Winograd forward.
#[derive(Debug)]
pub struct Winograd {
    shape: WinoShape,
    gemm: Gemm,
}

impl WinoPlan {
    /// Define the 16 GEMMs' tile kernels (one plain `Cout x T x Cin` GEMM shape).
    pub fn define(jit: &mut Jit, shape: WinoShape) -> Result<WinoPlan> {
        let (th, tw) = shape.tiles();
        let t = th * tw;
        let _ = t;
        let gemm = GemmPlan::define(jit, "conv_winograd", GemmSpec::plain(Some(shape.cout), TILE_BLOCK, shape.cin, TILE_BLOCK, false))?;
        Ok(WinoPlan { shape, gemm })
    }

    /// Resolve against the finalized module.
    pub fn resolve(&self, fin: &Finished) -> Winograd {
        Winograd { shape: self.shape, gemm: self.gemm.resolve(fin) }
    }
}

/// Per-call scratch: transformed filters (packed per `ξ`), transformed input, GEMM results.
#[derive(Default)]
pub struct WinoScratch {
    u: Vec<Vec<f32>>,
    pad: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
}

impl Winograd {
    /// Number of GEMM tile kernels compiled.
    pub fn tile_count(&self) -> usize {
        self.gemm.tile_count()
    }

    /// Transform and pack the filters `w` (`[Cout, Cin, 3, 3]`) into `s`.
    pub fn prepare(&self, w: &[f32], s: &mut WinoScratch) {
        let (cin, cout) = (self.shape.cin, self.shape.cout);
        let mut u = vec![0.0f32; 16 * cout * cin];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &w[(co * cin + ci) * 9..][..9];
                // Gg: 4x3.
                let mut gg = [[0.0f32; 3]; 4];
                for c in 0..3 {
                    let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
                    gg[0][c] = a;
                    gg[1][c] = 0.5 * (a + b + d);
                    gg[2][c] = 0.5 * (a - b + d);
                    gg[3][c] = d;
                }
                for (r, row) in gg.iter().enumerate() {
                    let (a, b, d) = (row[0], row[1], row[2]);
                    let vals = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                    for (c, &v) in vals.iter().enumerate() {
                        u[((r * 4 + c) * cout + co) * cin + ci] = v;
                    }
                }
            }
        }
        s.u.resize_with(16, Vec::new);
        for (xi, up) in s.u.iter_mut().enumerate() {
            pack_a(up, &u[xi * cout * cin..], cout, cin, cin, 1);
        }
    }

    /// One sample: `out` is this sample's `[Cout, OH, OW]` region of the output, starting at
    /// its first channel, with `ldc_ch` elements from one channel to the next (`OH*OW`).
    pub fn forward_sample(&self, out: &mut [f32], x: &[f32], s: &mut WinoScratch, epi: &WinoEpi) {
        let sh = &self.shape;
        let (th, tw) = sh.tiles();
        let t = th * tw;
        let (cin, cout) = (sh.cin, sh.cout);
        // Zero-padded planes covering every tile's 4x4 patch.
        let (ph, pw) = (2 * th + 2, 2 * tw + 2);
        s.pad.clear();
        s.pad.resize(cin * ph * pw, 0.0);
        for ci in 0..cin {
            for y in 0..sh.h {
                let py = y + sh.pt;
                if py >= ph {
                    break;
                }
                let len = sh.w.min(pw - sh.pl);
                let d = ci * ph * pw + py * pw + sh.pl;
                s.pad[d..d + len].copy_from_slice(&x[(ci * sh.h + y) * sh.w..][..len]);
            }
        }
        // Blocks of TILE_BLOCK tiles: V in packed B-panel layout, M, then the output.
        let tb = TILE_BLOCK;
        s.v.resize(16 * cin * tb, 0.0);
        s.m.resize(16 * cout * tb, 0.0);
        let none = EpiArgs::default();
        let p = sh.oh * sh.ow;
        for b0 in (0..t).step_by(tb) {
            // V_ξ panel q, row ci, column l: v[((ξ*np + q)*cin + ci)*8 + l], np = tb/8; eight
            // tiles (one panel) at a time, lane l = tile q*8 + l, so the arithmetic vectorises.
            let np = tb / NR;
            for q in 0..np {
                // Patch origins of the panel's tiles (a tile past the last reads tile 0, its
                // results are never stored).
                let org: [usize; NR] = std::array::from_fn(|l| {
                    let ti = b0 + q * NR + l;
                    let ti = if ti < t { ti } else { 0 };
                    2 * (ti / tw) * pw + 2 * (ti % tw)
                });
                for ci in 0..cin {
                    let plane = &s.pad[ci * ph * pw..(ci + 1) * ph * pw];
                    // d[i][c][l]: patch row i, column c of lane l's tile.
                    let mut d = [[[0.0f32; NR]; 4]; 4];
                    for (l, &o) in org.iter().enumerate() {
                        for (i, di) in d.iter_mut().enumerate() {
                            let r = &plane[o + i * pw..o + i * pw + 4];
                            for c in 0..4 {
                                di[c][l] = r[c];
                            }
                        }
                    }
                    // e = Bᵀ d (rows).
                    let mut e = [[[0.0f32; NR]; 4]; 4];
                    for c in 0..4 {
                        for l in 0..NR {
                            e[0][c][l] = d[0][c][l] - d[2][c][l];
                            e[1][c][l] = d[1][c][l] + d[2][c][l];
                            e[2][c][l] = d[2][c][l] - d[1][c][l];
                            e[3][c][l] = d[1][c][l] - d[3][c][l];
                        }
                    }
                    // V = e B (columns), stored lane-contiguous.
                    for (i, ei) in e.iter().enumerate() {
                        let mut vals = [[0.0f32; NR]; 4];
                        for l in 0..NR {
                            vals[0][l] = ei[0][l] - ei[2][l];
                            vals[1][l] = ei[1][l] + ei[2][l];
                            vals[2][l] = ei[2][l] - ei[1][l];
                            vals[3][l] = ei[1][l] - ei[3][l];
                        }
                        for (j, v) in vals.iter().enumerate() {
                            let o = (((i * 4 + j) * np + q) * cin + ci) * NR;
                            let dst: &mut [f32; NR] = (&mut s.v[o..o + NR]).try_into().expect("8 lanes");
                            *dst = *v;
                        }
                    }
                }
            }
            // M_ξ[co][tt] = U_ξ · V_ξ.
            for xi in 0..16 {
                let m = &mut s.m[xi * cout * tb..(xi + 1) * cout * tb];
                for q in 0..np {
                    let vp = &s.v[(xi * np + q) * cin * NR..(xi * np + q + 1) * cin * NR];
                    self.gemm.run_panel(m, q * NR, cout, q * NR, &s.u[xi], vp, &none);
                }
            }
            // Y = Aᵀ M A (eight tiles at a time) and the epilogue.
            for co in 0..cout {
                let b = if epi.bias.is_empty() { 0.0 } else { epi.bias[co] };
                let affine = !epi.scale.is_empty();
                let (sc, sf) = if affine { (epi.scale[co], epi.shift[co]) } else { (1.0, 0.0) };
                for q in 0..np {
                    let mv: [[f32; NR]; 16] = std::array::from_fn(|xi| {
                        let o = (xi * cout + co) * tb + q * NR;
                        s.m[o..o + NR].try_into().expect("8 lanes")
                    });
                    // Aᵀ M: 2x4, then (·) A: 2x2 (plus bias).
                    let mut am = [[[0.0f32; NR]; 4]; 2];
                    for c in 0..4 {
                        for l in 0..NR {
                            am[0][c][l] = mv[c][l] + mv[4 + c][l] + mv[8 + c][l];
                            am[1][c][l] = mv[4 + c][l] - mv[8 + c][l] - mv[12 + c][l];
                        }
                    }
                    let mut y = [[[0.0f32; NR]; 2]; 2];
                    for (yi, ai) in y.iter_mut().zip(&am) {
                        for l in 0..NR {
                            yi[0][l] = ai[0][l] + ai[1][l] + ai[2][l] + b;
                            yi[1][l] = ai[1][l] - ai[2][l] - ai[3][l] + b;
                        }
                    }
                    for l in 0..NR {
                        let ti = b0 + q * NR + l;
                        if ti >= t {
                            break;
                        }
                        let (ty, tx) = (ti / tw, ti % tw);
                        for (i, yr) in y.iter().enumerate() {
                            let oy = 2 * ty + i;
                            if oy >= sh.oh {
                                continue;
                            }
                            for (j, yv) in yr.iter().enumerate() {
                                let ox = 2 * tx + j;
                                if ox >= sh.ow {
                                    continue;
                                }
                                let qo = co * p + oy * sh.ow + ox;
                                let mut v = yv[l];
                                if affine {
                                    v = v * sc + sf;
                                }
                                if !epi.residual.is_empty() {
                                    v += epi.residual[qo];
                                }
                                v = epi.act.apply(v);
                                if epi.accumulate {
                                    out[qo] += v;
                                } else {
                                    out[qo] = v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
