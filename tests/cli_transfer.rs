//! `cnnc train` transfer learning on the bundled digits, briefly (`--limit`): pre-train, then
//! fine-tune from the checkpoint with a fresh head (`--init-from --skip`), frozen features
//! (`--freeze`, whose weights must come out bit-identical) and learning-rate multipliers
//! (`--lr-mult`, a 0 multiplier leaves a layer untouched); a head of another shape without
//! `--skip`, unknown layers and malformed flags fail cleanly with messages naming them.

mod common;

use common::{at, cnnc, cnnc_fails_with, TempDir};
use cnnc::runtime::checkpoint;

fn tensor(path: &std::path::Path, name: &str) -> Vec<f32> {
    let c = checkpoint::load(path).unwrap_or_else(|e| panic!("{e}"));
    c.get(name).unwrap_or_else(|| panic!("{name} not in {}", path.display())).2.clone()
}

fn run_ok(args: &[&str]) -> String {
    let out = cnnc(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "cnnc {args:?} failed:\n{err}");
    err
}

#[test]
fn pretrain_then_finetune_a_fresh_head_on_frozen_features() {
    let dir = TempDir::new("cli-transfer");
    let lenet = at("examples/models/lenet5.cnn");
    let lenet = lenet.to_str().unwrap();
    let pre = dir.join("pre.safetensors");
    let ft = dir.join("ft.safetensors");
    let (pre_s, ft_s) = (pre.to_str().unwrap(), ft.to_str().unwrap());
    run_ok(&["train", lenet, "--epochs", "1", "--limit", "256", "--batch", "32", "--checkpoint", pre_s]);
    let err = run_ok(&[
        "train", lenet, "--epochs", "1", "--limit", "256", "--batch", "32", "--seed", "3",
        "--init-from", pre_s, "--skip", "fc3", "--freeze", "conv1,conv2", "--lr-mult", "fc1=0,fc2=0.1",
        "--checkpoint", ft_s,
    ]);
    assert!(err.contains("loaded 8 tensors: conv1.weight, conv1.bias, conv2.weight"), "{err}");
    assert!(err.contains("skipped 2 tensors: fc3.weight, fc3.bias"), "{err}");
    assert!(err.contains("Frozen conv1, conv2: backward drops") && err.contains("(89.1%)"), "{err}");
    // Frozen layers and a 0 multiplier: exactly the pre-trained weights.
    for name in ["conv1.weight", "conv1.bias", "conv2.weight", "fc1.weight", "fc1.bias"] {
        assert_eq!(tensor(&ft, name), tensor(&pre, name), "{name} changed");
    }
    // fc2 trained (at a tenth of the rate); fc3 is fresh (another seed) and trained.
    assert_ne!(tensor(&ft, "fc2.weight"), tensor(&pre, "fc2.weight"));
    assert_ne!(tensor(&ft, "fc3.weight"), tensor(&pre, "fc3.weight"));
    // Freezing is not architecture: the fine-tuned checkpoint evaluates on the plain model.
    let out = cnnc(["eval", lenet, "--checkpoint", ft_s]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("on 2000 held-out images: accuracy"));

    // A head of another shape must be skipped: the error names the tensor and both shapes.
    let other = dir.join("wide.cnn");
    std::fs::write(&other, "model Wide(input: 1x28x28) {\n    conv1: conv(6, 5x5); relu;\n    pool1: maxpool(2x2, stride=2);\n    conv2: conv(16, 5x5); relu;\n    pool2: maxpool(2x2, stride=2);\n    flatten;\n    fc1: dense(120); relu;\n    fc2: dense(64); relu;\n    fc3: dense(10);\n}\n").unwrap();
    let other = other.to_str().unwrap();
    cnnc_fails_with(["train", other, "--epochs", "1", "--limit", "64", "--init-from", pre_s], &["--init-from", "`fc2.weight`", "[84, 120]", "[64, 120]", "skip layer `fc2`"]);
    // ... and with the changed layers skipped, it trains (fc3's input changed too).
    let err = run_ok(&["train", other, "--epochs", "1", "--limit", "64", "--init-from", pre_s, "--skip", "fc2,fc3"]);
    assert!(err.contains("loaded 6 tensors") && err.contains("skipped 4 tensors"), "{err}");

    // Clean failures.
    cnnc_fails_with(["train", lenet, "--epochs", "1", "--limit", "64", "--init-from", pre_s, "--skip", "fc9"], &["skip `fc9`", "has that name"]);
    cnnc_fails_with(["train", lenet, "--epochs", "1", "--limit", "64", "--lr-mult", "fcx=0.1"], &["--lr-mult fcx=0.1", "no parameter of LeNet5 starts with `fcx`"]);
    cnnc_fails_with(["train", lenet, "--epochs", "1", "--limit", "64", "--lr-mult", "fc1"], &["not PREFIX=MULTIPLIER"]);
    cnnc_fails_with(["train", lenet, "--epochs", "1", "--limit", "64", "--lr-mult", "fc1=-1"], &["fc1", "must be finite and >= 0"]);
    cnnc_fails_with(["train", lenet, "--epochs", "1", "--limit", "64", "--skip", "fc3"], &["--init-from"]);
    let missing = dir.join("missing.safetensors");
    cnnc_fails_with(["train", lenet, "--epochs", "1", "--limit", "64", "--init-from", missing.to_str().unwrap()], &["--init-from", "missing.safetensors"]);
}
