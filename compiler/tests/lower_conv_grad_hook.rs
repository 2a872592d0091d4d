//! Backward data with a per-sample hook on the output gradient
//! (`ConvKernels::backward_data_with`, where the runtime applies a fused activation's mask):
//! on every backward-data kernel (2-D and 1-D Winograd, direct, packed 1x1, col2im, naive),
//! accumulating or overwriting, in a concatenation slice or not, the hook sees each sample
//! once, in order, with exactly that sample's planes of the layer's channels; the input
//! gradient is bit for bit what plain backward data gives on the gradient the hook finished,
//! and that finished gradient is left in `d_out` (for the weight gradient), the other
//! channels of a shared tensor untouched. A hook's error is the call's error.
#![cfg(feature = "jit")]

mod common;

use cnnc_compiler::ir::{Conv2d, Padding};
use cnnc_compiler::lower::{ChannelSlice, ConvKernels, ConvOptions, Epilogue, GradHook, Mode};
use common::rand_vec;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn pad(t: usize, b: usize, l: usize, r: usize) -> Padding {
    Padding::Explicit { top: t, bottom: b, left: l, right: r }
}

/// The relu-style mask the runtime applies: `d = y > 0 ? d : 0` (a sample's planes `d`, the
/// forward's output `y` of the same planes).
fn mask(d: &mut [f32], y: &[f32]) {
    for (d, &y) in d.iter_mut().zip(y) {
        if y <= 0.0 {
            *d = 0.0;
        }
    }
}

#[test]
fn hooked_backward_data_equals_hook_then_plain() {
    let mut rng = StdRng::seed_from_u64(61);
    // (cin, (h, w), conv, mode, backward-data algorithm)
    let cases = [
        (16, (9, 11), Conv2d::new(17, [3, 3]).pad(Padding::uniform(1)), Mode::Blocked, "winograd"),
        (48, (7, 10), Conv2d::new(48, [1, 3]).pad(pad(0, 0, 1, 1)), Mode::Blocked, "winograd"),
        (48, (10, 7), Conv2d::new(49, [3, 1]).pad(pad(1, 1, 0, 0)), Mode::Blocked, "winograd"),
        (5, (6, 13), Conv2d::new(7, [3, 3]).pad(Padding::uniform(1)), Mode::Blocked, "direct"),
        (6, (9, 9), Conv2d::new(10, [1, 1]), Mode::Blocked, "direct"),
        (13, (2, 3), Conv2d::new(10, [1, 1]), Mode::Blocked, "1x1"),
        (3, (7, 5), Conv2d::new(5, [3, 3]).stride(2).pad(pad(0, 1, 1, 0)), Mode::Blocked, "im2col"),
        (3, (5, 5), Conv2d::new(4, [3, 3]).pad(Padding::uniform(1)), Mode::Naive, "naive"),
        (3, (5, 6), Conv2d::new(4, [3, 3]).stride(2), Mode::Naive, "naive"),
    ];
    for (cin, (h, w), conv, mode, algo) in cases {
        let cout = conv.out_channels;
        for overwrite_dx in [false, true] {
            for concat in [None, Some(ChannelSlice { total: cout + 5, offset: 3 })] {
                let what = format!("{algo} {cin}->{cout} {:?} {h}x{w} overwrite {overwrite_dx} concat {concat:?}", conv.kernel);
                let epi = Epilogue { concat, ..Default::default() };
                let k = ConvKernels::compile_with("c", &conv, (cin, h, w), epi, mode, ConvOptions { overwrite_dx, ..Default::default() }).unwrap();
                assert_eq!(k.algorithms()[1], algo, "{what}");
                check(&k, concat.unwrap_or(ChannelSlice { total: cout, offset: 0 }), &mut rng, &what);
            }
        }
    }
}

fn check(k: &ConvKernels, cs: ChannelSlice, rng: &mut StdRng, what: &str) {
    let g = *k.geometry();
    let p = g.oh * g.ow;
    let wt = rand_vec(rng, g.weight_numel());
    for n in [1, 3] {
        let d_out0 = rand_vec(rng, n * cs.total * p);
        let y = rand_vec(rng, n * cs.total * p);
        let dx0 = rand_vec(rng, n * g.in_numel());
        // Expected: the mask over every sample's slice first, then plain backward data.
        let mut masked = d_out0.clone();
        for s in 0..n {
            let r = (s * cs.total + cs.offset) * p..(s * cs.total + cs.offset + g.cout) * p;
            mask(&mut masked[r.clone()], &y[r]);
        }
        assert_ne!(masked, d_out0, "{what}: the mask must change something");
        let mut want = dx0.clone();
        k.backward_data(&mut want, &masked, &wt).unwrap();
        let mut got = dx0.clone();
        let mut d_out = d_out0.clone();
        let mut seen = Vec::new();
        let mut hook = |s: usize, d: &mut [f32]| {
            assert_eq!(d.len(), g.cout * p, "{what}: sample {s}'s planes");
            let r = (s * cs.total + cs.offset) * p..(s * cs.total + cs.offset + g.cout) * p;
            assert_eq!(d, &d_out0[r.clone()], "{what}: sample {s} given other values than its planes");
            mask(d, &y[r]);
            seen.push(s);
            Ok(())
        };
        k.backward_data_with(&mut got, &mut d_out, &wt, GradHook(&mut hook)).unwrap();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{what}: samples seen");
        assert_eq!(got, want, "{what} batch {n}: input gradient");
        assert_eq!(d_out, masked, "{what} batch {n}: finished gradient left in d_out");
    }
}

#[test]
fn a_hooks_error_is_the_calls_error() {
    for (conv, (h, w), cin) in [(Conv2d::new(17, [3, 3]).pad(Padding::uniform(1)), (9, 11), 16), (Conv2d::new(10, [1, 1]), (2, 3), 13), (Conv2d::new(5, [3, 3]).stride(2), (7, 5), 3)] {
        let k = ConvKernels::compile("c", &conv, (cin, h, w), Epilogue::default(), Mode::Blocked).unwrap();
        let g = *k.geometry();
        let mut d_out = vec![1.0; 3 * g.cout * g.oh * g.ow];
        let mut dx = vec![0.0; 3 * g.in_numel()];
        let wt = vec![0.5; g.weight_numel()];
        let mut calls = 0;
        let mut hook = |s: usize, _: &mut [f32]| {
            calls += 1;
            if s == 1 {
                Err(cnnc_compiler::Error::Codegen { layer: "c".into(), message: "mask failed".into() })
            } else {
                Ok(())
            }
        };
        let e = k.backward_data_with(&mut dx, &mut d_out, &wt, GradHook(&mut hook)).unwrap_err();
        assert!(e.to_string().contains("mask failed"), "{e}");
        assert_eq!(calls, 2, "{:?}: stops at the failing sample", conv.kernel);
    }
}
