//! The expand phase: instantiate a checked model into an [`ir::Graph`](crate::ir::Graph).
//!
//! Parameters are evaluated, `if`s decided and repetitions unrolled; every layer becomes one
//! [`Graph::add`] (which infers and checks its shape). IR errors become a [`Diagnostic`] at the
//! statement that caused them, reworded in the language's terms.
//!
//! Naming (documented in `docs/language.md`): each *naming scope* has a prefix (`""`,
//! `inception3a.`, `inception3a.b2.`) and one counter per kind; an unnamed layer is
//! `<prefix><kind><n>` with `n` counting that kind in the scope from 1 and skipping names
//! given explicitly anywhere in the scope.

use super::ast::*;
use super::check::{block_spec, names_in_scope};
use super::diag::Diagnostic;
use super::eval::{eval, Env, Value};
use super::layers::{self, bind, Args};
use super::ModelDecl;
use crate::error::Error;
use crate::ir::{Graph, NodeId, Op};
use proc_macro2::Span;
use std::collections::{HashMap, HashSet};

type R<T> = Result<T, Diagnostic>;

pub(crate) fn expand_model(items: &[Item], m: &Model, decl: &ModelDecl, overrides: &[(&str, Value)]) -> R<Graph> {
    let mut env = Env::new();
    for (k, v) in &decl.params {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in overrides {
        if !env.contains_key(*k) {
            let known: Vec<&str> = decl.params.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Diagnostic::new(m.name.span, format!("model `{}` has no parameter `{k}`", decl.name)).help(if known.is_empty() {
                "it takes no parameters".to_string()
            } else {
                format!("its parameters: {}", known.join(", "))
            }));
        }
        env.insert(k.to_string(), v.clone());
    }
    let blocks = items
        .iter()
        .filter_map(|i| match i {
            Item::Block(b) => Some((b.name.text.as_str(), b)),
            Item::Model(_) => None,
        })
        .collect();
    let mut x = Expander { blocks, g: Graph::new(decl.name.clone()), sides: Vec::new() };
    let input = x.g.input("input", decl.input).map_err(|e| Diagnostic::new(m.input.span, e.to_string()))?;
    let mut ns = Names::new(String::new(), &m.body);
    let out = x.body(&m.body, &env, &mut ns, input)?;
    let mut outs = vec![out];
    outs.extend(x.sides.iter().copied());
    x.g.set_outputs(&outs);
    Ok(x.g)
}

/// A naming scope: the prefix of its names and the auto-name counters.
struct Names {
    prefix: String,
    counters: HashMap<String, usize>,
    explicit: HashSet<String>,
}

impl Names {
    fn new(prefix: String, body: &[Stmt]) -> Names {
        let mut labels = Vec::new();
        names_in_scope(body, &mut Vec::new(), &mut 0, &mut labels, &mut Vec::new());
        let explicit = labels.into_iter().map(|(l, _)| l.text.clone()).collect();
        Names { prefix, counters: HashMap::new(), explicit }
    }

    /// The next automatic local name for `kind` and its number.
    fn auto(&mut self, kind: &str) -> (String, usize) {
        loop {
            let n = self.counters.entry(kind.to_string()).or_insert(0);
            *n += 1;
            let n = *n;
            let name = format!("{kind}{n}");
            if !self.explicit.contains(&name) {
                return (name, n);
            }
        }
    }

    /// The full name of a statement: its label, or the next automatic name for `kind`.
    fn name(&mut self, label: Option<&Name>, kind: &str) -> String {
        match label {
            Some(l) => format!("{}{}", self.prefix, l.text),
            None => {
                let local = self.auto(kind).0;
                format!("{}{local}", self.prefix)
            }
        }
    }
}

struct Expander<'a> {
    blocks: HashMap<&'a str, &'a Block>,
    g: Graph,
    sides: Vec<NodeId>,
}

impl<'a> Expander<'a> {
    fn body(&mut self, body: &'a [Stmt], env: &Env, ns: &mut Names, mut cur: NodeId) -> R<NodeId> {
        for s in body {
            cur = self.stmt(s, env, ns, cur)?;
        }
        Ok(cur)
    }

    /// Run `f` inside graph scope `scope` (for cost subtotals), popping it even on error.
    fn scoped<T>(&mut self, scope: &str, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        self.g.push_scope(scope);
        let r = f(self);
        self.g.pop_scope();
        r
    }

    fn stmt(&mut self, s: &'a Stmt, env: &Env, ns: &mut Names, cur: NodeId) -> R<NodeId> {
        let label = s.label.as_ref();
        match &s.kind {
            StmtKind::Call(c) => self.call(c, label, env, ns, cur),
            StmtKind::Repeat { count, item } => {
                let n = match eval(count, env)? {
                    Value::Int(n) if n >= 0 => n as usize,
                    v => return Err(Diagnostic::new(count.span, format!("a repetition count must be a non-negative integer, got `{v}`"))),
                };
                match label {
                    Some(l) => {
                        let group = format!("{}{}", ns.prefix, l.text);
                        self.scoped(&group.clone(), |x| {
                            let mut cur = cur;
                            for i in 0..n {
                                let inst = format!("{group}.{i}");
                                cur = match item {
                                    RepeatItem::Call(c) => x.call_named(c, inst, env, cur)?,
                                    RepeatItem::Body(b) => x.scoped(&inst.clone(), |x| {
                                        let mut ns = Names::new(format!("{inst}."), b);
                                        x.body(b, env, &mut ns, cur)
                                    })?,
                                };
                            }
                            Ok(cur)
                        })
                    }
                    None => {
                        let mut cur = cur;
                        for _ in 0..n {
                            cur = match item {
                                RepeatItem::Call(c) => self.call(c, None, env, ns, cur)?,
                                RepeatItem::Body(b) => self.body(b, env, ns, cur)?,
                            };
                        }
                        Ok(cur)
                    }
                }
            }
            StmtKind::Concat(branches) | StmtKind::Add(branches) => {
                let concat = matches!(s.kind, StmtKind::Concat(_));
                let kw = if concat { "concat" } else { "add" };
                let (join, prefix) = self.group_names(label, kw, ns);
                let run = |x: &mut Self| {
                    let mut outs = Vec::new();
                    for (i, b) in branches.iter().enumerate() {
                        let bname = b.label.as_ref().map_or_else(|| format!("b{}", i + 1), |l| l.text.clone());
                        let mut bns = Names::new(format!("{prefix}{bname}."), &b.body);
                        outs.push(x.body(&b.body, env, &mut bns, cur)?);
                    }
                    let op = if concat { Op::Concat } else { Op::Add };
                    x.g.add(join.clone(), op, &outs).map_err(|e| x.join_error(e, s.span, kw, &outs))
                };
                self.maybe_scoped(label.is_some(), &join.clone(), run)
            }
            StmtKind::Residual { main, shortcut } => {
                let (join, prefix) = self.group_names(label, "residual", ns);
                let named = label.is_some();
                let run = |x: &mut Self, ns: &mut Names| {
                    let m = if named {
                        let mut inner = Names::new(prefix.clone(), main);
                        x.body(main, env, &mut inner, cur)?
                    } else {
                        x.body(main, env, ns, cur)?
                    };
                    let mut identity = true;
                    let sc = match shortcut {
                        None => cur,
                        Some(sc) if sc.auto && x.g.node(m).shape == x.g.node(cur).shape => cur,
                        Some(sc) => {
                            identity = sc.body.is_empty();
                            let mut sns = Names::new(format!("{prefix}shortcut."), &sc.body);
                            x.body(&sc.body, env, &mut sns, cur)?
                        }
                    };
                    x.g.add(join.clone(), Op::Add, &[m, sc]).map_err(|e| x.residual_error(e, s.span, m, sc, identity, shortcut.is_some()))
                };
                if named {
                    self.scoped(&join.clone(), |x| run(x, ns))
                } else {
                    run(self, ns)
                }
            }
            StmtKind::Scale(b) => {
                let (join, prefix) = self.group_names(label, "scale", ns);
                let named = label.is_some();
                self.maybe_scoped(named, &join.clone(), |x| {
                    let sv = if named {
                        let mut inner = Names::new(prefix, b);
                        x.body(b, env, &mut inner, cur)?
                    } else {
                        x.body(b, env, ns, cur)?
                    };
                    x.g.add(join.clone(), Op::ChannelMul, &[cur, sv]).map_err(|e| x.join_error(e, s.span, "scale", &[cur, sv]))
                })
            }
            StmtKind::Side(b) => {
                let group = label.map(|l| format!("{}{}", ns.prefix, l.text));
                let out = match &group {
                    Some(gname) => self.scoped(gname, |x| {
                        let mut inner = Names::new(format!("{gname}."), b);
                        x.body(b, env, &mut inner, cur)
                    })?,
                    None => self.body(b, env, ns, cur)?,
                };
                self.sides.push(out);
                Ok(cur)
            }
            StmtKind::If { cond, then, els } => match eval(cond, env)? {
                Value::Bool(true) => self.body(then, env, ns, cur),
                Value::Bool(false) => match els {
                    Some(e) => self.body(e, env, ns, cur),
                    None => Ok(cur),
                },
                v => Err(Diagnostic::new(cond.span, format!("an `if` condition must be `true`/`false`, got `{v}`"))),
            },
        }
    }

    fn maybe_scoped<T>(&mut self, named: bool, scope: &str, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        if named {
            self.scoped(scope, f)
        } else {
            f(self)
        }
    }

    /// The join node's full name and the prefix for the group's inner names. A named group
    /// `g:` uses `g` and `g.`; the first unnamed group of a kind in a scope is transparent
    /// (its inner names use the scope's prefix), later ones use `<kind><n>.`.
    fn group_names(&self, label: Option<&Name>, kind: &str, ns: &mut Names) -> (String, String) {
        match label {
            Some(l) => {
                let full = format!("{}{}", ns.prefix, l.text);
                (full.clone(), format!("{full}."))
            }
            None => {
                let (local, n) = ns.auto(kind);
                let full = format!("{}{local}", ns.prefix);
                let prefix = if n == 1 { ns.prefix.clone() } else { format!("{full}.") };
                (full, prefix)
            }
        }
    }

    /// A layer or block call statement, named by `label` or automatically.
    fn call(&mut self, c: &'a Call, label: Option<&Name>, env: &Env, ns: &mut Names, cur: NodeId) -> R<NodeId> {
        let kind = match layers::lookup(&c.name.text) {
            Some(sig) => sig.kind,
            None => c.name.text.as_str(),
        };
        let full = ns.name(label, kind);
        self.call_named(c, full, env, cur)
    }

    /// A call whose full name is already decided.
    fn call_named(&mut self, c: &'a Call, full: String, env: &Env, cur: NodeId) -> R<NodeId> {
        if let Some(sig) = layers::lookup(&c.name.text) {
            let bound = bind("layer", &sig.spec(), c).map_err(first)?;
            let args: Args = bound.iter().map(|a| a.map(|a| eval(&a.value, env).map(|v| (v, a.span))).transpose()).collect::<R<_>>()?;
            let op = layers::build(sig, &args, self.g.node(cur).shape)?;
            return self.g.add(full, op, &[cur]).map_err(|e| self.layer_error(e, c.span, &c.name.text, cur));
        }
        let Some(block) = self.blocks.get(c.name.text.as_str()).copied() else {
            return Err(Diagnostic::new(c.name.span, format!("unknown layer or block `{}`", c.name.text)));
        };
        let bound = bind("block", &block_spec(block), c).map_err(first)?;
        let mut benv = Env::new();
        for (p, a) in block.params.iter().zip(bound) {
            let v = match (a, &p.default) {
                (Some(a), _) => eval(&a.value, env)?,
                (None, Some(d)) => eval(d, &benv)?,
                (None, None) => return Err(Diagnostic::new(c.span, format!("block `{}` is missing its argument `{}`", block.name.text, p.name.text))),
            };
            benv.insert(p.name.text.clone(), v);
        }
        let note = {
            let s = c.span.start();
            let at = if s.line > 0 { format!(" (called at {}:{})", s.line, s.column + 1) } else { String::new() };
            format!("in `{full}`, an instance of block `{}`{at}", block.name.text)
        };
        self.scoped(&full.clone(), |x| {
            let mut ns = Names::new(format!("{full}."), &block.body);
            x.body(&block.body, &benv, &mut ns, cur)
        })
        .map_err(|d| d.note(note))
    }

    fn prev(&self, cur: NodeId) -> String {
        let n = self.g.node(cur);
        if n.op == Op::Input {
            "the model input".to_string()
        } else {
            format!("`{}`", n.name)
        }
    }

    /// A single-input layer failed: say what its input was and where it came from.
    fn layer_error(&self, e: Error, span: Span, layer: &str, cur: NodeId) -> Diagnostic {
        let shape = self.g.node(cur).shape;
        let prev = self.prev(cur);
        match e {
            Error::Shape { message, hint, .. } => {
                let message = message.strip_prefix("conv2d ").map(|m| format!("{layer} {m}")).unwrap_or(message);
                let message = if message.contains(", got ") { format!("{message} at {prev}") } else { message };
                Diagnostic::new(span, message).label(format!("input is {shape} (output of {prev})")).maybe_help(hint)
            }
            other => self.generic_error(other, span),
        }
    }

    fn generic_error(&self, e: Error, span: Span) -> Diagnostic {
        match e {
            Error::DuplicateName(n) => Diagnostic::new(span, format!("duplicate layer name `{n}`"))
                .label("this layer's name is already taken")
                .help("layer names must be unique in a model; a named layer inside an unnamed `N x { ... }` repeats its name: name the repetition instead (`stage: N x { ... }`)"),
            other => Diagnostic::new(span, other.to_string()),
        }
    }

    fn join_error(&self, e: Error, span: Span, kw: &str, outs: &[NodeId]) -> Diagnostic {
        let Error::Shape { message, hint, inputs, .. } = e else { return self.generic_error(e, span) };
        let shapes: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
        let what = match kw {
            "scale" => {
                let message = message.replace("channel-wise multiply of", "scale: multiplying").replace("needs a scale of", "needs a branch ending in");
                return Diagnostic::new(span, message)
                    .label(format!("input {}, branch output {} (`{}`)", shapes[0], shapes.get(1).map_or("?", |s| s.as_str()), self.g.node(outs[1]).name))
                    .maybe_help(hint);
            }
            "add" => {
                let first = inputs[0];
                let (i, other) = inputs.iter().enumerate().find(|(_, s)| **s != first).map(|(i, s)| (i, *s)).unwrap_or((0, first));
                format!("add: branch 1 is {first} but branch {} is {other}; the branches must have one shape", i + 1)
            }
            _ => message,
        };
        Diagnostic::new(span, what).label(format!("branch outputs: {}", shapes.join(", "))).maybe_help(if kw == "add" { None } else { hint })
    }

    fn residual_error(&self, e: Error, span: Span, main: NodeId, sc: NodeId, identity: bool, has_shortcut: bool) -> Diagnostic {
        let Error::Shape { hint, .. } = e else { return self.generic_error(e, span) };
        let (ms, ss) = (self.g.node(main).shape, self.g.node(sc).shape);
        let which = if identity { "the identity shortcut" } else { "the shortcut" };
        let proj = hint.as_deref().and_then(|h| h.find("conv(").map(|i| h[i..].to_string()));
        let mut d = match &proj {
            Some(p) => Diagnostic::new(span, format!("residual add: main path is {ms} but {which} is {ss} — add a 1x1 projection ({p}) to the shortcut")),
            None => Diagnostic::new(span, format!("residual add: main path is {ms} but {which} is {ss}")),
        };
        d = d.label(format!("main path ends at `{}`", self.g.node(main).name));
        match (&proj, has_shortcut) {
            (Some(p), false) => d.help(format!("write `shortcut(auto) {{ {p}; bn; }}` after the main path to project only where the shapes differ")),
            (None, _) => d.help("the main path and the shortcut must produce the same shape"),
            _ => d,
        }
    }
}

fn first(mut v: Vec<Diagnostic>) -> Diagnostic {
    v.swap_remove(0)
}
