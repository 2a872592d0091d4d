// Everything a user writes against the generated items compiles.
use cnnc::compiler::ir::Shape;

mod zoo {
    cnnc::cnn_model! {
        block unit(c, stride = 1) {
            conv(c, 3x3, stride=stride, pad=1); bn; relu;
        }

        /// A documented public model.
        pub model Small(input: 3x32x32, classes = 10) {
            stem: unit(16);
            down: residual { unit(32, stride=2); conv(32, 3x3, pad=1); bn; } shortcut(auto) { conv(32, 1x1, stride=2); bn; }
            relu;
            gap; flatten;
            fc: dense(classes);
        }

        pub(crate) model Flat(input: 64) {
            dense(16); relu; dense(2);
        }

        model Private(input: 1x8x8) { conv(2, 3x3); }
    }

    pub const PRIVATE_PARAMS: u64 = Private::PARAMS;
}

cnnc::cnn_model!(pub file = "../../models/tiny.cnn");

const _: () = assert!(zoo::Small::PARAMS < 100_000);
const _: () = assert!(zoo::Flat::MACS == 64 * 16 + 16 * 2);
const _: () = assert!(zoo::PRIVATE_PARAMS == 2 * 9 + 2);
const _: () = assert!(TinyFile::OUTPUT.numel() == 10);
const LOGITS: usize = zoo::Small::OUTPUT.numel();

fn main() {
    let buffer = [0f32; LOGITS];
    assert_eq!(buffer.len(), 10);
    assert_eq!(zoo::Small::INPUT, Shape::chw(3, 32, 32));
    let g: cnnc::compiler::ir::Graph = zoo::Small::graph();
    assert_eq!(g.len(), zoo::Small::LAYERS);
    let r: cnnc::compiler::cost::CostReport = zoo::Flat::report(2);
    assert_eq!(r.totals.params, zoo::Flat::PARAMS);
    let _: &str = TinyRes::source();
    let _: (zoo::Small, zoo::Flat) = Default::default();
}
