// Errors inside a model file are printed with the file's path, line, column and source line,
// at the path literal. (`bad.cnn` is found beside this file: trybuild's CARGO_MANIFEST_DIR is
// its own scratch project.)
cnnc::cnn_model!(file = "bad.cnn");

fn main() {}
