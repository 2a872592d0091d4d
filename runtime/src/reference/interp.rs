//! The graph-level reference interpreter: [`forward`], [`backward`] and [`loss_and_grad`].
//!
//! A node's value is an `ArrayD` of dimensions `[N, C, H, W]` for `C x H x W` shapes and
//! `[N, n]` for flat shapes (so a `Loss` node's value is `[N, 1]`). Ops that need a 4-D or 2-D
//! view reshape for free (`[N, n]` is read as `[N, n, 1, 1]`, `[N, C, 1, 1]` as `[N, C]`).
//!
//! [`forward`] evaluates nodes in insertion (= topological) order and keeps every node's value
//! plus what its backward pass needs ([`Saved`]: max-pool switches, dropout masks, batch-norm
//! batch statistics, softmax probabilities of a loss). It is pure: parameters are read only;
//! the running statistics a training-mode batch norm computes are kept in the state and copied
//! into the store by [`ForwardState::update_running_stats`].
//!
//! [`backward`] walks the nodes in reverse insertion order. Each node's output gradient is the
//! sum of the contributions of all its users (a residual fan-out gets two), and the op's
//! backward function adds its operand contributions. Frozen layers (`trainable == false` in
//! the graph) pass gradients through but get no parameter gradients (they stay zero).

use super::{
    act_backward, act_forward, add_backward, add_forward, avgpool_backward, avgpool_forward, batchnorm_eval_backward,
    batchnorm_eval_forward, batchnorm_train_backward, batchnorm_train_forward, channel_mul_backward, channel_mul_forward,
    concat_backward, concat_forward, conv2d_backward, conv2d_forward, dense_backward, dense_forward, dropout_backward,
    dropout_forward, dropout_mask, flatten_backward, flatten_forward, global_avgpool_backward, global_avgpool_forward,
    lrn_backward, lrn_forward, maxpool_backward, maxpool_forward, multiclass_hinge_backward, multiclass_hinge_forward,
    softmax_backward, softmax_cross_entropy_backward, softmax_cross_entropy_forward, softmax_forward, Error, Result, Scalar,
};
use crate::init::tensor_rng;
use crate::params::ParamStore;
use cnnc_compiler::ir::{Graph, Loss, NodeId, Op, PoolKind, Shape};
use ndarray::{Array1, Array2, Array4, ArrayD, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut2, ArrayViewMut4, Ix1, Ix2, Ix4, IxDyn};
use std::time::{Duration, Instant};

/// Training or inference behaviour of batch norm and dropout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Batch norm uses (and updates) batch statistics; dropout drops.
    Train,
    /// Batch norm uses the running statistics; dropout is the identity.
    Eval,
}

/// What one node's forward pass keeps for its backward pass.
#[derive(Clone, Debug, PartialEq)]
pub enum Saved<T> {
    /// Nothing beyond the node's input and output values.
    Nothing,
    /// Max-pool switches: flat `iy * W + ix` index of each window's winner, `[N, C, OH, OW]`.
    Argmax(Array4<usize>),
    /// Dropout keep-mask (training mode), shaped like the node's value.
    Mask(ArrayD<bool>),
    /// Training-mode batch-norm statistics.
    BatchStats {
        /// Per-channel batch mean.
        mean: Array1<T>,
        /// Per-channel `1 / sqrt(var + eps)` with the biased batch variance.
        invstd: Array1<T>,
        /// The updated running mean (`(1 - m) * old + m * mean`).
        running_mean: Array1<T>,
        /// The updated running variance (with the unbiased batch variance).
        running_var: Array1<T>,
    },
    /// Softmax probabilities of a softmax cross-entropy loss node, `[N, K]`.
    Probs(Array2<T>),
}

/// Every node's value after a forward pass, and what backward needs.
#[derive(Clone, Debug)]
pub struct ForwardState<T> {
    /// The mode the pass ran in.
    pub mode: Mode,
    /// The batch size `N`.
    pub batch: usize,
    values: Vec<Option<ArrayD<T>>>,
    saved: Vec<Saved<T>>,
    labels: Option<Vec<usize>>,
    input: NodeId,
    /// Wall time of each node's forward op (for `cnnc bench`'s per-layer profile).
    times: Vec<Duration>,
}

impl<T: Scalar> ForwardState<T> {
    /// The value of node `id` (`[N, C, H, W]` or `[N, n]`).
    pub fn value(&self, id: NodeId) -> Option<&ArrayD<T>> {
        self.values.get(id.index()).and_then(Option::as_ref)
    }

    /// What node `id` saved for its backward pass.
    pub fn saved(&self, id: NodeId) -> Option<&Saved<T>> {
        self.saved.get(id.index())
    }

    /// The values of the graph's outputs, in order.
    pub fn outputs(&self, graph: &Graph) -> Vec<&ArrayD<T>> {
        graph.outputs().into_iter().filter_map(|o| self.value(o)).collect()
    }

    /// The graph input node the pass was fed through.
    pub fn input_node(&self) -> NodeId {
        self.input
    }

    /// Wall time node `id`'s forward op took in this pass.
    pub fn node_time(&self, id: NodeId) -> Option<Duration> {
        self.times.get(id.index()).copied()
    }

    /// Copy the running statistics computed by training-mode batch norms into `params`
    /// (`<layer>.running_mean` / `<layer>.running_var`). Does nothing after an eval pass.
    pub fn update_running_stats(&self, graph: &Graph, params: &mut ParamStore<T>) -> Result<()> {
        for id in graph.nodes() {
            if let Some(Saved::BatchStats { running_mean, running_var, .. }) = self.saved(id) {
                let layer = &graph.node(id).name;
                for (suffix, v) in [("running_mean", running_mean), ("running_var", running_var)] {
                    params
                        .set(&format!("{layer}.{suffix}"), v.view().into_dyn())
                        .map_err(|e| layer_err(graph, id, e.to_string()))?;
                }
            }
        }
        Ok(())
    }
}

/// Parameter gradients, the gradient w.r.t. the graph input, and every node's output gradient.
#[derive(Clone, Debug)]
pub struct Gradients<T> {
    /// Same layout as the parameter store; buffers and frozen layers stay zero.
    pub params: ParamStore<T>,
    /// Gradient w.r.t. the graph input, shaped like it (zero if the input does not reach an
    /// output).
    pub input: ArrayD<T>,
    nodes: Vec<Option<ArrayD<T>>>,
    /// Wall time of each node's backward op (including summing its operands' gradients).
    times: Vec<Duration>,
}

impl<T> Gradients<T> {
    /// The gradient w.r.t. node `id`'s output (`None` if no output depends on it).
    pub fn node(&self, id: NodeId) -> Option<&ArrayD<T>> {
        self.nodes.get(id.index()).and_then(Option::as_ref)
    }

    /// Wall time node `id`'s backward op took (zero where no gradient reached it).
    pub fn node_time(&self, id: NodeId) -> Option<Duration> {
        self.times.get(id.index()).copied()
    }
}

/// The result of [`loss_and_grad`].
#[derive(Clone, Debug)]
pub struct LossOutput<T> {
    /// The batch loss: the mean of `losses`.
    pub loss: T,
    /// One loss per sample.
    pub losses: Array1<T>,
    /// The forward state (the logits are the value of the graph's output).
    pub state: ForwardState<T>,
    /// Gradients of the mean loss.
    pub grads: Gradients<T>,
}

fn layer_err(graph: &Graph, id: NodeId, message: impl Into<String>) -> Error {
    let n = graph.node(id);
    Error::Layer { layer: n.name.clone(), op: n.op.kind(), message: message.into() }
}

/// Wrap an op-level error with the layer's name.
fn at<R>(graph: &Graph, id: NodeId, r: Result<R>) -> Result<R> {
    r.map_err(|e| layer_err(graph, id, e.to_string()))
}

/// `[N, dims...]` for a per-sample shape.
fn batch_dims(shape: Shape, n: usize) -> Vec<usize> {
    let mut d = vec![n];
    d.extend(shape.dims());
    d
}

/// A value as `[N, C, H, W]` (`[N, n]` becomes `[N, n, 1, 1]`).
fn as4<T>(v: ArrayViewD<'_, T>) -> Result<ArrayView4<'_, T>> {
    let s = v.shape().to_vec();
    let dims = match s.len() {
        4 => (s[0], s[1], s[2], s[3]),
        2 => (s[0], s[1], 1, 1),
        _ => return super::kerr("interp", format!("value of dimensions {s:?} is neither NCHW nor [N, n]")),
    };
    v.into_shape_with_order(dims).map_err(|e| Error::Kernel { op: "interp", message: e.to_string() })
}

fn as4_mut<T>(v: &mut ArrayD<T>) -> Result<ArrayViewMut4<'_, T>> {
    let s = v.shape().to_vec();
    let dims = match s.len() {
        4 => (s[0], s[1], s[2], s[3]),
        2 => (s[0], s[1], 1, 1),
        _ => return super::kerr("interp", format!("value of dimensions {s:?} is neither NCHW nor [N, n]")),
    };
    v.view_mut().into_shape_with_order(dims).map_err(|e| Error::Kernel { op: "interp", message: e.to_string() })
}

/// A value as `[N, rest]` (`[N, C, 1, 1]` becomes `[N, C]`).
fn as2<T>(v: ArrayViewD<'_, T>) -> Result<ArrayView2<'_, T>> {
    let n = v.shape().first().copied().unwrap_or(0);
    let rest: usize = v.shape().iter().skip(1).product();
    v.into_shape_with_order((n, rest)).map_err(|e| Error::Kernel { op: "interp", message: e.to_string() })
}

fn as2_mut<T>(v: &mut ArrayD<T>) -> Result<ArrayViewMut2<'_, T>> {
    let n = v.shape().first().copied().unwrap_or(0);
    let rest: usize = v.shape().iter().skip(1).product();
    v.view_mut().into_shape_with_order((n, rest)).map_err(|e| Error::Kernel { op: "interp", message: e.to_string() })
}

/// Parameter `<layer>.<suffix>` as an array of dimension `D`, or an error naming it.
fn param<'a, T: Scalar, D: ndarray::Dimension>(params: &'a ParamStore<T>, layer: &str, suffix: &str) -> Result<ndarray::ArrayView<'a, T, D>> {
    let name = format!("{layer}.{suffix}");
    let t = params.tensor(&name).map_err(|e| Error::Kernel { op: "params", message: e.to_string() })?;
    let dims = t.shape().to_vec();
    t.into_dimensionality::<D>()
        .map_err(|_| Error::Kernel { op: "params", message: format!("parameter `{name}` has {} dimensions ({dims:?})", dims.len()) })
}

/// The operand count the op needs (the graph guarantees it; a corrupted graph gets an error).
fn check_arity(op: &Op, got: usize) -> Result<()> {
    let ok = match op.arity() {
        Some(n) => n == got,
        None => got >= 2,
    };
    if !ok {
        return super::kerr("interp", format!("{got} operand(s) do not fit the op's arity"));
    }
    Ok(())
}

fn single_input(graph: &Graph) -> Result<NodeId> {
    match graph.inputs().as_slice() {
        [one] => Ok(*one),
        other => Err(Error::Graph {
            graph: graph.name.clone(),
            message: format!("the reference interpreter runs graphs with exactly one input, this one has {}", other.len()),
        }),
    }
}

/// Run the graph on a batch `input` (`[N, C, H, W]`, or `[N, n]` for a flat input) in `mode`.
/// Dropout masks are drawn from a generator seeded with `seed` and the layer name, so the same
/// seed gives the same masks. A graph containing a `Loss` node needs labels: use
/// [`forward_with_labels`].
pub fn forward<T: Scalar>(graph: &Graph, params: &ParamStore<T>, input: ArrayViewD<'_, T>, mode: Mode, seed: u64) -> Result<ForwardState<T>> {
    forward_with_labels(graph, params, input, None, mode, seed)
}

/// [`forward`] with integer class labels (one per sample) for the graph's `Loss` nodes.
pub fn forward_with_labels<T: Scalar>(
    graph: &Graph,
    params: &ParamStore<T>,
    input: ArrayViewD<'_, T>,
    labels: Option<&[usize]>,
    mode: Mode,
    seed: u64,
) -> Result<ForwardState<T>> {
    let input_id = single_input(graph)?;
    let n = input.shape().first().copied().unwrap_or(0);
    let expected = batch_dims(graph.node(input_id).shape, n);
    if n == 0 || input.shape() != expected.as_slice() {
        return Err(layer_err(
            graph,
            input_id,
            format!("expected an input batch of dimensions [N, {}] with N >= 1, got {:?}", graph.node(input_id).shape.dims().iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "), input.shape()),
        ));
    }
    let size = graph.nodes().map(|id| id.index() + 1).max().unwrap_or(0);
    let mut st = ForwardState {
        mode,
        batch: n,
        values: vec![None; size],
        saved: vec![Saved::Nothing; size],
        labels: labels.map(<[usize]>::to_vec),
        input: input_id,
        times: vec![Duration::ZERO; size],
    };
    for id in graph.nodes() {
        let t0 = Instant::now();
        let (value, saved) = at(graph, id, forward_node(graph, params, &st, id, input.view(), seed))?;
        st.values[id.index()] = Some(value);
        st.saved[id.index()] = saved;
        st.times[id.index()] = t0.elapsed();
    }
    Ok(st)
}

fn forward_node<T: Scalar>(
    graph: &Graph,
    params: &ParamStore<T>,
    st: &ForwardState<T>,
    id: NodeId,
    input: ArrayViewD<'_, T>,
    seed: u64,
) -> Result<(ArrayD<T>, Saved<T>)> {
    let node = graph.node(id);
    let name = node.name.as_str();
    let n = st.batch;
    let operands = graph.operands(id);
    let xs: Vec<ArrayViewD<'_, T>> = operands
        .iter()
        .map(|&o| st.value(o).map(|v| v.view()).ok_or_else(|| Error::Kernel { op: "interp", message: format!("operand {o} has no value") }))
        .collect::<Result<_>>()?;
    check_arity(&node.op, xs.len())?;
    let mut out = ArrayD::<T>::zeros(IxDyn(&batch_dims(node.shape, n)));
    let mut saved = Saved::Nothing;
    match node.op {
        Op::Input => {
            if id != st.input {
                return super::kerr("interp", "a second input node");
            }
            out.assign(&input);
        }
        Op::Conv2d(c) => {
            let b = if c.bias { Some(param::<T, Ix1>(params, name, "bias")?) } else { None };
            conv2d_forward(as4_mut(&mut out)?, as4(xs[0].view())?, param::<T, Ix4>(params, name, "weight")?, b, &c)?;
        }
        Op::Dense(d) => {
            let b = if d.bias { Some(param::<T, Ix1>(params, name, "bias")?) } else { None };
            dense_forward(as2_mut(&mut out)?, as2(xs[0].view())?, param::<T, Ix2>(params, name, "weight")?, b)?;
        }
        Op::BatchNorm(bn) => {
            let gamma = param::<T, Ix1>(params, name, "weight")?;
            let beta = param::<T, Ix1>(params, name, "bias")?;
            let rm = param::<T, Ix1>(params, name, "running_mean")?;
            let rv = param::<T, Ix1>(params, name, "running_var")?;
            match st.mode {
                Mode::Train => {
                    let c = gamma.len();
                    let (mut mean, mut invstd) = (Array1::zeros(c), Array1::zeros(c));
                    let (mut running_mean, mut running_var) = (rm.to_owned(), rv.to_owned());
                    batchnorm_train_forward(
                        as4_mut(&mut out)?,
                        mean.view_mut(),
                        invstd.view_mut(),
                        running_mean.view_mut(),
                        running_var.view_mut(),
                        as4(xs[0].view())?,
                        gamma,
                        beta,
                        &bn,
                    )?;
                    saved = Saved::BatchStats { mean, invstd, running_mean, running_var };
                }
                Mode::Eval => batchnorm_eval_forward(as4_mut(&mut out)?, as4(xs[0].view())?, gamma, beta, rm, rv, &bn)?,
            }
        }
        Op::Lrn(l) => lrn_forward(as4_mut(&mut out)?, as4(xs[0].view())?, &l)?,
        Op::Act(a) => act_forward(out.view_mut(), xs[0].view(), &a)?,
        Op::Pool(p) => match p.kind {
            PoolKind::Max => {
                let mut argmax = Array4::<usize>::zeros(as4(out.view())?.dim());
                maxpool_forward(as4_mut(&mut out)?, argmax.view_mut(), as4(xs[0].view())?, &p)?;
                saved = Saved::Argmax(argmax);
            }
            PoolKind::Avg => avgpool_forward(as4_mut(&mut out)?, as4(xs[0].view())?, &p)?,
        },
        Op::GlobalAvgPool => global_avgpool_forward(as4_mut(&mut out)?, as4(xs[0].view())?)?,
        Op::Dropout { p } => match st.mode {
            Mode::Train => {
                let mask = dropout_mask(xs[0].shape(), p, &mut tensor_rng(seed, name));
                dropout_forward(out.view_mut(), xs[0].view(), mask.view(), p)?;
                saved = Saved::Mask(mask);
            }
            Mode::Eval => out.assign(&xs[0]),
        },
        Op::Flatten => flatten_forward(as2_mut(&mut out)?, xs[0].view())?,
        Op::Concat => concat_forward(out.view_mut(), &xs)?,
        Op::Add => add_forward(out.view_mut(), &xs)?,
        Op::ChannelMul => channel_mul_forward(as4_mut(&mut out)?, as4(xs[0].view())?, as2(xs[1].view())?)?,
        Op::Softmax => softmax_forward(as2_mut(&mut out)?, as2(xs[0].view())?)?,
        Op::Loss(loss) => {
            let labels = st.labels.as_deref().ok_or_else(|| Error::Kernel { op: "interp", message: "a loss layer needs labels: call forward_with_labels".into() })?;
            let logits = as2(xs[0].view())?;
            let mut losses = Array1::zeros(n);
            match loss {
                Loss::SoftmaxCrossEntropy => {
                    let mut probs = Array2::zeros(logits.dim());
                    softmax_cross_entropy_forward(losses.view_mut(), probs.view_mut(), logits, labels)?;
                    saved = Saved::Probs(probs);
                }
                Loss::MulticlassHinge { margin } => multiclass_hinge_forward(losses.view_mut(), logits, labels, margin)?,
            }
            as2_mut(&mut out)?.column_mut(0).assign(&losses);
        }
    }
    Ok((out, saved))
}

/// Back-propagate `d_outputs` (one per graph output, shaped like its value) through the graph
/// state `state` produced by [`forward`] with the same `graph` and `params`.
pub fn backward<T: Scalar>(graph: &Graph, params: &ParamStore<T>, state: &ForwardState<T>, d_outputs: &[ArrayD<T>]) -> Result<Gradients<T>> {
    let outputs = graph.outputs();
    if outputs.len() != d_outputs.len() {
        return Err(Error::Graph {
            graph: graph.name.clone(),
            message: format!("{} output gradient(s) for {} output(s)", d_outputs.len(), outputs.len()),
        });
    }
    let size = graph.nodes().map(|id| id.index() + 1).max().unwrap_or(0);
    if size != state.values.len() || single_input(graph)? != state.input {
        return Err(Error::Graph { graph: graph.name.clone(), message: "the forward state was computed for another graph".into() });
    }
    let mut grads: Vec<Option<ArrayD<T>>> = vec![None; state.values.len()];
    for (&o, d) in outputs.iter().zip(d_outputs) {
        let v = state.value(o).ok_or_else(|| layer_err(graph, o, "no forward value"))?;
        if v.shape() != d.shape() {
            return Err(layer_err(graph, o, format!("output gradient has dimensions {:?}, the output {:?}", d.shape(), v.shape())));
        }
        accumulate(&mut grads[o.index()], d);
    }
    let mut pgrads = params.zeros_like();
    let ids: Vec<NodeId> = graph.nodes().collect();
    let mut times = vec![Duration::ZERO; state.values.len()];
    for &id in ids.iter().rev() {
        let t0 = Instant::now();
        let Some(dy) = grads[id.index()].clone() else { continue };
        let contributions = at(graph, id, backward_node(graph, params, state, id, dy.view(), &mut pgrads))?;
        for (o, d) in graph.operands(id).into_iter().zip(contributions) {
            accumulate(&mut grads[o.index()], &d);
        }
        times[id.index()] = t0.elapsed();
    }
    let input = grads[state.input.index()].clone().unwrap_or_else(|| ArrayD::zeros(state.values[state.input.index()].as_ref().map_or(IxDyn(&[]), |v| v.raw_dim())));
    Ok(Gradients { params: pgrads, input, nodes: grads, times })
}

fn accumulate<T: Scalar>(slot: &mut Option<ArrayD<T>>, d: &ArrayD<T>) {
    match slot {
        Some(g) => *g += d,
        None => *slot = Some(d.clone()),
    }
}

/// Add a locally computed parameter gradient into the gradient store.
fn add_param_grad<T: Scalar>(pgrads: &mut ParamStore<T>, layer: &str, suffix: &str, g: ArrayViewD<'_, T>) -> Result<()> {
    let name = format!("{layer}.{suffix}");
    let mut dst = pgrads.get_mut(&name).ok_or_else(|| Error::Kernel { op: "params", message: format!("missing parameter `{name}`") })?;
    if dst.shape() != g.shape() {
        return super::kerr("params", format!("gradient of `{name}` has dimensions {:?}, the parameter {:?}", g.shape(), dst.shape()));
    }
    dst += &g;
    Ok(())
}

/// One node's backward pass: the gradient contribution for each operand, in operand order;
/// parameter gradients go straight into `pgrads`.
fn backward_node<T: Scalar>(
    graph: &Graph,
    params: &ParamStore<T>,
    st: &ForwardState<T>,
    id: NodeId,
    dy: ArrayViewD<'_, T>,
    pgrads: &mut ParamStore<T>,
) -> Result<Vec<ArrayD<T>>> {
    let node = graph.node(id);
    let name = node.name.as_str();
    let train_params = node.trainable;
    let operands = graph.operands(id);
    let xs: Vec<ArrayViewD<'_, T>> = operands
        .iter()
        .map(|&o| st.value(o).map(|v| v.view()).ok_or_else(|| Error::Kernel { op: "interp", message: format!("operand {o} has no value") }))
        .collect::<Result<_>>()?;
    check_arity(&node.op, xs.len())?;
    let mut dxs: Vec<ArrayD<T>> = xs.iter().map(|x| ArrayD::zeros(x.raw_dim())).collect();
    match node.op {
        Op::Input => {}
        Op::Conv2d(c) => {
            let w = param::<T, Ix4>(params, name, "weight")?;
            let mut dw = Array4::zeros(w.raw_dim());
            let mut db = Array1::zeros(c.out_channels);
            conv2d_backward(
                Some(as4_mut(&mut dxs[0])?),
                train_params.then(|| dw.view_mut()),
                (train_params && c.bias).then(|| db.view_mut()),
                as4(dy.view())?,
                as4(xs[0].view())?,
                w,
                &c,
            )?;
            if train_params {
                add_param_grad(pgrads, name, "weight", dw.view().into_dyn())?;
                if c.bias {
                    add_param_grad(pgrads, name, "bias", db.view().into_dyn())?;
                }
            }
        }
        Op::Dense(d) => {
            let w = param::<T, Ix2>(params, name, "weight")?;
            let mut dw = Array2::zeros(w.raw_dim());
            let mut db = Array1::zeros(d.out_features);
            dense_backward(
                Some(as2_mut(&mut dxs[0])?),
                train_params.then(|| dw.view_mut()),
                (train_params && d.bias).then(|| db.view_mut()),
                as2(dy.view())?,
                as2(xs[0].view())?,
                w,
            )?;
            if train_params {
                add_param_grad(pgrads, name, "weight", dw.view().into_dyn())?;
                if d.bias {
                    add_param_grad(pgrads, name, "bias", db.view().into_dyn())?;
                }
            }
        }
        Op::BatchNorm(bn) => {
            let gamma = param::<T, Ix1>(params, name, "weight")?;
            let c = gamma.len();
            let (mut dg, mut db) = (Array1::zeros(c), Array1::zeros(c));
            match (st.mode, st.saved(id)) {
                (Mode::Train, Some(Saved::BatchStats { mean, invstd, .. })) => batchnorm_train_backward(
                    Some(as4_mut(&mut dxs[0])?),
                    train_params.then(|| dg.view_mut()),
                    train_params.then(|| db.view_mut()),
                    as4(dy.view())?,
                    as4(xs[0].view())?,
                    gamma,
                    mean.view(),
                    invstd.view(),
                )?,
                (Mode::Train, _) => return super::kerr("interp", "training-mode batch norm without saved batch statistics"),
                (Mode::Eval, _) => batchnorm_eval_backward(
                    Some(as4_mut(&mut dxs[0])?),
                    train_params.then(|| dg.view_mut()),
                    train_params.then(|| db.view_mut()),
                    as4(dy.view())?,
                    as4(xs[0].view())?,
                    gamma,
                    param::<T, Ix1>(params, name, "running_mean")?,
                    param::<T, Ix1>(params, name, "running_var")?,
                    &bn,
                )?,
            }
            if train_params {
                add_param_grad(pgrads, name, "weight", dg.view().into_dyn())?;
                add_param_grad(pgrads, name, "bias", db.view().into_dyn())?;
            }
        }
        Op::Lrn(l) => lrn_backward(as4_mut(&mut dxs[0])?, as4(dy.view())?, as4(xs[0].view())?, &l)?,
        Op::Act(a) => act_backward(dxs[0].view_mut(), dy.view(), xs[0].view(), &a)?,
        Op::Pool(p) => match (p.kind, st.saved(id)) {
            (PoolKind::Max, Some(Saved::Argmax(argmax))) => maxpool_backward(as4_mut(&mut dxs[0])?, as4(dy.view())?, argmax.view(), &p)?,
            (PoolKind::Max, _) => return super::kerr("interp", "max pool without saved switches"),
            (PoolKind::Avg, _) => avgpool_backward(as4_mut(&mut dxs[0])?, as4(dy.view())?, &p)?,
        },
        Op::GlobalAvgPool => global_avgpool_backward(as4_mut(&mut dxs[0])?, as4(dy.view())?)?,
        Op::Dropout { p } => match (st.mode, st.saved(id)) {
            (Mode::Train, Some(Saved::Mask(mask))) => dropout_backward(dxs[0].view_mut(), dy.view(), mask.view(), p)?,
            (Mode::Train, _) => return super::kerr("interp", "training-mode dropout without a saved mask"),
            (Mode::Eval, _) => dxs[0] += &dy,
        },
        Op::Flatten => flatten_backward(dxs[0].view_mut(), as2(dy.view())?)?,
        Op::Concat => {
            let mut views: Vec<_> = dxs.iter_mut().map(|d| d.view_mut()).collect();
            concat_backward(&mut views, dy.view())?;
        }
        Op::Add => {
            let mut views: Vec<_> = dxs.iter_mut().map(|d| d.view_mut()).collect();
            add_backward(&mut views, dy.view())?;
        }
        Op::ChannelMul => {
            let (dx, ds) = dxs.split_at_mut(1);
            channel_mul_backward(Some(as4_mut(&mut dx[0])?), Some(as2_mut(&mut ds[0])?), as4(dy.view())?, as4(xs[0].view())?, as2(xs[1].view())?)?;
        }
        Op::Softmax => {
            let y = st.value(id).ok_or_else(|| Error::Kernel { op: "interp", message: "softmax without its output".into() })?;
            softmax_backward(as2_mut(&mut dxs[0])?, as2(dy.view())?, as2(y.view())?)?;
        }
        Op::Loss(loss) => {
            let labels = st.labels.as_deref().ok_or_else(|| Error::Kernel { op: "interp", message: "a loss layer needs labels".into() })?;
            let d_losses = as2(dy.view())?.column(0).to_owned();
            match (loss, st.saved(id)) {
                (Loss::SoftmaxCrossEntropy, Some(Saved::Probs(probs))) => {
                    softmax_cross_entropy_backward(as2_mut(&mut dxs[0])?, d_losses.view(), probs.view(), labels)?
                }
                (Loss::SoftmaxCrossEntropy, _) => return super::kerr("interp", "cross-entropy without saved probabilities"),
                (Loss::MulticlassHinge { margin }, _) => {
                    multiclass_hinge_backward(as2_mut(&mut dxs[0])?, d_losses.view(), as2(xs[0].view())?, labels, margin)?
                }
            }
        }
    }
    Ok(dxs)
}

/// The loss weight of every side output (GoogLeNet's auxiliary classifiers: `0.3 x` each).
pub const AUX_LOSS_WEIGHT: f32 = 0.3;

/// Default loss weights of `graph`'s outputs: `1` for the main output (the first), then
/// [`AUX_LOSS_WEIGHT`] for each side output, in [`Graph::outputs`] order.
pub fn default_loss_weights(graph: &Graph) -> Vec<f32> {
    (0..graph.outputs().len()).map(|i| if i == 0 { 1.0 } else { AUX_LOSS_WEIGHT }).collect()
}

/// Forward, mean loss over the batch, and backward in one call, with the default output
/// weights ([`default_loss_weights`]: a single-output graph is the plain mean loss).
///
/// `loss` is applied to each of the graph's outputs (logits, `[N, K]` or `[N, K, 1, 1]`);
/// if the main output already is a `Loss` node it must be the same loss, and it is used
/// directly. The gradients are those of the *mean* loss `sum_n losses[n] / N` (the backward
/// pass is seeded with `1 / N` per sample).
pub fn loss_and_grad<T: Scalar>(
    graph: &Graph,
    params: &ParamStore<T>,
    x: ArrayViewD<'_, T>,
    labels: &[usize],
    loss: Loss,
    mode: Mode,
    seed: u64,
) -> Result<LossOutput<T>> {
    loss_and_grad_weighted(graph, params, x, labels, loss, &default_loss_weights(graph), mode, seed)
}

/// [`loss_and_grad`] with one loss weight per graph output: the total loss is
/// `L = sum_o weights[o] * (1/N) sum_n loss_o[n]`, so each output `o`'s backward pass is
/// seeded with `weights[o] / N` per sample, and gradients from several heads add up where
/// their branches meet (GoogLeNet's auxiliary classifiers). `losses[n]` is the weighted sum
/// over outputs for sample `n`. A weight of `0` keeps a head out of the gradient entirely.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad_weighted<T: Scalar>(
    graph: &Graph,
    params: &ParamStore<T>,
    x: ArrayViewD<'_, T>,
    labels: &[usize],
    loss: Loss,
    weights: &[f32],
    mode: Mode,
    seed: u64,
) -> Result<LossOutput<T>> {
    let outputs = graph.outputs();
    if outputs.is_empty() || weights.len() != outputs.len() {
        return Err(Error::Graph {
            graph: graph.name.clone(),
            message: format!("{} loss weight(s) for {} output(s)", weights.len(), outputs.len()),
        });
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(Error::Graph { graph: graph.name.clone(), message: format!("loss weight {w} must be finite and >= 0") });
    }
    let state = forward_with_labels(graph, params, x, Some(labels), mode, seed)?;
    let n = state.batch;
    let inv_n = T::one() / T::of_usize(n);
    let mut losses = Array1::zeros(n);
    let mut d_outs = Vec::with_capacity(outputs.len());
    for (&out, &w) in outputs.iter().zip(weights) {
        let w = T::of_f32(w);
        let (l, d_out) = output_loss(graph, &state, out, loss, labels, w * inv_n)?;
        losses.scaled_add(w, &l);
        d_outs.push(d_out);
    }
    let grads = backward(graph, params, &state, &d_outs)?;
    let loss = losses.sum() * inv_n;
    Ok(LossOutput { loss, losses, state, grads })
}

/// One output's per-sample losses and its gradient seeded with `seed` per sample.
fn output_loss<T: Scalar>(graph: &Graph, state: &ForwardState<T>, out: NodeId, loss: Loss, labels: &[usize], seed: T) -> Result<(Array1<T>, ArrayD<T>)> {
    let n = state.batch;
    let value = state.value(out).ok_or_else(|| layer_err(graph, out, "no forward value"))?;
    match graph.node(out).op {
        Op::Loss(own) => {
            if own != loss {
                return Err(layer_err(graph, out, format!("the graph ends in `{}`, but `{}` was asked for", Op::Loss(own), Op::Loss(loss))));
            }
            let losses = at(graph, out, as2(value.view()))?.column(0).to_owned();
            Ok((losses, ArrayD::from_elem(value.raw_dim(), seed)))
        }
        _ => {
            let logits = at(graph, out, as2(value.view()))?;
            let mut losses = Array1::zeros(n);
            let d_losses = Array1::from_elem(n, seed);
            let mut d_logits = Array2::zeros(logits.dim());
            match loss {
                Loss::SoftmaxCrossEntropy => {
                    let mut probs = Array2::zeros(logits.dim());
                    at(graph, out, softmax_cross_entropy_forward(losses.view_mut(), probs.view_mut(), logits, labels))?;
                    at(graph, out, softmax_cross_entropy_backward(d_logits.view_mut(), d_losses.view(), probs.view(), labels))?;
                }
                Loss::MulticlassHinge { margin } => {
                    at(graph, out, multiclass_hinge_forward(losses.view_mut(), logits, labels, margin))?;
                    at(graph, out, multiclass_hinge_backward(d_logits.view_mut(), d_losses.view(), logits, labels, margin))?;
                }
            }
            let d_out = d_logits.into_shape_with_order(value.raw_dim()).map_err(|e| layer_err(graph, out, e.to_string()))?;
            Ok((losses, d_out))
        }
    }
}
