//! The engine interface the trainer drives: one training step (forward, loss, backward) and
//! inference on a mini-batch. Two implementations: [`ReferenceEngine`] (the ndarray
//! interpreter, the oracle) and the JIT engine in `exec` (Cranelift kernels, fused plan).

use crate::params::ParamStore;
use crate::reference;
use cnnc_compiler::ir::{Graph, Loss};
use ndarray::ArrayViewD;

/// What one batch gave.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchStats {
    /// Sum of per-sample losses.
    pub loss_sum: f64,
    /// Samples whose arg-max logit is the label.
    pub correct: usize,
    /// Samples in the batch.
    pub count: usize,
}

impl BatchStats {
    /// Accumulate another batch.
    pub fn add(&mut self, o: BatchStats) {
        self.loss_sum += o.loss_sum;
        self.correct += o.correct;
        self.count += o.count;
    }
    /// Mean loss.
    pub fn mean_loss(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.loss_sum / self.count as f64 }
    }
    /// Accuracy in `[0, 1]`.
    pub fn accuracy(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.correct as f64 / self.count as f64 }
    }
}

/// Why an engine could not run a batch: names the layer where one is involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

/// Something that trains and infers a graph on mini-batches.
pub trait Engine {
    /// Short name for logs (`reference`, `jit`, `jit-naive`).
    fn name(&self) -> &str;

    /// Training-mode forward, mean loss over the batch, backward. Overwrites `grads` (same
    /// layout as `params`) with the gradients of the mean loss for trainable tensors (frozen
    /// ones get zeros) and updates batch-norm running statistics in `params`. `x` holds
    /// `batch` samples NCHW; `seed` drives dropout masks.
    fn train_step(
        &mut self,
        params: &mut ParamStore,
        grads: &mut ParamStore,
        x: &[f32],
        labels: &[usize],
        seed: u64,
    ) -> Result<BatchStats, EngineError>;

    /// Set the loss weight of each graph output, main output first (the default is
    /// [`reference::default_loss_weights`]: 1 for the main output, 0.3 for each side output,
    /// GoogLeNet's auxiliary classifiers). The wrong count, a negative or a non-finite weight is
    /// an error.
    fn set_loss_weights(&mut self, weights: &[f32]) -> Result<(), EngineError>;

    /// Inference-mode forward: the logits of the main output, `[batch, classes]` row-major.
    fn infer(&mut self, params: &ParamStore, x: &[f32], batch: usize) -> Result<Vec<f32>, EngineError>;
}

/// Per-sample losses (summed) and arg-max accuracy from logits `[labels.len(), classes]`
/// (used by every engine's evaluation). The losses are the reference interpreter's, in f64.
/// A label outside the classes is an error, never an out-of-bounds index.
pub fn score(logits: &[f32], labels: &[usize], loss: Loss) -> Result<BatchStats, EngineError> {
    let n = labels.len();
    let k = logits.len().checked_div(n).unwrap_or(0);
    let logits = ndarray::ArrayView2::from_shape((n, k), logits)
        .map_err(|e| EngineError(format!("{} logits for {n} labels: {e}", logits.len())))?
        .mapv(f64::from);
    let mut losses = ndarray::Array1::<f64>::zeros(n);
    let result = match loss {
        Loss::SoftmaxCrossEntropy => {
            let mut probs = ndarray::Array2::<f64>::zeros((n, k));
            reference::softmax_cross_entropy_forward(losses.view_mut(), probs.view_mut(), logits.view(), labels)
        }
        Loss::MulticlassHinge { margin } => reference::multiclass_hinge_forward(losses.view_mut(), logits.view(), labels, margin),
    };
    result.map_err(|e| EngineError(e.to_string()))?;
    let correct = logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(row, &y)| {
            let arg = row.iter().enumerate().fold((0, f64::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0;
            arg == y
        })
        .count();
    Ok(BatchStats { loss_sum: losses.sum(), correct, count: n })
}

/// `weights` if it holds one finite, non-negative loss weight per output of `graph`.
pub fn check_loss_weights(graph: &Graph, weights: &[f32]) -> Result<Vec<f32>, EngineError> {
    let outs = graph.outputs();
    if weights.len() != outs.len() {
        return Err(EngineError(format!("{} loss weight(s) for the {} output(s) of `{}`", weights.len(), outs.len(), graph.name)));
    }
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite() || **w < 0.0) {
        return Err(EngineError(format!("loss weight {w} of output `{}` must be finite and >= 0", graph.node(outs[i]).name)));
    }
    Ok(weights.to_vec())
}

/// The reference interpreter as an engine (slow, obviously correct).
pub struct ReferenceEngine {
    graph: Graph,
    loss: Loss,
    loss_weights: Vec<f32>,
}

impl ReferenceEngine {
    /// An engine for `graph` trained with `loss`.
    pub fn new(graph: Graph, loss: Loss) -> ReferenceEngine {
        let loss_weights = reference::default_loss_weights(&graph);
        ReferenceEngine { graph, loss, loss_weights }
    }

    fn input_view<'a>(&self, x: &'a [f32], batch: usize) -> Result<ArrayViewD<'a, f32>, EngineError> {
        let input = self.graph.inputs();
        let shape = self.graph.node(input[0]).shape;
        let mut dims = vec![batch];
        dims.extend(shape.dims());
        ArrayViewD::from_shape(dims, x).map_err(|e| EngineError(format!("input batch: {e}")))
    }
}

impl Engine for ReferenceEngine {
    fn name(&self) -> &str {
        "reference"
    }

    fn train_step(
        &mut self,
        params: &mut ParamStore,
        grads: &mut ParamStore,
        x: &[f32],
        labels: &[usize],
        seed: u64,
    ) -> Result<BatchStats, EngineError> {
        let view = self.input_view(x, labels.len())?;
        let out = reference::loss_and_grad_weighted(&self.graph, params, view, labels, self.loss, &self.loss_weights, reference::Mode::Train, seed)
            .map_err(|e| EngineError(e.to_string()))?;
        out.state.update_running_stats(&self.graph, params).map_err(|e| EngineError(e.to_string()))?;
        grads.flat_mut().copy_from_slice(out.grads.params.flat());
        for info in params.infos().to_vec() {
            if !info.is_trainable() {
                if let Some(g) = grads.slice_mut(&info.name) {
                    g.fill(0.0);
                }
            }
        }
        let logits = out.state.outputs(&self.graph);
        let logits: Vec<f32> = logits[0].iter().copied().collect();
        let mut s = score(&logits, labels, self.loss)?;
        s.loss_sum = out.losses.iter().map(|&v| v as f64).sum();
        Ok(s)
    }

    fn set_loss_weights(&mut self, weights: &[f32]) -> Result<(), EngineError> {
        self.loss_weights = check_loss_weights(&self.graph, weights)?;
        Ok(())
    }

    fn infer(&mut self, params: &ParamStore, x: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        let view = self.input_view(x, batch)?;
        let st = reference::forward(&self.graph, params, view, reference::Mode::Eval, 0).map_err(|e| EngineError(e.to_string()))?;
        Ok(st.outputs(&self.graph)[0].iter().copied().collect())
    }
}

/// The engine cnnc trains with by default for `graph` at up to `batch` samples per step: the
/// JIT engine with the full fusion table.
pub fn default_engine(graph: &Graph, loss: Loss, batch: usize) -> Result<Box<dyn Engine>, EngineError> {
    Ok(Box::new(crate::exec::JitEngine::new(graph, loss, batch, cnnc_compiler::plan::Fusion::Full)?))
}
