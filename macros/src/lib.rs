//! cnn_model! proc macro.
