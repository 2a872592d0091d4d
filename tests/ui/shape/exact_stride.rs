// exact=true: the window must tile the input with no rows or columns left over.
cnnc::cnn_model! {
    model Strided(input: 3x32x32) {
        c1: conv(8, 3x3, stride=2, exact=true);
    }
}

fn main() {}
