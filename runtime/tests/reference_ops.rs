//! Per-op tests of the reference interpreter: every backward function against central finite
//! differences in f64 (odd sizes, strides, asymmetric padding, dilation, groups), plus forward
//! values worked out by hand.

use cnnc_compiler::ir::{Activation, BatchNorm, Conv2d, Lrn, Padding, Pool2d, PoolKind};
use cnnc_runtime::reference::gradcheck::{numerical_grad, random_tensor, random_tensor_away_from_zero, rel_error};
use cnnc_runtime::reference::*;
use ndarray::{arr1, arr2, Array1, Array2, Array4, ArrayD, ArrayView1, ArrayView2, ArrayView4, Ix1, Ix2, Ix4, IxDyn};

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn v4(a: &ArrayD<f64>) -> ArrayView4<'_, f64> {
    a.view().into_dimensionality::<Ix4>().unwrap()
}
fn v2(a: &ArrayD<f64>) -> ArrayView2<'_, f64> {
    a.view().into_dimensionality::<Ix2>().unwrap()
}
fn v1(a: &ArrayD<f64>) -> ArrayView1<'_, f64> {
    a.view().into_dimensionality::<Ix1>().unwrap()
}
/// `sum(out * r)`: a scalar whose gradient w.r.t. `out` is the random tensor `r`.
fn project(out: &ArrayD<f64>, r: &ArrayD<f64>) -> f64 {
    (out * r).sum()
}
#[track_caller]
fn assert_close(what: &str, analytic: &ArrayD<f64>, numeric: &ArrayD<f64>) {
    let e = rel_error(analytic.view(), numeric.view());
    assert!(e < TOL, "{what}: relative error {e:e}\nanalytic {analytic:?}\nnumeric {numeric:?}");
    assert!(analytic.iter().any(|v| v.abs() > 1e-3), "{what}: gradient is (near) zero, the test proves nothing");
}

// ---------------------------------------------------------------- conv2d

fn conv(out_channels: usize, kernel: [usize; 2], stride: [usize; 2], pads: [usize; 4], dilation: [usize; 2], groups: usize, bias: bool) -> Conv2d {
    let mut c = Conv2d::new(out_channels, kernel).groups(groups).bias(bias);
    c.stride = stride;
    c.dilation = dilation;
    c.padding = Padding::Explicit { top: pads[0], bottom: pads[1], left: pads[2], right: pads[3] };
    c
}

fn check_conv(n: usize, c: usize, h: usize, w: usize, attrs: Conv2d, seed: u64) {
    let x = random_tensor(&[n, c, h, w], seed);
    let wt = random_tensor(&[attrs.out_channels, c / attrs.groups, attrs.kernel[0], attrs.kernel[1]], seed + 1);
    let b = random_tensor(&[attrs.out_channels], seed + 2);
    let [oh, ow] = conv2d_output_hw(&attrs, h, w).unwrap();
    let odims = [n, attrs.out_channels, oh, ow];
    let r = random_tensor(&odims, seed + 3);
    let run = |x: &ArrayD<f64>, wt: &ArrayD<f64>, b: &ArrayD<f64>| {
        let mut out = ArrayD::zeros(IxDyn(&odims));
        let bv = attrs.bias.then(|| v1(b));
        conv2d_forward(out.view_mut().into_dimensionality::<Ix4>().unwrap(), v4(x), v4(wt), bv, &attrs).unwrap();
        project(&out, &r)
    };
    let (mut dx, mut dw, mut db) = (ArrayD::zeros(x.raw_dim()), ArrayD::zeros(wt.raw_dim()), ArrayD::zeros(b.raw_dim()));
    conv2d_backward(
        Some(dx.view_mut().into_dimensionality::<Ix4>().unwrap()),
        Some(dw.view_mut().into_dimensionality::<Ix4>().unwrap()),
        attrs.bias.then(|| db.view_mut().into_dimensionality::<Ix1>().unwrap()),
        v4(&r),
        v4(&x),
        v4(&wt),
        &attrs,
    )
    .unwrap();
    assert_close("conv d_x", &dx, &numerical_grad(x.view(), H, |x| run(x, &wt, &b)));
    assert_close("conv d_w", &dw, &numerical_grad(wt.view(), H, |wt| run(&x, wt, &b)));
    if attrs.bias {
        assert_close("conv d_b", &db, &numerical_grad(b.view(), H, |b| run(&x, &wt, b)));
    }
}

#[test]
fn conv_gradients_kh_ne_kw_stride_asymmetric_padding_dilation() {
    // 3x2 kernel, strides (2, 3), padding (top 1, bottom 0, left 2, right 1), dilation (2, 1).
    check_conv(3, 3, 7, 5, conv(5, [3, 2], [2, 3], [1, 0, 2, 1], [2, 1], 1, true), 10);
}

#[test]
fn conv_gradients_groups_no_bias() {
    check_conv(2, 4, 7, 5, conv(6, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 2, false), 20);
}

#[test]
fn conv_gradients_depthwise_dilated() {
    check_conv(3, 5, 7, 5, conv(5, [2, 3], [1, 2], [0, 1, 1, 0], [2, 2], 5, true), 30);
}

#[test]
fn conv_gradients_depthwise_multiplier_1x1_stride3() {
    // groups = C with two filters per channel, and a 1x1 stride-3 case.
    check_conv(2, 3, 7, 5, conv(6, [3, 1], [2, 1], [2, 2, 0, 0], [1, 1], 3, true), 40);
    check_conv(3, 5, 7, 5, conv(3, [1, 1], [3, 3], [0, 0, 0, 0], [1, 1], 1, true), 50);
}

#[test]
fn conv_forward_on_a_ramp() {
    // x[i, j] = 4i + j on a 4x4 image.
    let x = Array4::from_shape_fn((1, 1, 4, 4), |(_, _, i, j)| (4 * i + j) as f64);
    let run = |w: Array4<f64>, pad: usize| {
        let attrs = conv(1, [3, 3], [1, 1], [pad; 4], [1, 1], 1, false);
        let [oh, ow] = conv2d_output_hw(&attrs, 4, 4).unwrap();
        let mut out = Array4::zeros((1, 1, oh, ow));
        conv2d_forward(out.view_mut(), x.view(), w.view(), None, &attrs).unwrap();
        out.into_shape_with_order((oh, ow)).unwrap()
    };
    // All-ones kernel: window sums 45, 54 / 81, 90.
    assert_eq!(run(Array4::ones((1, 1, 3, 3)), 0), arr2(&[[45.0, 54.0], [81.0, 90.0]]));
    // Horizontal difference kernel [1, 0, -1] in every row: x[i, j] - x[i, j+2] = -2, three rows.
    let diff = Array4::from_shape_fn((1, 1, 3, 3), |(_, _, _, j)| [1.0, 0.0, -1.0][j]);
    assert_eq!(run(diff, 0), arr2(&[[-6.0, -6.0], [-6.0, -6.0]]));
    // Padding 1: the corner sees only x00 + x01 + x10 + x11 = 0 + 1 + 4 + 5.
    let padded = run(Array4::ones((1, 1, 3, 3)), 1);
    assert_eq!(padded.dim(), (4, 4));
    assert_eq!(padded[[0, 0]], 10.0);
    assert_eq!(padded[[3, 3]], 10.0 + 11.0 + 14.0 + 15.0);
    assert_eq!(padded[[1, 1]], 45.0);
}

#[test]
fn conv_with_bias_and_groups_forward_by_hand() {
    // Two groups on a 2-channel 1x1 image: each output sees only its own channel.
    let attrs = conv(2, [1, 1], [1, 1], [0; 4], [1, 1], 2, true);
    let x = Array4::from_shape_vec((1, 2, 1, 1), vec![3.0, 5.0]).unwrap();
    let w = Array4::from_shape_vec((2, 1, 1, 1), vec![2.0, -1.0]).unwrap();
    let b = arr1(&[0.5, 0.25]);
    let mut out = Array4::zeros((1, 2, 1, 1));
    conv2d_forward(out.view_mut(), x.view(), w.view(), Some(b.view()), &attrs).unwrap();
    assert_eq!(out.into_raw_vec_and_offset().0, vec![6.5, -4.75]);
}

#[test]
fn conv_rejects_bad_arguments() {
    let attrs = conv(4, [3, 3], [1, 1], [0; 4], [1, 1], 1, true);
    let x = Array4::<f32>::zeros((1, 3, 5, 5));
    let w = Array4::<f32>::zeros((4, 2, 3, 3));
    let b = Array1::<f32>::zeros(4);
    let mut out = Array4::<f32>::zeros((1, 4, 3, 3));
    let e = conv2d_forward(out.view_mut(), x.view(), w.view(), Some(b.view()), &attrs).unwrap_err();
    assert!(e.to_string().contains("`w` has dimensions [4, 2, 3, 3], expected [4, 3, 3, 3]"), "{e}");
    let w = Array4::<f32>::zeros((4, 3, 3, 3));
    let e = conv2d_forward(out.view_mut(), x.view(), w.view(), None, &attrs).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
    let mut unresolved = attrs;
    unresolved.padding = Padding::Same;
    let e = conv2d_forward(out.view_mut(), x.view(), w.view(), Some(b.view()), &unresolved).unwrap_err();
    assert!(e.to_string().contains("not resolved"), "{e}");
    let mut small = Array4::<f32>::zeros((1, 4, 2, 3));
    assert!(conv2d_forward(small.view_mut(), x.view(), w.view(), Some(b.view()), &attrs).is_err());
}

// ---------------------------------------------------------------- dense

#[test]
fn dense_gradients() {
    let (n, i, o) = (3, 7, 5);
    let x = random_tensor(&[n, i], 1);
    let w = random_tensor(&[o, i], 2);
    let b = random_tensor(&[o], 3);
    let r = random_tensor(&[n, o], 4);
    let run = |x: &ArrayD<f64>, w: &ArrayD<f64>, b: &ArrayD<f64>| {
        let mut out = Array2::zeros((n, o));
        dense_forward(out.view_mut(), v2(x), v2(w), Some(v1(b))).unwrap();
        project(&out.into_dyn(), &r)
    };
    let (mut dx, mut dw, mut db) = (Array2::zeros((n, i)), Array2::zeros((o, i)), Array1::zeros(o));
    dense_backward(Some(dx.view_mut()), Some(dw.view_mut()), Some(db.view_mut()), v2(&r), v2(&x), v2(&w)).unwrap();
    assert_close("dense d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, |x| run(x, &w, &b)));
    assert_close("dense d_w", &dw.into_dyn(), &numerical_grad(w.view(), H, |w| run(&x, w, &b)));
    assert_close("dense d_b", &db.into_dyn(), &numerical_grad(b.view(), H, |b| run(&x, &w, b)));
}

#[test]
fn dense_forward_by_hand_and_accumulation() {
    let x = arr2(&[[1.0, 2.0], [3.0, -1.0]]);
    let w = arr2(&[[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]]);
    let b = arr1(&[0.0, 1.0, 2.0]);
    let mut out = Array2::zeros((2, 3));
    dense_forward(out.view_mut(), x.view(), w.view(), Some(b.view())).unwrap();
    assert_eq!(out, arr2(&[[1.0, 5.0, 0.0], [3.0, 6.0, 3.0]]));
    // Backward accumulates: running it twice doubles the gradient.
    let dy = Array2::ones((2, 3));
    let mut db = Array1::zeros(3);
    for _ in 0..2 {
        dense_backward(None, None, Some(db.view_mut()), dy.view(), x.view(), w.view()).unwrap();
    }
    assert_eq!(db, arr1(&[4.0, 4.0, 4.0]));
}

// ---------------------------------------------------------------- batch norm

#[test]
fn batchnorm_train_gradients_through_batch_statistics() {
    let (n, c, h, w) = (3, 5, 7, 5);
    let x = random_tensor(&[n, c, h, w], 7).mapv(|v| 2.0 * v + 0.3);
    let gamma = random_tensor(&[c], 8);
    let beta = random_tensor(&[c], 9);
    let r = random_tensor(&[n, c, h, w], 10);
    let attrs = BatchNorm::default();
    let run_full = |x: &ArrayD<f64>, gamma: &ArrayD<f64>, beta: &ArrayD<f64>| {
        let mut out = Array4::zeros((n, c, h, w));
        let (mut mean, mut invstd) = (Array1::zeros(c), Array1::zeros(c));
        let (mut rm, mut rv) = (Array1::zeros(c), Array1::ones(c));
        batchnorm_train_forward(out.view_mut(), mean.view_mut(), invstd.view_mut(), rm.view_mut(), rv.view_mut(), v4(x), v1(gamma), v1(beta), &attrs).unwrap();
        (out, mean, invstd)
    };
    let run = |x: &ArrayD<f64>, g: &ArrayD<f64>, b: &ArrayD<f64>| project(&run_full(x, g, b).0.into_dyn(), &r);
    let (_, mean, invstd) = run_full(&x, &gamma, &beta);
    let (mut dx, mut dg, mut db) = (Array4::zeros((n, c, h, w)), Array1::zeros(c), Array1::zeros(c));
    batchnorm_train_backward(Some(dx.view_mut()), Some(dg.view_mut()), Some(db.view_mut()), v4(&r), v4(&x), v1(&gamma), mean.view(), invstd.view()).unwrap();
    assert_close("bn d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, |x| run(x, &gamma, &beta)));
    assert_close("bn d_gamma", &dg.into_dyn(), &numerical_grad(gamma.view(), H, |g| run(&x, g, &beta)));
    assert_close("bn d_beta", &db.into_dyn(), &numerical_grad(beta.view(), H, |b| run(&x, &gamma, b)));
}

#[test]
fn batchnorm_running_stats_update() {
    // One channel, values 1, 2, 3, 6 (N = 2, H = 1, W = 2): mean 3, biased var 3.5,
    // unbiased var 14/3.
    let x = Array4::from_shape_vec((2, 1, 1, 2), vec![1.0, 2.0, 3.0, 6.0]).unwrap();
    let attrs = BatchNorm { eps: 1e-5, momentum: 0.1 };
    let mut out = Array4::zeros((2, 1, 1, 2));
    let (mut mean, mut invstd) = (Array1::zeros(1), Array1::zeros(1));
    let (mut rm, mut rv) = (arr1(&[0.5]), arr1(&[2.0]));
    let gamma = arr1(&[1.0]);
    let beta = arr1(&[0.0]);
    batchnorm_train_forward(out.view_mut(), mean.view_mut(), invstd.view_mut(), rm.view_mut(), rv.view_mut(), x.view(), gamma.view(), beta.view(), &attrs).unwrap();
    assert!((mean[0] - 3.0f64).abs() < 1e-12);
    assert!((invstd[0] - 1.0 / (3.5f64 + 1e-5).sqrt()).abs() < 1e-7);
    assert!((rm[0] - (0.9 * 0.5 + 0.1 * 3.0)).abs() < 1e-7, "{}", rm[0]);
    assert!((rv[0] - (0.9 * 2.0 + 0.1 * 14.0 / 3.0)).abs() < 1e-7, "{}", rv[0]);
    // The normalised output has zero mean and (biased) unit variance.
    assert!(out.sum().abs() < 1e-9);
    assert!((out.mapv(|v| v * v).sum() / 4.0 - 3.5 / (3.5 + 1e-5)).abs() < 1e-9);
    // A single value per channel cannot be normalised in training mode.
    let one = Array4::<f64>::zeros((1, 1, 1, 1));
    let mut o1 = Array4::zeros((1, 1, 1, 1));
    let e = batchnorm_train_forward(o1.view_mut(), mean.view_mut(), invstd.view_mut(), rm.view_mut(), rv.view_mut(), one.view(), gamma.view(), beta.view(), &attrs).unwrap_err();
    assert!(e.to_string().contains("more than one value per channel"), "{e}");
}

#[test]
fn batchnorm_eval_gradients_and_values() {
    let (n, c, h, w) = (3, 3, 5, 7);
    let x = random_tensor(&[n, c, h, w], 11);
    let gamma = random_tensor(&[c], 12);
    let beta = random_tensor(&[c], 13);
    let rm = random_tensor(&[c], 14);
    let rv = random_tensor(&[c], 15).mapv(|v| v.abs() + 0.5);
    let r = random_tensor(&[n, c, h, w], 16);
    let attrs = BatchNorm { eps: 1e-3, momentum: 0.1 };
    let run = |x: &ArrayD<f64>, g: &ArrayD<f64>, b: &ArrayD<f64>| {
        let mut out = Array4::zeros((n, c, h, w));
        batchnorm_eval_forward(out.view_mut(), v4(x), v1(g), v1(b), v1(&rm), v1(&rv), &attrs).unwrap();
        out.into_dyn()
    };
    let out = run(&x, &gamma, &beta);
    let expect = gamma[[1]] * (x[[2, 1, 3, 4]] - rm[[1]]) / (rv[[1]] + 1e-3f32 as f64).sqrt() + beta[[1]];
    assert!((out[[2, 1, 3, 4]] - expect).abs() < 1e-12);
    let (mut dx, mut dg, mut db) = (Array4::zeros((n, c, h, w)), Array1::zeros(c), Array1::zeros(c));
    batchnorm_eval_backward(Some(dx.view_mut()), Some(dg.view_mut()), Some(db.view_mut()), v4(&r), v4(&x), v1(&gamma), v1(&rm), v1(&rv), &attrs).unwrap();
    assert_close("bn eval d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, |x| project(&run(x, &gamma, &beta), &r)));
    assert_close("bn eval d_gamma", &dg.into_dyn(), &numerical_grad(gamma.view(), H, |g| project(&run(&x, g, &beta), &r)));
    assert_close("bn eval d_beta", &db.into_dyn(), &numerical_grad(beta.view(), H, |b| project(&run(&x, &gamma, b), &r)));
}

// ---------------------------------------------------------------- LRN

#[test]
fn lrn_gradients_odd_and_even_windows() {
    for (size, seed) in [(3, 21), (4, 22), (5, 23)] {
        let (n, c, h, w) = (2, 5, 3, 4);
        let attrs = Lrn { size, alpha: 0.9, beta: 0.75, k: 1.5 };
        let x = random_tensor(&[n, c, h, w], seed).mapv(|v| 2.0 * v);
        let r = random_tensor(&[n, c, h, w], seed + 100);
        let run = |x: &ArrayD<f64>| {
            let mut out = Array4::zeros((n, c, h, w));
            lrn_forward(out.view_mut(), v4(x), &attrs).unwrap();
            project(&out.into_dyn(), &r)
        };
        let mut dx = Array4::zeros((n, c, h, w));
        lrn_backward(dx.view_mut(), v4(&r), v4(&x), &attrs).unwrap();
        assert_close(&format!("lrn size {size} d_x"), &dx.into_dyn(), &numerical_grad(x.view(), H, run));
    }
}

#[test]
fn lrn_forward_by_hand() {
    // PyTorch's window for size 2 at channel c is c-1..=c; for size 3 it is c-1..=c+1.
    let x = Array4::from_shape_vec((1, 3, 1, 1), vec![1.0, 2.0, 3.0]).unwrap();
    let attrs = Lrn { size: 2, alpha: 1.0, beta: 1.0, k: 1.0 };
    let mut out = Array4::<f64>::zeros((1, 3, 1, 1));
    lrn_forward(out.view_mut(), x.view(), &attrs).unwrap();
    // s = 1 + (1/2) * window sum of squares: c0: 1 + 0.5*1, c1: 1 + 0.5*(1+4), c2: 1 + 0.5*(4+9).
    let expect = [1.0 / 1.5, 2.0 / 3.5, 3.0 / 7.5];
    for (o, e) in out.iter().zip(expect) {
        assert!((o - e).abs() < 1e-12, "{o} vs {e}");
    }
    let attrs = Lrn { size: 3, alpha: 3.0, beta: 0.5, k: 2.0 };
    lrn_forward(out.view_mut(), x.view(), &attrs).unwrap();
    // c1 window is all three channels: s = 2 + 1 * 14 = 16, y = 2 / 4.
    assert!((out[[0, 1, 0, 0]] - 0.5).abs() < 1e-12);
}

// ---------------------------------------------------------------- activations

#[test]
fn activation_gradients() {
    let acts = [
        Activation::Relu,
        Activation::LeakyRelu { slope: 0.1 },
        Activation::Elu { alpha: 1.3 },
        Activation::Sigmoid,
        Activation::Tanh,
    ];
    for (i, act) in acts.iter().enumerate() {
        let x = random_tensor_away_from_zero(&[3, 5, 7, 5], 30 + i as u64, 0.05).mapv(|v| 3.0 * v);
        let r = random_tensor(&[3, 5, 7, 5], 40 + i as u64);
        let run = |x: &ArrayD<f64>| {
            let mut out = ArrayD::zeros(x.raw_dim());
            act_forward(out.view_mut(), x.view(), act).unwrap();
            project(&out, &r)
        };
        let mut dx = ArrayD::zeros(x.raw_dim());
        act_backward(dx.view_mut(), r.view(), x.view(), act).unwrap();
        assert_close(act.name(), &dx, &numerical_grad(x.view(), H, run));
    }
}

#[test]
fn activation_values() {
    let x = ndarray::arr1(&[-2.0f64, -0.5, 0.0, 1.5]).into_dyn();
    let eval = |act: Activation| {
        let mut out = ArrayD::zeros(x.raw_dim());
        act_forward(out.view_mut(), x.view(), &act).unwrap();
        out.into_raw_vec_and_offset().0
    };
    assert_eq!(eval(Activation::Relu), vec![0.0, 0.0, 0.0, 1.5]);
    assert_eq!(eval(Activation::LeakyRelu { slope: 0.25 }), vec![-0.5, -0.125, 0.0, 1.5]);
    let elu = eval(Activation::Elu { alpha: 2.0 });
    assert!((elu[0] - 2.0 * ((-2.0f64).exp() - 1.0)).abs() < 1e-15 && elu[3] == 1.5);
    let s = eval(Activation::Sigmoid);
    assert!((s[2] - 0.5).abs() < 1e-15 && (s[0] - 1.0 / (1.0 + 2f64.exp())).abs() < 1e-15);
    // Stable for huge inputs.
    let big = ndarray::arr1(&[-1000.0f32, 1000.0]).into_dyn();
    let mut out = ArrayD::zeros(big.raw_dim());
    act_forward(out.view_mut(), big.view(), &Activation::Sigmoid).unwrap();
    assert_eq!(out.into_raw_vec_and_offset().0, vec![0.0, 1.0]);
}

// ---------------------------------------------------------------- pooling

fn pool(kind: PoolKind, k: [usize; 2], s: [usize; 2], pads: [usize; 4], ceil: bool, include_pad: bool) -> Pool2d {
    let mut p = Pool2d::new(kind, k[0], s[0]);
    p.kernel = k;
    p.stride = s;
    p.padding = Padding::Explicit { top: pads[0], bottom: pads[1], left: pads[2], right: pads[3] };
    p.ceil_mode = ceil;
    p.count_include_pad = include_pad;
    p
}

fn check_maxpool(attrs: Pool2d, seed: u64) {
    let (n, c, h, w) = (3, 3, 7, 5);
    let x = random_tensor(&[n, c, h, w], seed);
    let [oh, ow] = pool_output_hw(&attrs, h, w).unwrap();
    let r = random_tensor(&[n, c, oh, ow], seed + 1);
    let fwd = |x: &ArrayD<f64>| {
        let mut out = Array4::zeros((n, c, oh, ow));
        let mut arg = Array4::zeros((n, c, oh, ow));
        maxpool_forward(out.view_mut(), arg.view_mut(), v4(x), &attrs).unwrap();
        (out, arg)
    };
    let (_, arg) = fwd(&x);
    let mut dx = Array4::zeros((n, c, h, w));
    maxpool_backward(dx.view_mut(), v4(&r), arg.view(), &attrs).unwrap();
    assert_close("maxpool d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, |x| project(&fwd(x).0.into_dyn(), &r)));
}

#[test]
fn maxpool_gradients() {
    check_maxpool(pool(PoolKind::Max, [3, 3], [2, 2], [1, 1, 1, 1], true, true), 50);
    check_maxpool(pool(PoolKind::Max, [2, 3], [3, 2], [1, 0, 0, 1], false, true), 51);
    check_maxpool(pool(PoolKind::Max, [3, 2], [1, 1], [0, 0, 1, 1], false, true), 52);
}

#[test]
fn maxpool_padding_never_wins_and_switches_are_recorded() {
    // All-negative input with padding: zero padding must not win.
    let x = Array4::from_shape_fn((1, 1, 3, 3), |(_, _, i, j)| -1.0 - (3 * i + j) as f64);
    let attrs = pool(PoolKind::Max, [3, 3], [2, 2], [1, 1, 1, 1], false, true);
    let mut out = Array4::zeros((1, 1, 2, 2));
    let mut arg = Array4::zeros((1, 1, 2, 2));
    maxpool_forward(out.view_mut(), arg.view_mut(), x.view(), &attrs).unwrap();
    assert_eq!(out.into_raw_vec_and_offset().0, vec![-1.0, -2.0, -4.0, -5.0]);
    assert_eq!(arg.into_raw_vec_and_offset().0, vec![0, 1, 3, 4]);
    // Ties go to the first maximum in row-major order; overlapping windows sharing a winner add.
    let x = Array4::from_elem((1, 1, 2, 3), 1.0);
    let attrs = pool(PoolKind::Max, [2, 2], [1, 1], [0; 4], false, true);
    let mut out = Array4::zeros((1, 1, 1, 2));
    let mut arg = Array4::zeros((1, 1, 1, 2));
    maxpool_forward(out.view_mut(), arg.view_mut(), x.view(), &attrs).unwrap();
    assert_eq!(arg.clone().into_raw_vec_and_offset().0, vec![0, 1]);
    let mut dx = Array4::zeros((1, 1, 2, 3));
    let dy = Array4::from_shape_vec((1, 1, 1, 2), vec![2.0, 3.0]).unwrap();
    maxpool_backward(dx.view_mut(), dy.view(), arg.view(), &attrs).unwrap();
    assert_eq!(dx.into_raw_vec_and_offset().0, vec![2.0, 3.0, 0.0, 0.0, 0.0, 0.0]);
}

fn check_avgpool(attrs: Pool2d, seed: u64) {
    let (n, c, h, w) = (3, 3, 7, 5);
    let x = random_tensor(&[n, c, h, w], seed);
    let [oh, ow] = pool_output_hw(&attrs, h, w).unwrap();
    let r = random_tensor(&[n, c, oh, ow], seed + 1);
    let run = |x: &ArrayD<f64>| {
        let mut out = Array4::zeros((n, c, oh, ow));
        avgpool_forward(out.view_mut(), v4(x), &attrs).unwrap();
        project(&out.into_dyn(), &r)
    };
    let mut dx = Array4::zeros((n, c, h, w));
    avgpool_backward(dx.view_mut(), v4(&r), &attrs).unwrap();
    assert_close("avgpool d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, run));
}

#[test]
fn avgpool_gradients_both_pad_modes_and_ceil() {
    for include in [true, false] {
        check_avgpool(pool(PoolKind::Avg, [3, 3], [2, 2], [1, 1, 1, 1], true, include), 60);
        check_avgpool(pool(PoolKind::Avg, [2, 3], [3, 2], [1, 0, 1, 1], false, include), 61);
        check_avgpool(pool(PoolKind::Avg, [2, 2], [2, 2], [0, 0, 0, 0], true, include), 62);
    }
}

fn avg_ones(h: usize, w: usize, attrs: Pool2d) -> Array2<f64> {
    let x = Array4::<f64>::ones((1, 1, h, w));
    let [oh, ow] = pool_output_hw(&attrs, h, w).unwrap();
    let mut out = Array4::zeros((1, 1, oh, ow));
    avgpool_forward(out.view_mut(), x.view(), &attrs).unwrap();
    out.into_shape_with_order((oh, ow)).unwrap()
}

#[test]
fn avgpool_divisor_follows_pytorch() {
    // 3x3 ones, 2x2 window, stride 2, padding 1: windows hold 1, 2 / 2, 4 real pixels.
    let inc = avg_ones(3, 3, pool(PoolKind::Avg, [2, 2], [2, 2], [1; 4], false, true));
    assert_eq!(inc, arr2(&[[0.25, 0.5], [0.5, 1.0]]));
    let exc = avg_ones(3, 3, pool(PoolKind::Avg, [2, 2], [2, 2], [1; 4], false, false));
    assert_eq!(exc, arr2(&[[1.0, 1.0], [1.0, 1.0]]));
    // Ceil mode: 6x6 ones, 3x3 window, stride 2, padding 1 -> 4x4 outputs; the last window
    // covers rows 5..8, clipped to the padded extent 5..7 (one real row, one padding row), so
    // with count_include_pad it is divided by 2 (not 3) along that axis.
    let inc = avg_ones(6, 6, pool(PoolKind::Avg, [3, 3], [2, 2], [1; 4], true, true));
    assert_eq!(inc.dim(), (4, 4));
    assert!((inc[[0, 0]] - 4.0 / 9.0).abs() < 1e-15);
    assert!((inc[[0, 3]] - 2.0 / 6.0).abs() < 1e-15);
    assert!((inc[[3, 3]] - 1.0 / 4.0).abs() < 1e-15);
    assert!((inc[[1, 1]] - 1.0).abs() < 1e-15);
    let exc = avg_ones(6, 6, pool(PoolKind::Avg, [3, 3], [2, 2], [1; 4], true, false));
    assert!(exc.iter().all(|&v| (v - 1.0).abs() < 1e-15));
    // Ceil mode without padding: 5 wide, 2x2 stride 2 -> 3 outputs, the last a 1-pixel window
    // divided by 1 in both modes.
    let inc = avg_ones(5, 5, pool(PoolKind::Avg, [2, 2], [2, 2], [0; 4], true, true));
    assert_eq!(inc.dim(), (3, 3));
    assert!(inc.iter().all(|&v| (v - 1.0).abs() < 1e-15));
}

#[test]
fn global_avgpool_gradient_and_value() {
    let x = random_tensor(&[3, 5, 7, 5], 70);
    let r = random_tensor(&[3, 5, 1, 1], 71);
    let fwd = |x: &ArrayD<f64>| {
        let mut out = Array4::zeros((3, 5, 1, 1));
        global_avgpool_forward(out.view_mut(), v4(x)).unwrap();
        out
    };
    let out = fwd(&x);
    let manual: f64 = x.slice(ndarray::s![2, 4, .., ..]).sum() / 35.0;
    assert!((out[[2, 4, 0, 0]] - manual).abs() < 1e-14);
    let mut dx = Array4::zeros((3, 5, 7, 5));
    global_avgpool_backward(dx.view_mut(), v4(&r)).unwrap();
    assert_close("gap d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, |x| project(&fwd(x).into_dyn(), &r)));
}

// ---------------------------------------------------------------- tensor ops

#[test]
fn dropout_scales_kept_values_and_gradient_matches() {
    use rand::SeedableRng;
    let p = 0.3;
    let x = random_tensor(&[3, 5, 7, 5], 80);
    let mask = dropout_mask(x.shape(), p, &mut rand::rngs::StdRng::seed_from_u64(1));
    let mut out = ArrayD::zeros(x.raw_dim());
    dropout_forward(out.view_mut(), x.view(), mask.view(), p).unwrap();
    for ((o, v), k) in out.iter().zip(x.iter()).zip(mask.iter()) {
        let expect = if *k { v / (1.0 - p as f64) } else { 0.0 };
        assert!((o - expect).abs() < 1e-12);
    }
    let r = random_tensor(x.shape(), 81);
    let mut dx = ArrayD::zeros(x.raw_dim());
    dropout_backward(dx.view_mut(), r.view(), mask.view(), p).unwrap();
    let run = |x: &ArrayD<f64>| {
        let mut out = ArrayD::zeros(x.raw_dim());
        dropout_forward(out.view_mut(), x.view(), mask.view(), p).unwrap();
        project(&out, &r)
    };
    assert_close("dropout d_x", &dx, &numerical_grad(x.view(), H, run));
    // The keep rate of a large mask is close to 1 - p.
    let big = dropout_mask(&[200, 500], p, &mut rand::rngs::StdRng::seed_from_u64(2));
    let kept = big.iter().filter(|&&k| k).count() as f64 / 100_000.0;
    assert!((kept - 0.7).abs() < 0.01, "{kept}");
    assert!(dropout_forward(out.view_mut(), x.view(), mask.view(), 1.0).is_err());
}

#[test]
fn flatten_concat_add_gradients() {
    let a = random_tensor(&[3, 2, 7, 5], 90);
    let b = random_tensor(&[3, 3, 7, 5], 91);
    let c = random_tensor(&[3, 2, 7, 5], 92);
    // concat(a, b) -> flatten -> add with a flattened copy of concat(b, c) reversed roles.
    let r = random_tensor(&[3, 5 * 35], 93);
    let run = |a: &ArrayD<f64>, b: &ArrayD<f64>, c: &ArrayD<f64>| {
        let mut cat1 = ArrayD::zeros(IxDyn(&[3, 5, 7, 5]));
        concat_forward(cat1.view_mut(), &[a.view(), b.view()]).unwrap();
        let mut cat2 = ArrayD::zeros(IxDyn(&[3, 5, 7, 5]));
        concat_forward(cat2.view_mut(), &[b.view(), c.view()]).unwrap();
        let mut sum = ArrayD::zeros(IxDyn(&[3, 5, 7, 5]));
        add_forward(sum.view_mut(), &[cat1.view(), cat2.view(), cat1.view()]).unwrap();
        let mut flat = Array2::zeros((3, 175));
        flatten_forward(flat.view_mut(), sum.view()).unwrap();
        (cat1, flat)
    };
    let (cat1, flat) = run(&a, &b, &c);
    assert_eq!(cat1.slice(ndarray::s![1, 3, 2, 4]).into_scalar(), &b[[1, 1, 2, 4]]);
    // sum = 2 * cat1 + cat2 and channel 2 of cat2 is channel 2 of b.
    assert_eq!(flat[[2, 2 * 35 + 3 * 5 + 1]], 2.0 * cat1[[2, 2, 3, 1]] + b[[2, 2, 3, 1]]);
    // backward by hand through the same chain
    let mut dsum = ArrayD::zeros(IxDyn(&[3, 5, 7, 5]));
    flatten_backward(dsum.view_mut(), v2(&r)).unwrap();
    let (mut dcat1, mut dcat2) = (ArrayD::zeros(IxDyn(&[3, 5, 7, 5])), ArrayD::zeros(IxDyn(&[3, 5, 7, 5])));
    let mut dcat1b = ArrayD::zeros(IxDyn(&[3, 5, 7, 5]));
    add_backward(&mut [dcat1.view_mut(), dcat2.view_mut(), dcat1b.view_mut()], dsum.view()).unwrap();
    dcat1 += &dcat1b;
    let (mut da, mut db, mut dc) = (ArrayD::zeros(a.raw_dim()), ArrayD::zeros(b.raw_dim()), ArrayD::zeros(c.raw_dim()));
    concat_backward(&mut [da.view_mut(), db.view_mut()], dcat1.view()).unwrap();
    concat_backward(&mut [db.view_mut(), dc.view_mut()], dcat2.view()).unwrap();
    let f = |a: &ArrayD<f64>, b: &ArrayD<f64>, c: &ArrayD<f64>| project(&run(a, b, c).1.into_dyn(), &r);
    assert_close("concat/add d_a", &da, &numerical_grad(a.view(), H, |a| f(a, &b, &c)));
    assert_close("concat/add d_b", &db, &numerical_grad(b.view(), H, |b| f(&a, b, &c)));
    assert_close("concat/add d_c", &dc, &numerical_grad(c.view(), H, |c| f(&a, &b, c)));
}

#[test]
fn flat_concat() {
    let a = arr2(&[[1.0, 2.0], [3.0, 4.0]]).into_dyn();
    let b = arr2(&[[5.0], [6.0]]).into_dyn();
    let mut out = ArrayD::zeros(IxDyn(&[2, 3]));
    concat_forward(out.view_mut(), &[a.view(), b.view()]).unwrap();
    assert_eq!(out, arr2(&[[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]]).into_dyn());
    let bad = arr2(&[[5.0]]).into_dyn();
    assert!(concat_forward(out.view_mut(), &[a.view(), bad.view()]).is_err());
}

#[test]
fn channel_mul_gradients() {
    let x = random_tensor(&[3, 5, 7, 5], 100);
    let s = random_tensor(&[3, 5], 101);
    let r = random_tensor(&[3, 5, 7, 5], 102);
    let run = |x: &ArrayD<f64>, s: &ArrayD<f64>| {
        let mut out = Array4::zeros((3, 5, 7, 5));
        channel_mul_forward(out.view_mut(), v4(x), v2(s)).unwrap();
        out.into_dyn()
    };
    let out = run(&x, &s);
    assert!((out[[1, 4, 6, 2]] - x[[1, 4, 6, 2]] * s[[1, 4]]).abs() < 1e-15);
    let (mut dx, mut ds) = (Array4::zeros((3, 5, 7, 5)), Array2::zeros((3, 5)));
    channel_mul_backward(Some(dx.view_mut()), Some(ds.view_mut()), v4(&r), v4(&x), v2(&s)).unwrap();
    assert_close("channel_mul d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, |x| project(&run(x, &s), &r)));
    assert_close("channel_mul d_s", &ds.into_dyn(), &numerical_grad(s.view(), H, |s| project(&run(&x, s), &r)));
}

#[test]
fn softmax_gradient_and_stability() {
    let x = random_tensor(&[3, 7], 110).mapv(|v| 4.0 * v);
    let r = random_tensor(&[3, 7], 111);
    let run = |x: &ArrayD<f64>| {
        let mut out = Array2::zeros((3, 7));
        softmax_forward(out.view_mut(), v2(x)).unwrap();
        out
    };
    let y = run(&x);
    for row in y.outer_iter() {
        assert!((row.sum() - 1.0).abs() < 1e-14);
    }
    let mut dx = Array2::zeros((3, 7));
    softmax_backward(dx.view_mut(), v2(&r), y.view()).unwrap();
    assert_close("softmax d_x", &dx.into_dyn(), &numerical_grad(x.view(), H, |x| project(&run(x).into_dyn(), &r)));
    let big = arr2(&[[1000.0f32, 1000.0, -1000.0]]);
    let mut out = Array2::zeros((1, 3));
    softmax_forward(out.view_mut(), big.view()).unwrap();
    assert_eq!(out, arr2(&[[0.5, 0.5, 0.0]]));
}

// ---------------------------------------------------------------- losses

#[test]
fn cross_entropy_gradient_and_values() {
    let (n, k) = (3, 7);
    let x = random_tensor(&[n, k], 120).mapv(|v| 3.0 * v);
    let labels = [4, 0, 6];
    let d_losses = arr1(&[0.5, -1.0, 2.0]);
    let run = |x: &ArrayD<f64>| {
        let mut losses = Array1::zeros(n);
        let mut probs = Array2::zeros((n, k));
        softmax_cross_entropy_forward(losses.view_mut(), probs.view_mut(), v2(x), &labels).unwrap();
        (losses, probs)
    };
    let (_, probs) = run(&x);
    let mut dx = Array2::zeros((n, k));
    softmax_cross_entropy_backward(dx.view_mut(), d_losses.view(), probs.view(), &labels).unwrap();
    let num = numerical_grad(x.view(), H, |x| run(x).0.dot(&d_losses));
    assert_close("cross-entropy d_logits", &dx.into_dyn(), &num);
    // Equal logits: loss ln K whatever the label; huge logits do not overflow.
    let mut l = Array1::zeros(2);
    let mut p = Array2::zeros((2, 4));
    let x = arr2(&[[2.5f32, 2.5, 2.5, 2.5], [1000.0, 0.0, 0.0, 0.0]]);
    softmax_cross_entropy_forward(l.view_mut(), p.view_mut(), x.view(), &[3, 1]).unwrap();
    assert!((l[0] - 4f32.ln()).abs() < 1e-6, "{}", l[0]);
    assert_eq!(l[1], 1000.0);
    let e = softmax_cross_entropy_forward(l.view_mut(), p.view_mut(), x.view(), &[3, 4]).unwrap_err();
    assert!(e.to_string().contains("label 4 of sample 1 is out of range for 4 classes"), "{e}");
}

#[test]
fn hinge_gradient_and_cs231n_example() {
    // CS231n: scores (cat 3.2, car 5.1, frog -1.7), label cat: max(0, 2.9) + max(0, -3.9) = 2.9.
    let x = arr2(&[[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]]);
    let mut l = Array1::<f64>::zeros(3);
    multiclass_hinge_forward(l.view_mut(), x.view(), &[0, 1, 2], 1.0).unwrap();
    assert!((l[0] - 2.9).abs() < 1e-12 && l[1] == 0.0 && (l[2] - (6.3 + 6.6)).abs() < 1e-12, "{l}");
    // Gradient on random logits (no term within 1e-3 of its hinge for this seed).
    let (n, k) = (3, 7);
    let x = random_tensor(&[n, k], 130).mapv(|v| 2.0 * v);
    let labels = [2, 5, 0];
    for i in 0..n {
        for j in 0..k {
            assert!((x[[i, j]] - x[[i, labels[i]]] + 1.0).abs() > 1e-3 || j == labels[i]);
        }
    }
    let d_losses = arr1(&[1.0, 0.5, -2.0]);
    let run = |x: &ArrayD<f64>| {
        let mut l = Array1::zeros(n);
        multiclass_hinge_forward(l.view_mut(), v2(x), &labels, 1.0).unwrap();
        l.dot(&d_losses)
    };
    let mut dx = Array2::zeros((n, k));
    multiclass_hinge_backward(dx.view_mut(), d_losses.view(), v2(&x), &labels, 1.0).unwrap();
    assert_close("hinge d_logits", &dx.into_dyn(), &numerical_grad(x.view(), H, run));
}

#[test]
fn ops_run_in_f32_too() {
    // The same conv in f32 and f64 agrees to f32 precision.
    let attrs = conv(4, [3, 2], [2, 1], [1, 0, 0, 1], [1, 2], 1, true);
    let x = random_tensor(&[2, 3, 7, 5], 140);
    let w = random_tensor(&[4, 3, 3, 2], 141);
    let b = random_tensor(&[4], 142);
    let [oh, ow] = conv2d_output_hw(&attrs, 7, 5).unwrap();
    let mut o64 = Array4::zeros((2, 4, oh, ow));
    conv2d_forward(o64.view_mut(), v4(&x), v4(&w), Some(v1(&b)), &attrs).unwrap();
    let f = |a: &ArrayD<f64>| a.mapv(|v| v as f32);
    let (x32, w32, b32) = (f(&x), f(&w), f(&b));
    let mut o32 = Array4::<f32>::zeros((2, 4, oh, ow));
    let view4 = |a: &ArrayD<f32>| a.view().into_dimensionality::<Ix4>().unwrap().to_owned();
    conv2d_forward(o32.view_mut(), view4(&x32).view(), view4(&w32).view(), Some(b32.view().into_dimensionality::<Ix1>().unwrap()), &attrs).unwrap();
    let diff = (&o64 - &o32.mapv(|v| v as f64)).mapv(f64::abs).fold(0.0f64, |a, &b| a.max(b));
    assert!(diff < 1e-5, "{diff}");
}
