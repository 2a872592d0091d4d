//! Helpers shared by the CLI integration tests: the repository root, running the `cnnc` binary,
//! asserting a clean failure (non-zero exit, a message, no panic), a self-deleting
//! temporary directory, and a minimal PNG writer (8-bit grey or RGB, uncompressed deflate) for
//! image inputs.
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
    cnnc_with_env(args, &[])
}

/// [`cnnc`] with the environment variables `env` set.
pub fn cnnc_with_env<I, S>(args: I, env: &[(&str, &str)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(args)
        .envs(env.iter().copied())
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

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Write an 8-bit PNG of `width x height` pixels with `channels` 1 (grey) or 3 (RGB),
/// `pixels` row-major and interleaved (`height * width * channels` bytes).
pub fn write_png(path: &Path, width: usize, height: usize, channels: usize, pixels: &[u8]) {
    assert!(channels == 1 || channels == 3);
    assert_eq!(pixels.len(), width * height * channels);
    let mut raw = Vec::new();
    for row in pixels.chunks(width * channels) {
        raw.push(0u8); // filter: none
        raw.extend_from_slice(row);
    }
    // zlib: header, stored deflate blocks, Adler-32.
    let mut z = vec![0x78u8, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        let n = b.len() as u16;
        z.extend_from_slice(&n.to_le_bytes());
        z.extend_from_slice(&(!n).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut bsum) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65_521;
        bsum = (bsum + a) % 65_521;
    }
    z.extend_from_slice(&((bsum << 16) | a).to_be_bytes());
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        png.extend_from_slice(&c);
        png.extend_from_slice(&crc32(&c).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, if channels == 1 { 0 } else { 2 }, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    std::fs::write(path, png).expect("cannot write the PNG");
}
