//! Compile-time diagnostics of `cnn_model!` (trybuild): each `tests/ui/<kind>/<case>.rs` must
//! fail to compile with exactly the errors in its `.stderr`, pointing at the offending token;
//! `tests/ui/pass` must compile and run. Regenerate with `TRYBUILD=overwrite` and read the diff.
//! One test function, so the cases share a single build.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/shape/*.rs");
    t.compile_fail("tests/ui/lang/*.rs");
    t.compile_fail("tests/ui/file/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
