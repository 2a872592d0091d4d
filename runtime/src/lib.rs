//! cnnc's runtime: the data flow's last stage, **kernels -> execution**.
//!
//! - [`reference`](mod@reference): a plain `ndarray` interpreter of every op, forward and backward: the oracle.
//! - [`params`]: named parameter tensors (PyTorch layouts), shared by every executor.
//! - [`init`]: Xavier/Glorot and He initialisers.
//! - [`optim`]: optimisers as pure `step(param, grad, state)` functions built from a config.
//! - [`data`]: IDX and image-folder loaders, normalisation, batching, augmentation.
//! - [`checkpoint`]: atomic safetensors checkpoints with architecture/fingerprint checks.
//! - [`curves`]: training-curve CSV logs and PNG plots.
//! - [`bench`](mod@bench): per-model and per-layer benchmarks (fused JIT vs naive JIT vs interpreter).
#![deny(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod curves;
pub mod data;
pub mod engine;
pub mod exec;
pub mod init;
pub mod optim;
pub mod params;
pub mod reference;
pub mod train;
