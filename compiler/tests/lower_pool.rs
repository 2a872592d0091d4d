//! Max pooling's vectorised paths (whole-plane and row-by-row horizontal passes, strided
//! phases, the 2x2 stride-2 path) against a single pass over each window in row-major order,
//! over many geometries: winners (ties, NaNs, -inf) as `u8` window offsets `ky*kw + kx` from the
//! unclipped window corner, values (bit for bit), the forward without argmax (inference), the
//! backward that decodes the offsets (accumulating and overwriting), on planes with and without
//! NaNs (the two compare rules).
#![cfg(feature = "jit")]

use cnnc_compiler::ir::{Padding, Pool2d, PoolKind};
use cnnc_compiler::lower::pool::PoolKernels;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The winner rule, one pass over the clipped window in row-major order: `>` keeps the first
/// maximum, a NaN wins over a number. Returns `(value, index in the plane)`.
fn single_pass_max(xp: &[f32], w: usize, rows: (usize, usize), cols: (usize, usize)) -> (f32, u32) {
    let (mut best, mut bi) = (xp[rows.0 * w + cols.0], rows.0 * w + cols.0);
    for iy in rows.0..rows.1 {
        for ix in cols.0..cols.1 {
            let v = xp[iy * w + ix];
            if v > best || v.is_nan() && !best.is_nan() {
                (best, bi) = (v, iy * w + ix);
            }
        }
    }
    (best, bi as u32)
}

/// Clipped input range of output `o` on an axis of `n` cells.
fn window(o: usize, k: usize, s: usize, pad: usize, n: usize) -> (usize, usize) {
    let start = (o * s) as isize - pad as isize;
    (start.max(0) as usize, ((start + k as isize).max(0) as usize).min(n))
}

/// Inputs of one kind: `0` random distinct-ish values, `1` few distinct values (many ties) with
/// NaNs and -inf runs, `2` all equal (the first cell of every window wins), `3` few distinct
/// values without NaN (planes take the single-compare rule), ties between `0.0` and `-0.0`
/// (the first one wins, bit for bit) and -inf.
fn input(rng: &mut StdRng, kind: u32, len: usize) -> Vec<f32> {
    match kind {
        3 => {
            let vals = [0.0f32, -0.0, 1.5, f32::NEG_INFINITY, -0.5, 1.5];
            (0..len).map(|_| vals[rng.random_range(0..6)]).collect()
        }
        0 => (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect(),
        1 => {
            let vals = [1.5f32, -0.5, 1.5, f32::NEG_INFINITY, 0.25, f32::NAN];
            (0..len)
                .map(|_| {
                    let nan = rng.random_range(0..8) == 0;
                    vals[rng.random_range(0..if nan { 6 } else { 5 })]
                })
                .collect()
        }
        _ => vec![0.75; len],
    }
}

/// The window offset `ky*kw + kx` of plane cell `i` in the window of output `(oy, ox)`, counted
/// from the window's unclipped top-left corner `(oy*sh - top, ox*sw - left)`.
fn offset(p: &Pool2d, w: usize, (oy, ox): (usize, usize), i: u32) -> u8 {
    let [t, _, l, _] = p.pads();
    let (iy, ix) = (i as usize / w, i as usize % w);
    let (ky, kx) = (iy + t - oy * p.stride[0], ix + l - ox * p.stride[1]);
    assert!(ky < p.kernel[0] && kx < p.kernel[1]);
    (ky * p.kernel[1] + kx) as u8
}

/// Forward (values and winners) and backward of `p` on `n` samples of `(c, h, w)` against the
/// single-pass rule, and the forward without argmax against the same values; returns the
/// number of outputs checked.
fn check(p: &Pool2d, n: usize, (c, h, w): (usize, usize, usize), x: &[f32], what: &str) -> usize {
    let pk = match PoolKernels::new("pool", p, (c, h, w)) {
        Ok(k) => k,
        Err(_) => return 0, // a window entirely in the padding
    };
    let [t, _, l, _] = p.pads();
    let (_, oh, ow) = pk.out_shape();
    let (mut out, mut am) = (vec![0.0; n * c * oh * ow], vec![0u8; n * c * oh * ow]);
    pk.forward(&mut out, Some(&mut am), x).unwrap();
    let mut plain = vec![1.0; out.len()];
    pk.forward(&mut plain, None, x).unwrap();
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&plain), bits(&out), "{what}: forward without argmax");
    let mut want_dx = vec![0.0f32; x.len()];
    let d_out: Vec<f32> = (0..out.len()).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
    for pl in 0..n * c {
        let xp = &x[pl * h * w..(pl + 1) * h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let (v, i) = single_pass_max(xp, w, window(oy, p.kernel[0], p.stride[0], t, h), window(ox, p.kernel[1], p.stride[1], l, w));
                let q = pl * oh * ow + oy * ow + ox;
                assert_eq!(am[q], offset(p, w, (oy, ox), i), "{what}: plane {pl} window ({oy}, {ox}): winner {i}");
                assert!(out[q].to_bits() == v.to_bits() || out[q].is_nan() && v.is_nan(), "{what}: plane {pl} window ({oy}, {ox}): {} vs {v}", out[q]);
                want_dx[pl * h * w + i as usize] += d_out[q];
            }
        }
    }
    let mut dx = vec![0.25f32; x.len()];
    pk.backward(&mut dx, &d_out, Some(&am)).unwrap();
    for (i, (&g, &want)) in dx.iter().zip(&want_dx).enumerate() {
        assert_eq!(g, want + 0.25, "{what}: d_x[{i}]");
    }
    // The overwriting backward ignores what `d_x` held (NaN here).
    let mut dx = vec![f32::NAN; x.len()];
    pk.backward_overwrite(&mut dx, &d_out, Some(&am)).unwrap();
    for (i, (&g, &want)) in dx.iter().zip(&want_dx).enumerate() {
        assert_eq!(g, want, "{what}: overwritten d_x[{i}]");
    }
    out.len()
}

fn pool(k: [usize; 2], s: [usize; 2], pads: [usize; 4], ceil: bool) -> Pool2d {
    let mut p = Pool2d::new(PoolKind::Max, k[0], s[0]);
    p.kernel = k;
    p.stride = s;
    p.padding = Padding::Explicit { top: pads[0], bottom: pads[1], left: pads[2], right: pads[3] };
    p.ceil_mode = ceil;
    p
}

/// Square kernels 2, 3, 5 with strides 1, 2, 3, paddings 0..=2 (symmetric), floor and ceil,
/// on odd and even planes (whole-plane horizontal pass when the stride divides the width,
/// row by row otherwise), batches 1 and 3, channel counts not multiples of 8.
#[test]
fn max_pool_matches_single_pass_over_geometries() {
    let mut rng = StdRng::seed_from_u64(71);
    let mut checked = 0;
    for (n, c, h, w) in [(1, 3, 7, 9), (3, 5, 5, 13), (1, 2, 12, 12), (3, 3, 8, 6), (1, 9, 11, 10), (3, 2, 17, 19)] {
        for kind in 0..4 {
            let x = input(&mut rng, kind, n * c * h * w);
            for k in [2, 3, 5] {
                for s in [1, 2, 3] {
                    for pad in 0..=2 {
                        if pad > k / 2 {
                            continue; // PyTorch's limit; windows would lie in the padding
                        }
                        for ceil in [false, true] {
                            let p = pool([k, k], [s, s], [pad; 4], ceil);
                            let what = format!("{k}x{k}/{s} pad {pad} ceil {ceil} on {n}x{c}x{h}x{w}, input kind {kind}");
                            checked += check(&p, n, (c, h, w), &x, &what);
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 10_000, "{checked} outputs checked");
}

/// Rectangular kernels, per-axis strides and asymmetric padding (the horizontal pass's left
/// padding offsets the flat cells; the vertical block depends on the top padding only).
#[test]
fn max_pool_rectangular_and_asymmetric() {
    let mut rng = StdRng::seed_from_u64(72);
    type Case = ([usize; 2], [usize; 2], [usize; 4], bool);
    let cases: [Case; 9] = [
        ([1, 3], [1, 1], [0, 0, 1, 1], false),
        ([3, 1], [1, 1], [1, 1, 0, 0], false),
        ([3, 3], [1, 1], [0, 1, 1, 0], false),
        ([3, 3], [1, 1], [2, 0, 0, 2], false),
        ([2, 3], [2, 1], [1, 0, 0, 1], true),
        ([3, 2], [1, 2], [0, 1, 1, 0], true),
        ([5, 3], [3, 2], [2, 2, 1, 1], true),
        ([2, 2], [1, 1], [1, 1, 1, 1], false),
        ([3, 3], [2, 3], [1, 1, 0, 1], true),
    ];
    for (n, c, h, w) in [(3, 3, 7, 9), (1, 4, 10, 12), (2, 1, 6, 6)] {
        for kind in [0, 1, 3] {
            let x = input(&mut rng, kind, n * c * h * w);
            for (k, s, pads, ceil) in cases {
                let what = format!("{k:?}/{s:?} pads {pads:?} ceil {ceil} on {n}x{c}x{h}x{w}, input kind {kind}");
                check(&pool(k, s, pads, ceil), n, (c, h, w), &x, &what);
            }
        }
    }
}

/// The network shapes the benchmarks run: 3x3/1 pad 1 (inception's pool branch), 3x3/2 pad 1
/// and 2x2/2 on 32x32, 2x2/2 on 28x28 and 14x14.
#[test]
fn max_pool_network_shapes() {
    let mut rng = StdRng::seed_from_u64(73);
    for (k, s, pad, (c, h)) in [(3, 1, 1, (5, 32)), (3, 2, 1, (3, 32)), (2, 2, 0, (3, 32)), (2, 2, 0, (4, 28)), (2, 2, 0, (3, 14)), (3, 2, 0, (2, 15)), (2, 2, 0, (3, 19))] {
        for kind in [0, 1, 3] {
            let x = input(&mut rng, kind, 2 * c * h * h);
            check(&pool([k, k], [s, s], [pad; 4], false), 2, (c, h, h), &x, &format!("{k}x{k}/{s} pad {pad} on {c}x{h}x{h}, input kind {kind}"));
        }
    }
}

/// Max pooling runs an unrolled 2x2 stride-2 path or a separable two-pass path (rows, then
/// columns); both must pick the single-pass winner of every window, with many ties, NaNs and
/// all--inf windows, including windows clipped by padding and `ceil`.
#[test]
fn max_pool_fast_paths_pick_the_single_pass_winner() {
    let mut rng = StdRng::seed_from_u64(41);
    let (n, c, h, w) = (2, 3, 5, 7);
    // Few distinct values: many ties.
    let vals = [1.5f32, -0.5, 1.5, f32::NEG_INFINITY, 0.25];
    let mut x: Vec<f32> = (0..n * c * h * w).map(|_| vals[rng.random_range(0..vals.len())]).collect();
    for i in [3, 17, 40, 41, 88] {
        x[i] = f32::NAN;
    }
    x[w * 2..w * 2 + 2].fill(f32::NEG_INFINITY);
    x[w * 3..w * 3 + 2].fill(f32::NEG_INFINITY);
    for (k, s, pad, ceil) in [(2, 2, 0, false), (2, 2, 0, true), (3, 1, 1, false), (3, 2, 1, true), (2, 1, 0, false)] {
        let mut p = Pool2d::new(PoolKind::Max, k, s);
        p.padding = Padding::uniform(pad);
        p.ceil_mode = ceil;
        let pk = PoolKernels::new("pool", &p, (c, h, w)).unwrap();
        let (_, oh, ow) = pk.out_shape();
        let (mut out, mut am) = (vec![0.0; n * c * oh * ow], vec![0u8; n * c * oh * ow]);
        pk.forward(&mut out, Some(&mut am), &x).unwrap();
        for pl in 0..n * c {
            let xp = &x[pl * h * w..(pl + 1) * h * w];
            for oy in 0..oh {
                for ox in 0..ow {
                    let (v, i) = single_pass_max(xp, w, window(oy, k, s, pad, h), window(ox, k, s, pad, w));
                    let q = pl * oh * ow + oy * ow + ox;
                    let what = format!("{k}x{k}/{s} pad {pad} ceil {ceil}: plane {pl} window ({oy}, {ox})");
                    assert_eq!(am[q], offset(&p, w, (oy, ox), i), "{what}: winner");
                    assert!(out[q] == v || out[q].is_nan() && v.is_nan(), "{what}: {} vs {v}", out[q]);
                }
            }
        }
        if (k, s) == (2, 2) {
            assert!(out.iter().any(|v| v.is_nan()) && out.contains(&f32::NEG_INFINITY), "the input exercises NaN and -inf windows");
        }
    }
}

/// Random inputs without zeros or ties (magnitudes in `[0.1, 3)`, random signs), on the
/// geometries whose offsets are easiest to decode wrongly: overlapping windows (stride below
/// the kernel), padding, `ceil` with clipped last windows, non-square windows and planes, the
/// largest window a `u8` offset allows (15x17 = 255 cells), batches 1 and 3.
#[test]
fn max_pool_offsets_overlapping_padded_ceil_non_square() {
    let mut rng = StdRng::seed_from_u64(74);
    type Case = ([usize; 2], [usize; 2], [usize; 4], bool);
    let cases: [Case; 10] = [
        ([3, 3], [1, 1], [1, 1, 1, 1], false),
        ([4, 4], [2, 2], [1, 2, 2, 1], true),
        ([5, 3], [2, 1], [2, 0, 0, 1], true),
        ([2, 5], [1, 3], [0, 1, 2, 2], true),
        ([5, 2], [3, 1], [2, 2, 1, 0], false),
        ([1, 4], [1, 2], [0, 0, 1, 2], true),
        ([3, 3], [2, 2], [0, 0, 0, 0], true),
        ([3, 2], [2, 2], [1, 0, 0, 0], true),
        ([15, 17], [1, 2], [7, 3, 8, 2], true),
        ([15, 17], [4, 5], [0, 0, 0, 0], true),
    ];
    let mut clipped_ceil = 0;
    for (n, c, h, w) in [(1, 3, 8, 11), (3, 2, 9, 10), (1, 1, 17, 21), (3, 4, 16, 23)] {
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|_| rng.random_range(0.1f32..3.0) * if rng.random_range(0..2) == 0 { -1.0 } else { 1.0 })
            .collect();
        for (k, s, pads, ceil) in cases {
            if k[0] > h + pads[0] + pads[1] || k[1] > w + pads[2] + pads[3] {
                continue;
            }
            let p = pool(k, s, pads, ceil);
            if ceil {
                let pk = PoolKernels::new("pool", &p, (c, h, w)).unwrap();
                let (_, oh, ow) = pk.out_shape();
                // The last window reaches past the padded input: clipped by ceil mode.
                if (oh - 1) * s[0] + k[0] > h + pads[0] + pads[1] || (ow - 1) * s[1] + k[1] > w + pads[2] + pads[3] {
                    clipped_ceil += 1;
                }
            }
            let what = format!("{k:?}/{s:?} pads {pads:?} ceil {ceil} on {n}x{c}x{h}x{w}, random");
            assert!(check(&p, n, (c, h, w), &x, &what) > 0, "{what}: checked nothing");
        }
    }
    assert!(clipped_ceil >= 8, "{clipped_ceil} ceil cases with a clipped last window");
}

/// A max-pooling window of more than 255 cells has no `u8` offset: construction fails, naming
/// the layer; 255 cells are fine, and average pooling (no argmax) has no limit.
#[test]
fn max_pool_window_limit() {
    let big = pool([16, 16], [1, 1], [0; 4], false);
    let e = PoolKernels::new("stem.bigpool", &big, (2, 20, 20)).unwrap_err().to_string();
    assert!(e.contains("stem.bigpool") && e.contains("16x16") && e.contains("255"), "{e}");
    assert!(PoolKernels::new("p", &pool([15, 17], [1, 1], [0; 4], false), (2, 20, 20)).is_ok());
    let mut avg = big;
    avg.kind = PoolKind::Avg;
    assert!(PoolKernels::new("p", &avg, (2, 20, 20)).is_ok());
}

/// Backward rejects a window offset past the window or whose cell falls outside the plane (a
/// padding corner), and a missing argmax.
#[test]
fn max_pool_backward_rejects_bad_offsets() {
    let p = pool([3, 3], [1, 1], [1, 1, 1, 1], false);
    let pk = PoolKernels::new("pool", &p, (1, 4, 4)).unwrap();
    let (mut dx, g) = (vec![0.0f32; 16], vec![1.0f32; 16]);
    let mut am = vec![4u8; 16]; // the centre cell: always real
    pk.backward(&mut dx, &g, Some(&am)).unwrap();
    assert_eq!(dx, vec![1.0; 16]);
    am[0] = 0; // output (0, 0): tap (0, 0) is the padding corner
    assert!(pk.backward(&mut dx, &g, Some(&am)).is_err());
    am[0] = 9; // past the 3x3 window
    assert!(pk.backward(&mut dx, &g, Some(&am)).is_err());
    am[0] = 4;
    am[5] = 9; // output (1, 1), a whole window: past it
    assert!(pk.backward(&mut dx, &g, Some(&am)).is_err());
    assert!(pk.backward(&mut dx, &g, None).is_err());
}

/// The max-pool backward as the plain scatter it must match bit for bit: in output order
/// (ascending `oy`, then `ox`), each output's gradient added onto the cell its offset names,
/// decoded with flat plane arithmetic (a padding cell of a clipped window wraps to another
/// cell of the plane where the flat index still lies inside it), `None` where it lies outside.
fn scatter_ref(p: &Pool2d, (h, w): (usize, usize), (oh, ow): (usize, usize), d_x: &mut [f32], d_out: &[f32], am: &[u8]) -> Option<()> {
    let [t, _, l, _] = p.pads();
    let (kw, hw) = (p.kernel[1], h * w);
    for pl in 0..d_x.len() / hw {
        for oy in 0..oh {
            for ox in 0..ow {
                let q = pl * oh * ow + oy * ow + ox;
                let a = am[q] as usize;
                let flat = (oy * p.stride[0] + a / kw) as isize * w as isize - (t * w) as isize + (ox * p.stride[1] + a % kw) as isize - l as isize;
                if flat < 0 || flat >= hw as isize {
                    return None;
                }
                d_x[pl * hw + flat as usize] += d_out[q];
            }
        }
    }
    Some(())
}

/// Random `d_x` (or `d_out`) values that make the order of additions visible: magnitudes over
/// several decades (sums round differently in another order), with `-0.0`, `+0.0` and a few
/// subnormals (an addition of `+0.0` where the scatter adds nothing shows on `-0.0`).
fn grads(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| match rng.random_range(0..16) {
            0 => -0.0,
            1 => 0.0,
            2 => f32::from_bits(rng.random_range(1..0x007f_ffff)) * if rng.random_range(0..2) == 0 { -1.0 } else { 1.0 },
            _ => rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-4..5)),
        })
        .collect()
}

/// Stride-1 max-pool backward (a gather per input cell where output rows have the input's
/// width; the scatter otherwise) against the scatter, bit for bit: windows 2x2, 3x3, 5x5, 3x1,
/// 1x3, 2x3, symmetric and asymmetric paddings, odd sizes, planes narrower than a vector, both
/// `backward` (onto random `d_x` holding `-0.0`, `+0.0`, subnormals) and `backward_overwrite`
/// (onto NaN), inputs with many ties (cells winning several windows, so several additions per
/// cell in a fixed order).
#[test]
fn max_pool_stride1_backward_matches_scatter_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(75);
    type Case = ([usize; 2], [usize; 4]);
    let cases: [Case; 14] = [
        ([3, 3], [1, 1, 1, 1]),
        ([3, 3], [0, 0, 0, 0]),
        ([3, 3], [2, 0, 0, 2]),
        ([3, 3], [0, 2, 2, 0]),
        ([2, 2], [0, 1, 0, 1]),
        ([2, 2], [1, 0, 1, 0]),
        ([2, 2], [1, 1, 1, 1]),
        ([5, 5], [2, 2, 2, 2]),
        ([5, 5], [1, 3, 4, 0]),
        ([3, 1], [1, 1, 0, 0]),
        ([1, 3], [0, 0, 1, 1]),
        ([2, 3], [1, 0, 1, 1]),
        ([5, 3], [2, 2, 1, 1]),
        ([3, 3], [1, 1, 0, 2]),
    ];
    let (mut gathered, mut multi) = (0, 0);
    for (n, c, h, w) in [(2, 3, 7, 9), (1, 2, 32, 32), (3, 5, 16, 16), (1, 3, 13, 5), (2, 2, 11, 20), (1, 1, 3, 3), (1, 2, 9, 17)] {
        for kind in [0, 1, 3, 2] {
            let x = input(&mut rng, kind, n * c * h * w);
            for (k, pads) in cases {
                let p = pool(k, [1, 1], pads, false);
                let Ok(pk) = PoolKernels::new("pool", &p, (c, h, w)) else { continue };
                let (_, oh, ow) = pk.out_shape();
                let what = format!("{k:?}/1 pads {pads:?} on {n}x{c}x{h}x{w}, input kind {kind}");
                let (mut out, mut am) = (vec![0.0; n * c * oh * ow], vec![0u8; n * c * oh * ow]);
                pk.forward(&mut out, Some(&mut am), &x).unwrap();
                let d_out = grads(&mut rng, out.len());
                let d_x0 = grads(&mut rng, x.len());
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let mut want = d_x0.clone();
                scatter_ref(&p, (h, w), (oh, ow), &mut want, &d_out, &am).expect("a forward's offsets name real cells");
                let mut got = d_x0.clone();
                pk.backward(&mut got, &d_out, Some(&am)).unwrap();
                assert_eq!(bits(&got), bits(&want), "{what}: backward");
                let mut want = vec![0.0f32; x.len()];
                scatter_ref(&p, (h, w), (oh, ow), &mut want, &d_out, &am).unwrap();
                let mut got = vec![f32::NAN; x.len()];
                pk.backward_overwrite(&mut got, &d_out, Some(&am)).unwrap();
                assert_eq!(bits(&got), bits(&want), "{what}: backward_overwrite");
                gathered += (ow == w) as usize;
                // Cells winning several windows: their additions' order matters.
                let mut wins = vec![0u32; x.len()];
                let mut ones = vec![0.0f32; x.len()];
                scatter_ref(&p, (h, w), (oh, ow), &mut ones, &vec![1.0; out.len()], &am).unwrap();
                for (c, &o) in wins.iter_mut().zip(&ones) {
                    *c = o as u32;
                }
                multi += wins.iter().filter(|&&c| c >= 3).count();
            }
        }
    }
    assert!(gathered >= 100 && multi >= 1000, "{gathered} gathered geometries, {multi} cells winning 3+ windows");
}

/// Offsets inside the window but naming a padding cell (never recorded by a forward): the
/// stride-1 backward takes the scatter for such a plane, which wraps to another cell of the
/// plane where the flat index lies inside it (as before the gather), and fails where it does
/// not; the other planes still gather.
#[test]
fn max_pool_stride1_backward_padding_offsets_take_the_scatter() {
    let p = pool([3, 3], [1, 1], [1, 1, 1, 1], false);
    let pk = PoolKernels::new("pool", &p, (3, 5, 5)).unwrap();
    let mut rng = StdRng::seed_from_u64(76);
    let x = input(&mut rng, 0, 3 * 25);
    let mut am = vec![0u8; 3 * 25];
    pk.forward(&mut vec![0.0; 3 * 25], Some(&mut am), &x).unwrap();
    let d_out = grads(&mut rng, 3 * 25);
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    // Plane 1, output (2, 0): offset 3 is cell (2, -1), flat cell (1, 4) of the plane.
    am[25 + 10] = 3;
    let d_x0 = grads(&mut rng, 3 * 25);
    let mut want = d_x0.clone();
    scatter_ref(&p, (5, 5), (5, 5), &mut want, &d_out, &am).unwrap();
    let mut got = d_x0.clone();
    pk.backward(&mut got, &d_out, Some(&am)).unwrap();
    assert_eq!(bits(&got), bits(&want), "wrapped offset, accumulating");
    let mut want = vec![0.0f32; 3 * 25];
    scatter_ref(&p, (5, 5), (5, 5), &mut want, &d_out, &am).unwrap();
    let mut got = vec![f32::NAN; 3 * 25];
    pk.backward_overwrite(&mut got, &d_out, Some(&am)).unwrap();
    assert_eq!(bits(&got), bits(&want), "wrapped offset, overwriting");
    // Plane 2, output (0, 0): offset 0 is cell (-1, -1), before the plane.
    am[50] = 0;
    let e = pk.backward(&mut got, &d_out, Some(&am)).unwrap_err().to_string();
    assert!(e.contains("names no input cell"), "{e}");
    let e = pk.backward_overwrite(&mut got, &d_out, Some(&am)).unwrap_err().to_string();
    assert!(e.contains("names no input cell"), "{e}");
    am[50] = 9;
    let e = pk.backward(&mut got, &d_out, Some(&am)).unwrap_err().to_string();
    assert!(e.contains("outside its 9-cell window"), "{e}");
}
