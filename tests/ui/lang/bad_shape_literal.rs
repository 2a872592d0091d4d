// Sizes are dimensions joined by `x`.
cnnc::cnn_model! {
    model Net(input: 3x32y32) {
        conv(8, 3x3);
    }
}

fn main() {}
