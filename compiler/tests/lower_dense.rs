//! Dense kernels (blocked and naive) against nested loops, odd sizes and batches (including
//! batches past the 32-sample weight-gradient block), fused activations, bad buffers.
#![cfg(feature = "jit")]

use cnnc_compiler::ir::Dense;
use cnnc_compiler::lower::{DenseKernels, FusedAct, Mode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: element {i}: got {g}, want {w}");
    }
}

#[test]
fn dense_matches_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    for &(i, o) in &[(1, 1), (5, 3), (13, 17), (64, 10), (37, 9)] {
        for &n in &[1, 3, 33, 70] {
            for mode in [Mode::Blocked, Mode::Naive] {
                for (bias, act) in [(true, FusedAct::None), (false, FusedAct::Relu), (true, FusedAct::LeakyRelu(0.05))] {
                    let what = format!("dense {i}->{o} batch {n} {mode:?} bias {bias} {act:?}");
                    let k = DenseKernels::compile("fc", &Dense { out_features: o, bias }, i, act, mode).unwrap();
                    let x = rand_vec(&mut rng, n * i);
                    let w = rand_vec(&mut rng, o * i);
                    let b = rand_vec(&mut rng, o);
                    let mut want = vec![0.0f32; n * o];
                    for s in 0..n {
                        for oo in 0..o {
                            let mut t: f32 = (0..i).map(|ii| x[s * i + ii] * w[oo * i + ii]).sum();
                            if bias {
                                t += b[oo];
                            }
                            want[s * o + oo] = match act {
                                FusedAct::None => t,
                                FusedAct::Relu => t.max(0.0),
                                FusedAct::LeakyRelu(sl) => if t > 0.0 { t } else { sl * t },
                            };
                        }
                    }
                    let mut out = rand_vec(&mut rng, n * o);
                    k.forward(&mut out, &x, &w, bias.then_some(&b[..])).unwrap();
                    close(&out, &want, &format!("{what}: forward"));

                    let dout = rand_vec(&mut rng, n * o);
                    let mut dx = rand_vec(&mut rng, n * i);
                    let mut want_dx = dx.clone();
                    for s in 0..n {
                        for ii in 0..i {
                            want_dx[s * i + ii] += (0..o).map(|oo| dout[s * o + oo] * w[oo * i + ii]).sum::<f32>();
                        }
                    }
                    k.backward_data(&mut dx, &dout, &w).unwrap();
                    close(&dx, &want_dx, &format!("{what}: backward data"));

                    let mut dw = rand_vec(&mut rng, o * i);
                    let mut db = rand_vec(&mut rng, o);
                    let (mut want_dw, mut want_db) = (dw.clone(), db.clone());
                    for oo in 0..o {
                        for ii in 0..i {
                            want_dw[oo * i + ii] += (0..n).map(|s| dout[s * o + oo] * x[s * i + ii]).sum::<f32>();
                        }
                        want_db[oo] += (0..n).map(|s| dout[s * o + oo]).sum::<f32>();
                    }
                    k.backward_weight(&mut dw, bias.then_some(&mut db[..]), &dout, &x).unwrap();
                    close(&dw, &want_dw, &format!("{what}: backward weight"));
                    if bias {
                        close(&db, &want_db, &format!("{what}: bias gradient"));
                    }
                }
            }
        }
    }
}

#[test]
fn dense_bad_buffers_are_errors() {
    let k = DenseKernels::compile("fc9", &Dense { out_features: 4, bias: true }, 6, FusedAct::None, Mode::Blocked).unwrap();
    let (x, w, b) = (vec![1.0; 12], vec![1.0; 24], vec![1.0; 4]);
    let mut out = vec![0.0; 8];
    let e = k.forward(&mut out[1..], &x, &w, Some(&b)).unwrap_err();
    assert!(e.to_string().contains("fc9"), "{e}");
    assert!(k.forward(&mut out, &x[1..], &w, Some(&b)).is_err());
    assert!(k.forward(&mut out, &x, &w, None).is_err());
    let mut dx = vec![0.0; 12];
    assert!(k.backward_data(&mut dx, &out[1..], &w).is_err());
    let mut dw = vec![0.0; 24];
    assert!(k.backward_weight(&mut dw, None, &out, &x).is_err());
    assert!(DenseKernels::compile("fc", &Dense { out_features: 0, bias: true }, 6, FusedAct::None, Mode::Blocked).is_err());
}

/// `backward_data_with` (the contract of `ConvKernels::backward_data_with`): the hook sees each
/// sample's `d_out` row once, in order; the input gradient is bit for bit plain backward data
/// on the rows the hook finished, which stay in `d_out`; a hook's error is the call's.
#[test]
fn dense_backward_data_with_a_hook() {
    use cnnc_compiler::lower::GradHook;
    let mut rng = StdRng::seed_from_u64(23);
    for mode in [Mode::Blocked, Mode::Naive] {
        let (i, o, n) = (13, 9, 5);
        let k = DenseKernels::compile("fc", &Dense { out_features: o, bias: true }, i, FusedAct::Relu, mode).unwrap();
        let w = rand_vec(&mut rng, o * i);
        let d0 = rand_vec(&mut rng, n * o);
        let y = rand_vec(&mut rng, n * o);
        let masked: Vec<f32> = d0.iter().zip(&y).map(|(&d, &y)| if y > 0.0 { d } else { 0.0 }).collect();
        let mut want = rand_vec(&mut rng, n * i);
        let mut got = want.clone();
        k.backward_data(&mut want, &masked, &w).unwrap();
        let mut d = d0.clone();
        let mut seen = Vec::new();
        let mut hook = |s: usize, row: &mut [f32]| {
            assert_eq!(row, &d0[s * o..(s + 1) * o], "{mode:?}: sample {s}'s row");
            row.iter_mut().zip(&y[s * o..]).for_each(|(v, &y)| *v = if y > 0.0 { *v } else { 0.0 });
            seen.push(s);
            Ok(())
        };
        k.backward_data_with(&mut got, &mut d, &w, GradHook(&mut hook)).unwrap();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{mode:?}");
        assert_eq!(got, want, "{mode:?}: input gradient");
        assert_eq!(d, masked, "{mode:?}: finished rows left in d_out");
        let mut fail = |s: usize, _: &mut [f32]| if s == 2 { Err(cnnc_compiler::Error::Codegen { layer: "fc".into(), message: "hook failed".into() }) } else { Ok(()) };
        let e = k.backward_data_with(&mut got, &mut d, &w, GradHook(&mut fail)).unwrap_err();
        assert!(e.to_string().contains("hook failed"), "{e}");
    }
}
