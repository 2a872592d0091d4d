//! `cnn_model!` end to end: constants computed during expansion agree with the compiler run on
//! the same text at run time, they are usable in `const` contexts, `graph()` rebuilds the checked
//! graph, and the `file = "..."` form reads, tracks and reports like the inline one.

use cnnc::compiler::ir::{self, Shape};
use cnnc::compiler::{cost, lang};
use std::path::Path;

cnnc::cnn_model! {
    block inception(b1, b2r, b2, b3r, b3, pp) {
        concat {
            b1: { conv(b1, 1x1); relu; }
            b2: { conv(b2r, 1x1); relu; conv(b2, 3x3, pad=1); relu; }
            b3: { conv(b3r, 1x1); relu; conv(b3, 5x5, pad=2); relu; }
            pool: { maxpool(3x3, stride=1, pad=1); conv(pp, 1x1); relu; }
        }
    }

    /// A small GoogLeNet-style network for 32x32 colour images.
    pub model MiniInception(input: 3x32x32, classes = 10) {
        stem: conv(32, 3x3, pad=1); bn; relu;
        pool1: maxpool(2x2);
        inc1: inception(16, 16, 32, 8, 16, 16);
        inc2: inception(32, 24, 48, 8, 24, 24);
        pool2: maxpool(2x2);
        inc3: inception(48, 32, 64, 12, 32, 32);
        gap; flatten; dropout(0.2);
        fc: dense(classes);
    }

    /// Hand-countable: every figure below is worked out in `tiny_counts_by_hand`.
    pub(crate) model Tiny(input: 1x12x12) {
        conv1: conv(4, 3x3, pad=1); relu;
        pool1: maxpool(2x2);
        conv2: conv(8, 3x3); relu;
        flatten;
        fc: dense(10);
    }

    model Vector(input: 784) {
        dense(32); relu; dense(10); softmax;
    }
}

/// The same programs read from files.
mod from_file {
    cnnc::cnn_model!(pub file = "tests/models/mini_inception.cnn");
    cnnc::cnn_model!(pub(crate) file = "tests/models/tiny.cnn");
}

// Constants are constants: usable in const items, array lengths and assertions.
const _: () = assert!(MiniInception::PARAMS < 2_000_000);
const _: () = assert!(MiniInception::MACS > MiniInception::PARAMS);
const _: () = assert!(Tiny::OUTPUT.numel() == 10);
const CLASSES: usize = MiniInception::OUTPUT.channels();
const _: () = assert!(from_file::TinyFile::PARAMS == Tiny::PARAMS);

fn file_graph(path: &str, model: &str) -> ir::Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let program = lang::load_file(&path).unwrap_or_else(|d| panic!("{}", d.render_file(&path)));
    program.expand(model).unwrap()
}

#[test]
fn tiny_counts_by_hand() {
    assert_eq!(Tiny::INPUT, Shape::chw(1, 12, 12));
    assert_eq!(Tiny::OUTPUT, Shape::flat(10));
    assert_eq!(Tiny::OUTPUTS, &[Shape::flat(10)]);
    // conv1: 4*(1*3*3) + 4 = 40; conv2: 8*(4*3*3) + 8 = 296 on 4x6x6 -> 8x4x4;
    // fc: 128*10 + 10 = 1290.
    assert_eq!(Tiny::PARAMS, 40 + 296 + 1290);
    // conv1: 12*12*4*9 = 5184; conv2: 4*4*8*(9*4) = 4608; fc: 128*10 = 1280.
    assert_eq!(Tiny::MACS, 5184 + 4608 + 1280);
    // input, conv1, relu, pool1, conv2, relu, flatten, fc
    assert_eq!(Tiny::LAYERS, 8);
    assert_eq!(Tiny::NAME, "Tiny");
    let logits = [0f32; Tiny::OUTPUT.numel()];
    assert_eq!(logits.len(), 10);
}

#[test]
fn constants_match_the_compiler_on_the_file() {
    let g = file_graph("tests/models/mini_inception.cnn", "MiniInception");
    let r = cost::analyze(&g, 1);
    assert_eq!(MiniInception::PARAMS, r.totals.params);
    assert_eq!(MiniInception::MACS, r.totals.macs);
    assert_eq!(MiniInception::INPUT, Shape::chw(3, 32, 32));
    assert_eq!(MiniInception::OUTPUT, g.node(g.outputs()[0]).shape);
    assert_eq!(MiniInception::OUTPUT, Shape::flat(10));
    assert_eq!(CLASSES, 10);
    assert_eq!(MiniInception::LAYERS, g.len());
    // The file form computes the same numbers, and so do both graphs, layer by layer.
    assert_eq!(from_file::MiniInception::PARAMS, MiniInception::PARAMS);
    assert_eq!(from_file::MiniInception::MACS, MiniInception::MACS);
    assert_eq!(from_file::MiniInception::OUTPUT, MiniInception::OUTPUT);
    assert_eq!(MiniInception::graph().to_string(), g.to_string());
    assert_eq!(from_file::MiniInception::graph().to_string(), g.to_string());
    // The figures themselves: inception outputs 16+32+16+16, 32+48+24+24 and 48+64+32+32
    // channels.
    let concats: Vec<Shape> = r.layers.iter().filter(|l| l.op == "concat").map(|l| l.output_shape).collect();
    assert_eq!(concats, [Shape::chw(80, 16, 16), Shape::chw(128, 16, 16), Shape::chw(176, 8, 8)]);
}

#[test]
fn graph_round_trips_and_reports() {
    type Row = (ir::Graph, &'static str, &'static str, usize, &'static [Shape]);
    let rows: [Row; 4] = [
        (MiniInception::graph(), MiniInception::NAME, MiniInception::source(), MiniInception::LAYERS, MiniInception::OUTPUTS),
        (Tiny::graph(), Tiny::NAME, Tiny::source(), Tiny::LAYERS, Tiny::OUTPUTS),
        (Vector::graph(), Vector::NAME, Vector::source(), Vector::LAYERS, Vector::OUTPUTS),
        (from_file::TinyRes::graph(), from_file::TinyRes::NAME, from_file::TinyRes::source(), from_file::TinyRes::LAYERS, from_file::TinyRes::OUTPUTS),
    ];
    for (g, name, source, layers, outputs) in rows {
        ir::verify(&g).unwrap();
        assert_eq!(g.name, name);
        assert_eq!(g.len(), layers);
        let shapes: Vec<Shape> = g.outputs().iter().map(|&o| g.node(o).shape).collect();
        assert_eq!(shapes, outputs);
        // source() is model-language text that expands to the same graph.
        let again = lang::parse_source("source()", source).unwrap().expand(name).unwrap();
        assert_eq!(again.to_string(), g.to_string());
    }
    assert_eq!(Vector::INPUT, Shape::flat(784));
    assert_eq!(Vector::PARAMS, 784 * 32 + 32 + 32 * 10 + 10);
    let r = MiniInception::report(4);
    assert_eq!(r.batch, 4);
    assert_eq!(r.totals.params, MiniInception::PARAMS);
    assert_eq!(r.totals.macs, 4 * MiniInception::MACS);
    assert_eq!(r.output, MiniInception::OUTPUTS);
}

#[test]
fn source_keeps_the_layout_and_rebuilds_the_models() {
    let s = MiniInception::source();
    assert!(s.starts_with("block inception(b1, b2r, b2, b3r, b3, pp) {\n    concat {\n"), "{s}");
    // Doc comments stay, Rust visibilities go (the text is a valid .cnn file).
    assert!(s.contains("/// A small GoogLeNet-style network for 32x32 colour images.\nmodel MiniInception(input: 3x32x32, classes = 10) {\n    stem: conv(32, 3x3, pad=1); bn; relu;\n"), "{s}");
    assert!(s.contains("\nmodel Tiny(input: 1x12x12) {"), "{s}");
    assert!(!s.contains("pub"), "{s}");
    assert_eq!(Tiny::source(), s);
    // The file form's source is the file, verbatim.
    let file = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models/tiny.cnn")).unwrap();
    assert_eq!(from_file::TinyFile::source(), file);
}

#[test]
fn file_models_with_blocks_and_side_outputs() {
    use from_file::{TinyFile, TinyRes};
    assert_eq!(TinyFile::OUTPUT, Tiny::OUTPUT);
    assert_eq!(TinyFile::MACS, Tiny::MACS);
    assert_eq!(TinyRes::INPUT, Shape::chw(3, 16, 16));
    assert_eq!(TinyRes::OUTPUT, Shape::flat(5));
    assert_eq!(TinyRes::OUTPUTS, &[Shape::flat(5), Shape::flat(3)]);
    let g = file_graph("tests/models/tiny.cnn", "TinyRes");
    let r = cost::analyze(&g, 1);
    assert_eq!(TinyRes::PARAMS, r.totals.params);
    assert_eq!(TinyRes::MACS, r.totals.macs);
    assert_eq!(TinyRes::graph().to_string(), g.to_string());
}
