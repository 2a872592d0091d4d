// dense on an image-shaped value needs a flatten (or gap) first.
cnnc::cnn_model! {
    model Head(input: 3x32x32) {
        conv1: conv(8, 3x3, pad=1); relu;
        fc: dense(10);
    }
}

fn main() {}
