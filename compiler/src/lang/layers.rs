//! The built-in layers: their signatures (positional and keyword arguments with types),
//! argument binding shared by layers and blocks, and the conversion of evaluated arguments
//! into an [`ir::Op`](crate::ir::Op).

use super::ast::{Arg, Call};
use super::diag::{did_you_mean, Diagnostic};
use super::eval::Value;
use crate::ir::{Activation, BatchNorm, Conv2d, Dense, Lrn, Op, Padding, Pool2d, PoolKind, Shape};
use proc_macro2::Span;

/// The type an argument must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    /// An integer >= 1.
    Count,
    /// `k` (= `kxk`), `KxK` or `(h, w)`, every entry >= 1.
    Size,
    /// `p`, `(h, w)`, `(t, b, l, r)`, `same`, `valid`.
    Pad,
    Bool,
    /// A number (integers allowed).
    Float,
    /// A number in `[0, 1)`.
    Prob,
}

/// A built-in layer's signature.
pub(crate) struct Sig {
    /// The name as written (`conv`, `batchnorm`).
    pub name: &'static str,
    /// The base of automatic names (`conv` -> `conv1`; `batchnorm` -> `bn1`).
    pub kind: &'static str,
    /// Positional parameters (also accepted as keywords), in order.
    pub positional: &'static [(&'static str, Ty)],
    /// How many leading positional parameters are required.
    pub required: usize,
    /// Keyword-only parameters.
    pub keywords: &'static [(&'static str, Ty)],
}

impl Sig {
    /// All parameters: positional ones then keywords.
    pub fn params(&self) -> impl Iterator<Item = (&'static str, Ty)> + Clone {
        self.positional.iter().chain(self.keywords).copied()
    }

    /// The parameter list used by [`bind`].
    pub fn spec(&self) -> ParamSpec {
        ParamSpec {
            names: self.params().map(|(n, _)| n.to_string()).collect(),
            n_positional: self.positional.len(),
            required: (0..self.positional.len() + self.keywords.len()).map(|i| i < self.required).collect(),
        }
    }
}

use Ty::*;
const CONV_KW: &[(&str, Ty)] =
    &[("stride", Size), ("pad", Pad), ("dilation", Size), ("groups", Count), ("bias", Bool), ("exact", Bool)];
const DWCONV_KW: &[(&str, Ty)] = &[("stride", Size), ("pad", Pad), ("dilation", Size), ("bias", Bool), ("exact", Bool)];
const POOL_KW: &[(&str, Ty)] = &[("stride", Size), ("pad", Pad), ("ceil", Bool), ("exact", Bool)];
const AVGPOOL_KW: &[(&str, Ty)] = &[("stride", Size), ("pad", Pad), ("ceil", Bool), ("exact", Bool), ("count_pad", Bool)];
const BN_KW: &[(&str, Ty)] = &[("eps", Float), ("momentum", Float)];

const fn sig(name: &'static str, kind: &'static str, positional: &'static [(&'static str, Ty)], required: usize, keywords: &'static [(&'static str, Ty)]) -> Sig {
    Sig { name, kind, positional, required, keywords }
}

/// Every built-in layer.
pub(crate) const LAYERS: &[Sig] = &[
    sig("conv", "conv", &[("out", Count), ("kernel", Size)], 2, CONV_KW),
    sig("dwconv", "dwconv", &[("kernel", Size)], 1, DWCONV_KW),
    sig("dense", "dense", &[("out", Count)], 1, &[("bias", Bool)]),
    sig("maxpool", "maxpool", &[("kernel", Size)], 1, POOL_KW),
    sig("avgpool", "avgpool", &[("kernel", Size)], 1, AVGPOOL_KW),
    sig("gap", "gap", &[], 0, &[]),
    sig("bn", "bn", &[], 0, BN_KW),
    sig("batchnorm", "bn", &[], 0, BN_KW),
    sig("lrn", "lrn", &[], 0, &[("size", Count), ("alpha", Float), ("beta", Float), ("k", Float)]),
    sig("relu", "relu", &[], 0, &[]),
    sig("sigmoid", "sigmoid", &[], 0, &[]),
    sig("tanh", "tanh", &[], 0, &[]),
    sig("leaky_relu", "leaky_relu", &[], 0, &[("slope", Float)]),
    sig("elu", "elu", &[], 0, &[("alpha", Float)]),
    sig("dropout", "dropout", &[("p", Prob)], 0, &[]),
    sig("flatten", "flatten", &[], 0, &[]),
    sig("softmax", "softmax", &[], 0, &[]),
];

/// The built-in layer called `name`.
pub(crate) fn lookup(name: &str) -> Option<&'static Sig> {
    LAYERS.iter().find(|s| s.name == name)
}

/// A parameter list to bind call arguments against (a layer's or a block's).
pub(crate) struct ParamSpec {
    pub names: Vec<String>,
    /// Parameters `0..n_positional` may be passed positionally.
    pub n_positional: usize,
    pub required: Vec<bool>,
}

impl ParamSpec {
    /// `conv(out, kernel)`: the usage line for help messages.
    pub fn usage(&self, callee: &str) -> String {
        let mut parts: Vec<String> = self.names[..self.n_positional].to_vec();
        if self.names.len() > self.n_positional {
            parts.push("key = value...".into());
        }
        format!("{callee}({})", parts.join(", "))
    }
}

/// Match `call`'s arguments to `spec`'s parameters: the argument given for each parameter.
/// Reports every problem (too many positionals, unknown or repeated keywords, missing ones).
pub(crate) fn bind<'c>(what: &str, spec: &ParamSpec, call: &'c Call) -> Result<Vec<Option<&'c Arg>>, Vec<Diagnostic>> {
    let callee = &call.name.text;
    let mut out: Vec<Option<&Arg>> = vec![None; spec.names.len()];
    let mut errs = Vec::new();
    let mut pos = 0;
    let mut seen_kw = false;
    for a in &call.args {
        match &a.key {
            None => {
                if seen_kw {
                    errs.push(Diagnostic::new(a.span, "positional argument after a keyword argument").help(format!("write positional arguments first: {}", spec.usage(callee))));
                } else if pos >= spec.n_positional {
                    let d = if spec.n_positional == 0 {
                        Diagnostic::new(a.span, format!("{what} `{callee}` takes no positional arguments"))
                    } else {
                        Diagnostic::new(a.span, format!("{what} `{callee}` takes {} positional argument{}, got {}", spec.n_positional, if spec.n_positional == 1 { "" } else { "s" }, call.args.iter().filter(|a| a.key.is_none()).count()))
                    };
                    let kws: Vec<&str> = spec.names[spec.n_positional..].iter().map(String::as_str).collect();
                    errs.push(d.label("unexpected argument").help(if kws.is_empty() {
                        format!("usage: {}", spec.usage(callee))
                    } else {
                        format!("usage: {}; other arguments are keywords: {}", spec.usage(callee), kws.join(", "))
                    }));
                    pos += 1;
                } else {
                    out[pos] = Some(a);
                    pos += 1;
                }
            }
            Some(k) => {
                seen_kw = true;
                match spec.names.iter().position(|n| *n == k.text) {
                    Some(i) if out[i].is_some() => {
                        errs.push(Diagnostic::new(k.span, format!("argument `{}` given twice", k.text)));
                    }
                    Some(i) => out[i] = Some(a),
                    None => {
                        let mut d = Diagnostic::new(k.span, format!("{what} `{callee}` has no argument `{}`", k.text)).label("unknown argument");
                        d = match did_you_mean(&k.text, spec.names.iter().map(String::as_str)) {
                            Some(s) => d.help(format!("did you mean `{s}`?")),
                            None if spec.names.is_empty() => d.help(format!("`{callee}` takes no arguments")),
                            None => d.help(format!("`{callee}` takes: {}", spec.names.join(", "))),
                        };
                        errs.push(d);
                    }
                }
            }
        }
    }
    // Missing arguments are usually a consequence of the errors above: report them alone.
    for (i, req) in spec.required.iter().enumerate() {
        if errs.is_empty() && *req && out[i].is_none() {
            errs.push(
                Diagnostic::new(call.span, format!("{what} `{callee}` is missing its argument `{}`", spec.names[i]))
                    .help(format!("usage: {}", spec.usage(callee))),
            );
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

/// What a type expects, in words.
fn expects(ty: Ty) -> &'static str {
    match ty {
        Count => "a positive integer",
        Size => "a size: `KxK` (like `3x3` or `1x7`), an integer `k` for `kxk`, or `(h, w)`",
        Pad => "a padding: an integer, `(h, w)`, `(top, bottom, left, right)`, `same` or `valid`",
        Bool => "`true` or `false`",
        Float => "a number",
        Prob => "a probability in [0, 1)",
    }
}

fn int_at_least(v: &Value, min: i64) -> Option<usize> {
    match *v {
        Value::Int(i) if i >= min => Some(i as usize),
        _ => None,
    }
}

fn to_count(v: &Value) -> Option<usize> {
    int_at_least(v, 1)
}

fn to_size(v: &Value) -> Option<[usize; 2]> {
    match v {
        Value::Int(_) => to_count(v).map(|k| [k, k]),
        Value::Dims(d) if d.len() == 2 => Some([d[0], d[1]]),
        Value::Tuple(t) if t.len() == 2 => Some([to_count(&t[0])?, to_count(&t[1])?]),
        _ => None,
    }
}

fn to_pad(v: &Value) -> Option<Padding> {
    match v {
        Value::Int(_) => int_at_least(v, 0).map(Padding::uniform),
        Value::Word("same") => Some(Padding::Same),
        Value::Word("valid") => Some(Padding::Valid),
        Value::Tuple(t) if t.len() == 2 => Some(Padding::hw(int_at_least(&t[0], 0)?, int_at_least(&t[1], 0)?)),
        Value::Tuple(t) if t.len() == 4 => {
            let p: Option<Vec<usize>> = t.iter().map(|x| int_at_least(x, 0)).collect();
            let p = p?;
            Some(Padding::Explicit { top: p[0], bottom: p[1], left: p[2], right: p[3] })
        }
        _ => None,
    }
}

fn to_float(v: &Value) -> Option<f32> {
    match *v {
        Value::Int(i) => Some(i as f32),
        Value::Float(f) if f.is_finite() => Some(f as f32),
        _ => None,
    }
}

fn to_bool(v: &Value) -> Option<bool> {
    match *v {
        Value::Bool(b) => Some(b),
        _ => None,
    }
}

/// Check that `v` has type `ty`; the error says what was expected.
pub(crate) fn check_ty(ty: Ty, v: &Value) -> Result<(), String> {
    let ok = match ty {
        Count => to_count(v).is_some(),
        Size => to_size(v).is_some(),
        Pad => to_pad(v).is_some(),
        Bool => to_bool(v).is_some(),
        Float => to_float(v).is_some(),
        Prob => to_float(v).is_some_and(|p| (0.0..1.0).contains(&p)),
    };
    if ok {
        Ok(())
    } else {
        Err(expects(ty).to_string())
    }
}

/// The diagnostic for argument `param` of `layer` having the wrong type.
pub(crate) fn type_error(layer: &Sig, param: &str, ty: Ty, v: &Value, span: Span, all: &[Option<(Value, Span)>]) -> Diagnostic {
    let mut d = Diagnostic::new(span, format!("`{param}` of `{}` must be {}, got `{v}`", layer.name, expects(ty)))
        .label(format!("this is {}", v.kind()));
    // conv(3x3, 64): arguments swapped.
    if layer.name == "conv" && param == "out" {
        let is = |i: usize, f: fn(&Value) -> bool| all.get(i).and_then(|a| a.as_ref()).is_some_and(|(v, _)| f(v));
        if is(0, |v| matches!(v, Value::Dims(_))) && is(1, |v| matches!(v, Value::Int(_))) {
            d = d.help("the output channel count comes first: `conv(out, kernel)`, e.g. `conv(64, 3x3)`");
        }
    }
    if matches!(ty, Count) && matches!(v, Value::Int(i) if *i < 1) {
        d = d.label("must be at least 1");
    }
    d
}

/// Evaluated arguments aligned with [`Sig::params`].
pub(crate) type Args = Vec<Option<(Value, Span)>>;

struct Get<'a> {
    sig: &'static Sig,
    args: &'a Args,
}

impl Get<'_> {
    fn raw(&self, name: &str) -> Option<(&Value, Span, Ty)> {
        let i = self.sig.params().position(|(n, _)| n == name)?;
        let ty = self.sig.params().nth(i)?.1;
        self.args[i].as_ref().map(|(v, s)| (v, *s, ty))
    }
    fn get<T>(&self, name: &str, conv: fn(&Value) -> Option<T>, default: T) -> Result<T, Diagnostic> {
        match self.raw(name) {
            None => Ok(default),
            Some((v, span, ty)) => match (conv(v), check_ty(ty, v)) {
                (Some(t), Ok(())) => Ok(t),
                _ => Err(type_error(self.sig, name, ty, v, span, self.args)),
            },
        }
    }
    fn count(&self, name: &str, default: usize) -> Result<usize, Diagnostic> {
        self.get(name, to_count, default)
    }
    fn size(&self, name: &str, default: [usize; 2]) -> Result<[usize; 2], Diagnostic> {
        self.get(name, to_size, default)
    }
    fn pad(&self, name: &str) -> Result<Padding, Diagnostic> {
        self.get(name, to_pad, Padding::Valid)
    }
    fn flag(&self, name: &str, default: bool) -> Result<bool, Diagnostic> {
        self.get(name, to_bool, default)
    }
    fn float(&self, name: &str, default: f32) -> Result<f32, Diagnostic> {
        self.get(name, to_float, default)
    }
}

/// Build the op for a call of `sig` with evaluated `args`, on an input of shape `input`
/// (needed by `dwconv`, whose group count is the input channel count).
pub(crate) fn build(sig: &'static Sig, args: &Args, input: Shape) -> Result<Op, Diagnostic> {
    let a = Get { sig, args };
    Ok(match sig.name {
        "conv" | "dwconv" => {
            let depthwise = sig.name == "dwconv";
            let (out, groups) = if depthwise {
                let c = input.channels();
                (c, c)
            } else {
                (a.count("out", 1)?, a.count("groups", 1)?)
            };
            let kernel = a.size("kernel", [1, 1])?;
            Op::Conv2d(Conv2d {
                out_channels: out,
                kernel,
                stride: a.size("stride", [1, 1])?,
                padding: a.pad("pad")?,
                dilation: a.size("dilation", [1, 1])?,
                groups,
                bias: a.flag("bias", true)?,
                exact: a.flag("exact", false)?,
            })
        }
        "dense" => Op::Dense(Dense { out_features: a.count("out", 1)?, bias: a.flag("bias", true)? }),
        "maxpool" | "avgpool" => {
            let kernel = a.size("kernel", [2, 2])?;
            let kind = if sig.name == "maxpool" { PoolKind::Max } else { PoolKind::Avg };
            Op::Pool(Pool2d {
                kind,
                kernel,
                stride: a.size("stride", kernel)?,
                padding: a.pad("pad")?,
                ceil_mode: a.flag("ceil", false)?,
                count_include_pad: a.flag("count_pad", true)?,
                exact: a.flag("exact", false)?,
            })
        }
        "gap" => Op::GlobalAvgPool,
        "bn" | "batchnorm" => {
            let d = BatchNorm::default();
            Op::BatchNorm(BatchNorm { eps: a.float("eps", d.eps)?, momentum: a.float("momentum", d.momentum)? })
        }
        "lrn" => {
            let d = Lrn::default();
            Op::Lrn(Lrn {
                size: a.count("size", d.size)?,
                alpha: a.float("alpha", d.alpha)?,
                beta: a.float("beta", d.beta)?,
                k: a.float("k", d.k)?,
            })
        }
        "relu" => Op::Act(Activation::Relu),
        "sigmoid" => Op::Act(Activation::Sigmoid),
        "tanh" => Op::Act(Activation::Tanh),
        "leaky_relu" => Op::Act(Activation::LeakyRelu { slope: a.float("slope", 0.01)? }),
        "elu" => Op::Act(Activation::Elu { alpha: a.float("alpha", 1.0)? }),
        "dropout" => Op::Dropout { p: a.get("p", to_float, 0.5)? },
        "flatten" => Op::Flatten,
        "softmax" => Op::Softmax,
        other => unreachable!("layer `{other}` is in LAYERS but has no builder"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_builds_with_defaults() {
        for s in LAYERS {
            let mut args: Args = vec![None; s.params().count()];
            if s.name == "conv" {
                args[0] = Some((Value::Int(8), Span::call_site()));
                args[1] = Some((Value::Dims(vec![3, 3]), Span::call_site()));
            }
            if matches!(s.name, "dwconv" | "maxpool" | "avgpool") {
                args[0] = Some((Value::Int(3), Span::call_site()));
            }
            if s.name == "dense" {
                args[0] = Some((Value::Int(10), Span::call_site()));
            }
            build(s, &args, Shape::chw(4, 8, 8)).unwrap();
        }
    }

    #[test]
    fn conversions() {
        assert_eq!(to_size(&Value::Int(3)), Some([3, 3]));
        assert_eq!(to_size(&Value::Dims(vec![1, 7])), Some([1, 7]));
        assert_eq!(to_size(&Value::Tuple(vec![Value::Int(2), Value::Int(1)])), Some([2, 1]));
        assert_eq!(to_size(&Value::Dims(vec![3, 3, 3])), None);
        assert_eq!(to_pad(&Value::Tuple(vec![Value::Int(1), Value::Int(2)])), Some(Padding::hw(1, 2)));
        assert_eq!(to_pad(&Value::Int(-1)), None);
        assert!(check_ty(Prob, &Value::Float(1.0)).is_err());
        assert!(check_ty(Prob, &Value::Float(0.3)).is_ok());
    }
}
