//! One-dimensional Winograd (1x3 and 3x1 layers, `F(m, 3)` forward and backward data, `F(3, m)`
//! weight gradient) against nested-loop references: odd sizes (partial tiles), paddings 0/1/2
//! and asymmetric along the filtered axis, channel counts at and above the threshold and not
//! multiples of 4 or 8, batches 1 and 3, every epilogue, accumulation into non-zero buffers,
//! concat slices; both tile sizes through the module's own API.
#![cfg(feature = "jit")]

mod common;

use cnnc_compiler::ir::{Conv2d, Padding};
use cnnc_compiler::lower::conv::WINOGRAD_1D_MIN_CHANNELS;
use cnnc_compiler::lower::jit::Jit;
use cnnc_compiler::lower::winograd::WinoEpi;
use cnnc_compiler::lower::winograd1d::{Axis, Wino1dPlan, Wino1dScratch, Wino1dShape, Wino1dWgradPlan, Wino1dWgradScratch};
use cnnc_compiler::lower::{ChannelSlice, ConvKernels, ConvOptions, Epilogue, FusedAct, Mode};
use common::{assert_close, batches, check_epilogues, rand_vec, tap};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A layer: `(cin, cout, (h, w), kernel [kh, kw], pads [top, bottom, left, right])`.
type Case = (usize, usize, (usize, usize), [usize; 2], [usize; 4]);

const C: usize = WINOGRAD_1D_MIN_CHANNELS;

/// 3x1 and 1x3 layers: odd sizes, pads 0, 1, 2 and asymmetric, several blocks of units (the
/// last shorter), channels at and above the threshold, rows of whole lane groups (3x1) and of
/// whole tiles (1x3) as well as partial ones.
const CASES: [Case; 16] = [
    (C, C, (7, 9), [3, 1], [1, 1, 0, 0]),
    (C, C, (7, 9), [1, 3], [0, 0, 1, 1]),
    (C + 1, C + 9, (13, 5), [3, 1], [0, 0, 0, 0]),
    (C + 9, C + 1, (13, 5), [1, 3], [0, 0, 0, 0]),
    (C + 3, C + 5, (9, 11), [3, 1], [2, 2, 0, 0]),
    (C + 5, C + 3, (11, 9), [1, 3], [0, 0, 2, 2]),
    (C + 8, C + 11, (10, 7), [3, 1], [0, 2, 0, 0]),
    (C + 11, C + 8, (7, 10), [1, 3], [0, 0, 2, 1]),
    (48, 64, (32, 32), [1, 3], [0, 0, 1, 1]),
    (64, 64, (32, 32), [3, 1], [1, 1, 0, 0]),
    // 3x1 with rows a multiple of 8 wide and a partial last tile row.
    (C, C + 3, (13, 16), [3, 1], [0, 2, 0, 0]),
    (C, C + 2, (6, 300), [3, 1], [1, 1, 0, 0]),
    (C + 2, C, (300, 6), [1, 3], [0, 0, 1, 0]),
    // 1x3 rows of whole groups of four tiles and a partial group after them (F(4, 3) splits
    // and interleaves four tiles at a time): 6 and 10 tiles, pads 2 / 1 and 1 / 1.
    (C + 2, C + 1, (5, 23), [1, 3], [0, 0, 2, 1]),
    (C, C, (3, 37), [1, 3], [0, 0, 1, 1]),
    // ... and unpadded: one whole group of four tiles (16 outputs from 18 inputs).
    (C + 1, C, (4, 18), [1, 3], [0, 0, 0, 0]),
];

/// Output size of a layer.
fn out_hw((_, _, (h, wd), k, p): Case) -> (usize, usize) {
    (h + p[0] + p[1] + 1 - k[0], wd + p[2] + p[3] + 1 - k[1])
}

/// Every `(s, co, ci, oy, ox, tap t, input index)` of the convolution of `n` samples.
fn for_each_mac(case: Case, n: usize, mut f: impl FnMut(usize, usize, usize, usize, usize, usize, usize)) {
    let (cin, cout, hw, k, p) = case;
    let (oh, ow) = out_hw(case);
    for s in 0..n {
        for co in 0..cout {
            for ci in 0..cin {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for t in 0..3 {
                            let (ky, kx) = if k[0] == 3 { (t, 0) } else { (0, t) };
                            if let Some(i) = tap(s, ci, cin, hw, p, oy + ky, ox + kx) {
                                f(s, co, ci, oy, ox, t, i);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `[n, cout, oh, ow]` with bias.
fn reference(case: Case, x: &[f32], w: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let (cin, cout, ..) = case;
    let (oh, ow) = out_hw(case);
    let mut out: Vec<f64> = (0..n * cout * oh * ow).map(|i| b[(i / (oh * ow)) % cout] as f64).collect();
    for_each_mac(case, n, |s, co, ci, oy, ox, t, i| {
        out[((s * cout + co) * oh + oy) * ow + ox] += (x[i] * w[(co * cin + ci) * 3 + t]) as f64;
    });
    out.into_iter().map(|v| v as f32).collect()
}

fn conv(case: Case) -> Conv2d {
    let (_, cout, _, k, p) = case;
    Conv2d::new(cout, k).pad(Padding::Explicit { top: p[0], bottom: p[1], left: p[2], right: p[3] })
}

fn compile(case: Case, epi: Epilogue, bias: bool) -> ConvKernels {
    let (cin, _, (h, wd), ..) = case;
    let c = Conv2d { bias, ..conv(case) };
    ConvKernels::compile_with("wino1d", &c, (cin, h, wd), epi, Mode::Blocked, ConvOptions { winograd: true, ..Default::default() }).unwrap()
}

#[test]
fn winograd1d_forward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(31);
    for case in CASES {
        let (cin, cout, (h, wd), ..) = case;
        let (oh, ow) = out_hw(case);
        let w = rand_vec(&mut rng, cout * cin * 3);
        let b = rand_vec(&mut rng, cout);
        for n in [1, 3] {
            let x = rand_vec(&mut rng, n * cin * h * wd);
            let base = reference(case, &x, &w, &b, n);
            let what = format!("{case:?} batch {n}");
            check_epilogues(&mut rng, &base, &b, n, cout, oh * ow, &what, |epi, bias, out, extra| {
                let k = compile(case, epi, bias);
                assert_eq!(k.algorithms(), ["winograd"; 3], "{what}");
                k.forward(out, &x, &w, bias.then_some(&b[..]), extra).unwrap();
            });
        }
    }
}

/// Backward data (the forward machinery on the output gradient padded by `2 - pad`, flipped
/// transposed weights), accumulating into a non-zero `d_x`.
#[test]
fn winograd1d_backward_data_matches_reference() {
    let mut rng = StdRng::seed_from_u64(32);
    for case in CASES {
        let (cin, cout, (h, wd), ..) = case;
        let (oh, ow) = out_hw(case);
        let w = rand_vec(&mut rng, cout * cin * 3);
        for (n, slice) in batches(cout) {
            let what = format!("{case:?} batch {n} {slice:?}");
            let k = compile(case, Epilogue { concat: slice, ..Default::default() }, false);
            assert_eq!(k.algorithms(), ["winograd"; 3], "{what}");
            let cs = slice.unwrap_or(ChannelSlice { total: cout, offset: 0 });
            let dout = rand_vec(&mut rng, n * cs.total * oh * ow);
            let dx0 = rand_vec(&mut rng, n * cin * h * wd);
            let mut want: Vec<f64> = dx0.iter().map(|&v| v as f64).collect();
            for_each_mac(case, n, |s, co, ci, oy, ox, t, i| {
                want[i] += (w[(co * cin + ci) * 3 + t] * dout[((s * cs.total + cs.offset + co) * oh + oy) * ow + ox]) as f64;
            });
            let mut dx = dx0.clone();
            k.backward_data(&mut dx, &dout, &w).unwrap();
            assert_close(&dx, &want, 4e-5, &what);
        }
    }
}

/// Weight gradient (`F(3, m)` over every tile), accumulating into non-zero `d_w` / `d_b`.
#[test]
fn winograd1d_weight_gradient_matches_reference() {
    let mut rng = StdRng::seed_from_u64(33);
    for case in CASES {
        let (cin, cout, (h, wd), ..) = case;
        let (oh, ow) = out_hw(case);
        for (n, slice) in batches(cout) {
            let what = format!("{case:?} batch {n} {slice:?}");
            let k = compile(case, Epilogue { concat: slice, ..Default::default() }, true);
            assert_eq!(k.algorithms(), ["winograd"; 3], "{what}");
            let cs = slice.unwrap_or(ChannelSlice { total: cout, offset: 0 });
            let x = rand_vec(&mut rng, n * cin * h * wd);
            let dout = rand_vec(&mut rng, n * cs.total * oh * ow);
            let (dw0, db0) = (rand_vec(&mut rng, cout * cin * 3), rand_vec(&mut rng, cout));
            let mut want: Vec<f64> = dw0.iter().map(|&v| v as f64).collect();
            let mut want_b: Vec<f64> = db0.iter().map(|&v| v as f64).collect();
            for s in 0..n {
                for (co, wb) in want_b.iter_mut().enumerate() {
                    let o = (s * cs.total + cs.offset + co) * oh * ow;
                    *wb += dout[o..o + oh * ow].iter().map(|&v| v as f64).sum::<f64>();
                }
            }
            for_each_mac(case, n, |s, co, ci, oy, ox, t, i| {
                want[(co * cin + ci) * 3 + t] += (x[i] * dout[((s * cs.total + cs.offset + co) * oh + oy) * ow + ox]) as f64;
            });
            let (mut dw, mut db) = (dw0.clone(), db0.clone());
            k.backward_weight(&mut dw, Some(&mut db), &dout, &x).unwrap();
            // The sums run over n*OH*OW products of magnitude <= 1.
            let tol = 4e-6 * (n * oh * ow) as f64 + 1e-5;
            for (i, (g, w)) in dw.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= tol, "{what}: d_w element {i}: got {g}, want {w}");
            }
            for (i, (g, w)) in db.iter().zip(&want_b).enumerate() {
                assert!((*g as f64 - w).abs() <= tol, "{what}: d_b element {i}: got {g}, want {w}");
            }
        }
    }
}

/// Both tile sizes (`F(2, 3)` and `F(4, 3)`) through the module's API: forward with bias and
/// weight gradient of a 3x1 and a 1x3 layer.
#[test]
fn winograd1d_both_tile_sizes() {
    let mut rng = StdRng::seed_from_u64(34);
    for m in [2, 4] {
        for case in [CASES[2], CASES[3], CASES[6], CASES[7]] {
            let (cin, cout, (h, wd), k, p) = case;
            let (oh, ow) = out_hw(case);
            let (axis, pad) = if k[0] == 3 { (Axis::Rows, p[0]) } else { (Axis::Cols, p[2]) };
            let shape = Wino1dShape { axis, m, cin, cout, h, w: wd, pad, oh, ow };
            let mut jit = Jit::new("wino1d").unwrap();
            let (fp, wp) = (Wino1dPlan::define(&mut jit, shape).unwrap(), Wino1dWgradPlan::define(&mut jit, shape).unwrap());
            let fin = jit.finish().unwrap();
            let (fwd, wgrad) = (fp.resolve(&fin), wp.resolve(&fin));
            let what = format!("F({m}, 3) {case:?}");
            let (x, w, b) = (rand_vec(&mut rng, cin * h * wd), rand_vec(&mut rng, cout * cin * 3), rand_vec(&mut rng, cout));
            let want = reference(case, &x, &w, &b, 1);
            let mut s = Wino1dScratch::default();
            fwd.prepare(&w, &mut s);
            let mut out = vec![0.0f32; cout * oh * ow];
            let epi = WinoEpi { bias: &b, scale: &[], shift: &[], residual: &[], act: FusedAct::None, accumulate: false };
            fwd.forward_sample(&mut out, &x, &mut s, &epi);
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{what}: element {i}: got {g}, want {w}");
            }
            let dy = rand_vec(&mut rng, cout * oh * ow);
            let mut want_w = vec![0.0f64; cout * cin * 3];
            for_each_mac(case, 1, |_, co, ci, oy, ox, t, i| {
                want_w[(co * cin + ci) * 3 + t] += (x[i] * dy[(co * oh + oy) * ow + ox]) as f64;
            });
            let mut ws = Wino1dWgradScratch::default();
            wgrad.begin(&mut ws);
            wgrad.accumulate_sample(&x, &dy, &mut ws);
            let mut dw = vec![0.0f32; cout * cin * 3];
            wgrad.finish(&mut dw, &ws);
            let tol = 4e-6 * (oh * ow) as f64 + 1e-5;
            for (i, (g, w)) in dw.iter().zip(&want_w).enumerate() {
                assert!((*g as f64 - w).abs() <= tol, "{what}: d_w element {i}: got {g}, want {w}");
            }
        }
    }
}

#[test]
fn winograd1d_only_where_eligible() {
    let c = Conv2d::new(C, [1, 3]).pad(Padding::Explicit { top: 0, bottom: 0, left: 1, right: 1 });
    let k = ConvKernels::compile("c", &c, (C, 8, 8), Epilogue::default(), Mode::Blocked).unwrap();
    assert_eq!(k.algorithms(), ["winograd"; 3], "default options");
    let off = ConvOptions { winograd: false, ..Default::default() };
    let k = ConvKernels::compile_with("c", &c, (C, 8, 8), Epilogue::default(), Mode::Blocked, off).unwrap();
    assert_eq!(k.algorithms()[0], "direct", "switched off");
    let on = ConvOptions { winograd: true, ..Default::default() };
    // Too few channels, padding across the filtered axis, stride 2, dilation 2, groups, a
    // longer kernel: not eligible.
    for (conv, cin) in [
        (c, C - 1),
        (Conv2d::new(C - 1, [1, 3]).pad(Padding::uniform(0)), C),
        (Conv2d::new(C, [1, 3]).pad(Padding::uniform(1)), C),
        (Conv2d::new(C, [3, 1]).pad(Padding::uniform(1)), C),
        (c.stride(2), C),
        (Conv2d { dilation: [1, 2], ..c }, C),
        (Conv2d { groups: 2, ..c }, C),
        (Conv2d::new(C, [1, 5]), C),
    ] {
        let k = ConvKernels::compile_with("c", &conv, (cin, 12, 12), Epilogue::default(), Mode::Blocked, on).unwrap();
        assert_ne!(k.algorithms()[0], "winograd", "{conv:?} on {cin} channels");
    }
    // Backward data needs the padding before the input <= 2 along the filtered axis.
    let p3 = Conv2d::new(C, [3, 1]).pad(Padding::Explicit { top: 3, bottom: 0, left: 0, right: 0 });
    let k = ConvKernels::compile_with("c", &p3, (C, 12, 12), Epilogue::default(), Mode::Blocked, on).unwrap();
    assert_eq!(k.algorithms()[0], "winograd");
    assert_ne!(k.algorithms()[1], "winograd");
}

