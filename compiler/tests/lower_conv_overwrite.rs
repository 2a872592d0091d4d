//! Backward data compiled to overwrite its input gradient (`ConvOptions::overwrite_dx`, for a
//! layer whose input gradient starts its life there): on every kernel (2-D and 1-D Winograd,
//! the direct GEMMs of stride-1 layers and the packed 1x1, which store; the strided (col2im)
//! and naive kernels, which zero each sample's share before accumulating), a `d_x` full of NaN
//! comes back equal to what the accumulating kernel adds to zeros, so every element is written
//! and none read; without the option every kernel adds to what `d_x` holds.
#![cfg(feature = "jit")]

mod common;

use cnnc_compiler::ir::{Conv2d, Padding};
use cnnc_compiler::lower::{ConvKernels, ConvOptions, Epilogue, Mode};
use common::rand_vec;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn pad(t: usize, b: usize, l: usize, r: usize) -> Padding {
    Padding::Explicit { top: t, bottom: b, left: l, right: r }
}

#[test]
fn overwriting_backward_data_stores_every_element() {
    let mut rng = StdRng::seed_from_u64(51);
    // (cin, (h, w), conv, backward-data algorithm)
    let cases = [
        (16, (9, 11), Conv2d::new(17, [3, 3]).pad(Padding::uniform(1)), "winograd"),
        (48, (7, 10), Conv2d::new(48, [1, 3]).pad(pad(0, 0, 1, 1)), "winograd"),
        (48, (10, 7), Conv2d::new(49, [3, 1]).pad(pad(1, 1, 0, 0)), "winograd"),
        (5, (6, 13), Conv2d::new(7, [3, 3]).pad(Padding::uniform(1)), "direct"),
        (6, (9, 9), Conv2d::new(10, [1, 1]), "direct"),
        (13, (2, 3), Conv2d::new(10, [1, 1]), "1x1"),
        (3, (7, 5), Conv2d::new(5, [3, 3]).stride(2).pad(pad(0, 1, 1, 0)), "im2col"),
    ];
    let opts = ConvOptions { overwrite_dx: true, ..Default::default() };
    for (cin, (h, w), conv, algo) in cases {
        let cout = conv.out_channels;
        let what = format!("{cin}->{cout} {:?} {h}x{w}", conv.kernel);
        let acc = ConvKernels::compile("c", &conv, (cin, h, w), Epilogue::default(), Mode::Blocked).unwrap();
        let ovw = ConvKernels::compile_with("c", &conv, (cin, h, w), Epilogue::default(), Mode::Blocked, opts).unwrap();
        assert_eq!(ovw.algorithms()[1], algo, "{what}");
        check(&acc, &ovw, &mut rng, &what);
    }
    // The naive kernels, strided or not.
    for conv in [Conv2d::new(4, [3, 3]).pad(Padding::uniform(1)), Conv2d::new(4, [3, 3]).stride(2)] {
        let acc = ConvKernels::compile("c", &conv, (3, 5, 5), Epilogue::default(), Mode::Naive).unwrap();
        let ovw = ConvKernels::compile_with("c", &conv, (3, 5, 5), Epilogue::default(), Mode::Naive, opts).unwrap();
        check(&acc, &ovw, &mut rng, &format!("naive stride {:?}", conv.stride));
    }
}

/// `ovw` (overwriting) writes over a NaN-filled `d_x` what `acc` adds to zeros; `acc` adds to a
/// non-zero `d_x`.
fn check(acc: &ConvKernels, ovw: &ConvKernels, rng: &mut StdRng, what: &str) {
    let g = *acc.geometry();
    let wt = rand_vec(rng, g.weight_numel());
    for n in [1, 3] {
        let d_out = rand_vec(rng, n * g.cout * g.oh * g.ow);
        let mut want = vec![0.0; n * g.in_numel()];
        acc.backward_data(&mut want, &d_out, &wt).unwrap();
        let mut got = vec![f32::NAN; want.len()];
        ovw.backward_data(&mut got, &d_out, &wt).unwrap();
        assert_eq!(got, want, "{what} batch {n}");
        let base = rand_vec(rng, want.len());
        let mut sum = base.clone();
        acc.backward_data(&mut sum, &d_out, &wt).unwrap();
        for (i, ((s, b), w)) in sum.iter().zip(&base).zip(&want).enumerate() {
            assert!((s - (b + w)).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: element {i}");
        }
    }
}
