//! Backward data compiled to overwrite its input gradient (`ConvOptions::overwrite_dx`, for a
//! layer whose input gradient starts its life there): on every kernel that can (2-D and 1-D
//! Winograd, the direct GEMMs of stride-1 layers, the packed 1x1), a `d_x` full of NaN comes
//! back equal to what the accumulating kernel adds to zeros, so every element is stored and
//! none read; the strided (col2im) and naive kernels say they accumulate, and do.
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
    // (cin, (h, w), conv, backward-data algorithm, overwrites)
    let cases = [
        (16, (9, 11), Conv2d::new(17, [3, 3]).pad(Padding::uniform(1)), "winograd", true),
        (48, (7, 10), Conv2d::new(48, [1, 3]).pad(pad(0, 0, 1, 1)), "winograd", true),
        (48, (10, 7), Conv2d::new(49, [3, 1]).pad(pad(1, 1, 0, 0)), "winograd", true),
        (5, (6, 13), Conv2d::new(7, [3, 3]).pad(Padding::uniform(1)), "direct", true),
        (6, (9, 9), Conv2d::new(10, [1, 1]), "direct", true),
        (13, (2, 3), Conv2d::new(10, [1, 1]), "1x1", true),
        (3, (7, 5), Conv2d::new(5, [3, 3]).stride(2).pad(pad(0, 1, 1, 0)), "im2col", false),
    ];
    for (cin, (h, w), conv, algo, overwrites) in cases {
        let cout = conv.out_channels;
        let what = format!("{cin}->{cout} {:?} {h}x{w}", conv.kernel);
        let acc = ConvKernels::compile("c", &conv, (cin, h, w), Epilogue::default(), Mode::Blocked).unwrap();
        let opts = ConvOptions { overwrite_dx: true, ..Default::default() };
        let ovw = ConvKernels::compile_with("c", &conv, (cin, h, w), Epilogue::default(), Mode::Blocked, opts).unwrap();
        assert_eq!(ovw.algorithms()[1], algo, "{what}");
        assert!(!acc.backward_data_overwrites(), "{what}");
        assert_eq!(ovw.backward_data_overwrites(), overwrites, "{what}");
        let (oh, ow) = (acc.geometry().oh, acc.geometry().ow);
        let wt = rand_vec(&mut rng, cout * cin * conv.kernel[0] * conv.kernel[1]);
        for n in [1, 3] {
            let d_out = rand_vec(&mut rng, n * cout * oh * ow);
            let mut want = vec![0.0; n * cin * h * w];
            acc.backward_data(&mut want, &d_out, &wt).unwrap();
            let start = if overwrites { f32::NAN } else { 0.0 };
            let mut got = vec![start; want.len()];
            ovw.backward_data(&mut got, &d_out, &wt).unwrap();
            assert_eq!(got, want, "{what} batch {n}");
            // Accumulating onto a non-zero gradient adds to it.
            if !overwrites {
                let base = rand_vec(&mut rng, want.len());
                let mut got = base.clone();
                ovw.backward_data(&mut got, &d_out, &wt).unwrap();
                for (i, ((g, b), w)) in got.iter().zip(&base).zip(&want).enumerate() {
                    assert!((g - (b + w)).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: element {i}");
                }
            }
        }
    }
    // The naive kernels always accumulate.
    let conv = Conv2d::new(4, [3, 3]).pad(Padding::uniform(1));
    let opts = ConvOptions { overwrite_dx: true, ..Default::default() };
    assert!(!ConvKernels::compile_with("c", &conv, (3, 5, 5), Epilogue::default(), Mode::Naive, opts).unwrap().backward_data_overwrites());
}
