//! The graph-level reference interpreter: end-to-end gradient checks in f64 of a small network
//! using every op (conv-bn-relu-residual-maxpool-concat-lrn-avgpool-SE-gap-dropout-dense-loss),
//! running statistics, dropout behaviour, and errors that name the layer.

use cnnc_compiler::ir::*;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::ParamStore;
use cnnc_runtime::reference::gradcheck::{numerical_grad, random_tensor, rel_error};
use cnnc_runtime::reference::{backward, forward, forward_with_labels, loss_and_grad, Mode, Saved};
use ndarray::{ArrayD, IxDyn};

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

/// Every op of the IR in one small graph on 3x7x5 inputs.
fn zoo() -> Graph {
    let mut g = Graph::new("zoo");
    let x = g.input("x", Shape::chw(3, 7, 5)).unwrap();
    let c1 = g.add("conv1", Op::Conv2d(Conv2d::new(4, [3, 3]).pad(Padding::Same)), &[x]).unwrap();
    let b1 = g.add("bn1", Op::BatchNorm(BatchNorm::default()), &[c1]).unwrap();
    let r1 = g.add("relu1", Op::Act(Activation::Relu), &[b1]).unwrap();
    // Residual branch: r1 fans out to conv2 and to the add.
    let mut c2 = Conv2d::new(4, [3, 2]).pad(Padding::Explicit { top: 1, bottom: 1, left: 0, right: 1 });
    c2.dilation = [1, 1];
    let c2 = g.add("conv2", Op::Conv2d(c2), &[r1]).unwrap();
    let b2 = g.add("bn2", Op::BatchNorm(BatchNorm { eps: 1e-3, momentum: 0.2 }), &[c2]).unwrap();
    let s = g.add("res", Op::Add, &[r1, b2]).unwrap();
    let l1 = g.add("leaky", Op::Act(Activation::LeakyRelu { slope: 0.1 }), &[s]).unwrap();
    let mut mp = Pool2d::new(PoolKind::Max, 3, 2);
    mp.padding = Padding::uniform(1);
    mp.ceil_mode = true;
    let p = g.add("pool", Op::Pool(mp), &[l1]).unwrap();
    // Inception-style concat of three branches.
    let pw = g.add("pw", Op::Conv2d(Conv2d::new(3, [1, 1]).bias(false)), &[p]).unwrap();
    let dw = g.add("dw", Op::Conv2d(Conv2d::new(4, [3, 3]).pad(Padding::Same).groups(4).dilation(2)), &[p]).unwrap();
    let t = g.add("tanh", Op::Act(Activation::Tanh), &[dw]).unwrap();
    let cat = g.add("cat", Op::Concat, &[p, pw, t]).unwrap();
    let lrn = g.add("lrn", Op::Lrn(Lrn { size: 3, alpha: 0.5, beta: 0.75, k: 1.0 }), &[cat]).unwrap();
    let mut ap = Pool2d::new(PoolKind::Avg, 3, 1);
    ap.padding = Padding::uniform(1);
    ap.count_include_pad = false;
    let a = g.add("avg", Op::Pool(ap), &[lrn]).unwrap();
    // Squeeze-and-excitation.
    let sq = g.add("se.gap", Op::GlobalAvgPool, &[a]).unwrap();
    let e1 = g.add("se.fc1", Op::Dense(Dense { out_features: 4, bias: true }), &[sq]).unwrap();
    let e2 = g.add("se.elu", Op::Act(Activation::Elu { alpha: 1.0 }), &[e1]).unwrap();
    let e3 = g.add("se.fc2", Op::Dense(Dense { out_features: 11, bias: true }), &[e2]).unwrap();
    let e4 = g.add("se.sigmoid", Op::Act(Activation::Sigmoid), &[e3]).unwrap();
    let cm = g.add("se.scale", Op::ChannelMul, &[a, e4]).unwrap();
    let gp = g.add("gap", Op::GlobalAvgPool, &[cm]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[gp]).unwrap();
    let d = g.add("drop", Op::Dropout { p: 0.25 }, &[f]).unwrap();
    let bn3 = g.add("bn3", Op::BatchNorm(BatchNorm::default()), &[d]).unwrap();
    g.add("fc", Op::Dense(Dense { out_features: 5, bias: true }), &[bn3]).unwrap();
    verify(&g).unwrap();
    g
}

fn setup(seed: u64) -> (Graph, ParamStore<f64>, ArrayD<f64>, Vec<usize>) {
    let g = zoo();
    let mut p = ParamStore::<f64>::for_graph(&g, &InitConfig::pytorch(), seed).unwrap();
    // Non-trivial batch-norm affine parameters and running statistics.
    for name in ["bn1", "bn2", "bn3"] {
        for (suffix, s, off) in [("weight", 0.5, 1.0), ("bias", 0.5, 0.0), ("running_mean", 0.2, 0.0), ("running_var", 0.3, 1.0)] {
            let n = p.get(&format!("{name}.{suffix}")).unwrap().len();
            let v = random_tensor(&[n], seed + n as u64 + off as u64 * 7 + suffix.len() as u64).mapv(|v| off + s * v);
            p.set(&format!("{name}.{suffix}"), v.view()).unwrap();
        }
    }
    let x = random_tensor(&[3, 3, 7, 5], seed + 1000).mapv(|v| 2.0 * v);
    (g, p, x, vec![1, 4, 2])
}

/// Check the input and every parameter gradient of the mean loss against finite differences.
fn gradcheck(loss: Loss, mode: Mode) {
    let (g, p, x, labels) = setup(1);
    let out = loss_and_grad(&g, &p, x.view(), &labels, loss, mode, 5).unwrap();
    assert!(out.loss.is_finite() && out.loss > 0.0);
    // The finite differences only need the loss: run the graph with the loss node appended.
    let mut gl = g.clone();
    let logits = gl.outputs()[0];
    gl.add("loss", Op::Loss(loss), &[logits]).unwrap();
    let f = |p: &ParamStore<f64>, x: &ArrayD<f64>| {
        let st = forward_with_labels(&gl, p, x.view(), Some(&labels), mode, 5).unwrap();
        st.outputs(&gl)[0].mean().unwrap()
    };
    assert!((f(&p, &x) - out.loss).abs() < 1e-12);
    let e = rel_error(out.grads.input.view(), numerical_grad(x.view(), H, |x| f(&p, x)).view());
    assert!(e < TOL, "{mode:?} {loss:?}: input gradient relative error {e:e}");
    for info in p.infos().iter().filter(|i| i.is_trainable()) {
        let t = p.get(&info.name).unwrap().to_owned();
        let num = numerical_grad(t.view(), H, |t| {
            let mut q = p.clone();
            q.set(&info.name, t.view()).unwrap();
            f(&q, &x)
        });
        let ana = out.grads.params.get(&info.name).unwrap().to_owned();
        if mode == Mode::Train && (info.name == "conv1.bias" || info.name == "conv2.bias") {
            // A bias right before a training-mode batch norm is cancelled by the mean
            // subtraction: its true gradient is exactly zero.
            let max = |a: &ArrayD<f64>| a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(max(&ana) < 1e-12 && max(&num) < 1e-9, "`{}`: {ana:?} / {num:?}", info.name);
            continue;
        }
        let e = rel_error(ana.view(), num.view());
        assert!(e < TOL, "{mode:?} {loss:?}: `{}` gradient relative error {e:e}\n{ana:?}\n{num:?}", info.name);
        assert!(ana.iter().any(|v| v.abs() > 1e-6), "`{}` gradient is zero", info.name);
    }
    // Buffers get no gradient.
    assert!(out.grads.params.slice("bn1.running_mean").unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn whole_graph_gradients_train_mode_cross_entropy() {
    gradcheck(Loss::SoftmaxCrossEntropy, Mode::Train);
}

#[test]
fn whole_graph_gradients_eval_mode_hinge() {
    gradcheck(Loss::MulticlassHinge { margin: 1.0 }, Mode::Eval);
}

#[test]
fn residual_fan_out_accumulates_both_paths() {
    // The gradient reaching relu1 is the sum of what `res` (directly) and `conv2` send.
    let (g, p, x, labels) = setup(2);
    let out = loss_and_grad(&g, &p, x.view(), &labels, Loss::SoftmaxCrossEntropy, Mode::Eval, 0).unwrap();
    let id = |n: &str| g.find(n).unwrap();
    let d_res = out.grads.node(id("res")).unwrap();
    let d_relu1 = out.grads.node(id("relu1")).unwrap();
    let d_conv2_in = {
        // conv2's own contribution to its input, recomputed with the op function.
        use cnnc_runtime::reference::conv2d_backward;
        let Op::Conv2d(c) = g.node(id("conv2")).op else { unreachable!() };
        let mut d = ArrayD::zeros(d_relu1.raw_dim());
        let w = p.get("conv2.weight").unwrap().into_dimensionality().unwrap();
        let d_out = out.grads.node(id("conv2")).unwrap().view().into_dimensionality().unwrap();
        let xin = out.state.value(id("relu1")).unwrap().view().into_dimensionality().unwrap();
        conv2d_backward(Some(d.view_mut().into_dimensionality().unwrap()), None, None, d_out, xin, w, &c).unwrap();
        d
    };
    let sum = d_res + &d_conv2_in;
    assert!(rel_error(sum.view(), d_relu1.view()) < 1e-12);
    assert!(d_conv2_in.iter().any(|v| v.abs() > 1e-6) && d_res.iter().any(|v| v.abs() > 1e-6));
}

#[test]
fn running_statistics_update_with_momentum() {
    let (g, mut p, x, _) = setup(3);
    let st = forward(&g, &p, x.view(), Mode::Train, 0).unwrap();
    let c1 = st.value(g.find("conv1").unwrap()).unwrap().clone();
    let old_mean = p.get("bn1.running_mean").unwrap().to_owned();
    let old_var = p.get("bn1.running_var").unwrap().to_owned();
    // Forward alone does not touch the store.
    st.update_running_stats(&g, &mut p).unwrap();
    let m = 35.0 * 3.0;
    for c in 0..4 {
        let v = c1.index_axis(ndarray::Axis(1), c);
        let mean = v.sum() / m;
        let unbiased = v.mapv(|a| (a - mean).powi(2)).sum() / (m - 1.0);
        let rm = p.get("bn1.running_mean").unwrap()[[c]];
        let rv = p.get("bn1.running_var").unwrap()[[c]];
        assert!((rm - (0.9 * old_mean[[c]] + 0.1 * mean)).abs() < 1e-6, "{rm}");
        assert!((rv - (0.9 * old_var[[c]] + 0.1 * unbiased)).abs() < 1e-6, "{rv}");
    }
    // bn2 has momentum 0.2.
    let Some(Saved::BatchStats { mean, .. }) = st.saved(g.find("bn2").unwrap()) else { panic!("no batch stats") };
    let rm2 = p.get("bn2.running_mean").unwrap()[[0]];
    let fresh = setup(3).1;
    assert!((rm2 - (0.8 * fresh.get("bn2.running_mean").unwrap()[[0]] + 0.2 * mean[0])).abs() < 1e-7);
    // An eval pass saves no statistics and changes nothing.
    let before = p.clone();
    let st = forward(&g, &p, x.view(), Mode::Eval, 0).unwrap();
    st.update_running_stats(&g, &mut p).unwrap();
    assert_eq!(before, p);
}

#[test]
fn dropout_is_identity_in_eval_and_scaled_in_train() {
    let (g, p, x, _) = setup(4);
    let (f, d) = (g.find("flatten").unwrap(), g.find("drop").unwrap());
    let st = forward(&g, &p, x.view(), Mode::Eval, 0).unwrap();
    assert_eq!(st.value(f), st.value(d));
    let st = forward(&g, &p, x.view(), Mode::Train, 11).unwrap();
    let (vin, vout) = (st.value(f).unwrap(), st.value(d).unwrap());
    let Some(Saved::Mask(mask)) = st.saved(d) else { panic!("no mask") };
    let mut dropped = 0;
    for ((a, b), k) in vin.iter().zip(vout.iter()).zip(mask.iter()) {
        if *k {
            assert!((b - a / 0.75).abs() < 1e-12);
        } else {
            assert_eq!(*b, 0.0);
            dropped += 1;
        }
    }
    assert!(dropped > 0 && dropped < vin.len());
    // Same seed, same mask; another seed, another mask.
    let again = forward(&g, &p, x.view(), Mode::Train, 11).unwrap();
    assert_eq!(again.saved(d), st.saved(d));
    let other = forward(&g, &p, x.view(), Mode::Train, 12).unwrap();
    assert_ne!(other.saved(d), st.saved(d));
}

#[test]
fn loss_node_in_graph_and_softmax_output() {
    // A graph ending in its own loss node, and one ending in softmax, both gradient-checked.
    let mut g = Graph::new("small");
    let x = g.input("x", Shape::chw(2, 5, 3)).unwrap();
    let c = g.add("conv", Op::Conv2d(Conv2d::new(3, [2, 2]).stride(2)), &[x]).unwrap();
    let f = g.add("flat", Op::Flatten, &[c]).unwrap();
    let d = g.add("fc", Op::Dense(Dense { out_features: 4, bias: true }), &[f]).unwrap();
    let mut gs = g.clone();
    let loss = Loss::MulticlassHinge { margin: 0.5 };
    g.add("loss", Op::Loss(loss), &[d]).unwrap();
    gs.add("softmax", Op::Softmax, &[d]).unwrap();
    let p = ParamStore::<f64>::for_graph(&g, &InitConfig::pytorch(), 2).unwrap();
    let xs = random_tensor(&[3, 2, 5, 3], 77).mapv(|v| 3.0 * v);
    let labels = [3, 0, 2];
    let out = loss_and_grad(&g, &p, xs.view(), &labels, loss, Mode::Train, 0).unwrap();
    assert_eq!(out.losses.len(), 3);
    let appended = loss_and_grad(&gs.clone(), &p, xs.view(), &labels, loss, Mode::Train, 0);
    assert!(appended.is_ok());
    let f = |x: &ArrayD<f64>| loss_and_grad(&g, &p, x.view(), &labels, loss, Mode::Train, 0).unwrap().loss;
    assert!(rel_error(out.grads.input.view(), numerical_grad(xs.view(), H, f).view()) < TOL);
    // Asking for another loss than the graph's own is an error naming the layer.
    let e = loss_and_grad(&g, &p, xs.view(), &labels, Loss::SoftmaxCrossEntropy, Mode::Train, 0).unwrap_err();
    assert!(e.to_string().starts_with("layer `loss`"), "{e}");
    // The loss node without labels.
    let e = forward(&g, &p, xs.view(), Mode::Train, 0).unwrap_err();
    assert!(e.to_string().contains("layer `loss`") && e.to_string().contains("labels"), "{e}");
    // Softmax output with an arbitrary output gradient.
    let r = random_tensor(&[3, 4], 78);
    let st = forward(&gs, &p, xs.view(), Mode::Eval, 0).unwrap();
    let y = st.outputs(&gs)[0];
    assert!(y.sum_axis(ndarray::Axis(1)).iter().all(|s| (s - 1.0).abs() < 1e-12));
    let grads = backward(&gs, &p, &st, std::slice::from_ref(&r)).unwrap();
    let num = numerical_grad(xs.view(), H, |x| (forward(&gs, &p, x.view(), Mode::Eval, 0).unwrap().outputs(&gs)[0] * &r).sum());
    assert!(rel_error(grads.input.view(), num.view()) < TOL);
    // forward_with_labels gives the per-sample losses as the node's value.
    let st = forward_with_labels(&g, &p, xs.view(), Some(&labels), Mode::Eval, 0).unwrap();
    assert_eq!(st.outputs(&g)[0].shape(), &[3, 1]);
}

#[test]
fn frozen_layers_get_no_parameter_gradient_but_pass_gradients_on() {
    let (mut g, p, x, labels) = setup(5);
    let id = g.find("conv2").unwrap();
    let full = loss_and_grad(&g, &p, x.view(), &labels, Loss::SoftmaxCrossEntropy, Mode::Train, 1).unwrap();
    g.node_mut(id).trainable = false;
    let frozen = loss_and_grad(&g, &p, x.view(), &labels, Loss::SoftmaxCrossEntropy, Mode::Train, 1).unwrap();
    assert!(frozen.grads.params.slice("conv2.weight").unwrap().iter().all(|&v| v == 0.0));
    assert!(full.grads.params.slice("conv2.weight").unwrap().iter().any(|&v| v != 0.0));
    assert_eq!(frozen.grads.params.get("conv1.weight"), full.grads.params.get("conv1.weight"));
    assert_eq!(frozen.grads.input, full.grads.input);
}

#[test]
fn f32_and_f64_agree() {
    let (g, p64, x, labels) = setup(6);
    let p32: ParamStore<f32> = p64.cast();
    let x32 = x.mapv(|v| v as f32);
    let a = loss_and_grad(&g, &p64, x.view(), &labels, Loss::SoftmaxCrossEntropy, Mode::Train, 3).unwrap();
    let b = loss_and_grad(&g, &p32, x32.view(), &labels, Loss::SoftmaxCrossEntropy, Mode::Train, 3).unwrap();
    assert!((a.loss - b.loss as f64).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
    let g32 = b.grads.params.cast::<f64>();
    assert!(rel_error(ndarray::aview1(a.grads.params.flat()).into_dyn(), ndarray::aview1(g32.flat()).into_dyn()) < 1e-4);
}

#[test]
fn errors_name_the_layer() {
    let (g, p, x, labels) = setup(7);
    // Wrong input dimensions.
    let bad = ArrayD::<f64>::zeros(IxDyn(&[3, 3, 5, 7]));
    let e = forward(&g, &p, bad.view(), Mode::Eval, 0).unwrap_err().to_string();
    assert!(e.starts_with("layer `x` (input): expected an input batch of dimensions [N, 3, 7, 5]"), "{e}");
    let flat = ArrayD::<f64>::zeros(IxDyn(&[3, 105]));
    assert!(forward(&g, &p, flat.view(), Mode::Eval, 0).is_err());
    // Parameters of another graph: the first layer whose tensor is missing is named.
    let mut other = Graph::new("other");
    let i = other.input("x", Shape::chw(3, 7, 5)).unwrap();
    other.add("conv1", Op::Conv2d(Conv2d::new(4, [3, 3]).pad(Padding::Same)), &[i]).unwrap();
    let q = ParamStore::<f64>::for_graph(&other, &InitConfig::default(), 0).unwrap();
    let e = forward(&g, &q, x.view(), Mode::Eval, 0).unwrap_err().to_string();
    assert!(e.starts_with("layer `bn1` (batchnorm)") && e.contains("missing parameter `bn1.weight`"), "{e}");
    // A parameter of the wrong shape.
    let mut other = Graph::new("other2");
    let i = other.input("x", Shape::chw(3, 7, 5)).unwrap();
    other.add("conv1", Op::Conv2d(Conv2d::new(5, [3, 3]).pad(Padding::Same)), &[i]).unwrap();
    let q = ParamStore::<f64>::for_graph(&other, &InitConfig::default(), 0).unwrap();
    let e = forward(&g, &q, x.view(), Mode::Eval, 0).unwrap_err().to_string();
    assert!(e.starts_with("layer `conv1` (conv2d)"), "{e}");
    // Labels out of range.
    let e = loss_and_grad(&g, &p, x.view(), &[0, 9, 1], Loss::SoftmaxCrossEntropy, Mode::Eval, 0).unwrap_err().to_string();
    assert!(e.starts_with("layer `fc`") && e.contains("label 9"), "{e}");
    // Wrong number of output gradients.
    let st = forward(&g, &p, x.view(), Mode::Eval, 0).unwrap();
    assert!(backward(&g, &p, &st, &[]).is_err());
    let wrong = ArrayD::zeros(IxDyn(&[3, 4]));
    assert!(backward(&g, &p, &st, &[wrong]).unwrap_err().to_string().contains("layer `fc`"));
    // A forward state of another graph.
    let small = {
        let mut s = Graph::new("small");
        let i = s.input("x", Shape::chw(3, 7, 5)).unwrap();
        s.add("relu", Op::Act(Activation::Relu), &[i]).unwrap();
        s
    };
    let e = backward(&small, &p, &st, std::slice::from_ref(&x)).unwrap_err().to_string();
    assert!(e.contains("another graph"), "{e}");
    // Batch norm in training mode with a single value per channel.
    let one = ArrayD::<f64>::zeros(IxDyn(&[1, 3, 7, 5]));
    let e = loss_and_grad(&g, &p, one.view(), &labels[..1], Loss::SoftmaxCrossEntropy, Mode::Train, 0).unwrap_err().to_string();
    assert!(e.starts_with("layer `bn3` (batchnorm)"), "{e}");
}

#[test]
fn repeated_operand_gets_both_contributions() {
    // add(r, r) = 2r: the gradient reaching r counts both operand slots.
    let mut g = Graph::new("twice");
    let x = g.input("x", Shape::chw(2, 3, 5)).unwrap();
    let r = g.add("act", Op::Act(Activation::Tanh), &[x]).unwrap();
    let a = g.add("twice", Op::Add, &[r, r, x]).unwrap();
    let f = g.add("flat", Op::Flatten, &[a]).unwrap();
    g.add("fc", Op::Dense(Dense { out_features: 3, bias: false }), &[f]).unwrap();
    let p = ParamStore::<f64>::for_graph(&g, &InitConfig::pytorch(), 4).unwrap();
    let xs = random_tensor(&[3, 2, 3, 5], 5);
    let labels = [0, 2, 1];
    let loss = Loss::SoftmaxCrossEntropy;
    let out = loss_and_grad(&g, &p, xs.view(), &labels, loss, Mode::Train, 0).unwrap();
    let num = numerical_grad(xs.view(), H, |x| loss_and_grad(&g, &p, x.view(), &labels, loss, Mode::Train, 0).unwrap().loss);
    assert!(rel_error(out.grads.input.view(), num.view()) < TOL);
    let d_act = out.grads.node(r).unwrap();
    let d_twice = out.grads.node(a).unwrap();
    assert!(rel_error(d_act.view(), (d_twice * 2.0).view()) < 1e-14);
}
