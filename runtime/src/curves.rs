//! Training curves (in progress).
