//! A small wrapper around `cranelift_jit::JITModule`: one [`Jit`] collects the kernels of one
//! layer (or one benchmark), each defined by a closure that emits its body with a
//! `FunctionBuilder`, then [`Jit::finish`] finalizes them into a [`Finished`] set whose code is
//! owned by an `Arc`'d [`CodeOwner`] shared by every kernel handle.
//!
//! Every kernel has the same native signature, seven pointer arguments and no result
//! ([`KERNEL_ARGS`]): argument 0 is the one the kernel writes, arguments 1..7 are read-only.
//! A kernel declares at definition time how many `f32` elements it may touch behind each
//! pointer ([`Extents`]); [`entry`](super::entry) checks those extents against the slices it is
//! handed before every call.
//!
//! A second, separate kind of kernel is the elementwise **stream kernel**
//! ([`Jit::define_stream`], used by [`optim`](super::optim)): native signature
//! `(n: usize, scalars: *const f32, read: *const f32, w0..w3: *mut f32)`; it touches elements
//! `0..n` of `read` and of its first `writes` written pointers and `scalars` values of
//! `scalars`. [`Jit::finish`] returns those as [`StreamKernel`]s.
//!
//! Settings (measured best on x86-64, see `shared/notes/cranelift-0.135.md`): the host ISA from
//! `cranelift_native::builder()` (so `has_avx`/`has_fma` follow CPUID and `fma` on `f32x4` is one
//! `vfmadd`), `opt_level = "none"`, `is_pic = false`, `use_colocated_libcalls = false`, the
//! verifier only in debug builds.

use super::entry::{CodeOwner, Kernel, StreamKernel, STREAM_WRITES};
use super::gemm::Broadcast;
use crate::{Error, Result};
use cranelift_codegen::ir::{self, AbiParam, InstBuilder};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Module};
use std::sync::Arc;
use std::time::Duration;

/// Number of pointer arguments of every generated kernel.
pub const KERNEL_ARGS: usize = 7;

/// How many `f32` elements a kernel may read or write behind each of its seven pointers
/// (0 = the pointer is never dereferenced).
pub type Extents = [usize; KERNEL_ARGS];

/// Builds the kernels of one layer into one JIT module.
pub struct Jit {
    layer: String,
    module: JITModule,
    ctx: Context,
    fctx: FunctionBuilderContext,
    defined: Vec<(FuncId, Extents)>,
    streams: Vec<(FuncId, usize, usize)>,
    compile_time: Duration,
    broadcast: Broadcast,
}

/// The finalized kernels of a [`Jit`], in definition order.
pub struct Finished {
    /// The kernels, indexed by the [`KernelId`] that [`Jit::define`] returned.
    pub kernels: Vec<Kernel>,
    /// The stream kernels, indexed by the [`StreamId`] that [`Jit::define_stream`] returned.
    pub streams: Vec<StreamKernel>,
    /// Total thread CPU time spent in Cranelift (`define_function` + finalize).
    pub compile_time: Duration,
}

/// Index of a stream kernel defined in a [`Jit`] (valid in its [`Finished::streams`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamId(pub usize);

/// Index of a kernel defined in a [`Jit`] (valid in its [`Finished`] set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelId(pub usize);

fn codegen_err(layer: &str, what: impl std::fmt::Display) -> Error {
    Error::Codegen { layer: layer.to_string(), message: what.to_string() }
}

impl Jit {
    /// A fresh module for the host machine; `layer` names the layer in error messages. Its GEMM
    /// tiles use the host's [`Broadcast`] variant ([`Broadcast::host`]).
    pub fn new(layer: &str) -> Result<Jit> {
        let broadcast = Broadcast::host().map_err(|e| codegen_err(layer, e))?;
        Self::with_broadcast(layer, broadcast)
    }

    /// [`Jit::new`] with the GEMM tiles' [`Broadcast`] variant given.
    pub fn with_broadcast(layer: &str, broadcast: Broadcast) -> Result<Jit> {
        let mut flags = settings::builder();
        let set = |f: &mut settings::Builder, k: &str, v: &str| {
            f.set(k, v).map_err(|e| codegen_err(layer, format!("setting {k}={v}: {e}")))
        };
        set(&mut flags, "opt_level", "none")?;
        set(&mut flags, "is_pic", "false")?;
        set(&mut flags, "use_colocated_libcalls", "false")?;
        set(&mut flags, "enable_verifier", if cfg!(debug_assertions) { "true" } else { "false" })?;
        let isa_builder = cranelift_native::builder()
            .map_err(|e| codegen_err(layer, format!("host machine not supported by Cranelift: {e}")))?;
        let isa = isa_builder
            .finish(settings::Flags::new(flags))
            .map_err(|e| codegen_err(layer, format!("building the host ISA: {e}")))?;
        let builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
        let module = JITModule::new(builder);
        let ctx = module.make_context();
        Ok(Jit {
            layer: layer.to_string(),
            module,
            ctx,
            fctx: FunctionBuilderContext::new(),
            defined: Vec::new(),
            streams: Vec::new(),
            compile_time: Duration::ZERO,
            broadcast,
        })
    }

    /// The [`Broadcast`] variant this module's GEMM tiles are generated with.
    pub fn broadcast(&self) -> Broadcast {
        self.broadcast
    }

    /// The layer name given to [`Jit::new`].
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// Whether the host ISA lowers `fma` on `f32x4` to one instruction (AVX + FMA on x86-64;
    /// always on aarch64). Without it Cranelift calls `fmaf` per lane, which is correct but slow.
    pub fn has_native_fma(&self) -> bool {
        if cfg!(target_arch = "x86_64") {
            let flags = self.module.isa().isa_flags();
            let on = |n: &str| flags.iter().any(|v| v.name == n && v.as_bool() == Some(true));
            on("has_avx") && on("has_fma")
        } else {
            true
        }
    }

    /// Define one kernel. `body` gets the builder positioned in the entry block (already
    /// sealed) and the seven pointer arguments; it must emit the body and end it with a
    /// `return` in a sealed block. `extents` bounds what the body may touch behind each pointer
    /// (checked by [`entry`](super::entry) before every call, so the generator must be right).
    pub fn define(
        &mut self,
        name: &str,
        extents: Extents,
        body: impl FnOnce(&mut FunctionBuilder, &[ir::Value; KERNEL_ARGS]),
    ) -> Result<KernelId> {
        let id = self.define_function(name, KERNEL_ARGS, |b, p| {
            let args: [ir::Value; KERNEL_ARGS] = std::array::from_fn(|i| p[i]);
            body(b, &args);
        })?;
        self.defined.push((id, extents));
        Ok(KernelId(self.defined.len() - 1))
    }

    /// Define one elementwise stream kernel (see the module header): `body` gets the builder
    /// positioned in the sealed entry block and the arguments `[n, scalars, read, w0, w1, w2,
    /// w3]` (`n` a pointer-sized integer); it must touch only elements `0..n` of `read` and of
    /// the first `writes` written pointers (never `w[writes..]`), and `scalars[..scalars]`, and
    /// end with a `return` in a sealed block.
    pub fn define_stream(
        &mut self,
        name: &str,
        scalars: usize,
        writes: usize,
        body: impl FnOnce(&mut FunctionBuilder, &[ir::Value; 3 + STREAM_WRITES]),
    ) -> Result<StreamId> {
        if writes == 0 || writes > STREAM_WRITES {
            return Err(codegen_err(&self.layer, format!("{name}: a stream kernel writes 1..={STREAM_WRITES} buffers, not {writes}")));
        }
        let id = self.define_function(name, 3 + STREAM_WRITES, |b, p| {
            let args: [ir::Value; 3 + STREAM_WRITES] = std::array::from_fn(|i| p[i]);
            body(b, &args);
        })?;
        self.streams.push((id, scalars, writes));
        Ok(StreamId(self.streams.len() - 1))
    }

    /// Declare and compile one function of `nargs` pointer-sized arguments and no result.
    fn define_function(
        &mut self,
        name: &str,
        nargs: usize,
        body: impl FnOnce(&mut FunctionBuilder, &[ir::Value]),
    ) -> Result<FuncId> {
        let ptr = self.module.target_config().pointer_type();
        self.module.clear_context(&mut self.ctx);
        let mut sig = self.module.make_signature();
        for _ in 0..nargs {
            sig.params.push(AbiParam::new(ptr));
        }
        let id = self
            .module
            .declare_anonymous_function(&sig)
            .map_err(|e| codegen_err(&self.layer, format!("declaring {name}: {e}")))?;
        self.ctx.func.signature = sig;
        let frontend = self.module.isa().frontend_config();
        {
            let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            b.seal_block(entry);
            let p = b.block_params(entry).to_vec();
            body(&mut b, &p);
            b.finalize(frontend);
        }
        let t0 = super::peak::thread_time();
        let res = self.module.define_function(id, &mut self.ctx);
        self.compile_time += Duration::from_secs_f64((super::peak::thread_time() - t0).max(0.0));
        if let Err(e) = res {
            let detail = match &e {
                cranelift_module::ModuleError::Compilation(ce) => format!("{ce:?}"),
                other => other.to_string(),
            };
            return Err(codegen_err(&self.layer, format!("compiling {name}: {detail}")));
        }
        Ok(id)
    }

    /// Finalize every defined kernel and hand out their callable handles.
    pub fn finish(mut self) -> Result<Finished> {
        let t0 = super::peak::thread_time();
        self.module
            .finalize_definitions()
            .map_err(|e| codegen_err(&self.layer, format!("finalizing: {e}")))?;
        let compile_time = self.compile_time + Duration::from_secs_f64((super::peak::thread_time() - t0).max(0.0));
        let addrs: Vec<(*const u8, Extents)> =
            self.defined.iter().map(|&(id, ext)| (self.module.get_finalized_function(id), ext)).collect();
        let stream_addrs: Vec<(*const u8, usize, usize)> =
            self.streams.iter().map(|&(id, sc, w)| (self.module.get_finalized_function(id), sc, w)).collect();
        let owner = Arc::new(CodeOwner::new(self.module));
        let kernels = addrs.into_iter().map(|(p, ext)| Kernel::from_finalized(&owner, p, ext)).collect();
        let streams = stream_addrs.into_iter().map(|(p, sc, w)| StreamKernel::from_finalized(&owner, p, sc, w)).collect();
        Ok(Finished { kernels, streams, compile_time })
    }
}

/// Helpers shared by the kernel generators: constants, typed loads/stores, counted loops.
pub mod emit {
    use super::*;
    use cranelift_codegen::ir::condcodes::IntCC;
    use cranelift_codegen::ir::types::{F32, F32X4, I64, I8X16};
    use cranelift_codegen::ir::{BlockArg, MemFlagsData};

    /// Flags for every kernel memory access: aligned-agnostic, never trapping (bounds are
    /// checked before entry), little-endian.
    pub fn mem() -> MemFlagsData {
        MemFlagsData::trusted()
    }

    /// `p + off_elems * 4` as a pointer (element offset of an `f32` array).
    pub fn offset(b: &mut FunctionBuilder, p: ir::Value, off_elems: i64) -> ir::Value {
        if off_elems == 0 {
            p
        } else {
            b.ins().iadd_imm_s(p, off_elems * 4)
        }
    }

    /// `p + idx * 4` for a dynamic element index `idx` (i64).
    pub fn index(b: &mut FunctionBuilder, p: ir::Value, idx: ir::Value) -> ir::Value {
        let bytes = b.ins().ishl_imm_u(idx, 2);
        b.ins().iadd(p, bytes)
    }

    /// Load one `f32` at element offset `off` from `p`.
    pub fn ld(b: &mut FunctionBuilder, p: ir::Value, off: i64) -> ir::Value {
        b.ins().load(F32, mem(), p, (off * 4) as i32)
    }

    /// Load an `f32x4` at element offset `off` from `p`.
    pub fn ld4(b: &mut FunctionBuilder, p: ir::Value, off: i64) -> ir::Value {
        b.ins().load(F32X4, mem(), p, (off * 4) as i32)
    }

    /// Lane `i` of the `f32x4` `v` in all four lanes: a byte shuffle of 32-bit lanes, which
    /// x86-64 lowers to one `pshufd` (Cranelift has no lane broadcast of its own for f32x4).
    pub fn lane(b: &mut FunctionBuilder, v: ir::Value, i: usize) -> ir::Value {
        debug_assert!(i < 4, "f32x4 lane {i}");
        let le = MemFlagsData::new().with_endianness(ir::Endianness::Little);
        let bytes = b.ins().bitcast(I8X16, le, v);
        let mask: Vec<u8> = (0..16).map(|j| (4 * i + j % 4) as u8).collect();
        let mask = b.func.dfg.immediates.push(ir::ConstantData::from(mask));
        let spread = b.ins().shuffle(bytes, bytes, mask);
        b.ins().bitcast(F32X4, le, spread)
    }

    /// Store `v` (f32 or f32x4) at element offset `off` from `p`.
    pub fn st(b: &mut FunctionBuilder, v: ir::Value, p: ir::Value, off: i64) {
        b.ins().store(mem(), v, p, (off * 4) as i32);
    }

    /// An `f32` constant.
    pub fn f32c(b: &mut FunctionBuilder, x: f32) -> ir::Value {
        b.ins().f32const(x)
    }

    /// An `f32x4` constant (a splat).
    pub fn f32x4c(b: &mut FunctionBuilder, x: f32) -> ir::Value {
        let s = b.ins().f32const(x);
        b.ins().splat(F32X4, s)
    }

    /// `for i in 0..n { body(i) }` with a static trip count `n` (emits nothing for `n == 0`,
    /// no loop for `n == 1`). `i` is an i64 value.
    pub fn for_n(b: &mut FunctionBuilder, n: usize, body: impl FnOnce(&mut FunctionBuilder, ir::Value)) {
        if n == 0 {
            return;
        }
        if n == 1 {
            let zero = b.ins().iconst(I64, 0);
            body(b, zero);
            return;
        }
        let head = b.create_block();
        let exit = b.create_block();
        let i = b.append_block_param(head, I64);
        let zero = b.ins().iconst(I64, 0);
        b.ins().jump(head, &[BlockArg::Value(zero)]);
        b.switch_to_block(head);
        body(b, i);
        let next = b.ins().iadd_imm_s(i, 1);
        let more = b.ins().icmp_imm_s(IntCC::SignedLessThan, next, n as i64);
        b.ins().brif(more, head, &[BlockArg::Value(next)], exit, &[]);
        b.seal_block(head);
        b.switch_to_block(exit);
        b.seal_block(exit);
    }

    /// `if cond { body }` (cond: an i8 truth value).
    pub fn when(b: &mut FunctionBuilder, cond: ir::Value, body: impl FnOnce(&mut FunctionBuilder)) {
        let then = b.create_block();
        let done = b.create_block();
        b.ins().brif(cond, then, &[], done, &[]);
        b.switch_to_block(then);
        b.seal_block(then);
        body(b);
        b.ins().jump(done, &[]);
        b.switch_to_block(done);
        b.seal_block(done);
    }

    /// `0 <= v < n` for an i64 `v` (one unsigned compare).
    pub fn in_range(b: &mut FunctionBuilder, v: ir::Value, n: usize) -> ir::Value {
        b.ins().icmp_imm_u(IntCC::UnsignedLessThan, v, n as i64)
    }

    /// Scalar type alias for the generators.
    pub const SCALAR: ir::Type = F32;
    /// Vector type alias for the generators.
    pub const VECTOR: ir::Type = F32X4;
}
