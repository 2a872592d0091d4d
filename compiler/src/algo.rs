//! Algorithm choices that follow from a layer's geometry alone, shared by the passes that plan
//! around them (`passes::layout`) and the lowering that implements them (`lower`, feature
//! `jit`), so the two cannot disagree.

use crate::ir::Conv2d;

/// Which axis a one-dimensional (`3 x 1` or `1 x 3`) filter runs along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// A 3x1 kernel: along the rows' index (`y`), combining whole rows.
    Rows,
    /// A 1x3 kernel: along each row (`x`).
    Cols,
}

/// Fewest input and output channels for which the 1-D Winograd (1x3, 3x1) is used. Measured
/// like `lower::conv::WINOGRAD_MIN_CHANNELS` on the CIFAR inception net's factored layers
/// (batch 16, `F(4, 3)`; Winograd / direct time for forward, backward data, weight gradient):
/// 48->64 1x3 on 32x32 0.86 / 0.94 / 0.83, 48->48 3x1 on 16x16 0.77 / 0.75 / 0.75, but 32->48
/// 1x3 on 16x16 1.05 / 1.07 / 1.04, 16->16 3x1 on 32x32 1.07 / 1.07 / 1.08 and 16->16 1x3 on
/// 32x32 1.53 / 1.50 / 1.50: with only `Cin` for the GEMMs' reduction and 1.5 transformed
/// values per input and output value, the transforms cost more than the halved
/// multiplications save.
pub const WINOGRAD_1D_MIN_CHANNELS: usize = 48;

/// Stride 1, undilated, one group: the convolutions Winograd can run.
pub fn plain(conv: &Conv2d) -> bool {
    conv.stride == [1, 1] && conv.dilation == [1, 1] && conv.groups == 1
}

/// The axis of the one-dimensional Winograd convolution `conv` runs on over an input of
/// `(cin, h, w)` (the lowering's `winograd1d`): a [`plain`] 3x1 or 1x3 kernel with no padding
/// across its filter (as resolved for that input), at least [`WINOGRAD_1D_MIN_CHANNELS`]
/// input and output channels; `None` for any other layer.
pub fn winograd_1d_axis(conv: &Conv2d, (cin, h, w): (usize, usize, usize)) -> Option<Axis> {
    let pads = conv.padding.resolve([h, w], conv.dilated_kernel(), conv.stride);
    let axis = match (conv.kernel, pads) {
        ([3, 1], [_, _, 0, 0]) => Axis::Rows,
        ([1, 3], [0, 0, _, _]) => Axis::Cols,
        _ => return None,
    };
    let wide = cin >= WINOGRAD_1D_MIN_CHANNELS && conv.out_channels >= WINOGRAD_1D_MIN_CHANNELS;
    (plain(conv) && wide).then_some(axis)
}
