//! Batch statistics stored by a convolution's forward (`EpilogueArgs::stats`, what a training
//! batch norm reading the output combines instead of reading it again): on every kernel kind
//! (implicit im2col, direct 3x3, packed 1x1 with prefetch, naive) and epilogue, each plane's
//! share equals `plane_stats` of the plane the forward stored; the forward's values still
//! match an unfused reference. Winograd kernels get the same check in their own tests
//! (`common::check_epilogues`). Misuse is an error, not wrong output.
#![cfg(feature = "jit")]

mod common;

use cnnc_compiler::ir::{Conv2d, Padding};
use cnnc_compiler::lower::pointwise::PlaneStats;
use cnnc_compiler::lower::{ConvKernels, Epilogue, EpilogueArgs, Mode, SampleHook};
use common::{check_epilogues, rand_vec};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `(name, cin, (h, w), conv, algorithm)`: a layer and the forward kernel kind it gets.
type Case = (&'static str, usize, (usize, usize), Conv2d, &'static str);

/// One layer per forward kernel kind.
fn cases() -> Vec<Case> {
    let pad = |t, b, l, r| Padding::Explicit { top: t, bottom: b, left: l, right: r };
    vec![
        ("3x3 stride 2, asymmetric pads", 3, (7, 5), Conv2d::new(13, [3, 3]).stride(2).pad(pad(0, 1, 1, 0)), "im2col"),
        ("3x3 direct", 5, (6, 12), Conv2d::new(13, [3, 3]).pad(Padding::uniform(1)), "direct"),
        ("1x1 small", 13, (9, 9), Conv2d::new(13, [1, 1]), "direct"),
        ("1x1 past the prefetch size", 72, (61, 61), Conv2d::new(13, [1, 1]), "1x1"),
    ]
}

#[test]
fn forward_stores_each_planes_statistics() {
    let mut rng = StdRng::seed_from_u64(41);
    for (name, cin, (h, w), conv, algo) in cases() {
        let cout = conv.out_channels;
        let wt = rand_vec(&mut rng, cout * cin * conv.kernel[0] * conv.kernel[1]);
        let b = rand_vec(&mut rng, cout);
        for n in [1, 3] {
            let x = rand_vec(&mut rng, n * cin * h * w);
            // The reference: the naive kernel (tested against nested loops in lower_conv.rs).
            let naive = ConvKernels::compile("c", &conv, (cin, h, w), Epilogue::default(), Mode::Naive).unwrap();
            let (oh, ow) = (naive.geometry().oh, naive.geometry().ow);
            let mut base = vec![0.0; n * cout * oh * ow];
            naive.forward(&mut base, &x, &wt, Some(&b), EpilogueArgs::default()).unwrap();
            for mode in [Mode::Blocked, Mode::Naive] {
                let what = format!("{name} batch {n} {mode:?}");
                check_epilogues(&mut rng, &base, &b, n, cout, oh * ow, &what, |epi, bias, out, extra| {
                    let k = ConvKernels::compile("c", &Conv2d { bias, ..conv }, (cin, h, w), epi, mode).unwrap();
                    if mode == Mode::Blocked {
                        assert_eq!(k.algorithms()[0], algo, "{what}");
                    }
                    k.forward(out, &x, &wt, bias.then_some(&b[..]), extra).unwrap();
                });
            }
        }
    }
}

#[test]
fn statistics_of_the_wrong_size_or_of_an_accumulation_are_errors() {
    let mut rng = StdRng::seed_from_u64(42);
    let conv = Conv2d::new(4, [3, 3]).pad(Padding::uniform(1));
    let (n, cin, h, w) = (2, 3, 5, 5);
    let x = rand_vec(&mut rng, n * cin * h * w);
    let wt = rand_vec(&mut rng, 4 * cin * 9);
    let b = rand_vec(&mut rng, 4);
    let mut out = vec![0.0; n * 4 * h * w];
    let k = ConvKernels::compile("c", &conv, (cin, h, w), Epilogue::default(), Mode::Blocked).unwrap();
    let mut short = vec![PlaneStats::default(); n * 4 - 1];
    let e = k.forward(&mut out, &x, &wt, Some(&b), EpilogueArgs { stats: Some(&mut short), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("output statistics") && e.to_string().contains("`c`"), "{e}");
    let acc = ConvKernels::compile("c", &conv, (cin, h, w), Epilogue { accumulate: true, ..Default::default() }, Mode::Blocked).unwrap();
    let mut st = vec![PlaneStats::default(); n * 4];
    let e = acc.forward(&mut out, &x, &wt, Some(&b), EpilogueArgs { stats: Some(&mut st), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("accumulating"), "{e}");
    // The per-sample hook: refused with an accumulating epilogue; its first error is the
    // call's, after every sample was still stored.
    let mut ok = |_: usize, _: &[f32]| Ok(());
    let e = acc.forward(&mut out, &x, &wt, Some(&b), EpilogueArgs { after_sample: Some(SampleHook(&mut ok)), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("accumulating"), "{e}");
    let mut calls = 0;
    let mut fails = |s: usize, _: &[f32]| {
        calls += 1;
        if s == 0 { Err(cnnc_compiler::Error::Codegen { layer: "pool".into(), message: "hook failed".into() }) } else { Ok(()) }
    };
    out.fill(f32::NAN);
    let e = k.forward(&mut out, &x, &wt, Some(&b), EpilogueArgs { after_sample: Some(SampleHook(&mut fails)), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("hook failed"), "{e}");
    assert_eq!(calls, n);
    assert!(out.iter().all(|v| v.is_finite()), "every sample stored");
}
