//! `entry::flush_denormals`: denormal results become zero on the calling thread, normal ones
//! are untouched, and other threads keep their own setting.
#![cfg(feature = "jit")]

use cnnc_compiler::lower::entry::flush_denormals;
use std::hint::black_box;

/// Half the smallest normal f32, computed at run time: a denormal unless flushed.
fn half_min() -> f32 {
    black_box(f32::MIN_POSITIVE) * black_box(0.5f32)
}

#[test]
#[cfg(target_arch = "x86_64")]
fn flushes_on_the_calling_thread() {
    std::thread::spawn(|| {
        assert!(half_min() > 0.0, "denormals are kept by default");
        flush_denormals();
        assert_eq!(half_min(), 0.0, "flushed after the call");
        // Normal numbers are untouched.
        assert_eq!(black_box(3.0f32) * black_box(0.5f32), 1.5);
    })
    .join()
    .unwrap();
    assert!(half_min() > 0.0, "the test's own thread keeps its setting");
}
