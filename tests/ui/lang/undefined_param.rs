// A block body refers to a parameter it does not declare.
cnnc::cnn_model! {
    block bottleneck(width, stride = 1) {
        conv(width, 1x1); relu;
        conv(width, 3x3, stride=strde, pad=1); relu;
        conv(4 * widht, 1x1);
    }

    model Net(input: 64x56x56) {
        b1: bottleneck(64);
    }
}

fn main() {}
