//! The JIT GEMM micro-kernels and epilogues against a nested-loop reference, each generated
//! with every `Broadcast` variant, which must also agree with each other bit for bit.
#![cfg(feature = "jit")]

use cnnc_compiler::lower::gemm::{pack_a, BiasKind, Broadcast, EpiArgs, FusedAct, GemmPlan, GemmSpec, NR};
use cnnc_compiler::lower::jit::Jit;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 * (1.0 + w.abs());
        assert!((g - w).abs() <= tol, "{what}: element {i}: got {g}, want {w}");
    }
}

/// `run` with each broadcast variant: every result close to `want`, and all the same bits.
fn every_broadcast(want: &[f32], what: &str, mut run: impl FnMut(Broadcast) -> Vec<f32>) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let folded = run(Broadcast::Folded);
    close(&folded, want, &format!("{what} (folded)"));
    for bc in [Broadcast::Mixed, Broadcast::Lanes] {
        let got = run(bc);
        close(&got, want, &format!("{what} ({bc:?})"));
        assert!(bits(&got) == bits(&folded), "{what}: {bc:?} differs from Folded");
    }
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    spec: GemmSpec,
}

/// Run one GEMM through the JIT and through loops; `c` starts random (accumulate sees it).
fn check(case: Case, rng: &mut StdRng) {
    let Case { m, n, k, spec } = case;
    let a = rand_vec(rng, m * k);
    let b = rand_vec(rng, k * n);
    let coff = 3;
    let c0 = rand_vec(rng, coff + m * spec.ldc);
    let bias = rand_vec(rng, m.max(n));
    let scale = rand_vec(rng, m);
    let shift = rand_vec(rng, m);
    let res = rand_vec(rng, m * spec.ldr.max(1) + n);

    let mut want = c0.clone();
    for i in 0..m {
        for j in 0..n {
            let mut t: f32 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
            match spec.bias {
                BiasKind::None => {}
                BiasKind::Row => t += bias[i],
                BiasKind::Col => t += bias[j],
            }
            if spec.affine {
                t = t * scale[i] + shift[i];
            }
            if spec.residual {
                t += res[i * spec.ldr + j];
            }
            t = match spec.act {
                FusedAct::None => t,
                FusedAct::Relu => t.max(0.0),
                FusedAct::LeakyRelu(s) => if t > 0.0 { t } else { s * t },
            };
            let o = &mut want[coff + i * spec.ldc + j];
            *o = if spec.accumulate { *o + t } else { t };
        }
    }

    let mut ap = Vec::new();
    pack_a(&mut ap, &a, m, k, k, 1);
    every_broadcast(&want, &format!("gemm {m}x{n}x{k} {spec:?}"), |bc| {
        let mut jit = Jit::with_broadcast("gemm_test", bc).unwrap();
        let plan = GemmPlan::define(&mut jit, "g", spec).unwrap();
        let fin = jit.finish().unwrap();
        let g = plan.resolve(&fin);
        let mut got = c0.clone();
        let epi = EpiArgs { bias: &bias, scale: &scale, shift: &shift, residual: &res };
        let mut scratch = Vec::new();
        g.run_strided_b(&mut got, coff, m, &ap, &b, n, 1, &epi, &mut scratch);
        got
    });
}

#[test]
fn plain_gemm_odd_sizes() {
    let mut rng = StdRng::seed_from_u64(1);
    for &(m, n, k) in &[(1, 1, 1), (4, 8, 4), (5, 9, 3), (3, 7, 13), (13, 17, 5), (8, 16, 16), (6, 5, 37), (17, 31, 64)] {
        for acc in [false, true] {
            let spec = GemmSpec::plain(Some(m), n, k, n + 2, acc);
            check(Case { m, n, k, spec }, &mut rng);
        }
    }
}

#[test]
fn dynamic_m() {
    let mut rng = StdRng::seed_from_u64(2);
    for m in 1..=9 {
        let spec = GemmSpec::plain(None, 11, 7, 11, false);
        check(Case { m, n: 11, k: 7, spec }, &mut rng);
    }
}

#[test]
fn epilogues() {
    let mut rng = StdRng::seed_from_u64(3);
    let (m, n, k) = (7, 13, 9);
    let base = GemmSpec::plain(Some(m), n, k, n, false);
    let specs = [
        GemmSpec { bias: BiasKind::Row, ..base },
        GemmSpec { bias: BiasKind::Col, ..base },
        GemmSpec { affine: true, ..base },
        GemmSpec { residual: true, ldr: n + 1, ..base },
        GemmSpec { act: FusedAct::Relu, ..base },
        GemmSpec { act: FusedAct::LeakyRelu(0.1), ..base },
        GemmSpec { bias: BiasKind::Row, affine: true, residual: true, ldr: n, act: FusedAct::Relu, ..base },
        GemmSpec { bias: BiasKind::Row, act: FusedAct::LeakyRelu(0.2), accumulate: true, ldc: n + 5, ..base },
    ];
    for spec in specs {
        check(Case { m, n, k, spec }, &mut rng);
    }
    assert_eq!(NR, 8);
}

/// Direct (in-place `B`) tiles: `B[c*taps + t][j] = x[c*plane + taps[t] + j]`, over plane
/// counts on both sides of the broadcast-folding threshold (64 planes), `K` not a multiple of
/// the unroll, edge tiles of 1..8 columns (1..4: the right half skipped) and 1..4 rows; and
/// the row kernels (`reps` tiles per call, with a residual, a relu and accumulation: the
/// pointers advancing per tile) beside single tiles for the rest of the row.
#[test]
fn direct_b_edges() {
    use cnnc_compiler::lower::gemm::DirectB;
    let mut rng = StdRng::seed_from_u64(4);
    let cases: &[(usize, usize, usize, &[usize], usize)] = &[
        (5, 19, 3, &[0, 1, 2], 1),
        (1, 3, 7, &[0], 1),
        (7, 12, 65, &[0], 1),
        (9, 8, 66, &[0, 2], 1),
        (4, 1, 2, &[1], 1),
        (7, 29, 3, &[0, 1], 3),
        (4, 16, 5, &[0], 2),
        (6, 45, 66, &[0], 4),
    ];
    for &(m, n, chans, taps, reps) in cases {
        let plane = n + 8 + 3;
        let d = DirectB { chans, plane, taps: taps.to_vec(), reps };
        let k = chans * taps.len();
        let x = rand_vec(&mut rng, chans * plane + 16);
        let a = rand_vec(&mut rng, m * k);
        let bias = rand_vec(&mut rng, m);
        let ldr = n + 2;
        let res = rand_vec(&mut rng, m * ldr);
        let rich = reps > 1;
        let spec = GemmSpec { bias: BiasKind::Row, ..GemmSpec::plain(Some(m), n, k, n, false) };
        let spec = if rich { GemmSpec { residual: true, ldr, act: FusedAct::Relu, accumulate: true, ..spec } } else { spec };
        let mut ap = Vec::new();
        pack_a(&mut ap, &a, m, k, k, 1);
        let c0 = rand_vec(&mut rng, m * n);
        let run = |bc| {
            let mut jit = Jit::with_broadcast("direct_test", bc).unwrap();
            let plan = GemmPlan::define_direct(&mut jit, "d", spec, &d).unwrap();
            let fin = jit.finish().unwrap();
            let g = plan.resolve(&fin);
            assert_eq!(g.row_reps(), reps, "row kernels compiled");
            let mut got = c0.clone();
            let epi = EpiArgs { bias: &bias, residual: if rich { &res } else { &[] }, ..EpiArgs::default() };
            let mut j0 = 0;
            while j0 < n {
                if reps > 1 && j0 + NR * reps <= n {
                    g.run_row_panels(&mut got, j0, m, 0..m.div_ceil(4), j0, &ap, &x[j0..], &epi);
                    j0 += NR * reps;
                } else {
                    g.run_cols(&mut got, j0, m, j0, NR.min(n - j0), &ap, &x[j0..], &epi);
                    j0 += NR;
                }
            }
            got
        };
        let mut want = c0.clone();
        for i in 0..m {
            for j in 0..n {
                let mut t = bias[i];
                for c in 0..chans {
                    for (ti, &off) in taps.iter().enumerate() {
                        t += a[i * k + c * taps.len() + ti] * x[c * plane + off + j];
                    }
                }
                if rich {
                    want[i * n + j] += (t + res[i * ldr + j]).max(0.0);
                } else {
                    want[i * n + j] = t;
                }
            }
        }
        every_broadcast(&want, &format!("direct {m}x{n} chans {chans} taps {taps:?} reps {reps}"), run);
    }
}

/// Weight-gradient tiles: every `mr x nr` variant, blocks with a width that is not a multiple
/// of the unroll (and shorter than it), one or several rows, row starts not 4-aligned.
#[test]
fn wgrad_tiles() {
    use cnnc_compiler::lower::gemm::{WgradPlan, WgradSpec, MR};
    let mut rng = StdRng::seed_from_u64(5);
    for &(rows, width) in &[(1, 1), (1, 3), (2, 7), (3, 8), (1, 13), (2, 17)] {
        let pw = width + 2;
        let plane = rows * pw + 5;
        let row_off: [usize; MR] = std::array::from_fn(|r| r * plane);
        let ldc = 11;
        let spec = WgradSpec { rows, width, pw, row_off, ldc };
        let mrs: Vec<usize> = (1..=MR).collect();
        let nrs: Vec<usize> = (1..=NR).collect();
        let plans: Vec<_> = Broadcast::ALL
            .into_iter()
            .map(|bc| {
                let mut jit = Jit::with_broadcast("wgrad_test", bc).unwrap();
                let plan = WgradPlan::define(&mut jit, "w", spec, &mrs, &nrs).unwrap();
                (bc, plan, jit.finish().unwrap())
            })
            .collect();
        let a = rand_vec(&mut rng, MR * plane);
        let kb = rows * width;
        let b = rand_vec(&mut rng, kb * NR);
        for &mr in &mrs {
            for &nr in &nrs {
                let c0 = rand_vec(&mut rng, MR * ldc);
                let run = |bc| {
                    let (_, plan, fin) = plans.iter().find(|p| p.0 == bc).unwrap();
                    let mut got = c0.clone();
                    plan.resolve(fin).run(&mut got, mr, nr, &a, &b);
                    got
                };
                let mut want = c0.clone();
                for r in 0..mr {
                    for t in 0..nr {
                        for y in 0..rows {
                            for x in 0..width {
                                want[r * ldc + t] += a[row_off[r] + y * pw + x] * b[(y * width + x) * NR + t];
                            }
                        }
                    }
                }
                every_broadcast(&want, &format!("wgrad {rows}x{width} tile {mr}x{nr}"), run);
            }
        }
    }
}

/// The host's variant is timed until seven rounds have been quiet (the fastest trial at 0.8 of
/// the FMA peak loop) or the time budget (50 ms, far more than seven rounds) is spent: the
/// summary's counts must say one or the other, and the picked variant is the one `Jit::new`
/// builds with.
#[test]
fn host_timing_waits_for_quiet_rounds() {
    if std::env::var_os("CNNC_BROADCAST").is_some() {
        panic!("this test times the host's variants: run it without CNNC_BROADCAST");
    }
    let summary = Broadcast::host_summary();
    let pick = Broadcast::host().expect("host variant");
    assert!(summary.starts_with(&format!("GEMM broadcast: {} (micro-kernel timed here: folded ", pick.name())), "{summary}");
    let count = |before: &str| -> usize {
        let at = summary.find(before).unwrap_or_else(|| panic!("{before:?} missing: {summary}"));
        let digits: String = summary[..at].chars().rev().take_while(char::is_ascii_digit).collect();
        digits.chars().rev().collect::<String>().parse().unwrap_or_else(|e| panic!("count before {before:?}: {e}: {summary}"))
    };
    let (rounds, quiet) = (count(" rounds, "), count(" of them quiet"));
    assert!(rounds >= 7 && quiet <= rounds && quiet <= 7, "{summary}");
    assert!(quiet == 7 || rounds > 7, "stopped after {rounds} rounds with only {quiet} quiet: {summary}");
    assert_eq!(Jit::new("any").expect("jit").broadcast(), pick);
}
