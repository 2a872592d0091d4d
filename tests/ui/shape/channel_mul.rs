// squeeze-and-excitation: the gate must produce one value per channel of its input.
cnnc::cnn_model! {
    model Se(input: 64x14x14) {
        se: scale { gap; flatten; dense(4); relu; dense(32); sigmoid; }
    }
}

fn main() {}
