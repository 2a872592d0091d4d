// The main path changes channels and resolution; the identity shortcut cannot be added.
cnnc::cnn_model! {
    model Res(input: 64x56x56) {
        res1: residual {
            conv(128, 3x3, stride=2, pad=1); bn; relu;
            conv(128, 3x3, pad=1); bn;
        }
        relu;
    }
}

fn main() {}
