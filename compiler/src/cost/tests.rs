//! Cost-model checks against figures from the course material, built with the graph API.

use super::*;
use crate::ir::*;

fn conv(g: &mut Graph, name: &str, x: NodeId, out: usize, k: usize) -> NodeId {
    let c = Conv2d::new(out, [k, k]).pad(Padding::Same).bias(false);
    g.add(name, Op::Conv2d(c), &[x]).unwrap()
}

fn inception(reduced: bool) -> Graph {
    let mut g = Graph::new(if reduced { "inception_reduced" } else { "inception_naive" });
    let x = g.input("input", Shape::chw(256, 28, 28)).unwrap();
    g.push_scope("inception");
    let b1 = conv(&mut g, "b1", x, 128, 1);
    let (b2, b3, b4);
    let mut pool = Pool2d::new(PoolKind::Max, 3, 1);
    pool.padding = Padding::uniform(1);
    if reduced {
        let r2 = conv(&mut g, "r2", x, 64, 1);
        b2 = conv(&mut g, "b2", r2, 192, 3);
        let r3 = conv(&mut g, "r3", x, 64, 1);
        b3 = conv(&mut g, "b3", r3, 96, 5);
        let p = g.add("pool", Op::Pool(pool), &[x]).unwrap();
        b4 = conv(&mut g, "b4", p, 64, 1);
    } else {
        b2 = conv(&mut g, "b2", x, 192, 3);
        b3 = conv(&mut g, "b3", x, 96, 5);
        b4 = g.add("pool", Op::Pool(pool), &[x]).unwrap();
    }
    g.add("concat", Op::Concat, &[b1, b2, b3, b4]).unwrap();
    g.pop_scope();
    g
}

#[test]
fn naive_inception_is_854m_macs() {
    let r = analyze(&inception(false), 1);
    assert_eq!(r.output, vec![Shape::chw(672, 28, 28)]);
    assert_eq!(r.totals.macs, 854_196_224);
    assert_eq!(r.blocks.len(), 1);
    let mut block = r.blocks[0].counts;
    assert_eq!(block.activation_bytes, r.totals.activation_bytes - 256 * 28 * 28 * 4, "every layer but the input");
    block.activation_bytes = r.totals.activation_bytes;
    assert_eq!(block, r.totals);
}

#[test]
fn reduced_inception_is_271m_macs() {
    let r = analyze(&inception(true), 1);
    assert_eq!(r.output, vec![Shape::chw(480, 28, 28)]);
    assert_eq!(r.totals.macs, 271_351_808);
    assert_eq!(r.totals.params, 346_112);
    // batch scales MACs and memory linearly, not parameters
    let r8 = analyze(&inception(true), 8);
    assert_eq!(r8.totals.macs, 8 * 271_351_808);
    assert_eq!(r8.totals.params, 346_112);
    assert_eq!(r8.memory.inference_peak_bytes, 8 * r.memory.inference_peak_bytes);
}

#[test]
fn stacks_of_3x3_vs_7x7() {
    let c = 256usize;
    let build = |ks: &[usize]| {
        let mut g = Graph::new("stack");
        let mut x = g.input("input", Shape::chw(c, 28, 28)).unwrap();
        for (i, &k) in ks.iter().enumerate() {
            x = conv(&mut g, &format!("c{i}"), x, c, k);
        }
        analyze(&g, 1)
    };
    let three = build(&[3, 3, 3]);
    let seven = build(&[7]);
    assert_eq!(three.totals.params as usize, 27 * c * c);
    assert_eq!(seven.totals.params as usize, 49 * c * c);
    assert_eq!(three.totals.macs as usize, 27 * c * c * 28 * 28);
    // both see 7x7 pixels
    assert_eq!(three.layers.last().unwrap().receptive_field, [7, 7]);
    assert_eq!(seven.layers.last().unwrap().receptive_field, [7, 7]);
}

#[test]
fn lenet5_params_flops_and_frozen_savings() {
    let mut g = Graph::new("LeNet5");
    let x = g.input("input", Shape::chw(1, 28, 28)).unwrap();
    let c1 = g.add("conv1", Op::Conv2d(Conv2d::new(6, [5, 5])), &[x]).unwrap();
    let r1 = g.add("relu1", Op::Act(Activation::Relu), &[c1]).unwrap();
    let p1 = g.add("pool1", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r1]).unwrap();
    let c2 = g.add("conv2", Op::Conv2d(Conv2d::new(16, [5, 5])), &[p1]).unwrap();
    let r2 = g.add("relu2", Op::Act(Activation::Relu), &[c2]).unwrap();
    let p2 = g.add("pool2", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p2]).unwrap();
    let d = |n| Op::Dense(Dense { out_features: n, bias: true });
    let f1 = g.add("fc1", d(120), &[f]).unwrap();
    let a = g.add("relu3", Op::Act(Activation::Relu), &[f1]).unwrap();
    let f2 = g.add("fc2", d(84), &[a]).unwrap();
    let a = g.add("relu4", Op::Act(Activation::Relu), &[f2]).unwrap();
    g.add("fc3", d(10), &[a]).unwrap();
    let r = analyze(&g, 1);
    assert_eq!(r.totals.params, 44_426);
    // conv1: 24*24*6*25 = 86,400; conv2: 8*8*16*150 = 153,600; fc: 256*120 + 120*84 + 84*10
    assert_eq!(r.totals.macs, 86_400 + 153_600 + 30_720 + 10_080 + 840);
    let conv1 = &r.layers[1];
    assert_eq!(conv1.counts.flops.forward, 2 * 86_400 + 6 * 24 * 24);
    assert_eq!(conv1.counts.flops.backward.input, 0, "no gradient for the image");
    assert_eq!(conv1.counts.flops.backward.weight, 2 * 86_400 + 6 * 24 * 24);
    assert_eq!(r.layers[2].receptive_field, [5, 5]);
    assert_eq!(r.layers[3].receptive_field, [6, 6]);
    assert_eq!(r.layers[3].effective_stride, [2, 2]);
    assert_eq!(r.backward_flops_saved, 0);
    // Freeze the feature extractor: conv1 and conv2 lose weight gradients and every input
    // gradient below fc1 disappears.
    for name in ["conv1", "conv2"] {
        let id = g.find(name).unwrap();
        g.node_mut(id).trainable = false;
    }
    let fr = analyze(&g, 1);
    assert_eq!(fr.totals.frozen_params, 156 + 2416);
    let below_fc1: u64 = fr.layers[..7].iter().map(|l| l.counts.flops.backward.total()).sum();
    assert_eq!(below_fc1, 0);
    assert_eq!(fr.layers[7].counts.flops.backward.input, 0, "fc1's operand needs no gradient");
    assert_eq!(fr.backward_flops_saved, r.totals.flops.backward.total() - fr.totals.flops.backward.total());
    assert!(fr.backward_flops_saved > 4 * 86_400);
    assert!(fr.memory.training_saved_bytes < r.memory.training_saved_bytes);
}

#[test]
fn inference_peak_frees_dead_values() {
    // A chain of four relus over a 1x10x10 input: at most input-of-step and output live.
    let mut g = Graph::new("chain");
    let mut x = g.input("input", Shape::chw(1, 10, 10)).unwrap();
    for i in 0..4 {
        x = g.add(format!("r{i}"), Op::Act(Activation::Relu), &[x]).unwrap();
    }
    let r = analyze(&g, 2);
    assert_eq!(r.memory.inference_peak_bytes, 2 * 100 * 4 * 2);
    assert_eq!(r.memory.all_outputs_bytes, 5 * 100 * 4 * 2);
}

#[test]
fn planned_memory_is_the_engines_arena_and_argmax() {
    // The reduced inception module at batch 3: the training plan's arena (values and
    // gradients) in f32 plus one byte per max-pool output, linear in the batch; the chain
    // of relus plans two 100-value buffers for inference.
    let g = inception(true);
    let (r1, r3) = (analyze(&g, 1), analyze(&g, 3));
    let p = crate::pipeline::plan(&g, Mode::Training, Fusion::Full).unwrap();
    let pool_out = 256 * 28 * 28;
    assert_eq!(r3.memory.training_plan_bytes, Some(3 * (p.memory.arena_elems as u64 * 4 + pool_out)));
    assert_eq!(r3.memory.training_plan_bytes.unwrap(), 3 * r1.memory.training_plan_bytes.unwrap());
    // Gradients share the memory of values whose last backward reader has run: less than
    // every value and gradient of its own.
    assert!(p.memory.arena_elems < p.memory.unshared_elems.0 + p.memory.unshared_elems.1);
    let mut c = Graph::new("chain");
    let mut x = c.input("input", Shape::chw(1, 10, 10)).unwrap();
    for i in 0..4 {
        x = c.add(format!("r{i}"), Op::Act(Activation::Relu), &[x]).unwrap();
    }
    assert_eq!(analyze(&c, 2).memory.inference_plan_bytes, Some(2 * 2 * 112 * 4), "two buffers of 100 values, aligned to 16");
}
