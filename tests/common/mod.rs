//! Helpers shared by the CLI integration tests: the repository root, running the `cnnc` binary,
//! asserting a clean failure (non-zero exit, a message, no panic), and a self-deleting
//! temporary directory.
//!
//! Use from a test file with `mod common;` (each test crate compiles its own copy, so some
//! helpers are unused in some crates).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (where `Cargo.toml`, `data/` and `examples/` are).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path under the repository root.
pub fn at(rel: &str) -> PathBuf {
    root().join(rel)
}

/// Run `cnnc` with `args` in the repository root and return its output.
pub fn cnnc<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("cannot start the cnnc binary")
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run `cnnc` with `args`, assert it succeeds, and return its stdout.
pub fn cnnc_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = cnnc(args);
    assert!(out.status.success(), "cnnc failed\n{}", describe(&out));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Run `cnnc` with `args`, assert it fails cleanly (exit code 1 or 2, no panic, no Rust
/// backtrace, a non-empty message) and return its stderr.
pub fn cnnc_fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = cnnc(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "cnnc should have failed\n{}", describe(&out));
    assert!(matches!(out.status.code(), Some(1) | Some(2)), "not a clean exit\n{}", describe(&out));
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "cnnc panicked\n{}", describe(&out));
    assert!(!err.trim().is_empty(), "cnnc failed without a message\n{}", describe(&out));
    err
}

/// [`cnnc_fails`] and assert that stderr contains every one of `needles`.
pub fn cnnc_fails_with<I, S>(args: I, needles: &[&str]) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let err = cnnc_fails(args);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    err
}

/// A fresh directory under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory whose name contains `tag`, the process id and a counter.
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("cnnc-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("cannot create a temp dir");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
