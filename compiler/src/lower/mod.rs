//! Lowering to Cranelift: JIT-compiled, shape-specialised kernels for the compute-heavy ops,
//! forward and backward, behind a safe per-layer API that a graph executor calls.
//!
//! ## Structure
//! - [`jit`]: the `JITModule` wrapper ([`jit::Jit`]); every kernel has one uniform signature
//!   (seven `f32` pointers) and declares how far it may read/write behind each.
//! - [`entry`]: **all** `unsafe` code (function-pointer transmute, calls, freeing the code),
//!   with the bounds it relies on listed in its header.
//! - [`gemm`]: the register-blocked `4 x 8` `f32x4`+`fma` micro-kernel with its fused epilogue
//!   (bias, folded batch-norm scale/shift, residual add, relu/leaky relu, accumulate, output
//!   leading dimension for concat slices), packing and the panel driver.
//! - [`conv`]: [`ConvKernels`] — convolution forward / backward-data / backward-weight: direct
//!   GEMMs reading zero-padded planes in place for stride 1 (backward-data as the correlation
//!   with flipped weights, the weight gradient with the operands swapped), implicit im2col +
//!   GEMM for the rest (any kernel, stride, asymmetric padding, dilation, groups).
//! - [`winograd`]: Winograd F(2x2, 3x3) forward and backward-data and F(3x3, 2x2) weight
//!   gradient for 3x3 stride-1 layers with enough channels (2.25x fewer multiplies; chosen by
//!   [`ConvKernels`]); [`winograd1d`]: F(4, 3) / F(3, 4) likewise for 1x3 and 3x1 layers (2x).
//! - [`optim`]: optimiser updates (SGD/momentum/Nesterov, RMSprop, Adam/AdamW) as one fused
//!   `f32x4` stream kernel per rule.
//! - [`dense`]: [`DenseKernels`] — fully connected layers as GEMMs over the batch.
//! - [`naive`]: scalar JIT loop nests for the same conv/dense maths ([`Mode::Naive`]), the
//!   baseline of the benchmarks.
//! - [`pool`], [`pointwise`]: max/avg pooling, activations, batch norm (plain Rust written to
//!   auto-vectorise; memory-bound, so JIT buys little there).
//! - [`hugebuf`]: `f32` buffers on transparent huge pages (the runtime's arena, the kernel
//!   benchmarks' operands): on this project's VM a pass over 64 MiB on 4 KiB pages was 15x
//!   slower.
//! - `scratch`: the drivers' per-thread buffers, kept between calls (no per-call allocation).
//! - [`peak`]: a JIT'd FMA throughput loop measuring this machine's 128-bit peak, and GFLOP/s
//!   helpers used by `benches/kernels.rs`.
//!
//! ## Conventions for the executor
//! Tensors are NCHW `f32` slices; one call processes as many samples as the slices hold, so the
//! batch can be split over threads by sample (kernels are `Send + Sync` and take `&self`).
//! Gradients are accumulated (`+=`), llm.c style: zero them once per step. Every public call
//! checks all slice lengths and returns [`crate::Error::Codegen`] naming the layer on a
//! mismatch; nothing enters JIT code unchecked.

pub mod conv;
pub mod dense;
pub mod entry;
pub mod gemm;
pub mod hugebuf;
pub mod jit;
pub mod naive;
pub mod optim;
pub mod peak;
pub mod pointwise;
pub mod pool;
pub mod report;
mod scratch;
pub mod winograd;
pub mod winograd1d;

pub use conv::{ChannelSlice, ConvGeometry, ConvKernels, ConvOptions, Epilogue, EpilogueArgs, GradHook, SampleHook};
pub use dense::DenseKernels;
pub use gemm::FusedAct;

/// Which implementation a layer's kernels use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Packed, register-blocked, vectorised GEMM with the epilogue fused (the fast path).
    #[default]
    Blocked,
    /// Scalar loop nests compiled one kernel per op, epilogue as a separate pass (baseline).
    Naive,
}
