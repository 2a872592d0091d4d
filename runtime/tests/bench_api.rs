//! The benchmark library behind `cnnc bench` (`cnnc_runtime::bench`): one row per group of the
//! fused training plan covering every node once, positive medians for every engine, per-row
//! FLOPs that add up to the cost report's totals, an exact JSON round trip, the peak-RSS probe,
//! and clear errors for bad configurations. Few repetitions and small batches: these tests
//! check what is reported, not how fast anything is.

use cnnc_compiler::cost::analyze;
use cnnc_compiler::ir::{Activation, BatchNorm, Conv2d, Dense, Graph, Loss, Op, Padding, Shape};
use cnnc_compiler::lang;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::bench::{self, BenchConfig, BenchReport};
use cnnc_runtime::exec::JitEngine;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

/// `bench::run` resets the process's RSS high-water mark: tests that run it or read that mark
/// take this lock so they do not disturb each other.
static PROC: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    PROC.lock().unwrap_or_else(|e| e.into_inner())
}

fn model(rel: &str, name: &str) -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    let program = lang::load_file(&path).unwrap_or_else(|d| panic!("{}", d.render_file(&path)));
    program.expand(name).unwrap_or_else(|d| panic!("{}", d.render_file(&path)))
}

fn run(g: &Graph, batch: usize, reps: usize) -> BenchReport {
    let cfg = BenchConfig { batch, reps, ..BenchConfig::default() };
    let mut calls = 0;
    let r = bench::run(g, &cfg, &mut |p| {
        assert!(p.done <= p.total, "progress {} of {}", p.done, p.total);
        calls += 1;
    })
    .unwrap_or_else(|e| panic!("{}: {e}", g.name));
    assert!(calls > 3, "progress was reported {calls} times");
    r
}

/// Rows = the fused training plan's groups, every non-input node in exactly one row, FLOPs
/// summing to the cost report, every engine timed.
fn check_report(g: &Graph, r: &BenchReport, batch: usize) {
    let plan = JitEngine::new(g, Loss::SoftmaxCrossEntropy, batch, Fusion::Full).unwrap().plan(true).clone();
    assert_eq!(r.layers.len(), plan.groups.len(), "{}: one row per group", g.name);
    for (row, grp) in r.layers.iter().zip(&plan.groups) {
        let names: Vec<String> = grp.nodes.iter().map(|&n| plan.graph.node(n).name.clone()).collect();
        assert_eq!(row.nodes, names, "{}: row {} names its group's nodes", g.name, row.group);
        assert_eq!(row.group, names[0]);
        assert_eq!(row.times.len(), r.engines.len());
    }
    let mut seen = HashSet::new();
    for row in &r.layers {
        for n in &row.nodes {
            assert!(seen.insert(n.clone()), "{}: node {n} in two rows", g.name);
        }
    }
    for id in g.nodes() {
        let node = g.node(id);
        if !matches!(node.op, Op::Input) {
            assert!(seen.contains(&node.name), "{}: node {} is in no row", g.name, node.name);
        }
    }
    let cost = analyze(g, batch);
    assert_eq!(r.layers.iter().map(|l| l.flops_forward).sum::<u64>(), cost.totals.flops.forward, "{}: forward FLOPs", g.name);
    assert_eq!(r.layers.iter().map(|l| l.flops_backward).sum::<u64>(), cost.totals.flops.backward.total(), "{}: backward FLOPs", g.name);
    assert_eq!(r.cost.flops_forward, cost.totals.flops.forward);
    assert_eq!(r.cost.training_saved_bytes, cost.memory.training_saved_bytes);
    assert_eq!((r.model.as_str(), r.batch), (g.name.as_str(), batch));

    let names: Vec<&str> = r.engines.iter().map(|e| e.engine.as_str()).collect();
    assert_eq!(names, ["fused JIT", "naive JIT", "reference"]);
    assert!(r.peak.flops_per_thread > 1_000_000_000, "a 128-bit FMA peak under 1 GFLOP/s: {:?}", r.peak);
    assert!(r.peak.threads >= 1);
    for e in &r.engines {
        assert!(e.infer_ns > 0 && e.train_ns > 0 && e.forward_ns > 0 && e.backward_ns > 0, "{}: {e:?}", g.name);
        assert_eq!(e.compile_ns.is_some(), e.engine != "reference", "{e:?}");
        assert_eq!(e.buffer_bytes.is_some(), e.engine != "reference", "{e:?}");
    }
    assert!(r.engines[0].compile_ns.unwrap() > 0);
    // With one timed step the medians are that step: its groups' times fit inside it.
    for e in r.engines.iter().filter(|e| e.reps == 1) {
        assert!(e.forward_ns + e.backward_ns <= e.train_ns, "{}: groups take longer than the step: {e:?}", g.name);
    }
    // Every row that computes something was timed by every engine (an in-place concat runs
    // no kernel in the fused engine, so it may take no measurable time there).
    for row in &r.layers {
        if row.flops_forward > 0 {
            for (e, t) in r.engines.iter().zip(&row.times) {
                assert!(t.forward_ns > 0, "{}: row {} has no forward time in {}", g.name, row.group, e.engine);
            }
        }
    }
    let text = r.render_table();
    for needle in ["fused JIT", "naive JIT", "reference", "128-bit FMA peak", "peak RSS", g.name.as_str()] {
        assert!(text.contains(needle), "table lacks {needle:?}:\n{text}");
    }
    for row in &r.layers {
        assert!(text.contains(&row.group), "table lacks row {}:\n{text}", row.group);
    }
}

#[test]
fn lenet5_rows_cover_every_group() {
    let _guard = lock();
    let g = model("examples/models/lenet5.cnn", "LeNet5");
    let r = run(&g, 3, 2);
    check_report(&g, &r, 3);
    assert_eq!(r.engines[0].reps, 2);
    assert_eq!(r.engines[1].reps, 1);
    // conv1 + relu1 is one fused group, which pools into pool1 as it stores (the pool's
    // own row keeps its FLOPs: the sums above check they are counted once).
    assert_eq!(r.layers[0].nodes, ["conv1", "relu1"]);
    assert_eq!(r.layers[0].pools, ["pool1"]);
    assert_eq!(r.layers[1].group, "pool1");
    assert!(r.layers[1].pools.is_empty());
    // The convolutions name their kernel families (the engine's choice per shape: LeNet's
    // 5x5 layers on rows of 28 and 10 pixels get the direct kernels); other rows none.
    let kernels: Vec<(&str, &str)> = r.layers.iter().filter(|l| !l.kernels.is_empty()).map(|l| (l.group.as_str(), l.kernels.as_str())).collect();
    assert_eq!(kernels, [("conv1", "direct/direct/direct"), ("conv2", "direct/direct/direct")]);
}

#[test]
fn residual_bn_side_output_and_inplace_concat_models() {
    let _guard = lock();
    // A residual add, batch norm and a second (side) output.
    let g = model("tests/models/tiny.cnn", "TinyRes");
    let r = run(&g, 3, 1);
    check_report(&g, &r, 3);
    // Inception modules: concatenations written in place.
    let g = model("tests/models/mini_inception.cnn", "MiniInception");
    let r = run(&g, 2, 1);
    check_report(&g, &r, 2);
    let concats: Vec<_> = r.layers.iter().filter(|l| l.op == "concat").collect();
    assert_eq!(concats.len(), 3, "three inception modules");
    assert!(concats.iter().all(|l| l.in_place), "{concats:?}");
}

/// A 1x3 wide enough for the 1-D Winograd between batch norms: the layout pass transposes
/// its planes, and the report says which layer runs that way.
#[test]
fn transposed_layers_are_named() {
    let _guard = lock();
    let mut g = Graph::new("flip");
    let x = g.input("input", Shape::chw(3, 5, 7)).unwrap();
    let mut v = x;
    for (name, c, k, pad) in [("a", 48, [1, 1], Padding::Valid), ("b", 48, [1, 3], Padding::hw(0, 1))] {
        let conv = Conv2d { kernel: k, ..Conv2d::new(c, [1, 1]) }.pad(pad).bias(false);
        v = g.add(name, Op::Conv2d(conv), &[v]).unwrap();
        v = g.add(format!("{name}_bn"), Op::BatchNorm(BatchNorm::default()), &[v]).unwrap();
        v = g.add(format!("{name}_relu"), Op::Act(Activation::Relu), &[v]).unwrap();
    }
    let v = g.add("gap", Op::GlobalAvgPool, &[v]).unwrap();
    g.add("fc", Op::Dense(Dense { out_features: 3, bias: true }), &[v]).unwrap();
    let r = run(&g, 2, 1);
    check_report(&g, &r, 2);
    let notes: Vec<&String> = r.notes.iter().filter(|n| n.contains("transposed planes")).collect();
    assert_eq!(notes.len(), 1, "{:?}", r.notes);
    assert!(notes[0].ends_with(": b"), "{}", notes[0]);
}

/// A batch smaller than the thread count: the report names the layers whose forward splits
/// by output channels; a batch as large as it names none.
#[test]
fn channel_split_layers_are_named() {
    let _guard = lock();
    let mut g = Graph::new("split");
    let x = g.input("input", Shape::chw(3, 6, 5)).unwrap();
    let a = g.add("a", Op::Conv2d(Conv2d::new(20, [3, 3]).pad(Padding::hw(1, 1))), &[x]).unwrap();
    let a = g.add("a_relu", Op::Act(Activation::Relu), &[a]).unwrap();
    let b = g.add("b", Op::Conv2d(Conv2d::new(4, [1, 1])), &[a]).unwrap();
    let v = g.add("gap", Op::GlobalAvgPool, &[b]).unwrap();
    g.add("fc", Op::Dense(Dense { out_features: 3, bias: true }), &[v]).unwrap();
    for (batch, named) in [(1, true), (3, false)] {
        let cfg = BenchConfig { batch, reps: 1, threads: Some(3), ..BenchConfig::default() };
        let r = bench::run(&g, &cfg, &mut |_| {}).unwrap();
        check_report(&g, &r, batch);
        let notes: Vec<&String> = r.notes.iter().filter(|n| n.contains("split by output channels")).collect();
        match named {
            // `b`'s 4 channels make one part: not split.
            true => assert!(notes.len() == 1 && notes[0].starts_with("batch 1 < 3 threads") && notes[0].ends_with(": a"), "{:?}", r.notes),
            false => assert!(notes.is_empty(), "{:?}", r.notes),
        }
    }
}

#[test]
fn json_round_trips_exactly() {
    let _guard = lock();
    let g = model("tests/models/tiny.cnn", "TinyFile");
    let r = run(&g, 2, 1);
    let text = serde_json::to_string_pretty(&r.to_json()).unwrap();
    let back = BenchReport::from_json(&text).unwrap();
    assert_eq!(back, r);
    // Derived figures for readers are there too.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["engines"][0]["train_gflops"].as_f64().unwrap() > 0.0, "{}", v["engines"][0]);
    assert!(v["engines"][0]["train_of_peak"].as_f64().unwrap() > 0.0);
    assert!(v["peak"]["gflops"].as_f64().unwrap() > 1.0);
    assert_eq!(v["layers"][0]["group"], "conv1");
}

#[test]
fn skipping_engines_and_bad_configurations() {
    let _guard = lock();
    let g = model("tests/models/tiny.cnn", "TinyFile");
    let cfg = BenchConfig { batch: 1, reps: 1, naive: false, reference: false, ..BenchConfig::default() };
    let r = bench::run(&g, &cfg, &mut |_| {}).unwrap();
    assert_eq!(r.engines.len(), 1);
    assert!(r.layers.iter().all(|l| l.times.len() == 1));
    assert!(!r.render_table().contains("naive"));

    let e = bench::run(&g, &BenchConfig { batch: 0, ..cfg.clone() }, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let e = bench::run(&g, &BenchConfig { reps: 0, ..cfg.clone() }, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("repetitions"), "{e}");
    let e = bench::run(&g, &BenchConfig { threads: Some(0), ..cfg.clone() }, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("threads"), "{e}");

    // A pool of its own: the engines and the peak scale by its size.
    let r = bench::run(&g, &BenchConfig { threads: Some(3), ..cfg }, &mut |_| {}).unwrap();
    assert_eq!(r.peak.threads, 3);
}

#[test]
fn peak_rss_probe_sees_an_allocation() {
    let _guard = lock();
    let (Some(before), true) = (bench::read_rss(), bench::reset_peak_rss()) else {
        eprintln!("no /proc/self/status or clear_refs here: nothing to check");
        return;
    };
    assert!(before.current > 0 && before.peak >= before.current, "{before:?}");
    let mut v = vec![0u8; 64 << 20];
    for (i, b) in v.iter_mut().enumerate().step_by(4096) {
        *b = i as u8 | 1;
    }
    std::hint::black_box(&v);
    drop(v);
    let after = bench::read_rss().unwrap();
    // (the allocator or the rest of the process may have returned a few MiB meanwhile)
    assert!(after.peak >= before.current + (48 << 20), "64 MiB touched, high-water mark {} -> {}", before.current, after.peak);
}

#[test]
fn jit_profile_is_off_by_default_and_per_group_when_on() {
    let _guard = lock();
    use cnnc_runtime::engine::Engine;
    use cnnc_runtime::init::InitConfig;
    use cnnc_runtime::params::ParamStore;
    let g = model("tests/models/tiny.cnn", "TinyFile");
    let mut e = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 3, Fusion::Full).unwrap();
    let mut p = ParamStore::<f32>::for_graph(&g, &InitConfig::pytorch(), 7).unwrap();
    let mut gr = p.zeros_like();
    let x = cnnc_compiler::lower::report::fill(3 * 144, 5);
    let step = |e: &mut JitEngine, p: &mut ParamStore<f32>, gr: &mut ParamStore<f32>| e.train_step(p, gr, &x, &[1, 4, 9], 0).unwrap();
    step(&mut e, &mut p, &mut gr);
    let groups = e.plan(true).groups.len();
    assert_eq!(e.profile(true).len(), groups);
    assert!(e.profile(true).iter().all(|t| t.forward.is_zero() && t.backward.is_zero()), "profiling is off by default");
    e.set_profiling(true);
    step(&mut e, &mut p, &mut gr);
    let prof = e.profile(true);
    // conv1 (+relu) is the first group: it ran forward and backward.
    assert!(!prof[0].forward.is_zero() && !prof[0].backward.is_zero(), "{prof:?}");
    e.infer(&p, &x, 3).unwrap();
    let inf = e.profile(false);
    assert_eq!(inf.len(), e.plan(false).groups.len());
    assert!(!inf[0].forward.is_zero() && inf.iter().all(|t| t.backward.is_zero()), "{inf:?}");
    e.set_profiling(false);
    assert!(e.profile(true).iter().all(|t| t.forward.is_zero()), "turning profiling off clears the times");
}
