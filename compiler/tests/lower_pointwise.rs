//! Pooling, activations and batch norm against direct loops and finite differences.
#![cfg(feature = "jit")]

use cnnc_compiler::ir::{Activation, Padding, Pool2d, PoolKind};
use cnnc_compiler::lower::pointwise::*;
use cnnc_compiler::lower::pool::PoolKernels;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: element {i}: got {g}, want {w}");
    }
}

/// Reference pooling straight from the definition (PyTorch semantics).
fn ref_pool(p: &Pool2d, x: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let [t, b, l, r] = p.pads();
    let mut out = vec![0.0; planes * oh * ow];
    for pl in 0..planes {
        for oy in 0..oh {
            for ox in 0..ow {
                let (y0, x0) = ((oy * p.stride[0]) as isize - t as isize, (ox * p.stride[1]) as isize - l as isize);
                let (mut mx, mut sum, mut cnt, mut padded) = (f32::NEG_INFINITY, 0.0, 0, 0);
                for ky in 0..p.kernel[0] as isize {
                    for kx in 0..p.kernel[1] as isize {
                        let (iy, ix) = (y0 + ky, x0 + kx);
                        if iy < (h + b) as isize && ix < (w + r) as isize {
                            padded += 1;
                        }
                        if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                            let v = x[pl * h * w + iy as usize * w + ix as usize];
                            mx = mx.max(v);
                            sum += v;
                            cnt += 1;
                        }
                    }
                }
                out[pl * oh * ow + oy * ow + ox] = match p.kind {
                    PoolKind::Max => mx,
                    PoolKind::Avg => sum / if p.count_include_pad { padded } else { cnt } as f32,
                };
            }
        }
    }
    out
}

#[test]
fn pooling_forward_backward() {
    let mut rng = StdRng::seed_from_u64(31);
    let (n, c, h, w) = (3, 5, 7, 9);
    for kind in [PoolKind::Max, PoolKind::Avg] {
        for (k, s, pad, ceil, incl) in [
            (2, 2, [0, 0, 0, 0], false, true),
            (3, 2, [1, 1, 1, 1], false, true),
            (3, 2, [1, 1, 1, 1], true, false),
            (3, 1, [0, 1, 1, 0], false, false),
            (2, 3, [0, 0, 0, 0], true, true),
        ] {
            let p = Pool2d {
                kind,
                kernel: [k, k],
                stride: [s, s],
                padding: Padding::Explicit { top: pad[0], bottom: pad[1], left: pad[2], right: pad[3] },
                ceil_mode: ceil,
                count_include_pad: incl,
                exact: false,
            };
            let what = format!("{p:?}");
            let pk = PoolKernels::new("pool", &p, (c, h, w)).unwrap();
            let (_, oh, ow) = pk.out_shape();
            // Distinct values 0.01 apart: no near-ties for the max's finite differences.
            let mut x: Vec<f32> = (0..n * c * h * w).map(|i| i as f32 * 0.01 - 4.0).collect();
            x.shuffle(&mut rng);
            let mut out = vec![0.0; n * c * oh * ow];
            let mut am = vec![0u8; out.len()];
            let amo = (kind == PoolKind::Max).then_some(&mut am[..]);
            pk.forward(&mut out, amo, &x).unwrap();
            close(&out, &ref_pool(&p, &x, n * c, h, w, oh, ow), 1e-5, &what);
            // Backward vs finite differences of L = Σ out * r (max: away from ties, which
            // random inputs avoid).
            let r = rand_vec(&mut rng, out.len());
            let mut dx = vec![0.0; x.len()];
            pk.backward(&mut dx, &r, (kind == PoolKind::Max).then_some(&am[..])).unwrap();
            let loss = |x: &[f32]| -> f64 {
                ref_pool(&p, x, n * c, h, w, oh, ow).iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
            };
            let hstep = 1e-3f32;
            for i in (0..x.len()).step_by(5) {
                let (mut a, mut b) = (x.clone(), x.clone());
                a[i] += hstep;
                b[i] -= hstep;
                let fd = ((loss(&a) - loss(&b)) / (2.0 * hstep as f64)) as f32;
                assert!((dx[i] - fd).abs() < 1e-2 * (1.0 + fd.abs()), "{what}: d_x[{i}] {} vs fd {fd}", dx[i]);
            }
        }
    }
    let p = Pool2d::new(PoolKind::Max, 2, 2);
    let pk = PoolKernels::new("pool3", &p, (c, h, w)).unwrap();
    let mut out = vec![0.0; c * 3 * 4];
    assert!(pk.backward(&mut vec![0.0; c * h * w], &out, None).is_err(), "max pooling backward needs the argmax");
    assert!(pk.forward(&mut out[1..], Some(&mut vec![0; c * 12]), &vec![0.0; c * h * w]).is_err());
}

#[test]
fn activations_forward_backward() {
    let mut rng = StdRng::seed_from_u64(32);
    let x = rand_vec(&mut rng, 301);
    let r = rand_vec(&mut rng, 301);
    let acts = [
        Activation::Relu,
        Activation::LeakyRelu { slope: 0.1 },
        Activation::Elu { alpha: 1.3 },
        Activation::Sigmoid,
        Activation::Tanh,
    ];
    let f = |a: Activation, v: f32| -> f32 {
        match a {
            Activation::Relu => v.max(0.0),
            Activation::LeakyRelu { slope } => if v > 0.0 { v } else { slope * v },
            Activation::Elu { alpha } => if v > 0.0 { v } else { alpha * (v.exp() - 1.0) },
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Activation::Tanh => v.tanh(),
        }
    };
    for a in acts {
        let mut y = vec![0.0; x.len()];
        activation_forward("act", a, &mut y, &x).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| f(a, v)).collect();
        close(&y, &want, 1e-5, a.name());
        let mut d1 = vec![0.5; x.len()];
        let mut d2 = vec![0.5; x.len()];
        activation_backward("act", a, &mut d1, &r, &x).unwrap();
        activation_backward_from_output("act", a, &mut d2, &r, &y).unwrap();
        let h = 1e-3f32;
        for i in 0..x.len() {
            if x[i].abs() < 1e-2 {
                continue; // kink of relu/leaky/elu
            }
            let fd = (f(a, x[i] + h) - f(a, x[i] - h)) / (2.0 * h) * r[i] + 0.5;
            assert!((d1[i] - fd).abs() < 1e-2, "{}: from x at {i}: {} vs {fd}", a.name(), d1[i]);
            assert!((d2[i] - fd).abs() < 1e-2, "{}: from y at {i}: {} vs {fd}", a.name(), d2[i]);
        }
    }
    let mut y = vec![0.0; 3];
    assert!(activation_forward("act", Activation::Relu, &mut y, &x).is_err());
    assert!(activation_backward_from_output("act", Activation::LeakyRelu { slope: -0.5 }, &mut y, &r[..3], &x[..3]).is_err());
}

#[test]
fn batchnorm_train_and_inference() {
    let mut rng = StdRng::seed_from_u64(33);
    let shape = BnShape { n: 3, c: 5, hw: 7 };
    let len = 3 * 5 * 7;
    let x = rand_vec(&mut rng, len);
    let gamma = rand_vec(&mut rng, 5);
    let beta = rand_vec(&mut rng, 5);
    let (eps, mom) = (1e-5, 0.1);
    let forward = |x: &[f32], gamma: &[f32], beta: &[f32]| {
        let mut out = vec![0.0; len];
        let mut saved = BnSaved::default();
        let (mut rm, mut rv) = (vec![0.0; 5], vec![1.0; 5]);
        batchnorm_forward_train("bn", shape, 0..5, &mut out, &mut saved, &mut rm, &mut rv, x, gamma, beta, eps, mom).unwrap();
        (out, saved, rm, rv)
    };
    let (out, saved, rm, rv) = forward(&x, &gamma, &beta);
    for ch in 0..5 {
        let vals: Vec<f32> = (0..3).flat_map(|s| x[s * 35 + ch * 7..s * 35 + ch * 7 + 7].to_vec()).collect();
        let mean = vals.iter().sum::<f32>() / 21.0;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 21.0;
        for s in 0..3 {
            for q in 0..7 {
                let i = s * 35 + ch * 7 + q;
                let want = gamma[ch] * (x[i] - mean) / (var + eps).sqrt() + beta[ch];
                assert!((out[i] - want).abs() < 1e-4, "bn out[{i}]");
            }
        }
        assert!((rm[ch] - 0.1 * mean).abs() < 1e-5);
        assert!((rv[ch] - (0.9 + 0.1 * var * 21.0 / 20.0)).abs() < 1e-5);
    }
    // Backward vs finite differences of L = Σ out * r.
    let r = rand_vec(&mut rng, len);
    let (mut dx, mut dg, mut db) = (vec![0.0; len], vec![0.0; 5], vec![0.0; 5]);
    batchnorm_backward("bn", shape, 0..5, &mut dx, &mut dg, &mut db, &r, &x, &saved, &gamma).unwrap();
    // Channels 1..4 alone: the same gradients on their planes and parameters, nothing else
    // touched.
    let (mut px, mut pg, mut pb) = (vec![0.0; len], vec![0.0; 5], vec![0.0; 5]);
    batchnorm_backward("bn", shape, 1..4, &mut px, &mut pg, &mut pb, &r, &x, &saved, &gamma).unwrap();
    for i in 0..len {
        let ch = i % 35 / 7;
        let want = if (1..4).contains(&ch) { dx[i] } else { 0.0 };
        assert_eq!(px[i], want, "channels 1..4: d_x[{i}]");
    }
    for ch in 0..5 {
        let (wg, wb) = if (1..4).contains(&ch) { (dg[ch], db[ch]) } else { (0.0, 0.0) };
        assert_eq!((pg[ch], pb[ch]), (wg, wb), "channels 1..4: channel {ch}");
    }
    let loss = |x: &[f32], g: &[f32], b: &[f32]| -> f64 {
        forward(x, g, b).0.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let h = 1e-2f32;
    let fd = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
        let (mut a, mut b) = (v.to_vec(), v.to_vec());
        a[i] += h;
        b[i] -= h;
        ((f(&a) - f(&b)) / (2.0 * h as f64)) as f32
    };
    for (i, &d) in dx.iter().enumerate() {
        let want = fd(&x, i, &|x| loss(x, &gamma, &beta));
        assert!((d - want).abs() < 2e-2 * (1.0 + want.abs()), "bn d_x[{i}] {d} vs {want}");
    }
    for ch in 0..5 {
        let wg = fd(&gamma, ch, &|g| loss(&x, g, &beta));
        let wb = fd(&beta, ch, &|b| loss(&x, &gamma, b));
        assert!((dg[ch] - wg).abs() < 2e-2 * (1.0 + wg.abs()), "d_gamma[{ch}]");
        assert!((db[ch] - wb).abs() < 2e-2 * (1.0 + wb.abs()), "d_beta[{ch}]");
    }
    // Inference equals the folded affine map.
    let mut inf = vec![0.0; len];
    batchnorm_forward_infer("bn", shape, &mut inf, &x, &gamma, &beta, &rm, &rv, eps).unwrap();
    let (scale, shift) = batchnorm_fold("bn", &gamma, &beta, &rm, &rv, eps).unwrap();
    for i in 0..len {
        let ch = (i / 7) % 5;
        let want = gamma[ch] * (x[i] - rm[ch]) / (rv[ch] + eps).sqrt() + beta[ch];
        assert!((inf[i] - want).abs() < 1e-4 && (x[i] * scale[ch] + shift[ch] - want).abs() < 1e-4);
    }
    let mut short = vec![0.0; len - 1];
    assert!(batchnorm_forward_infer("bn", shape, &mut short, &x, &gamma, &beta, &rm, &rv, eps).is_err());
}

/// Batch statistics from per-plane centred sums against an f64 two-pass reference, on channels
/// with a large offset (where `E[x²] - E[x]²` in f32 would cancel), odd plane sizes (lane
/// remainders, several blocks) and batches 1 and 3.
#[test]
fn batchnorm_stats_are_accurate() {
    let mut rng = StdRng::seed_from_u64(34);
    for (n, c, hw) in [(1, 3, 7), (3, 5, 13), (3, 2, 300), (1, 9, 1031), (4, 3, 1)] {
        let shape = BnShape { n, c, hw };
        let x: Vec<f32> = (0..n * c * hw).map(|i| rng.random_range(-1.0f32..1.0) * 0.01 + [0.0, 1000.0, -3.0][(i / hw) % 3]).collect();
        for ch in 0..c {
            let vals: Vec<f64> = (0..n).flat_map(|s| x[s * c * hw + ch * hw..s * c * hw + (ch + 1) * hw].iter().map(|&v| v as f64)).collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let ss: f64 = vals.iter().map(|v| (v - mean).powi(2)).sum();
            let (m, s) = batchnorm_channel_stats(shape, ch, &x);
            assert!((m - mean).abs() <= 1e-9 * (1.0 + mean.abs()), "{n}x{c}x{hw} channel {ch}: mean {m} vs {mean}");
            assert!((s - ss).abs() <= 1e-6 * ss + 1e-12, "{n}x{c}x{hw} channel {ch}: Σ(x-mean)² {s} vs {ss}");
        }
    }
    // Planes far from uniform: a ramp, a step of 1000 after a few values, a spike at the start.
    let hw = 700;
    let planes: [Vec<f32>; 3] = [
        (0..hw).map(|i| i as f32 * 3.0 + rng.random_range(-0.01f32..0.01)).collect(),
        (0..hw).map(|i| if i < 5 { 0.0 } else { 1000.0 } + rng.random_range(-0.01f32..0.01)).collect(),
        (0..hw).map(|i| if i < 16 { 1000.0 } else { 0.0 } + rng.random_range(-0.01f32..0.01)).collect(),
    ];
    for (k, p) in planes.iter().enumerate() {
        let vals: Vec<f64> = p.iter().map(|&v| v as f64).collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let ss: f64 = vals.iter().map(|v| (v - mean).powi(2)).sum();
        let (m, s) = batchnorm_channel_stats(BnShape { n: 1, c: 1, hw }, 0, p);
        let scale = mean.abs() + (ss / hw as f64).sqrt();
        // (The mean is kept in f32: 1e-8 of the values' scale is well below its resolution.)
        assert!((m - mean).abs() <= 1e-8 * scale, "plane {k}: mean {m} vs {mean}");
        assert!((s - ss).abs() <= 1e-6 * ss, "plane {k}: Σ(x-mean)² {s} vs {ss}");
    }
}

/// The fused ReLU paths equal the separate passes bit for bit: the forward's affine map with
/// the activation (every activation; relu in the same loop), and the backward's gradient sums
/// and input gradient with the mask `[x*a + b > 0]` against masking `d_out` by `[y > 0]` first.
#[test]
fn batchnorm_fused_activation_matches_separate_passes() {
    let mut rng = StdRng::seed_from_u64(35);
    for (n, c, hw) in [(1, 3, 7), (3, 5, 13), (3, 2, 300)] {
        let shape = BnShape { n, c, hw };
        let len = n * c * hw;
        let x = rand_vec(&mut rng, len);
        let (gamma, beta) = (rand_vec(&mut rng, c), rand_vec(&mut rng, c));
        let mut saved = BnSaved { mean: vec![0.0; c], rstd: vec![0.0; c] };
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        let ab: Vec<(f32, f32)> = (0..c)
            .map(|ch| batchnorm_channel_finish(ch, batchnorm_channel_stats(shape, ch, &x), n * hw, &mut saved, &mut rm, &mut rv, &gamma, &beta, 1e-5, 0.1))
            .collect();
        let (a, b): (Vec<f32>, Vec<f32>) = ab.iter().copied().unzip();
        for act in [Activation::Relu, Activation::LeakyRelu { slope: 0.1 }, Activation::Elu { alpha: 1.3 }, Activation::Sigmoid, Activation::Tanh] {
            let (mut fused, mut sep) = (vec![0.0; len], vec![0.0; len]);
            for s in 0..n {
                let r = s * c * hw..(s + 1) * c * hw;
                channel_affine_act(&mut fused[r.clone()], &x[r.clone()], 0, &a, &b, hw, act);
                let mut z = vec![0.0; c * hw];
                channel_affine(&mut z, &x[r.clone()], 0, &a, &b, hw);
                activation_forward("bn", act, &mut sep[r], &z).unwrap();
            }
            for (i, (f, s)) in fused.iter().zip(&sep).enumerate() {
                assert!(f.to_bits() == s.to_bits() || f.is_nan() && s.is_nan(), "{}: element {i}: {f} vs {s}", act.name());
            }
        }
        // Backward with the relu mask.
        let mut y = vec![0.0; len];
        for s in 0..n {
            let r = s * c * hw..(s + 1) * c * hw;
            channel_affine_act(&mut y[r.clone()], &x[r.clone()], 0, &a, &b, hw, Activation::Relu);
        }
        let d_out = rand_vec(&mut rng, len);
        let masked: Vec<f32> = d_out.iter().zip(&y).map(|(&g, &v)| if v > 0.0 { g } else { 0.0 }).collect();
        for ch in 0..c {
            let pl = |g: &[f32]| -> Vec<(Vec<f32>, Vec<f32>)> {
                (0..n).map(|s| (g[s * c * hw + ch * hw..s * c * hw + (ch + 1) * hw].to_vec(), x[s * c * hw + ch * hw..s * c * hw + (ch + 1) * hw].to_vec())).collect()
            };
            let (raw, msk) = (pl(&d_out), pl(&masked));
            let fused = batchnorm_grad_sums(raw.iter().map(|(g, x)| (&g[..], &x[..])), saved.mean[ch], saved.rstd[ch], Some(ab[ch]));
            let sep = batchnorm_grad_sums(msk.iter().map(|(g, x)| (&g[..], &x[..])), saved.mean[ch], saved.rstd[ch], None);
            assert_eq!(fused, sep, "{n}x{c}x{hw} channel {ch}: gradient sums");
            assert_eq!(sep, batchnorm_channel_grad_sums(shape, ch, &masked, &x, saved.mean[ch], saved.rstd[ch]), "planes vs whole tensor");
            // Against f64 sums.
            let (mut wg, mut wgx) = (0.0f64, 0.0f64);
            for (g, xv) in &msk {
                for (&g, &v) in g.iter().zip(xv) {
                    wg += g as f64;
                    wgx += g as f64 * (v as f64 - saved.mean[ch] as f64) * saved.rstd[ch] as f64;
                }
            }
            assert!((sep.0 as f64 - wg).abs() < 1e-4 * (1.0 + wg.abs()) && (sep.1 as f64 - wgx).abs() < 1e-4 * (1.0 + wgx.abs()), "channel {ch}: {sep:?} vs ({wg}, {wgx})");
        }
        let sums: Vec<(f32, f32)> = (0..c).map(|ch| batchnorm_channel_grad_sums(shape, ch, &masked, &x, saved.mean[ch], saved.rstd[ch])).collect();
        let (mut d1, mut d2) = (vec![0.5; len], vec![0.5; len]);
        for s in 0..n {
            let r = s * c * hw..(s + 1) * c * hw;
            batchnorm_backward_sample(&mut d1[r.clone()], &d_out[r.clone()], &x[r.clone()], 0, &sums, &saved, &gamma, n * hw, hw, Some(&ab), GradWrite::Accumulate);
            batchnorm_backward_sample(&mut d2[r.clone()], &masked[r.clone()], &x[r], 0, &sums, &saved, &gamma, n * hw, hw, None, GradWrite::Accumulate);
        }
        for (i, (p, q)) in d1.iter().zip(&d2).enumerate() {
            assert!(p.to_bits() == q.to_bits() || p.is_nan() && q.is_nan(), "{n}x{c}x{hw}: d_x[{i}] {p} vs {q}");
        }
        // Overwriting a buffer holding stale values equals accumulating into zeros.
        let (mut d3, mut d4) = (vec![7.25; len], vec![0.0; len]);
        for s in 0..n {
            let r = s * c * hw..(s + 1) * c * hw;
            batchnorm_backward_sample(&mut d3[r.clone()], &d_out[r.clone()], &x[r.clone()], 0, &sums, &saved, &gamma, n * hw, hw, Some(&ab), GradWrite::Overwrite);
            batchnorm_backward_sample(&mut d4[r.clone()], &d_out[r.clone()], &x[r], 0, &sums, &saved, &gamma, n * hw, hw, Some(&ab), GradWrite::Accumulate);
        }
        assert_eq!(d3, d4, "{n}x{c}x{hw}: overwrite vs accumulate into zeros");
    }
}

/// `out[c·rows + r] = x[r·cols + c]` per plane: the definition.
fn transposed(x: &[f32], (rows, cols): (usize, usize)) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    for (o, p) in out.chunks_exact_mut(rows * cols).zip(x.chunks_exact(rows * cols)) {
        for r in 0..rows {
            for c in 0..cols {
                o[c * rows + r] = p[r * cols + c];
            }
        }
    }
    out
}

#[test]
fn planes_transpose_and_batch_norm_reads_them_back() {
    let mut rng = StdRng::seed_from_u64(41);
    // Whole 4x4 blocks, ragged edges on either side or both, single rows and columns.
    for (rows, cols) in [(4, 4), (5, 7), (7, 5), (8, 12), (1, 6), (6, 1), (33, 31), (16, 16)] {
        let (n, c) = (3, 5);
        let hw = rows * cols;
        let x = rand_vec(&mut rng, n * c * hw);
        let want = transposed(&x, (rows, cols));
        let mut got = vec![9.0; x.len()];
        transpose_planes(&mut got, &x, (rows, cols));
        assert_eq!(got, want, "{rows}x{cols}");
        // Transposing back gives the input.
        let mut back = vec![9.0; x.len()];
        transpose_planes(&mut back, &got, (cols, rows));
        assert_eq!(back, x, "{rows}x{cols}: twice");
        // Each plane mapped by its own function on the way.
        let mut mapped = vec![9.0; x.len()];
        transpose_planes_map(&mut mapped, &x, (rows, cols), |q| move |v: f32| v * (q as f32 + 0.5) - 1.0);
        let want_mapped: Vec<f32> = want.iter().enumerate().map(|(i, &v)| v * ((i / hw) as f32 + 0.5) - 1.0).collect();
        assert_eq!(mapped, want_mapped, "{rows}x{cols}: mapped");

        // Batch norm's backward with d_out stored transposed: the same sums and input
        // gradient, bit for bit, as with d_out in x's orientation (the input gradient reading
        // the planes the sums' pass turned).
        let d_out = rand_vec(&mut rng, n * c * hw);
        let d_out_t = transposed(&d_out, (rows, cols));
        let saved = BnSaved { mean: rand_vec(&mut rng, c), rstd: (0..c).map(|_| rng.random_range(0.5f32..2.0)).collect() };
        let gamma = rand_vec(&mut rng, c);
        let ab: Vec<(f32, f32)> = (0..c).map(|_| (rng.random_range(0.5f32..2.0), rng.random_range(-0.5f32..0.5))).collect();
        for relu in [None, Some(&ab[..])] {
            // Each channel's sums over its planes in x's orientation; then the same sums from
            // each sample's terms (all channels, one sample at a time), added in sample order:
            // bit for bit, with d_out in either orientation.
            let sums: Vec<(f32, f32)> = (0..c)
                .map(|ch| {
                    let planes = (0..n).map(|s| (&d_out[(s * c + ch) * hw..(s * c + ch + 1) * hw], &x[(s * c + ch) * hw..(s * c + ch + 1) * hw]));
                    batchnorm_grad_sums(planes, saved.mean[ch], saved.rstd[ch], relu.map(|r| r[ch]))
                })
                .collect();
            let mut turned = Vec::new();
            for (d, layout) in [(&d_out, GradPlanes::Same), (&d_out_t, GradPlanes::Transposed(rows, cols))] {
                let mut parts = vec![(f64::NAN, f64::NAN); n * c];
                let mut d = d.clone();
                for (s, p) in parts.chunks_exact_mut(c).enumerate() {
                    let r = s * c * hw..(s + 1) * c * hw;
                    batchnorm_sample_grad_sums(p, &mut d[r.clone()], &x[r], hw, &saved.mean, relu, layout);
                }
                assert_eq!(batchnorm_finish_grad_sums(&parts, &saved.rstd), sums, "{rows}x{cols} {layout:?}: sums by sample");
                // Transposed planes are left in x's orientation for the input gradient's pass.
                assert_eq!(d, d_out, "{rows}x{cols} {layout:?}: d_out after the sums");
                turned = d;
            }
            for write in [GradWrite::Accumulate, GradWrite::Overwrite] {
                let (mut want, mut got) = (vec![0.25; x.len()], vec![0.25; x.len()]);
                for s in 0..n {
                    let r = s * c * hw..(s + 1) * c * hw;
                    batchnorm_backward_sample(&mut want[r.clone()], &d_out[r.clone()], &x[r.clone()], 0, &sums, &saved, &gamma, n * hw, hw, relu, write);
                    batchnorm_backward_sample(&mut got[r.clone()], &turned[r.clone()], &x[r], 0, &sums, &saved, &gamma, n * hw, hw, relu, write);
                }
                assert_eq!(got, want, "{rows}x{cols} {write:?}: input gradient");
            }
        }
    }
}
