// Blocks may use blocks, but not themselves (directly or through another).
cnnc::cnn_model! {
    block a(c) { conv(c, 3x3, pad=1); b(c); }
    block b(c) { relu; a(c); }

    model Net(input: 3x8x8) {
        a(4);
    }
}

fn main() {}
