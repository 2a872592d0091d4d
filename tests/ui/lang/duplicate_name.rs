// Two layers with the same name.
cnnc::cnn_model! {
    model Net(input: 3x32x32) {
        conv1: conv(16, 3x3, pad=1); relu;
        conv1: conv(32, 3x3, pad=1); relu;
    }
}

fn main() {}
