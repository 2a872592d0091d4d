//! The JIT engine: a graph compiled by the pipeline into fused groups and run with the
//! Cranelift kernels of `cnnc_compiler::lower`, forward and backward, on all cores.
//!
//! ## What runs where
//! [`JitEngine::new`] compiles two plans up front ([`Plan`]s from `pipeline::plan`): a training
//! plan (batch-norm with batch statistics, dropout on) and an inference plan (batch norm folded
//! into the preceding convolution's epilogue where the plan groups `conv -> bn`). With
//! [`Fusion::Full`] the kernels are the blocked GEMM ones (`lower::Mode::Blocked`), each group's
//! anchor fusing what its epilogue can; with [`Fusion::None`] every node is its own group and
//! the kernels are the scalar naive ones (`lower::Mode::Naive`): the baseline.
//!
//! | op | kernel |
//! |----|--------|
//! | conv2d | `ConvKernels` (fused bias, folded bn, residual add, relu/leaky relu, concat slice) |
//! | dense | `DenseKernels` (fused bias, relu/leaky relu) |
//! | batch norm | `lower::pointwise` (training: batch stats + running-stat update; inference: fold) |
//! | max/avg pool | `PoolKernels` |
//! | activation, add, concat (copy), flatten, dropout, global avg pool | plain loops here |
//! | concat (in place) | nothing: the branches write their channel slices |
//! | lrn, channel_mul, softmax | **slow fallback**: the reference op functions on ndarray copies |
//!
//! Chain ops that a kernel cannot fuse (e.g. a sigmoid after a convolution, a residual add
//! after a dense layer) run as in-place passes over the group's output.
//!
//! ## Batch sizes
//! Buffers are allocated once, for the batch given to `new`; any batch of `1..=batch` samples
//! runs on the first `n` samples of every buffer (no recompilation: kernels take the sample
//! count from the slice lengths). Larger batches are an error.
//!
//! ## Threads and determinism
//! The batch is split into `threads` fixed chunks (`threads` = rayon's pool size when the engine
//! is built); weight gradients are accumulated per chunk and summed in chunk order, so a given
//! thread count gives bit-identical results run to run.
//!
//! A step runs on the pool: called from another thread, [`Engine::train_step`] and
//! [`Engine::infer`] move onto one of the pool's threads for the whole step, and while it
//! runs the pool's other threads keep polling for work instead of going to sleep between its
//! parallel loops (`KeepHot`). Same chunks in the same order, so the results do not depend on
//! the calling thread.
//!
//! A batch smaller than the thread count (a single image to classify, explain or attack)
//! leaves threads without samples, so the engine splits within samples instead:
//! - a convolution's forward splits each sample's output channels into parts run at once
//!   (`program::Parts`: kernels compiled forward-only for the parts' widths when the
//!   engine is built for fewer samples than threads; [`JitEngine::channel_split_layers`]
//!   names them), and so does a large dense layer's (256K weights or more) by output
//!   features. The parts sum as the whole layer does but may block differently, so
//!   results agree with the unsplit layer to rounding, not bit for bit;
//! - a convolution's or dense layer's backward runs its input gradient and its weight
//!   gradient at once, each sample chunk on two threads.
//!
//! Measured on this project's 2-core machine (`cnnc bench examples/models/resnet.cnn --model
//! ResNet18 -b 1 --no-naive --no-reference -j 1` against `-j 2`): inference 84-86 ms on one
//! thread and 45-47 ms on two, where two threads had run no faster than one (86 ms); the
//! training step 313-316 ms against 184-188 ms (was 302-338 ms). At such a batch, batch norms,
//! poolings and a small dense layer's forward still run on one thread.
//!
//! ## Frozen layers
//! The training program runs only the backward work [`Graph::needs_grad`] leaves (the rule
//! the cost report counts with): nothing at or below the lowest trainable layer, no weight
//! gradients for frozen layers. A parameter store that trains a layer the compiled graph
//! froze is an error, not silently-zero gradients.
//!
//! ## Memory
//! Only group outputs exist in memory (values inside a fused group never do); each has a value
//! buffer and, in the training program, a gradient buffer, at the memory plan's offsets in one
//! arena allocated once (`passes::memplan`: buffers never live at once share memory). Each
//! step sees the arena through an `arena::Mem`, which splits off the buffers the step writes
//! (safe code; an overlap the plan let through is an error, not aliasing). Backward reads
//! activations' derivatives from the group output, so no pre-activation is kept. The
//! inference program borrows the training program's arena.
//! Dropout masks are drawn exactly as the reference interpreter draws them
//! (`reference::dropout_mask` with `init::tensor_rng(seed, layer)`), so engines agree per seed.

mod arena;
mod program;
mod run;

use crate::engine::{check_loss_weights, score, BatchStats, Engine, EngineError};
use crate::params::ParamStore;
use cnnc_compiler::ir::{Graph, Loss, Op};
use cnnc_compiler::plan::{Fusion, Mode as PlanMode, Plan};
use program::{compile, eerr, Kind, Program};
use std::time::Duration;

/// An [`Engine`] running JIT-compiled, fused kernels (see the module header).
pub struct JitEngine {
    name: &'static str,
    loss: Loss,
    train: Program,
    infer: Program,
    logits_buf: Vec<f32>,
    /// Loss weight of each head of the training program (main output first).
    loss_weights: Vec<f32>,
    /// Whether the inference program borrows the training program's arena while it runs
    /// (the two never run at once, and a training step writes every value before reading
    /// it), so evaluation costs no activation memory of its own: when it is large enough.
    lent: bool,
}

impl JitEngine {
    /// Compile `graph` for training with `loss` and inference on batches of up to `batch`
    /// samples, with `fusion` (`Full`: fused blocked kernels; `None`: naive kernels, no fusion).
    ///
    /// Sets flush-to-zero / denormals-are-zero on the rayon pool's threads and the calling
    /// thread ([`entry::flush_denormals`](cnnc_compiler::lower::entry::flush_denormals)): late in
    /// training, gradients and optimiser state reach denormal magnitudes, which the CPU
    /// otherwise handles tens of times slower.
    pub fn new(graph: &Graph, loss: Loss, batch: usize, fusion: Fusion) -> Result<JitEngine, EngineError> {
        if batch == 0 {
            return Err(eerr("batch size must be >= 1"));
        }
        rayon::broadcast(|_| cnnc_compiler::lower::entry::flush_denormals());
        cnnc_compiler::lower::entry::flush_denormals();
        let threads = rayon::current_num_threads().max(1);
        let train = compile(graph, loss, PlanMode::Training, fusion, batch, threads)?;
        let mut infer = compile(graph, loss, PlanMode::Inference, fusion, batch, threads)?;
        let name = if fusion == Fusion::Full { "jit" } else { "jit-naive" };
        let loss_weights = crate::reference::default_loss_weights(graph);
        let lent = train.arena.len() >= infer.arena.len();
        if lent {
            infer.arena = cnnc_compiler::lower::hugebuf::HugeBuf::default();
        }
        Ok(JitEngine { name, loss, train, infer, logits_buf: Vec::new(), loss_weights, lent })
    }

    /// Time spent compiling (planning and Cranelift), training and inference plans together.
    pub fn compile_time(&self) -> Duration {
        self.train.compile_time + self.infer.compile_time
    }

    /// The largest batch the engine runs.
    pub fn max_batch(&self) -> usize {
        self.train.batch
    }

    /// Threads the batch is split over.
    pub fn threads(&self) -> usize {
        self.train.threads
    }

    /// The training (`true`) or inference plan.
    pub fn plan(&self, training: bool) -> &Plan {
        if training { &self.train.plan } else { &self.infer.plan }
    }

    /// Number of layers that run on the slow reference fallback (LRN, channel_mul, softmax).
    pub fn fallback_layers(&self) -> usize {
        self.train.steps.iter().filter(|s| matches!(s.kind, Kind::Fallback { .. })).count()
    }

    /// The pooling layers of the training (`train`) or inference program that the steps
    /// writing their input compute as they store each sample (`Plan::pool_into`, where every
    /// such step stores the pooled value itself), in schedule order.
    pub fn pooled_by_producers(&self, train: bool) -> Vec<String> {
        let p = if train { &self.train } else { &self.infer };
        p.steps.iter().filter(|s| matches!(s.kind, Kind::Pool { by_producers: true, .. })).map(|s| s.name.clone()).collect()
    }

    /// The kernel family of each convolution of the training program, by layer name, in
    /// schedule order: `[forward, backward data, weight gradient]`, each one of
    /// `"winograd"`, `"direct"`, `"1x1"`, `"im2col"`, `"naive"`
    /// (`ConvKernels::algorithms`).
    pub fn conv_kernels(&self) -> Vec<(String, [&'static str; 3])> {
        self.train.steps.iter().filter_map(|s| if let Kind::Conv { k, layer, .. } = &s.kind { Some((layer.clone(), k.algorithms())) } else { None }).collect()
    }

    /// The convolution layers of the training program whose fused activation's gradient
    /// mask their backward data applies per sample as it reads the output gradient (see
    /// `run::mask_in_backward_data`), in schedule order.
    pub fn masked_in_backward_data(&self) -> Vec<String> {
        let ng = self.train.graph.needs_grad();
        self.train.steps.iter().filter(|s| run::mask_in_backward_data(s, &ng).is_some()).map(|s| s.name.clone()).collect()
    }

    /// The convolutions and dense layers whose forward splits each sample's output channels
    /// or features across the threads (batches smaller than the thread count:
    /// `program::Parts`), in plan order, for the training and the inference program.
    pub fn channel_split_layers(&self) -> [Vec<String>; 2] {
        let split = |k: &program::Kind| matches!(k, program::Kind::Conv { parts: Some(_), .. } | program::Kind::Dense { parts: Some(_), .. });
        [&self.train, &self.infer].map(|p| p.steps.iter().filter(|s| split(&s.kind)).map(|s| s.name.clone()).collect())
    }

    /// Turn per-group timing on or off (off by default): while on, every training step and
    /// inference records each fused group's wall time (one `Instant` per group and pass), read
    /// back with [`JitEngine::profile`].
    pub fn set_profiling(&mut self, on: bool) {
        for p in [&mut self.train, &mut self.infer] {
            p.profiling = on;
            p.steps.iter_mut().for_each(|s| s.time = StepTime::default());
        }
    }

    /// Wall time of each group of [`JitEngine::plan`]`(training)` (same order) in the last
    /// training step (`true`: forward and backward) or inference (`false`: forward only), while
    /// profiling is on ([`JitEngine::set_profiling`]); zeros otherwise. A group's backward
    /// includes zeroing the gradients whose life starts at its step and recomputing its output
    /// where the memory plan recomputes it.
    pub fn profile(&self, training: bool) -> Vec<StepTime> {
        let p = if training { &self.train } else { &self.infer };
        p.steps.iter().map(|s| s.time).collect()
    }

    /// Bytes of the value, gradient and weight-gradient scratch buffers of the training and
    /// inference programs (the memory plan's arenas; parameters not included) and the training
    /// program's max-pooling argmax buffers (one byte per output; inference records none).
    pub fn buffer_bytes(&self) -> usize {
        let argmax = |p: &Program| {
            p.steps
                .iter()
                .map(|s| match &s.kind {
                    Kind::Pool { argmax, .. } => std::mem::size_of_val(argmax.as_slice()),
                    _ => 0,
                })
                .sum::<usize>()
        };
        let f = |p: &Program| (p.arena.len() + p.partials.iter().map(Vec::len).sum::<usize>()) * 4 + std::mem::size_of_val(p.bn_terms.as_slice()) + argmax(p);
        f(&self.train) + f(&self.infer)
    }
}

/// Wall time of one fused group in the last run (see [`JitEngine::profile`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepTime {
    /// Forward pass of the group (its anchor kernel and chain).
    pub forward: Duration,
    /// Backward pass of the group (zero after an inference).
    pub backward: Duration,
}

/// Check the batch and copy it into the program's input buffer; returns `n`.
fn load_input(p: &mut Program, x: &[f32], n: usize) -> Result<usize, EngineError> {
    if n == 0 || n > p.batch {
        return Err(eerr(format!("batch of {n} samples: the engine runs 1..={} (compiled batch)", p.batch)));
    }
    let per = p.graph.node(p.input).shape.numel();
    if x.len() != n * per {
        return Err(eerr(format!("input has {} values, expected {n} samples x {per}", x.len())));
    }
    let l = p.loc(p.input)?;
    p.arena[l.buf..l.buf + n * per].copy_from_slice(x);
    Ok(n)
}

fn check_params(p: &Program, params: &ParamStore) -> Result<(), EngineError> {
    for id in p.graph.nodes() {
        let node = p.graph.node(id);
        if node.op.has_params() && !params.contains(&format!("{}.weight", node.name)) {
            return Err(eerr(format!("missing parameter `{}.weight`", node.name)));
        }
    }
    Ok(())
}

/// The training program drops the backward kernels of layers its graph froze (see `run`), so
/// a store that trains such a layer would silently get zero gradients for it: an error.
/// (The converse, a layer the graph trains and the store freezes, is fine: its gradients are
/// computed and zeroed.)
fn check_frozen(p: &Program, params: &ParamStore) -> Result<(), EngineError> {
    for id in p.graph.nodes() {
        let node = p.graph.node(id);
        if node.op.has_params() && !node.trainable && params.info(&format!("{}.weight", node.name)).is_some_and(|i| i.layer_trainable) {
            return Err(eerr(format!(
                "layer `{}` is frozen in the compiled graph (no gradient kernels) but the parameter store trains it: freeze it in the store too (`ParamStore::set_layer_trainable`), or compile the engine from a graph where it trains",
                node.name
            )));
        }
    }
    Ok(())
}

impl Engine for JitEngine {
    fn name(&self) -> &str {
        self.name
    }

    fn train_step(&mut self, params: &mut ParamStore, grads: &mut ParamStore, x: &[f32], labels: &[usize], seed: u64) -> Result<BatchStats, EngineError> {
        on_pool(|| self.train_step_here(params, grads, x, labels, seed))
    }

    fn set_loss_weights(&mut self, weights: &[f32]) -> Result<(), EngineError> {
        self.loss_weights = check_loss_weights(&self.train.graph, weights)?;
        Ok(())
    }

    fn infer(&mut self, params: &ParamStore, x: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        on_pool(|| self.infer_here(params, x, batch))
    }
}

/// Run `f` on a thread of the current rayon pool (directly where this is one already).
///
/// From a thread outside the pool (a program's main thread), each of a step's parallel loops
/// (several per layer) would hand all of its work to the pool's threads and sleep until they
/// finished: a wake-up on each side of every loop, and one core idle while the caller's thread
/// waits. On a pool thread the caller takes its share of each loop itself. Same chunks, same
/// order: the results are bit for bit those of a call from outside.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let run = || {
        let _hot = KeepHot::start();
        f()
    };
    if rayon::current_thread_index().is_some() {
        run()
    } else {
        rayon::scope(|_| run())
    }
}

/// Keeps the pool's other threads looking for work (`rayon::yield_now` in a loop) from its
/// start until it is dropped, so that each parallel loop of a step finds them awake.
///
/// Left alone, a rayon worker that finds nothing to do yields 32 times (tens of
/// microseconds) and then sleeps; the next loop's work then waits for a wake-up through
/// the kernel. A step runs several loops per layer, and one thread's share of a loop often
/// ends more than those microseconds before the other's, so the idle thread slept and was
/// woken again at nearly every loop. Between steps the threads go back to rayon's own
/// idling (and sleep).
///
/// Each of the other threads runs one broadcast job that polls for work until the flag
/// drops, yielding its core to the operating system between polls (a spin without the yield
/// made LeNet-5's step 25% slower than no polling at all while another process kept one of
/// the two cores busy). The calling thread's own copy returns at once: it must not spin, as
/// it is running the step and may pick the job up while it waits inside a parallel loop.
///
/// A poller also stops after [`KeepHot::MAX_IDLE`] without finding work, which is what keeps
/// this deadlock-free. A thread waiting inside a parallel loop runs whatever queued job it
/// finds, a poller included, so a poller may run on top of that thread's unfinished work.
/// Where another step then waits for that work (engines stepping at once on a shared pool,
/// each queueing pollers for the other's threads), the poller finds nothing it can do, stops
/// within `MAX_IDLE`, and the thread goes back to the work below it: a delay, not a hang.
struct KeepHot(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl KeepHot {
    /// The longest a poller goes without finding work before it stops (then the thread
    /// idles, and sleeps, as rayon's threads do).
    const MAX_IDLE: std::time::Duration = std::time::Duration::from_millis(1);

    /// Start polling on the current pool's other threads; `None` off a pool or on a pool of
    /// one thread.
    fn start() -> Option<KeepHot> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let owner = rayon::current_thread_index()?;
        if rayon::current_num_threads() < 2 {
            return None;
        }
        let on = std::sync::Arc::new(AtomicBool::new(true));
        let flag = on.clone();
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() == owner {
                return;
            }
            let mut idle_since = None;
            while flag.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle_since = None;
                } else if idle_since.get_or_insert_with(std::time::Instant::now).elapsed() > KeepHot::MAX_IDLE {
                    break;
                } else {
                    // As rayon's own idle rounds do: another process's thread waiting for
                    // this core runs first.
                    std::thread::yield_now();
                }
            }
        });
        Some(KeepHot(on))
    }
}

impl Drop for KeepHot {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl JitEngine {
    /// [`Engine::train_step`] on the calling thread.
    fn train_step_here(&mut self, params: &mut ParamStore, grads: &mut ParamStore, x: &[f32], labels: &[usize], seed: u64) -> Result<BatchStats, EngineError> {
        if grads.flat().len() != params.flat().len() || grads.len() != params.len() {
            return Err(eerr("the gradient store does not have the parameter store's layout"));
        }
        let p = &mut self.train;
        check_params(p, params)?;
        check_frozen(p, params)?;
        if p.profiling {
            p.steps.iter_mut().for_each(|s| s.time = StepTime::default());
        }
        let n = load_input(p, x, labels.len())?;
        p.forward(params, n, true, seed)?;
        // Gradients living from the loss seeds on (the heads') start at zero; backward zeroes
        // the others when their lives start (the memory plan shares their memory).
        for &r in &p.plan.memory.zero_at_seed {
            run::zero_grad(&mut p.arena, &p.locs, &p.graph, r, n)?;
        }
        // The loss of every head (main output first), weighted, and its gradient (of the
        // weighted mean loss) into the head's gradient.
        let mut loss_sum = 0.0f64;
        for (&head, &w) in p.heads.iter().zip(&self.loss_weights) {
            let hl = p.loc(head)?;
            let k = hl.numel();
            if let Some((i, y)) = labels.iter().enumerate().find(|(_, &y)| y >= k) {
                return Err(eerr(format!("label {y} of sample {i} is out of range for the {k} classes of `{}`", p.graph.node(head).name)));
            }
            if w != 0.0 {
                if hl.grad == program::NO_GRAD || !hl.contiguous() {
                    return Err(eerr(format!("`{}`: the loss needs a whole buffer with a gradient", p.graph.node(head).name)));
                }
                let overlap = || eerr(format!("`{}`: logits and their gradient overlap in the memory plan", p.graph.node(head).name));
                let mut mem = arena::Mem::new(&mut p.arena);
                let d = mem.take(hl.grad, n * k).ok_or_else(overlap)?;
                let logits = mem.get(hl.buf, n * k).ok_or_else(overlap)?;
                loss_sum += w as f64 * seed_loss(self.loss, logits, d, labels, w / n as f32);
            }
        }
        let ll = p.loc(p.logits)?;
        let logits = &p.arena[ll.buf..ll.buf + n * ll.numel()];
        let mut stats = score(logits, labels, self.loss)?;
        stats.loss_sum = loss_sum;
        grads.flat_mut().fill(0.0);
        p.backward(params, grads, n)?;
        // Running statistics, then zero gradients of frozen tensors and buffers.
        for s in &p.steps {
            if let Kind::BnTrain { layer, new_rm, new_rv, .. } = &s.kind {
                for (suffix, v) in [("running_mean", new_rm), ("running_var", new_rv)] {
                    let d = params.slice_mut(&format!("{layer}.{suffix}")).ok_or_else(|| eerr(format!("missing parameter `{layer}.{suffix}`")))?;
                    d.copy_from_slice(v);
                }
            }
        }
        for info in params.infos().to_vec() {
            if !info.is_trainable() {
                if let Some(g) = grads.slice_mut(&info.name) {
                    g.fill(0.0);
                }
            }
        }
        Ok(stats)
    }

    /// [`Engine::infer`] on the calling thread.
    fn infer_here(&mut self, params: &ParamStore, x: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        let swap = |e: &mut JitEngine| {
            if e.lent {
                std::mem::swap(&mut e.infer.arena, &mut e.train.arena);
            }
        };
        swap(self);
        let r = (|| {
            let p = &mut self.infer;
            check_params(p, params)?;
            let n = load_input(p, x, batch)?;
            p.forward(params, n, false, 0)?;
            let ll = p.loc(p.logits)?;
            self.logits_buf.clear();
            self.logits_buf.extend_from_slice(&p.arena[ll.buf..ll.buf + n * ll.numel()]);
            Ok(self.logits_buf.clone())
        })();
        swap(self);
        r
    }
}

/// The summed loss of `labels` over the rows of `logits` (`[n, k]`), and `d += scale x` its
/// gradient (`scale` = weight / n: the gradient of the weighted mean loss). The formulas of
/// `reference::loss`, in f32 as the reference engine computes them:
/// softmax cross-entropy `l = log Σ_j e^{z_j} - z_y`, `dl/dz_j = softmax(z)_j - [j = y]`;
/// multiclass hinge `l = Σ_{j≠y} max(0, z_j - z_y + margin)`, each active margin adds `+1`
/// to `dl/dz_j` and `-1` to `dl/dz_y`.
fn seed_loss(loss: Loss, logits: &[f32], d: &mut [f32], labels: &[usize], scale: f32) -> f64 {
    let k = logits.len() / labels.len().max(1);
    let mut loss_sum = 0.0f64;
    for ((row, d), &y) in logits.chunks_exact(k).zip(d.chunks_exact_mut(k)).zip(labels) {
        match loss {
            Loss::SoftmaxCrossEntropy => {
                let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let z: f32 = row.iter().map(|&v| (v - m).exp()).sum();
                let log_z = m + z.ln();
                loss_sum += (log_z - row[y]) as f64;
                for (j, (dd, &v)) in d.iter_mut().zip(row).enumerate() {
                    *dd += scale * ((v - log_z).exp() - if j == y { 1.0 } else { 0.0 });
                }
            }
            Loss::MulticlassHinge { margin } => {
                let mut l = 0.0f32;
                for j in (0..k).filter(|&j| j != y) {
                    let t = row[j] - row[y] + margin;
                    if t > 0.0 {
                        l += t;
                        d[j] += scale;
                        d[y] -= scale;
                    }
                }
                loss_sum += l as f64;
            }
        }
    }
    loss_sum
}

/// Whether `op` runs on the slow reference fallback in this engine.
pub fn is_fallback(op: &Op) -> bool {
    matches!(op, Op::Lrn(_) | Op::ChannelMul | Op::Softmax)
}
