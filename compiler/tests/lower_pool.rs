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
