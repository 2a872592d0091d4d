//! Convolution forward and backward on the JIT GEMM ([`gemm`]), or on naive JIT
//! loops ([`naive`]) for comparison.
//!
//! ## Layouts (NCHW, as PyTorch)
//! - input `x`: `[n, Cin, H, W]`; weights `w`: `[Cout, Cin/g, kh, kw]`; bias `b`: `[Cout]`;
//! - output `out`: `[n, Ctot, OH, OW]` where this layer owns channels
//!   `offset..offset+Cout` (`Ctot = Cout`, `offset = 0` unless [`Epilogue::concat`] is set: a
//!   concat branch then writes straight into its slice of the shared output);
//! - `d_out` has the same layout as `out` (the concat gradient, sliced the same way);
//! - `residual`: `[n, Cout, OH, OW]`; `scale`, `shift`: `[Cout]`.
//!
//! `n` (the number of samples) is whatever the slices hold: `x.len() / (Cin*H*W)`; every other
//! slice must match it exactly, so a runtime can split a batch over threads by handing each
//! thread whole samples (weight gradients then go to per-thread buffers that it sums).
//!
//! ## Maths (per sample, per group `g`, `P = OH*OW`, `Kc = Cin/g*kh*kw`)
//! - forward: `out_g[Cout/g, P] = epi(W_g[Cout/g, Kc] · col_g[Kc, P])`, where
//!   `col[(ci,ky,kx), (oy,ox)] = x[ci, oy*sh - pt + ky*dh, ox*sw - pl + kx*dw]` (0 outside);
//!   `col` is never materialised: each `Kc x 8` B panel is gathered straight from `x`.
//!   A 1x1 stride-1 unpadded convolution reads `x` itself as `col`. When its input exceeds
//!   1 MiB per sample its forward packs blocks of 32 panels (256 pixels, each input row read
//!   sequentially, each panel written sequentially), prefetches the next block's rows while
//!   one block computes, and runs groups of panels through every row panel of `W` with row
//!   kernels; smaller ones take the direct kernel below. (Measured one thread: 1x1 256->64
//!   56x56 batch 8 0.68-0.71 of the FMA peak packed, 0.60-0.64 direct, whose `B` loads each
//!   touch a different page; CIFAR's 1x1 layers, 128 KiB-256 KiB per sample, 0.76-0.83
//!   direct against 0.72-0.81 packed, 64->16 0.67 against 0.56.)
//! - backward data: `d_col = W_gᵀ · d_out_g`, then `d_x += col2im(d_col)` (the adjoint of the
//!   gather above: every `col` element's gradient is added to the `x` element it was read from).
//! - backward weight: `d_W_g += d_out_g · col_gᵀ` (reduction over pixels, blocked by 256),
//!   `d_b[co] += Σ_p d_out[co, p]`.
//!
//! ## 3x3 stride 1 with >= 16 channels: Winograd
//! Forward and backward data run on [`winograd`]'s `F(2x2, 3x3)`, the weight
//! gradient on its `F(3x3, 2x2)` (see there; switch all three off with [`ConvOptions`]).
//! 1x3 and 3x1 stride-1 layers (no padding across the filtered axis) with enough channels run
//! on [`winograd1d`]'s `F(m, 3)` / `F(3, m)` likewise.
//!
//! ## Stride 1: direct kernels, no im2col ([`ConvKernels::algorithms`] says `"direct"`)
//! Each sample's group input is copied once into zero-padded planes (`PW` = the output row
//! rounded up to 8 plus the kernel's extent, planes an odd number of cache lines apart so a
//! pixel of successive channels falls in different L1 sets); an unpadded 1x1 layer sees each
//! plane as one row of `H*W` pixels, and reads its source in place, with no copy, where whole
//! tiles cover that row and its planes' blocks spread over the L1 sets anyway (56x56, 28x28;
//! not 32x32 or 16x16, see `Planes::in_place`). Measured one thread, the copy switched inside
//! one binary, eight alternated kernel-bench runs: 1x1 64->64 on 56x56 batch 8 forward 0.929,
//! backward data 0.936 of the time, 64->256 forward 0.964, 256->64 backward data 0.969.
//! - forward (output rows >= 8 wide, except large unpadded 1x1 layers, see above): a tile of 4 output channels x 8 pixels of one output row
//!   reads its `B` in place, `x_pad[ci, oy + ky*dh, ox + kx*dw .. +8]`, at compile-time tap
//!   offsets ([`DirectB`]); `A` is the packed weights as before. No packing of `B` at all.
//! - backward data (input rows >= 8 wide): the same kernel as a stride-1 convolution of the
//!   zero-padded `d_out` (placed at `dh*(kh-1) - pt`, `dw*(kw-1) - pl`, cropped where the
//!   padding exceeds that) with the flipped, transposed weights `w'[ci, co, ky, kx] =
//!   w[co, ci, kh-1-ky, kw-1-kx]`, accumulated into `d_x`, or stored over it where the layer's
//!   input gradient starts there ([`ConvOptions::overwrite_dx`]; Winograd's backward data
//!   likewise). When an accumulated `d_x` exceeds 1 MiB per sample, each row panel prefetches
//!   the next one's `d_x` rows.
//! - backward weight: the operands flipped, `d_Wᵀ[(tap, ci), co] += x_tap[(tap, ci), p] ·
//!   d_outᵀ[p, co]` ([`WgradSpec`]): `d_outᵀ` is packed once per block of ~256 pixels and
//!   reused by every tap and channel, `x_tap` is read in place from the padded planes (4
//!   channels at one tap per tile, or 4 taps of one channel when the layer has fewer than 4
//!   input channels), and the `[tap][ci][co]` result is added into `d_w` once per call.
//!
//! The fused epilogue applies to `forward` only. `backward_*` take the gradient with respect to
//! the convolution's own result (`W·col + b`): a runtime that fused an activation or residual
//! must first take the gradient through them, either as a pass of its own or per sample inside
//! backward data ([`ConvKernels::backward_data_with`] and its [`GradHook`], which leaves the
//! finished gradient in `d_out` for the weight gradient).

use super::gemm::{self, pack_a, BiasKind, Broadcast, DirectB, EpiArgs, FusedAct, Gemm, GemmPlan, GemmSpec, Wgrad, WgradPlan, WgradSpec, MR, NR};
use super::entry;
use super::jit::{Jit, KernelId};
use super::winograd::{self, WinoEpi, WinoPlan, WinoShape, WinoWgrad, WinoWgradPlan, Winograd};
use super::winograd1d::{self, Axis, Wino1dPlan, Wino1dShape, Wino1dWgradPlan, Winograd1d, Winograd1dWgrad};
use super::naive;
use super::pointwise::{plane_stats, PlaneStats};
use super::scratch::{self, grow};
use super::Mode;
use crate::ir::Conv2d;
use crate::{Error, Result};
use std::time::Duration;

/// A convolution's geometry, resolved and validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Padding `[top, bottom, left, right]`.
    pub pads: [usize; 4],
    /// Dilation `[dh, dw]`.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvGeometry {
    /// Resolve `conv` on a `cin x h x w` input; errors name `layer`.
    pub fn new(layer: &str, conv: &Conv2d, (cin, h, w): (usize, usize, usize)) -> Result<ConvGeometry> {
        let err = |m: String| Error::Codegen { layer: layer.to_string(), message: m };
        let [kh, kw] = conv.kernel;
        let [sh, sw] = conv.stride;
        let [dh, dw] = conv.dilation;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || dh == 0 || dw == 0 {
            return Err(err(format!(
                "conv kernel {kh}x{kw}, stride {sh}x{sw}, dilation {dh}x{dw}: all must be >= 1"
            )));
        }
        let g = conv.groups;
        if g == 0 || !cin.is_multiple_of(g) || !conv.out_channels.is_multiple_of(g) || conv.out_channels == 0 || cin == 0 {
            return Err(err(format!(
                "groups {g} must divide input channels {cin} and output channels {}",
                conv.out_channels
            )));
        }
        let dk = conv.dilated_kernel();
        let pads = conv.padding.resolve([h, w], dk, conv.stride);
        let (ph, pw) = (h + pads[0] + pads[1], w + pads[2] + pads[3]);
        if ph < dk[0] || pw < dk[1] {
            return Err(err(format!(
                "padded input {ph}x{pw} smaller than the dilated kernel {}x{}",
                dk[0], dk[1]
            )));
        }
        Ok(ConvGeometry {
            cin,
            h,
            w,
            cout: conv.out_channels,
            kernel: conv.kernel,
            stride: conv.stride,
            pads,
            dilation: conv.dilation,
            groups: g,
            oh: (ph - dk[0]) / sh + 1,
            ow: (pw - dk[1]) / sw + 1,
        })
    }

    /// Input elements per sample.
    pub fn in_numel(&self) -> usize {
        self.cin * self.h * self.w
    }
    /// Output pixels per channel `OH*OW`.
    pub fn pixels(&self) -> usize {
        self.oh * self.ow
    }
    /// Weight elements `Cout*Cin/g*kh*kw`.
    pub fn weight_numel(&self) -> usize {
        self.cout * self.kc()
    }
    /// Reduction length of one group's GEMM, `Cin/g*kh*kw`.
    pub fn kc(&self) -> usize {
        self.cin / self.groups * self.kernel[0] * self.kernel[1]
    }
    /// Multiply-accumulates per sample (forward).
    pub fn macs(&self) -> usize {
        self.cout * self.pixels() * self.kc()
    }
    /// Whether `col` is the input itself (1x1, stride 1, no padding).
    pub fn is_direct(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.pads == [0; 4]
    }
}

/// A concat destination: this layer's output is channels `offset..offset+Cout` of a tensor with
/// `total` channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSlice {
    /// Channels of the shared output tensor.
    pub total: usize,
    /// First channel this layer writes.
    pub offset: usize,
}

/// What a convolution's forward kernel fuses into its stores (bias comes from
/// [`Conv2d::bias`]). Order: `act((acc + b) * scale + shift + residual)`, then `=` or `+=`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Epilogue {
    /// Per-channel `scale`, `shift` (a folded inference batch norm).
    pub affine: bool,
    /// Add a residual tensor (`[n, Cout, OH, OW]`) before the activation.
    pub residual: bool,
    /// Fused activation.
    pub act: FusedAct,
    /// Add into the output instead of overwriting it.
    pub accumulate: bool,
    /// Write into a channel slice of a larger (concat) output.
    pub concat: Option<ChannelSlice>,
}

/// Extra forward operands for a fused epilogue.
#[derive(Debug, Default)]
pub struct EpilogueArgs<'a> {
    /// `(scale, shift)`, each `[Cout]`; required iff [`Epilogue::affine`].
    pub affine: Option<(&'a [f32], &'a [f32])>,
    /// `[n, Cout, OH, OW]`; required iff [`Epilogue::residual`].
    pub residual: Option<&'a [f32]>,
    /// `[n, Cout]`: filled with each output plane's batch-statistics share
    /// ([`pointwise::plane_stats`](super::pointwise::plane_stats)) right after the sample is
    /// stored, while it is still in cache, for a training batch norm that reads this output
    /// (so that batch norm need not read it for its statistics). Not with an accumulating
    /// epilogue (the stored values would not be the output).
    pub stats: Option<&'a mut [PlaneStats]>,
    /// Called with each sample's index (within the call) and its stored output planes
    /// (`[Cout, OH, OW]`: this layer's channels, whatever concatenation slice they sit in)
    /// right after the sample is stored and its statistics taken, while they are still in
    /// cache: a pooling layer fused into this convolution (`passes::pool_fuse`). Its first
    /// error ends the call's result. Not with an accumulating epilogue.
    pub after_sample: Option<SampleHook<'a>>,
}

/// A per-sample callback of [`EpilogueArgs::after_sample`].
pub struct SampleHook<'a>(pub &'a mut dyn FnMut(usize, &[f32]) -> Result<()>);

impl std::fmt::Debug for SampleHook<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SampleHook")
    }
}

/// A per-sample callback of [`ConvKernels::backward_data_with`]: called with each sample's
/// index (within the call) and its output-gradient planes (`[Cout, OH, OW]`: this layer's
/// channels, whatever concatenation slice they sit in) right before backward data reads them,
/// to finish that gradient in place while the kernel is about to bring it into cache (the mask
/// of an activation fused into the layer's forward). Its first error ends the call.
pub struct GradHook<'a>(pub &'a mut dyn FnMut(usize, &mut [f32]) -> Result<()>);

impl std::fmt::Debug for GradHook<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GradHook")
    }
}

/// Backward data's output gradient: read as given, or finished per sample by a [`GradHook`]
/// before it is read.
enum DOut<'a, 'h> {
    Plain(&'a [f32]),
    Hooked(&'a mut [f32], GradHook<'h>),
}

impl DOut<'_, '_> {
    fn len(&self) -> usize {
        match self {
            DOut::Plain(d) => d.len(),
            DOut::Hooked(d, _) => d.len(),
        }
    }

    /// Sample `s`'s region `r` (its planes of this layer's channels), after the hook has run
    /// on it. Called once per sample, in sample order.
    fn sample(&mut self, s: usize, r: std::ops::Range<usize>) -> Result<&[f32]> {
        match self {
            DOut::Plain(d) => Ok(&d[r]),
            DOut::Hooked(d, GradHook(h)) => {
                let v = &mut d[r];
                h(s, v)?;
                Ok(v)
            }
        }
    }
}

/// Bytes of a sample's 1x1 input past which its blocks are software-prefetched
/// ([`entry::prefetch`](super::entry::prefetch)) while the previous block computes.
const PREFETCH_MIN_BYTES: usize = 1 << 20;

/// Per-sample bytes of an accumulated direct-GEMM output (`d_x += ...` of a backward data)
/// above which [`Direct::run`] prefetches each next row panel's `C`. The 3x3 64->64 backward
/// data on 56x56 (784 KiB of `d_x` per sample) went from 40.8-41.1 to 35.9-36.8 ms with it
/// (kernel bench, one thread, medians of four alternated runs); layers of up to 200 KiB per
/// sample were 2-3% slower with it, so they go without.
const PREFETCH_C_MIN_BYTES: usize = 512 << 10;

/// Pixels per block of the weight-gradient reduction.
const WGRAD_BLOCK: usize = 256;

/// Zero-padded copies of one group's input planes for a direct (stride-1, in-place B) GEMM:
/// `chans` planes of `src_h x src_w` placed at row `top`, column `left` (negative: cropped) of
/// `ph x pw` planes, `plane` elements apart, producing `out_h x out_w` output rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Planes {
    chans: usize,
    src_h: usize,
    src_w: usize,
    top: isize,
    left: isize,
    ph: usize,
    pw: usize,
    plane: usize,
    out_h: usize,
    out_w: usize,
}

impl Planes {
    /// Planes for a stride-1 `dk[0] x dk[1]` (dilated) kernel producing `out_h x out_w`.
    fn new(chans: usize, (src_h, src_w): (usize, usize), (out_h, out_w): (usize, usize), dk: [usize; 2], top: isize, left: isize) -> Planes {
        let ph = out_h + dk[0] - 1;
        // Whole 8-wide tiles of every output row stay inside the padded row.
        let pw = out_w.div_ceil(NR) * NR + dk[1] - 1;
        // Planes a whole odd number of cache lines apart, so the same pixel of successive
        // channels falls in different L1 sets.
        let mut plane = (ph * pw).div_ceil(16) * 16;
        if (plane / 16).is_multiple_of(2) {
            plane += 16;
        }
        Planes { chans, src_h, src_w, top, left, ph, pw, plane, out_h, out_w }
    }

    /// These planes as the source's own layout where a direct GEMM may read its source in
    /// place instead of a padded copy, else `self`: an unpadded 1x1 layer (one row of `src_w`
    /// pixels a plane) whose rows hold whole 8-wide tiles (no tile reads past a plane), and
    /// whose blocks of `reps` tiles ([`Direct::run`]) spread evenly over the L1 sets, with at
    /// most [`PREFETCH_MIN_BYTES`] of source a sample (a larger one, beyond L2, is read faster
    /// as the copy's sequential rows than as 8 pixels of every plane at once). Plane
    /// starts `stride` bytes apart fall on `L1_WAY_BYTES / period` distinct offsets within a
    /// way, `period` being the largest power of two dividing `stride` (at most
    /// `L1_WAY_BYTES`, itself a power of two: their gcd), so a block's bytes of every plane
    /// cover each set equally often when they span at least `period` (56x56 planes: 12,544
    /// bytes, period 256, blocks of 256-512 bytes). Planes 4 KiB apart (32x32) put every plane's block in
    /// the same sets and 1 KiB apart (16x16) in a quarter of them; those keep the copy, whose
    /// planes are an odd number of lines apart.
    fn in_place(self, reps: usize) -> Planes {
        let unpadded = self.src_h == 1 && self.ph == 1 && self.top == 0 && self.left == 0 && self.out_w == self.src_w;
        let stride = self.src_w * std::mem::size_of::<f32>();
        if !unpadded || !self.src_w.is_multiple_of(NR) || self.chans * stride > PREFETCH_MIN_BYTES {
            return self;
        }
        let period = 1 << stride.trailing_zeros().min(L1_WAY_BYTES.trailing_zeros());
        if reps * NR * std::mem::size_of::<f32>() >= period {
            Planes { pw: self.src_w, plane: self.src_w, ..self }
        } else {
            self
        }
    }

    /// Whether the planes are laid out as their source (`chans` planes of `src_h x src_w`,
    /// back to back): a runner then hands the kernel the source itself ([`Planes::fill`]
    /// would copy it unchanged).
    fn is_source(&self) -> bool {
        self.ph == self.src_h && self.pw == self.src_w && self.top == 0 && self.left == 0 && self.plane == self.src_h * self.src_w
    }

    /// Elements of a buffer holding all planes.
    fn len(&self) -> usize {
        self.chans * self.plane
    }

    /// Copy `src` (`chans` planes of `src_h x src_w`) into `dst` (zeroed once: only the
    /// interior is written, so borders stay zero across calls).
    fn fill(&self, dst: &mut [f32], src: &[f32]) {
        let (sh, sw) = (self.src_h as isize, self.src_w as isize);
        // Source rows/columns that land inside the padded plane.
        let y0 = (-self.top).max(0);
        let y1 = sh.min(self.ph as isize - self.top);
        let x0 = (-self.left).max(0);
        let x1 = sw.min(self.pw as isize - self.left);
        if y0 >= y1 || x0 >= x1 {
            return;
        }
        let len = (x1 - x0) as usize;
        for c in 0..self.chans {
            for y in y0..y1 {
                let s = c * self.src_h * self.src_w + (y * sw + x0) as usize;
                let d = c * self.plane + ((y + self.top) as usize) * self.pw + (x0 + self.left) as usize;
                dst[d..d + len].copy_from_slice(&src[s..s + len]);
            }
        }
    }

    /// The in-place B description of this layout for kernel taps `(ky*dh, kx*dw)`, for a GEMM
    /// writing `c_bytes` of `C` a sample ([`tile_block`]).
    fn direct(&self, taps: impl Iterator<Item = (usize, usize)>, c_bytes: usize) -> DirectB {
        let taps: Vec<usize> = taps.map(|(y, x)| y * self.pw + x).collect();
        let reps = self.block_tiles(taps.len(), c_bytes);
        DirectB { chans: self.chans, plane: self.plane, taps, reps }
    }

    /// Tiles per call of a direct GEMM over these planes with `taps` kernel taps, writing
    /// `c_bytes` of `C` a sample: the block `Direct::run` runs per row panel
    /// ([`tile_block`]), or as many whole tiles as a shorter row holds.
    fn block_tiles(&self, taps: usize, c_bytes: usize) -> usize {
        tile_block(self.chans * taps, c_bytes).min(self.out_w / NR).max(1)
    }
}

/// Zero-padded planes kept between calls: the zero border is written only when the layout
/// changes (a layout's calls write only its interior, see [`Planes::fill`]).
#[derive(Default)]
struct PaddedPlanes {
    /// The layout `buf`'s border was zeroed for.
    layout: Option<Planes>,
    buf: Vec<f32>,
}

impl PaddedPlanes {
    /// The buffer for `pl`'s planes, zeroed if it last held another layout.
    fn get(&mut self, pl: &Planes) -> &mut [f32] {
        if self.layout != Some(*pl) {
            self.buf.clear();
            self.buf.resize(pl.len(), 0.0);
            self.layout = Some(*pl);
        }
        &mut self.buf[..pl.len()]
    }

    /// `src` (`pl.chans` planes of `src_h x src_w`) as a kernel on `pl` reads it: `src` itself
    /// where `pl` is its own layout ([`Planes::is_source`]), else copied into this buffer's
    /// padded planes ([`Planes::fill`]).
    fn view<'a>(&'a mut self, pl: &Planes, src: &'a [f32]) -> &'a [f32] {
        if pl.is_source() {
            return src;
        }
        let pad = self.get(pl);
        pl.fill(pad, src);
        pad
    }
}

/// The blocked (im2col and direct) drivers' buffers, one holder per thread ([`SCRATCH`])
/// shared by every layer and pass run on it, so a steady-state step allocates none of them
/// (see `lower::scratch`). Every buffer is written before it is read in a call; only the
/// padded planes rely on what an earlier call left (their zero border).
#[derive(Default)]
struct ConvScratch {
    /// Packed `A` operands (weights, in the layout each pass needs), one per group.
    packs: Vec<Vec<f32>>,
    /// One `A` packed at a time (the im2col weight gradient's `d_out` block).
    apack: Vec<f32>,
    /// Flipped, transposed weights (backward data).
    wt: Vec<f32>,
    /// Zero-padded input (forward) or output-gradient (backward data) planes of the direct
    /// GEMMs, and the padded input of the direct weight gradient.
    pad: PaddedPlanes,
    /// Packed `B` panels (im2col'd or copied input, output gradient).
    panel: Vec<f32>,
    /// Backward data's column-gradient block before col2im.
    dcol: Vec<f32>,
    /// Direct weight gradient: per-tap sums `[tap][ci][co]`.
    dwt: Vec<f32>,
    /// im2col weight gradient: the 8 gathered `col` rows of one panel.
    rows: Vec<f32>,
}

thread_local! {
    /// This thread's [`ConvScratch`].
    static SCRATCH: std::cell::RefCell<ConvScratch> = std::cell::RefCell::new(ConvScratch::default());
}

/// Pack one `A` per group into `packs` (kept, grown to `groups`): `pack(dst, gi)`.
fn pack_groups(packs: &mut Vec<Vec<f32>>, groups: usize, mut pack: impl FnMut(&mut Vec<f32>, usize)) -> &[Vec<f32>] {
    if packs.len() < groups {
        packs.resize_with(groups, Vec::new);
    }
    for (gi, dst) in packs[..groups].iter_mut().enumerate() {
        pack(dst, gi);
    }
    &packs[..groups]
}

/// Whether 8-wide tiles cover output rows of width `w` with little waste.
fn rows_fit_tiles(w: usize) -> bool {
    w >= NR
}

/// Bytes of one way of the L1 data cache (64 sets of 64-byte lines: 32 KiB 8-way on AMD
/// Zen 3 and Intel before Ice Lake, 48 KiB 12-way on Sapphire Rapids), the period of the
/// address-to-set map [`Planes::in_place`] spreads blocks over.
const L1_WAY_BYTES: usize = 4096;
const _: () = assert!(L1_WAY_BYTES.is_power_of_two());

/// Bytes of `B` a direct GEMM's block of tiles may span (see [`Direct::run`]).
const TILE_BLOCK_BYTES: usize = 32768;

/// Most tiles a direct GEMM runs side by side per row panel (one row-kernel call). 16 rather
/// than 8 halves the calls of a short reduction (`K <= 64`; longer ones stay at 8 by
/// [`TILE_BLOCK_BYTES`]). Measured one thread, the limit switched inside one binary: CIFAR's
/// 1x1 backward data with `K` = 32 and 40 (128->32, 128->40 at 16x16) 6-9% faster, the other
/// 1x1 shapes unchanged; the kernel bench's old-vs-new binaries showed no difference beyond
/// its noise (2-4% on untouched kernels too).
const TILE_BLOCK_MAX: usize = 16;

/// Tiles of a direct GEMM with reduction `k` run side by side per row panel (see
/// [`Direct::run`]). Where the GEMM's `C` spans more than [`PREFETCH_C_MIN_BYTES`] per sample
/// (`c_bytes`), the block's `B` gets half of [`TILE_BLOCK_BYTES`]: every row panel then brings
/// `C` lines from beyond L2 into L1 (read, or allocated on store) while its `B` block should
/// stay there, and on the AMD EPYC's 32 KiB L1 a 32 KiB `B` block did not. Measured one
/// thread, the block size switched inside one binary, eight alternated runs of the kernel
/// bench: the 1x1 256->64 backward data on 56x56 (784 KiB of `d_x` a sample) 4% faster with
/// 16 KiB; halving it everywhere instead left the sum over all kernels unchanged (0.999),
/// the small layers up to 7% slower.
fn tile_block(k: usize, c_bytes: usize) -> usize {
    let bytes = if c_bytes > PREFETCH_C_MIN_BYTES { TILE_BLOCK_BYTES / 2 } else { TILE_BLOCK_BYTES };
    (bytes / (k * NR * 4)).clamp(1, TILE_BLOCK_MAX)
}

/// Bytes of one sample's `C` that a GEMM of `spec` writes (for [`tile_block`]).
fn c_bytes(spec: &GemmSpec) -> usize {
    spec.m.unwrap_or(MR) * spec.ldc * std::mem::size_of::<f32>()
}

/// A direct GEMM with its plane layout.
#[derive(Debug)]
struct Direct {
    gemm: Gemm,
    planes: Planes,
}

impl Direct {
    /// Run every tile of one sample/group: output pixel `(y, x)` at `c[c_off + y*ldc_row + x]`
    /// with `ldc_row` the output row width, `a` packed, `pad` the filled planes.
    ///
    /// Tiles go in blocks of `tb` along a row, each row panel of `A` over the whole block
    /// (`tb` is chosen so that the block's `B` stays in L1: many tiles for a short reduction,
    /// whose cost is then the `C` traffic, one for a long one, whose `A` panel is reused less
    /// than its `B`). Where the GEMM has row kernels ([`DirectB::reps`]: as many tiles as that
    /// block or a shorter row holds) a block of that many whole tiles is one call per row
    /// panel.
    fn run(&self, c: &mut [f32], c_off: usize, m: usize, a: &[f32], pad: &[f32], epi: &EpiArgs) {
        let pl = &self.planes;
        let k = self.gemm.spec().k;
        let reps = self.gemm.row_reps();
        let tb = if reps > 1 { reps } else { tile_block(k, c_bytes(self.gemm.spec())) };
        let ldc = self.gemm.spec().ldc;
        // An accumulated output that does not stay in L2 between samples (a backward data's
        // `d_x`): prefetch the next row panel's `C` while this one computes.
        let pf = self.gemm.spec().accumulate && m * ldc * 4 > PREFETCH_C_MIN_BYTES;
        for oy in 0..pl.out_h {
            for xb in (0..pl.out_w).step_by(NR * tb) {
                let xe = pl.out_w.min(xb + NR * tb);
                for ip in 0..m.div_ceil(MR) {
                    if pf {
                        for r in (ip + 1) * MR..m.min((ip + 2) * MR) {
                            let o = c_off + r * ldc + oy * pl.out_w;
                            entry::prefetch(&c[o + xb..o + xe]);
                        }
                    }
                    if reps > 1 && xe - xb == NR * reps {
                        let j0 = oy * pl.out_w + xb;
                        self.gemm.run_row_panels(c, c_off + j0, m, ip..ip + 1, j0, a, &pad[oy * pl.pw + xb..], epi);
                        continue;
                    }
                    for ox0 in (xb..xe).step_by(NR) {
                        let nr = NR.min(pl.out_w - ox0);
                        let j0 = oy * pl.out_w + ox0;
                        self.gemm.run_panels(c, c_off + j0, m, ip..ip + 1, j0, nr, a, &pad[oy * pl.pw + ox0..], epi);
                    }
                }
            }
        }
    }
}

/// The stride-1 weight gradient: tile kernels for the main and the last pixel block, the
/// forward's plane layout, and the taps' offsets in a plane. With `tap_rows`, the kernels'
/// rows are groups of 4 taps of one channel (`main[i]`, `tail[i]` for tap group `i`), else 4
/// channels at one tap (one kernel set).
#[derive(Debug)]
struct DirectW {
    main: Vec<Wgrad>,
    tail: Vec<Wgrad>,
    planes: Planes,
    taps: Vec<usize>,
    tap_rows: bool,
}

struct DirectWPlan {
    main: Vec<WgradPlan>,
    tail: Vec<WgradPlan>,
    planes: Planes,
    taps: Vec<usize>,
    tap_rows: bool,
}

/// Fraction of a 4-row tile's rows that `rows` rows use.
fn row_use(rows: usize) -> f64 {
    rows as f64 / (rows.div_ceil(MR) * MR) as f64
}

impl DirectWPlan {
    /// Pixel blocks of about [`WGRAD_BLOCK`] pixels: whole output rows, or runs of the single
    /// pixel row of a flattened 1x1 convolution.
    fn define(jit: &mut Jit, planes: Planes, taps: Vec<usize>, cg: usize, mg: usize) -> Result<DirectWPlan> {
        let (oh, ow) = (planes.out_h, planes.out_w);
        let (main, tail) = if oh == 1 {
            let w = ow.min(WGRAD_BLOCK);
            ((1, w), (!ow.is_multiple_of(w)).then_some((1, ow % w)))
        } else {
            let r = (WGRAD_BLOCK / ow).clamp(1, oh);
            ((r, ow), (!oh.is_multiple_of(r)).then_some((oh % r, ow)))
        };
        let mut mrs = Vec::new();
        if cg >= MR {
            mrs.push(MR);
        }
        if !cg.is_multiple_of(MR) {
            mrs.push(cg % MR);
        }
        let mut nrs = Vec::new();
        if mg >= NR {
            nrs.push(NR);
        }
        if !mg.is_multiple_of(NR) {
            nrs.push(mg % NR);
        }
        let nt = taps.len();
        let tap_rows = row_use(nt) > row_use(cg);
        // Row offsets (and C's row stride) of each kernel set.
        let groups: Vec<([usize; MR], usize, usize)> = if tap_rows {
            (0..nt)
                .step_by(MR)
                .map(|t0| {
                    let mr = MR.min(nt - t0);
                    (std::array::from_fn(|r| taps[(t0 + r).min(nt - 1)]), mr, cg * mg)
                })
                .collect()
        } else {
            vec![(std::array::from_fn(|r| r * planes.plane), 0, mg)]
        };
        let (mut mains, mut tails) = (Vec::new(), Vec::new());
        for (row_off, mr, ldc) in groups {
            let spec = |(rows, width): (usize, usize)| WgradSpec { rows, width, pw: planes.pw, row_off, ldc };
            let mrs_here = if tap_rows { vec![mr] } else { mrs.clone() };
            mains.push(WgradPlan::define(jit, "conv_bwd_w_direct", spec(main), &mrs_here, &nrs)?);
            if let Some(t) = tail {
                tails.push(WgradPlan::define(jit, "conv_bwd_w_direct_tail", spec(t), &mrs_here, &nrs)?);
            }
        }
        Ok(DirectWPlan { main: mains, tail: tails, planes, taps, tap_rows })
    }

    fn resolve(self, fin: &super::jit::Finished) -> DirectW {
        DirectW {
            main: self.main.iter().map(|p| p.resolve(fin)).collect(),
            tail: self.tail.iter().map(|p| p.resolve(fin)).collect(),
            planes: self.planes,
            taps: self.taps,
            tap_rows: self.tap_rows,
        }
    }
}

/// A Winograd forward (also run as backward data): 2-D `F(2x2, 3x3)` or 1-D `F(m, 3)`.
#[derive(Debug)]
enum WinoFwd {
    D2(Winograd),
    D1(Winograd1d),
}

/// Its definition before finalization.
enum WinoFwdPlan {
    D2(WinoPlan),
    D1(Wino1dPlan),
}

/// A Winograd weight gradient: 2-D `F(3x3, 2x2)` or 1-D `F(3, m)`.
#[derive(Debug)]
enum WinoW {
    D2(WinoWgrad),
    D1(Winograd1dWgrad),
}

/// Its definition before finalization.
enum WinoWPlan {
    D2(WinoWgradPlan),
    D1(Wino1dWgradPlan),
}

impl WinoFwdPlan {
    fn resolve(&self, fin: &super::jit::Finished) -> WinoFwd {
        match self {
            WinoFwdPlan::D2(p) => WinoFwd::D2(p.resolve(fin)),
            WinoFwdPlan::D1(p) => WinoFwd::D1(p.resolve(fin)),
        }
    }
}

impl WinoWPlan {
    fn resolve(&self, fin: &super::jit::Finished) -> WinoW {
        match self {
            WinoWPlan::D2(p) => WinoW::D2(p.resolve(fin)),
            WinoWPlan::D1(p) => WinoW::D1(p.resolve(fin)),
        }
    }
}

impl WinoFwd {
    fn tile_count(&self) -> usize {
        match self {
            WinoFwd::D2(k) => k.tile_count(),
            WinoFwd::D1(k) => k.tile_count(),
        }
    }

    /// Run on every sample: `io(s)` gives sample `s`'s output region (see
    /// [`Winograd::forward_sample`]), its input and its epilogue. Uses this thread's scratch.
    fn run(&self, w: &[f32], n: usize, mut io: impl FnMut(usize, &mut dyn FnMut(&mut [f32], &[f32], &WinoEpi))) {
        match self {
            WinoFwd::D2(k) => scratch::with(&winograd::SCRATCH, |s| {
                k.prepare(w, s);
                for i in 0..n {
                    io(i, &mut |o, x, e| k.forward_sample(o, x, s, e));
                }
            }),
            WinoFwd::D1(k) => scratch::with(&winograd1d::SCRATCH, |s| {
                k.prepare(w, s);
                for i in 0..n {
                    io(i, &mut |o, x, e| k.forward_sample(o, x, s, e));
                }
            }),
        }
    }
}

impl WinoW {
    fn tile_count(&self) -> usize {
        match self {
            WinoW::D2(k) => k.tile_count(),
            WinoW::D1(k) => k.tile_count(),
        }
    }

    /// `d_w += Σ_s` the weight gradient of sample `s`'s `(x, d_out)` from `sample(s)`. Uses this
    /// thread's scratch.
    fn run<'a>(&self, d_w: &mut [f32], n: usize, sample: impl Fn(usize) -> (&'a [f32], &'a [f32])) {
        /// Both kinds' protocol: `begin`, `accumulate_sample` per sample, `finish`.
        fn sum<'a, S>(s: &mut S, n: usize, sample: impl Fn(usize) -> (&'a [f32], &'a [f32]), begin: impl FnOnce(&mut S), acc: impl Fn(&[f32], &[f32], &mut S), finish: impl FnOnce(&S)) {
            begin(s);
            for i in 0..n {
                let (x, dy) = sample(i);
                acc(x, dy, s);
            }
            finish(s);
        }
        match self {
            WinoW::D2(k) => scratch::with(&winograd::WGRAD_SCRATCH, |s| sum(s, n, sample, |s| k.begin(s), |x, dy, s| k.accumulate_sample(x, dy, s), |s| k.finish(d_w, s))),
            WinoW::D1(k) => scratch::with(&winograd1d::WGRAD_SCRATCH, |s| sum(s, n, sample, |s| k.begin(s), |x, dy, s| k.accumulate_sample(x, dy, s), |s| k.finish(d_w, s))),
        }
    }
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer; the blocked variant is the common one
enum Impl {
    Blocked {
        /// Packed (im2col) kernels, compiled only where no direct kernel replaces them.
        fwd: Option<Gemm>,
        bwd_data: Option<Gemm>,
        bwd_w: Option<Gemm>,
        bwd_w_tail: Option<Gemm>,
        /// Stride-1 forward reading padded input planes in place (replaces `fwd`).
        direct_fwd: Option<Direct>,
        /// Stride-1 backward data as a convolution of the padded `d_out` with the flipped,
        /// transposed weights (replaces `bwd_data`).
        direct_bwd: Option<Direct>,
        /// Stride-1 weight gradient reading the padded input in place (replaces `bwd_w`).
        direct_w: Option<DirectW>,
        /// Winograd F(2x2,3x3) or F(m,3) forward (replaces the other forwards where present).
        winograd: Option<WinoFwd>,
        /// Winograd backward data: the forward machinery on the padded `d_out` with the
        /// flipped, transposed weights (replaces the other backward-data kernels).
        winograd_bwd: Option<WinoFwd>,
        /// Winograd F(3x3,2x2) or F(3,m) weight gradient (replaces the other weight gradients).
        winograd_w: Option<WinoW>,
    },
    Naive { fwd: super::entry::Kernel, bwd_data: super::entry::Kernel, bwd_w: super::entry::Kernel },
}

/// The compiled kernels of one convolution layer: forward, backward-data, backward-weight.
/// `Send + Sync`; calls take `&self` and may run concurrently on disjoint outputs.
#[derive(Debug)]
pub struct ConvKernels {
    layer: String,
    geom: ConvGeometry,
    bias: bool,
    epi: Epilogue,
    imp: Impl,
    /// `(channel offset, dy, dx)` per row of `col` within a group.
    ktab: Vec<(usize, isize, isize)>,
    /// Backward data's kernel stores `d_x` with `=` ([`ConvOptions::overwrite_dx`] and a
    /// kernel that computes every element once).
    overwrites_dx: bool,
    /// [`ConvOptions::overwrite_dx`] asked of a kernel that accumulates (col2im, naive):
    /// backward data zeroes each sample's `d_x` right before accumulating into it.
    zero_dx: bool,
    /// Only the forward was compiled ([`ConvOptions::forward_only`]).
    forward_only: bool,
    compile_time: Duration,
}

fn conv_err(layer: &str, m: String) -> Error {
    Error::Codegen { layer: layer.to_string(), message: m }
}

/// Algorithm choices of [`ConvKernels::compile_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvOptions {
    /// Use Winograd for the forward, backward data and weight gradient of eligible layers (3x3,
    /// stride 1, no dilation, one group, at least [`WINOGRAD_MIN_CHANNELS`] input and output
    /// channels; backward data also needs top and left padding <= 2).
    pub winograd: bool,
    /// Compile the backward data to overwrite `d_x` (`=`) instead of accumulating into it
    /// (`+=`), for a layer whose input gradient starts its life there (no other writer came
    /// before, so zeroing it first would be wasted memory traffic). The kernels that compute
    /// each `d_x` element once store it (Winograd, and the direct GEMMs of stride-1 layers);
    /// the strided (col2im) and naive ones zero each sample's `d_x` just before accumulating
    /// into it, while it is in cache.
    pub overwrite_dx: bool,
    /// Compile the forward kernel only (a layer only ever run forward, such as the
    /// output-channel parts of a batch-1 forward): [`ConvKernels::backward_data`] and
    /// [`ConvKernels::backward_weight`] then return an error.
    pub forward_only: bool,
    /// The GEMM tiles' [`Broadcast`] variant; `None` for the host's ([`Broadcast::host`]).
    /// Every variant gives the same results bit for bit.
    pub broadcast: Option<Broadcast>,
}

impl Default for ConvOptions {
    /// Winograd on (for eligible layers only), backward data accumulating, all three passes,
    /// the host's broadcast variant.
    fn default() -> ConvOptions {
        ConvOptions { winograd: true, overwrite_dx: false, forward_only: false, broadcast: None }
    }
}

/// Fewest input and output channels for which Winograd is used. Measured one thread (thread
/// CPU time, `cargo bench --bench kernels -- --report-only --small` shows the eligible ones
/// beside their direct kernels; Winograd / direct time for forward,
/// backward data, weight gradient): 16->32 on 32x32 0.83 / 0.80 / 0.75, 16->16 on 32x32
/// 0.96 / 0.94 / 0.95, 24->48 on 16x16 0.74 / 0.76 / 0.74, but 8->16 on 32x32 1.27 / 1.27 / 1.17
/// (its GEMMs' reduction is only `Cin` long, and the transforms cost more than the
/// multiplications they save).
pub const WINOGRAD_MIN_CHANNELS: usize = 16;

pub use crate::algo::WINOGRAD_1D_MIN_CHANNELS;

/// Outputs per tile of the 1-D Winograd: `F(4, 3)` (halves the multiplications) rather than
/// `F(2, 3)` (saves a third, with lighter transforms). Measured as above, `F(2, 3)` / `F(4, 3)`
/// time: 48->64 1x3 on 32x32 1.29 / 1.27 / 1.12, 64->64 3x1 on 32x32 1.34 / 1.13 / 1.23,
/// 128->128 3x1 on 16x16 1.26 / 1.31 / 1.22, 16->16 3x1 on 32x32 1.31 / 1.29 / 1.11.
pub const WINOGRAD_1D_TILE: usize = 4;

impl ConvKernels {
    /// Compile the kernels of `conv` (named `layer` in errors) on a per-sample input
    /// `(Cin, H, W)`, with the forward epilogue `epi`, blocked or naive, with the default
    /// [`ConvOptions`].
    pub fn compile(layer: &str, conv: &Conv2d, in_shape: (usize, usize, usize), epi: Epilogue, mode: Mode) -> Result<ConvKernels> {
        Self::compile_with(layer, conv, in_shape, epi, mode, ConvOptions::default())
    }

    /// [`Self::compile`] with explicit algorithm choices.
    pub fn compile_with(
        layer: &str,
        conv: &Conv2d,
        in_shape: (usize, usize, usize),
        epi: Epilogue,
        mode: Mode,
        opts: ConvOptions,
    ) -> Result<ConvKernels> {
        let geom = ConvGeometry::new(layer, conv, in_shape)?;
        if let Some(cs) = epi.concat {
            if cs.offset + geom.cout > cs.total {
                return Err(conv_err(layer, format!(
                    "concat slice {}..{} exceeds the {} output channels",
                    cs.offset,
                    cs.offset + geom.cout,
                    cs.total
                )));
            }
        }
        let g = &geom;
        let p = g.pixels();
        let mg = g.cout / g.groups;
        let kc = g.kc();
        let mut jit = match opts.broadcast {
            Some(bc) => Jit::with_broadcast(layer, bc)?,
            None => Jit::new(layer)?,
        };
        #[allow(clippy::large_enum_variant)]
        enum Plan {
            Blocked(
                Option<GemmPlan>,
                Option<GemmPlan>,
                Option<GemmPlan>,
                Option<GemmPlan>,
                Option<(GemmPlan, Planes)>,
                Option<(GemmPlan, Planes)>,
                Option<DirectWPlan>,
                Option<WinoFwdPlan>,
                Option<WinoFwdPlan>,
                Option<WinoWPlan>,
            ),
            Naive(KernelId, KernelId, KernelId),
        }
        let plan = match mode {
            Mode::Blocked => {
                let fwd = GemmSpec {
                    m: Some(mg),
                    n: p,
                    k: kc,
                    ldc: p,
                    ldr: p,
                    bias: if conv.bias { BiasKind::Row } else { BiasKind::None },
                    affine: epi.affine,
                    residual: epi.residual,
                    act: epi.act,
                    accumulate: epi.accumulate,
                };
                let (dfwd, dbwd, dwgt) = if g.stride == [1, 1] {
                    let [kh, kw] = g.kernel;
                    let [dh, dw] = g.dilation;
                    let dk = [dh * (kh - 1) + 1, dw * (kw - 1) + 1];
                    let cg = g.cin / g.groups;
                    // An unpadded 1x1 convolution sees each plane as one row of pixels.
                    let (ihw, ohw) = if g.is_direct() { ((1, g.h * g.w), (1, p)) } else { ((g.h, g.w), (g.oh, g.ow)) };
                    let taps = || (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky * dh, kx * dw)));
                    // A 1x1 forward whose input outgrows L2 packs its B instead (see
                    // `ConvKernels::forward`).
                    let df = if rows_fit_tiles(ohw.1) && !(g.is_direct() && cg * g.h * g.w * 4 > PREFETCH_MIN_BYTES) {
                        let pl = Planes::new(cg, ihw, ohw, dk, g.pads[0] as isize, g.pads[2] as isize);
                        let spec = GemmSpec { n: ohw.1, ..fwd };
                        let pl = pl.in_place(pl.block_tiles(kh * kw, c_bytes(&spec)));
                        let d = pl.direct(taps(), c_bytes(&spec));
                        Some((GemmPlan::define_direct(&mut jit, "conv_fwd_direct", spec, &d)?, pl))
                    } else {
                        None
                    };
                    let db = if rows_fit_tiles(ihw.1) && !opts.forward_only {
                        let top = (dk[0] - 1) as isize - g.pads[0] as isize;
                        let left = (dk[1] - 1) as isize - g.pads[2] as isize;
                        let pl = Planes::new(mg, ohw, ihw, dk, top, left);
                        let spec = GemmSpec::plain(Some(cg), ihw.1, mg * kh * kw, g.h * g.w, !opts.overwrite_dx);
                        let pl = pl.in_place(pl.block_tiles(kh * kw, c_bytes(&spec)));
                        let d = pl.direct(taps(), c_bytes(&spec));
                        Some((GemmPlan::define_direct(&mut jit, "conv_bwd_data_direct", spec, &d)?, pl))
                    } else {
                        None
                    };
                    let mut pl = Planes::new(cg, ihw, ohw, dk, g.pads[0] as isize, g.pads[2] as isize);
                    if g.is_direct() {
                        // The weight gradient reads an unpadded 1x1 layer's input itself (its A
                        // rows are 4 streams; nothing is read past a plane).
                        pl = Planes { ph: 1, pw: p, plane: p, ..pl };
                    }
                    let taps = pl.direct(taps(), 0).taps;
                    let dw = if opts.forward_only { None } else { Some(DirectWPlan::define(&mut jit, pl, taps, cg, mg)?) };
                    (df, db, dw)
                } else {
                    (None, None, None)
                };
                let plain = opts.winograd && crate::algo::plain(conv);
                let wide = |min: usize| g.cin >= min && g.cout >= min;
                let (mut wino, mut wino_bwd, mut wino_w) = (None, None, None);
                if plain && g.kernel == [3, 3] && wide(WINOGRAD_MIN_CHANNELS) {
                    let shape = WinoShape { cin: g.cin, cout: g.cout, h: g.h, w: g.w, pt: g.pads[0], pl: g.pads[2], oh: g.oh, ow: g.ow };
                    wino = Some(WinoFwdPlan::D2(WinoPlan::define(&mut jit, shape)?));
                    // Backward data as a Winograd convolution of d_out padded by 2 - pad (so
                    // only for pads <= 2 on the top and left; larger bottom/right pads crop).
                    if g.pads[0] <= 2 && g.pads[2] <= 2 && !opts.forward_only {
                        let shape =
                            WinoShape { cin: g.cout, cout: g.cin, h: g.oh, w: g.ow, pt: 2 - g.pads[0], pl: 2 - g.pads[2], oh: g.h, ow: g.w };
                        wino_bwd = Some(WinoFwdPlan::D2(WinoPlan::define(&mut jit, shape)?));
                    }
                    if !opts.forward_only {
                        wino_w = Some(WinoWPlan::D2(WinoWgradPlan::define(&mut jit, shape)?));
                    }
                } else if let Some(axis) = crate::algo::winograd_1d_axis(conv, in_shape).filter(|_| opts.winograd) {
                    let pad = g.pads[if axis == Axis::Rows { 0 } else { 2 }];
                    let m = WINOGRAD_1D_TILE;
                    let shape = Wino1dShape { axis, m, cin: g.cin, cout: g.cout, h: g.h, w: g.w, pad, oh: g.oh, ow: g.ow };
                    wino = Some(WinoFwdPlan::D1(Wino1dPlan::define(&mut jit, shape)?));
                    if pad <= 2 && !opts.forward_only {
                        let shape = Wino1dShape { cin: g.cout, cout: g.cin, h: g.oh, w: g.ow, pad: 2 - pad, oh: g.h, ow: g.w, ..shape };
                        wino_bwd = Some(WinoFwdPlan::D1(Wino1dPlan::define(&mut jit, shape)?));
                    }
                    if !opts.forward_only {
                        wino_w = Some(WinoWPlan::D1(Wino1dWgradPlan::define(&mut jit, shape)?));
                    }
                }
                let dwgt = if wino_w.is_some() { None } else { dwgt };
                let dbwd = if wino_bwd.is_some() { None } else { dbwd };
                let dfwd = if wino.is_some() { None } else { dfwd };
                // The packed (im2col) kernels, only where no direct one replaces them.
                let fwd = if dfwd.is_none() && wino.is_none() {
                    let plan = GemmPlan::define(&mut jit, "conv_fwd", fwd)?;
                    // A 1x1 forward runs blocks of packed panels per row panel of W.
                    // (At most 8 panels per group: the blocks are 32 panels. Full-size
                    // groups whatever its `C`: for the 1x1 256->64 forward on 56x56, 784 KiB
                    // of `C` a sample, groups of 4 and 8 panels ran 1-3% faster than 2 and 1.)
                    Some(if g.is_direct() { plan.with_packed_rows(&mut jit, "conv_fwd", tile_block(kc, 0).min(8))? } else { plan })
                } else {
                    None
                };
                // Backward data: direct writes d_x (+=, ldc = H*W); else a Kc x 8 panel buffer.
                let bd = if dbwd.is_some() || wino_bwd.is_some() || opts.forward_only {
                    None
                } else if g.is_direct() {
                    Some(GemmPlan::define(&mut jit, "conv_bwd_data", GemmSpec::plain(Some(kc), p, mg, p, !opts.overwrite_dx))?)
                } else {
                    Some(GemmPlan::define(&mut jit, "conv_bwd_data", GemmSpec::plain(Some(kc), NR, mg, NR, false))?)
                };
                let kb = WGRAD_BLOCK.min(p);
                let (bw, bwt) = if dwgt.is_some() || wino_w.is_some() || opts.forward_only {
                    (None, None)
                } else {
                    let bw = GemmPlan::define(&mut jit, "conv_bwd_w", GemmSpec::plain(Some(mg), kc, kb, kc, true))?;
                    let bwt = if !p.is_multiple_of(kb) {
                        Some(GemmPlan::define(&mut jit, "conv_bwd_w_tail", GemmSpec::plain(Some(mg), kc, p % kb, kc, true))?)
                    } else {
                        None
                    };
                    (Some(bw), bwt)
                };
                Plan::Blocked(fwd, bd, bw, bwt, dfwd, dbwd, dwgt, wino, wino_bwd, wino_w)
            }
            Mode::Naive => {
                let (f, d, w) = naive::define_conv(&mut jit, g, conv.bias)?;
                Plan::Naive(f, d, w)
            }
        };
        let fin = jit.finish()?;
        // Every blocked backward-data kernel but the strided one (col2im) computes each d_x
        // element once.
        let overwrites_dx = opts.overwrite_dx && matches!(&plan, Plan::Blocked(_, d, ..) if d.is_none() || g.is_direct());
        let zero_dx = opts.overwrite_dx && !overwrites_dx;
        let imp = match plan {
            Plan::Blocked(f, d, w, t, df, db, dw, wino, wino_bwd, wino_w) => Impl::Blocked {
                winograd_w: wino_w.map(|p| p.resolve(&fin)),
                winograd: wino.map(|p| p.resolve(&fin)),
                winograd_bwd: wino_bwd.map(|p| p.resolve(&fin)),
                direct_w: dw.map(|p| p.resolve(&fin)),
                fwd: f.map(|f| f.resolve(&fin)),
                bwd_data: d.map(|d| d.resolve(&fin)),
                bwd_w: w.map(|w| w.resolve(&fin)),
                bwd_w_tail: t.map(|t| t.resolve(&fin)),
                direct_fwd: df.map(|(p, planes)| Direct { gemm: p.resolve(&fin), planes }),
                direct_bwd: db.map(|(p, planes)| Direct { gemm: p.resolve(&fin), planes }),
            },
            Plan::Naive(f, d, w) => Impl::Naive {
                fwd: fin.kernels[f.0].clone(),
                bwd_data: fin.kernels[d.0].clone(),
                bwd_w: fin.kernels[w.0].clone(),
            },
        };
        let [kh, kw] = g.kernel;
        let mut ktab = Vec::with_capacity(kc);
        for ci in 0..g.cin / g.groups {
            for ky in 0..kh {
                for kx in 0..kw {
                    ktab.push((
                        ci * g.h * g.w,
                        (ky * g.dilation[0]) as isize - g.pads[0] as isize,
                        (kx * g.dilation[1]) as isize - g.pads[2] as isize,
                    ));
                }
            }
        }
        Ok(ConvKernels {
            layer: layer.to_string(),
            geom,
            bias: conv.bias,
            epi,
            imp,
            ktab,
            overwrites_dx,
            zero_dx,
            forward_only: opts.forward_only && mode == Mode::Blocked,
            compile_time: fin.compile_time,
        })
    }

    /// An error naming the layer where only its forward was compiled.
    fn has_backward(&self, what: &str) -> Result<()> {
        match self.forward_only {
            true => Err(conv_err(&self.layer, format!("{what} of a convolution compiled for the forward only"))),
            false => Ok(()),
        }
    }

    /// The resolved geometry.
    pub fn geometry(&self) -> &ConvGeometry {
        &self.geom
    }

    /// Time spent in Cranelift for this layer.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Number of kernels (JIT functions) compiled for this layer.
    pub fn kernel_count(&self) -> usize {
        match &self.imp {
            Impl::Blocked { fwd, bwd_data, bwd_w, bwd_w_tail, direct_fwd, direct_bwd, direct_w, winograd, winograd_bwd, winograd_w } => {
                winograd.as_ref().map_or(0, WinoFwd::tile_count) + winograd_bwd.as_ref().map_or(0, WinoFwd::tile_count) +
                winograd_w.as_ref().map_or(0, WinoW::tile_count) +
                [fwd, bwd_data, bwd_w, bwd_w_tail].iter().map(|k| k.as_ref().map_or(0, Gemm::tile_count)).sum::<usize>()
                    + direct_fwd.as_ref().map_or(0, |d| d.gemm.tile_count())
                    + direct_bwd.as_ref().map_or(0, |d| d.gemm.tile_count())
                    + direct_w.as_ref().map_or(0, |d| d.main.iter().chain(&d.tail).map(Wgrad::tile_count).sum())
            }
            Impl::Naive { .. } => 3,
        }
    }

    /// The algorithm each of forward, backward-data, backward-weight runs: `"winograd"`
    /// ([`winograd`]), `"direct"`
    /// (padded planes read in place), `"im2col"` (packed panels gathered from the input),
    /// `"1x1"` (the input itself is the GEMM operand) or `"naive"`.
    pub fn algorithms(&self) -> [&'static str; 3] {
        let packed = if self.geom.is_direct() { "1x1" } else { "im2col" };
        match &self.imp {
            Impl::Blocked { direct_fwd, direct_bwd, direct_w, winograd, winograd_bwd, winograd_w, .. } => [
                if winograd.is_some() {
                    "winograd"
                } else if direct_fwd.is_some() {
                    "direct"
                } else {
                    packed
                },
                if winograd_bwd.is_some() {
                    "winograd"
                } else if direct_bwd.is_some() {
                    "direct"
                } else {
                    packed
                },
                if winograd_w.is_some() {
                    "winograd"
                } else if direct_w.is_some() {
                    "direct"
                } else {
                    packed
                },
            ],
            Impl::Naive { .. } => ["naive"; 3],
        }
    }

    fn slice(&self) -> ChannelSlice {
        self.epi.concat.unwrap_or(ChannelSlice { total: self.geom.cout, offset: 0 })
    }

    /// Samples in `x`, checking it holds a whole number of them.
    fn samples(&self, what: &str, len: usize, per: usize) -> Result<usize> {
        if per == 0 || !len.is_multiple_of(per) {
            return Err(conv_err(&self.layer, format!("{what} has {len} elements, not a multiple of {per} per sample")));
        }
        Ok(len / per)
    }

    fn check(&self, what: &str, len: usize, want: usize) -> Result<()> {
        if len != want {
            return Err(conv_err(&self.layer, format!("{what} has {len} elements, expected {want}")));
        }
        Ok(())
    }

    /// Forward: `out = epi(conv(x, w) + b)` for every sample in `x` (layouts in the module doc).
    /// `b` is required iff the layer has a bias; `extra` holds the epilogue's operands.
    pub fn forward(&self, out: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, extra: EpilogueArgs) -> Result<()> {
        let g = &self.geom;
        let n = self.samples("input", x.len(), g.in_numel())?;
        let cs = self.slice();
        let p = g.pixels();
        self.check("output", out.len(), n * cs.total * p)?;
        self.check("weights", w.len(), g.weight_numel())?;
        let bias: &[f32] = match (self.bias, b) {
            (true, Some(b)) => {
                self.check("bias", b.len(), g.cout)?;
                b
            }
            (false, None) => &[],
            (true, None) => return Err(conv_err(&self.layer, "bias missing".into())),
            (false, Some(_)) => return Err(conv_err(&self.layer, "bias given to a layer without one".into())),
        };
        let (scale, shift): (&[f32], &[f32]) = match (self.epi.affine, extra.affine) {
            (true, Some((s, t))) => {
                self.check("scale", s.len(), g.cout)?;
                self.check("shift", t.len(), g.cout)?;
                (s, t)
            }
            (false, None) => (&[], &[]),
            _ => return Err(conv_err(&self.layer, "scale/shift must be given iff the epilogue has them".into())),
        };
        let residual: &[f32] = match (self.epi.residual, extra.residual) {
            (true, Some(r)) => {
                self.check("residual", r.len(), n * g.cout * p)?;
                r
            }
            (false, None) => &[],
            _ => return Err(conv_err(&self.layer, "residual must be given iff the epilogue has one".into())),
        };
        let mut stats = extra.stats;
        if let Some(st) = &stats {
            if self.epi.accumulate {
                return Err(conv_err(&self.layer, "output statistics asked of an accumulating epilogue".into()));
            }
            self.check("output statistics", st.len(), n * g.cout)?;
        }
        let mut hook = extra.after_sample;
        if hook.is_some() && self.epi.accumulate {
            return Err(conv_err(&self.layer, "a per-sample hook asked of an accumulating epilogue".into()));
        }
        let hook_err = std::cell::Cell::new(None);
        // Right after sample `s` is stored: its planes' statistics, then the hook.
        let mut sample_stats = |out: &[f32], s: usize| {
            let base = (s * cs.total + cs.offset) * p;
            if let Some(st) = stats.as_deref_mut() {
                for (co, ps) in st[s * g.cout..(s + 1) * g.cout].iter_mut().enumerate() {
                    *ps = plane_stats(&out[base + co * p..base + (co + 1) * p]);
                }
            }
            if let Some(SampleHook(h)) = hook.as_mut() {
                if let Err(e) = h(s, &out[base..base + g.cout * p]) {
                    hook_err.set(Some(e));
                }
            }
        };
        let mg = g.cout / g.groups;
        let cg = g.cin / g.groups;
        let kc = g.kc();
        let hw = g.h * g.w;
        match &self.imp {
            Impl::Blocked { winograd: Some(wg), .. } => {
                wg.run(w, n, |s, f| {
                    let we = WinoEpi {
                        bias,
                        scale,
                        shift,
                        residual: if self.epi.residual { &residual[s * g.cout * p..(s + 1) * g.cout * p] } else { &[] },
                        act: self.epi.act,
                        accumulate: self.epi.accumulate,
                    };
                    f(&mut out[(s * cs.total + cs.offset) * p..][..g.cout * p], &x[s * g.in_numel()..][..g.in_numel()], &we);
                    sample_stats(out, s);
                });
            }
            Impl::Blocked { fwd, direct_fwd, .. } => scratch::with(&SCRATCH, |sc| {
                let packs = pack_groups(&mut sc.packs, g.groups, |dst, gi| pack_a(dst, &w[gi * mg * kc..], mg, kc, kc, 1));
                if let Some(d) = direct_fwd {
                    for s in 0..n {
                        for (gi, ap) in packs.iter().enumerate() {
                            let b = sc.pad.view(&d.planes, &x[s * g.in_numel() + gi * cg * hw..][..cg * hw]);
                            let r0 = gi * mg;
                            let epi = EpiArgs {
                                bias: if self.bias { &bias[r0..] } else { &[] },
                                scale: if self.epi.affine { &scale[r0..] } else { &[] },
                                shift: if self.epi.affine { &shift[r0..] } else { &[] },
                                residual: if self.epi.residual { &residual[(s * g.cout + r0) * p..] } else { &[] },
                            };
                            d.run(out, (s * cs.total + cs.offset + gi * mg) * p, mg, ap, b, &epi);
                        }
                        sample_stats(out, s);
                    }
                    return Ok(()); // (the hook's error, if any, is the call's result below)
                }
                let Some(fwd) = fwd else {
                    return Err(conv_err(&self.layer, "no forward kernel compiled".into()));
                };
                let bp = self.block_panels();
                let panel = grow(&mut sc.panel, bp * kc * NR);
                // A 1x1 input too large to stay in L2 between blocks: prefetch each block's
                // source rows while the previous block computes.
                let big = g.is_direct() && cg * hw * 4 > PREFETCH_MIN_BYTES;
                for s in 0..n {
                    for (gi, ap) in packs.iter().enumerate() {
                        let xs = &x[s * g.in_numel() + gi * cg * hw..][..cg * hw];
                        let c_off = (s * cs.total + cs.offset + gi * mg) * p;
                        let r0 = gi * mg;
                        let epi = EpiArgs {
                            bias: if self.bias { &bias[r0..] } else { &[] },
                            scale: if self.epi.affine { &scale[r0..] } else { &[] },
                            shift: if self.epi.affine { &shift[r0..] } else { &[] },
                            residual: if self.epi.residual { &residual[(s * g.cout + r0) * p..] } else { &[] },
                        };
                        for jb in (0..p).step_by(bp * NR) {
                            let cols = (bp * NR).min(p - jb);
                            if g.is_direct() {
                                gemm::pack_b_block(panel, xs, kc, jb, cols, hw);
                                // The next block's rows (this sample's or the next one's), to
                                // prefetch a share of after each panel.
                                let next = if jb + cols < p {
                                    Some((xs, jb + cols))
                                } else if s + 1 < n && big {
                                    Some((&x[(s + 1) * g.in_numel() + gi * cg * hw..][..cg * hw], 0))
                                } else {
                                    None
                                };
                                // Groups of `reps` panels (a row kernel's; their B stays in
                                // L1), each run by every row panel of W in turn.
                                let np = cols.div_ceil(NR);
                                let reps = fwd.row_reps();
                                let (ngr, nip) = (np.div_ceil(reps), mg.div_ceil(MR));
                                for gr in 0..ngr {
                                    let (t0, t1) = (gr * reps, np.min(gr * reps + reps));
                                    if let Some((nx, njb)) = next.filter(|_| big) {
                                        let ncols = (bp * NR).min(p - njb);
                                        for r in gr * kc / ngr..(gr + 1) * kc / ngr {
                                            entry::prefetch(&nx[r * hw + njb..r * hw + njb + ncols]);
                                        }
                                    }
                                    let j0 = jb + t0 * NR;
                                    if reps > 1 && t1 - t0 == reps && j0 + reps * NR <= p {
                                        fwd.run_row_panels(out, c_off + j0, mg, 0..nip, j0, ap, &panel[t0 * kc * NR..], &epi);
                                        continue;
                                    }
                                    for ip in 0..nip {
                                        for t in t0..t1 {
                                            let j0 = jb + t * NR;
                                            let nr = NR.min(p - j0);
                                            fwd.run_panels(out, c_off + j0, mg, ip..ip + 1, j0, nr, ap, &panel[t * kc * NR..], &epi);
                                        }
                                    }
                                }
                                continue;
                            } else if bp > 1 {
                                self.im2col_row_panels(panel, xs, jb / g.ow, 0, bp);
                            } else {
                                self.im2col_panel(panel, xs, jb, cols);
                            }
                            for (t, j0) in (jb..jb + cols).step_by(NR).enumerate() {
                                fwd.run_panel(out, c_off + j0, mg, j0, ap, &panel[t * kc * NR..], &epi);
                            }
                        }
                    }
                    sample_stats(out, s);
                }
                Ok(())
            })?,
            Impl::Naive { fwd, .. } => {
                // Unfused: the kernel writes conv + bias, the epilogue is a separate pass.
                let mut tmp = vec![0.0f32; g.cout * p];
                for s in 0..n {
                    fwd.call(&mut tmp, [&x[s * g.in_numel()..][..g.in_numel()], w, bias, &[], &[], &[]]);
                    let base = (s * cs.total + cs.offset) * p;
                    for co in 0..g.cout {
                        for q in 0..p {
                            let mut t = tmp[co * p + q];
                            if self.epi.affine {
                                t = t * scale[co] + shift[co];
                            }
                            if self.epi.residual {
                                t += residual[(s * g.cout + co) * p + q];
                            }
                            t = self.epi.act.apply(t);
                            let o = &mut out[base + co * p + q];
                            *o = if self.epi.accumulate { *o + t } else { t };
                        }
                    }
                    sample_stats(out, s);
                }
            }
        }
        hook_err.take().map_or(Ok(()), Err)
    }

    /// Backward data: `d_x += ∂L/∂x` from `d_out` (same layout as `out`) and the weights
    /// (`d_x = ∂L/∂x` when compiled with [`ConvOptions::overwrite_dx`]).
    pub fn backward_data(&self, d_x: &mut [f32], d_out: &[f32], w: &[f32]) -> Result<()> {
        self.backward_data_impl(d_x, DOut::Plain(d_out), w)
    }

    /// [`backward_data`](Self::backward_data) with `before_sample` run on each sample's planes
    /// of `d_out`, in place, right before the kernel reads them (see [`GradHook`]): the same
    /// result as running the hook over every sample first, with the finished gradient left in
    /// `d_out` for the weight gradient, but without a separate pass over it in memory.
    pub fn backward_data_with(&self, d_x: &mut [f32], d_out: &mut [f32], w: &[f32], before_sample: GradHook<'_>) -> Result<()> {
        self.backward_data_impl(d_x, DOut::Hooked(d_out, before_sample), w)
    }

    fn backward_data_impl(&self, d_x: &mut [f32], mut d_out: DOut<'_, '_>, w: &[f32]) -> Result<()> {
        self.has_backward("input gradient")?;
        let g = &self.geom;
        let n = self.samples("input gradient", d_x.len(), g.in_numel())?;
        let cs = self.slice();
        let p = g.pixels();
        self.check("output gradient", d_out.len(), n * cs.total * p)?;
        self.check("weights", w.len(), g.weight_numel())?;
        let mg = g.cout / g.groups;
        let cg = g.cin / g.groups;
        let kc = g.kc();
        let hw = g.h * g.w;
        // Sample `s`'s planes of this layer's channels.
        let region = |s: usize| (s * cs.total + cs.offset) * p..(s * cs.total + cs.offset + g.cout) * p;
        match &self.imp {
            Impl::Blocked { winograd_bwd: Some(wg), .. } => scratch::with(&SCRATCH, |sc| {
                // w'[ci, co, t] = w[co, ci, taps - 1 - t] (one group).
                let taps = g.kernel[0] * g.kernel[1];
                let wt = grow(&mut sc.wt, g.cin * g.cout * taps);
                for co in 0..g.cout {
                    for ci in 0..g.cin {
                        let src = &w[(co * g.cin + ci) * taps..][..taps];
                        let dst = &mut wt[(ci * g.cout + co) * taps..][..taps];
                        for (t, v) in dst.iter_mut().enumerate() {
                            *v = src[taps - 1 - t];
                        }
                    }
                }
                let we = WinoEpi { bias: &[], scale: &[], shift: &[], residual: &[], act: FusedAct::None, accumulate: !self.overwrites_dx };
                let mut res = Ok(());
                wg.run(wt, n, |s, f| {
                    if res.is_err() {
                        return;
                    }
                    match d_out.sample(s, region(s)) {
                        Ok(dos) => f(&mut d_x[s * g.in_numel()..][..g.in_numel()], dos, &we),
                        Err(e) => res = Err(e),
                    }
                });
                res
            })?,
            Impl::Blocked { direct_bwd: Some(d), .. } => scratch::with(&SCRATCH, |sc| -> Result<()> {
                // A = the flipped, transposed weights: element (ci, (co, t)) is
                // w[co, ci, kh-1-ky, kw-1-kx] for tap t = (ky, kx).
                let taps = g.kernel[0] * g.kernel[1];
                let wt = grow(&mut sc.wt, cg * mg * taps);
                let packs = pack_groups(&mut sc.packs, g.groups, |a, gi| {
                    for co in 0..mg {
                        for ci in 0..cg {
                            let src = &w[((gi * mg + co) * cg + ci) * taps..][..taps];
                            let dst = &mut wt[(ci * mg + co) * taps..][..taps];
                            for (t, v) in dst.iter_mut().enumerate() {
                                *v = src[taps - 1 - t];
                            }
                        }
                    }
                    pack_a(a, wt, cg, mg * taps, mg * taps, 1);
                });
                for s in 0..n {
                    let dos = d_out.sample(s, region(s))?;
                    for (gi, ap) in packs.iter().enumerate() {
                        let b = sc.pad.view(&d.planes, &dos[gi * mg * p..][..mg * p]);
                        d.run(d_x, s * g.in_numel() + gi * cg * hw, cg, ap, b, &EpiArgs::default());
                    }
                }
                Ok(())
            })?,
            Impl::Blocked { bwd_data: None, .. } => {
                return Err(conv_err(&self.layer, "no backward-data kernel compiled".into()));
            }
            Impl::Blocked { bwd_data: Some(bwd_data), .. } => scratch::with(&SCRATCH, |sc| -> Result<()> {
                // A = W_gᵀ: element (kk, co) at co*kc + kk.
                let packs = pack_groups(&mut sc.packs, g.groups, |a, gi| pack_a(a, &w[gi * mg * kc..], kc, mg, 1, kc));
                let bp = self.block_panels();
                let panel = grow(&mut sc.panel, bp * mg * NR);
                let dcol = grow(&mut sc.dcol, if g.is_direct() { 0 } else { bp * kc * NR });
                for s in 0..n {
                    let dos = d_out.sample(s, region(s))?;
                    for (gi, ap) in packs.iter().enumerate() {
                        let dout = &dos[gi * mg * p..][..mg * p];
                        let dx_off = s * g.in_numel() + gi * cg * hw;
                        if self.zero_dx {
                            d_x[dx_off..dx_off + cg * hw].fill(0.0);
                        }
                        for jb in (0..p).step_by(bp * NR) {
                            let cols = (bp * NR).min(p - jb);
                            gemm::pack_b_block(panel, dout, mg, jb, cols, p);
                            for (t, j0) in (jb..jb + cols).step_by(NR).enumerate() {
                                let b = &panel[t * mg * NR..];
                                if g.is_direct() {
                                    bwd_data.run_panel(d_x, dx_off + j0, kc, j0, ap, b, &EpiArgs::default());
                                } else {
                                    bwd_data.run_panel(&mut dcol[t * kc * NR..], 0, kc, 0, ap, b, &EpiArgs::default());
                                }
                            }
                            if g.is_direct() {
                                continue;
                            }
                            let dxs = &mut d_x[dx_off..dx_off + cg * hw];
                            if bp > 1 {
                                self.col2im_row_panels(dxs, dcol, jb / g.ow, 0, bp);
                            } else {
                                self.col2im_panel(dxs, dcol, jb, cols);
                            }
                        }
                    }
                }
                Ok(())
            })?,
            Impl::Naive { bwd_data, .. } => {
                let mut dout = vec![0.0f32; g.cout * p];
                for s in 0..n {
                    dout.copy_from_slice(d_out.sample(s, region(s))?);
                    let dxs = &mut d_x[s * g.in_numel()..][..g.in_numel()];
                    if self.zero_dx {
                        dxs.fill(0.0);
                    }
                    bwd_data.call(dxs, [&dout, w, &[], &[], &[], &[]]);
                }
            }
        }
        Ok(())
    }

    /// Backward weight: `d_w += ∂L/∂W` and, for a layer with bias, `d_b += ∂L/∂b`
    /// (`d_b[co] = Σ_{n,p} d_out[n, co, p]`), summed over every sample in `x`.
    pub fn backward_weight(&self, d_w: &mut [f32], d_b: Option<&mut [f32]>, d_out: &[f32], x: &[f32]) -> Result<()> {
        self.has_backward("weight gradient")?;
        let g = &self.geom;
        let n = self.samples("input", x.len(), g.in_numel())?;
        let cs = self.slice();
        let p = g.pixels();
        self.check("output gradient", d_out.len(), n * cs.total * p)?;
        self.check("weight gradient", d_w.len(), g.weight_numel())?;
        match (self.bias, d_b) {
            (true, Some(db)) => {
                self.check("bias gradient", db.len(), g.cout)?;
                for s in 0..n {
                    let base = (s * cs.total + cs.offset) * p;
                    for (co, d) in db.iter_mut().enumerate() {
                        *d += super::pointwise::sum_f64(&d_out[base + co * p..base + (co + 1) * p]) as f32;
                    }
                }
            }
            (false, None) => {}
            (true, None) => return Err(conv_err(&self.layer, "bias gradient missing".into())),
            (false, Some(_)) => return Err(conv_err(&self.layer, "bias gradient given to a layer without bias".into())),
        }
        let mg = g.cout / g.groups;
        let cg = g.cin / g.groups;
        let kc = g.kc();
        let hw = g.h * g.w;
        match &self.imp {
            Impl::Blocked { winograd_w: Some(ww), .. } => {
                ww.run(d_w, n, |s| (&x[s * g.in_numel()..][..g.in_numel()], &d_out[(s * cs.total + cs.offset) * p..][..g.cout * p]));
            }
            Impl::Blocked { direct_w: Some(d), .. } => scratch::with(&SCRATCH, |sc| {
                let pl = &d.planes;
                let nt = d.taps.len();
                let (main_rows, main_w) = (d.main[0].spec().rows, d.main[0].spec().width);
                let dwt = grow(&mut sc.dwt, nt * cg * mg);
                let bpan = grow(&mut sc.panel, mg.div_ceil(NR) * main_rows * main_w * NR);
                let big_w = g.is_direct() && !d.tap_rows && cg * hw * 4 > PREFETCH_MIN_BYTES;
                for gi in 0..g.groups {
                    dwt.fill(0.0);
                    for s in 0..n {
                        let pad = sc.pad.view(pl, &x[s * g.in_numel() + gi * cg * hw..][..cg * hw]);
                        let dout = &d_out[(s * cs.total + cs.offset + gi * mg) * p..][..mg * p];
                        // Pixel blocks: (first row, first column, kernels), along the row of a
                        // one-row output, else whole rows.
                        let (along_row, step, len) = if pl.out_h == 1 { (true, main_w, pl.out_w) } else { (false, main_rows, pl.out_h) };
                        for b0 in (0..len).step_by(step) {
                            let (y0, x0) = if along_row { (0, b0) } else { (b0, 0) };
                            let kerns = if b0 + step <= len { &d.main } else { &d.tail };
                            let p0 = y0 * pl.out_w + x0;
                            let kb = kerns[0].spec().rows * kerns[0].spec().width;
                            // A 1x1 input over L2's share: the next block's pixels of `x` and
                            // `d_out` are prefetched a few rows per tile while this one computes.
                            let next = (big_w && x0 + kb < pl.out_w).then(|| (x0 + kb, main_w.min(pl.out_w - x0 - kb)));
                            let steps = mg.div_ceil(NR) * cg.div_ceil(MR);
                            // B = d_outᵀ for this block: panel jp holds channels 8jp..8jp+8.
                            for jp in 0..mg.div_ceil(NR) {
                                let nr = NR.min(mg - jp * NR);
                                gemm::pack_b_panel(&mut bpan[jp * kb * NR..], &dout[p0..], kb, jp * NR, nr, 1, p);
                            }
                            let a0 = y0 * pl.pw + x0;
                            for jp in 0..mg.div_ceil(NR) {
                                let nr = NR.min(mg - jp * NR);
                                let b = &bpan[jp * kb * NR..(jp + 1) * kb * NR];
                                if d.tap_rows {
                                    // Rows = taps 4i..4i+4 of channel ci.
                                    for (i, kern) in kerns.iter().enumerate() {
                                        let mr = MR.min(nt - i * MR);
                                        for ci in 0..cg {
                                            let c = &mut dwt[(i * MR * cg + ci) * mg + jp * NR..];
                                            kern.run(c, mr, nr, &pad[ci * pl.plane + a0..], b);
                                        }
                                    }
                                } else {
                                    for (t, &toff) in d.taps.iter().enumerate() {
                                        for ip in 0..cg.div_ceil(MR) {
                                            if let Some((nx0, nw)) = next {
                                                let i = jp * cg.div_ceil(MR) + ip;
                                                for r in cg * i / steps..cg * (i + 1) / steps {
                                                    entry::prefetch(&pad[r * pl.plane + nx0..][..nw]);
                                                }
                                                for r in mg * i / steps..mg * (i + 1) / steps {
                                                    entry::prefetch(&dout[r * p + nx0..][..nw]);
                                                }
                                            }
                                            let mr = MR.min(cg - ip * MR);
                                            let c = &mut dwt[(t * cg + ip * MR) * mg + jp * NR..];
                                            kerns[0].run(c, mr, nr, &pad[ip * MR * pl.plane + toff + a0..], b);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    // d_w[co][ci][t] += dwt[t][ci][co].
                    let dwg = &mut d_w[gi * mg * kc..(gi + 1) * mg * kc];
                    for co in 0..mg {
                        for ci in 0..cg {
                            let row = &mut dwg[(co * cg + ci) * nt..][..nt];
                            for (t, v) in row.iter_mut().enumerate() {
                                *v += dwt[(t * cg + ci) * mg + co];
                            }
                        }
                    }
                }
            }),
            Impl::Blocked { bwd_w: None, .. } => {
                return Err(conv_err(&self.layer, "no backward-weight kernel compiled".into()));
            }
            Impl::Blocked { bwd_w: Some(bwd_w), bwd_w_tail, .. } => scratch::with(&SCRATCH, |sc| {
                let ConvScratch { apack, panel, rows, .. } = sc;
                let panel = grow(panel, WGRAD_BLOCK * NR);
                for s in 0..n {
                    for gi in 0..g.groups {
                        let dout = &d_out[(s * cs.total + cs.offset + gi * mg) * p..][..mg * p];
                        let xs = &x[s * g.in_numel() + gi * cg * hw..][..cg * hw];
                        let dw_off = gi * mg * kc;
                        for p0 in (0..p).step_by(WGRAD_BLOCK) {
                            let kb = WGRAD_BLOCK.min(p - p0);
                            let gm = if kb == WGRAD_BLOCK.min(p) { bwd_w } else { bwd_w_tail.as_ref().expect("tail GEMM") };
                            // A = d_out block: element (co, q) at co*p + p0 + q.
                            pack_a(apack, &dout[p0..], mg, kb, p, 1);
                            for j0 in (0..kc).step_by(NR) {
                                let nr = NR.min(kc - j0);
                                if g.is_direct() {
                                    // B = colᵀ = xᵀ: element (q, kk) at kk*hw + p0 + q.
                                    gemm::pack_b_panel(panel, &xs[p0..], kb, j0, nr, 1, hw);
                                } else {
                                    self.im2col_t_panel(panel, rows, xs, p0, kb, j0, nr);
                                }
                                gm.run_panel(d_w, dw_off + j0, mg, j0, apack, panel, &EpiArgs::default());
                            }
                        }
                    }
                }
            }),
            Impl::Naive { bwd_w, .. } => {
                let mut dout = vec![0.0f32; g.cout * p];
                for s in 0..n {
                    dout.copy_from_slice(&d_out[(s * cs.total + cs.offset) * p..][..g.cout * p]);
                    bwd_w.call(d_w, [&dout, &x[s * g.in_numel()..][..g.in_numel()], &[], &[], &[], &[]]);
                }
            }
        }
        Ok(())
    }

    /// How many 8-pixel panels one packing step covers: a whole output row for unit-stride
    /// im2col when rows are a multiple of 8 wide (each input row segment is then read once,
    /// sequentially), 32 panels for a direct 1x1 convolution, else one.
    fn block_panels(&self) -> usize {
        let g = &self.geom;
        if g.is_direct() {
            32
        } else if g.stride[1] == 1 && g.ow.is_multiple_of(NR) {
            g.ow / NR
        } else {
            1
        }
    }

    /// Unit-stride im2col of `np` full panels starting at output pixel `(oy, ox0)` (all in one
    /// output row): panel `t` at `dst[t*Kc*8..]`, its row `kk` holding pixels
    /// `ox0 + 8t .. ox0 + 8t + 8`.
    fn im2col_row_panels(&self, dst: &mut [f32], xs: &[f32], oy: usize, ox0: usize, np: usize) {
        let g = &self.geom;
        let (h, w) = (g.h as isize, g.w as isize);
        let [kh, kw] = g.kernel;
        let hw = g.h * g.w;
        let kc = self.ktab.len();
        let mut kk = 0;
        for ci in 0..g.cin / g.groups {
            for ky in 0..kh {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                let inside = iy >= 0 && iy < h;
                let base = ci * hw + if inside { iy as usize * g.w } else { 0 };
                for kx in 0..kw {
                    let ix0 = (ox0 + kx * g.dilation[1]) as isize - g.pads[2] as isize;
                    for t in 0..np {
                        let o = (t * kc + kk) * NR;
                        let d: &mut [f32; NR] = (&mut dst[o..o + NR]).try_into().expect("8-wide row");
                        let ix0 = ix0 + (t * NR) as isize;
                        if !inside {
                            *d = [0.0; NR];
                        } else if ix0 >= 0 && ix0 + NR as isize <= w {
                            let s = base + ix0 as usize;
                            *d = xs[s..s + NR].try_into().expect("8-wide source");
                        } else {
                            for (q, v) in d.iter_mut().enumerate() {
                                let ix = ix0 + q as isize;
                                *v = if ix >= 0 && ix < w { xs[base + ix as usize] } else { 0.0 };
                            }
                        }
                    }
                    kk += 1;
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col_row_panels`]: add `np` panels of `d_col` (same layout)
    /// into one group's input gradient.
    fn col2im_row_panels(&self, dxs: &mut [f32], dcol: &[f32], oy: usize, ox0: usize, np: usize) {
        let g = &self.geom;
        let (h, w) = (g.h as isize, g.w as isize);
        let [kh, kw] = g.kernel;
        let hw = g.h * g.w;
        let kc = self.ktab.len();
        let mut kk = 0;
        for ci in 0..g.cin / g.groups {
            for ky in 0..kh {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                if iy < 0 || iy >= h {
                    kk += kw;
                    continue;
                }
                let base = ci * hw + iy as usize * g.w;
                for kx in 0..kw {
                    let ix0 = (ox0 + kx * g.dilation[1]) as isize - g.pads[2] as isize;
                    for t in 0..np {
                        let o = (t * kc + kk) * NR;
                        let v: &[f32; NR] = dcol[o..o + NR].try_into().expect("8-wide row");
                        let ix0 = ix0 + (t * NR) as isize;
                        if ix0 >= 0 && ix0 + NR as isize <= w {
                            let s = base + ix0 as usize;
                            let d: &mut [f32; NR] = (&mut dxs[s..s + NR]).try_into().expect("8-wide target");
                            for q in 0..NR {
                                d[q] += v[q];
                            }
                        } else {
                            for (q, &x) in v.iter().enumerate() {
                                let ix = ix0 + q as isize;
                                if ix >= 0 && ix < w {
                                    dxs[base + ix as usize] += x;
                                }
                            }
                        }
                    }
                    kk += 1;
                }
            }
        }
    }

    /// Runs of consecutive output pixels `j0..j0+nr` that share an output row:
    /// `(oy, ox0, len, t0)` with `t0` the position in the panel.
    fn segments(&self, j0: usize, nr: usize, out: &mut [(usize, usize, usize, usize); NR]) -> usize {
        let ow = self.geom.ow;
        let (mut q, mut cnt) = (j0, 0);
        while q < j0 + nr {
            let (oy, ox0) = (q / ow, q % ow);
            let len = (ow - ox0).min(j0 + nr - q);
            out[cnt] = (oy, ox0, len, q - j0);
            cnt += 1;
            q += len;
        }
        cnt
    }

    /// Gather the `Kc x 8` B panel of `col` for pixels `j0..j0+nr` from one group's input.
    fn im2col_panel(&self, dst: &mut [f32], xs: &[f32], j0: usize, nr: usize) {
        let g = &self.geom;
        let (h, w) = (g.h as isize, g.w as isize);
        let (sh, sw) = (g.stride[0] as isize, g.stride[1] as isize);
        let mut segs = [(0, 0, 0, 0); NR];
        let ns = self.segments(j0, nr, &mut segs);
        if ns == 1 && nr == NR && sw == 1 {
            self.im2col_row_panels(dst, xs, segs[0].0, segs[0].1, 1);
            return;
        }
        if nr < NR {
            dst[..self.ktab.len() * NR].fill(0.0);
        }
        for (kk, &(coff, dy, dx)) in self.ktab.iter().enumerate() {
            let row = &mut dst[kk * NR..kk * NR + NR];
            for &(oy, ox0, len, t0) in &segs[..ns] {
                let iy = oy as isize * sh + dy;
                let seg = &mut row[t0..t0 + len];
                if iy < 0 || iy >= h {
                    seg.fill(0.0);
                    continue;
                }
                let base = coff + (iy * w) as usize;
                let ix0 = ox0 as isize * sw + dx;
                if sw == 1 && ix0 >= 0 && ix0 + len as isize <= w {
                    let s = base + ix0 as usize;
                    if len == NR {
                        // Fixed-size copy: two vector moves instead of a memcpy call.
                        let d: &mut [f32; NR] = seg.try_into().expect("8-wide segment");
                        *d = xs[s..s + NR].try_into().expect("8-wide source");
                    } else {
                        seg.copy_from_slice(&xs[s..s + len]);
                    }
                } else {
                    for (q, v) in seg.iter_mut().enumerate() {
                        let ix = ix0 + q as isize * sw;
                        *v = if ix >= 0 && ix < w { xs[base + ix as usize] } else { 0.0 };
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col_panel`]: add a `Kc x 8` panel of `d_col` into one group's
    /// input gradient.
    fn col2im_panel(&self, dxs: &mut [f32], dcol: &[f32], j0: usize, nr: usize) {
        let g = &self.geom;
        let (h, w) = (g.h as isize, g.w as isize);
        let (sh, sw) = (g.stride[0] as isize, g.stride[1] as isize);
        let mut segs = [(0, 0, 0, 0); NR];
        let ns = self.segments(j0, nr, &mut segs);
        if ns == 1 && nr == NR && sw == 1 {
            self.col2im_row_panels(dxs, dcol, segs[0].0, segs[0].1, 1);
            return;
        }
        for (kk, &(coff, dy, dx)) in self.ktab.iter().enumerate() {
            let row = &dcol[kk * NR..kk * NR + NR];
            for &(oy, ox0, len, t0) in &segs[..ns] {
                let iy = oy as isize * sh + dy;
                if iy < 0 || iy >= h {
                    continue;
                }
                let seg = &row[t0..t0 + len];
                let base = coff + (iy * w) as usize;
                let ix0 = ox0 as isize * sw + dx;
                if sw == 1 && ix0 >= 0 && ix0 + len as isize <= w {
                    let s = base + ix0 as usize;
                    if len == NR {
                        let d: &mut [f32; NR] = (&mut dxs[s..s + NR]).try_into().expect("8-wide target");
                        let v: &[f32; NR] = seg.try_into().expect("8-wide segment");
                        for t in 0..NR {
                            d[t] += v[t];
                        }
                    } else {
                        for (d, v) in dxs[s..s + len].iter_mut().zip(seg) {
                            *d += v;
                        }
                    }
                } else {
                    for (q, v) in seg.iter().enumerate() {
                        let ix = ix0 + q as isize * sw;
                        if ix >= 0 && ix < w {
                            dxs[base + ix as usize] += v;
                        }
                    }
                }
            }
        }
    }

    /// The B panel of `colᵀ` for the weight gradient: `dst[q*8 + t] = col[j0 + t][p0 + q]` for
    /// `q < kb`, `t < nr` (other columns zero). Gathers the 8 `col` rows into `rows`
    /// (contiguous copies), then transposes.
    #[allow(clippy::too_many_arguments)]
    fn im2col_t_panel(&self, dst: &mut [f32], rows: &mut Vec<f32>, xs: &[f32], p0: usize, kb: usize, j0: usize, nr: usize) {
        let g = &self.geom;
        let (h, w) = (g.h as isize, g.w as isize);
        let (sh, sw) = (g.stride[0] as isize, g.stride[1] as isize);
        let ow = g.ow;
        rows.clear();
        rows.resize(NR * kb, 0.0);
        for t in 0..nr {
            let (coff, dy, dx) = self.ktab[j0 + t];
            let row = &mut rows[t * kb..(t + 1) * kb];
            let mut q = p0;
            while q < p0 + kb {
                let (oy, ox0) = (q / ow, q % ow);
                let len = (ow - ox0).min(p0 + kb - q);
                let iy = oy as isize * sh + dy;
                let seg = &mut row[q - p0..q - p0 + len];
                if iy >= 0 && iy < h {
                    let base = coff + (iy * w) as usize;
                    let ix0 = ox0 as isize * sw + dx;
                    if sw == 1 && ix0 >= 0 && ix0 + len as isize <= w {
                        seg.copy_from_slice(&xs[base + ix0 as usize..base + ix0 as usize + len]);
                    } else {
                        for (i, v) in seg.iter_mut().enumerate() {
                            let ix = ix0 + i as isize * sw;
                            if ix >= 0 && ix < w {
                                *v = xs[base + ix as usize];
                            }
                        }
                    }
                }
                q += len;
            }
        }
        gemm::transpose8(&mut dst[..kb * NR], rows, kb);
    }
}

#[allow(dead_code)]
const _: () = assert!(MR == 4 && NR == 8);

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1x1 unpadded layer's planes (`chans` planes of `h x w`, seen as one row each), as the
    /// forward and backward data define them, and the tiles per block they run.
    fn one_by_one(chans: usize, h: usize, w: usize, k: usize) -> (Planes, usize) {
        let pl = Planes::new(chans, (1, h * w), (1, h * w), [1, 1], 0, 0);
        let reps = pl.direct(std::iter::once((0, 0)), 0).reps;
        assert_eq!(reps, tile_block(k, 0).min(h * w / NR).max(1));
        (pl, reps)
    }

    #[test]
    fn planes_are_read_in_place_only_where_blocks_spread_over_l1() {
        // 56x56 (12,544-byte planes, gcd 256 with a 4 KiB way) and 28x28 (3,136, gcd 64):
        // in place, the source's own layout.
        for (chans, h, w) in [(64, 56, 56), (20, 28, 28), (12, 28, 28)] {
            let (pl, reps) = one_by_one(chans, h, w, chans);
            let ip = pl.in_place(reps);
            assert!(ip.is_source(), "{chans}x{h}x{w}: {ip:?}");
            assert_eq!((ip.plane, ip.pw, ip.len()), (h * w, h * w, chans * h * w));
            // Blocks of 256 bytes still cover 56x56 planes' sets evenly, 224 do not.
            assert_eq!(pl.in_place(8).is_source(), h == 56 || h == 28);
            assert_eq!(pl.in_place(7).is_source(), h == 28);
        }
        // 32x32 (4 KiB planes: one set offset), 16x16 (1 KiB: four), 17x17 (tiles would
        // read past a plane), a source over 1 MiB a sample (56x56x128): the padded copy,
        // whose planes are an odd number of lines apart.
        for (chans, h, w) in [(64, 32, 32), (128, 16, 16), (16, 17, 17), (128, 56, 56)] {
            let (pl, reps) = one_by_one(chans, h, w, chans);
            let ip = pl.in_place(reps);
            assert_eq!(ip, pl, "{chans}x{h}x{w}");
            assert!(!ip.is_source() && (ip.plane / 16) % 2 == 1, "{chans}x{h}x{w}: {ip:?}");
        }
        // Padded or multi-tap planes are never the source's layout.
        let padded = Planes::new(8, (28, 28), (28, 28), [3, 3], 1, 1);
        assert_eq!(padded.in_place(16), padded);
        assert!(!padded.is_source());
    }
}
