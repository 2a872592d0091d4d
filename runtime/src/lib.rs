//! cnnc runtime.
