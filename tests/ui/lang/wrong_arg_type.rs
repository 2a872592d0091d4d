// A kernel size where a channel count is expected.
cnnc::cnn_model! {
    model Net(input: 3x32x32) {
        conv1: conv(3x3, 16, pad=true);
    }
}

fn main() {}
