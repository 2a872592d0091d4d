//! Benchmarks of whole models, per model and per layer: what `cnnc bench` prints and
//! `benches/train_step.rs` runs.
//!
//! [`run`] times one graph at one batch size on up to three engines, in this order:
//!
//! | engine | what | per-layer times from |
//! | --- | --- | --- |
//! | `fused JIT` | [`JitEngine`] with `Fusion::Full` (blocked kernels, fused groups) | [`JitEngine::profile`] |
//! | `naive JIT` | [`JitEngine`] with `Fusion::None` (one naive kernel per node) | [`JitEngine::profile`] |
//! | `reference` | the ndarray interpreter ([`reference::loss_and_grad`]) | [`ForwardState::node_time`](reference::ForwardState::node_time) |
//!
//! and reports, for each engine, the compile time, the inference time (forward, inference
//! plan) and the training-step time (forward, loss, backward) as **medians of repeated runs**
//! (after one warm-up run), GFLOP/s from the cost model's FLOPs ([`cost::analyze`]) and that
//! as a fraction of this machine's 128-bit FMA peak measured in the same run
//! ([`PeakKernel`], one thread, scaled by the engine's thread count). Per layer there is one
//! row per group of the **fused training plan**, naming its nodes; a row's naive and
//! reference times are the sums of its nodes' times in those engines, so the rows of all
//! three engines cover the same work. A group's backward time includes zeroing the gradients
//! whose life starts at its step and recomputing its output where the memory plan recomputes it
//! (`passes::memplan`); time outside any group (the loss, zeroing the heads' gradients, the
//! input copy) is the engine row's `other` column. The report's last note says which GEMM
//! broadcast variant the JIT kernels ran with and how it was chosen
//! (`lower::gemm::Broadcast::host_summary`).
//!
//! # Memory
//! Beside the cost report's activation-memory figures ([`cost::Memory`]) each engine gets a
//! measured **peak-RSS growth**: the resident set size before the engine is built, then the
//! high-water mark (`VmHWM` of `/proc/self/status`, reset by writing `5` to
//! `/proc/self/clear_refs` once the engine is built, so Cranelift's transient compile memory is
//! not counted) after its first training step. Engines are measured in the order above in one
//! process, so a later engine may reuse pages an earlier one freed (its figure is then a lower
//! bound); where `/proc` is missing or read-only the figure is absent and a note says why.
//!
//! # JSON
//! [`BenchReport`] serialises with serde; every stored quantity is an integer (nanoseconds,
//! bytes, FLOPs, FLOP/s) so the JSON round-trips exactly. [`BenchReport::to_json`] adds derived
//! milliseconds, GFLOP/s and fractions of peak for readers; [`BenchReport::from_json`] ignores
//! them.

use crate::engine::{Engine, EngineError};
use crate::exec::JitEngine;
use crate::init::InitConfig;
use crate::params::ParamStore;
use crate::reference;
use cnnc_compiler::cost;
use cnnc_compiler::ir::{Graph, Loss, NodeId};
use cnnc_compiler::lower::peak::PeakKernel;
use cnnc_compiler::lower::report::fill;
use cnnc_compiler::plan::Fusion;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Samples per step (>= 1).
    pub batch: usize,
    /// Timed runs of the fused engine (>= 1); the naive JIT and the reference interpreter run
    /// `max(1, ceil(reps / 3))` (they are 10-50x slower).
    pub reps: usize,
    /// Also time the naive JIT engine.
    pub naive: bool,
    /// Also time the reference interpreter.
    pub reference: bool,
    /// Loss of the training step.
    pub loss: Loss,
    /// Seed of the parameters, inputs and dropout masks.
    pub seed: u64,
    /// Threads of the JIT engines (a rayon pool of this size); `None`: the global pool
    /// (`RAYON_NUM_THREADS`, else one per core). For thread-scaling measurements.
    pub threads: Option<usize>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig { batch: 32, reps: 10, naive: true, reference: true, loss: Loss::SoftmaxCrossEntropy, seed: 1, threads: None }
    }
}

impl BenchConfig {
    /// Timed runs of the slow engines.
    pub fn slow_reps(&self) -> usize {
        self.reps.div_ceil(3).max(1)
    }
}

/// This machine's FMA peak as measured in the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peak {
    /// 128-bit (`f32x4`) FMA peak of one thread, FLOP/s.
    pub flops_per_thread: u64,
    /// Threads the JIT engines split the batch over.
    pub threads: usize,
}

impl Peak {
    /// `flops_per_thread * threads` in GFLOP/s.
    pub fn total_gflops(&self) -> f64 {
        self.flops_per_thread as f64 * self.threads as f64 / 1e9
    }
}

/// The cost model's figures for the whole batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCost {
    /// Parameters.
    pub params: u64,
    /// Forward FLOPs (the cost report's `flops.forward`).
    pub flops_forward: u64,
    /// Backward FLOPs (input and weight gradients).
    pub flops_backward: u64,
    /// Activation memory training keeps for backward (`memory.training_saved_bytes`).
    pub training_saved_bytes: u64,
    /// Inference peak of live activations (`memory.inference_peak_bytes`).
    pub inference_peak_bytes: u64,
    /// cnnc's training plan: arena and argmax (`memory.training_plan_bytes`).
    #[serde(default)]
    pub training_plan_bytes: Option<u64>,
}

/// One engine's model-level figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineRow {
    /// `fused JIT`, `naive JIT` or `reference`.
    pub engine: String,
    /// Timed runs (medians are over these).
    pub reps: usize,
    /// Planning and Cranelift compilation (training and inference plans); none for the
    /// interpreter.
    pub compile_ns: Option<u64>,
    /// Median inference (forward, inference plan).
    pub infer_ns: u64,
    /// Median training step (forward, loss, backward).
    pub train_ns: u64,
    /// Median over steps of the summed per-group forward times of the training step.
    pub forward_ns: u64,
    /// Median over steps of the summed per-group backward times.
    pub backward_ns: u64,
    /// Value and gradient buffers the engine allocates once (JIT engines).
    pub buffer_bytes: Option<u64>,
    /// Measured peak-RSS growth: building the engine and its first training step (see the
    /// module header); none where `/proc` is unavailable.
    pub rss_growth_bytes: Option<u64>,
}

impl EngineRow {
    /// Training-step time not spent in any group (loss, zeroing the heads' gradients, input
    /// copy).
    pub fn other_ns(&self) -> u64 {
        self.train_ns.saturating_sub(self.forward_ns + self.backward_ns)
    }
}

/// One engine's times for one layer row (medians over steps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerTime {
    /// Forward of the group's nodes in the training step.
    pub forward_ns: u64,
    /// Backward of the group's nodes.
    pub backward_ns: u64,
}

impl LayerTime {
    /// Forward plus backward.
    pub fn total_ns(&self) -> u64 {
        self.forward_ns + self.backward_ns
    }
}

/// One group of the fused training plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRow {
    /// The group's anchor (its first node).
    pub group: String,
    /// Op kind of the anchor (`conv2d`, `dense`, ...).
    pub op: String,
    /// Every node of the group, anchor first.
    pub nodes: Vec<String>,
    /// A concatenation the fused plan computes in place (its branches write their channel
    /// slices; no kernel runs for it in the fused engine).
    #[serde(default)]
    pub in_place: bool,
    /// Pooling groups this group computes as it stores each sample (`Plan::pool_into`): their
    /// forward time is in this row's, theirs is about zero.
    #[serde(default)]
    pub pools: Vec<String>,
    /// A convolution group's kernel families in the fused engine, forward / backward data /
    /// weight gradient (`winograd`, `direct`, `1x1`, `im2col`: `JitEngine::conv_kernels`);
    /// empty for other groups.
    #[serde(default)]
    pub kernels: String,
    /// Forward FLOPs of the group's nodes (cost model, whole batch).
    pub flops_forward: u64,
    /// Backward FLOPs of the group's nodes.
    pub flops_backward: u64,
    /// One entry per [`BenchReport::engines`], same order.
    pub times: Vec<LayerTime>,
}

impl LayerRow {
    /// GFLOP/s of forward + backward in `t`; `None` when the row takes under 10 µs (a group
    /// that runs no kernel, such as an in-place concat, whose backward FLOPs the cost model
    /// charges to it while the engine does that work in its users' kernels).
    pub fn gflops(&self, t: &LayerTime) -> Option<f64> {
        (t.total_ns() >= 10_000).then(|| gflops(self.flops_forward + self.flops_backward, t.total_ns()))
    }
}

/// Everything [`run`] measured for one model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Model name.
    pub model: String,
    /// Samples per step.
    pub batch: usize,
    /// The peak the GFLOP/s are compared with.
    pub peak: Peak,
    /// Cost-model totals.
    pub cost: ModelCost,
    /// Engines in the order they ran.
    pub engines: Vec<EngineRow>,
    /// One row per group of the fused training plan, in execution order.
    pub layers: Vec<LayerRow>,
    /// Caveats (missing `/proc`, fallback layers, ...).
    pub notes: Vec<String>,
}

/// A progress event of [`run`]: `done` of `total` timed runs, now doing `what`.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// Runs finished.
    pub done: usize,
    /// Runs in all.
    pub total: usize,
    /// The current stage (`fused JIT: train`, ...).
    pub what: &'a str,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2 }
}

/// GFLOP/s of `flops` in `ns` nanoseconds (0 when `ns` is 0).
pub fn gflops(flops: u64, ns: u64) -> f64 {
    if ns == 0 { 0.0 } else { flops as f64 / ns as f64 }
}

/// Resident-set figures of this process from `/proc/self/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`: resident now, bytes.
    pub current: u64,
    /// `VmHWM`: high-water mark since start or the last [`reset_peak_rss`], bytes.
    pub peak: u64,
}

/// Read `VmRSS` and `VmHWM` (`None` where `/proc/self/status` is missing or lacks them).
pub fn read_rss() -> Option<Rss> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(key))?;
        let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    Some(Rss { current: field("VmRSS:")?, peak: field("VmHWM:")? })
}

/// Reset the RSS high-water mark to the current RSS (writes `5` to `/proc/self/clear_refs`);
/// false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn eerr(m: impl Into<String>) -> EngineError {
    EngineError(m.into())
}

/// Per-node `(forward, backward)` time of one engine run, by node name.
type NodeTimes = HashMap<String, (Duration, Duration)>;

/// Run the benchmark of `graph` (see the module header). `progress` is called before each
/// timed run. Errors name the engine and the layer where one is involved.
pub fn run(graph: &Graph, cfg: &BenchConfig, progress: &mut (dyn FnMut(Progress<'_>) + Send)) -> Result<BenchReport, EngineError> {
    if cfg.batch == 0 {
        return Err(eerr("batch size must be at least 1"));
    }
    if cfg.reps == 0 {
        return Err(eerr("repetitions must be at least 1"));
    }
    match cfg.threads {
        None => run_here(graph, cfg, progress),
        Some(0) => Err(eerr("threads must be at least 1")),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| eerr(format!("a pool of {n} threads: {e}")))?;
            pool.install(|| run_here(graph, cfg, progress))
        }
    }
}

/// [`run`] on the current rayon pool.
fn run_here(graph: &Graph, cfg: &BenchConfig, progress: &mut (dyn FnMut(Progress<'_>) + Send)) -> Result<BenchReport, EngineError> {
    let batch = cfg.batch;
    let report = cost::analyze(graph, batch);
    let mut notes = Vec::new();

    // Inputs, labels, parameters.
    let inputs = graph.inputs();
    let [input] = inputs.as_slice() else {
        return Err(eerr(format!("model `{}`: the benchmark needs exactly one input, it has {}", graph.name, inputs.len())));
    };
    let per = graph.node(*input).shape.numel();
    // On huge pages, so the engine is timed rather than the caller's buffer: the batch is
    // copied into the arena every step, and on this kind of VM a 4 KiB-page source costs a
    // two-dimensional page walk per page (see `lower::hugebuf`; 8 MiB: ~2.5 ms of the step).
    let x = cnnc_compiler::lower::hugebuf::HugeBuf::from_slice(&fill(batch * per, cfg.seed));
    let params0 = ParamStore::<f32>::for_graph(graph, &InitConfig::pytorch(), cfg.seed).map_err(|e| eerr(format!("model `{}`: {e}", graph.name)))?;

    let slow = cfg.slow_reps();
    let total = 2 * (cfg.reps + 1) + if cfg.naive { 2 * (slow + 1) } else { 0 } + if cfg.reference { 2 * (slow + 1) } else { 0 };
    // Report `what`, then count one run done when `run` is set.
    let mut done = 0;
    let mut tick = move |what: &str, run: bool| {
        progress(Progress { done, total, what });
        done += usize::from(run);
    };

    // The peak (and warm rayon's pool so its threads are not charged to the first engine).
    tick("measuring the FMA peak", false);
    let peak_kernel = PeakKernel::compile().map_err(|e| eerr(format!("FMA peak loop: {e}")))?;
    let threads = rayon::current_num_threads().max(1);
    rayon::broadcast(|_| std::hint::black_box(0));
    let flops_per_thread = (peak_kernel.measure_gflops(30) * 1e9) as u64;
    let peak = Peak { flops_per_thread, threads };
    // The GEMM broadcast variant, chosen (timed, up to ~50 ms) before any engine's compile
    // time starts, so that column holds compilation alone.
    cnnc_compiler::lower::gemm::Broadcast::host().map_err(eerr)?;

    let proc_ok = read_rss().is_some() && reset_peak_rss();
    if !proc_ok {
        notes.push("peak RSS not measured: /proc/self/status or /proc/self/clear_refs is unavailable here".into());
    }

    let mut engines = Vec::new();
    let mut node_times: Vec<NodeTimes> = Vec::new();
    let mut fused_groups: Vec<Vec<String>> = Vec::new();
    let mut fused_ops: Vec<String> = Vec::new();
    let mut fused_inplace: Vec<bool> = Vec::new();
    let mut fused_pools: Vec<Vec<String>> = Vec::new();
    let mut conv_kernels: HashMap<String, String> = HashMap::new();
    let mut labels_k = 0;

    let mut jit_kinds = vec![(Fusion::Full, "fused JIT", cfg.reps)];
    if cfg.naive {
        jit_kinds.push((Fusion::None, "naive JIT", slow));
    }
    for (fusion, label, reps) in jit_kinds {
        tick(&format!("{label}: compiling"), false);
        let base = if proc_ok { read_rss() } else { None };
        let mut e = JitEngine::new(graph, cfg.loss, batch, fusion).map_err(|e| eerr(format!("{label}: {e}")))?;
        let compile_ns = ns(e.compile_time());
        if proc_ok {
            reset_peak_rss();
        }
        let plan = e.plan(true).clone();
        if fusion == Fusion::Full {
            let fb = e.fallback_layers();
            if fb > 0 {
                notes.push(format!("{fb} layer(s) run on the slow reference fallback (lrn, channel_mul, softmax)"));
            }
            let pooled = e.pooled_by_producers(true);
            if !pooled.is_empty() {
                notes.push(format!("pooled by the steps writing their input, as they store each sample (their fwd includes it; the pool's own fwd is ~0): {}", pooled.join(", ")));
            }
            let flipped: Vec<String> = plan
                .graph
                .nodes()
                .filter(|&n| plan.is_transposed(n) && matches!(plan.graph.node(n).op, cnnc_compiler::ir::Op::Conv2d(_)))
                .map(|n| plan.graph.node(n).name.clone())
                .collect();
            if !flipped.is_empty() {
                notes.push(format!(
                    "run as 3x1 on transposed planes, the batch norms on either side storing and reading those planes (their times include the reorders): {}",
                    flipped.join(", ")
                ));
            }
            let [split, _] = e.channel_split_layers();
            if !split.is_empty() {
                notes.push(format!(
                    "batch {batch} < {} threads: each sample's forward of these layers split by output channels (features) across the threads: {}",
                    e.threads(),
                    split.join(", ")
                ));
            }
            conv_kernels = e.conv_kernels().into_iter().map(|(l, k)| (l, k.join("/"))).collect();
            fused_groups = plan.groups.iter().map(|g| g.nodes.iter().map(|&n| plan.graph.node(n).name.clone()).collect()).collect();
            fused_ops = plan.groups.iter().map(|g| plan.graph.node(g.anchor()).op.kind().to_string()).collect();
            fused_inplace = plan.groups.iter().map(|g| plan.inplace_concats.contains(&g.anchor())).collect();
            // Pools the engine computes inside their producers (where the plan asked and every
            // producer stores the pooled value itself).
            let pooled = e.pooled_by_producers(true);
            fused_pools = plan
                .pool_into
                .iter()
                .map(|p| p.map(|p| plan.graph.node(plan.groups[p].anchor()).name.clone()).filter(|n| pooled.contains(n)).into_iter().collect())
                .collect();
        }
        let k = classes(graph)?;
        labels_k = k;
        let labels: Vec<usize> = (0..batch).map(|i| (i * 7 + 3) % k).collect();
        let (mut p, mut gr) = (params0.clone(), params0.zeros_like());
        e.set_profiling(true);
        tick(&format!("{label}: warm-up"), true);
        e.train_step(&mut p, &mut gr, &x, &labels, 0).map_err(|er| eerr(format!("{label}: {er}")))?;
        let rss_growth_bytes = match (base, proc_ok.then(read_rss).flatten()) {
            (Some(b), Some(a)) => Some(a.peak.saturating_sub(b.current)),
            _ => None,
        };
        let (mut train, mut fwd, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
        let mut per_node: Vec<NodeTimes> = Vec::new();
        for i in 0..reps {
            tick(&format!("{label}: train step"), true);
            let t0 = Instant::now();
            e.train_step(&mut p, &mut gr, &x, &labels, i as u64 + 1).map_err(|er| eerr(format!("{label}: {er}")))?;
            train.push(ns(t0.elapsed()));
            let prof = e.profile(true);
            fwd.push(prof.iter().map(|s| ns(s.forward)).sum());
            bwd.push(prof.iter().map(|s| ns(s.backward)).sum());
            let mut m = NodeTimes::new();
            for (g, s) in plan.groups.iter().zip(&prof) {
                // A naive group is one node; a fused group's time goes to its anchor.
                m.insert(plan.graph.node(g.anchor()).name.clone(), (s.forward, s.backward));
            }
            per_node.push(m);
        }
        tick(&format!("{label}: warm-up"), true);
        e.infer(&p, &x, batch).map_err(|er| eerr(format!("{label}: {er}")))?;
        let mut infer = Vec::new();
        for _ in 0..reps {
            tick(&format!("{label}: inference"), true);
            let t0 = Instant::now();
            e.infer(&p, &x, batch).map_err(|er| eerr(format!("{label}: {er}")))?;
            infer.push(ns(t0.elapsed()));
        }
        engines.push(EngineRow {
            engine: label.to_string(),
            reps,
            compile_ns: Some(compile_ns),
            infer_ns: median(infer),
            train_ns: median(train),
            forward_ns: median(fwd),
            backward_ns: median(bwd),
            buffer_bytes: Some(e.buffer_bytes() as u64),
            rss_growth_bytes,
        });
        node_times.push(median_times(&per_node));
    }

    if cfg.reference {
        let label = "reference";
        let k = if labels_k > 0 { labels_k } else { classes(graph)? };
        let labels: Vec<usize> = (0..batch).map(|i| (i * 7 + 3) % k).collect();
        let mut dims = vec![batch];
        dims.extend(graph.node(*input).shape.dims());
        let view = ndarray::ArrayViewD::from_shape(dims, &x).map_err(|e| eerr(format!("{label}: input batch: {e}")))?;
        let mut p = params0.clone();
        let base = if proc_ok { read_rss() } else { None };
        if proc_ok {
            reset_peak_rss();
        }
        let step = |p: &mut ParamStore, seed: u64| -> Result<NodeTimes, EngineError> {
            let out = reference::loss_and_grad(graph, p, view.view(), &labels, cfg.loss, reference::Mode::Train, seed).map_err(|e| eerr(format!("{label}: {e}")))?;
            out.state.update_running_stats(graph, p).map_err(|e| eerr(format!("{label}: {e}")))?;
            Ok(graph
                .nodes()
                .map(|id: NodeId| {
                    let f = out.state.node_time(id).unwrap_or_default();
                    let b = out.grads.node_time(id).unwrap_or_default();
                    (graph.node(id).name.clone(), (f, b))
                })
                .collect())
        };
        tick("reference: warm-up", true);
        step(&mut p, 0)?;
        let rss_growth_bytes = match (base, proc_ok.then(read_rss).flatten()) {
            (Some(b), Some(a)) => Some(a.peak.saturating_sub(b.current)),
            _ => None,
        };
        let (mut train, mut fwd, mut bwd, mut per_node) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..slow {
            tick("reference: train step", true);
            let t0 = Instant::now();
            let m = step(&mut p, i as u64 + 1)?;
            train.push(ns(t0.elapsed()));
            fwd.push(m.values().map(|t| ns(t.0)).sum());
            bwd.push(m.values().map(|t| ns(t.1)).sum());
            per_node.push(m);
        }
        let mut infer = Vec::new();
        for i in 0..=slow {
            tick("reference: inference", true);
            let t0 = Instant::now();
            reference::forward(graph, &p, view.view(), reference::Mode::Eval, 0).map_err(|e| eerr(format!("{label}: {e}")))?;
            if i > 0 {
                infer.push(ns(t0.elapsed()));
            }
        }
        engines.push(EngineRow {
            engine: label.to_string(),
            reps: slow,
            compile_ns: None,
            infer_ns: median(infer),
            train_ns: median(train),
            forward_ns: median(fwd),
            backward_ns: median(bwd),
            buffer_bytes: None,
            rss_growth_bytes,
        });
        node_times.push(median_times(&per_node));
    }

    // Rows: the fused training plan's groups, FLOPs from the cost report by node name.
    let cost_of: HashMap<&str, &cost::LayerCost> = report.layers.iter().map(|l| (l.name.as_str(), l)).collect();
    let layers = fused_groups
        .iter()
        .zip(&fused_ops)
        .zip(&fused_inplace)
        .zip(fused_pools.iter().chain(std::iter::repeat(&Vec::new())))
        .map(|(((nodes, op), &in_place), pools)| {
            let (mut ff, mut fb) = (0, 0);
            for n in nodes {
                if let Some(l) = cost_of.get(n.as_str()) {
                    ff += l.counts.flops.forward;
                    fb += l.counts.flops.backward.total();
                }
            }
            let times = node_times
                .iter()
                .map(|m| {
                    let (mut f, mut b) = (Duration::ZERO, Duration::ZERO);
                    for n in nodes {
                        if let Some(&(tf, tb)) = m.get(n) {
                            f += tf;
                            b += tb;
                        }
                    }
                    LayerTime { forward_ns: ns(f), backward_ns: ns(b) }
                })
                .collect();
            let kernels = conv_kernels.get(&nodes[0]).cloned().unwrap_or_default();
            LayerRow { group: nodes[0].clone(), op: op.clone(), nodes: nodes.clone(), in_place, pools: pools.clone(), kernels, flops_forward: ff, flops_backward: fb, times }
        })
        .collect();
    tick("done", false);
    // Which GEMM broadcast variant the JIT kernels ran with, and why (timed here or set).
    notes.push(cnnc_compiler::lower::gemm::Broadcast::host_summary());
    Ok(BenchReport {
        model: graph.name.clone(),
        batch,
        peak,
        cost: ModelCost {
            params: report.totals.params,
            flops_forward: report.totals.flops.forward,
            flops_backward: report.totals.flops.backward.total(),
            training_saved_bytes: report.memory.training_saved_bytes,
            inference_peak_bytes: report.memory.inference_peak_bytes,
            training_plan_bytes: report.memory.training_plan_bytes,
        },
        engines,
        layers,
        notes,
    })
}

/// Classes the labels may use: the fewest of any output's logits (side outputs get the same
/// labels as the main one).
fn classes(graph: &Graph) -> Result<usize, EngineError> {
    let outs = graph.outputs();
    outs.iter()
        .map(|&out| {
            let id = match graph.node(out).op {
                cnnc_compiler::ir::Op::Loss(_) => graph.operands(out)[0],
                _ => out,
            };
            graph.node(id).shape.numel().max(1)
        })
        .min()
        .ok_or_else(|| eerr(format!("model `{}` has no output", graph.name)))
}

/// Per-node medians over runs.
fn median_times(runs: &[NodeTimes]) -> NodeTimes {
    let mut out = NodeTimes::new();
    if let Some(first) = runs.first() {
        for name in first.keys() {
            let f = median(runs.iter().map(|m| m.get(name).map_or(0, |t| ns(t.0))).collect());
            let b = median(runs.iter().map(|m| m.get(name).map_or(0, |t| ns(t.1))).collect());
            out.insert(name.clone(), (Duration::from_nanos(f), Duration::from_nanos(b)));
        }
    }
    out
}

fn ms(ns: u64) -> String {
    let v = ns as f64 / 1e6;
    if v >= 100.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn giga(n: u64) -> String {
    format!("{:.3}", n as f64 / 1e9)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// A text table with right-aligned columns except the first `left` ones.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
    left: usize,
}

impl Table {
    fn new(head: &[&str], left: usize) -> Table {
        Table { head: head.iter().map(|s| s.to_string()).collect(), rows: Vec::new(), left }
    }
    fn render(&self, out: &mut String) {
        let n = self.head.len();
        let w: Vec<usize> = (0..n).map(|i| self.rows.iter().map(|r| r[i].chars().count()).chain([self.head[i].chars().count()]).max().unwrap_or(0)).collect();
        for r in std::iter::once(&self.head).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                if i < self.left {
                    let _ = write!(line, "{c:<w$}", w = w[i]);
                } else {
                    let _ = write!(line, "{c:>w$}", w = w[i]);
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
}

impl BenchReport {
    /// The engine row labelled `name`.
    pub fn engine(&self, name: &str) -> Option<&EngineRow> {
        self.engines.iter().find(|e| e.engine == name)
    }

    /// Training-step FLOPs (forward + backward).
    pub fn train_flops(&self) -> u64 {
        self.cost.flops_forward + self.cost.flops_backward
    }

    /// `gflops / peak` (0 without a peak).
    pub fn of_peak(&self, gflops: f64) -> f64 {
        let p = self.peak.total_gflops();
        if p > 0.0 { gflops / p } else { 0.0 }
    }

    /// The human-readable tables: model summary, memory, then one row per layer group.
    pub fn render_table(&self) -> String {
        let mut o = String::new();
        let fused_reps = self.engines.first().map_or(0, |e| e.reps);
        let slow_reps = self.engines.get(1).map(|e| e.reps);
        let _ = writeln!(
            o,
            "{}: batch {}, {} thread(s), medians of {} run(s){}",
            self.model,
            self.batch,
            self.peak.threads,
            fused_reps,
            slow_reps.map(|r| format!(" ({r} for the slower engines)")).unwrap_or_default()
        );
        let _ = writeln!(
            o,
            "128-bit FMA peak (JIT'd f32x4 fma loop, this run): {:.1} GFLOP/s per thread x {} = {:.1} GFLOP/s",
            self.peak.flops_per_thread as f64 / 1e9,
            self.peak.threads,
            self.peak.total_gflops()
        );
        let _ = writeln!(
            o,
            "cost model: {} params, {} GFLOP forward, {} GFLOP backward per step",
            self.cost.params,
            giga(self.cost.flops_forward),
            giga(self.cost.flops_backward)
        );
        let _ = writeln!(o);
        let mut t = Table::new(&["engine", "compile ms", "infer ms", "GFLOP/s", "of peak", "train step ms", "GFLOP/s", "of peak", "fwd ms", "bwd ms", "other ms", "buffers", "peak RSS +"], 1);
        for e in &self.engines {
            let gi = gflops(self.cost.flops_forward, e.infer_ns);
            let gt = gflops(self.train_flops(), e.train_ns);
            t.rows.push(vec![
                e.engine.clone(),
                e.compile_ns.map_or("-".into(), ms),
                ms(e.infer_ns),
                format!("{gi:.2}"),
                format!("{:.3}", self.of_peak(gi)),
                ms(e.train_ns),
                format!("{gt:.2}"),
                format!("{:.3}", self.of_peak(gt)),
                ms(e.forward_ns),
                ms(e.backward_ns),
                ms(e.other_ns()),
                e.buffer_bytes.map_or("-".into(), mib),
                e.rss_growth_bytes.map_or("n/a".into(), mib),
            ]);
        }
        t.render(&mut o);
        if let Some(f) = self.engine("fused JIT") {
            let mut parts = Vec::new();
            for other in self.engines.iter().skip(1) {
                if f.train_ns > 0 && f.infer_ns > 0 {
                    parts.push(format!(
                        "fused vs {}: {:.1}x train step, {:.1}x inference",
                        other.engine,
                        other.train_ns as f64 / f.train_ns as f64,
                        other.infer_ns as f64 / f.infer_ns as f64
                    ));
                }
            }
            if !parts.is_empty() {
                let _ = writeln!(o, "{}", parts.join("; "));
            }
            let _ = writeln!(
                o,
                "memory: cost report keeps {} of activations for backward ({} inference peak), cnnc's training plan {}; fused JIT buffers {}; measured peak-RSS growth (build + first training step): {}",
                mib(self.cost.training_saved_bytes),
                mib(self.cost.inference_peak_bytes),
                self.cost.training_plan_bytes.map_or("-".into(), mib),
                f.buffer_bytes.map_or("-".into(), mib),
                f.rss_growth_bytes.map_or("n/a".into(), mib)
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "per layer: groups of the fused training plan, ms per step (fwd = forward, f+b = forward + backward)");
        let mut head: Vec<String> = ["group", "op", "fused with", "kernels f/d/w", "MFLOP fwd", "MFLOP bwd"].iter().map(|s| s.to_string()).collect();
        for (i, e) in self.engines.iter().enumerate() {
            let short = e.engine.split(' ').next().unwrap_or("").to_string();
            head.push(format!("{short} fwd"));
            head.push(format!("{short} f+b"));
            if i == 0 {
                head.push("GFLOP/s".into());
                head.push("of peak".into());
            }
        }
        if self.engines.len() > 1 {
            head.push("naive/fused".into());
        }
        let hr: Vec<&str> = head.iter().map(String::as_str).collect();
        let mut t = Table::new(&hr, 4);
        for l in &self.layers {
            let op = if l.in_place { format!("{} (in place)", l.op) } else { l.op.clone() };
            // Pools computed in this group's store: `+pool`.
            let with: Vec<String> = l.nodes[1..].iter().cloned().chain(l.pools.iter().map(|p| format!("+{p}"))).collect();
            let mut r = vec![l.group.clone(), op, with.join(" "), l.kernels.clone()];
            r.push(format!("{:.2}", l.flops_forward as f64 / 1e6));
            r.push(format!("{:.2}", l.flops_backward as f64 / 1e6));
            for (i, lt) in l.times.iter().enumerate() {
                r.push(ms(lt.forward_ns));
                r.push(ms(lt.total_ns()));
                if i == 0 {
                    match l.gflops(lt) {
                        Some(g) => {
                            r.push(format!("{g:.2}"));
                            r.push(format!("{:.3}", self.of_peak(g)));
                        }
                        None => r.extend(["-".to_string(), "-".to_string()]),
                    }
                }
            }
            if l.times.len() > 1 {
                let (f, nv) = (l.times[0].total_ns(), l.times[1].total_ns());
                // A group that runs no kernel (an in-place concat) has no meaningful ratio.
                r.push(if l.in_place || f == 0 { "-".into() } else { format!("{:.1}x", nv as f64 / f as f64) });
            }
            t.rows.push(r);
        }
        t.render(&mut o);
        if self.engines.iter().any(|e| e.rss_growth_bytes.is_some()) {
            let _ = writeln!(o, "note: peak RSS + = resident-set high-water mark after building the engine and one training step, minus the RSS before building it; engines run in the order listed in one process, so a later one may reuse pages an earlier one freed");
        }
        for n in &self.notes {
            let _ = writeln!(o, "note: {n}");
        }
        o
    }

    /// The report as JSON: the serialised [`BenchReport`] plus derived figures for readers
    /// (`*_ms`, `*_gflops`, `*_of_peak`), which [`BenchReport::from_json`] ignores.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["peak"]["gflops"] = self.peak.total_gflops().into();
        for (i, e) in self.engines.iter().enumerate() {
            let gi = gflops(self.cost.flops_forward, e.infer_ns);
            let gt = gflops(self.train_flops(), e.train_ns);
            let d = &mut v["engines"][i];
            d["infer_ms"] = (e.infer_ns as f64 / 1e6).into();
            d["train_ms"] = (e.train_ns as f64 / 1e6).into();
            d["infer_gflops"] = gi.into();
            d["train_gflops"] = gt.into();
            d["infer_of_peak"] = self.of_peak(gi).into();
            d["train_of_peak"] = self.of_peak(gt).into();
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (j, lt) in l.times.iter().enumerate() {
                let g = l.gflops(lt);
                let d = &mut v["layers"][i]["times"][j];
                d["gflops"] = g.into();
                d["of_peak"] = g.map(|g| self.of_peak(g)).into();
            }
        }
        v
    }

    /// Parse what [`BenchReport::to_json`] wrote.
    pub fn from_json(text: &str) -> Result<BenchReport, serde_json::Error> {
        serde_json::from_str(text)
    }
}
