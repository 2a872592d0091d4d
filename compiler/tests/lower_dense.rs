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
    // A bad input is found before anything is written (the bias gradient included).
    let (mut db, ones) = (vec![0.0; 4], vec![1.0; 8]);
    assert!(k.backward_weight(&mut dw, Some(&mut db), &ones, &x[1..]).is_err());
    assert!(k.backward_weight(&mut dw[1..], Some(&mut db), &ones, &x).is_err());
    assert_eq!((dw.iter().sum::<f32>(), db.iter().sum::<f32>()), (0.0, 0.0));
    assert!(DenseKernels::compile("fc", &Dense { out_features: 0, bias: true }, 6, FusedAct::None, Mode::Blocked).is_err());
}

/// The weight gradient by output-row parts and the input gradient by input-column parts (how
/// the engine splits a large layer across threads) equal the whole calls, for 1 to 5 parts,
/// odd sizes and batches of 1 (a tail block padded to 8), 9 (8 + 1), 40 (32 + 8) and 70;
/// rows and columns outside a part are left alone, and bad ranges are errors.
#[test]
fn row_and_column_parts_equal_the_whole() {
    let mut rng = StdRng::seed_from_u64(22);
    for &(i, o) in &[(37, 9), (64, 10), (21, 33)] {
        for &n in &[1, 9, 40, 70] {
            for mode in [Mode::Blocked, Mode::Naive] {
                let what = format!("dense {i}->{o} batch {n} {mode:?}");
                let k = DenseKernels::compile("fc", &Dense { out_features: o, bias: true }, i, FusedAct::None, mode).unwrap();
                let (x, w, dout) = (rand_vec(&mut rng, n * i), rand_vec(&mut rng, o * i), rand_vec(&mut rng, n * o));
                let mut want_dw = rand_vec(&mut rng, o * i);
                let start_dw = want_dw.clone();
                for oo in 0..o {
                    for ii in 0..i {
                        want_dw[oo * i + ii] += (0..n).map(|s| dout[s * o + oo] * x[s * i + ii]).sum::<f32>();
                    }
                }
                let mut want_dx = rand_vec(&mut rng, n * i);
                let start_dx = want_dx.clone();
                for s in 0..n {
                    for ii in 0..i {
                        want_dx[s * i + ii] += (0..o).map(|oo| dout[s * o + oo] * w[oo * i + ii]).sum::<f32>();
                    }
                }
                for threads in 1..=5 {
                    let rows = k.weight_row_parts(threads);
                    assert_eq!(rows.first().map(|r| r.start), Some(0), "{what}");
                    assert!(rows.windows(2).all(|p| p[0].end == p[1].start) && rows.last().map(|r| r.end) == Some(o), "{what}: {rows:?}");
                    let mut dw = start_dw.clone();
                    for r in &rows {
                        k.backward_weight_rows(&mut dw[r.start * i..r.end * i], r.clone(), &dout, &x).unwrap();
                    }
                    close(&dw, &want_dw, &format!("{what}: weight gradient in {} row parts", rows.len()));
                    // Any row split (the naive kernels' parts are whole: this covers their
                    // sub-ranges too).
                    let width = o.div_ceil(threads);
                    let mut dw = start_dw.clone();
                    for r in (0..o).step_by(width).map(|r| r..(r + width).min(o)) {
                        k.backward_weight_rows(&mut dw[r.start * i..r.end * i], r, &dout, &x).unwrap();
                    }
                    close(&dw, &want_dw, &format!("{what}: weight gradient in rows of {width}"));
                    // (These layers are small: the engine would split their batch instead.)
                    assert_eq!(k.data_col_parts(threads).as_slice(), std::slice::from_ref(&(0..i)), "{what}");
                    let width = i.div_ceil(threads).next_multiple_of(8);
                    let cols: Vec<_> = (0..i).step_by(width).map(|c| c..(c + width).min(i)).collect();
                    let mut dx = start_dx.clone();
                    for c in &cols {
                        // Each part alone touches only its columns.
                        let before = dx.clone();
                        k.backward_data_cols(&mut dx, c.clone(), &dout, &w).unwrap();
                        for (e, (a, b)) in dx.iter().zip(&before).enumerate() {
                            assert!(c.contains(&(e % i)) || a == b, "{what}: column {} changed by part {c:?}", e % i);
                        }
                    }
                    close(&dx, &want_dx, &format!("{what}: input gradient in {} column parts", cols.len()));
                }
                let mut dx = start_dx.clone();
                assert!(k.backward_data_cols(&mut dx, 3..i, &dout, &w).is_err(), "{what}: a part not starting on a panel");
                let mut dw = vec![0.0; o * i];
                assert!(k.backward_weight_rows(&mut dw, 0..o + 1, &dout, &x).is_err(), "{what}: rows past the layer");
            }
        }
    }
}

/// A layer of at least `DATA_SPLIT_MIN_WEIGHTS` weights splits its backward data into
/// column parts of whole panels covering every input column once.
#[test]
fn large_layers_split_their_backward_data_by_columns() {
    let (i, o) = (1030, 260);
    assert!(i * o >= cnnc_compiler::lower::dense::DATA_SPLIT_MIN_WEIGHTS);
    let k = DenseKernels::compile("fc", &Dense { out_features: o, bias: false }, i, FusedAct::None, Mode::Blocked).unwrap();
    for threads in 2..=5 {
        let cols = k.data_col_parts(threads);
        assert!(cols.len() > 1 && cols.len() <= threads, "{threads} threads: {cols:?}");
        assert!(cols.iter().all(|c| c.start % 8 == 0) && cols.windows(2).all(|p| p[0].end == p[1].start) && cols.last().map(|c| c.end) == Some(i), "{cols:?}");
    }
    assert_eq!(k.data_col_parts(1).as_slice(), std::slice::from_ref(&(0..i)));
}

#[test]
fn forward_only_kernels_run_forward_and_refuse_backward() {
    let mut rng = StdRng::seed_from_u64(23);
    let (i, o, n) = (37, 13, 3);
    for mode in [Mode::Blocked, Mode::Naive] {
        let d = Dense { out_features: o, bias: true };
        let part = DenseKernels::compile_forward("fc6_part", &d, i, FusedAct::Relu, mode).unwrap();
        let whole = DenseKernels::compile("fc6", &d, i, FusedAct::Relu, mode).unwrap();
        let (x, w, b) = (rand_vec(&mut rng, n * i), rand_vec(&mut rng, o * i), rand_vec(&mut rng, o));
        let (mut got, mut want) = (rand_vec(&mut rng, n * o), vec![0.0; n * o]);
        part.forward(&mut got, &x, &w, Some(&b)).unwrap();
        whole.forward(&mut want, &x, &w, Some(&b)).unwrap();
        assert_eq!(got, want, "{mode:?}: the forward-only kernel computes what the whole one does");
        let dout = rand_vec(&mut rng, n * o);
        let mut dx = vec![0.0; n * i];
        let e = part.backward_data(&mut dx, &dout, &w).unwrap_err().to_string();
        assert!(e.contains("fc6_part") && e.contains("forward only"), "{mode:?}: {e}");
        let (mut dw, mut db) = (vec![0.0; o * i], vec![0.0; o]);
        let e = part.backward_weight(&mut dw, Some(&mut db), &dout, &x).unwrap_err().to_string();
        assert!(e.contains("fc6_part") && e.contains("forward only"), "{mode:?}: {e}");
        assert!(dx.iter().chain(&dw).chain(&db).all(|&v| v == 0.0), "{mode:?}: nothing written on error");
    }
}
