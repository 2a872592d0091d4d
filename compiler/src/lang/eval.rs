//! Values and expression evaluation: integer arithmetic with exact division, comparisons and
//! logic on block/model parameters.

use super::ast::{BinOp, Expr, ExprKind, UnOp};
use super::diag::{did_you_mean, Diagnostic};
use std::collections::BTreeMap;
use std::fmt;

/// A value of the model language: what parameters hold and arguments evaluate to.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An integer (`64`, `c / 4`).
    Int(i64),
    /// A floating-point number (`0.5`, `1e-5`).
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A size: `3x3`, `1x7`, `3x224x224`, or `k x k` (every dimension at least 1).
    Dims(Vec<usize>),
    /// A parenthesised tuple `(1, 2)`.
    Tuple(Vec<Value>),
    /// The words `same` and `valid`.
    Word(&'static str),
}

impl Value {
    /// What kind of value this is, in words (`an integer`, `a size like 3x3`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "`true`/`false`",
            Value::Dims(_) => "a size",
            Value::Tuple(_) => "a tuple",
            Value::Word(_) => "a word",
        }
    }
}

impl fmt::Display for Value {
    /// The value as it would be written in the language.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v:?}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Dims(d) => {
                let s: Vec<String> = d.iter().map(|v| v.to_string()).collect();
                f.write_str(&s.join("x"))
            }
            Value::Tuple(t) => {
                let s: Vec<String> = t.iter().map(|v| v.to_string()).collect();
                write!(f, "({})", s.join(", "))
            }
            Value::Word(w) => f.write_str(w),
        }
    }
}

/// Parameter bindings in scope (a block's or model's parameters).
pub(crate) type Env = BTreeMap<String, Value>;

/// Evaluate `e` with the parameters in `env`.
pub(crate) fn eval(e: &Expr, env: &Env) -> Result<Value, Diagnostic> {
    let at = |msg: String| Diagnostic::new(e.span, msg);
    match &e.kind {
        ExprKind::Int(v) => Ok(Value::Int(*v)),
        ExprKind::Float(v) => Ok(Value::Float(*v)),
        ExprKind::Bool(b) => Ok(Value::Bool(*b)),
        ExprKind::Word(w) => Ok(Value::Word(w)),
        ExprKind::Param(p) => env.get(p).cloned().ok_or_else(|| undefined(p, e.span, env.keys().map(String::as_str))),
        ExprKind::Dims(parts) => {
            let mut dims = Vec::with_capacity(parts.len());
            for p in parts {
                match eval(p, env)? {
                    Value::Int(v) if v >= 1 => dims.push(v as usize),
                    v => {
                        return Err(Diagnostic::new(p.span, format!("size dimensions must be positive integers, got `{v}`")))
                    }
                }
            }
            Ok(Value::Dims(dims))
        }
        ExprKind::Tuple(items) => Ok(Value::Tuple(items.iter().map(|i| eval(i, env)).collect::<Result<_, _>>()?)),
        ExprKind::Unary(op, x) => match (op, eval(x, env)?) {
            (UnOp::Neg, Value::Int(v)) => v.checked_neg().map(Value::Int).ok_or_else(|| at("integer overflow".into())),
            (UnOp::Neg, Value::Float(v)) => Ok(Value::Float(-v)),
            (UnOp::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
            (UnOp::Neg, v) => Err(at(format!("cannot negate {} (`{v}`)", v.kind()))),
            (UnOp::Not, v) => Err(at(format!("`!` needs `true`/`false`, got {} (`{v}`)", v.kind()))),
        },
        ExprKind::Binary(op, a, b) => binary(*op, a, b, env, e),
    }
}

/// The "undefined parameter" error, with a suggestion among `known`.
pub(crate) fn undefined<'a>(p: &str, span: proc_macro2::Span, known: impl Iterator<Item = &'a str> + Clone) -> Diagnostic {
    let mut d = Diagnostic::new(span, format!("undefined parameter `{p}`")).label("not a parameter of this block or model");
    let parts: Vec<&str> = p.split('x').collect();
    let is_size = parts.len() >= 2
        && parts.iter().all(|s| !s.is_empty() && (s.bytes().all(|b| b.is_ascii_digit()) || known.clone().any(|k| k == *s)));
    if is_size {
        d = d.help(format!("to build a size from parameters, put spaces around `x`: `{}`", parts.join(" x ")));
    } else if let Some(s) = did_you_mean(p, known.clone()) {
        d = d.help(format!("did you mean `{s}`?"));
    } else {
        let known: Vec<&str> = known.collect();
        if !known.is_empty() {
            d = d.help(format!("parameters in scope: {}", known.join(", ")));
        }
    }
    d
}

fn binary(op: BinOp, a: &Expr, b: &Expr, env: &Env, e: &Expr) -> Result<Value, Diagnostic> {
    // `&&` and `||` short-circuit, so `c > 0 && 64 / c == 4` is safe.
    if matches!(op, BinOp::And | BinOp::Or) {
        let l = boolean(eval(a, env)?, a, op)?;
        if (op == BinOp::And && !l) || (op == BinOp::Or && l) {
            return Ok(Value::Bool(l));
        }
        return Ok(Value::Bool(boolean(eval(b, env)?, b, op)?));
    }
    let (l, r) = (eval(a, env)?, eval(b, env)?);
    let at = |msg: String| Diagnostic::new(e.span, msg);
    let sym = op.symbol();
    match (&l, &r) {
        (Value::Int(x), Value::Int(y)) => {
            let (x, y) = (*x, *y);
            let overflow = || at(format!("integer overflow in `{x} {sym} {y}`"));
            Ok(match op {
                BinOp::Add => Value::Int(x.checked_add(y).ok_or_else(overflow)?),
                BinOp::Sub => Value::Int(x.checked_sub(y).ok_or_else(overflow)?),
                BinOp::Mul => Value::Int(x.checked_mul(y).ok_or_else(overflow)?),
                BinOp::Div => {
                    if y == 0 {
                        return Err(at(format!("division by zero in `{x} / {y}`")));
                    }
                    if x % y != 0 {
                        return Err(at(format!("{x} / {y} is not exact (remainder {})", x % y))
                            .label("integer division must be exact")
                            .help(format!("choose values so that {y} divides {x}")));
                    }
                    Value::Int(x / y)
                }
                _ => Value::Bool(compare(op, x.cmp(&y))),
            })
        }
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => {
            let (x, y) = (float(&l), float(&r));
            Ok(match op {
                BinOp::Add => Value::Float(x + y),
                BinOp::Sub => Value::Float(x - y),
                BinOp::Mul => Value::Float(x * y),
                BinOp::Div => {
                    if y == 0.0 {
                        return Err(at(format!("division by zero in `{l} / {r}`")));
                    }
                    Value::Float(x / y)
                }
                _ => match x.partial_cmp(&y) {
                    Some(o) => Value::Bool(compare(op, o)),
                    None => return Err(at("comparison with NaN".into())),
                },
            })
        }
        _ if matches!(op, BinOp::Eq | BinOp::Ne) => Ok(Value::Bool((l == r) == (op == BinOp::Eq))),
        _ => Err(at(format!("cannot apply `{sym}` to {} (`{l}`) and {} (`{r}`)", l.kind(), r.kind()))),
    }
}

fn float(v: &Value) -> f64 {
    match *v {
        Value::Int(i) => i as f64,
        Value::Float(f) => f,
        _ => f64::NAN,
    }
}

fn compare(op: BinOp, o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        BinOp::Eq => o == Equal,
        BinOp::Ne => o != Equal,
        BinOp::Lt => o == Less,
        BinOp::Le => o != Greater,
        BinOp::Gt => o == Greater,
        BinOp::Ge => o != Less,
        _ => false,
    }
}

fn boolean(v: Value, e: &Expr, op: BinOp) -> Result<bool, Diagnostic> {
    match v {
        Value::Bool(b) => Ok(b),
        v => Err(Diagnostic::new(e.span, format!("`{}` needs `true`/`false`, got {} (`{v}`)", op.symbol(), v.kind()))),
    }
}
