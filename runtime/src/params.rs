//! Named parameter tensors in PyTorch `state_dict` naming and layouts, shared by the reference
//! interpreter, the optimisers and the JIT runtime.
//!
//! | layer        | tensors (graph order)                                                    |
//! |--------------|--------------------------------------------------------------------------|
//! | `conv2d`     | `<layer>.weight` `[out, in/groups, kh, kw]`, `<layer>.bias` `[out]`       |
//! | `dense`      | `<layer>.weight` `[out, in]`, `<layer>.bias` `[out]`                      |
//! | `batchnorm`  | `<layer>.weight` (gamma) `[C]`, `<layer>.bias` (beta) `[C]`, buffers `<layer>.running_mean` `[C]`, `<layer>.running_var` `[C]` |
//!
//! Biases exist only for layers with `bias: true`. Running statistics are *buffers*: stored and
//! saved, but not trainable parameters (they are updated by the forward pass, not by the
//! optimiser). PyTorch's `num_batches_tracked` buffer is not modelled (see
//! [`crate::reference::norm`]).
//!
//! # Storage
//!
//! A [`ParamStore`] keeps **all tensors in one contiguous `Vec<T>`**, in graph order (weight,
//! bias, running mean, running var per layer), each tensor a row-major slice at
//! [`ParamInfo::offset`]. So every tensor has a flat view ([`ParamStore::slice`] /
//! [`ParamStore::slice_mut`]) and an `ndarray` view with its shape ([`ParamStore::get`] /
//! [`ParamStore::get_mut`]), and the whole store is one flat buffer ([`ParamStore::flat`]) that
//! an optimiser or a JIT kernel can address by offset. A gradient store made by
//! [`ParamStore::zeros_like`] has exactly the same layout, so `params.flat()[i]` and
//! `grads.flat()[i]` always belong together.
//!
//! # Transfer learning
//!
//! [`ParamStore::load_by_name`] / [`ParamStore::load_checkpoint_by_name`] copy tensors by name
//! from another model's weights (a checkpoint of any architecture), skipping chosen layers (a
//! replaced head) and reporting what was loaded, skipped, new and unused
//! ([`TransferReport`]); a shape mismatch is an error naming the tensor and both shapes.
//! Freezing is [`ParamStore::set_layer_trainable`] here and `Node::trainable` in the graph the
//! engine compiles (which then drops the frozen layers' backward kernels).

use crate::init::{tensor_rng, Fans, Init, InitConfig};
use crate::reference::Scalar;
use cnnc_compiler::ir::{Graph, Op};
use ndarray::{ArrayViewD, ArrayViewMutD, IxDyn};
use std::collections::HashMap;

/// What a tensor is to its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Conv/dense weight or batch-norm `gamma` (`.weight`).
    Weight,
    /// Conv/dense bias or batch-norm `beta` (`.bias`).
    Bias,
    /// Batch-norm running mean buffer (`.running_mean`).
    RunningMean,
    /// Batch-norm running variance buffer (`.running_var`).
    RunningVar,
}

impl ParamKind {
    /// The `state_dict` suffix: `weight`, `bias`, `running_mean`, `running_var`.
    pub const fn suffix(self) -> &'static str {
        match self {
            ParamKind::Weight => "weight",
            ParamKind::Bias => "bias",
            ParamKind::RunningMean => "running_mean",
            ParamKind::RunningVar => "running_var",
        }
    }

    /// True for buffers (running statistics), which are never trained.
    pub const fn is_buffer(self) -> bool {
        matches!(self, ParamKind::RunningMean | ParamKind::RunningVar)
    }
}

/// Where one tensor lives in a [`ParamStore`] and what it is.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// Full name, `<layer>.<suffix>` (`conv1.weight`).
    pub name: String,
    /// The layer (graph node) name.
    pub layer: String,
    /// Weight, bias or buffer.
    pub kind: ParamKind,
    /// Dimensions (PyTorch layout).
    pub shape: Vec<usize>,
    /// Offset of the first element in [`ParamStore::flat`].
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Whether the layer is trainable (false for frozen layers); buffers follow their layer
    /// but are still not trainable parameters, see [`ParamInfo::is_trainable`].
    pub layer_trainable: bool,
    /// The layer's weight fans (used by the initialisers; a bias uses its weight's).
    pub fans: Fans,
}

impl ParamInfo {
    /// True for weights and biases of trainable layers: what an optimiser updates.
    pub fn is_trainable(&self) -> bool {
        self.layer_trainable && !self.kind.is_buffer()
    }
}

/// Why a parameter lookup or store operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// No tensor has this name.
    #[error("missing parameter `{name}`")]
    Missing {
        /// The name looked up.
        name: String,
    },
    /// A tensor was given with the wrong dimensions.
    #[error("parameter `{name}` has dimensions {expected:?}, got {got:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its dimensions.
        expected: Vec<usize>,
        /// What was given.
        got: Vec<usize>,
    },
    /// A layer's parameters could not be laid out or initialised.
    #[error("layer `{layer}`: {message}")]
    Layer {
        /// The layer.
        layer: String,
        /// What went wrong.
        message: String,
    },
    /// Loading by name: a tensor of the source has another shape than the model's.
    #[error("tensor `{name}` has shape {source_shape:?} in {source_name} but {model:?} in the model; skip layer `{layer}` to keep it freshly initialised (a replaced head)")]
    TransferShape {
        /// The tensor.
        name: String,
        /// Its layer.
        layer: String,
        /// Its shape in the model.
        model: Vec<usize>,
        /// Its shape in the source.
        source_shape: Vec<usize>,
        /// Where the source tensors came from (a checkpoint path).
        source_name: String,
    },
    /// Loading by name: the source could not be read, or a skip pattern matches nothing.
    #[error("{0}")]
    Transfer(String),
}

/// What [`ParamStore::load_by_name`] did with each tensor name (each list in store order,
/// `unused` in source order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransferReport {
    /// Tensors copied from the source.
    pub loaded: Vec<String>,
    /// Tensors in both whose layer was skipped: they keep their current (fresh) values.
    pub skipped: Vec<String>,
    /// Tensors of the store the source does not have: they keep their current values.
    pub new: Vec<String>,
    /// Tensors of the source the store does not have (a removed head, layers past a cut).
    pub unused: Vec<String>,
}

impl std::fmt::Display for TransferReport {
    /// One line per non-empty category: `loaded 10 tensors: conv1.weight, ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (what, v) in [("loaded", &self.loaded), ("skipped", &self.skipped), ("new", &self.new), ("unused", &self.unused)] {
            if !v.is_empty() {
                writeln!(f, "{what} {} tensor{}: {}", v.len(), if v.len() == 1 { "" } else { "s" }, v.join(", "))?;
            }
        }
        Ok(())
    }
}

/// Whether layer `layer` matches one of `patterns` (a name, or a prefix ending in `*`).
fn matches_layer(patterns: &[String], layer: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => layer.starts_with(prefix),
        None => p == layer,
    })
}

/// The layer of a `<layer>.<suffix>` tensor name.
fn layer_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(l, _)| l)
}

/// Named parameter tensors for one graph, in one flat buffer (module header).
/// `T` is `f32` for training; `f64` stores (see [`ParamStore::cast`]) drive gradient checks.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamStore<T = f32> {
    infos: Vec<ParamInfo>,
    index: HashMap<String, usize>,
    data: Vec<T>,
}

/// The tensors of one layer: `(kind, shape, fans)`.
fn layer_tensors(graph: &Graph, id: cnnc_compiler::ir::NodeId) -> Result<Vec<(ParamKind, Vec<usize>, Fans)>, ParamError> {
    let node = graph.node(id);
    let layer_err = |message: String| ParamError::Layer { layer: node.name.clone(), message };
    Ok(match node.op {
        Op::Conv2d(c) => {
            let cin = graph.operand_shapes(id).first().map(|s| s.channels()).ok_or_else(|| layer_err("conv2d without an operand".into()))?;
            if c.groups == 0 || !cin.is_multiple_of(c.groups) {
                return Err(layer_err(format!("groups {} do not divide {cin} input channels", c.groups)));
            }
            let w = vec![c.out_channels, cin / c.groups, c.kernel[0], c.kernel[1]];
            let fans = Fans::of_weight(&w).expect("4-d");
            let mut v = vec![(ParamKind::Weight, w, fans)];
            if c.bias {
                v.push((ParamKind::Bias, vec![c.out_channels], fans));
            }
            v
        }
        Op::Dense(d) => {
            let fin = graph.operand_shapes(id).first().map(|s| s.numel()).ok_or_else(|| layer_err("dense without an operand".into()))?;
            let w = vec![d.out_features, fin];
            let fans = Fans::of_weight(&w).expect("2-d");
            let mut v = vec![(ParamKind::Weight, w, fans)];
            if d.bias {
                v.push((ParamKind::Bias, vec![d.out_features], fans));
            }
            v
        }
        Op::BatchNorm(_) => {
            let c = node.shape.channels();
            let fans = Fans { fan_in: 1, fan_out: 1 };
            [ParamKind::Weight, ParamKind::Bias, ParamKind::RunningMean, ParamKind::RunningVar]
                .into_iter()
                .map(|k| (k, vec![c], fans))
                .collect()
        }
        _ => vec![],
    })
}

impl<T: Scalar> ParamStore<T> {
    /// A store with every tensor of `graph` (layout in the module header), all zeros.
    pub fn zeros_for_graph(graph: &Graph) -> Result<ParamStore<T>, ParamError> {
        let mut infos = Vec::new();
        let mut offset = 0;
        for id in graph.nodes() {
            let node = graph.node(id);
            for (kind, shape, fans) in layer_tensors(graph, id)? {
                let len = shape.iter().product();
                infos.push(ParamInfo {
                    name: format!("{}.{}", node.name, kind.suffix()),
                    layer: node.name.clone(),
                    kind,
                    shape,
                    offset,
                    len,
                    layer_trainable: node.trainable,
                    fans,
                });
                offset += len;
            }
        }
        let index = infos.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        Ok(ParamStore { infos, index, data: vec![T::zero(); offset] })
    }

    /// A store for `graph` initialised by `config` with model seed `seed` (see
    /// [`crate::init`]): conv/dense weights and biases by the config, batch norm at
    /// `gamma = 1, beta = 0, running_mean = 0, running_var = 1`. Values are drawn in `f32` and
    /// converted, so an `f64` store with the same seed holds exactly the `f32` store's values.
    pub fn for_graph(graph: &Graph, config: &InitConfig, seed: u64) -> Result<ParamStore<T>, ParamError> {
        let mut store = Self::zeros_for_graph(graph)?;
        for i in 0..store.infos.len() {
            let info = &store.infos[i];
            let node = graph.node(graph.find(&info.layer).map_err(|e| ParamError::Layer { layer: info.layer.clone(), message: e.to_string() })?);
            let init = match (node.op, info.kind) {
                (Op::Conv2d(_), ParamKind::Weight) => config.conv_weight,
                (Op::Conv2d(_), _) => config.conv_bias,
                (Op::Dense(_), ParamKind::Weight) => config.dense_weight,
                (Op::Dense(_), _) => config.dense_bias,
                (_, ParamKind::Weight | ParamKind::RunningVar) => Init::Constant(1.0),
                (_, ParamKind::Bias | ParamKind::RunningMean) => Init::Constant(0.0),
            };
            let mut vals = vec![0.0f32; info.len];
            init.fill(&mut vals, info.fans, &mut tensor_rng(seed, &info.name))
                .map_err(|e| ParamError::Layer { layer: info.layer.clone(), message: format!("{}: {e}", info.name) })?;
            let (off, len) = (info.offset, info.len);
            store.data[off..off + len].iter_mut().zip(vals).for_each(|(d, v)| *d = T::of_f32(v));
        }
        Ok(store)
    }

    /// A store with the same tensors (names, shapes, flags, offsets), all zeros: the shape of
    /// a gradient. Buffers are included (and stay zero) so that offsets line up.
    pub fn zeros_like(&self) -> ParamStore<T> {
        ParamStore { infos: self.infos.clone(), index: self.index.clone(), data: vec![T::zero(); self.data.len()] }
    }

    /// The same store converted element by element to `U` (`f32 -> f64` is exact).
    pub fn cast<U: Scalar>(&self) -> ParamStore<U> {
        ParamStore {
            infos: self.infos.clone(),
            index: self.index.clone(),
            data: self.data.iter().map(|&v| U::lit(v.as_f64())).collect(),
        }
    }

    /// Number of tensors (parameters and buffers).
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// True when the graph has no parameterised layer.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// Every tensor's description, in graph order.
    pub fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }

    /// The description of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&ParamInfo> {
        self.index.get(name).map(|&i| &self.infos[i])
    }

    /// True when a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor `name` with its shape.
    pub fn get(&self, name: &str) -> Option<ArrayViewD<'_, T>> {
        let info = self.info(name)?;
        ArrayViewD::from_shape(IxDyn(&info.shape), &self.data[info.offset..info.offset + info.len]).ok()
    }

    /// Tensor `name` with its shape, mutable.
    pub fn get_mut(&mut self, name: &str) -> Option<ArrayViewMutD<'_, T>> {
        let &i = self.index.get(name)?;
        let info = &self.infos[i];
        ArrayViewMutD::from_shape(IxDyn(&info.shape), &mut self.data[info.offset..info.offset + info.len]).ok()
    }

    /// Tensor `name`, or [`ParamError::Missing`] naming it.
    pub fn tensor(&self, name: &str) -> Result<ArrayViewD<'_, T>, ParamError> {
        self.get(name).ok_or_else(|| ParamError::Missing { name: name.to_string() })
    }

    /// Tensor `name` as a flat row-major slice.
    pub fn slice(&self, name: &str) -> Option<&[T]> {
        self.info(name).map(|i| &self.data[i.offset..i.offset + i.len])
    }

    /// Tensor `name` as a flat row-major mutable slice.
    pub fn slice_mut(&mut self, name: &str) -> Option<&mut [T]> {
        let &i = self.index.get(name)?;
        let (off, len) = (self.infos[i].offset, self.infos[i].len);
        Some(&mut self.data[off..off + len])
    }

    /// Copy `values` into tensor `name`, checking the dimensions.
    pub fn set(&mut self, name: &str, values: ArrayViewD<'_, T>) -> Result<(), ParamError> {
        let expected = self.info(name).ok_or_else(|| ParamError::Missing { name: name.to_string() })?.shape.clone();
        if values.shape() != expected.as_slice() {
            return Err(ParamError::Shape { name: name.to_string(), expected, got: values.shape().to_vec() });
        }
        self.get_mut(name).expect("checked above").assign(&values);
        Ok(())
    }

    /// The whole store as one flat buffer (tensors at their [`ParamInfo::offset`]s).
    pub fn flat(&self) -> &[T] {
        &self.data
    }

    /// The whole store as one flat mutable buffer.
    pub fn flat_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Every tensor with its description, in graph order.
    pub fn iter(&self) -> impl Iterator<Item = (&ParamInfo, ArrayViewD<'_, T>)> + '_ {
        self.infos.iter().map(|i| {
            let view = ArrayViewD::from_shape(IxDyn(&i.shape), &self.data[i.offset..i.offset + i.len]).expect("layout invariant");
            (i, view)
        })
    }

    /// Every tensor with its description, mutable, in graph order (the views are disjoint).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ParamInfo, ArrayViewMutD<'_, T>)> + '_ {
        let mut rest: &mut [T] = &mut self.data;
        let mut views = Vec::with_capacity(self.infos.len());
        for i in &self.infos {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(i.len);
            rest = tail;
            views.push((i, ArrayViewMutD::from_shape(IxDyn(&i.shape), head).expect("layout invariant")));
        }
        views.into_iter()
    }

    /// Number of learnable scalars (weights and biases, frozen or not; buffers excluded):
    /// PyTorch's `sum(p.numel() for p in model.parameters())`.
    pub fn num_params(&self) -> usize {
        self.infos.iter().filter(|i| !i.kind.is_buffer()).map(|i| i.len).sum()
    }

    /// Number of trainable scalars: weights and biases of layers that are not frozen.
    pub fn num_trainable(&self) -> usize {
        self.infos.iter().filter(|i| i.is_trainable()).map(|i| i.len).sum()
    }

    /// Number of buffer scalars (running statistics).
    pub fn num_buffers(&self) -> usize {
        self.infos.iter().filter(|i| i.kind.is_buffer()).map(|i| i.len).sum()
    }

    /// Transfer learning: copy tensors from `source` (`(name, shape, values)`, e.g. a
    /// checkpoint's model tensors) into the tensors of the same name, except those of the
    /// layers matched by `skip` (names, or prefixes ending in `*`; a replaced head). Matching
    /// is by name only, so a checkpoint of another architecture (a different head, a network
    /// cut with `Graph::cut_at`) loads into whatever layers the two share; batch-norm running
    /// statistics travel with their layer.
    ///
    /// All or nothing: a tensor present in both with different shapes is
    /// [`ParamError::TransferShape`] (naming it and both shapes), a skip pattern that matches
    /// no layer of either side is [`ParamError::Transfer`], and in both cases the store is
    /// left unchanged. `source_name` names the source in messages.
    pub fn load_by_name<'a, I>(&mut self, source: I, skip: &[String], source_name: &str) -> Result<TransferReport, ParamError>
    where
        I: IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    {
        let source: Vec<(&str, &[usize], &[f32])> = source.into_iter().collect();
        for pat in skip.iter().filter(|p| !p.is_empty()) {
            let one = std::slice::from_ref(pat);
            let hit = self.infos.iter().any(|i| matches_layer(one, &i.layer)) || source.iter().any(|(n, _, _)| matches_layer(one, layer_of(n)));
            if !hit {
                return Err(ParamError::Transfer(format!(
                    "skip `{pat}`: no layer of the model or of {source_name} {}",
                    if pat.ends_with('*') { "starts with that" } else { "has that name" }
                )));
            }
        }
        let mut report = TransferReport::default();
        let mut copies = Vec::new();
        let by_name: HashMap<&str, (&[usize], &[f32])> = source.iter().map(|&(n, s, d)| (n, (s, d))).collect();
        for (i, info) in self.infos.iter().enumerate() {
            let Some(&(shape, data)) = by_name.get(info.name.as_str()) else {
                report.new.push(info.name.clone());
                continue;
            };
            if matches_layer(skip, &info.layer) {
                report.skipped.push(info.name.clone());
                continue;
            }
            if shape != info.shape.as_slice() || data.len() != info.len {
                return Err(ParamError::TransferShape {
                    name: info.name.clone(),
                    layer: info.layer.clone(),
                    model: info.shape.clone(),
                    source_shape: if shape != info.shape.as_slice() { shape.to_vec() } else { vec![data.len()] },
                    source_name: source_name.to_string(),
                });
            }
            report.loaded.push(info.name.clone());
            copies.push((i, data));
        }
        report.unused = source.iter().filter(|(n, _, _)| !self.index.contains_key(*n)).map(|(n, _, _)| n.to_string()).collect();
        for (i, data) in copies {
            let (off, len) = (self.infos[i].offset, self.infos[i].len);
            self.data[off..off + len].iter_mut().zip(data).for_each(|(d, &v)| *d = T::of_f32(v));
        }
        Ok(report)
    }

    /// [`ParamStore::load_by_name`] from the model tensors of a checkpoint file (any
    /// architecture: the checkpoint's architecture and fingerprint are not checked, names and
    /// shapes are).
    pub fn load_checkpoint_by_name(&mut self, path: &std::path::Path, skip: &[String]) -> Result<TransferReport, ParamError> {
        let c = crate::checkpoint::load(path).map_err(|e| ParamError::Transfer(e.to_string()))?;
        let name = path.display().to_string();
        self.load_by_name(c.model_tensors().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())), skip, &name)
    }

    /// Freeze or unfreeze every layer as `graph` does (`Node::trainable`): the store for an
    /// engine compiled from `graph` (which rejects a store that trains a layer it froze).
    /// Layers the graph does not have are left as they are.
    pub fn set_trainable_from(&mut self, graph: &Graph) {
        for info in self.infos.iter_mut() {
            if let Ok(id) = graph.find(&info.layer) {
                info.layer_trainable = graph.node(id).trainable;
            }
        }
    }

    /// Freeze (`false`) or unfreeze every tensor of `layer`; false when no tensor belongs to it.
    pub fn set_layer_trainable(&mut self, layer: &str, trainable: bool) -> bool {
        let mut any = false;
        for i in self.infos.iter_mut().filter(|i| i.layer == layer) {
            i.layer_trainable = trainable;
            any = true;
        }
        any
    }
}
