//! Helpers shared by the Winograd kernel tests (`lower_winograd.rs`, `lower_winograd1d.rs`).
#![allow(dead_code)]

use cnnc_compiler::lower::pointwise::{plane_stats, PlaneStats};
use cnnc_compiler::lower::{ChannelSlice, Epilogue, EpilogueArgs, FusedAct, SampleHook};
use rand::rngs::StdRng;
use rand::Rng;

/// `n` values uniform in `[-1, 1)`: random, never all zero.
pub fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Index in an `[n, cin, h, w]` tensor of the input under padded position `(py, px)` (output
/// pixel plus kernel tap) of sample `s`, channel `ci`, with paddings `[top, bottom, left,
/// right]`; `None` in the padding.
#[allow(clippy::too_many_arguments)]
pub fn tap(s: usize, ci: usize, cin: usize, (h, wd): (usize, usize), p: [usize; 4], py: usize, px: usize) -> Option<usize> {
    let (iy, ix) = (py.checked_sub(p[0])?, px.checked_sub(p[2])?);
    (iy < h && ix < wd).then(|| ((s * cin + ci) * h + iy) * wd + ix)
}

/// Batch 1 on a plain output gradient, batch 3 reading a concat slice of it.
pub fn batches(cout: usize) -> [(usize, Option<ChannelSlice>); 2] {
    [(1, None), (3, Some(ChannelSlice { total: cout + 4, offset: 3 }))]
}

/// Every fused epilogue of a forward kernel against the plain convolution `base` (`[n, cout,
/// pix]`, bias `b` included): bias on every other epilogue, folded batch norm, residual,
/// activations, accumulation into a random output, concat slices; every epilogue that does not
/// accumulate also stores its planes' batch statistics ([`check_stats`]). `run(epi, bias, out,
/// extra)` compiles the layer for `epi` (with or without its bias `b`) and runs its forward
/// into `out`.
#[allow(clippy::too_many_arguments)]
pub fn check_epilogues(rng: &mut StdRng, base: &[f32], b: &[f32], n: usize, cout: usize, pix: usize, what: &str, run: impl Fn(Epilogue, bool, &mut [f32], EpilogueArgs<'_>)) {
    let scale = rand_vec(rng, cout);
    let shift = rand_vec(rng, cout);
    let res = rand_vec(rng, n * cout * pix);
    let scale_of_out = base.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let epis = [
        Epilogue::default(),
        Epilogue { affine: true, residual: true, act: FusedAct::Relu, ..Default::default() },
        Epilogue { act: FusedAct::LeakyRelu(0.1), accumulate: true, ..Default::default() },
        Epilogue { concat: Some(ChannelSlice { total: cout + 5, offset: 3 }), residual: true, ..Default::default() },
        Epilogue { affine: true, accumulate: true, concat: Some(ChannelSlice { total: cout + 2, offset: 2 }), ..Default::default() },
        Epilogue { residual: true, act: FusedAct::LeakyRelu(0.2), ..Default::default() },
    ];
    for (e, epi) in epis.into_iter().enumerate() {
        // Every other epilogue on a layer without bias.
        let bias = e % 2 == 0;
        let what = format!("{what} bias {bias} {epi:?}");
        let cs = epi.concat.unwrap_or(ChannelSlice { total: cout, offset: 0 });
        let out0 = rand_vec(rng, n * cs.total * pix);
        let mut want = out0.clone();
        for s in 0..n {
            for co in 0..cout {
                for q in 0..pix {
                    let i = (s * cout + co) * pix + q;
                    let mut t = if bias { base[i] } else { base[i] - b[co] };
                    if epi.affine {
                        t = t * scale[co] + shift[co];
                    }
                    if epi.residual {
                        t += res[i];
                    }
                    t = epi.act.apply(t);
                    let o = &mut want[(s * cs.total + cs.offset + co) * pix + q];
                    *o = if epi.accumulate { *o + t } else { t };
                }
            }
        }
        let mut out = out0.clone();
        let mut stats = vec![PlaneStats { len: -1.0, ..Default::default() }; n * cout];
        // What the per-sample hook saw: (sample, its planes), in call order.
        let mut seen: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut hook = |s: usize, planes: &[f32]| {
            seen.push((s, planes.to_vec()));
            Ok(())
        };
        let extra = EpilogueArgs {
            affine: epi.affine.then_some((&scale[..], &shift[..])),
            residual: epi.residual.then_some(&res[..]),
            stats: (!epi.accumulate).then_some(&mut stats[..]),
            after_sample: (!epi.accumulate).then_some(SampleHook(&mut hook)),
        };
        run(epi, bias, &mut out, extra);
        if !epi.accumulate {
            check_stats(&stats, &out, n, cout, pix, cs, &what);
            check_hook(&seen, &out, n, cout, pix, cs, &what);
        }
        let tol = 1e-5 * scale_of_out.max(1.0) * 4.0;
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= tol + 1e-5 * w.abs(), "{what}: element {i}: got {g}, want {w}");
        }
    }
}

/// `got` within `rel` of `want`'s largest magnitude (at least 1), element by element.
pub fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= rel * scale, "{what}: element {i}: got {g}, want {w}");
    }
}

/// The per-sample hook (`EpilogueArgs::after_sample`) ran once per sample, in order, on
/// exactly the planes the forward stored for it in `out` (`[n, cs.total, pix]`).
pub fn check_hook(seen: &[(usize, Vec<f32>)], out: &[f32], n: usize, cout: usize, pix: usize, cs: ChannelSlice, what: &str) {
    let order: Vec<usize> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>(), "{what}: hook calls");
    for (s, planes) in seen {
        assert_eq!(planes.as_slice(), &out[(s * cs.total + cs.offset) * pix..][..cout * pix], "{what}: hook planes of sample {s}");
    }
}

/// `stats` (`[n, cout]`, from a forward's `EpilogueArgs::stats`) are exactly the
/// [`plane_stats`] of the planes the forward stored in `out` (`[n, cs.total, pix]`, its
/// channels at `cs.offset`).
pub fn check_stats(stats: &[PlaneStats], out: &[f32], n: usize, cout: usize, pix: usize, cs: ChannelSlice, what: &str) {
    assert_eq!(stats.len(), n * cout, "{what}: statistics length");
    for s in 0..n {
        for co in 0..cout {
            let plane = &out[(s * cs.total + cs.offset + co) * pix..][..pix];
            assert_eq!(stats[s * cout + co], plane_stats(plane), "{what}: statistics of sample {s} channel {co}");
        }
    }
}
