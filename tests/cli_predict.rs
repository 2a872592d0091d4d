//! `cnnc predict`: top-5 classes of one image, checked against the reference interpreter run
//! in this process on the same checkpoint, normaliser and image; a PNG of a held-out digit
//! gives exactly the answer of `--index` for that digit.

mod common;

use cnnc::compiler::ir::Loss;
use cnnc::compiler::lang;
use cnnc::runtime::data::idx::load_mnist_dir;
use cnnc::runtime::engine::{Engine, ReferenceEngine};
use cnnc::runtime::init::InitConfig;
use cnnc::runtime::params::ParamStore;
use cnnc::runtime::train::load_checkpoint;
use common::{at, cnnc_ok, write_png, TempDir};

/// `(class, probability)` per ranked line of `cnnc predict`'s output.
fn parse(out: &str) -> Vec<(usize, f64)> {
    out.lines()
        .filter_map(|l| l.trim().split_once(". class "))
        .map(|(_, rest)| {
            let (c, p) = rest.split_once(": ").expect("class: probability");
            (c.parse().unwrap(), p.parse().unwrap())
        })
        .collect()
}

#[test]
fn predict_matches_the_reference_interpreter() {
    let dir = TempDir::new("predict");
    let model = at("examples/models/lenet5.cnn");
    let ckpt = dir.join("lenet5.safetensors");
    let (m, c) = (model.to_str().unwrap(), ckpt.to_str().unwrap());
    cnnc_ok(["train", m, "--limit", "640", "--epochs", "1", "--batch", "32", "--lr", "3e-3", "--checkpoint", c]);

    // The oracle: the reference interpreter on the checkpoint's weights and normaliser.
    let g = lang::load_file(&model).unwrap().expand("LeNet5").unwrap();
    let mut params = ParamStore::for_graph(&g, &InitConfig::default(), 0).unwrap();
    let loaded = load_checkpoint(&ckpt, &g, &mut params).unwrap();
    let normalizer = loaded.normalizer.expect("checkpoint records its normaliser");
    let (_, test) = load_mnist_dir(&at("data/mnist10k")).unwrap();
    let mut reference = ReferenceEngine::new(g.clone(), Loss::SoftmaxCrossEntropy);

    for index in [0usize, 17, 1999] {
        let out = cnnc_ok(["predict", m, "--checkpoint", c, "--index", &index.to_string()]);
        assert!(out.contains(&format!("held-out image {index}")), "{out}");
        assert!(out.contains(&format!("(label {})", test.label(index).unwrap())), "{out}");
        let got = parse(&out);
        assert_eq!(got.len(), 5, "{out}");

        let mut img = test.image(index).unwrap().to_vec();
        normalizer.normalize_image(&mut img, [1, 28, 28]).unwrap();
        let logits = reference.infer(&params, &img, 1).unwrap();
        let mx = logits.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        let mut want: Vec<(usize, f64)> = e.iter().map(|v| v / s).enumerate().collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (k, ((gc, gp), (wc, wp))) in got.iter().zip(&want).enumerate() {
            assert!((gp - wp).abs() < 2e-5, "image {index}, rank {}: p {gp} vs reference {wp}\n{out}", k + 1);
            // Ties within printing precision may swap places; otherwise the classes agree.
            assert!(gc == wc || (gp - want.iter().find(|w| w.0 == *gc).unwrap().1).abs() < 2e-5, "image {index}, rank {}\n{out}", k + 1);
        }
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "not sorted\n{out}");

        // The same digit as a PNG file gives the same answer (IDX pixels are bytes / 255).
        let png = dir.join(&format!("digit{index}.png"));
        let bytes: Vec<u8> = test.image(index).unwrap().iter().map(|v| (v * 255.0).round() as u8).collect();
        write_png(&png, 28, 28, 1, &bytes);
        let from_png = cnnc_ok(["predict", m, "--checkpoint", c, "--image", png.to_str().unwrap()]);
        assert_eq!(parse(&from_png), got, "PNG vs --index\n{from_png}\n{out}");

        // And the reference engine through the CLI agrees.
        let r = cnnc_ok(["predict", m, "--checkpoint", c, "--index", &index.to_string(), "--engine", "reference", "--top", "10"]);
        let r = parse(&r);
        assert_eq!(r.len(), 10);
        assert!((r.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-4);
        for (gc, gp) in &got {
            let rp = r.iter().find(|x| x.0 == *gc).unwrap().1;
            assert!((gp - rp).abs() < 2e-5, "class {gc}: jit {gp} vs reference {rp}");
        }
    }
}
