//! Winograd F(2x2, 3x3) forward (on by default for eligible layers) against a nested-loop
//! reference: odd sizes (partial 2x2 output tiles), pads 0/1/2 and asymmetric, channel counts
//! that are not multiples of 4 or 8, batches 1 and 3, every epilogue.
#![cfg(feature = "jit")]

use cnnc_compiler::ir::{Conv2d, Padding};
mod common;

use cnnc_compiler::lower::{ChannelSlice, ConvKernels, ConvOptions, Epilogue, Mode};
use common::{assert_close, batches, check_epilogues, rand_vec, tap};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `[n, cout, oh, ow]` of a 3x3 stride-1 convolution with bias.
#[allow(clippy::too_many_arguments)]
fn reference(x: &[f32], w: &[f32], b: &[f32], n: usize, cin: usize, cout: usize, (h, wd): (usize, usize), p: [usize; 4]) -> (Vec<f32>, usize, usize) {
    let (oh, ow) = (h + p[0] + p[1] - 2, wd + p[2] + p[3] - 2);
    let mut out = vec![0.0f32; n * cout * oh * ow];
    for s in 0..n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b[co] as f64;
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let Some(i) = tap(s, ci, cin, (h, wd), p, oy + ky, ox + kx) else { continue };
                                let xv = x[i];
                                acc += (xv * w[((co * cin + ci) * 3 + ky) * 3 + kx]) as f64;
                            }
                        }
                    }
                    out[((s * cout + co) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    (out, oh, ow)
}

/// `(cin, cout, (h, w), pads)`.
type Case = (usize, usize, (usize, usize), [usize; 4]);

/// The backward passes' cases: odd sizes, paddings 0-2 and asymmetric, 16-29 channels, several
/// blocks of tile rows (the last one shorter) and one tile row per block.
const BACKWARD_CASES: [Case; 9] = [
    (24, 25, (7, 9), [1, 1, 1, 1]),
    (17, 16, (9, 7), [1, 1, 1, 1]),
    (25, 24, (10, 11), [0, 0, 0, 0]),
    (24, 26, (6, 5), [2, 2, 2, 2]),
    (27, 29, (9, 8), [0, 2, 1, 0]),
    (29, 25, (13, 5), [1, 1, 1, 1]),
    (24, 27, (13, 5), [0, 0, 0, 0]),
    (24, 24, (30, 29), [1, 1, 1, 1]),
    (24, 24, (5, 350), [1, 0, 1, 0]),
];

/// A 3x3 convolution to `cout` channels with paddings `[top, bottom, left, right]`.
fn conv3x3(cout: usize, p: [usize; 4]) -> Conv2d {
    Conv2d::new(cout, [3, 3]).pad(Padding::Explicit { top: p[0], bottom: p[1], left: p[2], right: p[3] })
}

#[test]
fn winograd_forward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    let cases: [Case; 11] = [
        (24, 25, (7, 9), [1, 1, 1, 1]),
        (16, 17, (9, 7), [1, 1, 1, 1]),
        (25, 24, (10, 11), [0, 0, 0, 0]),
        (24, 24, (6, 5), [2, 2, 2, 2]),
        (27, 29, (9, 8), [0, 2, 1, 0]),
        (24, 32, (13, 13), [1, 1, 1, 1]),
        (32, 24, (20, 18), [1, 1, 1, 1]),
        (29, 27, (13, 5), [0, 0, 0, 0]),
        (25, 31, (13, 5), [1, 1, 1, 1]),
        // Several blocks of tile rows; a tile row longer than a block (one row per block).
        (24, 24, (30, 29), [1, 1, 1, 1]),
        (24, 24, (5, 350), [1, 0, 1, 0]),
    ];
    let opts = ConvOptions { winograd: true, ..Default::default() };
    for (cin, cout, hw, p) in cases {
        let conv = conv3x3(cout, p);
        let w = rand_vec(&mut rng, cout * cin * 9);
        let b = rand_vec(&mut rng, cout);
        for n in [1, 3] {
            let x = rand_vec(&mut rng, n * cin * hw.0 * hw.1);
            let (base, oh, ow) = reference(&x, &w, &b, n, cin, cout, hw, p);
            let what = format!("cin {cin} cout {cout} {hw:?} pads {p:?} batch {n}");
            check_epilogues(&mut rng, &base, &b, n, cout, oh * ow, &what, |epi, bias, out, extra| {
                let k = ConvKernels::compile_with("wino", &Conv2d { bias, ..conv }, (cin, hw.0, hw.1), epi, Mode::Blocked, opts).unwrap();
                assert_eq!(k.algorithms()[0], "winograd", "{what}");
                k.forward(out, &x, &w, bias.then_some(&b[..]), extra).unwrap();
            });
        }
    }
}

/// Backward data (a Winograd convolution of the padded output gradient with the flipped,
/// transposed weights) against nested loops, plain and reading a concat slice of `d_out`.
#[test]
fn winograd_backward_data_matches_reference() {
    let mut rng = StdRng::seed_from_u64(22);
    for (cin, cout, (h, wd), p) in BACKWARD_CASES {
        let conv = conv3x3(cout, p);
        let w = rand_vec(&mut rng, cout * cin * 9);
        let (oh, ow) = (h + p[0] + p[1] - 2, wd + p[2] + p[3] - 2);
        for (n, slice) in batches(cout) {
            let what = format!("cin {cin} cout {cout} {h}x{wd} pads {p:?} batch {n} {slice:?}");
            let epi = Epilogue { concat: slice, ..Default::default() };
            let k = ConvKernels::compile_with("wino", &conv, (cin, h, wd), epi, Mode::Blocked, ConvOptions { winograd: true, ..Default::default() }).unwrap();
            assert_eq!(k.algorithms()[..2], ["winograd", "winograd"], "{what}");
            let cs = slice.unwrap_or(ChannelSlice { total: cout, offset: 0 });
            let dout = rand_vec(&mut rng, n * cs.total * oh * ow);
            let dx0 = rand_vec(&mut rng, n * cin * h * wd);
            let mut want: Vec<f64> = dx0.iter().map(|&v| v as f64).collect();
            for s in 0..n {
                for co in 0..cout {
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let wv = w[((co * cin + ci) * 3 + ky) * 3 + kx] as f64;
                                for oy in 0..oh {
                                    for ox in 0..ow {
                                        let Some(i) = tap(s, ci, cin, (h, wd), p, oy + ky, ox + kx) else { continue };
                                        let d = dout[((s * cs.total + cs.offset + co) * oh + oy) * ow + ox] as f64;
                                        want[i] += wv * d;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let mut dx = dx0.clone();
            k.backward_data(&mut dx, &dout, &w).unwrap();
            assert_close(&dx, &want, 4e-5, &what);
        }
    }
}

#[test]
fn winograd_only_where_eligible() {
    let c = Conv2d::new(24, [3, 3]).pad(Padding::uniform(1));
    let on = ConvOptions { winograd: true, ..Default::default() };
    let k = ConvKernels::compile("c", &c, (24, 8, 8), Epilogue::default(), Mode::Blocked).unwrap();
    assert_eq!(k.algorithms()[0], "winograd", "default options");
    let off = ConvOptions { winograd: false, ..Default::default() };
    let k = ConvKernels::compile_with("c", &c, (24, 8, 8), Epilogue::default(), Mode::Blocked, off).unwrap();
    assert_eq!(k.algorithms()[0], "direct", "switched off");
    // Too few input or output channels, stride 2, dilation 2, groups: not eligible.
    for (conv, cin) in [
        (c, 15),
        (Conv2d::new(15, [3, 3]).pad(Padding::uniform(1)), 24),
        (c.stride(2), 24),
        (Conv2d { dilation: [2, 2], ..c }, 24),
        (Conv2d { groups: 2, ..c }, 24),
    ] {
        let k = ConvKernels::compile_with("c", &conv, (cin, 12, 12), Epilogue::default(), Mode::Blocked, on).unwrap();
        assert_ne!(k.algorithms()[0], "winograd", "{conv:?} on {cin} channels");
    }
}

/// Weight gradient (`F(3x3, 2x2)` over every 2x2 tile of the output gradient) against nested
/// loops: accumulating into non-zero `d_w` / `d_b`, plain and reading a concat slice of `d_out`.
#[test]
fn winograd_weight_gradient_matches_reference() {
    let mut rng = StdRng::seed_from_u64(23);
    for (cin, cout, (h, wd), p) in BACKWARD_CASES {
        let conv = conv3x3(cout, p);
        let (oh, ow) = (h + p[0] + p[1] - 2, wd + p[2] + p[3] - 2);
        for (n, slice) in batches(cout) {
            let what = format!("cin {cin} cout {cout} {h}x{wd} pads {p:?} batch {n} {slice:?}");
            let epi = Epilogue { concat: slice, ..Default::default() };
            let k = ConvKernels::compile_with("wino", &conv, (cin, h, wd), epi, Mode::Blocked, ConvOptions { winograd: true, ..Default::default() }).unwrap();
            assert_eq!(k.algorithms(), ["winograd"; 3], "{what}");
            let cs = slice.unwrap_or(ChannelSlice { total: cout, offset: 0 });
            let x = rand_vec(&mut rng, n * cin * h * wd);
            let dout = rand_vec(&mut rng, n * cs.total * oh * ow);
            let (dw0, db0) = (rand_vec(&mut rng, cout * cin * 9), rand_vec(&mut rng, cout));
            let mut want: Vec<f64> = dw0.iter().map(|&v| v as f64).collect();
            let mut want_b: Vec<f64> = db0.iter().map(|&v| v as f64).collect();
            for s in 0..n {
                for co in 0..cout {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let d = dout[((s * cs.total + cs.offset + co) * oh + oy) * ow + ox] as f64;
                            want_b[co] += d;
                            for ci in 0..cin {
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let Some(i) = tap(s, ci, cin, (h, wd), p, oy + ky, ox + kx) else { continue };
                                        let xv = x[i] as f64;
                                        want[((co * cin + ci) * 3 + ky) * 3 + kx] += d * xv;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let (mut dw, mut db) = (dw0.clone(), db0.clone());
            k.backward_weight(&mut dw, Some(&mut db), &dout, &x).unwrap();
            // The sums run over n*OH*OW products of magnitude <= 1.
            let tol = 2e-6 * (n * oh * ow) as f64 + 1e-5;
            for (i, (g, w)) in dw.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= tol, "{what}: d_w element {i}: got {g}, want {w}");
            }
            for (i, (g, w)) in db.iter().zip(&want_b).enumerate() {
                assert!((*g as f64 - w).abs() <= tol, "{what}: d_b element {i}: got {g}, want {w}");
            }
        }
    }
}
