//! Per-sample tensor shapes.
//!
//! The batch dimension is never part of a [`Shape`]: every op in cnnc maps each sample
//! independently (batch-norm's statistics are the one cross-sample reduction, handled by the
//! runtime), so shapes are inferred once, at macro-expansion time, for any batch size.

use std::fmt;

/// The shape of one sample's activation: an image-like `C x H x W` tensor, or a flat vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Shape {
    /// Channels, height, width (NCHW storage without the N).
    Chw {
        /// Channels.
        c: usize,
        /// Height in pixels.
        h: usize,
        /// Width in pixels.
        w: usize,
    },
    /// A flat vector of `n` features (after `flatten` or `dense`).
    Flat {
        /// Number of features.
        n: usize,
    },
}

impl Shape {
    /// `C x H x W`.
    pub const fn chw(c: usize, h: usize, w: usize) -> Shape {
        Shape::Chw { c, h, w }
    }

    /// A flat vector of `n` features.
    pub const fn flat(n: usize) -> Shape {
        Shape::Flat { n }
    }

    /// Number of scalars in one sample.
    pub const fn numel(&self) -> usize {
        match *self {
            Shape::Chw { c, h, w } => c * h * w,
            Shape::Flat { n } => n,
        }
    }

    /// `(C, H, W)`, with a flat vector of `n` seen as `n x 1 x 1`.
    pub const fn as_chw(&self) -> (usize, usize, usize) {
        match *self {
            Shape::Chw { c, h, w } => (c, h, w),
            Shape::Flat { n } => (n, 1, 1),
        }
    }

    /// Channels (features, for a flat vector).
    pub const fn channels(&self) -> usize {
        self.as_chw().0
    }

    /// True for `C x 1 x 1` images and flat vectors: shapes a dense layer reads unambiguously.
    pub const fn is_vector_like(&self) -> bool {
        match *self {
            Shape::Chw { h, w, .. } => h == 1 && w == 1,
            Shape::Flat { .. } => true,
        }
    }

    /// The dimensions as a list, `[c, h, w]` or `[n]` (what JSON reports print).
    pub fn dims(&self) -> Vec<usize> {
        match *self {
            Shape::Chw { c, h, w } => vec![c, h, w],
            Shape::Flat { n } => vec![n],
        }
    }
}

impl fmt::Display for Shape {
    /// `64x56x56` for images, `1000` for vectors: the notation of the model language.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Shape::Chw { c, h, w } => write!(f, "{c}x{h}x{w}"),
            Shape::Flat { n } => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_numel() {
        assert_eq!(Shape::chw(64, 56, 56).to_string(), "64x56x56");
        assert_eq!(Shape::flat(1000).to_string(), "1000");
        assert_eq!(Shape::chw(3, 5, 7).numel(), 105);
        assert!(Shape::chw(512, 1, 1).is_vector_like());
        assert!(!Shape::chw(512, 2, 1).is_vector_like());
        assert_eq!(Shape::flat(9).as_chw(), (9, 1, 1));
    }
}
