//! The check phase: everything that can be verified before any parameter is known, with
//! every independent error collected. Checked here:
//!
//! - item names unique; block names not built-in layers or keywords; parameters unique and
//!   not reserved words; defaults refer only to earlier parameters;
//! - the model input is a constant `CxHxW` or feature count; model defaults evaluate;
//! - every call names a layer or block (with "did you mean"), binds its arguments
//!   (positional count, known and unrepeated keywords, required ones present);
//! - every parameter reference is defined; constant arguments have the right type and
//!   constant arithmetic is exact;
//! - `concat`/`add` have at least two branches; repetition counts are non-negative;
//! - explicit layer names are unique within their naming scope (arms of one `if` may reuse);
//! - blocks are not recursive.

use super::ast::*;
use super::diag::{did_you_mean, Diagnostic};
use super::eval::{eval, undefined, Env, Value};
use super::layers::{self, bind, check_ty, type_error, ParamSpec};
use super::ModelDecl;
use crate::ir::Shape;
use std::collections::{HashMap, HashSet};

/// Words that cannot name a block.
const RESERVED_BLOCK: &[&str] =
    &["concat", "add", "residual", "scale", "side", "shortcut", "if", "else", "x", "model", "block", "input"];
/// Words that cannot name a parameter (they are values or syntax).
const RESERVED_PARAM: &[&str] = &["true", "false", "same", "valid", "x", "auto"];

pub(crate) fn check(items: &[Item]) -> (Vec<ModelDecl>, Vec<Diagnostic>) {
    let mut c = Checker { items, errs: Vec::new(), blocks: HashMap::new(), models: HashSet::new() };
    c.run()
}

struct Checker<'a> {
    items: &'a [Item],
    errs: Vec<Diagnostic>,
    blocks: HashMap<&'a str, &'a Block>,
    models: HashSet<&'a str>,
}

fn loc(span: proc_macro2::Span) -> String {
    let s = span.start();
    if s.line > 0 {
        format!(" at {}:{}", s.line, s.column + 1)
    } else {
        String::new()
    }
}

impl<'a> Checker<'a> {
    fn run(&mut self) -> (Vec<ModelDecl>, Vec<Diagnostic>) {
        let mut seen: HashMap<&str, &Name> = HashMap::new();
        for it in self.items {
            let n = it.name();
            if let Some(first) = seen.get(n.text.as_str()) {
                self.errs.push(
                    Diagnostic::new(n.span, format!("`{}` is defined twice", n.text))
                        .note(format!("first defined{}", loc(first.span))),
                );
                continue;
            }
            seen.insert(&n.text, n);
            match it {
                Item::Block(b) => {
                    if layers::lookup(&n.text).is_some() {
                        self.errs.push(
                            Diagnostic::new(n.span, format!("block name `{}` is a built-in layer", n.text)).help("choose another name"),
                        );
                    } else if RESERVED_BLOCK.contains(&n.text.as_str()) {
                        self.errs.push(Diagnostic::new(n.span, format!("`{}` is a keyword and cannot name a block", n.text)));
                    }
                    self.blocks.insert(&n.text, b);
                }
                Item::Model(_) => {
                    self.models.insert(&n.text);
                }
            }
        }
        let mut decls = Vec::new();
        for (i, it) in self.items.iter().enumerate() {
            match it {
                Item::Block(b) => {
                    let names = self.params(&b.params);
                    self.body(&b.body, &names);
                    self.names(&b.body);
                }
                Item::Model(m) => {
                    let names = self.params(&m.params);
                    self.body(&m.body, &names);
                    self.names(&m.body);
                    if let Some(d) = self.model_decl(m, i) {
                        decls.push(d);
                    }
                }
            }
        }
        self.recursion();
        (decls, std::mem::take(&mut self.errs))
    }

    fn params(&mut self, params: &'a [Param]) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for p in params {
            if let Some(d) = &p.default {
                self.expr(d, &names);
            }
            if names.contains(&p.name.text) {
                self.errs.push(Diagnostic::new(p.name.span, format!("parameter `{}` declared twice", p.name.text)));
            } else if RESERVED_PARAM.contains(&p.name.text.as_str()) {
                self.errs.push(Diagnostic::new(p.name.span, format!("`{}` is a reserved word and cannot name a parameter", p.name.text)));
            }
            names.push(p.name.text.clone());
        }
        names
    }

    fn model_decl(&mut self, m: &Model, item: usize) -> Option<ModelDecl> {
        let input = match m.input.is_const().then(|| eval(&m.input, &Env::new())) {
            Some(Ok(Value::Dims(d))) if d.len() == 3 => Some(Shape::chw(d[0], d[1], d[2])),
            Some(Ok(Value::Int(n))) if n >= 1 => Some(Shape::flat(n as usize)),
            Some(Err(e)) => {
                self.errs.push(e);
                None
            }
            other => {
                let got = match other {
                    Some(Ok(v)) => format!(", got `{v}`"),
                    _ => String::new(),
                };
                self.errs.push(
                    Diagnostic::new(m.input.span, format!("the model input must be a constant `CxHxW` shape or a feature count{got}"))
                        .help("write e.g. `input: 3x224x224` or `input: 784`"),
                );
                None
            }
        };
        let mut env = Env::new();
        let mut params = Vec::new();
        for p in &m.params {
            let Some(d) = &p.default else { continue };
            match eval(d, &env) {
                Ok(v) => {
                    env.insert(p.name.text.clone(), v.clone());
                    params.push((p.name.text.clone(), v));
                }
                Err(e) => {
                    // undefined names were reported by `params` already
                    if d.is_const() {
                        self.errs.push(e);
                    }
                    return None;
                }
            }
        }
        Some(ModelDecl { name: m.name.text.clone(), docs: m.docs.clone(), span: m.name.span, input: input?, params, item })
    }

    /// Check parameter references; evaluate constant expressions (exactness, overflow).
    fn expr(&mut self, e: &Expr, scope: &[String]) -> Option<Value> {
        let mut ok = true;
        e.params(&mut |p, span| {
            if !scope.iter().any(|s| s == p) {
                ok = false;
                self.errs.push(undefined(p, span, scope.iter().map(String::as_str)));
            }
        });
        if !ok || !e.is_const() {
            return None;
        }
        match eval(e, &Env::new()) {
            Ok(v) => Some(v),
            Err(d) => {
                self.errs.push(d);
                None
            }
        }
    }

    fn body(&mut self, body: &'a [Stmt], scope: &[String]) {
        for s in body {
            match &s.kind {
                StmtKind::Call(c) => self.call(c, scope),
                StmtKind::Repeat { count, item } => {
                    if let Some(v) = self.expr(count, scope) {
                        if !matches!(v, Value::Int(n) if n >= 0) {
                            self.errs.push(Diagnostic::new(count.span, format!("a repetition count must be a non-negative integer, got `{v}`")));
                        }
                    }
                    match item {
                        RepeatItem::Call(c) => self.call(c, scope),
                        RepeatItem::Body(b) => self.body(b, scope),
                    }
                }
                StmtKind::Concat(br) | StmtKind::Add(br) => {
                    let kw = if matches!(s.kind, StmtKind::Concat(_)) { "concat" } else { "add" };
                    if br.len() < 2 {
                        self.errs.push(
                            Diagnostic::new(s.span, format!("`{kw}` needs at least two branches, got {}", br.len()))
                                .help("write each branch in its own braces: `{ ... } { ... }`; `{}` is the identity"),
                        );
                    }
                    let mut labels: Vec<&Name> = Vec::new();
                    for b in br {
                        if let Some(l) = &b.label {
                            if labels.iter().any(|x| x.text == l.text) {
                                self.errs.push(Diagnostic::new(l.span, format!("two branches named `{}`", l.text)));
                            }
                            labels.push(l);
                        }
                        self.body(&b.body, scope);
                    }
                }
                StmtKind::Residual { main, shortcut } => {
                    self.body(main, scope);
                    if let Some(sc) = shortcut {
                        self.body(&sc.body, scope);
                    }
                }
                StmtKind::Scale(b) | StmtKind::Side(b) => {
                    if b.is_empty() {
                        let kw = if matches!(s.kind, StmtKind::Scale(_)) { "scale" } else { "side" };
                        self.errs.push(Diagnostic::new(s.span, format!("empty `{kw}` branch")));
                    }
                    self.body(b, scope)
                }
                StmtKind::If { cond, then, els } => {
                    if let Some(v) = self.expr(cond, scope) {
                        if !matches!(v, Value::Bool(_)) {
                            self.errs.push(Diagnostic::new(cond.span, format!("an `if` condition must be `true`/`false`, got `{v}`")));
                        }
                    }
                    self.body(then, scope);
                    if let Some(e) = els {
                        self.body(e, scope);
                    }
                }
            }
        }
    }

    fn call(&mut self, c: &'a Call, scope: &[String]) {
        let callee = c.name.text.as_str();
        if let Some(sig) = layers::lookup(callee) {
            let values: Vec<Option<Value>> = c.args.iter().map(|a| self.expr(&a.value, scope)).collect();
            let Ok(bound) = bind("layer", &sig.spec(), c).map_err(|e| self.errs.extend(e)) else { return };
            let consts: layers::Args = bound
                .iter()
                .map(|a| {
                    let a = (*a)?;
                    let i = c.args.iter().position(|x| std::ptr::eq(x, a))?;
                    values[i].clone().map(|v| (v, a.span))
                })
                .collect();
            for ((pname, ty), arg) in sig.params().zip(&consts) {
                if let Some((v, span)) = arg {
                    if check_ty(ty, v).is_err() {
                        self.errs.push(type_error(sig, pname, ty, v, *span, &consts));
                    }
                }
            }
        } else if let Some(b) = self.blocks.get(callee).copied() {
            for a in &c.args {
                self.expr(&a.value, scope);
            }
            if let Err(e) = bind("block", &block_spec(b), c) {
                self.errs.extend(e);
            }
        } else if self.models.contains(callee) {
            self.errs.push(
                Diagnostic::new(c.name.span, format!("`{callee}` is a model, not a block"))
                    .help("only blocks can be used inside a model; declare the shared part as a `block`"),
            );
        } else {
            let candidates: Vec<&str> = layers::LAYERS.iter().map(|s| s.name).chain(self.blocks.keys().copied()).collect();
            let mut d = Diagnostic::new(c.name.span, format!("unknown layer or block `{callee}`")).label("not a built-in layer or a block of this program");
            d = match did_you_mean(callee, candidates.iter().copied()) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => {
                    let mut b: Vec<&str> = self.blocks.keys().copied().collect();
                    b.sort_unstable();
                    let layers: Vec<&str> = layers::LAYERS.iter().map(|s| s.name).collect();
                    let mut h = format!("layers: {}", layers.join(", "));
                    if !b.is_empty() {
                        h.push_str(&format!("; blocks: {}", b.join(", ")));
                    }
                    d.help(h)
                }
            };
            self.errs.push(d);
        }
    }

    /// Explicit names must be unique within each naming scope.
    fn names(&mut self, body: &'a [Stmt]) {
        let mut labels = Vec::new();
        let mut subs = Vec::new();
        let mut ifs = 0;
        names_in_scope(body, &mut Vec::new(), &mut ifs, &mut labels, &mut subs);
        for (j, (l, pj)) in labels.iter().enumerate() {
            if let Some((first, _)) = labels[..j].iter().find(|(f, pi)| f.text == l.text && !exclusive(pi, pj)) {
                self.errs.push(
                    Diagnostic::new(l.span, format!("duplicate layer name `{}`", l.text))
                        .label("already used in this scope")
                        .note(format!("first used{}", loc(first.span))),
                );
            }
        }
        for s in subs {
            self.names(s);
        }
    }

    /// Report each cycle of block instantiations once, at the call closing it.
    fn recursion(&mut self) {
        let mut reported: HashSet<Vec<&str>> = HashSet::new();
        let mut names: Vec<&str> = self.blocks.keys().copied().collect();
        names.sort_unstable();
        for start in names {
            let mut stack = vec![start];
            self.dfs(start, &mut stack, &mut reported);
        }
    }

    fn dfs(&mut self, b: &'a str, stack: &mut Vec<&'a str>, reported: &mut HashSet<Vec<&'a str>>) {
        let Some(block) = self.blocks.get(b).copied() else { return };
        let mut calls = Vec::new();
        calls_in(&block.body, &mut calls);
        for c in calls {
            let callee = c.name.text.as_str();
            if !self.blocks.contains_key(callee) {
                continue;
            }
            if let Some(pos) = stack.iter().position(|s| *s == callee) {
                let mut cycle: Vec<&str> = stack[pos..].to_vec();
                cycle.sort_unstable();
                if reported.insert(cycle) {
                    let mut path: Vec<&str> = stack[pos..].to_vec();
                    path.push(callee);
                    self.errs.push(
                        Diagnostic::new(c.name.span, format!("block `{callee}` is recursive: {}", path.join(" -> ")))
                            .help("a block cannot contain itself; use `N x block(...)` to repeat it"),
                    );
                }
                continue;
            }
            if stack.len() > 64 {
                continue;
            }
            stack.push(callee);
            self.dfs(callee, stack, reported);
            stack.pop();
        }
    }
}

/// The parameter list of a block: all positional, required unless defaulted.
pub(crate) fn block_spec(b: &Block) -> ParamSpec {
    ParamSpec {
        names: b.params.iter().map(|p| p.name.text.clone()).collect(),
        n_positional: b.params.len(),
        required: b.params.iter().map(|p| p.default.is_none()).collect(),
    }
}

/// Every call in a body, at any depth.
fn calls_in<'a>(body: &'a [Stmt], out: &mut Vec<&'a Call>) {
    for s in body {
        match &s.kind {
            StmtKind::Call(c) => out.push(c),
            StmtKind::Repeat { item: RepeatItem::Call(c), .. } => out.push(c),
            StmtKind::Repeat { item: RepeatItem::Body(b), .. } | StmtKind::Scale(b) | StmtKind::Side(b) => calls_in(b, out),
            StmtKind::Concat(br) | StmtKind::Add(br) => br.iter().for_each(|b| calls_in(&b.body, out)),
            StmtKind::Residual { main, shortcut } => {
                calls_in(main, out);
                if let Some(s) = shortcut {
                    calls_in(&s.body, out);
                }
            }
            StmtKind::If { then, els, .. } => {
                calls_in(then, out);
                if let Some(e) = els {
                    calls_in(e, out);
                }
            }
        }
    }
}

/// Path of `(if id, arm)` pairs from the scope's root to a statement.
type ArmPath = Vec<(usize, bool)>;

/// Two statements on different arms of one `if` never both run.
fn exclusive(a: &ArmPath, b: &ArmPath) -> bool {
    a.iter().any(|(id, arm)| b.iter().any(|(id2, arm2)| id == id2 && arm != arm2))
}

/// The explicit names of one naming scope (with their `if` arm paths), and the bodies that
/// start nested naming scopes. Unnamed `residual` main paths, `scale`/`side` branches,
/// `N x { }` bodies and `if` arms share the enclosing scope; branches, shortcuts, named groups
/// and named repetitions start their own.
pub(crate) fn names_in_scope<'a>(
    body: &'a [Stmt],
    path: &mut ArmPath,
    ifs: &mut usize,
    labels: &mut Vec<(&'a Name, ArmPath)>,
    subs: &mut Vec<&'a [Stmt]>,
) {
    for s in body {
        let named = s.label.is_some();
        if let Some(l) = &s.label {
            labels.push((l, path.clone()));
        }
        let scope = |b: &'a [Stmt], path: &mut ArmPath, ifs: &mut usize, labels: &mut Vec<_>, subs: &mut Vec<_>| {
            if named {
                subs.push(b);
            } else {
                names_in_scope(b, path, ifs, labels, subs);
            }
        };
        match &s.kind {
            StmtKind::Call(_) | StmtKind::Repeat { item: RepeatItem::Call(_), .. } => {}
            StmtKind::Repeat { item: RepeatItem::Body(b), .. } | StmtKind::Scale(b) | StmtKind::Side(b) => {
                scope(b, path, ifs, labels, subs)
            }
            StmtKind::Concat(br) | StmtKind::Add(br) => subs.extend(br.iter().map(|b| b.body.as_slice())),
            StmtKind::Residual { main, shortcut } => {
                scope(main, path, ifs, labels, subs);
                if let Some(sc) = shortcut {
                    subs.push(&sc.body);
                }
            }
            StmtKind::If { then, els, .. } => {
                let id = *ifs;
                *ifs += 1;
                path.push((id, true));
                names_in_scope(then, path, ifs, labels, subs);
                path.pop();
                if let Some(e) = els {
                    path.push((id, false));
                    names_in_scope(e, path, ifs, labels, subs);
                    path.pop();
                }
            }
        }
    }
}
