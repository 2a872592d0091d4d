//! Optimiser updates checked against numbers derived by hand from the torch.optim formulas,
//! convergence on a quadratic, multipliers and state export/import.

use cnnc_runtime::optim::*;

fn close(a: f32, b: f64, tol: f64, what: &str) {
    assert!((a as f64 - b).abs() <= tol, "{what}: got {a}, want {b}");
}

/// Runs `steps` updates of a 1-element tensor from p = 1 with the given gradients.
fn run(cfg: &OptimizerConfig, grads: &[f32], lr: f32) -> Vec<f32> {
    let mut p = [1.0f32];
    let mut st = cfg.new_state(1);
    let mut out = Vec::new();
    for (k, &g) in grads.iter().enumerate() {
        cfg.step(&mut p, &[g], &mut st, k as u64 + 1, lr).unwrap();
        out.push(p[0]);
    }
    out
}

#[test]
fn sgd_plain_weight_decay_momentum_nesterov() {
    // p -= lr * g: 1 - 0.1 * 0.5 = 0.95.
    close(run(&OptimizerConfig::sgd(0.1), &[0.5], 0.1)[0], 0.95, 1e-7, "plain");
    // L2: g = 0.5 + 0.1 * 1 = 0.6, p = 1 - 0.06 = 0.94.
    close(run(&OptimizerConfig::sgd(0.1).with_weight_decay(0.1), &[0.5], 0.1)[0], 0.94, 1e-7, "wd");
    // Momentum 0.9, g = 0.5 twice: b1 = 0.5, p1 = 0.95; b2 = 0.45 + 0.5 = 0.95, p2 = 0.95 - 0.095 = 0.855.
    let r = run(&OptimizerConfig::sgd_momentum(0.1, 0.9, false), &[0.5, 0.5], 0.1);
    close(r[0], 0.95, 1e-7, "momentum 1");
    close(r[1], 0.855, 1e-6, "momentum 2");
    // Nesterov: b1 = 0.5, d1 = 0.5 + 0.45 = 0.95, p1 = 0.905;
    // b2 = 0.95, d2 = 0.5 + 0.855 = 1.355, p2 = 0.905 - 0.1355 = 0.7695.
    let r = run(&OptimizerConfig::sgd_momentum(0.1, 0.9, true), &[0.5, 0.5], 0.1);
    close(r[0], 0.905, 1e-6, "nesterov 1");
    close(r[1], 0.7695, 1e-6, "nesterov 2");
    // The lr argument (not the config's) is what is used: lr 0 -> no move.
    close(run(&OptimizerConfig::sgd(0.1), &[0.5], 0.0)[0], 1.0, 0.0, "lr 0");
}

#[test]
fn rmsprop_plain_centered_momentum() {
    // v1 = 0.01 * 0.25 = 0.0025, den = 0.05, p1 = 1 - 0.01 * 0.5 / 0.05 = 0.9.
    // v2 = 0.99 * 0.0025 + 0.0025 = 0.004975, den = 0.0705336, p2 = 0.9 - 0.01 * 7.08881 = 0.8291119.
    let r = run(&OptimizerConfig::rmsprop(0.01), &[0.5, 0.5], 0.01);
    close(r[0], 0.9, 1e-6, "rms 1");
    close(r[1], 0.8291119, 2e-6, "rms 2");
    // Centred: a1 = 0.005, den = sqrt(0.0025 - 0.000025) = 0.0497494, p1 = 1 - 0.0100504 = 0.8994962.
    let c = OptimizerConfig::RmsProp { lr: 0.01, alpha: 0.99, eps: 1e-8, momentum: 0.0, weight_decay: 0.0, centered: true };
    close(run(&c, &[0.5], 0.01)[0], 0.8994962, 2e-6, "centred");
    // Momentum 0.9: b1 = 10, p1 = 0.9; b2 = 9 + 7.08881 = 16.08881, p2 = 0.9 - 0.1608881 = 0.7391119.
    let m = OptimizerConfig::RmsProp { lr: 0.01, alpha: 0.99, eps: 1e-8, momentum: 0.9, weight_decay: 0.0, centered: false };
    let r = run(&m, &[0.5, 0.5], 0.01);
    close(r[0], 0.9, 1e-6, "rms mom 1");
    close(r[1], 0.7391119, 2e-6, "rms mom 2");
    assert_eq!(m.buffer_names(), &["square_avg", "momentum_buffer"]);
}

#[test]
fn adam_first_step_is_lr_times_sign_and_second_by_hand() {
    // Step 1: m = 0.1 g, v = 0.001 g^2, m/(1-b1) = g, v/(1-b2) = g^2, so the move is
    // lr * g / (|g| + eps) = lr * sign(g) (eps -> 0), whatever |g|.
    for g in [0.5f32, -3.0, 1e-3, 250.0] {
        let p = run(&OptimizerConfig::adam(0.001), &[g], 0.001)[0];
        close(p, 1.0 - 0.001 * g.signum() as f64, 1e-6, "adam step 1");
    }
    // g1 = 0.5, g2 = -0.25: m2 = 0.045 - 0.025 = 0.02, v2 = 0.999 * 0.00025 + 0.001 * 0.0625 = 0.00031225,
    // bc1 = 0.19, bc2 = 0.001999: p2 = 0.999 - 0.001 * (0.02 / 0.19) / sqrt(0.00031225 / 0.001999)
    //    = 0.999 - 0.001 * 0.1052632 / 0.3952252 = 0.9987337.
    let cfg = OptimizerConfig::adam(0.001);
    let r = run(&cfg, &[0.5, -0.25], 0.001);
    close(r[1], 0.9987337, 1e-6, "adam step 2");
    let mut p = [1.0f32];
    let mut st = State::default(); // lazily initialised
    cfg.step(&mut p, &[0.5], &mut st, 1, 0.001).unwrap();
    cfg.step(&mut p, &[-0.25], &mut st, 2, 0.001).unwrap();
    close(st.buffer("exp_avg").unwrap()[0], 0.02, 1e-8, "exp_avg");
    close(st.buffer("exp_avg_sq").unwrap()[0], 0.00031225, 1e-9, "exp_avg_sq");
    // A constant gradient moves every step by lr (bias correction makes m^ = g, v^ = g^2).
    let r = run(&cfg, &[0.5; 10], 0.001);
    close(r[9], 0.99, 1e-5, "ten constant steps");
}

#[test]
fn adam_l2_versus_adamw_decoupled() {
    // Adam + L2 (wd 0.1): g = 0.5 + 0.1 = 0.6; first step is still lr * sign: p1 = 0.99.
    let l2 = OptimizerConfig::adam(0.01).with_weight_decay(0.1);
    close(run(&l2, &[0.5], 0.01)[0], 0.99, 1e-6, "adam L2");
    // AdamW: p *= 1 - 0.01 * 0.1 = 0.999, then - 0.01 * sign(0.5): p1 = 0.989.
    // Step 2 (g = -0.25, moments as in the Adam test): p2 = 0.989 * 0.999 - 0.01 * 0.2663371 = 0.9853476.
    let w = OptimizerConfig::adamw(0.01, 0.1);
    assert_eq!(w.name(), "AdamW");
    let r = run(&w, &[0.5, -0.25], 0.01);
    close(r[0], 0.989, 1e-6, "adamw 1");
    close(r[1], 0.9853476, 2e-6, "adamw 2");
    // With a zero gradient AdamW still decays (m = v = 0, so only the decay acts); Adam+L2 moves by lr.
    close(run(&w, &[0.0], 0.01)[0], 0.999, 1e-7, "adamw zero grad");
}

#[test]
fn all_converge_on_an_ill_conditioned_quadratic() {
    // f(p) = 1/2 sum a_i (p_i - c_i)^2, grad = a_i (p_i - c_i), a spans 100x.
    let a = [1.0f32, 10.0, 0.1, 3.0, 7.0];
    let c = [0.5f32, -2.0, 3.0, 1.5, -0.7];
    let configs = [
        (OptimizerConfig::sgd(0.15), 2000),
        (OptimizerConfig::sgd_momentum(0.05, 0.9, false), 1000),
        (OptimizerConfig::sgd_momentum(0.05, 0.9, true), 1000),
        (OptimizerConfig::rmsprop(0.01), 2000),
        (OptimizerConfig::adam(0.05), 2000),
    ];
    for (cfg, steps) in configs {
        let mut p = [0.0f32; 5];
        let mut st = cfg.new_state(5);
        for t in 1..=steps {
            let g: Vec<f32> = (0..5).map(|i| a[i] * (p[i] - c[i])).collect();
            cfg.step(&mut p, &g, &mut st, t, cfg.lr()).unwrap();
        }
        for i in 0..5 {
            assert!((p[i] - c[i]).abs() < 0.02, "{} did not converge: p = {p:?}, c = {c:?}", cfg.name());
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = OptimizerConfig::adam(0.01);
    let mut st = cfg.new_state(2);
    let mut p = [0.0f32; 2];
    assert!(cfg.step(&mut p, &[1.0], &mut st, 1, 0.01).unwrap_err().0.contains("gradient has 1"));
    assert!(cfg.step(&mut p, &[1.0, 1.0], &mut st, 0, 0.01).is_err());
    assert!(cfg.step(&mut p, &[1.0, 1.0], &mut st, 1, f32::NAN).is_err());
    let mut wrong = cfg.new_state(3);
    assert!(cfg.step(&mut p, &[1.0, 1.0], &mut wrong, 1, 0.01).is_err());
    let mut sgd_state = OptimizerConfig::sgd_momentum(0.1, 0.9, false).new_state(2);
    assert!(cfg.step(&mut p, &[1.0, 1.0], &mut sgd_state, 1, 0.01).is_err());
    assert!(OptimizerConfig::sgd_momentum(0.1, 0.0, true).validate().is_err());
    assert!(OptimizerConfig::Adam { lr: 0.1, beta1: 1.0, beta2: 0.9, eps: 1e-8, weight_decay: 0.0, decoupled_weight_decay: false }
        .validate()
        .is_err());
    assert!(Optimizer::new(OptimizerConfig::sgd(-1.0)).is_err());
    assert_eq!(p, [0.0, 0.0], "failed steps leave the parameter alone");
}

#[test]
fn multipliers_freeze_and_scale() {
    let m = LrMultipliers::new().set("backbone.", 0.1).unwrap().set("backbone.fc", 1.0).unwrap().set("frozen", 0.0).unwrap();
    assert_eq!(m.get("backbone.conv1.weight"), 0.1);
    assert_eq!(m.get("backbone.fc.weight"), 1.0);
    assert_eq!(m.get("head.weight"), 1.0);
    assert!(LrMultipliers::new().set("x", -1.0).is_err());

    let mut opt = Optimizer::new(OptimizerConfig::sgd(1.0)).unwrap().with_multipliers(m);
    let (mut a, mut b, mut f) = ([1.0f32], [1.0f32], [1.0f32]);
    assert!(opt.update("head.weight", &mut a, &[1.0], 0.5).is_err(), "before begin_step");
    opt.begin_step();
    opt.update("backbone.conv1.weight", &mut a, &[1.0], 0.5).unwrap();
    opt.update("head.bias", &mut b, &[1.0], 0.5).unwrap();
    opt.update("frozen.w", &mut f, &[1.0], 0.5).unwrap();
    close(a[0], 0.95, 1e-7, "0.1x");
    close(b[0], 0.5, 1e-7, "1x");
    assert_eq!(f[0], 1.0);
    assert!(opt.state("frozen.w").is_none());
    let e = opt.update("head.bias", &mut b, &[1.0, 2.0], 0.5).unwrap_err().0;
    assert!(e.starts_with("tensor head.bias:"), "{e}");
}

#[test]
fn export_import_resumes_identically() {
    let cfg = OptimizerConfig::adam(0.01);
    let grads = |t: u64| -> [Vec<f32>; 2] { [vec![t as f32 * 0.1, -0.3, 0.7], vec![(t as f32).sin()]] };
    let names = ["w", "b"];
    let train = |opt: &mut Optimizer, params: &mut [Vec<f32>; 2], steps: std::ops::Range<u64>| {
        for t in steps {
            opt.begin_step();
            let g = grads(t);
            for k in 0..2 {
                opt.update(names[k], &mut params[k], &g[k], 0.01).unwrap();
            }
        }
    };
    let mut full = Optimizer::new(cfg.clone()).unwrap();
    let mut p_full = [vec![1.0, 2.0, 3.0], vec![0.5]];
    train(&mut full, &mut p_full, 0..6);

    let mut first = Optimizer::new(cfg.clone()).unwrap();
    let mut p = [vec![1.0, 2.0, 3.0], vec![0.5]];
    train(&mut first, &mut p, 0..3);
    let exported = first.export_state();
    assert_eq!(exported.len(), 4);
    assert!(exported.iter().any(|(n, s, _)| n == "w.exp_avg_sq" && s == &vec![3]));
    let mut resumed = Optimizer::new(cfg).unwrap();
    let sizes = [("w".to_string(), 3), ("b".to_string(), 1)];
    resumed.import_state(&exported, &sizes, first.step_count()).unwrap();
    assert_eq!(resumed, first);
    train(&mut resumed, &mut p, 3..6);
    assert_eq!(p, p_full);

    let wrong = [("w".to_string(), 4), ("b".to_string(), 1)];
    assert!(Optimizer::new(OptimizerConfig::adam(0.01)).unwrap().import_state(&exported, &wrong, 3).is_err());
    let fewer = [("w".to_string(), 3)];
    let e = Optimizer::new(OptimizerConfig::adam(0.01)).unwrap().import_state(&exported, &fewer, 3).unwrap_err().0;
    assert!(e.contains("b.exp_avg"), "{e}");
}
