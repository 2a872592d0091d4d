//! Bad input through the `cnnc` binary: each is a clean failure (exit code, a message naming
//! the file and what is wrong, no panic), and nothing is overwritten.
//!
//! - a truncated or corrupt IDX file (the message gives the byte offset);
//! - a corrupt or truncated checkpoint, and one of another architecture (by name, or the same
//!   name with another graph);
//! - an image of the wrong size, or not an image, for `cnnc predict`;
//! - a NaN loss (a huge learning rate): training stops, the previous checkpoint is kept
//!   byte-for-byte and no temporary file is left behind.

mod common;

use cnnc::runtime::data::idx::{encode_idx_images, encode_idx_labels};
use common::{at, cnnc_fails_with, cnnc_ok, write_png, TempDir};
use std::path::Path;

/// A small MNIST-layout directory (raw IDX files): 48 training and 16 held-out 28x28 images
/// of pseudo-random pixels.
fn small_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let px = |n: usize, salt: usize| -> Vec<u8> { (0..n * 784).map(|i| ((i * 2_654_435_761 + salt) >> 7) as u8).collect() };
    let labels = |n: usize| -> Vec<u8> { (0..n).map(|i| (i * 7 % 10) as u8).collect() };
    for (stem, n, salt) in [("train", 48, 1), ("test", 16, 2)] {
        std::fs::write(dir.join(format!("{stem}-images-idx3-ubyte")), encode_idx_images(28, 28, &px(n, salt)).unwrap()).unwrap();
        std::fs::write(dir.join(format!("{stem}-labels-idx1-ubyte")), encode_idx_labels(&labels(n)).unwrap()).unwrap();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn truncated_or_corrupt_idx_files() {
    let t = TempDir::new("err-idx");
    let data = t.join("data");
    small_data(&data);
    let lenet = at("examples/models/lenet5.cnn");
    let images = data.join("train-images-idx3-ubyte");
    let good = std::fs::read(&images).unwrap();

    // Cut 100 bytes into image 5: the message names the file, the byte offset and the image.
    std::fs::write(&images, &good[..16 + 5 * 784 + 100]).unwrap();
    let e = cnnc_fails_with(
        ["train", s(&lenet), "--data", s(&data), "--epochs", "1"],
        &["train-images-idx3-ubyte: truncated at byte 4036", "image 5"],
    );
    assert!(e.starts_with("error: loading data:"), "{e}");

    // Truncated inside the header.
    std::fs::write(&images, &good[..10]).unwrap();
    cnnc_fails_with(["eval", s(&lenet), "--data", s(&data), "--checkpoint", "none.safetensors"], &["truncated at byte 10"]);

    // A label file where the images should be: wrong magic number, at byte 0.
    std::fs::copy(data.join("train-labels-idx1-ubyte"), &images).unwrap();
    cnnc_fails_with(["train", s(&lenet), "--data", s(&data), "--epochs", "1"], &["bad magic number at byte 0", "an IDX label file"]);

    // A truncated gzip stream.
    std::fs::remove_file(&images).unwrap();
    let gz = std::fs::read(at("data/mnist10k/train-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(data.join("train-images-idx3-ubyte.gz"), &gz[..gz.len() / 3]).unwrap();
    cnnc_fails_with(
        ["train", s(&lenet), "--data", s(&data), "--epochs", "1"],
        &["train-images-idx3-ubyte.gz: gzip data corrupt or truncated after decompressed byte"],
    );
}

#[test]
fn corrupt_and_foreign_checkpoints() {
    let t = TempDir::new("err-ckpt");
    let data = t.join("data");
    small_data(&data);
    let lenet = at("examples/models/lenet5.cnn");
    let ckpt = t.join("lenet5.safetensors");
    cnnc_ok(["train", s(&lenet), "--data", s(&data), "--epochs", "1", "--batch", "16", "--checkpoint", s(&ckpt)]);
    let good = std::fs::read(&ckpt).unwrap();

    // Truncated and garbage checkpoints, for every command that reads one.
    let cut = t.join("cut.safetensors");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let junk = t.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a checkpoint at all, just some bytes").unwrap();
    for bad in [&cut, &junk] {
        let name = bad.file_name().unwrap().to_str().unwrap();
        let want = [name, "not a valid safetensors file", "truncated or corrupt"];
        cnnc_fails_with(["eval", s(&lenet), "--data", s(&data), "--checkpoint", s(bad)], &want);
        cnnc_fails_with(["predict", s(&lenet), "--data", s(&data), "--checkpoint", s(bad), "--index", "0"], &want);
        cnnc_fails_with(["train", s(&lenet), "--data", s(&data), "--epochs", "2", "--resume", s(bad)], &want);
    }
    cnnc_fails_with(["eval", s(&lenet), "--data", s(&data), "--checkpoint", s(&t.join("missing.safetensors"))], &["missing.safetensors"]);

    // Another architecture: by name, and under the same name with another graph.
    let other = t.join("other.cnn");
    std::fs::write(&other, "model Other(input: 1x28x28) { conv1: conv(4, 3x3); relu; flatten; fc: dense(10); }\n").unwrap();
    let impostor = t.join("impostor.cnn");
    std::fs::write(&impostor, "model LeNet5(input: 1x28x28) { conv1: conv(6, 5x5); relu; flatten; fc3: dense(10); }\n").unwrap();
    let other_ckpt = t.join("other.safetensors");
    cnnc_ok(["train", s(&other), "--data", s(&data), "--epochs", "1", "--batch", "16", "--checkpoint", s(&other_ckpt)]);
    let want = ["other.safetensors was saved for Other", "but the model is LeNet5"];
    cnnc_fails_with(["eval", s(&lenet), "--data", s(&data), "--checkpoint", s(&other_ckpt)], &want);
    cnnc_fails_with(["predict", s(&lenet), "--data", s(&data), "--checkpoint", s(&other_ckpt), "--index", "1"], &want);
    cnnc_fails_with(["train", s(&lenet), "--data", s(&data), "--epochs", "2", "--resume", s(&other_ckpt)], &want);
    cnnc_fails_with(
        ["predict", s(&impostor), "--data", s(&data), "--checkpoint", s(&ckpt), "--index", "1"],
        &["lenet5.safetensors was saved for LeNet5 with graph fingerprint", "the architecture's definition changed"],
    );
    assert_eq!(std::fs::read(&ckpt).unwrap(), good, "a failed command touched the checkpoint");
}

#[test]
fn predict_rejects_wrong_images() {
    let t = TempDir::new("err-image");
    let data = t.join("data");
    small_data(&data);
    let lenet = at("examples/models/lenet5.cnn");
    let ckpt = t.join("lenet5.safetensors");
    cnnc_ok(["train", s(&lenet), "--data", s(&data), "--epochs", "1", "--batch", "16", "--checkpoint", s(&ckpt)]);

    let small = t.join("small.png");
    write_png(&small, 20, 24, 1, &vec![128; 20 * 24]);
    cnnc_fails_with(
        ["predict", s(&lenet), "--checkpoint", s(&ckpt), "--image", s(&small)],
        &["small.png is 24x20 but model LeNet5 takes 1x28x28 images"],
    );
    let text = t.join("text.png");
    std::fs::write(&text, "not a picture").unwrap();
    cnnc_fails_with(["predict", s(&lenet), "--checkpoint", s(&ckpt), "--image", s(&text)], &["text.png", "cannot decode image"]);
    cnnc_fails_with(
        ["predict", s(&lenet), "--checkpoint", s(&ckpt), "--image", s(&t.join("absent.png"))],
        &["absent.png"],
    );
    cnnc_fails_with(
        ["predict", s(&lenet), "--data", s(&data), "--checkpoint", s(&ckpt), "--index", "16"],
        &["--index 16 is out of range", "holds 16 held-out images"],
    );
    // An RGB image of the right size is converted to grey, as the folder loader does.
    let rgb = t.join("rgb.png");
    write_png(&rgb, 28, 28, 3, &(0..28 * 28 * 3).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let out = cnnc_ok(["predict", s(&lenet), "--checkpoint", s(&ckpt), "--image", s(&rgb)]);
    assert_eq!(out.lines().filter(|l| l.contains(". class ")).count(), 5, "{out}");
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let t = TempDir::new("err-nan");
    let data = t.join("data");
    small_data(&data);
    let lenet = at("examples/models/lenet5.cnn");
    let ckpt = t.join("lenet5.safetensors");
    cnnc_ok(["train", s(&lenet), "--data", s(&data), "--epochs", "1", "--batch", "16", "--checkpoint", s(&ckpt)]);
    let good = std::fs::read(&ckpt).unwrap();
    let kept = format!("the last good checkpoint {} is kept", s(&ckpt));

    // Resumed with an absurd learning rate: the weights blow up, the loss turns NaN/inf.
    let e = cnnc_fails_with(
        ["train", s(&lenet), "--data", s(&data), "--epochs", "3", "--batch", "16", "--lr", "1e30", "--resume", s(&ckpt), "--checkpoint", s(&ckpt)],
        &["loss is", "training stopped", &kept],
    );
    assert!(e.contains("epoch 2,"), "{e}");
    // A fresh run pointed at the same file fails the same way before it ever writes.
    cnnc_fails_with(
        ["train", s(&lenet), "--data", s(&data), "--epochs", "2", "--batch", "16", "--optimizer", "sgd", "--lr", "1e30", "--checkpoint", s(&ckpt)],
        &["loss is", &kept],
    );
    assert_eq!(std::fs::read(&ckpt).unwrap(), good, "the checkpoint changed");
    let leftovers: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
