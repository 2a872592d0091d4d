//! Lowering to Cranelift IR and JIT compilation (in progress).
