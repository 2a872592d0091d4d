//! The register-blocked GEMM: a Cranelift-generated `4 x 8` micro-kernel (eight `f32x4`
//! accumulators, `K` loop unrolled by 8, `fma` per step) with a fused epilogue, plus the packing
//! routines and the panel driver that every convolution and dense kernel runs on.
//!
//! Each step broadcasts four `A` values across vectors, in one of three instruction sequences
//! ([`Broadcast`]) that feed the same `fma`s in the same order; the host's is picked once per
//! process by timing them ([`Broadcast::host`]).
//!
//! ## Computation
//! For one GEMM `C[M, N] (=|+=) epi(A[M, K] · B[K, N])`, with `A` and `B` packed:
//! - **packed A** (see [`pack_a`]): `ceil(M/4)` panels, panel `i` is `K x 4` row-major —
//!   `a[i*4K + k*4 + r] = A[4i + r][k]`, rows past `M` zero;
//! - **packed B panel** (see [`pack_b_panel`]): one `K x 8` block for columns `j0..j0+8` —
//!   `b[k*8 + t] = B[k][j0 + t]`, columns past `N` zero;
//! - **C**: row-major with leading dimension `ldc` (`C[i][j]` at `i*ldc + j` from the GEMM's
//!   base offset), so a GEMM may write a slice of a larger tensor (a concat branch's channels).
//!
//! ## Epilogue (applied in registers as each tile is stored)
//! `t = acc (+ bias) ; t = t*scale[i] + shift[i] ; t += residual[i][j] ; t = act(t) ;
//! C[i][j] = t` or, in accumulate mode, `C[i][j] += t`. Bias is per row (a convolution's output
//! channel) or per column (a dense layer's output feature); the residual has its own leading
//! dimension `ldr`.
//!
//! Each kernel is specialised to `K`, `ldc`, `ldr`, the epilogue and its tile shape `mr x nr`
//! (`mr <= 4`, `nr <= 8`); a GEMM compiles only the edge variants its `M` and `N` need.
//!
//! ## Operands read in place (stride-1 convolutions)
//! - [`DirectB`]: the same tile with `B` read straight from zero-padded input planes at
//!   compile-time tap offsets instead of from a packed panel ([`GemmPlan::define_direct`],
//!   driven tile by tile with [`Gemm::run_panels`]).
//! - Row kernels ([`DirectB::reps`], [`GemmPlan::with_packed_rows`]): the same tile looped
//!   over several 8-column tiles side by side in one call (`A` and the per-row operands stay,
//!   `B`, `C` and the residual move on), for short reductions where the call costs count.
//! - [`WgradSpec`]: the weight-gradient tile, `C += A · B` over a block of output pixels with
//!   `A` rows read in place from the padded planes (a nested row/pixel loop) and `B` the packed
//!   transposed output gradient; `C` accumulates.

use super::entry::Kernel;
use super::jit::{emit, Extents, Finished, Jit, KernelId};
use crate::Result;
use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{self, BlockArg, InstBuilder};
use cranelift_frontend::FunctionBuilder;

/// Rows of the micro-tile (`A` panel width).
pub const MR: usize = 4;
/// Columns of the micro-tile (`B` panel width, two `f32x4`).
pub const NR: usize = 8;
/// Unroll factor of the `K` loop over a packed `B`. 8 rather than 4: the bare micro-kernel
/// went from 0.84 to 0.92 of peak at `K` = 576 and from 0.77 to 0.82 at `K` = 64, the 3x3
/// Winograd forward and backward data 9-10% faster (kernel bench, medians of four alternated
/// runs in a quiet hour); 16 was no better than 4.
const KU: usize = 8;
/// Reduction steps per loop iteration of a direct GEMM over several taps (whole planes of
/// taps per iteration, at least this many steps).
const KU_DIRECT: usize = 4;
/// Planes per loop iteration of a direct GEMM over one tap (a 1x1 convolution, a `B` row per
/// plane): the 1x1 256->64 backward data went from 19.3-19.6 to 17.0-17.5 ms with 64 (from
/// 4; 16: 17.6-17.8 ms), its forward on 32x32 planes 2-4% faster. More steps per iteration
/// did not help the multi-tap kernels (3x3 and 1x3 within 10% either way).
const KU_ONE_TAP: usize = 64;
/// Unroll factor of the weight-gradient tile's pixel loop (8 measured no better). A multiple
/// of 4: with lane broadcasts ([`Broadcast::lane_rows`]) each `A` row is loaded four pixels at
/// a time.
const KU_WGRAD: usize = 4;
const _: () = assert!(KU_WGRAD.is_multiple_of(4));

/// How a tile spreads its `A` values (one per row and reduction step) across `f32x4` lanes for
/// the `fma`s. Every variant feeds the same `fma`s with the same operands in the same order,
/// so all give the same results bit for bit; they differ in the instructions that feed them,
/// and which is fastest depends on the machine's load and shuffle ports ([`Broadcast::host`]
/// times them).
///
/// Per reduction step of a `4 x 8` tile (eight `fma`s, two `B` vectors loaded):
/// - [`Folded`](Broadcast::Folded): a `vbroadcastss` from memory for every `fma` (one per
///   `fma`, as Cranelift's `vfmadd213ps` overwrites its multiplicand): ten loads. Suits cores
///   that issue three vector loads a cycle (Intel's Golden Cove: the bare micro-kernel at 0.92
///   of the FMA peak at `K` = 576).
/// - [`Lanes`](Broadcast::Lanes): the step's four `A` values as one vector load (a packed `A`
///   panel holds them side by side; a weight-gradient tile loads four pixels of each row at
///   once), each row's lane broadcast in registers (`pshufd`) and shared by the row's two
///   `fma`s: three loads and four shuffles.
/// - [`Mixed`](Broadcast::Mixed): rows 0 and 1 as `Lanes`, rows 2 and 3 as `Folded`: seven
///   loads and two shuffles. On AMD Zen 3 (two vector loads a cycle, shuffles sharing a pipe
///   with the `fma`s) neither extreme keeps the two FMA pipes busy: the bare micro-kernel ran
///   at 38.2 GFLOP/s folded, 41.7 lanes, 46.0 mixed (45.1 with three lane rows, 42.8 with one;
///   one run, 200 alternated trials each, peak 51-55).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broadcast {
    /// A `vbroadcastss` from memory per `fma`.
    Folded,
    /// Rows 0-1 from lanes of the step's `A` vector, rows 2-3 folded.
    Mixed,
    /// Every row from a lane of the step's `A` vector.
    Lanes,
}

/// [`Broadcast::host`]'s choice and how it was made, or what was wrong with the variable.
type HostChoice = std::result::Result<HostPick, String>;

impl Broadcast {
    /// Every variant, in the order [`Broadcast::host`] prefers them on a tie.
    pub const ALL: [Broadcast; 3] = [Broadcast::Folded, Broadcast::Mixed, Broadcast::Lanes];

    /// Rows of a tile (of [`MR`]) whose `A` value comes from a lane broadcast; the rest fold
    /// theirs into loads.
    pub fn lane_rows(self) -> usize {
        match self {
            Broadcast::Folded => 0,
            Broadcast::Mixed => 2,
            Broadcast::Lanes => MR,
        }
    }

    /// The name `CNNC_BROADCAST` takes.
    pub fn name(self) -> &'static str {
        match self {
            Broadcast::Folded => "folded",
            Broadcast::Mixed => "mixed",
            Broadcast::Lanes => "lanes",
        }
    }

    /// The variant for this process's kernels: `CNNC_BROADCAST=folded`, `mixed` or `lanes` if
    /// set, otherwise the fastest on this machine, timed once per process on the bare `4 x 8`
    /// micro-kernel at `K` = 256 (rounds of one trial each, thread CPU time, until seven rounds
    /// have run at 0.8 of the FMA peak loop or 50 ms have passed: 3-60 ms; `Folded` unless
    /// another is at least 3% faster). Errors on any other value of the variable.
    pub fn host() -> std::result::Result<Broadcast, String> {
        Self::host_choice().as_ref().map(|c| c.pick).map_err(String::clone)
    }

    /// One line saying which variant [`Broadcast::host`] chose and why (for benchmark headers).
    pub fn host_summary() -> String {
        match Self::host_choice() {
            Ok(HostPick { pick, timed: Some(t) }) => {
                let rates: Vec<String> = Self::ALL.iter().zip(t.gflops).map(|(v, g)| format!("{} {g:.1}", v.name())).collect();
                format!(
                    "GEMM broadcast: {} (micro-kernel timed here: {} GFLOP/s, best of {} rounds, {} of them quiet; FMA peak loop {:.1})",
                    pick.name(),
                    rates.join(", "),
                    t.rounds,
                    t.quiet,
                    t.peak
                )
            }
            Ok(HostPick { pick, timed: None }) => format!("GEMM broadcast: {} (set by CNNC_BROADCAST)", pick.name()),
            Err(e) => format!("GEMM broadcast: {e}"),
        }
    }

    /// The process-wide choice and the timings behind it (`None` when set by the variable).
    fn host_choice() -> &'static HostChoice {
        static HOST: std::sync::OnceLock<HostChoice> = std::sync::OnceLock::new();
        HOST.get_or_init(Self::choose)
    }

    fn choose() -> HostChoice {
        match std::env::var("CNNC_BROADCAST") {
            Ok(v) => match Self::ALL.into_iter().find(|b| b.name() == v) {
                Some(pick) => Ok(HostPick { pick, timed: None }),
                None => Err(format!("CNNC_BROADCAST={v:?}: expected \"folded\", \"mixed\" or \"lanes\"")),
            },
            Err(_) => Self::calibrate().map_err(|e| format!("timing the GEMM broadcast variants: {e}")),
        }
    }

    /// Time every variant on the bare micro-kernel (see [`Broadcast::host`]) and pick one.
    ///
    /// Rounds of one trial of each variant (thread CPU time, the order rotated every round),
    /// each variant's best trial kept, until [`CALIBRATION_ROUNDS`] rounds have been quiet
    /// (the round's fastest trial at [`QUIET_FRACTION`] of the FMA peak loop, timed first) or
    /// [`CALIBRATION_BUDGET_S`] of CPU time has passed. The wait is for quiet moments:
    /// on a shared machine the core can go through spells in which code heavy in loads runs
    /// at two thirds of its speed while the FMA peak loop does not slow at all. In such a
    /// spell the variants run close together and the order among them differs from the
    /// quiet one (measured on the AMD EPYC this project was tuned on, in 0.4 ms rounds
    /// over 3 s: 55-65% of the rounds slow, spells of up to 1,000 rounds; slow folded 28-31,
    /// mixed 29-32, lanes 29-33 GFLOP/s against quiet 36-37, 45.6-45.8 and 40-41; the FMA peak
    /// loop 49.7 against 50.2), so 7 rounds regardless of quiet picked `folded` or `lanes` in
    /// 4 processes of 60; waiting for quiet rounds, 157 of 160 picked `mixed`, and the other
    /// three had no quiet round in the budget (their [`Broadcast::host_summary`] says so).
    fn calibrate() -> Result<HostPick> {
        let mut tiles = Self::ALL
            .iter()
            .map(|&bc| BareTiles::compile(Jit::with_broadcast("GEMM broadcast timing", bc)?, MR, 256, 16))
            .collect::<Result<Vec<_>>>()?;
        let peak = super::peak::PeakKernel::compile()?.measure_gflops(4);
        let gflop = 8.0 * tiles[0].flops() / 1e9;
        let start = super::peak::thread_time();
        let mut best = [f64::MAX; 3];
        let (mut rounds, mut quiet) = (0, 0);
        while quiet < CALIBRATION_ROUNDS && super::peak::thread_time() - start < CALIBRATION_BUDGET_S {
            let mut fastest = f64::MAX;
            for k in 0..tiles.len() {
                let i = (rounds + k) % tiles.len();
                let t = &mut tiles[i];
                let secs = super::peak::best_of(1, || (0..8).for_each(|_| t.run()));
                best[i] = best[i].min(secs);
                fastest = fastest.min(secs);
            }
            rounds += 1;
            quiet += usize::from(gflop / fastest >= QUIET_FRACTION * peak);
        }
        // The fastest, but the one before it in `ALL` unless 3% slower (noise keeps `Folded`).
        let mut pick = 0;
        for i in 1..best.len() {
            if best[i] <= 0.97 * best[pick] {
                pick = i;
            }
        }
        Ok(HostPick { pick: Self::ALL[pick], timed: Some(Timed { gflops: best.map(|t| gflop / t), rounds, quiet, peak }) })
    }
}

/// Quiet rounds [`Broadcast::calibrate`] waits for (each round ~0.4 ms on the AMD EPYC).
const CALIBRATION_ROUNDS: usize = 7;
/// The fraction of the FMA peak loop at which [`Broadcast::calibrate`] takes the core to be
/// quiet: the fastest variant ran at 0.91 of it in quiet spells on the AMD EPYC, 0.66 in
/// slow ones (the Intel Sapphire Rapids ran `folded` at 0.92 at `K` = 576).
const QUIET_FRACTION: f64 = 0.8;
/// CPU time after which [`Broadcast::calibrate`] stops waiting for a quiet moment and picks
/// from what it has (most slow spells measured there were shorter than 20 ms).
const CALIBRATION_BUDGET_S: f64 = 0.05;

/// [`Broadcast::host`]'s choice and how it was made.
#[derive(Clone, Copy, Debug)]
struct HostPick {
    pick: Broadcast,
    /// The timings behind it; `None` where `CNNC_BROADCAST` chose.
    timed: Option<Timed>,
}

/// What [`Broadcast::calibrate`] measured.
#[derive(Clone, Copy, Debug)]
struct Timed {
    /// GFLOP/s of each variant in [`Broadcast::ALL`]'s order (its best trial).
    gflops: [f64; 3],
    /// Rounds timed.
    rounds: usize,
    /// The FMA peak loop's GFLOP/s ([`PeakKernel`](super::peak::PeakKernel)).
    peak: f64,
    /// Rounds in which the fastest trial reached [`QUIET_FRACTION`] of `peak`.
    quiet: usize,
}

/// The bare micro-kernel for timing ([`Broadcast::host`], the kernel report): the `m x 8`
/// tiles of one packed `A` (`m x k`) and one `B` panel, run over `panels` 8-column panels of
/// `C` with no packing and no epilogue, what a GEMM's tiles do on their own.
pub struct BareTiles {
    gemm: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    m: usize,
    k: usize,
    panels: usize,
}

impl BareTiles {
    /// Compile the tiles in `jit` (whose [`Broadcast`] they use) and fill the operands.
    pub fn compile(mut jit: Jit, m: usize, k: usize, panels: usize) -> Result<BareTiles> {
        let plan = GemmPlan::define(&mut jit, "bare_tiles", GemmSpec::plain(Some(m), NR * panels, k, NR * panels, false))?;
        let gemm = plan.resolve(&jit.finish()?);
        let mut a = Vec::new();
        let vals: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect();
        pack_a(&mut a, &vals, m, k, k, 1);
        let b = (0..k * NR).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        Ok(BareTiles { gemm, a, b, c: vec![0.0; m * NR * panels], m, k, panels })
    }

    /// One pass over the panels.
    pub fn run(&mut self) {
        for j in 0..self.panels {
            self.gemm.run_panel(&mut self.c, j * NR, self.m, j * NR, &self.a, &self.b, &EpiArgs::default());
        }
    }

    /// FLOPs of one [`run`](Self::run).
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * NR * self.panels) as f64
    }
}

/// An activation that can be fused into a GEMM epilogue (the ones without `exp`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum FusedAct {
    /// Identity.
    #[default]
    None,
    /// `max(t, 0)`.
    Relu,
    /// `t` if positive else `slope * t` (computed as `max(t,0) + slope*min(t,0)`).
    LeakyRelu(f32),
}

impl FusedAct {
    /// The fusable form of an IR activation, if it has one (`elu`, `sigmoid`, `tanh` do not).
    pub fn from_ir(a: &crate::ir::Activation) -> Option<FusedAct> {
        match *a {
            crate::ir::Activation::Relu => Some(FusedAct::Relu),
            crate::ir::Activation::LeakyRelu { slope } => Some(FusedAct::LeakyRelu(slope)),
            _ => None,
        }
    }

    /// Apply to one scalar (the reference the generated code must match).
    pub fn apply(self, t: f32) -> f32 {
        match self {
            FusedAct::None => t,
            FusedAct::Relu => t.max(0.0),
            FusedAct::LeakyRelu(s) => t.max(0.0) + s * t.min(0.0),
        }
    }
}

/// Where a GEMM's bias vector is indexed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BiasKind {
    /// No bias.
    #[default]
    None,
    /// `bias[i]` for row `i` (convolution output channels).
    Row,
    /// `bias[j]` for column `j` (dense output features).
    Col,
}

/// Everything a GEMM's tile kernels are specialised on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmSpec {
    /// Rows `M`; `None` when it varies between calls (a batch dimension): then every `mr` in
    /// `1..=4` is compiled.
    pub m: Option<usize>,
    /// Columns `N`.
    pub n: usize,
    /// Reduction length `K`.
    pub k: usize,
    /// Leading dimension of `C`.
    pub ldc: usize,
    /// Leading dimension of the residual (ignored without one).
    pub ldr: usize,
    /// Bias indexing.
    pub bias: BiasKind,
    /// Per-row `scale`, `shift` (folded batch norm).
    pub affine: bool,
    /// Add a residual tensor before the activation.
    pub residual: bool,
    /// Fused activation.
    pub act: FusedAct,
    /// `C += epi(acc)` instead of `C = epi(acc)`.
    pub accumulate: bool,
}

impl GemmSpec {
    /// A plain `C = A·B` (or `C += A·B` when `accumulate`) with leading dimension `ldc`.
    pub fn plain(m: Option<usize>, n: usize, k: usize, ldc: usize, accumulate: bool) -> GemmSpec {
        GemmSpec {
            m,
            n,
            k,
            ldc,
            ldr: 0,
            bias: BiasKind::None,
            affine: false,
            residual: false,
            act: FusedAct::None,
            accumulate,
        }
    }
}

/// The tile kernels of one GEMM, before the module is finalized.
#[derive(Debug, Clone)]
pub struct GemmPlan {
    spec: GemmSpec,
    ids: Vec<((usize, usize), KernelId)>,
    /// Row kernels (`DirectB::reps` tiles per call): `(mr, id)`, and `reps`.
    rows: Vec<(usize, KernelId)>,
    reps: usize,
}

/// How a *direct* tile reads its `B` operand in place, from zero-padded input planes, instead
/// of from a packed panel (implicit im2col for stride-1 convolutions: no packing at all).
///
/// Reduction index `k = c * taps.len() + t` reads, for the tile's 8 columns, the 8 consecutive
/// elements at `b + c * plane + taps[t]`: the `B` pointer handed to a tile is the padded input
/// at the tile's first output pixel, `taps[t]` the offset of kernel tap `t` (`ky*dh*PW + kx*dw`
/// for a padded row width `PW`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectB {
    /// Input channels (planes) of the reduction.
    pub chans: usize,
    /// Elements from one plane to the next.
    pub plane: usize,
    /// Element offset of every kernel tap within a plane, in reduction order.
    pub taps: Vec<usize>,
    /// Consecutive full 8-column tiles one call of the extra "row" kernel computes (`B`, `C`
    /// and the residual advance 8 columns per tile; bias must be per row); 1: none compiled.
    /// Saves the per-call overhead where the reduction is short.
    pub reps: usize,
}

impl DirectB {
    /// Elements a tile may read behind its `B` pointer.
    pub fn extent(&self) -> usize {
        (self.chans - 1) * self.plane + self.taps.iter().copied().max().unwrap_or(0) + NR
    }
}

/// A compiled GEMM: its tile kernels and the panel driver.
#[derive(Debug, Clone)]
pub struct Gemm {
    spec: GemmSpec,
    /// `tiles[mr - 1][nr - 1]`, present for the shapes this GEMM needs.
    tiles: Vec<Option<Kernel>>,
    /// `rows[mr - 1]`: the `mr x (8*reps)` row kernels of a direct GEMM, if any.
    rows: Vec<Option<Kernel>>,
    reps: usize,
}

/// Per-row / per-column epilogue operands of one GEMM call, indexed from the GEMM's row 0 /
/// column 0 (a driver passes sub-slices for groups).
#[derive(Clone, Copy, Debug, Default)]
pub struct EpiArgs<'a> {
    /// Bias (`M` or `N` long as the spec says).
    pub bias: &'a [f32],
    /// Per-row scale.
    pub scale: &'a [f32],
    /// Per-row shift.
    pub shift: &'a [f32],
    /// Residual, `C`-shaped with leading dimension `ldr`, from its element `(0, 0)`.
    pub residual: &'a [f32],
}

/// Define the `mr x (8*reps)` row kernels for each of `mrs` ([`DirectB::reps`],
/// [`GemmPlan::with_packed_rows`]): `reps` full 8-column tiles per call, `C`, `B` and the
/// residual moving on 8 columns per tile; `B` read in place as `direct` says, else as `reps`
/// packed panels `k*8` apart.
fn define_rows(jit: &mut Jit, name: &str, spec: &GemmSpec, mrs: &[usize], direct: Option<&DirectB>, reps: usize) -> Result<Vec<(usize, KernelId)>> {
    let more = NR * (reps - 1);
    let bc = jit.broadcast();
    mrs.iter()
        .map(|&mr| {
            let mut ext = tile_extents(spec, mr, NR);
            ext[0] += more;
            ext[2] = direct.map_or(NR * spec.k * reps, |d| d.extent() + more);
            if spec.residual {
                ext[6] += more;
            }
            let id = jit.define(&format!("{name}_row{mr}x{}_k{}", NR * reps, spec.k), ext, |b, args| gen_tile(b, args, spec, (mr, NR), direct, reps, bc))?;
            Ok((mr, id))
        })
        .collect()
}

impl GemmPlan {
    /// Define the tile kernels `spec` needs in `jit`.
    pub fn define(jit: &mut Jit, name: &str, spec: GemmSpec) -> Result<GemmPlan> {
        Self::define_impl(jit, name, spec, None)
    }

    /// Define the tile kernels of a GEMM whose `B` is read in place as `direct` says
    /// (`spec.k` must be `direct.chans * direct.taps.len()`; `spec.n` is the output row width
    /// the driver splits into 8-column tiles, see [`Gemm::run_cols`]).
    pub fn define_direct(jit: &mut Jit, name: &str, spec: GemmSpec, direct: &DirectB) -> Result<GemmPlan> {
        if spec.k != direct.chans * direct.taps.len() || direct.chans == 0 {
            return Err(crate::Error::Codegen {
                layer: jit.layer().to_string(),
                message: format!("direct GEMM {name}: K = {} but {} planes x {} taps", spec.k, direct.chans, direct.taps.len()),
            });
        }
        Self::define_impl(jit, name, spec, Some(direct))
    }

    fn define_impl(jit: &mut Jit, name: &str, spec: GemmSpec, direct: Option<&DirectB>) -> Result<GemmPlan> {
        let mrs: Vec<usize> = match spec.m {
            None => (1..=MR).collect(),
            Some(m) => {
                let mut v = Vec::new();
                if m >= MR {
                    v.push(MR);
                }
                if !m.is_multiple_of(MR) {
                    v.push(m % MR);
                }
                v
            }
        };
        let mut nrs = Vec::new();
        if spec.n >= NR {
            nrs.push(NR);
        }
        if !spec.n.is_multiple_of(NR) {
            nrs.push(spec.n % NR);
        }
        let mut ids = Vec::new();
        let bc = jit.broadcast();
        for &mr in &mrs {
            for &nr in &nrs {
                let mut ext = tile_extents(&spec, mr, nr);
                if let Some(d) = direct {
                    ext[2] = d.extent();
                }
                let id = jit.define(&format!("{name}_tile{mr}x{nr}_k{}", spec.k), ext, |b, args| {
                    gen_tile(b, args, &spec, (mr, nr), direct, 1, bc)
                })?;
                ids.push(((mr, nr), id));
            }
        }
        let reps = direct.map_or(1, |d| d.reps);
        let rows = match direct.filter(|d| d.reps > 1 && spec.bias != BiasKind::Col && spec.n >= NR * d.reps) {
            Some(d) => define_rows(jit, name, &spec, &mrs, Some(d), d.reps)?,
            None => Vec::new(),
        };
        Ok(GemmPlan { spec, ids, rows, reps })
    }

    /// Add row kernels over packed `B`: `reps` consecutive full 8-column tiles per call, the
    /// `B` panels `k*8` apart (one block packed by [`pack_b_block`]); row bias only. Run with
    /// [`Gemm::run_row_panels`]. No-op for `reps <= 1`, a direct GEMM, or fewer columns.
    pub fn with_packed_rows(mut self, jit: &mut Jit, name: &str, reps: usize) -> Result<GemmPlan> {
        let spec = self.spec;
        if reps <= 1 || !self.rows.is_empty() || spec.bias == BiasKind::Col || spec.n < NR * reps {
            return Ok(self);
        }
        let mrs: Vec<usize> = self.ids.iter().filter(|((_, nr), _)| *nr == NR).map(|((mr, _), _)| *mr).collect();
        self.rows = define_rows(jit, name, &spec, &mrs, None, reps)?;
        self.reps = reps;
        Ok(self)
    }

    /// Resolve against the finalized module.
    pub fn resolve(&self, fin: &Finished) -> Gemm {
        let mut rows = vec![None; MR];
        for &(mr, id) in &self.rows {
            rows[mr - 1] = Some(fin.kernels[id.0].clone());
        }
        Gemm { spec: self.spec, tiles: resolve_tiles(&self.ids, fin), rows, reps: self.reps }
    }
}

fn tile_extents(s: &GemmSpec, mr: usize, nr: usize) -> Extents {
    let c = (mr - 1) * s.ldc + nr;
    let bias = match s.bias {
        BiasKind::None => 0,
        BiasKind::Row => mr,
        BiasKind::Col => nr,
    };
    let aff = if s.affine { mr } else { 0 };
    let res = if s.residual { (mr - 1) * s.ldr + nr } else { 0 };
    [c, MR * s.k, NR * s.k, bias, aff, aff, res]
}

/// `acc += splat(p[off]) * bv`, the scalar loaded once per `fma` so that Cranelift folds it
/// into a `vbroadcastss` from memory whose register `vfmadd213ps` then consumes: one load and
/// one FMA, where a splat shared by two FMAs costs a scalar load, a register broadcast (the
/// shuffle port) and a register copy. The fold needs the loaded value used once "directly or
/// indirectly", see the loop shape in [`gen_tile`].
fn fma_bcast(b: &mut FunctionBuilder, acc: cranelift_frontend::Variable, p: ir::Value, off: i64, bv: ir::Value) {
    let x = emit::ld(b, p, off);
    let xs = b.ins().splat(F32X4, x);
    fma_acc(b, acc, xs, bv);
}

/// `acc += xs * bv`, operands in the order every variant uses (so that they agree bit for bit).
fn fma_acc(b: &mut FunctionBuilder, acc: cranelift_frontend::Variable, xs: ir::Value, bv: ir::Value) {
    let old = b.use_var(acc);
    let new = b.ins().fma(xs, bv, old);
    b.def_var(acc, new);
}

/// Emit one `mr x nr` tile: `args = [c, a, b, bias, scale, shift, residual]`; `B` packed, or
/// read in place from padded planes when `direct` is given.
fn gen_tile(b: &mut FunctionBuilder, args: &[ir::Value; 7], s: &GemmSpec, (mr, nr): (usize, usize), direct: Option<&DirectB>, reps: usize, bc: Broadcast) {
    let [c, a, bp, bias, scale, shift, res] = *args;
    // `reps > 1`: loop over `reps` tiles side by side, `C`, `B` and the residual advancing 8
    // columns per tile (`A` and the per-row operands stay).
    let ptr_ty = b.func.dfg.value_type(a);
    let (vc, vb, vr, vn) = (b.declare_var(ptr_ty), b.declare_var(ptr_ty), b.declare_var(ptr_ty), b.declare_var(ptr_ty));
    let outer = (reps > 1).then(|| {
        b.def_var(vc, c);
        b.def_var(vb, bp);
        b.def_var(vr, res);
        let n0 = b.ins().iconst(ptr_ty, reps as i64);
        b.def_var(vn, n0);
        let head = b.create_block();
        b.ins().jump(head, &[]);
        b.switch_to_block(head);
        head
    });
    let (c, bp, res) = if outer.is_some() { (b.use_var(vc), b.use_var(vb), b.use_var(vr)) } else { (c, bp, res) };
    let zero = emit::f32x4c(b, 0.0);
    let acc: Vec<_> = (0..MR * 2)
        .map(|_| {
            let v = b.declare_var(F32X4);
            b.def_var(v, zero);
            v
        })
        .collect();
    // One K step reading A at element `aoff`, B at element `boff` from the current pointers
    // (rows past `mr` and a right half past `nr` are skipped: their results are never stored).
    // The first `bc.lane_rows()` rows take their `A` value from a lane of the step's `A`
    // vector (a packed panel's `K x 4` row, rows past `M` zero), broadcast in registers. The
    // other rows' broadcasts are folded into loads ([`fma_bcast`]), except, with
    // `Broadcast::Folded`, for a direct B spread over many planes, where folding all four rows
    // slowed the 1x1 256->64 forward by 4-9% on the Intel machine (its B loads each touch a
    // different page; kernel bench) while it made the 64-plane backward data 4% faster. With
    // `Mixed`, which folds only two rows, folding them there too was faster on the AMD
    // machine (kernel passes timed alternately in one process, two runs): the 1x1 forwards
    // over 128 planes 0.88-0.92 of the time, the backward data reading 96 planes 0.84-0.85,
    // the 1x1 256->64 1-2% slower.
    let fold = bc != Broadcast::Folded || direct.is_none_or(|d| d.chans <= 64);
    let halves = nr.div_ceil(4);
    let lane_rows = bc.lane_rows().min(mr);
    let step = |b: &mut FunctionBuilder, pa: ir::Value, pb: ir::Value, aoff: i64, boff: i64| {
        let bv: Vec<ir::Value> = (0..halves).map(|h| emit::ld4(b, pb, boff + 4 * h as i64)).collect();
        let av = (lane_rows > 0).then(|| emit::ld4(b, pa, aoff));
        for r in 0..mr {
            if let (Some(av), true) = (av, r < lane_rows) {
                let xs = emit::lane(b, av, r);
                for (h, &bv) in bv.iter().enumerate() {
                    fma_acc(b, acc[r * 2 + h], xs, bv);
                }
            } else if fold {
                for (h, &bv) in bv.iter().enumerate() {
                    fma_bcast(b, acc[r * 2 + h], pa, aoff + r as i64, bv);
                }
            } else {
                let x = emit::ld(b, pa, aoff + r as i64);
                let xs = b.ins().splat(F32X4, x);
                for (h, &bv) in bv.iter().enumerate() {
                    fma_acc(b, acc[r * 2 + h], xs, bv);
                }
            }
        }
    };
    // One loop iteration covers `per` reduction steps: `KU` packed ones, or `cu` whole planes
    // of a direct B (`cu` planes of `taps` steps: at least `KU_DIRECT` steps when taps are
    // few, `KU_ONE_TAP` planes of a single tap).
    // `boffs[u]` is step `u`'s B offset from the iteration's B pointer, `bstep` its advance.
    let (per, boffs, bstep): (usize, Vec<i64>, i64) = match direct {
        None => (KU, (0..KU).map(|u| (u * NR) as i64).collect(), (KU * NR) as i64),
        Some(d) => {
            let nt = d.taps.len();
            let cu = if nt == 1 { KU_ONE_TAP } else { KU_DIRECT.div_ceil(nt) }.min(d.chans).max(1);
            let offs = (0..cu).flat_map(|c| d.taps.iter().map(move |&t| (c * d.plane + t) as i64)).collect();
            (cu * nt, offs, (cu * d.plane) as i64)
        }
    };
    let iters = s.k / per;
    let rem = s.k % per;
    let (mut pa, mut pb) = (a, bp);
    if iters > 0 {
        // Tested at the top, so that each iteration's accumulators go to the loop head only:
        // Cranelift folds a load into its user only when the loaded value is used once
        // "directly or indirectly", and a loop-carried value handed to two successors (the head
        // and the exit) counts as used twice, which marks everything its `fma` chain depends
        // on, the broadcast loads included, as shared (a bottom-tested loop kept every
        // broadcast in a register: the shuffle port then halved the speed). The exit reads the
        // head's parameters. (An extra block between does not help: Cranelift removes a
        // parameter that always receives the same value.)
        let head = b.create_block();
        let body = b.create_block();
        let exit = b.create_block();
        let ptr_ty = b.func.dfg.value_type(a);
        let la = b.append_block_param(head, ptr_ty);
        let lb = b.append_block_param(head, ptr_ty);
        let a_end = emit::offset(b, a, (iters * per * MR) as i64);
        b.ins().jump(head, &[BlockArg::Value(a), BlockArg::Value(bp)]);
        b.switch_to_block(head);
        let more = b.ins().icmp(ir::condcodes::IntCC::NotEqual, la, a_end);
        b.ins().brif(more, body, &[], exit, &[]);
        b.switch_to_block(body);
        b.seal_block(body);
        for (u, &bo) in boffs.iter().enumerate() {
            step(b, la, lb, (u * MR) as i64, bo);
        }
        let na = emit::offset(b, la, (per * MR) as i64);
        let nb = emit::offset(b, lb, bstep);
        b.ins().jump(head, &[BlockArg::Value(na), BlockArg::Value(nb)]);
        b.seal_block(head);
        b.switch_to_block(exit);
        b.seal_block(exit);
        pa = la;
        pb = lb;
    }
    for (u, &bo) in boffs.iter().enumerate().take(rem) {
        step(b, pa, pb, (u * MR) as i64, bo);
    }

    // Epilogue and store.
    for r in 0..mr {
        let row_bias = (s.bias == BiasKind::Row).then(|| emit::ld(b, bias, r as i64));
        let (sc, sh) = if s.affine {
            (Some(emit::ld(b, scale, r as i64)), Some(emit::ld(b, shift, r as i64)))
        } else {
            (None, None)
        };
        for h in 0..2 {
            let lanes = nr.saturating_sub(4 * h).min(4);
            if lanes == 0 {
                continue;
            }
            let col0 = 4 * h;
            let coff = (r * s.ldc + col0) as i64;
            let roff = (r * s.ldr + col0) as i64;
            let accv = b.use_var(acc[r * 2 + h]);
            if lanes == 4 {
                let mut t = accv;
                if let Some(x) = row_bias {
                    let xs = b.ins().splat(F32X4, x);
                    t = b.ins().fadd(t, xs);
                }
                if s.bias == BiasKind::Col {
                    let x = emit::ld4(b, bias, col0 as i64);
                    t = b.ins().fadd(t, x);
                }
                if let (Some(sc), Some(sh)) = (sc, sh) {
                    let scv = b.ins().splat(F32X4, sc);
                    let shv = b.ins().splat(F32X4, sh);
                    t = b.ins().fma(t, scv, shv);
                }
                if s.residual {
                    let x = emit::ld4(b, res, roff);
                    t = b.ins().fadd(t, x);
                }
                t = act(b, t, s.act, F32X4);
                if s.accumulate {
                    let old = emit::ld4(b, c, coff);
                    t = b.ins().fadd(t, old);
                }
                emit::st(b, t, c, coff);
            } else {
                for l in 0..lanes {
                    let mut t = b.ins().extractlane(accv, l as u8);
                    if let Some(x) = row_bias {
                        t = b.ins().fadd(t, x);
                    }
                    if s.bias == BiasKind::Col {
                        let x = emit::ld(b, bias, (col0 + l) as i64);
                        t = b.ins().fadd(t, x);
                    }
                    if let (Some(sc), Some(sh)) = (sc, sh) {
                        t = b.ins().fma(t, sc, sh);
                    }
                    if s.residual {
                        let x = emit::ld(b, res, roff + l as i64);
                        t = b.ins().fadd(t, x);
                    }
                    t = act(b, t, s.act, F32);
                    if s.accumulate {
                        let old = emit::ld(b, c, coff + l as i64);
                        t = b.ins().fadd(t, old);
                    }
                    emit::st(b, t, c, coff + l as i64);
                }
            }
        }
    }
    if let Some(head) = outer {
        let n = b.use_var(vn);
        let n1 = b.ins().iadd_imm_s(n, -1);
        b.def_var(vn, n1);
        let nc = emit::offset(b, c, NR as i64);
        // The next tile's B: 8 columns on in the planes, or the next packed panel.
        let nb = emit::offset(b, bp, if direct.is_some() { NR as i64 } else { (s.k * NR) as i64 });
        let nres = emit::offset(b, res, NR as i64);
        b.def_var(vc, nc);
        b.def_var(vb, nb);
        b.def_var(vr, nres);
        let done = b.create_block();
        b.ins().brif(n1, head, &[], done, &[]);
        b.seal_block(head);
        b.switch_to_block(done);
        b.seal_block(done);
    }
    b.ins().return_(&[]);
}

/// Emit a fused activation on `t` of type `ty` (`F32` or `F32X4`).
pub(crate) fn act(b: &mut FunctionBuilder, t: ir::Value, a: FusedAct, ty: ir::Type) -> ir::Value {
    let konst = |b: &mut FunctionBuilder, x: f32| if ty == F32 { emit::f32c(b, x) } else { emit::f32x4c(b, x) };
    match a {
        FusedAct::None => t,
        FusedAct::Relu => {
            let z = konst(b, 0.0);
            b.ins().fmax(t, z)
        }
        FusedAct::LeakyRelu(slope) => {
            let z = konst(b, 0.0);
            let sl = konst(b, slope);
            let pos = b.ins().fmax(t, z);
            let neg = b.ins().fmin(t, z);
            b.ins().fma(neg, sl, pos)
        }
    }
}

/// Pack `A` (`m x k`, element `(i, k)` at `src[i*rs + k*cs]`) into `ceil(m/4)` panels of
/// `k x 4` in `dst` (resized; rows past `m` are zero).
pub fn pack_a(dst: &mut Vec<f32>, src: &[f32], m: usize, k: usize, rs: usize, cs: usize) {
    let panels = m.div_ceil(MR);
    dst.clear();
    dst.resize(panels * MR * k, 0.0);
    for p in 0..panels {
        let panel = &mut dst[p * MR * k..(p + 1) * MR * k];
        for r in 0..MR.min(m - p * MR) {
            let row = (p * MR + r) * rs;
            if cs == 1 {
                for (kk, &v) in src[row..row + k].iter().enumerate() {
                    panel[kk * MR + r] = v;
                }
            } else {
                for kk in 0..k {
                    panel[kk * MR + r] = src[row + kk * cs];
                }
            }
        }
    }
}

/// Pack columns `j0..j0+nr` (`nr <= 8`) of `B` (`k` rows, element `(k, j)` at
/// `src[k*rs + j*cs]`) into one `k x 8` panel `dst` (columns `nr..8` zero).
pub fn pack_b_panel(dst: &mut [f32], src: &[f32], k: usize, j0: usize, nr: usize, rs: usize, cs: usize) {
    let dst = &mut dst[..k * NR];
    if nr < NR {
        dst.fill(0.0);
    }
    if cs == 1 {
        if nr == NR {
            for (kk, d) in dst.chunks_exact_mut(NR).enumerate() {
                let s = kk * rs + j0;
                let d: &mut [f32; NR] = d.try_into().expect("8-wide row");
                *d = src[s..s + NR].try_into().expect("8-wide source");
            }
        } else {
            for kk in 0..k {
                let s = kk * rs + j0;
                dst[kk * NR..kk * NR + nr].copy_from_slice(&src[s..s + nr]);
            }
        }
    } else if rs == 1 {
        // Columns of B are contiguous: gather eight of them per packed row (past `nr`, the
        // first column again, then zeroed: no buffer of zeros to allocate).
        let cols: [&[f32]; NR] = std::array::from_fn(|t| {
            let c = j0 + if t < nr { t } else { 0 };
            &src[c * cs..c * cs + k]
        });
        transpose8_from(dst, &cols, k);
        if nr < NR {
            dst.chunks_exact_mut(NR).for_each(|row| row[nr..].fill(0.0));
        }
    } else {
        for kk in 0..k {
            for t in 0..nr {
                dst[kk * NR + t] = src[kk * rs + (j0 + t) * cs];
            }
        }
    }
}

impl Gemm {
    /// Number of tile kernels compiled for this GEMM.
    pub fn tile_count(&self) -> usize {
        self.tiles.iter().filter(|t| t.is_some()).count()
    }

    /// The spec this GEMM was compiled for.
    pub fn spec(&self) -> &GemmSpec {
        &self.spec
    }

    /// Compute the `m x nr` column block starting at column `j0` (`nr = min(8, N - j0)`):
    /// `C[i][j0 + t]` at `c[c_off + i*ldc + t]` for `i < m`, from packed `a` (all `ceil(m/4)`
    /// panels) and the packed `b` panel for those columns. `m` must equal the spec's `M` when
    /// that is static. Epilogue operands are indexed from row 0 / column 0 of the GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn run_panel(&self, c: &mut [f32], c_off: usize, m: usize, j0: usize, a: &[f32], b: &[f32], epi: &EpiArgs) {
        let nr = NR.min(self.spec.n - j0);
        self.run_cols(c, c_off, m, j0, nr, a, b, epi);
    }

    /// Like [`Self::run_panel`] with the tile width `nr` given (a direct GEMM's tiles split
    /// each output row, `nr = min(8, row width - column)`; a tile kernel of that width must be
    /// compiled). `j0` indexes the epilogue's column operands (bias, residual).
    #[allow(clippy::too_many_arguments)]
    pub fn run_cols(&self, c: &mut [f32], c_off: usize, m: usize, j0: usize, nr: usize, a: &[f32], b: &[f32], epi: &EpiArgs) {
        self.run_panels(c, c_off, m, 0..m.div_ceil(MR), j0, nr, a, b, epi);
    }

    /// Like [`Self::run_cols`] for the row panels `panels` (of `ceil(m/4)`) only.
    #[allow(clippy::too_many_arguments)]
    pub fn run_panels(
        &self,
        c: &mut [f32],
        c_off: usize,
        m: usize,
        panels: std::ops::Range<usize>,
        j0: usize,
        nr: usize,
        a: &[f32],
        b: &[f32],
        epi: &EpiArgs,
    ) {
        let s = &self.spec;
        debug_assert!(s.m.is_none_or(|sm| sm == m));
        let k = s.k;
        for ip in panels {
            let i0 = ip * MR;
            let mr = MR.min(m - i0);
            let kern = self.tiles[(mr - 1) * NR + (nr - 1)].as_ref().expect("GEMM tile variant compiled");
            let bias: &[f32] = match s.bias {
                BiasKind::None => &[],
                BiasKind::Row => &epi.bias[i0..],
                BiasKind::Col => &epi.bias[j0..],
            };
            let (sc, sh): (&[f32], &[f32]) = if s.affine { (&epi.scale[i0..], &epi.shift[i0..]) } else { (&[], &[]) };
            let res: &[f32] = if s.residual { &epi.residual[i0 * s.ldr + j0..] } else { &[] };
            kern.call(&mut c[c_off + i0 * s.ldc..], [&a[ip * MR * k..], b, bias, sc, sh, res]);
        }
    }

    /// Tiles per call of this direct GEMM's row kernels (1: none).
    pub fn row_reps(&self) -> usize {
        if self.rows.iter().any(Option::is_some) {
            self.reps
        } else {
            1
        }
    }

    /// Like [`Self::run_panels`] for `row_reps()` full tiles side by side, columns
    /// `j0..j0 + 8*row_reps()`, in one call per row panel (`b` at the first tile's `B`: in the
    /// planes of a direct GEMM, or the first of `row_reps()` consecutive packed panels).
    #[allow(clippy::too_many_arguments)]
    pub fn run_row_panels(&self, c: &mut [f32], c_off: usize, m: usize, panels: std::ops::Range<usize>, j0: usize, a: &[f32], b: &[f32], epi: &EpiArgs) {
        let s = &self.spec;
        let k = s.k;
        for ip in panels {
            let i0 = ip * MR;
            let mr = MR.min(m - i0);
            let kern = self.rows[mr - 1].as_ref().expect("GEMM row kernel compiled");
            let bias: &[f32] = if s.bias == BiasKind::Row { &epi.bias[i0..] } else { &[] };
            let (sc, sh): (&[f32], &[f32]) = if s.affine { (&epi.scale[i0..], &epi.shift[i0..]) } else { (&[], &[]) };
            let res: &[f32] = if s.residual { &epi.residual[i0 * s.ldr + j0..] } else { &[] };
            kern.call(&mut c[c_off + i0 * s.ldc..], [&a[ip * MR * k..], b, bias, sc, sh, res]);
        }
    }

    /// A whole GEMM with `B` given as a strided matrix (element `(k, j)` at
    /// `b_src[k*rs + j*cs]`): packs each panel into `scratch` and runs it. `a` is packed.
    #[allow(clippy::too_many_arguments)]
    pub fn run_strided_b(
        &self,
        c: &mut [f32],
        c_off: usize,
        m: usize,
        a: &[f32],
        b_src: &[f32],
        rs: usize,
        cs: usize,
        epi: &EpiArgs,
        scratch: &mut Vec<f32>,
    ) {
        let s = &self.spec;
        scratch.resize(s.k * NR, 0.0);
        for j0 in (0..s.n).step_by(NR) {
            let nr = NR.min(s.n - j0);
            pack_b_panel(scratch, b_src, s.k, j0, nr, rs, cs);
            self.run_panel(c, c_off + j0, m, j0, a, scratch, epi);
        }
    }
}

/// Rows per chunk of [`pack_b_block`]. Packing a 1x1 layer's 256 x 256 block from source rows in
/// L2 took 8.5-9 µs in chunks of 32 rows against 13-19 µs panel pair by panel pair over all
/// rows (a standalone loop, several runs; 8 rows: 14-17 µs, 64 rows: 10 µs).
const PACK_ROWS: usize = 32;

/// Pack `ceil(cols/8)` consecutive B panels at once from a row-major `B` (element `(k, j)` at
/// `src[k*rs + j]`), columns `j0..j0+cols`: panel `t` at `dst[t*k*8..]`. Each source value is
/// read once, the rows in chunks of `PACK_ROWS` (32) that stay in L1 while every panel takes its
/// columns (what makes this faster than panel by panel over all rows on large tensors).
pub fn pack_b_block(dst: &mut [f32], src: &[f32], k: usize, j0: usize, cols: usize, rs: usize) {
    let np = cols.div_ceil(NR);
    let full = cols / NR;
    if full < np {
        dst[full * k * NR..np * k * NR].fill(0.0);
    }
    // Chunks of `PACK_ROWS` rows, each chunk panel by panel: each panel's share of the chunk
    // is written sequentially (panels are `k*32` bytes apart, which for a power-of-two `k`
    // puts every panel's row in the same L1 set), and the chunk's source rows stay in L1
    // while its panels take their columns.
    for k0 in (0..k).step_by(PACK_ROWS) {
        let k1 = k.min(k0 + PACK_ROWS);
        for t in 0..full {
            let d = &mut dst[(t * k + k0) * NR..(t * k + k1) * NR];
            for (kk, d) in (k0..k1).zip(d.chunks_exact_mut(NR)) {
                let s = kk * rs + j0 + t * NR;
                let d: &mut [f32; NR] = d.try_into().expect("8-wide row");
                *d = src[s..s + NR].try_into().expect("8-wide source");
            }
        }
    }
    if full < np {
        let w = cols - full * NR;
        for kk in 0..k {
            let s = kk * rs + j0 + full * NR;
            let o = (full * k + kk) * NR;
            dst[o..o + w].copy_from_slice(&src[s..s + w]);
        }
    }
}

/// `dst[q*8 + t] = rows[t*k + q]` for `q < k`, `t < 8`: transpose eight rows of length `k`
/// (stored back to back in `rows`) into a `k x 8` panel.
pub fn transpose8(dst: &mut [f32], rows: &[f32], k: usize) {
    let cols: [&[f32]; NR] = std::array::from_fn(|t| &rows[t * k..(t + 1) * k]);
    transpose8_from(dst, &cols, k);
}

fn transpose8_from(dst: &mut [f32], cols: &[&[f32]; NR], k: usize) {
    let c: [&[f32]; NR] = std::array::from_fn(|t| &cols[t][..k]);
    for (q, d) in dst[..k * NR].chunks_exact_mut(NR).enumerate() {
        let d: &mut [f32; NR] = d.try_into().expect("8-wide row");
        *d = [c[0][q], c[1][q], c[2][q], c[3][q], c[4][q], c[5][q], c[6][q], c[7][q]];
    }
}

/// Shape of a weight-gradient tile kernel ([`WgradPlan`]): `C[mr x nr] += Σ_k A[r][k] · B[k][t]`
/// where the reduction runs over a block of output pixels, `rows` output rows of `width`
/// pixels, and
/// - `A[r][k]` is read in place from padded input planes: row `r` at `a + row_off[r]`, pixel
///   `(y, x)` of the block at `y*pw + x`. Rows are 4 input channels at one kernel tap
///   (`row_off[r] = r*plane`, the caller points `a` at the block's first pixel shifted by the
///   tap) or, for layers with fewer than 4 input channels, 4 taps of one channel
///   (`row_off[r]` = the taps' offsets);
/// - `B` is packed like a GEMM B panel, `b[k*8 + t]` (the output gradient of 8 channels,
///   transposed), `k = y*width + x`;
/// - `C` (the transposed weight gradient, `[tap][ci][co]`) has leading dimension `ldc`.
///
/// No im2col and no transposition per tap: the transposed output gradient is packed once per
/// pixel block and reused by every tap and input channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgradSpec {
    /// Output rows per block.
    pub rows: usize,
    /// Pixels per row of the block.
    pub width: usize,
    /// Padded row width of the input planes.
    pub pw: usize,
    /// Element offset of each `A` row from the `A` pointer.
    pub row_off: [usize; MR],
    /// Leading dimension of `C`.
    pub ldc: usize,
}

impl WgradSpec {
    fn extents(&self, mr: usize, nr: usize) -> Extents {
        let a = self.row_off[..mr].iter().copied().max().unwrap_or(0) + (self.rows - 1) * self.pw + self.width;
        [(mr - 1) * self.ldc + nr, a, self.rows * self.width * NR, 0, 0, 0, 0]
    }
}

/// The weight-gradient tile kernels of one block shape, before finalization.
#[derive(Debug, Clone)]
pub struct WgradPlan {
    spec: WgradSpec,
    ids: Vec<((usize, usize), KernelId)>,
}

/// Compiled weight-gradient tile kernels ([`WgradSpec`]).
#[derive(Debug, Clone)]
pub struct Wgrad {
    spec: WgradSpec,
    tiles: Vec<Option<Kernel>>,
}

/// The finished kernels of `mr x nr` tile variants, indexed `(mr - 1) * NR + (nr - 1)`.
fn resolve_tiles(ids: &[((usize, usize), KernelId)], fin: &Finished) -> Vec<Option<Kernel>> {
    let mut tiles = vec![None; MR * NR];
    for &((mr, nr), id) in ids {
        tiles[(mr - 1) * NR + (nr - 1)] = Some(fin.kernels[id.0].clone());
    }
    tiles
}

impl WgradPlan {
    /// Define the `mr x nr` variants (`mrs` in `1..=4`, `nrs` in `1..=8`) of `spec`.
    pub fn define(jit: &mut Jit, name: &str, spec: WgradSpec, mrs: &[usize], nrs: &[usize]) -> Result<WgradPlan> {
        let mut ids = Vec::new();
        let bc = jit.broadcast();
        for &mr in mrs {
            for &nr in nrs {
                let id = jit.define(&format!("{name}_{mr}x{nr}_{}x{}", spec.rows, spec.width), spec.extents(mr, nr), |b, args| {
                    gen_wgrad_tile(b, args, &spec, (mr, nr), bc)
                })?;
                ids.push(((mr, nr), id));
            }
        }
        Ok(WgradPlan { spec, ids })
    }

    /// Resolve against the finalized module.
    pub fn resolve(&self, fin: &Finished) -> Wgrad {
        Wgrad { spec: self.spec, tiles: resolve_tiles(&self.ids, fin) }
    }
}

impl Wgrad {
    /// The block shape.
    pub fn spec(&self) -> &WgradSpec {
        &self.spec
    }

    /// Number of tile kernels.
    pub fn tile_count(&self) -> usize {
        self.tiles.iter().filter(|t| t.is_some()).count()
    }

    /// `C[r][t] += Σ_k A[r][k] · b[k*8 + t]` for `r < mr`, `t < nr` (see [`WgradSpec`]).
    pub fn run(&self, c: &mut [f32], mr: usize, nr: usize, a: &[f32], b: &[f32]) {
        let kern = self.tiles[(mr - 1) * NR + (nr - 1)].as_ref().expect("weight-gradient tile variant compiled");
        kern.call(c, [a, b, &[], &[], &[], &[]]);
    }
}

fn gen_wgrad_tile(b: &mut FunctionBuilder, args: &[ir::Value; 7], s: &WgradSpec, (mr, nr): (usize, usize), bc: Broadcast) {
    use cranelift_codegen::ir::condcodes::IntCC;
    let [c, a, bp, ..] = *args;
    let ptr_ty = b.func.dfg.value_type(a);
    let zero = emit::f32x4c(b, 0.0);
    let acc: Vec<_> = (0..mr * 2)
        .map(|_| {
            let v = b.declare_var(F32X4);
            b.def_var(v, zero);
            v
        })
        .collect();
    let va = b.declare_var(ptr_ty); // A at the current pixel
    let vrow = b.declare_var(ptr_ty); // A at the current row's first pixel
    let vb = b.declare_var(ptr_ty);
    let vcnt = b.declare_var(ptr_ty);
    let halves = nr.div_ceil(4);
    // Pixel `u`'s step: `A[r][u]` broadcast, folded into loads ([`fma_bcast`]) or, for the
    // first `lane_rows` rows, lane `u % 4` of `rows[r]`, the row's four pixels from `u - u % 4`.
    let step = |b: &mut FunctionBuilder, pa: ir::Value, pb: ir::Value, u: usize, rows: Option<&[ir::Value]>| {
        let bv: Vec<ir::Value> = (0..halves).map(|h| emit::ld4(b, pb, (u * NR + 4 * h) as i64)).collect();
        for r in 0..mr {
            let xs = rows.filter(|rows| r < rows.len()).map(|rows| emit::lane(b, rows[r], u % 4));
            for (h, &bv) in bv.iter().enumerate() {
                match xs {
                    Some(xs) => fma_acc(b, acc[r * 2 + h], xs, bv),
                    None => fma_bcast(b, acc[r * 2 + h], pa, (s.row_off[r] + u) as i64, bv),
                }
            }
        }
    };
    b.def_var(vrow, a);
    b.def_var(vb, bp);
    let rows = b.ins().iconst(ptr_ty, s.rows as i64);
    b.def_var(vcnt, rows);
    // Both loops are tested at the top, for the reason given in `gen_tile`: each iteration's
    // accumulators then go to one successor only, and the broadcast loads fold.
    let row_head = b.create_block();
    let row_body = b.create_block();
    let row_exit = b.create_block();
    b.ins().jump(row_head, &[]);
    b.switch_to_block(row_head);
    let cnt = b.use_var(vcnt);
    b.ins().brif(cnt, row_body, &[], row_exit, &[]);
    b.switch_to_block(row_body);
    b.seal_block(row_body);
    let row_a = b.use_var(vrow);
    b.def_var(va, row_a);
    let iters = s.width / KU_WGRAD;
    if iters > 0 {
        let head = b.create_block();
        let body = b.create_block();
        let exit = b.create_block();
        let end = emit::offset(b, row_a, (iters * KU_WGRAD) as i64);
        b.ins().jump(head, &[]);
        b.switch_to_block(head);
        let la = b.use_var(va);
        let more = b.ins().icmp(IntCC::NotEqual, la, end);
        b.ins().brif(more, body, &[], exit, &[]);
        b.switch_to_block(body);
        b.seal_block(body);
        let lb = b.use_var(vb);
        let lane_rows = bc.lane_rows().min(mr);
        let mut rows = Vec::new();
        for u in 0..KU_WGRAD {
            if lane_rows > 0 && u % 4 == 0 {
                rows = (0..lane_rows).map(|r| emit::ld4(b, la, (s.row_off[r] + u) as i64)).collect();
            }
            step(b, la, lb, u, (lane_rows > 0).then_some(rows.as_slice()));
        }
        let na = emit::offset(b, la, KU_WGRAD as i64);
        let nb = emit::offset(b, lb, (KU_WGRAD * NR) as i64);
        b.def_var(va, na);
        b.def_var(vb, nb);
        b.ins().jump(head, &[]);
        b.seal_block(head);
        b.switch_to_block(exit);
        b.seal_block(exit);
    }
    let rem = s.width % KU_WGRAD;
    if rem > 0 {
        let la = b.use_var(va);
        let lb = b.use_var(vb);
        for u in 0..rem {
            step(b, la, lb, u, None);
        }
        let nb = emit::offset(b, lb, (rem * NR) as i64);
        b.def_var(vb, nb);
    }
    let next_row = emit::offset(b, row_a, s.pw as i64);
    b.def_var(vrow, next_row);
    let cnt1 = b.ins().iadd_imm_s(cnt, -1);
    b.def_var(vcnt, cnt1);
    b.ins().jump(row_head, &[]);
    b.seal_block(row_head);
    b.switch_to_block(row_exit);
    b.seal_block(row_exit);
    // C += acc.
    for r in 0..mr {
        for h in 0..2 {
            let lanes = nr.saturating_sub(4 * h).min(4);
            if lanes == 0 {
                continue;
            }
            let coff = (r * s.ldc + 4 * h) as i64;
            let accv = b.use_var(acc[r * 2 + h]);
            if lanes == 4 {
                let old = emit::ld4(b, c, coff);
                let t = b.ins().fadd(accv, old);
                emit::st(b, t, c, coff);
            } else {
                for l in 0..lanes {
                    let t = b.ins().extractlane(accv, l as u8);
                    let old = emit::ld(b, c, coff + l as i64);
                    let t = b.ins().fadd(t, old);
                    emit::st(b, t, c, coff + l as i64);
                }
            }
        }
    }
    b.ins().return_(&[]);
}
