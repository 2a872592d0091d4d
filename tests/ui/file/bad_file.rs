// Errors inside a model file are printed with the file's path, line, column and source line,
// at the path literal; a missing file says where it was looked for.
cnnc::cnn_model!(file = "bad.cnn");

cnnc::cnn_model!(file = "no_such_model.cnn");

fn main() {}
