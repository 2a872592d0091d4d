// A misspelled block name gets a suggestion.
cnnc::cnn_model! {
    block inception(c) {
        concat { { conv(c, 1x1); } { conv(c, 3x3, pad=1); } }
    }

    model Net(input: 3x32x32) {
        inc1: incepton(16);
        gap; flatten; dense(10);
    }
}

fn main() {}
