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
