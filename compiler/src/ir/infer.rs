//! Shape inference: one rule per [`Op`], with `(N + P_before + P_after - F) / S + 1` arithmetic.
//!
//! [`infer`] is called by [`Graph::add`](crate::ir::Graph::add) for every new node, so a graph
//! can never hold a node whose shape was not checked, and by the verifier to re-check a graph
//! after a pass. It also *resolves* attributes that depend on the input (`same`/`valid`
//! padding becomes explicit per-side padding) and returns the resolved op.

use super::op::*;
use super::shape::Shape;

/// Why an op does not fit its operands: the message and, where one exists, what would fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError {
    /// What is wrong, in the user's terms.
    pub message: String,
    /// What would fit.
    pub hint: Option<String>,
}

fn err<T>(message: impl Into<String>, hint: Option<String>) -> Result<T, ShapeError> {
    Err(ShapeError { message: message.into(), hint })
}

/// Infer the output shape of `op` applied to operands of shapes `inputs`, returning the op
/// with input-dependent attributes resolved (padding made explicit).
///
/// Before: `inputs.len()` matches the op's arity (the caller checks; violations are reported
/// as a [`ShapeError`] here too). After: the returned op's padding is [`Padding::Explicit`].
pub fn infer(op: &Op, inputs: &[Shape]) -> Result<(Op, Shape), ShapeError> {
    match op.arity() {
        Some(n) if inputs.len() != n => {
            return err(format!("takes {n} operand(s), got {}", inputs.len()), None)
        }
        None if inputs.len() < 2 => {
            return err(format!("needs at least 2 operands, got {}", inputs.len()), None)
        }
        _ => {}
    }
    let x = inputs.first().copied();
    match *op {
        Op::Input => err("an input node has no operands; its shape is given", None),
        Op::Conv2d(c) => conv2d(c, x.unwrap()),
        Op::Pool(p) => pool2d(p, x.unwrap()),
        Op::Dense(d) => {
            let x = x.unwrap();
            if d.out_features == 0 {
                return err("dense layer with 0 output features", None);
            }
            if !x.is_vector_like() {
                return err(
                    format!("dense on a {x} input is ambiguous (which axis is the feature axis?)"),
                    Some(format!("insert `flatten` before it (flatten gives {})", x.numel())),
                );
            }
            Ok((*op, Shape::flat(d.out_features)))
        }
        Op::BatchNorm(_) | Op::Lrn(_) | Op::Act(_) | Op::Dropout { .. } => {
            if let Op::Dropout { p } = *op {
                if !(0.0..1.0).contains(&p) {
                    return err(format!("dropout probability {p} is outside [0, 1)"), None);
                }
            }
            if let Op::Lrn(l) = *op {
                if l.size == 0 {
                    return err("lrn window size 0", None);
                }
            }
            Ok((*op, x.unwrap()))
        }
        Op::GlobalAvgPool => match x.unwrap() {
            Shape::Chw { c, .. } => Ok((*op, Shape::chw(c, 1, 1))),
            s @ Shape::Flat { .. } => err(
                format!("global average pooling needs a CxHxW input, got the flat vector {s}"),
                Some("apply it before `flatten`".into()),
            ),
        },
        Op::Flatten => Ok((*op, Shape::flat(x.unwrap().numel()))),
        Op::Concat => concat(inputs),
        Op::Add => {
            let first = inputs[0];
            for (i, s) in inputs.iter().enumerate().skip(1) {
                if *s != first {
                    return err(
                        format!("cannot add operand {} of shape {s} to operand 1 of shape {first}", i + 1),
                        projection_hint(first, *s),
                    );
                }
            }
            Ok((*op, first))
        }
        Op::ChannelMul => {
            let (x, s) = (inputs[0], inputs[1]);
            let Shape::Chw { c, .. } = x else {
                return err(format!("channel-wise multiply needs a CxHxW first operand, got {x}"), None);
            };
            if !s.is_vector_like() || s.numel() != c {
                return err(
                    format!("channel-wise multiply of {x} needs a scale of {c} (or {c}x1x1) values, got {s}"),
                    Some(format!("end the scale branch with a layer of {c} outputs")),
                );
            }
            Ok((*op, x))
        }
        Op::Softmax | Op::Loss(_) => {
            let x = x.unwrap();
            if !x.is_vector_like() {
                return err(
                    format!("{} expects class scores (a flat vector), got {x}", op.kind()),
                    Some("end the network with `flatten` and a dense layer".into()),
                );
            }
            if matches!(op, Op::Loss(_)) {
                Ok((*op, Shape::flat(1)))
            } else {
                Ok((*op, Shape::flat(x.numel())))
            }
        }
    }
}

/// A `1x1` projection that would make `shortcut` match `main`, when one exists.
fn projection_hint(main: Shape, shortcut: Shape) -> Option<String> {
    let (Shape::Chw { c: c1, h: h1, w: w1 }, Shape::Chw { h: h2, w: w2, .. }) = (main, shortcut) else {
        return None;
    };
    if h1 == 0 || w1 == 0 || h2 < h1 || w2 < w1 {
        return None;
    }
    let (sh, sw) = (h2.div_ceil(h1), w2.div_ceil(w1));
    if sh != sw || (h2 - 1) / sh + 1 != h1 || (w2 - 1) / sw + 1 != w1 {
        return None;
    }
    Some(if sh == 1 {
        format!("add a 1x1 projection to the shortcut: conv({c1}, 1x1)")
    } else {
        format!("add a 1x1 projection to the shortcut: conv({c1}, 1x1, stride={sh})")
    })
}

/// Check that a `k` window fits an `[h, w]` input padded by `[t, b, l, r]`.
fn window_fits(what: &str, input: Hw, pads: [usize; 4], k: Hw) -> Result<(), String> {
    let padded = [input[0] + pads[0] + pads[1], input[1] + pads[2] + pads[3]];
    if k[0] <= padded[0] && k[1] <= padded[1] {
        return Ok(());
    }
    let got = if padded == input {
        format!("{}x{}", input[0], input[1])
    } else {
        format!("{}x{} ({}x{} padded)", input[0], input[1], padded[0], padded[1])
    };
    Err(format!("{what} needs at least {}x{} input, got {got}", k[0], k[1]))
}

/// Output extent of a window op along one axis (the window is known to fit).
fn window_out(axis: &str, n: usize, pads: (usize, usize), k: usize, s: usize, ceil: bool, exact: bool) -> Result<usize, String> {
    let span = n + pads.0 + pads.1 - k;
    if exact && !span.is_multiple_of(s) {
        return Err(format!(
            "stride {s} does not fit exactly along {axis}: (N + 2P - F) = ({n} + {} - {k}) = {span} is not divisible by {s}",
            pads.0 + pads.1
        ));
    }
    let mut out = if ceil { span.div_ceil(s) + 1 } else { span / s + 1 };
    // PyTorch's rule: the last window must start inside the input or its leading padding.
    if ceil && (out - 1) * s >= n + pads.0 {
        out -= 1;
    }
    Ok(out)
}

fn conv2d(mut c: Conv2d, x: Shape) -> Result<(Op, Shape), ShapeError> {
    let Shape::Chw { c: cin, h, w } = x else {
        return err(
            format!("conv2d needs a CxHxW input, got the flat vector {x}"),
            Some("convolutions must come before `flatten`".into()),
        );
    };
    if c.out_channels == 0 || c.kernel.contains(&0) || c.stride.contains(&0) || c.dilation.contains(&0) || c.groups == 0 {
        return err("conv2d with a zero channel count, kernel, stride, dilation or group count", None);
    }
    if !cin.is_multiple_of(c.groups) || !c.out_channels.is_multiple_of(c.groups) {
        return err(
            format!(
                "groups = {} must divide both input channels ({cin}) and output channels ({})",
                c.groups, c.out_channels
            ),
            None,
        );
    }
    let k = c.dilated_kernel();
    let [t, b, l, r] = c.padding.resolve([h, w], k, c.stride);
    let desc = describe_window("conv", c.kernel, c.padding);
    if let Err(m) = window_fits(&desc, [h, w], [t, b, l, r], k) {
        let need = k[0].saturating_sub(h).div_ceil(2);
        let need = need.max(k[1].saturating_sub(w).div_ceil(2));
        return err(m, Some(format!("use a kernel of at most {}x{}, or pad={need}", h + t + b, w + l + r)));
    }
    let oh = window_out("height", h, (t, b), k[0], c.stride[0], false, c.exact);
    let ow = window_out("width", w, (l, r), k[1], c.stride[1], false, c.exact);
    let (oh, ow) = match (oh, ow) {
        (Ok(oh), Ok(ow)) => (oh, ow),
        (Err(m), _) => return err(m, exact_fit_hint(h + t + b - k[0], c.stride[0], t + b)),
        (_, Err(m)) => return err(m, exact_fit_hint(w + l + r - k[1], c.stride[1], l + r)),
    };
    c.padding = Padding::Explicit { top: t, bottom: b, left: l, right: r };
    Ok((Op::Conv2d(c), Shape::chw(c.out_channels, oh, ow)))
}

fn pool2d(mut p: Pool2d, x: Shape) -> Result<(Op, Shape), ShapeError> {
    let Shape::Chw { c, h, w } = x else {
        return err(format!("pooling needs a CxHxW input, got the flat vector {x}"), None);
    };
    if p.kernel.contains(&0) || p.stride.contains(&0) {
        return err("pooling with a zero kernel or stride", None);
    }
    let [t, b, l, r] = p.padding.resolve([h, w], p.kernel, p.stride);
    if t.max(b) * 2 > p.kernel[0] || l.max(r) * 2 > p.kernel[1] {
        return err(
            format!("padding ({t}, {b}, {l}, {r}) exceeds half the {}x{} window", p.kernel[0], p.kernel[1]),
            Some("pad at most half the window on each side".into()),
        );
    }
    let desc = describe_window(p.kind_name(), p.kernel, p.padding);
    if let Err(m) = window_fits(&desc, [h, w], [t, b, l, r], p.kernel) {
        return err(m, Some(format!("remove this pool or use a window of at most {h}x{w}")));
    }
    let oh = window_out("height", h, (t, b), p.kernel[0], p.stride[0], p.ceil_mode, p.exact);
    let ow = window_out("width", w, (l, r), p.kernel[1], p.stride[1], p.ceil_mode, p.exact);
    match (oh, ow) {
        (Ok(oh), Ok(ow)) => {
            p.padding = Padding::Explicit { top: t, bottom: b, left: l, right: r };
            Ok((Op::Pool(p), Shape::chw(c, oh, ow)))
        }
        (Err(m), _) => err(m, exact_fit_hint(h + t + b - p.kernel[0], p.stride[0], t + b)),
        (_, Err(m)) => err(m, exact_fit_hint(w + l + r - p.kernel[1], p.stride[1], l + r)),
    }
}

impl Pool2d {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "maxpool",
            PoolKind::Avg => "avgpool",
        }
    }
}

fn describe_window(what: &str, k: Hw, pad: Padding) -> String {
    let p = match pad {
        Padding::Valid => " (no padding)".to_string(),
        Padding::Explicit { top: 0, bottom: 0, left: 0, right: 0 } => " (no padding)".to_string(),
        Padding::Same => " (same padding)".to_string(),
        other => format!(" (padding {other})"),
    };
    format!("{what} {}x{}{p}", k[0], k[1])
}

fn exact_fit_hint(span: usize, s: usize, pad_total: usize) -> Option<String> {
    let extra = (s - span % s) % s;
    Some(format!(
        "{} more pixel(s) of total padding (total {}) would fit, or drop `exact`",
        extra,
        pad_total + extra
    ))
}

fn concat(inputs: &[Shape]) -> Result<(Op, Shape), ShapeError> {
    match inputs[0] {
        Shape::Flat { .. } => {
            if let Some((i, s)) = inputs.iter().enumerate().find(|(_, s)| !matches!(s, Shape::Flat { .. })) {
                return err(format!("cannot concatenate branch {} ({s}) with flat vectors", i + 1), None);
            }
            Ok((Op::Concat, Shape::flat(inputs.iter().map(Shape::numel).sum())))
        }
        Shape::Chw { h, w, .. } => {
            let mut c = 0;
            for (i, s) in inputs.iter().enumerate() {
                match *s {
                    Shape::Chw { c: ci, h: hi, w: wi } if hi == h && wi == w => c += ci,
                    _ => {
                        return err(
                            format!(
                                "concat needs equal spatial sizes: branch 1 is {} but branch {} is {s}",
                                inputs[0],
                                i + 1
                            ),
                            Some("give every branch the same stride and `same` padding".into()),
                        )
                    }
                }
            }
            Ok((Op::Concat, Shape::chw(c, h, w)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(op: Op, x: Shape) -> Shape {
        infer(&op, &[x]).unwrap().1
    }

    #[test]
    fn conv_arithmetic() {
        // AlexNet conv1 as in torchvision: 11x11 /4 pad 2 on 224 -> 55.
        let c = Conv2d::new(64, [11, 11]).stride(4).pad(Padding::uniform(2));
        assert_eq!(out(Op::Conv2d(c), Shape::chw(3, 224, 224)), Shape::chw(64, 55, 55));
        // Course example: 7x7 input, 3x3 filter, stride 2 -> 3x3; stride 3 does not fit.
        let c = Conv2d::new(1, [3, 3]).stride(2);
        assert_eq!(out(Op::Conv2d(c), Shape::chw(1, 7, 7)), Shape::chw(1, 3, 3));
        let mut c = Conv2d::new(1, [3, 3]).stride(3);
        c.exact = true;
        let e = infer(&Op::Conv2d(c), &[Shape::chw(1, 7, 7)]).unwrap_err();
        assert!(e.message.contains("not divisible by 3"), "{}", e.message);
        // factored 1x7 with same padding keeps the size
        let c = Conv2d::new(8, [1, 7]).pad(Padding::Same);
        let (op, s) = infer(&Op::Conv2d(c), &[Shape::chw(4, 17, 17)]).unwrap();
        assert_eq!(s, Shape::chw(8, 17, 17));
        assert!(matches!(op, Op::Conv2d(c) if c.pads() == [0, 0, 3, 3]));
    }

    #[test]
    fn kernel_too_large_names_sizes() {
        let c = Conv2d::new(16, [5, 5]);
        let e = infer(&Op::Conv2d(c), &[Shape::chw(6, 4, 4)]).unwrap_err();
        assert_eq!(e.message, "conv 5x5 (no padding) needs at least 5x5 input, got 4x4");
        assert_eq!(e.hint.as_deref(), Some("use a kernel of at most 4x4, or pad=1"));
    }

    #[test]
    fn ceil_mode_pool() {
        // GoogLeNet: 112 -> maxpool 3x3 /2 ceil -> 56.
        let mut p = Pool2d::new(PoolKind::Max, 3, 2);
        p.ceil_mode = true;
        assert_eq!(out(Op::Pool(p), Shape::chw(64, 112, 112)), Shape::chw(64, 56, 56));
        p.ceil_mode = false;
        assert_eq!(out(Op::Pool(p), Shape::chw(64, 112, 112)), Shape::chw(64, 55, 55));
    }

    #[test]
    fn add_mismatch_suggests_projection() {
        let e = infer(&Op::Add, &[Shape::chw(128, 28, 28), Shape::chw(64, 56, 56)]).unwrap_err();
        assert_eq!(e.hint.as_deref(), Some("add a 1x1 projection to the shortcut: conv(128, 1x1, stride=2)"));
    }

    #[test]
    fn concat_and_dense() {
        let s = infer(&Op::Concat, &[Shape::chw(64, 28, 28), Shape::chw(128, 28, 28)]).unwrap().1;
        assert_eq!(s, Shape::chw(192, 28, 28));
        assert!(infer(&Op::Concat, &[Shape::chw(64, 28, 28), Shape::chw(128, 14, 14)]).is_err());
        let d = Op::Dense(Dense { out_features: 10, bias: true });
        assert!(infer(&d, &[Shape::chw(16, 4, 4)]).unwrap_err().hint.unwrap().contains("flatten"));
        assert_eq!(out(d, Shape::chw(16, 1, 1)), Shape::flat(10));
    }
}
