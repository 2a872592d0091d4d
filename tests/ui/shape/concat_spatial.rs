// Concatenated branches must agree on height and width.
cnnc::cnn_model! {
    model Inc(input: 32x28x28) {
        mix: concat {
            { conv(16, 1x1); }
            { conv(16, 3x3); }
        }
    }
}

fn main() {}
