//! The operator set of the graph IR.
//!
//! [`Op`] is a closed enum: passes, fusion tables and gradient rules match on it (never on
//! `Debug` strings or `TypeId`). Attributes are stored resolved: after a node is added to a
//! [`Graph`](crate::ir::Graph), convolution and pooling padding is always
//! [`Padding::Explicit`], so kernels and the cost model never re-derive `same`/`valid`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Two spatial extents, `[height, width]`.
pub type Hw = [usize; 2];

/// Spatial zero-padding of a convolution or pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Padding {
    /// Explicit padding on each side, in pixels.
    Explicit {
        /// Rows added above.
        top: usize,
        /// Rows added below.
        bottom: usize,
        /// Columns added on the left.
        left: usize,
        /// Columns added on the right.
        right: usize,
    },
    /// Pad so that `out = ceil(in / stride)` (TensorFlow's `SAME`; an odd total puts the extra
    /// row/column at the bottom/right).
    Same,
    /// No padding (TensorFlow's `VALID`).
    Valid,
}

impl Padding {
    /// The same padding `p` on all four sides.
    pub const fn uniform(p: usize) -> Padding {
        Padding::Explicit { top: p, bottom: p, left: p, right: p }
    }

    /// Symmetric padding: `ph` rows above and below, `pw` columns left and right.
    pub const fn hw(ph: usize, pw: usize) -> Padding {
        Padding::Explicit { top: ph, bottom: ph, left: pw, right: pw }
    }

    /// Resolve to `[top, bottom, left, right]` for an input of `input` pixels and a window of
    /// `kernel` (already dilated) pixels moved by `stride`.
    pub fn resolve(&self, input: Hw, kernel: Hw, stride: Hw) -> [usize; 4] {
        match *self {
            Padding::Explicit { top, bottom, left, right } => [top, bottom, left, right],
            Padding::Valid => [0; 4],
            Padding::Same => {
                let total = |n: usize, k: usize, s: usize| {
                    let out = n.div_ceil(s);
                    ((out - 1) * s + k).saturating_sub(n)
                };
                let th = total(input[0], kernel[0], stride[0]);
                let tw = total(input[1], kernel[1], stride[1]);
                [th / 2, th - th / 2, tw / 2, tw - tw / 2]
            }
        }
    }

    /// The padding of the transposed image (rows and columns swapped): `top <-> left`,
    /// `bottom <-> right`; `same` and `valid` are their own transposes (they resolve per
    /// axis).
    pub const fn transposed(&self) -> Padding {
        match *self {
            Padding::Explicit { top, bottom, left, right } => Padding::Explicit { top: left, bottom: right, left: top, right: bottom },
            p => p,
        }
    }
}

impl fmt::Display for Padding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Padding::Same => f.write_str("same"),
            Padding::Valid => f.write_str("valid"),
            Padding::Explicit { top, bottom, left, right } => {
                if top == bottom && left == right && top == left {
                    write!(f, "{top}")
                } else if top == bottom && left == right {
                    write!(f, "({top}, {left})")
                } else {
                    write!(f, "({top}, {bottom}, {left}, {right})")
                }
            }
        }
    }
}

/// 2-D convolution (cross-correlation, as in every framework), `groups` way grouped.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv2d {
    /// Output channels `D` (the number of filters).
    pub out_channels: usize,
    /// Kernel `[kh, kw]`; `1x7` and `7x1` are first-class.
    pub kernel: Hw,
    /// Stride `[sh, sw]`.
    pub stride: Hw,
    /// Zero padding.
    pub padding: Padding,
    /// Dilation `[dh, dw]` (1 = dense kernel).
    pub dilation: Hw,
    /// Channel groups: 1 = ordinary, `in_channels` = depthwise.
    pub groups: usize,
    /// Whether a per-channel bias is added.
    pub bias: bool,
    /// Demand exact fit: `(N + 2P - F)` divisible by the stride, else a shape error.
    pub exact: bool,
}

impl Conv2d {
    /// A `kh x kw` convolution to `out_channels`, stride 1, no padding, with bias.
    pub const fn new(out_channels: usize, kernel: Hw) -> Conv2d {
        Conv2d {
            out_channels,
            kernel,
            stride: [1, 1],
            padding: Padding::Valid,
            dilation: [1, 1],
            groups: 1,
            bias: true,
            exact: false,
        }
    }
    /// The same convolution on transposed images (every plane's rows and columns swapped):
    /// kernel, stride, dilation and padding transposed; its output is the transpose of this
    /// one's when its taps are this kernel's transposed (`w'[co][ci][x][y] = w[co][ci][y][x]`),
    /// which for a `1 x k` or `k x 1` kernel is the very same weight memory.
    pub const fn transposed(&self) -> Conv2d {
        Conv2d {
            kernel: [self.kernel[1], self.kernel[0]],
            stride: [self.stride[1], self.stride[0]],
            dilation: [self.dilation[1], self.dilation[0]],
            padding: self.padding.transposed(),
            ..*self
        }
    }
    /// Same stride in both directions.
    pub const fn stride(mut self, s: usize) -> Self {
        self.stride = [s, s];
        self
    }
    /// Set the padding.
    pub const fn pad(mut self, p: Padding) -> Self {
        self.padding = p;
        self
    }
    /// Set the number of groups.
    pub const fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    /// Same dilation in both directions.
    pub const fn dilation(mut self, d: usize) -> Self {
        self.dilation = [d, d];
        self
    }
    /// Enable or disable the bias.
    pub const fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    /// The kernel's footprint once dilated: `d * (k - 1) + 1`.
    pub const fn dilated_kernel(&self) -> Hw {
        [
            self.dilation[0] * (self.kernel[0] - 1) + 1,
            self.dilation[1] * (self.kernel[1] - 1) + 1,
        ]
    }
    /// `[top, bottom, left, right]`; only meaningful once the node is in a graph
    /// (padding is then explicit).
    pub fn pads(&self) -> [usize; 4] {
        match self.padding {
            Padding::Explicit { top, bottom, left, right } => [top, bottom, left, right],
            _ => panic!("conv padding not resolved: add the op to a Graph first"),
        }
    }
}

/// Fully connected layer on a flat (or `C x 1 x 1`) input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dense {
    /// Output features.
    pub out_features: usize,
    /// Whether a bias is added.
    pub bias: bool,
}

/// Batch normalisation over `N x H x W` per channel, with learned scale `gamma` and shift `beta`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm {
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Running-statistics update rate: `running = (1 - m) * running + m * batch` (PyTorch's).
    pub momentum: f32,
}

impl Default for BatchNorm {
    fn default() -> Self {
        BatchNorm { eps: 1e-5, momentum: 0.1 }
    }
}

/// Local response normalisation across channels (AlexNet):
/// `y = x / (k + alpha / size * sum_{window} x^2) ^ beta` (PyTorch's convention).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lrn {
    /// Channels in the window.
    pub size: usize,
    /// Scale.
    pub alpha: f32,
    /// Exponent.
    pub beta: f32,
    /// Additive constant.
    pub k: f32,
}

impl Default for Lrn {
    fn default() -> Self {
        Lrn { size: 5, alpha: 1e-4, beta: 0.75, k: 2.0 }
    }
}

/// Elementwise activation functions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x` if positive, else `slope * x`.
    LeakyRelu {
        /// Negative slope.
        slope: f32,
    },
    /// `x` if positive, else `alpha * (exp(x) - 1)`.
    Elu {
        /// Saturation value for large negative inputs.
        alpha: f32,
    },
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    /// Lower-case name as written in the model language.
    pub const fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::LeakyRelu { .. } => "leaky_relu",
            Activation::Elu { .. } => "elu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
        }
    }
}

/// Max or average.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PoolKind {
    /// Maximum over the window.
    Max,
    /// Mean over the window.
    Avg,
}

/// Spatial pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pool2d {
    /// Max or average.
    pub kind: PoolKind,
    /// Window `[kh, kw]`.
    pub kernel: Hw,
    /// Stride `[sh, sw]`.
    pub stride: Hw,
    /// Padding (padded cells never win a max; see `count_include_pad` for averages).
    pub padding: Padding,
    /// Round the output size up instead of down (Caffe/GoogLeNet's pools).
    pub ceil_mode: bool,
    /// Average pooling divides by the full window including padding (PyTorch's default: true).
    pub count_include_pad: bool,
    /// Demand exact fit, as for [`Conv2d::exact`].
    pub exact: bool,
}

impl Pool2d {
    /// A `k x k` pool with stride `s`, no padding, floor mode.
    pub const fn new(kind: PoolKind, k: usize, s: usize) -> Pool2d {
        Pool2d {
            kind,
            kernel: [k, k],
            stride: [s, s],
            padding: Padding::Valid,
            ceil_mode: false,
            count_include_pad: true,
            exact: false,
        }
    }
    /// `[top, bottom, left, right]`; only meaningful once the node is in a graph.
    pub fn pads(&self) -> [usize; 4] {
        match self.padding {
            Padding::Explicit { top, bottom, left, right } => [top, bottom, left, right],
            _ => panic!("pool padding not resolved: add the op to a Graph first"),
        }
    }
}

/// Training losses; their input is the logits, the labels come from the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Loss {
    /// `-log softmax(x)[label]`, computed with the max subtracted.
    SoftmaxCrossEntropy,
    /// Multiclass SVM (Weston-Watkins / CS231n): `sum_{j != y} max(0, x_j - x_y + margin)`.
    MulticlassHinge {
        /// The margin, usually 1.
        margin: f32,
    },
}

/// One operation of the graph. Inputs are the node's incoming edges, in operand order.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input; its shape is the node's shape. No operands.
    Input,
    /// 2-D convolution. One operand.
    Conv2d(Conv2d),
    /// Fully connected layer. One operand (flat or `C x 1 x 1`).
    Dense(Dense),
    /// Batch normalisation. One operand.
    BatchNorm(BatchNorm),
    /// Local response normalisation. One operand.
    Lrn(Lrn),
    /// Elementwise activation. One operand.
    Act(Activation),
    /// Max or average pooling. One operand.
    Pool(Pool2d),
    /// Global average pooling: `C x H x W -> C x 1 x 1`. One operand.
    GlobalAvgPool,
    /// Inverted dropout with drop probability `p` (identity at inference). One operand.
    Dropout {
        /// Probability of zeroing an activation during training.
        p: f32,
    },
    /// `C x H x W -> C*H*W`. One operand.
    Flatten,
    /// Channel concatenation of two or more operands with equal `H x W`.
    Concat,
    /// Elementwise sum of two or more operands of one shape (residual connections).
    Add,
    /// `x * s` with `x: C x H x W` and `s: C` or `C x 1 x 1` broadcast over `H x W`
    /// (squeeze-and-excitation). Operands `[x, s]`.
    ChannelMul,
    /// Softmax over the features of a flat vector. One operand.
    Softmax,
    /// A training loss over the logits; output is one scalar per sample. One operand.
    Loss(Loss),
}

impl Op {
    /// Short lower-case name used in reports and IR text (`conv2d`, `maxpool`, ...).
    pub const fn kind(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Conv2d(_) => "conv2d",
            Op::Dense(_) => "dense",
            Op::BatchNorm(_) => "batchnorm",
            Op::Lrn(_) => "lrn",
            Op::Act(a) => a.name(),
            Op::Pool(p) => match p.kind {
                PoolKind::Max => "maxpool",
                PoolKind::Avg => "avgpool",
            },
            Op::GlobalAvgPool => "gap",
            Op::Dropout { .. } => "dropout",
            Op::Flatten => "flatten",
            Op::Concat => "concat",
            Op::Add => "add",
            Op::ChannelMul => "channel_mul",
            Op::Softmax => "softmax",
            Op::Loss(Loss::SoftmaxCrossEntropy) => "softmax_cross_entropy",
            Op::Loss(Loss::MulticlassHinge { .. }) => "multiclass_hinge",
        }
    }

    /// The number of operands the op takes: `Some(n)` exactly, `None` for variadic (>= 2).
    pub const fn arity(&self) -> Option<usize> {
        match self {
            Op::Input => Some(0),
            Op::Concat | Op::Add => None,
            Op::ChannelMul => Some(2),
            _ => Some(1),
        }
    }

    /// Whether the op has learned parameters.
    pub const fn has_params(&self) -> bool {
        matches!(self, Op::Conv2d(_) | Op::Dense(_) | Op::BatchNorm(_))
    }
}

impl fmt::Display for Op {
    /// The op with its attributes, as printed in the IR text:
    /// `conv2d 3x3 /1 pad 1 -> 64`, `maxpool 2x2 /2`, `dense -> 10`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Conv2d(c) => {
                write!(f, "conv2d {}x{} /{}", c.kernel[0], c.kernel[1], hw(c.stride))?;
                write!(f, " pad {}", c.padding)?;
                if c.dilation != [1, 1] {
                    write!(f, " dil {}", hw(c.dilation))?;
                }
                if c.groups != 1 {
                    write!(f, " groups {}", c.groups)?;
                }
                if !c.bias {
                    write!(f, " nobias")?;
                }
                write!(f, " -> {}", c.out_channels)
            }
            Op::Dense(d) => {
                write!(f, "dense")?;
                if !d.bias {
                    write!(f, " nobias")?;
                }
                write!(f, " -> {}", d.out_features)
            }
            Op::Pool(p) => {
                write!(f, "{} {}x{} /{} pad {}", self.kind(), p.kernel[0], p.kernel[1], hw(p.stride), p.padding)?;
                if p.ceil_mode {
                    write!(f, " ceil")?;
                }
                if p.kind == PoolKind::Avg && !p.count_include_pad {
                    write!(f, " exclude_pad")?;
                }
                Ok(())
            }
            Op::BatchNorm(b) => write!(f, "batchnorm eps {}", b.eps),
            Op::Lrn(l) => write!(f, "lrn size {} alpha {} beta {} k {}", l.size, l.alpha, l.beta, l.k),
            Op::Act(Activation::LeakyRelu { slope }) => write!(f, "leaky_relu {slope}"),
            Op::Act(Activation::Elu { alpha }) => write!(f, "elu {alpha}"),
            Op::Dropout { p } => write!(f, "dropout {p}"),
            Op::Loss(Loss::MulticlassHinge { margin }) => write!(f, "multiclass_hinge {margin}"),
            _ => f.write_str(self.kind()),
        }
    }
}

fn hw(v: Hw) -> String {
    if v[0] == v[1] {
        v[0].to_string()
    } else {
        format!("({}, {})", v[0], v[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // 224 input, 7x7 stride 2: out 112, total pad (111*2+7)-224 = 5 -> 2 top, 3 bottom.
        assert_eq!(Padding::Same.resolve([224, 224], [7, 7], [2, 2]), [2, 3, 2, 3]);
        // stride 1, 3x3: 1 on every side.
        assert_eq!(Padding::Same.resolve([28, 28], [3, 3], [1, 1]), [1, 1, 1, 1]);
        // 1x7 factored: pad only the width.
        assert_eq!(Padding::Same.resolve([17, 17], [1, 7], [1, 1]), [0, 0, 3, 3]);
    }

    #[test]
    fn display() {
        let c = Conv2d::new(64, [3, 3]).pad(Padding::uniform(1)).bias(false);
        assert_eq!(Op::Conv2d(c).to_string(), "conv2d 3x3 /1 pad 1 nobias -> 64");
        assert_eq!(Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)).to_string(), "maxpool 2x2 /2 pad valid");
    }
}
