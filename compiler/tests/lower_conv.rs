//! Convolution kernels (blocked and naive) against nested-loop references, over strides,
//! asymmetric paddings, dilations, groups (incl. depthwise), 1x7/7x1, odd sizes and batches;
//! every forward epilogue; gradients also against finite differences.
#![cfg(feature = "jit")]

use cnnc_compiler::ir::{Conv2d, Padding};
use cnnc_compiler::lower::{ChannelSlice, ConvKernels, ConvOptions, Epilogue, EpilogueArgs, FusedAct, Mode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * scale.max(w.abs()) + 1e-5, "{what}: element {i}: got {g}, want {w}");
    }
}

/// Plain geometry for the references.
#[derive(Clone, Copy, Debug)]
struct G {
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: [usize; 2],
    s: [usize; 2],
    p: [usize; 4],
    d: [usize; 2],
    g: usize,
}

impl G {
    fn conv(&self, bias: bool) -> Conv2d {
        Conv2d {
            out_channels: self.cout,
            kernel: self.k,
            stride: self.s,
            padding: Padding::Explicit { top: self.p[0], bottom: self.p[1], left: self.p[2], right: self.p[3] },
            dilation: self.d,
            groups: self.g,
            bias,
            exact: false,
        }
    }
    fn out_hw(&self) -> (usize, usize) {
        let dk = |i: usize| self.d[i] * (self.k[i] - 1) + 1;
        ((self.h + self.p[0] + self.p[1] - dk(0)) / self.s[0] + 1, (self.w + self.p[2] + self.p[3] - dk(1)) / self.s[1] + 1)
    }
    /// Visit every (sample-free) tap: `f(co, ci_global, ky, kx, oy, ox, x_index, w_index)`.
    fn taps(&self, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
        let (oh, ow) = self.out_hw();
        let (cg, mg) = (self.cin / self.g, self.cout / self.g);
        for co in 0..self.cout {
            let gi = co / mg;
            for ci in 0..cg {
                let ic = gi * cg + ci;
                for ky in 0..self.k[0] {
                    for kx in 0..self.k[1] {
                        let wi = ((co * cg + ci) * self.k[0] + ky) * self.k[1] + kx;
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let iy = (oy * self.s[0] + ky * self.d[0]) as isize - self.p[0] as isize;
                                let ix = (ox * self.s[1] + kx * self.d[1]) as isize - self.p[2] as isize;
                                if iy < 0 || ix < 0 || iy >= self.h as isize || ix >= self.w as isize {
                                    continue;
                                }
                                let xi = (ic * self.h + iy as usize) * self.w + ix as usize;
                                f(co, oy * ow + ox, xi, wi, 0);
                            }
                        }
                    }
                }
            }
        }
    }
    fn in_n(&self) -> usize {
        self.cin * self.h * self.w
    }
    fn out_n(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.cout * oh * ow
    }
    fn pix(&self) -> usize {
        let (oh, ow) = self.out_hw();
        oh * ow
    }
}

fn ref_forward(g: &G, x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize) -> Vec<f32> {
    let p = g.pix();
    let mut out = vec![0.0f32; n * g.out_n()];
    for s in 0..n {
        let xs = &x[s * g.in_n()..];
        let os = &mut out[s * g.out_n()..(s + 1) * g.out_n()];
        if let Some(b) = b {
            for co in 0..g.cout {
                os[co * p..(co + 1) * p].fill(b[co]);
            }
        }
        g.taps(|co, q, xi, wi, _| os[co * p + q] += xs[xi] * w[wi]);
    }
    out
}

fn ref_backward_data(g: &G, dx: &mut [f32], dout: &[f32], w: &[f32], n: usize) {
    let p = g.pix();
    for s in 0..n {
        let (dxs, dos) = (&mut dx[s * g.in_n()..], &dout[s * g.out_n()..]);
        g.taps(|co, q, xi, wi, _| dxs[xi] += w[wi] * dos[co * p + q]);
    }
}

fn ref_backward_weight(g: &G, dw: &mut [f32], db: &mut [f32], dout: &[f32], x: &[f32], n: usize) {
    let p = g.pix();
    for s in 0..n {
        let (xs, dos) = (&x[s * g.in_n()..], &dout[s * g.out_n()..]);
        g.taps(|co, q, xi, wi, _| dw[wi] += dos[co * p + q] * xs[xi]);
        for co in 0..g.cout {
            db[co] += dos[co * p..(co + 1) * p].iter().sum::<f32>();
        }
    }
}

fn geometries() -> Vec<G> {
    let g = |cin, h, w, cout, k, s, p, d, grp| G { cin, h, w, cout, k, s, p, d, g: grp };
    vec![
        g(3, 5, 7, 5, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1),
        g(3, 7, 5, 13, [3, 3], [2, 2], [0, 1, 1, 0], [1, 1], 1),
        g(5, 9, 8, 5, [1, 7], [1, 1], [0, 0, 3, 3], [1, 1], 1),
        g(5, 9, 8, 5, [7, 1], [1, 1], [3, 3, 0, 0], [1, 1], 1),
        g(6, 9, 9, 4, [3, 3], [1, 1], [2, 2, 2, 2], [2, 2], 2),
        g(5, 7, 6, 5, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 5),
        g(3, 8, 7, 6, [3, 3], [2, 1], [1, 0, 2, 1], [1, 2], 3),
        g(13, 5, 7, 3, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        g(4, 7, 7, 5, [1, 1], [2, 2], [0, 0, 0, 0], [1, 1], 1),
        g(8, 17, 17, 9, [5, 5], [1, 1], [2, 2, 2, 2], [1, 1], 1),
        g(7, 18, 18, 6, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        g(8, 8, 8, 8, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1),
        g(4, 6, 11, 7, [2, 3], [3, 2], [0, 2, 1, 0], [2, 1], 1),
        // Output rows a multiple of 8 wide: the whole-row packing paths (with borders).
        g(4, 10, 16, 6, [3, 3], [2, 1], [1, 2, 2, 2], [1, 2], 2),
        g(3, 9, 24, 5, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1),
        // Stride 1 with output rows >= 8 wide: the direct (in-place padded-plane) forward and
        // backward-data kernels, with row tails, pads 0/1/2, asymmetric and over-padding,
        // dilation, groups, 1xk/kx1, odd channel counts (plane-unroll remainders).
        g(5, 7, 13, 7, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1),
        g(3, 6, 15, 5, [3, 3], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        g(17, 9, 12, 6, [3, 3], [1, 1], [2, 2, 2, 2], [1, 1], 1),
        g(4, 8, 13, 9, [3, 3], [1, 1], [0, 2, 1, 0], [1, 1], 1),
        g(6, 9, 14, 4, [3, 3], [1, 1], [2, 1, 3, 2], [2, 2], 2),
        g(2, 5, 20, 3, [1, 3], [1, 1], [0, 0, 1, 1], [1, 1], 1),
        g(3, 12, 16, 5, [3, 1], [1, 1], [1, 1, 0, 0], [1, 1], 1),
        g(1, 12, 12, 6, [5, 5], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        g(6, 12, 12, 15, [5, 5], [1, 1], [2, 2, 2, 2], [1, 1], 3),
        g(3, 10, 10, 4, [1, 1], [1, 1], [1, 0, 0, 1], [1, 1], 1),
        // Weight-gradient pixel blocks of 12 rows and a 3-row tail, 4+2 input and 8+5 output
        // channels (edge tiles).
        g(6, 15, 20, 13, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1),
        // Fewer than 4 input channels: weight-gradient tiles over 4 taps of one channel, with
        // a 4-row pixel-block tail (also 1->6 5x5 and the grouped 5x5 above).
        g(2, 30, 19, 5, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1),
        // One output pixel (stride-1 weight gradient on a 1x1 block; no direct forward).
        g(3, 3, 3, 2, [3, 3], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        g(5, 1, 1, 3, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        // A 1x1 layer whose input and input gradient exceed 1 MiB per sample (the packed
        // forward prefetches its next block, the backward data its next rows of d_x): 3721
        // pixels (blocks of 256 and a 137-pixel tail), 13 output channels (a 1-row tile).
        g(72, 61, 61, 13, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        // A 1x1 layer whose output and input gradient exceed 512 KiB per sample with
        // reductions over 32 (K = 40 forward, 48 backward data): the direct tiles run in
        // half-size blocks (12 and 10 tiles per row-kernel call instead of 16; 3481 pixels, a
        // 1-wide tail), and the backward data prefetches its next rows of d_x.
        g(40, 59, 59, 48, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        // A 1x1 layer on 28x28 planes (3,136 bytes apart): forward and backward data read
        // their source in place, no padded copy.
        g(20, 28, 28, 12, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1),
        // A 1x1 layer with short reductions both ways (K = 21 forward, 11 backward data): 16
        // tiles per row-kernel call, 289 pixels = two 128-pixel blocks and a 33-pixel block
        // (4 single tiles and a 1-wide tail), 11 output / 21 input channels (3- and 1-row
        // tiles).
        g(21, 17, 17, 11, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1], 1),
    ]
}

#[test]
fn forward_and_backward_match_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    for (gi, g) in geometries().into_iter().enumerate() {
        for mode in [Mode::Blocked, Mode::Naive] {
            for (n, bias) in [(1, true), (3, false)] {
                let what = format!("geometry {gi} {g:?} {mode:?} batch {n} bias {bias}");
                let k = ConvKernels::compile("c", &g.conv(bias), (g.cin, g.h, g.w), Epilogue::default(), mode).unwrap();
                assert_eq!(k.geometry().oh * k.geometry().ow, g.pix(), "{what}: output size");
                if mode == Mode::Blocked && ((15..=26).contains(&gi) && gi != 24 || gi == 7 || gi == 10 || (30..=32).contains(&gi)) {
                    assert_eq!(k.algorithms()[..2], ["direct", "direct"], "{what}: stride-1 path");
                }
                // An unpadded 1x1 layer over 1 MiB per sample packs its forward B.
                if mode == Mode::Blocked && gi == 29 {
                    assert_eq!(k.algorithms()[..2], ["1x1", "direct"], "{what}: 1x1 path");
                }
                if mode == Mode::Blocked {
                    assert_eq!(k.algorithms()[2] == "direct", g.s == [1, 1], "{what}: weight-gradient path");
                }
                let x = rand_vec(&mut rng, n * g.in_n());
                let w = rand_vec(&mut rng, g.cout * g.cin / g.g * g.k[0] * g.k[1]);
                let b = rand_vec(&mut rng, g.cout);
                let bias_arg = bias.then_some(&b[..]);
                let mut out = rand_vec(&mut rng, n * g.out_n());
                k.forward(&mut out, &x, &w, bias_arg, EpilogueArgs::default()).unwrap();
                close(&out, &ref_forward(&g, &x, &w, bias_arg, n), &format!("{what}: forward"));

                let dout = rand_vec(&mut rng, n * g.out_n());
                let dx0 = rand_vec(&mut rng, n * g.in_n());
                let (mut dx, mut want_dx) = (dx0.clone(), dx0);
                k.backward_data(&mut dx, &dout, &w).unwrap();
                ref_backward_data(&g, &mut want_dx, &dout, &w, n);
                close(&dx, &want_dx, &format!("{what}: backward data"));

                let dw0 = rand_vec(&mut rng, w.len());
                let db0 = rand_vec(&mut rng, g.cout);
                let (mut dw, mut want_dw, mut db, mut want_db) = (dw0.clone(), dw0, db0.clone(), db0);
                k.backward_weight(&mut dw, bias.then_some(&mut db[..]), &dout, &x).unwrap();
                ref_backward_weight(&g, &mut want_dw, &mut want_db, &dout, &x, n);
                close(&dw, &want_dw, &format!("{what}: backward weight"));
                if bias {
                    close(&db, &want_db, &format!("{what}: bias gradient"));
                }
            }
        }
    }
}

#[test]
fn epilogues_match_reference() {
    // im2col path (stride 2) and the direct stride-1 path (rows 12 wide: a 4-wide tail).
    check_epilogues(G { cin: 3, h: 7, w: 5, cout: 13, k: [3, 3], s: [2, 2], p: [0, 1, 1, 0], d: [1, 1], g: 1 }, 12, "im2col");
    check_epilogues(G { cin: 5, h: 6, w: 12, cout: 13, k: [3, 3], s: [1, 1], p: [1, 1, 1, 1], d: [1, 1], g: 1 }, 16, "direct");
    // 1x1: direct on 35 pixels (a 3-wide tail) and on 9x9 = 81 (ten full tiles: one
    // row-kernel call, then a 1-wide tail); packed with an input over 1 MiB per sample
    // (prefetched blocks, 3721 pixels: a 137-pixel last block, a partial group of panels).
    check_epilogues(G { cin: 13, h: 5, w: 7, cout: 13, k: [1, 1], s: [1, 1], p: [0; 4], d: [1, 1], g: 1 }, 17, "direct");
    check_epilogues(G { cin: 13, h: 9, w: 9, cout: 13, k: [1, 1], s: [1, 1], p: [0; 4], d: [1, 1], g: 1 }, 19, "direct");
    // 17x17 = 289 pixels: 16-tile row-kernel calls, then single tiles and a 1-wide tail.
    check_epilogues(G { cin: 21, h: 17, w: 17, cout: 13, k: [1, 1], s: [1, 1], p: [0; 4], d: [1, 1], g: 1 }, 20, "direct");
    check_epilogues(G { cin: 72, h: 61, w: 61, cout: 13, k: [1, 1], s: [1, 1], p: [0; 4], d: [1, 1], g: 1 }, 18, "1x1");
}

fn check_epilogues(g: G, seed: u64, algo: &str) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = 3;
    let p = g.pix();
    let x = rand_vec(&mut rng, n * g.in_n());
    let w = rand_vec(&mut rng, g.cout * g.cin * g.k[0] * g.k[1]);
    let b = rand_vec(&mut rng, g.cout);
    let scale = rand_vec(&mut rng, g.cout);
    let shift = rand_vec(&mut rng, g.cout);
    let res = rand_vec(&mut rng, n * g.out_n());
    let base = ref_forward(&g, &x, &w, Some(&b), n);
    let cases = [
        Epilogue { affine: true, ..Default::default() },
        Epilogue { residual: true, ..Default::default() },
        Epilogue { act: FusedAct::Relu, ..Default::default() },
        Epilogue { act: FusedAct::LeakyRelu(0.1), ..Default::default() },
        Epilogue { affine: true, residual: true, act: FusedAct::Relu, ..Default::default() },
        Epilogue { accumulate: true, act: FusedAct::LeakyRelu(0.3), ..Default::default() },
        Epilogue { concat: Some(ChannelSlice { total: 20, offset: 4 }), act: FusedAct::Relu, ..Default::default() },
        Epilogue { concat: Some(ChannelSlice { total: 13, offset: 0 }), accumulate: true, residual: true, ..Default::default() },
    ];
    for mode in [Mode::Blocked, Mode::Naive] {
        for epi in cases {
            let what = format!("{mode:?} {epi:?}");
            let k = ConvKernels::compile("c", &g.conv(true), (g.cin, g.h, g.w), epi, mode).unwrap();
            if mode == Mode::Blocked {
                assert_eq!(k.algorithms()[0], algo, "{what}");
            }
            let cs = epi.concat.unwrap_or(ChannelSlice { total: g.cout, offset: 0 });
            let out0 = rand_vec(&mut rng, n * cs.total * p);
            let mut want = out0.clone();
            for s in 0..n {
                for co in 0..g.cout {
                    for q in 0..p {
                        let i = (s * g.cout + co) * p + q;
                        let mut t = base[i];
                        if epi.affine {
                            t = t * scale[co] + shift[co];
                        }
                        if epi.residual {
                            t += res[i];
                        }
                        t = match epi.act {
                            FusedAct::None => t,
                            FusedAct::Relu => t.max(0.0),
                            FusedAct::LeakyRelu(sl) => if t > 0.0 { t } else { sl * t },
                        };
                        let o = &mut want[(s * cs.total + cs.offset + co) * p + q];
                        *o = if epi.accumulate { *o + t } else { t };
                    }
                }
            }
            let mut out = out0.clone();
            let extra = EpilogueArgs {
                affine: epi.affine.then_some((&scale[..], &shift[..])),
                residual: epi.residual.then_some(&res[..]),
                stats: None,
                after_sample: None,
            };
            k.forward(&mut out, &x, &w, Some(&b), extra).unwrap();
            close(&out, &want, &what);
        }
    }
}

#[test]
fn concat_slice_backward_reads_its_channels() {
    let mut rng = StdRng::seed_from_u64(13);
    // Rows 5 wide (im2col) and 13 wide (direct, a 5-wide tail).
    for w in [5, 13] {
        concat_backward(&mut rng, G { cin: 4, h: 6, w, cout: 5, k: [3, 3], s: [1, 1], p: [1, 1, 1, 1], d: [1, 1], g: 1 });
    }
}

fn concat_backward(rng: &mut StdRng, g: G) {
    let (n, total, off) = (2, 11, 3);
    let p = g.pix();
    let epi = Epilogue { concat: Some(ChannelSlice { total, offset: off }), ..Default::default() };
    let x = rand_vec(rng, n * g.in_n());
    let w = rand_vec(rng, g.cout * g.cin * 9);
    let dfull = rand_vec(rng, n * total * p);
    let mut dslice = Vec::new();
    for s in 0..n {
        dslice.extend_from_slice(&dfull[(s * total + off) * p..(s * total + off + g.cout) * p]);
    }
    for mode in [Mode::Blocked, Mode::Naive] {
        let k = ConvKernels::compile("c", &g.conv(true), (g.cin, g.h, g.w), epi, mode).unwrap();
        if mode == Mode::Blocked {
            assert_eq!(k.algorithms()[1], if g.w > 8 { "direct" } else { "im2col" });
        }
        let mut dx = vec![0.0; n * g.in_n()];
        let mut want_dx = dx.clone();
        k.backward_data(&mut dx, &dfull, &w).unwrap();
        ref_backward_data(&g, &mut want_dx, &dslice, &w, n);
        close(&dx, &want_dx, "concat backward data");
        let (mut dw, mut db) = (vec![0.0; w.len()], vec![0.0; g.cout]);
        let (mut want_dw, mut want_db) = (dw.clone(), db.clone());
        k.backward_weight(&mut dw, Some(&mut db), &dfull, &x).unwrap();
        ref_backward_weight(&g, &mut want_dw, &mut want_db, &dslice, &x, n);
        close(&dw, &want_dw, "concat backward weight");
        close(&db, &want_db, "concat bias gradient");
    }
}

/// Gradients against central finite differences of `L = Σ out * r` (h = 1e-2; the loss is
/// linear in each input, so the difference quotient is exact up to f32 rounding).
#[test]
fn gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(14);
    finite_differences(&mut rng, G { cin: 4, h: 6, w: 7, cout: 6, k: [3, 3], s: [2, 1], p: [1, 0, 1, 2], d: [1, 2], g: 2 }, "im2col");
    // Stride 1: the direct kernels (tap-row weight gradient: 3 input channels, 5x5 taps).
    finite_differences(&mut rng, G { cin: 3, h: 5, w: 9, cout: 5, k: [5, 3], s: [1, 1], p: [2, 1, 1, 2], d: [1, 1], g: 1 }, "direct");
}

fn finite_differences(rng: &mut StdRng, g: G, algo: &str) {
    let n = 2;
    let k = ConvKernels::compile("c", &g.conv(true), (g.cin, g.h, g.w), Epilogue::default(), Mode::Blocked).unwrap();
    assert_eq!(k.algorithms(), [algo; 3], "{g:?}");
    let x = rand_vec(rng, n * g.in_n());
    let w = rand_vec(rng, g.cout * g.cin / g.g * g.k[0] * g.k[1]);
    let b = rand_vec(rng, g.cout);
    let r = rand_vec(rng, n * g.out_n());
    let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
        let mut out = vec![0.0; n * g.out_n()];
        k.forward(&mut out, x, w, Some(b), EpilogueArgs::default()).unwrap();
        out.iter().zip(&r).map(|(&o, &r)| o as f64 * r as f64).sum()
    };
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; b.len()]);
    k.backward_data(&mut dx, &r, &w).unwrap();
    k.backward_weight(&mut dw, Some(&mut db), &r, &x).unwrap();
    let h = 1e-2f32;
    let fd = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
        let (mut a, mut c) = (v.to_vec(), v.to_vec());
        a[i] += h;
        c[i] -= h;
        ((f(&a) - f(&c)) / (2.0 * h as f64)) as f32
    };
    for i in (0..x.len()).step_by(7) {
        let want = fd(&x, i, &|x| loss(x, &w, &b));
        assert!((dx[i] - want).abs() < 2e-2 * (1.0 + want.abs()), "d_x[{i}]: {} vs fd {want}", dx[i]);
    }
    for i in (0..w.len()).step_by(3) {
        let want = fd(&w, i, &|w| loss(&x, w, &b));
        assert!((dw[i] - want).abs() < 2e-2 * (1.0 + want.abs()), "d_w[{i}]: {} vs fd {want}", dw[i]);
    }
    for (i, &got) in db.iter().enumerate() {
        let want = fd(&b, i, &|b| loss(&x, &w, b));
        assert!((got - want).abs() < 2e-2 * (1.0 + want.abs()), "d_b[{i}]: {got} vs fd {want}");
    }
}

#[test]
fn bad_buffers_are_errors_not_panics() {
    let g = G { cin: 3, h: 5, w: 5, cout: 4, k: [3, 3], s: [1, 1], p: [1, 1, 1, 1], d: [1, 1], g: 1 };
    let k = ConvKernels::compile("conv7", &g.conv(true), (3, 5, 5), Epilogue::default(), Mode::Blocked).unwrap();
    let x = vec![0.5; 2 * g.in_n()];
    let w = vec![0.5; 4 * 27];
    let b = vec![0.0; 4];
    let mut out = vec![0.0; 2 * g.out_n()];
    let e = k.forward(&mut out[1..], &x, &w, Some(&b), EpilogueArgs::default()).unwrap_err();
    assert!(e.to_string().contains("conv7") && e.to_string().contains("output"), "{e}");
    assert!(k.forward(&mut out, &x[1..], &w, Some(&b), EpilogueArgs::default()).is_err());
    assert!(k.forward(&mut out, &x, &w[1..], Some(&b), EpilogueArgs::default()).is_err());
    assert!(k.forward(&mut out, &x, &w, None, EpilogueArgs::default()).is_err());
    assert!(k.forward(&mut out, &x, &w, Some(&b[1..]), EpilogueArgs::default()).is_err());
    let res = vec![0.0; out.len()];
    assert!(k.forward(&mut out, &x, &w, Some(&b), EpilogueArgs { residual: Some(&res), ..Default::default() }).is_err());
    let mut dx = vec![0.0; x.len()];
    assert!(k.backward_data(&mut dx, &out[2..], &w).is_err());
    let mut dw = vec![0.0; w.len()];
    assert!(k.backward_weight(&mut dw, None, &out, &x).is_err());
    assert!(k.backward_weight(&mut dw[1..], Some(&mut dx[..4]), &out, &x).is_err());
    // Geometry errors.
    let bad = Conv2d { groups: 2, ..g.conv(true) };
    assert!(ConvKernels::compile("c", &bad, (3, 5, 5), Epilogue::default(), Mode::Blocked).is_err());
    let big = Conv2d { kernel: [7, 7], padding: Padding::uniform(0), ..g.conv(true) };
    assert!(ConvKernels::compile("c", &big, (3, 5, 5), Epilogue::default(), Mode::Blocked).is_err());
    let slice = Epilogue { concat: Some(ChannelSlice { total: 5, offset: 2 }), ..Default::default() };
    assert!(ConvKernels::compile("c", &g.conv(true), (3, 5, 5), slice, Mode::Blocked).is_err());
}

#[test]
fn forward_only_kernels_run_forward_and_refuse_backward() {
    let mut rng = StdRng::seed_from_u64(91);
    // Winograd (3x3, 16 channels), 1-D Winograd (1x3, 48), direct 3x3, 1x1, strided.
    for (g, algo) in [
        (G { cin: 16, h: 7, w: 9, cout: 16, k: [3, 3], s: [1, 1], p: [1, 1, 1, 1], d: [1, 1], g: 1 }, "winograd"),
        (G { cin: 48, h: 5, w: 8, cout: 48, k: [1, 3], s: [1, 1], p: [0, 0, 1, 1], d: [1, 1], g: 1 }, "winograd 1-D"),
        (G { cin: 5, h: 7, w: 9, cout: 6, k: [3, 3], s: [1, 1], p: [1, 1, 1, 1], d: [1, 1], g: 1 }, "direct"),
        (G { cin: 5, h: 7, w: 9, cout: 6, k: [1, 1], s: [1, 1], p: [0, 0, 0, 0], d: [1, 1], g: 1 }, "1x1"),
        (G { cin: 5, h: 7, w: 9, cout: 6, k: [3, 3], s: [2, 2], p: [1, 1, 1, 1], d: [1, 1], g: 1 }, "strided"),
    ] {
        let opts = ConvOptions { forward_only: true, ..Default::default() };
        let k = ConvKernels::compile_with("part", &g.conv(true), (g.cin, g.h, g.w), Epilogue::default(), Mode::Blocked, opts).unwrap();
        let full = ConvKernels::compile("whole", &g.conv(true), (g.cin, g.h, g.w), Epilogue::default(), Mode::Blocked).unwrap();
        assert!(k.kernel_count() < full.kernel_count(), "{algo}: {} kernels, the whole layer {}", k.kernel_count(), full.kernel_count());
        let (x, w, b) = (rand_vec(&mut rng, 2 * g.in_n()), rand_vec(&mut rng, g.cout * g.cin * g.k[0] * g.k[1]), rand_vec(&mut rng, g.cout));
        let mut out = vec![0.0; 2 * g.out_n()];
        k.forward(&mut out, &x, &w, Some(&b), EpilogueArgs::default()).unwrap();
        close(&out, &ref_forward(&g, &x, &w, Some(&b), 2), algo);
        let mut dx = vec![0.0; x.len()];
        let e = k.backward_data(&mut dx, &out, &w).unwrap_err().to_string();
        assert!(e.contains("part") && e.contains("forward only"), "{algo}: {e}");
        let mut dw = vec![0.0; w.len()];
        let e = k.backward_weight(&mut dw, None, &out, &x).unwrap_err().to_string();
        assert!(e.contains("part") && e.contains("forward only"), "{algo}: {e}");
    }
}

#[test]
fn kernels_are_send_sync_and_split_by_sample() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ConvKernels>();
    let mut rng = StdRng::seed_from_u64(15);
    let g = G { cin: 5, h: 9, w: 7, cout: 6, k: [3, 3], s: [1, 1], p: [1, 1, 1, 1], d: [1, 1], g: 1 };
    let n = 5;
    let k = ConvKernels::compile("c", &g.conv(false), (g.cin, g.h, g.w), Epilogue::default(), Mode::Blocked).unwrap();
    let x = rand_vec(&mut rng, n * g.in_n());
    let w = rand_vec(&mut rng, g.cout * g.cin * 9);
    let mut whole = vec![0.0; n * g.out_n()];
    k.forward(&mut whole, &x, &w, None, EpilogueArgs::default()).unwrap();
    let mut split = vec![0.0; n * g.out_n()];
    std::thread::scope(|sc| {
        for (o, xi) in split.chunks_mut(2 * g.out_n()).zip(x.chunks(2 * g.in_n())) {
            let (k, w) = (&k, &w);
            sc.spawn(move || k.forward(o, xi, w, None, EpilogueArgs::default()).unwrap());
        }
    });
    assert_eq!(whole, split);
}

/// `Conv2d::transposed` on transposed planes computes the transposed output: every plane's
/// rows and columns swapped in, the taps transposed (`w'[co][ci][x][y] = w[co][ci][y][x]`,
/// the same memory for 1xk and kx1), the output planes come out transposed, for 1x3 and 3x1
/// on the 1-D Winograd, asymmetric padding, strides, dilation and groups.
#[test]
fn transposed_convolutions_compute_transposed_outputs() {
    let mut rng = StdRng::seed_from_u64(77);
    let tr = |x: &[f32], (r, c): (usize, usize)| -> Vec<f32> {
        let mut o = vec![0.0; x.len()];
        for (o, p) in o.chunks_exact_mut(r * c).zip(x.chunks_exact(r * c)) {
            for i in 0..r {
                for j in 0..c {
                    o[j * r + i] = p[i * c + j];
                }
            }
        }
        o
    };
    let cases = [
        (Conv2d::new(48, [1, 3]).pad(Padding::hw(0, 1)).bias(false), 48, (5, 9)),
        (Conv2d::new(48, [3, 1]).pad(Padding::hw(1, 0)), 48, (6, 4)),
        (Conv2d::new(6, [2, 3]).pad(Padding::Explicit { top: 1, bottom: 0, left: 2, right: 1 }), 4, (7, 5)),
        (Conv2d { stride: [1, 2], dilation: [2, 1], groups: 2, ..Conv2d::new(6, [3, 2]) }.pad(Padding::Same), 4, (9, 8)),
    ];
    for (conv, cin, (h, w)) in cases {
        let n = 2;
        let t = conv.transposed();
        let a = ConvKernels::compile("a", &conv, (cin, h, w), Epilogue::default(), Mode::Blocked).unwrap();
        let b = ConvKernels::compile("b", &t, (cin, w, h), Epilogue::default(), Mode::Blocked).unwrap();
        let (ga, gb) = (a.geometry(), b.geometry());
        assert_eq!((gb.oh, gb.ow), (ga.ow, ga.oh), "{conv:?}: output size");
        let [kh, kw] = conv.kernel;
        let wa = rand_vec(&mut rng, ga.weight_numel());
        let wb = tr(&wa, (kh, kw));
        let bias = conv.bias.then(|| rand_vec(&mut rng, conv.out_channels));
        let x = rand_vec(&mut rng, n * cin * h * w);
        let mut ya = vec![0.0; n * conv.out_channels * ga.oh * ga.ow];
        let mut yb = ya.clone();
        a.forward(&mut ya, &x, &wa, bias.as_deref(), EpilogueArgs::default()).unwrap();
        b.forward(&mut yb, &tr(&x, (h, w)), &wb, bias.as_deref(), EpilogueArgs::default()).unwrap();
        close(&yb, &tr(&ya, (ga.oh, ga.ow)), &format!("{conv:?}"));
    }
}

/// Every GEMM broadcast variant (`ConvOptions::broadcast`) computes every pass of every
/// geometry above, and of layers on the 2-D and 1-D Winograd paths, to the same bits: the
/// host picks one by speed alone.
#[test]
fn broadcast_variants_agree_bit_for_bit() {
    use cnnc_compiler::lower::gemm::Broadcast;
    let g = |cin, h, w, cout, k, p| G { cin, h, w, cout, k, s: [1, 1], p, d: [1, 1], g: 1 };
    let mut all = geometries();
    all.push(g(16, 10, 12, 20, [3, 3], [1, 1, 1, 1]));
    all.push(g(48, 6, 13, 52, [1, 3], [0, 0, 1, 1]));
    all.push(g(48, 13, 6, 50, [3, 1], [1, 1, 0, 0]));
    let mut rng = StdRng::seed_from_u64(17);
    let n = 3;
    for (gi, g) in all.iter().enumerate() {
        let x = rand_vec(&mut rng, n * g.in_n());
        let w = rand_vec(&mut rng, g.cout * g.cin / g.g * g.k[0] * g.k[1]);
        let b = rand_vec(&mut rng, g.cout);
        let dout = rand_vec(&mut rng, n * g.out_n());
        // Per variant: output, input gradient, weight gradient, bias gradient (then the paths).
        let runs: Vec<([Vec<f32>; 4], String)> = Broadcast::ALL
            .into_iter()
            .map(|bc| {
                let opts = ConvOptions { broadcast: Some(bc), ..Default::default() };
                let k = ConvKernels::compile_with("c", &g.conv(true), (g.cin, g.h, g.w), Epilogue::default(), Mode::Blocked, opts).unwrap();
                let mut out = vec![0.0; n * g.out_n()];
                k.forward(&mut out, &x, &w, Some(&b), EpilogueArgs::default()).unwrap();
                let mut dx = vec![0.5; x.len()];
                k.backward_data(&mut dx, &dout, &w).unwrap();
                let (mut dw, mut db) = (vec![0.25; w.len()], vec![0.0; g.cout]);
                k.backward_weight(&mut dw, Some(&mut db), &dout, &x).unwrap();
                ([out, dx, dw, db], k.algorithms().join("/"))
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let f = &runs[0];
        let what = format!("geometry {gi} {g:?} ({})", f.1);
        if gi >= all.len() - 3 {
            assert!(f.1.starts_with("winograd"), "{what}: expected the Winograd paths");
        }
        close(&f.0[0], &ref_forward(g, &x, &w, Some(&b), n), &format!("{what}: forward"));
        for (bc, l) in Broadcast::ALL.iter().zip(&runs).skip(1) {
            for (i, pass) in ["forward", "backward data", "weight gradient", "bias gradient"].iter().enumerate() {
                assert!(bits(&f.0[i]) == bits(&l.0[i]), "{what}: {pass} with {bc:?} differs from Folded");
            }
        }
    }
}
