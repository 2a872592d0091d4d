//! cnnc: a code-generating compiler for convolutional networks.
pub use cnnc_compiler as compiler;
pub use cnnc_runtime as runtime;
