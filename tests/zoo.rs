//! The model zoo (`examples/models/*.cnn`) against the published numbers.
//!
//! Every model must parse, expand and shape-check; its parameter count must equal the reference
//! implementation's (torchvision's, where torchvision has the model; timm's `seresnet50` for
//! SE-ResNet-50) and, where a reference MAC count exists, so must its multiply-accumulates
//! (conv + dense, without bias, at batch 1). The expected values were derived independently of
//! cnnc, from the torchvision layer definitions. The lecture comparison models check the
//! `27 C^2 vs 49 C^2`, `3.25 C^2 vs 9 C^2` and `6 C^2 vs 9 C^2` weight ratios.

use cnnc::compiler::cost::{self, CostReport};
use cnnc::compiler::ir::{Graph, Shape};
use cnnc::compiler::lang::{self, Program, Value};
use std::path::{Path, PathBuf};

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models")
}

fn load(file: &str) -> Program {
    let path = models_dir().join(file);
    lang::load_file(&path).unwrap_or_else(|d| panic!("{}", d.render_file(&path)))
}

fn expand_with(file: &str, model: &str, overrides: &[(&str, Value)]) -> Graph {
    let path = models_dir().join(file);
    load(file).expand_with(model, overrides).unwrap_or_else(|d| panic!("{}", d.render_file(&path)))
}

fn report(file: &str, model: &str) -> CostReport {
    cost::analyze(&expand_with(file, model, &[]), 1)
}

fn report_with(file: &str, model: &str, overrides: &[(&str, Value)]) -> CostReport {
    cost::analyze(&expand_with(file, model, overrides), 1)
}

/// MACs in millions rounded to two decimals, the way papers and torchvision's docs quote them.
fn mmacs(macs: u64) -> f64 {
    (macs as f64 / 1e6 * 100.0).round() / 100.0
}

/// Check a classifier: parameters, exact MACs, a single `classes`-way output.
fn check(file: &str, model: &str, params: u64, macs: u64, classes: usize) -> CostReport {
    let r = report(file, model);
    assert_eq!(r.totals.params, params, "{model}: parameters");
    assert_eq!(r.totals.macs, macs, "{model}: MACs");
    assert_eq!(r.output, vec![Shape::flat(classes)], "{model}: output");
    assert_eq!(r.totals.trainable_params, params, "{model}: everything trains by default");
    r
}

/// Top-level block instances whose name starts with `prefix`.
fn top_blocks<'a>(r: &'a CostReport, prefix: &str) -> Vec<&'a cost::BlockCost> {
    r.blocks.iter().filter(|b| b.depth == 0 && b.name.starts_with(prefix)).collect()
}

#[test]
fn lenet5() {
    let r = check("lenet5.cnn", "LeNet5", 44_426, 281_640, 10);
    assert_eq!(r.input, vec![Shape::chw(1, 28, 28)]);
}

/// The issues' benchmark networks, counted by hand: the MNIST VGG (conv 1->32->32, pool,
/// 32->64->64, pool, dense 3136->128->10; batch norm 2C each) and the CIFAR-size inception net
/// (stem 3->64, two factored inception modules, a 40-wide bottleneck residual between them).
#[test]
fn benchmark_networks() {
    let convs = 320 + 9_248 + 18_496 + 36_928;
    let bns = 2 * (32 + 32 + 64 + 64);
    check("mnist_vgg.cnn", "MnistVgg", convs + bns + 401_536 + 1_290, 9 * (32 * 784 + 32 * 32 * 784 + 32 * 64 * 196 + 64 * 64 * 196) + 3_136 * 128 + 1_280, 10);
    // (cin, cout, kh*kw, pixels) of every conv-bn, then the 288->10 head.
    let module = |cin: u64, hw: u64, [b1, b2r, b2, b3r, b3, pp]: [u64; 6]| {
        vec![(cin, b1, 1, hw), (cin, b2r, 1, hw), (b2r, b2, 3, hw), (b2, b2, 3, hw), (cin, b3r, 1, hw), (b3r, b3, 3, hw), (b3, b3, 3, hw), (cin, pp, 1, hw)]
    };
    let mut convs = vec![(3, 64, 9, 1024)];
    convs.extend(module(64, 1024, [32, 48, 64, 16, 16, 16]));
    convs.extend([(128, 40, 1, 256), (40, 40, 9, 256), (40, 128, 1, 256)]);
    convs.extend(module(128, 256, [64, 96, 128, 32, 48, 48]));
    let params: u64 = convs.iter().map(|&(i, o, k, _)| i * o * k + 2 * o).sum::<u64>() + 288 * 10 + 10;
    let macs: u64 = convs.iter().map(|&(i, o, k, p)| i * o * k * p).sum::<u64>() + 288 * 10;
    assert_eq!((params, macs), (189_994, 71_846_720), "the issue's 'about 200k params, about 70M MACs'");
    check("cifar_inception.cnn", "CifarInception", params, macs, 10);
}

#[test]
fn alexnet_torchvision() {
    let r = check("alexnet.cnn", "AlexNet", 61_100_840, 714_188_480, 1000);
    assert_eq!(mmacs(r.totals.macs), 714.19);
    // The 256x6x6 map before the classifier, where torchvision's adaptive pooling is a no-op.
    let pool5 = r.layers.iter().find(|l| l.name == "pool5").expect("pool5");
    assert_eq!(pool5.output_shape, Shape::chw(256, 6, 6));
}

#[test]
fn alexnet_original() {
    let r = check("alexnet.cnn", "AlexNetOriginal", 60_965_224, 724_406_816, 1000);
    let conv1 = r.layers.iter().find(|l| l.name == "conv1").expect("conv1");
    assert_eq!(conv1.output_shape, Shape::chw(96, 55, 55));
}

#[test]
fn zfnet() {
    let r = check("zfnet.cnn", "ZFNet", 62_357_608, 1_168_032_896, 1000);
    // The map sizes of the paper's figure 3.
    let sizes: Vec<Shape> = ["conv1", "pool1", "conv2", "pool2", "conv5", "pool5"]
        .iter()
        .map(|n| r.layers.iter().find(|l| l.name == *n).unwrap_or_else(|| panic!("{n}")).output_shape)
        .collect();
    assert_eq!(
        sizes,
        [
            Shape::chw(96, 110, 110),
            Shape::chw(96, 55, 55),
            Shape::chw(256, 26, 26),
            Shape::chw(256, 13, 13),
            Shape::chw(256, 13, 13),
            Shape::chw(256, 6, 6)
        ]
    );
}

#[test]
fn vgg() {
    let r16 = check("vgg.cnn", "VGG16", 138_357_544, 15_470_264_320, 1000);
    assert_eq!(mmacs(r16.totals.macs), 15_470.26);
    let r19 = check("vgg.cnn", "VGG19", 143_667_240, 19_632_062_464, 1000);
    // VGG-19 adds one 3x3 conv to each of stages 3-5: 256 + 512 + 512 channels squared, times 9.
    assert_eq!(r19.totals.params - r16.totals.params, 9 * (256 * 256 + 512 * 512 + 512 * 512) + 256 + 512 + 512);
    assert_eq!(top_blocks(&r16, "stage").len(), 5);
}

#[test]
fn googlenet() {
    let r = check("googlenet.cnn", "GoogLeNet", 6_624_904, 1_498_376_192, 1000);
    assert_eq!(mmacs(r.totals.macs), 1498.38);
    // Nine instances of the one `inception` block, each ending in the table-1 output width.
    let modules = top_blocks(&r, "inception");
    let widths: Vec<usize> = modules.iter().map(|b| b.output_shape.channels()).collect();
    assert_eq!(widths, [256, 480, 512, 512, 512, 528, 832, 832, 1024]);
    let spatial: Vec<(usize, usize)> = modules
        .iter()
        .map(|b| {
            let (_, h, w) = b.output_shape.as_chw();
            (h, w)
        })
        .collect();
    assert_eq!(spatial, [(28, 28), (28, 28), (14, 14), (14, 14), (14, 14), (14, 14), (14, 14), (7, 7), (7, 7)]);
}

#[test]
fn googlenet_aux_heads() {
    let r = report_with("googlenet.cnn", "GoogLeNet", &[("aux", Value::Bool(true))]);
    // torchvision's googlenet(aux_logits=True): 13,004,888 parameters.
    assert_eq!(r.totals.params, 13_004_888);
    assert_eq!(r.totals.macs, 1_506_748_416);
    assert_eq!(r.output.len(), 3, "main output plus two auxiliary classifiers");
    assert!(r.output.iter().all(|s| *s == Shape::flat(1000)), "{:?}", r.output);
    // The paper's 5x5 convolutions instead of torchvision's 3x3.
    let r5 = report_with("googlenet.cnn", "GoogLeNet", &[("k5", Value::Int(5))]);
    assert_eq!(r5.totals.params, 7_005_832);
    assert_eq!(r5.totals.macs, 1_582_671_872);
}

#[test]
fn inception_v3() {
    let r = check("inception_v3.cnn", "InceptionV3", 23_834_568, 5_713_216_096, 1000);
    assert_eq!(r.input, vec![Shape::chw(3, 299, 299)]);
    let grid = |prefix: &str| -> Vec<Shape> { top_blocks(&r, prefix).iter().map(|b| b.output_shape).collect() };
    assert_eq!(grid("Mixed_5"), [Shape::chw(256, 35, 35), Shape::chw(288, 35, 35), Shape::chw(288, 35, 35)]);
    assert_eq!(grid("Mixed_6"), [Shape::chw(768, 17, 17); 5]);
    assert_eq!(grid("Mixed_7"), [Shape::chw(1280, 8, 8), Shape::chw(2048, 8, 8), Shape::chw(2048, 8, 8)]);
    // Factored convolutions: 1x7, 7x1, 1x3 and 3x1 kernels are all present.
    for k in ["1x7", "7x1", "1x3", "3x1"] {
        assert!(r.layers.iter().any(|l| l.op == "conv2d" && l.detail.starts_with(&format!("conv2d {k} "))), "{k}");
    }
    let aux = report_with("inception_v3.cnn", "InceptionV3", &[("aux", Value::Bool(true))]);
    assert_eq!(aux.totals.params, 27_161_264);
    assert_eq!(aux.output, vec![Shape::flat(1000); 2]);
}

#[test]
fn resnets() {
    let r18 = check("resnet.cnn", "ResNet18", 11_689_512, 1_814_073_344, 1000);
    assert_eq!(mmacs(r18.totals.macs), 1814.07);
    check("resnet.cnn", "ResNet34", 21_797_672, 3_663_761_408, 1000);
    let r50 = check("resnet.cnn", "ResNet50", 25_557_032, 4_089_184_256, 1000);
    assert_eq!(mmacs(r50.totals.macs), 4089.18);
    check("resnet.cnn", "ResNet101", 44_549_160, 7_801_405_440, 1000);
    let r152 = check("resnet.cnn", "ResNet152", 60_192_808, 11_513_626_624, 1000);
    // Stage outputs of ResNet-50 (and every bottleneck ResNet): 256x56, 512x28, 1024x14, 2048x7.
    for r in [&r50, &r152] {
        let stages: Vec<Shape> = top_blocks(r, "layer").iter().map(|b| b.output_shape).collect();
        assert_eq!(
            stages,
            [Shape::chw(256, 56, 56), Shape::chw(512, 28, 28), Shape::chw(1024, 14, 14), Shape::chw(2048, 7, 7)]
        );
    }
    // Exactly four projection shortcuts in ResNet-50 (one per stage), one fewer in ResNet-18
    // (layer1 keeps 64 channels): 1x1 convolutions outside the bottleneck's conv1/conv3.
    let projections = |r: &CostReport| {
        r.layers.iter().filter(|l| l.op == "conv2d" && l.name.contains("downsample")).count()
    };
    assert_eq!(projections(&r50), 4);
    assert_eq!(projections(&r18), 3);
    // v1.5: the stride-2 bottleneck strides in its 3x3.
    let strided: Vec<&str> = r50
        .layers
        .iter()
        .filter(|l| l.op == "conv2d" && l.detail.contains(" /2 ") && !l.name.contains("downsample"))
        .map(|l| l.detail.split(" pad").next().unwrap())
        .collect();
    assert_eq!(strided, ["conv2d 7x7 /2", "conv2d 3x3 /2", "conv2d 3x3 /2", "conv2d 3x3 /2"]);
}

#[test]
fn squeezenets() {
    let a = check("squeezenet.cnn", "SqueezeNet1_0", 1_248_424, 818_924_576, 1000);
    let b = check("squeezenet.cnn", "SqueezeNet1_1", 1_235_496, 349_151_936, 1000);
    // 1.1: about 2.4x less computation, the same parameter count to within 2%.
    assert!(a.totals.macs as f64 / b.totals.macs as f64 > 2.3);
    assert_eq!(top_blocks(&a, "fire").len(), 8);
    assert_eq!(top_blocks(&b, "fire").len(), 8);
}

#[test]
fn resnext50() {
    let r = check("resnext.cnn", "ResNeXt50_32x4d", 25_028_904, 4_230_479_872, 1000);
    // 16 grouped 3x3 convolutions, 32 groups each.
    let grouped = r.layers.iter().filter(|l| l.detail.contains(" groups 32 ")).count();
    assert_eq!(grouped, 16);
    // Cardinality 1 and width 64 is ResNet-50 again.
    let plain = report_with(
        "resnext.cnn",
        "ResNeXt50_32x4d",
        &[("cardinality", Value::Int(1)), ("base_width", Value::Int(64))],
    );
    assert_eq!(plain.totals.params, 25_557_032);
    assert_eq!(plain.totals.macs, 4_089_184_256);
}

#[test]
fn densenet121() {
    let r = check("densenet.cnn", "DenseNet121", 7_978_856, 2_834_161_664, 1000);
    let widths: Vec<Shape> = top_blocks(&r, "denseblock").iter().map(|b| b.output_shape).collect();
    assert_eq!(
        widths,
        [Shape::chw(256, 56, 56), Shape::chw(512, 28, 28), Shape::chw(1024, 14, 14), Shape::chw(1024, 7, 7)]
    );
}

#[test]
fn se_resnet50() {
    let r = check("senet.cnn", "SEResNet50", 28_088_024, 4_091_699_200, 1000);
    // The SE modules are exactly the difference to ResNet-50: 2 C^2 / 16 + C / 16 + C per block.
    assert_eq!(r.totals.params - 25_557_032, 2_530_992);
    let gates = r.layers.iter().filter(|l| l.op == "channel_mul").count();
    assert_eq!(gates, 16);
}

#[test]
fn mobilenet_v2() {
    let r = check("mobilenet_v2.cnn", "MobileNetV2", 3_504_872, 300_774_272, 1000);
    assert_eq!(mmacs(r.totals.macs), 300.77);
    // 17 depthwise 3x3 convolutions; 10 blocks keep their shape and get the identity.
    let dw = r.layers.iter().filter(|l| l.op == "conv2d" && l.detail.contains("groups")).count();
    assert_eq!(dw, 17);
    assert_eq!(r.layers.iter().filter(|l| l.op == "add").count(), 10);
}

/// Weights per `C^2` of a bias-free model (`num / den` exactly) and MACs = weights * 28 * 28.
fn weights_per_c2(file: &str, model: &str, c: usize, num: u64, den: u64) -> u64 {
    let r = report_with(file, model, &[("c", Value::Int(c as i64))]);
    let c2 = (c * c) as u64;
    assert_eq!(r.totals.params * den, num * c2, "{model}: {num}/{den} C^2 weights at C = {c}");
    assert_eq!(r.totals.macs, r.totals.params * 28 * 28, "{model}: stride 1, same padding");
    assert_eq!(r.output, vec![Shape::chw(c, 28, 28)]);
    r.totals.params
}

#[test]
fn lecture_three_3x3_vs_7x7() {
    let f = "lecture_stacked_3x3.cnn";
    assert_eq!(weights_per_c2(f, "Stacked3x3", 256, 27, 1), 1_769_472);
    assert_eq!(weights_per_c2(f, "Single7x7", 256, 49, 1), 3_211_264);
    // Same receptive field.
    let a = report(f, "Stacked3x3");
    let b = report(f, "Single7x7");
    assert_eq!(a.layers.last().unwrap().receptive_field, [7, 7]);
    assert_eq!(b.layers.last().unwrap().receptive_field, [7, 7]);
}

#[test]
fn lecture_bottleneck_sandwich() {
    let f = "lecture_bottleneck.cnn";
    assert_eq!(weights_per_c2(f, "BottleneckSandwich", 256, 13, 4), 212_992);
    assert_eq!(weights_per_c2(f, "Plain3x3", 256, 9, 1), 589_824);
}

#[test]
fn lecture_factored() {
    let f = "lecture_factored.cnn";
    assert_eq!(weights_per_c2(f, "Factored1x3", 256, 6, 1), 393_216);
    assert_eq!(weights_per_c2(f, "Plain3x3", 256, 9, 1), 589_824);
    let r = report(f, "Factored1x3");
    assert_eq!(r.layers.last().unwrap().receptive_field, [3, 3]);
}

/// Every file in the zoo parses and every model in it expands with its defaults.
#[test]
fn every_file_expands() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cnn"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "{files:?}");
    let mut models = 0;
    for path in &files {
        let program = lang::load_file(path).unwrap_or_else(|d| panic!("{}", d.render_file(path)));
        let graphs = program.expand_all().unwrap_or_else(|d| panic!("{}", d.render_file(path)));
        assert!(!graphs.is_empty(), "{} declares no model", path.display());
        for (decl, g) in program.models().zip(&graphs) {
            assert!(!decl.docs.is_empty(), "{}: model {} has no doc comment", path.display(), decl.name);
            assert!(cost::analyze(g, 1).totals.params > 0, "{}", decl.name);
        }
        models += graphs.len();
    }
    assert!(models >= 25, "{models} models");
}
