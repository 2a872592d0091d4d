//! Learning-rate schedules at their boundaries.

use cnnc_runtime::optim::*;

fn close(a: f32, b: f32) {
    assert!((a - b).abs() < 1e-6, "got {a}, want {b}");
}

#[test]
fn constant_and_step() {
    let s = Schedule::constant(0.1);
    close(s.lr_at(0), 0.1);
    close(s.lr_at(1_000_000), 0.1);
    // gamma 0.5 every 3: t = 0, 1, 2 -> 0.1; 3..5 -> 0.05; 6 -> 0.025.
    let s = Schedule::step(0.1, 0.5, 3);
    for (t, want) in [(0, 0.1), (2, 0.1), (3, 0.05), (5, 0.05), (6, 0.025), (30, 0.1 * 0.5f32.powi(10))] {
        close(s.lr_at(t), want);
    }
    assert!(Schedule::step(0.1, 0.5, 0).validate().is_err());
}

#[test]
fn cosine_endpoints_midpoint_and_hold() {
    // min + (base - min)(1 + cos(pi t / 10)) / 2 with base 1, min 0.1.
    let s = Schedule::cosine(1.0, 10, 0.1);
    close(s.lr_at(0), 1.0);
    close(s.lr_at(5), 0.55);
    // t = 1: 0.1 + 0.9 * (1 + cos(pi/10)) / 2 = 0.1 + 0.45 * 1.9510565 = 0.9779754.
    close(s.lr_at(1), 0.9779754);
    close(s.lr_at(10), 0.1);
    close(s.lr_at(11), 0.1);
    close(s.lr_at(500), 0.1);
    // Monotone non-increasing.
    for t in 0..12 {
        assert!(s.lr_at(t + 1) <= s.lr_at(t));
    }
    assert!(Schedule::cosine(1.0, 0, 0.0).validate().is_err());
    assert!(Schedule::cosine(1.0, 10, 0.0).validate().is_ok());
}

#[test]
fn warmup_then_decay() {
    // Warm-up 4: 0.25, 0.5, 0.75, 1.0; then cosine over 10 starting at t = 4.
    let s = Schedule::cosine(1.0, 10, 0.0).with_warmup(4);
    for (t, want) in [(0, 0.25), (1, 0.5), (3, 1.0), (4, 1.0), (9, 0.5), (14, 0.0)] {
        close(s.lr_at(t), want);
    }
    let s = Schedule::step(0.2, 0.1, 2).with_warmup(2);
    for (t, want) in [(0, 0.1), (1, 0.2), (2, 0.2), (3, 0.2), (4, 0.02)] {
        close(s.lr_at(t), want);
    }
    assert!(Schedule::constant(f32::NAN).validate().is_err());
}
