//! The syntax tree of the model language, as parsed (before checking and expansion).
//!
//! Every node keeps the span of its tokens so later phases can point errors at them.

use proc_macro2::Span;

/// An identifier with its span.
#[derive(Clone, Debug)]
pub(crate) struct Name {
    pub text: String,
    pub span: Span,
}

/// A top-level item.
#[derive(Clone, Debug)]
pub(crate) enum Item {
    Model(Model),
    Block(Block),
}

impl Item {
    pub fn name(&self) -> &Name {
        match self {
            Item::Model(m) => &m.name,
            Item::Block(b) => &b.name,
        }
    }
}

/// `model NAME(input: CxHxW, p = default, ...) { body }`.
#[derive(Clone, Debug)]
pub(crate) struct Model {
    pub name: Name,
    pub docs: Vec<String>,
    /// The input shape expression (a constant `CxHxW` or feature count).
    pub input: Expr,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
}

/// `block NAME(p, q = default, ...) { body }`.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub name: Name,
    pub docs: Vec<String>,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
}

/// A parameter of a block or model, with its default.
#[derive(Clone, Debug)]
pub(crate) struct Param {
    pub name: Name,
    pub default: Option<Expr>,
}

/// One statement, optionally labelled `name:`.
#[derive(Clone, Debug)]
pub(crate) struct Stmt {
    pub label: Option<Name>,
    pub kind: StmtKind,
    /// The statement's head: the call `conv(16, 5x5)`, or the keyword `residual`, `concat`, ...
    pub span: Span,
}

#[derive(Clone, Debug)]
pub(crate) enum StmtKind {
    /// A layer or block instance.
    Call(Call),
    /// `N x item`.
    Repeat { count: Expr, item: RepeatItem },
    /// `concat { {..} {..} }`.
    Concat(Vec<Branch>),
    /// `add { {..} {..} }`.
    Add(Vec<Branch>),
    /// `residual { main } [shortcut [(auto)] { proj }]`.
    Residual { main: Vec<Stmt>, shortcut: Option<Shortcut> },
    /// `scale { branch }`.
    Scale(Vec<Stmt>),
    /// `side { branch }`.
    Side(Vec<Stmt>),
    /// `if cond { .. } else { .. }`.
    If { cond: Expr, then: Vec<Stmt>, els: Option<Vec<Stmt>> },
}

/// What `N x` repeats.
#[derive(Clone, Debug)]
pub(crate) enum RepeatItem {
    Call(Call),
    Body(Vec<Stmt>),
}

/// `name(args)` or a bare `name`.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub name: Name,
    pub args: Vec<Arg>,
    /// From the name to the closing parenthesis.
    pub span: Span,
}

/// One argument, positional or `key = value`.
#[derive(Clone, Debug)]
pub(crate) struct Arg {
    pub key: Option<Name>,
    pub value: Expr,
    pub span: Span,
}

/// One branch of `concat`/`add`: `[name:] { body }`.
#[derive(Clone, Debug)]
pub(crate) struct Branch {
    pub label: Option<Name>,
    pub body: Vec<Stmt>,
}

/// The shortcut of a residual.
#[derive(Clone, Debug)]
pub(crate) struct Shortcut {
    pub auto: bool,
    pub body: Vec<Stmt>,
}

/// An expression with its span.
#[derive(Clone, Debug)]
pub(crate) struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub(crate) enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    /// `same` or `valid`.
    Word(&'static str),
    /// A parameter reference.
    Param(String),
    /// `3x3`, `3x224x224`, `k x k`.
    Dims(Vec<Expr>),
    /// `(a, b, ...)`.
    Tuple(Vec<Expr>),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}

impl Expr {
    /// Visit every parameter reference in the expression.
    pub fn params(&self, f: &mut dyn FnMut(&str, Span)) {
        match &self.kind {
            ExprKind::Param(p) => f(p, self.span),
            ExprKind::Dims(v) | ExprKind::Tuple(v) => v.iter().for_each(|e| e.params(f)),
            ExprKind::Unary(_, e) => e.params(f),
            ExprKind::Binary(_, a, b) => {
                a.params(f);
                b.params(f);
            }
            _ => {}
        }
    }

    /// True when the expression refers to no parameter (it can be evaluated while checking).
    pub fn is_const(&self) -> bool {
        let mut c = true;
        self.params(&mut |_, _| c = false);
        c
    }
}
