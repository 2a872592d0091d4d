// Independent mistakes are reported together: an unknown layer and an unknown keyword.
cnnc::cnn_model! {
    model Net(input: 1x28x28) {
        conv1: conv(6, 5x5, padding=2);
        relu;
        pool1: maxpoool(2x2);
        flatten; dense(10);
    }
}

fn main() {}
