//! Batch-norm statistics fused into the producing convolution (`passes::bn_stats`) on the
//! zoo's training plans: every batch norm right after a lone convolution takes its statistics
//! from it, the pass's "after" clause holds, and inference or naive plans fuse none.

use cnnc_compiler::ir::{Graph, Op};
use cnnc_compiler::lang;
use cnnc_compiler::pipeline;
use cnnc_compiler::plan::{Fusion, Mode};
use std::path::Path;

fn model(file: &str, name: &str) -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    lang::load_file(&path).unwrap().expand_with(name, &[]).unwrap()
}

#[test]
fn every_conv_bn_pair_shares_the_statistics_pass() {
    for (file, name, pairs) in [
        ("examples/models/cifar_inception.cnn", "CifarInception", 20),
        ("examples/models/resnet.cnn", "ResNet50", 53),
        ("examples/models/mnist_vgg.cnn", "MnistVgg", 4),
    ] {
        let g = model(file, name);
        let p = pipeline::plan(&g, Mode::Training, Fusion::Full).unwrap();
        let mut seen = vec![false; p.groups.len()];
        let mut fused = 0;
        for (i, gr) in p.groups.iter().enumerate() {
            let anchor = gr.anchor();
            let after_lone_conv = matches!(g.node(anchor).op, Op::BatchNorm(_)) && {
                let x = g.operands(anchor)[0];
                p.groups[..i].iter().any(|q| q.nodes == [x]) && matches!(g.node(x).op, Op::Conv2d(_))
            };
            match p.stats_from[i] {
                Some(j) => {
                    assert!(after_lone_conv && j < i, "{name}: {} takes statistics from group {j}", g.node(anchor).name);
                    assert_eq!(p.groups[j].nodes, [g.operands(anchor)[0]], "{name}: {}", g.node(anchor).name);
                    assert!(!seen[j], "{name}: group {j} feeds two batch norms");
                    seen[j] = true;
                    fused += 1;
                }
                None => assert!(!after_lone_conv, "{name}: {} after a lone convolution computes its own statistics", g.node(anchor).name),
            }
        }
        assert_eq!(fused, pairs, "{name}");
        assert_eq!(p.to_string().matches("(statistics from").count(), pairs, "{name}");
        for (mode, fusion) in [(Mode::Inference, Fusion::Full), (Mode::Training, Fusion::None)] {
            let q = pipeline::plan(&g, mode, fusion).unwrap();
            assert!(q.stats_from.iter().all(Option::is_none), "{name} {mode:?} {fusion:?}");
        }
    }
}
