// A pooling window larger than its input: the error names the layer before it.
cnnc::cnn_model! {
    model Lenet(input: 1x28x28) {
        conv1: conv(6, 5x5); relu;
        pool1: maxpool(2x2);
        conv2: conv(16, 5x5); relu;
        pool2: maxpool(2x2);
        pool3: maxpool(5x5);
        flatten;
        fc: dense(10);
    }
}

fn main() {}
