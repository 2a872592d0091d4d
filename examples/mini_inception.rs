//! A network declared in Rust source with `cnnc::cnn_model!`: its shapes were checked when this
//! example compiled, and its parameter and MAC counts are constants.
//!
//! Run with `cargo run --release --example mini_inception`.

use cnnc::compiler::cost::{self, Format};

cnnc::cnn_model! {
    /// GoogLeNet's inception module: four parallel branches joined along channels.
    block inception(b1, b2r, b2, b3r, b3, pp) {
        concat {
            b1: { conv(b1, 1x1); relu; }
            b2: { conv(b2r, 1x1); relu; conv(b2, 3x3, pad=1); relu; }
            b3: { conv(b3r, 1x1); relu; conv(b3, 5x5, pad=2); relu; }
            pool: { maxpool(3x3, stride=1, pad=1); conv(pp, 1x1); relu; }
        }
    }

    /// A small GoogLeNet-style network for 32x32 colour images (CIFAR-10 sized).
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
}

// Checked by the compiler, not at run time: a budget for an embedded target.
const _: () = assert!(MiniInception::PARAMS < 2_000_000, "MiniInception outgrew its parameter budget");
const _: () = assert!(MiniInception::MACS < 100_000_000, "MiniInception outgrew its compute budget");

/// Per-image scores: the array length comes from the model's output shape.
type Logits = [f32; MiniInception::OUTPUT.numel()];

fn main() {
    println!("{}: {} -> {}", MiniInception::NAME, MiniInception::INPUT, MiniInception::OUTPUT);
    println!("parameters: {}   MACs per image: {}   graph nodes: {}", MiniInception::PARAMS, MiniInception::MACS, MiniInception::LAYERS);
    let logits: Logits = [0.0; MiniInception::OUTPUT.numel()];
    println!("logits buffer: {} floats\n", logits.len());
    print!("{}", cost::render(&MiniInception::report(1), Format::Table));
}
