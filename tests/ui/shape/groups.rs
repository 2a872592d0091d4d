// Grouped convolution: groups must divide the input channels.
cnnc::cnn_model! {
    model Grouped(input: 30x16x16) {
        g1: conv(32, 3x3, pad=1, groups=4);
    }
}

fn main() {}
