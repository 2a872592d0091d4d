//! The model language on real models: LeNet-5, naive and reduced Inception, a small ResNet
//! with `shortcut(auto)`, repetition naming, `side`, `scale`, `if`, and parameter overrides.

use cnnc_compiler::ir::{Graph, Op, Padding, Shape};
use cnnc_compiler::lang::{self, Program, Value};
use std::path::PathBuf;

fn model_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models").join(name)
}

fn load(name: &str) -> Program {
    let path = model_file(name);
    lang::load_file(&path).unwrap_or_else(|d| panic!("{}", d.render_file(&path)))
}

fn src(text: &str) -> Program {
    lang::parse_source("test.cnn", text).unwrap_or_else(|d| panic!("{}", d.render("test.cnn", text)))
}

fn shape(g: &Graph, name: &str) -> Shape {
    g.node(g.find(name).unwrap_or_else(|_| panic!("no layer `{name}` in\n{g}"))).shape
}

fn output(g: &Graph) -> Shape {
    g.node(g.outputs()[0]).shape
}

fn names(g: &Graph) -> Vec<String> {
    g.nodes().map(|n| g.node(n).name.clone()).collect()
}

#[test]
fn lenet5_shapes_names_and_docs() {
    let p = load("lenet5.cnn");
    let m = p.models().next().unwrap();
    assert_eq!(m.name, "LeNet5");
    assert_eq!(m.input, Shape::chw(1, 28, 28));
    assert!(m.docs[0].starts_with("LeNet-5 (LeCun et al., 1998)"), "{:?}", m.docs);
    assert_eq!(m.docs.len(), 2);
    let g = p.expand("LeNet5").unwrap();
    println!("{g}");
    assert_eq!(
        names(&g),
        ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten1", "fc1", "relu3", "fc2", "relu4", "fc3"]
    );
    assert_eq!(shape(&g, "conv1"), Shape::chw(6, 24, 24));
    assert_eq!(shape(&g, "pool1"), Shape::chw(6, 12, 12));
    assert_eq!(shape(&g, "conv2"), Shape::chw(16, 8, 8));
    assert_eq!(shape(&g, "pool2"), Shape::chw(16, 4, 4));
    assert_eq!(shape(&g, "flatten1"), Shape::flat(256));
    assert_eq!(output(&g), Shape::flat(10));
    assert_eq!(g.outputs().len(), 1);
    cnnc_compiler::ir::verify(&g).unwrap();
}

#[test]
fn every_example_model_expands() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let mut failures = Vec::new();
    let mut count = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "cnn")) {
        match lang::load_file(&path).and_then(|p| p.expand_all()) {
            Ok(gs) => {
                for g in &gs {
                    cnnc_compiler::ir::verify(g).unwrap();
                    println!("{}: {} -> {} ({} nodes)", path.display(), g.name, output(g), g.len());
                }
                count += gs.len();
            }
            Err(d) => failures.push(d.render_file(&path)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(count >= 5);
}

#[test]
fn naive_inception_is_672_channels() {
    let g = load("inception_naive.cnn").expand("InceptionNaive").unwrap();
    assert_eq!(output(&g), Shape::chw(672, 28, 28));
    let join = g.outputs()[0];
    assert_eq!(g.node(join).name, "concat1");
    assert_eq!(g.node(join).op, Op::Concat);
    let branch_ends: Vec<String> = g.operands(join).iter().map(|&o| g.node(o).name.clone()).collect();
    assert_eq!(branch_ends, ["b1.relu1", "b2.relu1", "b3.relu1", "b4.maxpool1"]);
    assert_eq!(shape(&g, "b2.conv1"), Shape::chw(192, 28, 28));
    assert_eq!(g.len(), 9);
}

#[test]
fn reduced_inception_is_480_channels_in_a_block_scope() {
    let g = load("inception_reduced.cnn").expand("InceptionReduced").unwrap();
    assert_eq!(output(&g), Shape::chw(480, 28, 28));
    assert_eq!(shape(&g, "inception3.b2.conv2"), Shape::chw(192, 28, 28));
    assert_eq!(shape(&g, "inception3.b4.conv1"), Shape::chw(64, 28, 28));
    let n = g.node(g.find("inception3.b3.conv2").unwrap());
    assert_eq!(n.scope, ["inception3"]);
    assert!(matches!(n.op, Op::Conv2d(c) if c.kernel == [5, 5] && c.pads() == [2, 2, 2, 2]));
    // every node but the input is inside the instance's scope
    assert!(g.nodes().skip(1).all(|id| g.node(id).scope == ["inception3"]));
}

#[test]
fn residual_auto_shortcut_projects_only_where_needed() {
    let g = load("resnet_mini.cnn").expand("ResNetMini").unwrap();
    assert_eq!(output(&g), Shape::flat(10));
    let shortcuts: Vec<&str> =
        g.nodes().map(|n| g.node(n).name.as_str()).filter(|n| n.contains("shortcut")).collect();
    assert_eq!(
        shortcuts,
        ["layer2_0.shortcut.conv1", "layer2_0.shortcut.bn1", "layer3_0.shortcut.conv1", "layer3_0.shortcut.bn1"]
    );
    let proj = g.node(g.find("layer2_0.shortcut.conv1").unwrap());
    assert!(matches!(proj.op, Op::Conv2d(c) if c.kernel == [1, 1] && c.stride == [2, 2] && c.out_channels == 32));
    // identity shortcut: the add's second operand is the block's input
    let add = g.find("layer1.1.residual1").unwrap();
    let ops: Vec<&str> = g.operands(add).iter().map(|&o| g.node(o).name.as_str()).collect();
    assert_eq!(ops, ["layer1.1.bn2", "layer1.0.relu2"]);
    // projected shortcut: main path first, projection second
    let add = g.find("layer2_0.residual1").unwrap();
    let ops: Vec<&str> = g.operands(add).iter().map(|&o| g.node(o).name.as_str()).collect();
    assert_eq!(ops, ["layer2_0.bn2", "layer2_0.shortcut.bn1"]);
    assert_eq!(g.node(add).op, Op::Add);
    assert_eq!(shape(&g, "layer3_1.relu2"), Shape::chw(64, 8, 8));
    assert_eq!(g.node(g.find("layer1.1.conv1").unwrap()).scope, ["layer1", "layer1.1"]);
}

#[test]
fn repetition_naming() {
    let p = src("
        block pair(c) { conv(c, 3x3, pad=1); relu; }
        model M(input: 4x8x8) {
            convs: 3 x conv(4, 3x3, pad=1);
            2 x pair(8);
            stage: 2 x pair(8);
            2 x { bn; relu; }
            steps: 2x { dropout(0.1); }
            0 x conv(99, 1x1);
        }
    ");
    let g = p.expand("M").unwrap();
    assert_eq!(
        names(&g),
        [
            "input", "convs.0", "convs.1", "convs.2", "pair1.conv1", "pair1.relu1", "pair2.conv1", "pair2.relu1",
            "stage.0.conv1", "stage.0.relu1", "stage.1.conv1", "stage.1.relu1", "bn1", "relu1", "bn2", "relu2",
            "steps.0.dropout1", "steps.1.dropout1"
        ]
    );
    assert_eq!(g.node(g.find("convs.1").unwrap()).scope, ["convs"]);
    assert_eq!(g.node(g.find("stage.1.relu1").unwrap()).scope, ["stage", "stage.1"]);
    assert_eq!(g.node(g.find("pair2.conv1").unwrap()).scope, ["pair2"]);
    assert_eq!(g.node(g.find("relu2").unwrap()).scope, Vec::<String>::new());
    assert_eq!(output(&g), Shape::chw(8, 8, 8));
}

#[test]
fn three_3x3_and_one_7x7_keep_the_size() {
    let p = load("three_3x3_vs_7x7.cnn");
    let a = p.expand("Three3x3").unwrap();
    let b = p.expand("One7x7").unwrap();
    assert_eq!(names(&a), ["input", "conv1", "relu1", "conv2", "relu2", "conv3", "relu3"]);
    assert_eq!(output(&a), Shape::chw(64, 56, 56));
    assert_eq!(output(&b), Shape::chw(64, 56, 56));
    let wide = p.expand_with("Three3x3", &[("c", Value::Int(128))]).unwrap();
    assert_eq!(output(&wide), Shape::chw(128, 56, 56));
    assert_eq!(p.model("One7x7").unwrap().params, [("c".to_string(), Value::Int(64))]);
}

#[test]
fn auto_names_skip_explicit_ones_and_later_groups_get_prefixes() {
    let p = src("
        model M(input: 8x8x8) {
            conv(8, 1x1);
            conv1: conv(8, 1x1);
            concat { { conv(4, 1x1); } {} }
            concat { { conv(4, 1x1); } { relu; } }
            mix: add { { conv(16, 1x1); } {} }
            relu;
        }
    ");
    let g = p.expand("M").unwrap();
    assert_eq!(
        names(&g),
        [
            "input", "conv2", "conv1", "b1.conv1", "concat1", "concat2.b1.conv1", "concat2.b2.relu1", "concat2",
            "mix.b1.conv1", "mix", "relu1"
        ]
    );
    assert_eq!(output(&g), Shape::chw(16, 8, 8));
    assert_eq!(g.node(g.find("mix.b1.conv1").unwrap()).scope, ["mix"]);
    assert_eq!(g.node(g.find("concat2").unwrap()).scope, Vec::<String>::new());
}

#[test]
fn side_scale_if_and_parameters() {
    let text = "
        /// SE gate.
        block se(c, r = 4) {
            scale { gap; dense(c / r); relu; dense(c); sigmoid; }
        }
        /// A tiny net with an optional auxiliary head.
        model Tiny(input: 3x16x16, aux = false, width = 8, deep = 2) {
            conv(width, 3x3, pad=same); relu;
            if aux && width >= 8 {
                head: side { gap; flatten; dense(5); }
            }
            se(width);
            if deep > 1 || !aux { conv(2 * width, 3x3, stride=2, pad=1); } else { maxpool(2); }
            gap; flatten; dense(10); softmax;
        }
    ";
    let p = src(text);
    assert_eq!(p.block_names().collect::<Vec<_>>(), ["se"]);
    let m = p.model("Tiny").unwrap();
    assert_eq!(m.doc(), "A tiny net with an optional auxiliary head.");
    assert_eq!(m.params.len(), 3);
    let g = p.expand("Tiny").unwrap();
    assert_eq!(g.outputs().len(), 1);
    assert_eq!(shape(&g, "se1.scale1"), Shape::chw(8, 16, 16));
    assert_eq!(shape(&g, "se1.dense1"), Shape::flat(2));
    let mul = g.find("se1.scale1").unwrap();
    assert_eq!(g.node(mul).op, Op::ChannelMul);
    assert_eq!(g.node(g.operands(mul)[0]).name, "relu1");
    assert_eq!(shape(&g, "conv2"), Shape::chw(16, 8, 8));
    assert_eq!(output(&g), Shape::flat(10));

    let g = p.expand_with("Tiny", &[("aux", Value::Bool(true)), ("deep", Value::Int(1))]).unwrap();
    let outs = g.outputs();
    assert_eq!(outs.len(), 2);
    assert_eq!(g.node(outs[1]).name, "head.dense1");
    assert_eq!(g.node(outs[1]).shape, Shape::flat(5));
    assert_eq!(g.node(g.find("head.gap1").unwrap()).scope, ["head"]);
    assert!(g.find("maxpool1").is_ok() && g.find("conv2").is_err());
    // the main chain continues from the value before the side branch
    let se_in = g.operands(g.find("se1.scale1").unwrap())[0];
    assert_eq!(g.node(se_in).name, "relu1");

    let e = p.expand_with("Tiny", &[("depth", Value::Int(1))]).unwrap_err();
    assert_eq!(e.0[0].message, "model `Tiny` has no parameter `depth`");
}

#[test]
fn layer_attributes_reach_the_ops() {
    let p = src("
        model M(input: 6x17x17) {
            a: conv(12, 1x7, pad=(0, 3), stride=(1, 1), groups=3, bias=false);
            b: conv(12, 3, pad=(1, 1, 0, 2), dilation=2);
            c: dwconv(3x3, pad=same, stride=2);
            d: avgpool(3x3, stride=1, pad=1, count_pad=false, ceil=true);
            e: maxpool(2x2);
            f: bn(eps=1e-3, momentum=0.01);
            g: lrn(size=3, alpha=0.0001, beta=0.75, k=1);
            h: leaky_relu(slope=0.2);
            i: elu;
            j: dropout(p = 0.25);
            gap; flatten; dense(3, bias=false); tanh; sigmoid;
        }
    ");
    let g = p.expand("M").unwrap();
    let op = |n: &str| g.node(g.find(n).unwrap()).op;
    let Op::Conv2d(a) = op("a") else { panic!() };
    assert_eq!((a.kernel, a.pads(), a.groups, a.bias), ([1, 7], [0, 0, 3, 3], 3, false));
    assert_eq!(shape(&g, "a"), Shape::chw(12, 17, 17));
    let Op::Conv2d(b) = op("b") else { panic!() };
    assert_eq!((b.kernel, b.pads(), b.dilation), ([3, 3], [1, 1, 0, 2], [2, 2]));
    assert_eq!(shape(&g, "b"), Shape::chw(12, 15, 15));
    let Op::Conv2d(c) = op("c") else { panic!() };
    assert_eq!((c.groups, c.out_channels, c.stride), (12, 12, [2, 2]));
    assert_eq!(shape(&g, "c"), Shape::chw(12, 8, 8));
    let Op::Pool(d) = op("d") else { panic!() };
    assert!(d.ceil_mode && !d.count_include_pad && d.padding == Padding::uniform(1));
    let Op::Pool(e) = op("e") else { panic!() };
    assert_eq!(e.stride, [2, 2]);
    assert!(matches!(op("f"), Op::BatchNorm(b) if (b.eps - 1e-3).abs() < 1e-9 && (b.momentum - 0.01).abs() < 1e-9));
    assert!(matches!(op("g"), Op::Lrn(l) if l.size == 3 && l.k == 1.0));
    assert_eq!(op("h").to_string(), "leaky_relu 0.2");
    assert_eq!(op("i").to_string(), "elu 1");
    assert_eq!(op("j"), Op::Dropout { p: 0.25 });
    assert_eq!(output(&g), Shape::flat(3));
}

#[test]
fn parameter_arithmetic_and_sizes_from_parameters() {
    let p = src("
        block b(c, k = 3, e = 4) {
            conv(e * c, k x k, pad = (k - 1) / 2);
            conv(c * (e + 1) - c, 1x1);
            dense_free: conv(-(-c), 1 x k, pad = (0, (k - 1) / 2 * 1 + 0));
        }
        model M(input: 2x9x9, k = 5) { b(4, k = k); }
    ");
    let g = p.expand("M").unwrap();
    assert_eq!(shape(&g, "b1.conv1"), Shape::chw(16, 9, 9));
    assert_eq!(shape(&g, "b1.conv2"), Shape::chw(16, 9, 9));
    assert!(matches!(g.node(g.find("b1.conv1").unwrap()).op, Op::Conv2d(c) if c.kernel == [5, 5]));
    assert_eq!(shape(&g, "b1.dense_free"), Shape::chw(4, 9, 9));
}

#[test]
fn parse_tokens_accepts_macro_input() {
    let ts = quote::quote! {
        /// Doc from the macro.
        model Vec784(input: 784) { dense(32); relu; dense(10); }
    };
    let p = lang::parse_tokens(ts).unwrap();
    let m = p.models().next().unwrap();
    assert_eq!((m.name.as_str(), m.docs.as_slice(), m.input), ("Vec784", &["Doc from the macro.".to_string()][..], Shape::flat(784)));
    let g = p.expand("Vec784").unwrap();
    assert_eq!(names(&g), ["input", "dense1", "relu1", "dense2"]);
}

#[test]
fn else_if_chains_and_positionals_by_name() {
    let p = src("
        model M(input: 3x8x8, mode = 2) {
            if mode == 1 { a: relu; } else if mode == 2 { a: conv(out = 5, kernel = 1x1) } else { a: tanh }
        }
    ");
    let g = p.expand("M").unwrap();
    assert_eq!(shape(&g, "a"), Shape::chw(5, 8, 8));
    let g = p.expand_with("M", &[("mode", Value::Int(1))]).unwrap();
    assert_eq!(g.node(g.find("a").unwrap()).op.kind(), "relu");
    let g = p.expand_with("M", &[("mode", Value::Int(7))]).unwrap();
    assert_eq!(g.node(g.find("a").unwrap()).op.kind(), "tanh");
}
