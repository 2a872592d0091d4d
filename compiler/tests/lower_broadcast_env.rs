//! `CNNC_BROADCAST` with a value other than `folded`, `mixed` or `lanes`: every JIT module
//! refuses to build, with an error naming the variable and the value (its own test binary:
//! the host's choice is made once per process).
#![cfg(feature = "jit")]

use cnnc_compiler::lower::gemm::Broadcast;
use cnnc_compiler::lower::jit::Jit;

#[test]
fn a_bad_broadcast_variable_is_an_error_naming_it() {
    std::env::set_var("CNNC_BROADCAST", "wide");
    let err = Jit::new("conv3").err().expect("a bad CNNC_BROADCAST must be an error").to_string();
    assert!(err.contains("conv3") && err.contains("CNNC_BROADCAST=\"wide\"") && err.contains("\"lanes\""), "{err}");
    assert!(Broadcast::host_summary().contains("CNNC_BROADCAST=\"wide\""));
    // An explicit variant needs no host choice.
    assert!(Jit::with_broadcast("conv3", Broadcast::Lanes).is_ok());
}
