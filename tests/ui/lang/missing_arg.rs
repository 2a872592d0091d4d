// conv needs its output channels and kernel.
cnnc::cnn_model! {
    model Net(input: 3x32x32) {
        conv1: conv(16);
        relu;
    }
}

fn main() {}
