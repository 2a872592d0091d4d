//! The parser: a `proc_macro2` token stream -> [`ast`](super::ast) items, with `syn`.
//!
//! Errors are collected, not fatal: a bad statement is skipped up to its `;` and a bad item up
//! to the next `model`/`block`, so one run reports every syntax error it can.
//!
//! Two lexical quirks of Rust tokens shape the grammar: `3x3` and `3x224x224` are one integer
//! literal `3` with the suffix `x3` / `x224x224` (decoded here into dimensions), and `3 x conv`
//! is an integer followed by the identifier `x` (repetition), as is `3x conv` (suffix `x`).

use super::ast::*;
use super::diag::join;
use proc_macro2::{Span, TokenStream};
use std::cell::RefCell;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{token, Ident, LitFloat, LitInt, Token};

/// Parse a whole program. Returns the items that parsed and every syntax error.
pub(crate) fn parse_program(ts: TokenStream) -> (Vec<Item>, Vec<syn::Error>) {
    let p = P { errors: RefCell::new(Vec::new()) };
    let items = RefCell::new(Vec::new());
    let res = (|input: ParseStream| {
        while !input.is_empty() {
            match p.item(input) {
                Ok(it) => items.borrow_mut().push(it),
                Err(e) => {
                    p.errors.borrow_mut().push(e);
                    skip_to_item(input)?;
                }
            }
        }
        Ok(())
    })
    .parse2(ts);
    let mut errors = p.errors.into_inner();
    if let Err(e) = res {
        errors.push(e);
    }
    (items.into_inner(), errors)
}

struct P {
    errors: RefCell<Vec<syn::Error>>,
}

fn err<T>(span: Span, msg: impl std::fmt::Display) -> syn::Result<T> {
    Err(syn::Error::new(span, msg))
}

/// Skip at least one token, then up to the next top-level `model`/`block` keyword.
fn skip_to_item(input: ParseStream) -> syn::Result<()> {
    input.step(|c| {
        let mut c = *c;
        let mut first = true;
        while let Some((tt, next)) = c.token_tree() {
            if !first {
                if let proc_macro2::TokenTree::Ident(i) = &tt {
                    if i == "model" || i == "block" {
                        break;
                    }
                }
                if let proc_macro2::TokenTree::Punct(p) = &tt {
                    if p.as_char() == '#' {
                        break;
                    }
                }
            }
            first = false;
            c = next;
        }
        Ok(((), c))
    })
}

/// Skip past the next `;` at this nesting level (or to the end of the body).
fn skip_statement(input: ParseStream) -> syn::Result<()> {
    input.step(|c| {
        let mut c = *c;
        while let Some((tt, next)) = c.token_tree() {
            c = next;
            if let proc_macro2::TokenTree::Punct(p) = &tt {
                if p.as_char() == ';' {
                    break;
                }
            }
        }
        Ok(((), c))
    })
}

fn name(input: ParseStream) -> syn::Result<Name> {
    let id = Ident::parse_any(input)?;
    Ok(Name { text: id.to_string(), span: id.span() })
}

fn peek_word(input: ParseStream, word: &str) -> bool {
    input.cursor().ident().is_some_and(|(i, _)| i == word)
}

impl P {
    fn item(&self, input: ParseStream) -> syn::Result<Item> {
        let attrs = syn::Attribute::parse_outer(input)?;
        let mut docs = Vec::new();
        for a in &attrs {
            match &a.meta {
                syn::Meta::NameValue(nv) if nv.path.is_ident("doc") => {
                    if let syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) = &nv.value {
                        let v = s.value();
                        docs.push(v.strip_prefix(' ').unwrap_or(&v).to_string());
                    }
                }
                _ => return err(a.pound_token.span, "only doc comments (`///`) may precede an item"),
            }
        }
        let kw = Ident::parse_any(input)
            .map_err(|e| syn::Error::new(e.span(), "expected `model` or `block`"))?;
        let is_model = match kw.to_string().as_str() {
            "model" => true,
            "block" => false,
            other => {
                return err(kw.span(), format!("expected `model` or `block`, found `{other}`"));
            }
        };
        let name = name(input)?;
        let content;
        syn::parenthesized!(content in input);
        let mut params = Vec::new();
        let mut input_shape = None;
        while !content.is_empty() {
            let pname = self::name(&content)?;
            if content.peek(Token![:]) {
                let colon: Token![:] = content.parse()?;
                if !is_model || pname.text != "input" {
                    return err(colon.span, format!("`{}: ...` is only allowed for a model's `input`; write `{} = default`", pname.text, pname.text));
                }
                input_shape = Some(self.expr(&content)?);
            } else {
                let default = if content.peek(Token![=]) {
                    content.parse::<Token![=]>()?;
                    Some(self.expr(&content)?)
                } else {
                    None
                };
                if is_model && default.is_none() {
                    return err(pname.span, format!("model parameter `{}` needs a default value (`{} = ...`)", pname.text, pname.text));
                }
                params.push(Param { name: pname, default });
            }
            if !content.is_empty() {
                content.parse::<Token![,]>()?;
            }
        }
        let body = self.braced_body(input)?;
        if is_model {
            let Some(input) = input_shape else {
                return err(name.span, format!("model `{}` needs an input shape: `model {}(input: 3x224x224)`", name.text, name.text));
            };
            Ok(Item::Model(Model { name, docs, input, params, body }))
        } else {
            Ok(Item::Block(Block { name, docs, params, body }))
        }
    }

    fn braced_body(&self, input: ParseStream) -> syn::Result<Vec<Stmt>> {
        let content;
        syn::braced!(content in input);
        self.body(&content)
    }

    fn body(&self, input: ParseStream) -> syn::Result<Vec<Stmt>> {
        let mut out = Vec::new();
        while !input.is_empty() {
            if input.peek(Token![;]) {
                input.parse::<Token![;]>()?;
                continue;
            }
            match self.stmt(input) {
                Ok(s) => out.push(s),
                Err(e) => {
                    self.errors.borrow_mut().push(e);
                    skip_statement(input)?;
                }
            }
        }
        Ok(out)
    }

    /// Require the `;` ending a statement (optional after the last statement of a body); a
    /// missing one is reported but not fatal.
    fn semi(&self, input: ParseStream, after: Span, what: &str) {
        if input.peek(Token![;]) {
            let _ = input.parse::<Token![;]>();
        } else if !input.is_empty() {
            self.errors.borrow_mut().push(syn::Error::new(after, format!("expected `;` after `{what}`")));
        }
    }

    fn stmt(&self, input: ParseStream) -> syn::Result<Stmt> {
        let label = if input.peek(Ident::peek_any) && input.peek2(Token![:]) && !input.peek2(Token![::]) {
            let n = name(input)?;
            input.parse::<Token![:]>()?;
            Some(n)
        } else {
            None
        };
        if input.peek(Token![if]) {
            let kw: Token![if] = input.parse()?;
            if let Some(l) = &label {
                return err(l.span, "an `if` cannot be named; name the layers inside it");
            }
            return self.if_stmt(input, kw.span);
        }
        if self.is_repeat(input) {
            let (count, x_done) = self.repeat_count(input)?;
            if !x_done {
                let x = Ident::parse_any(input)?;
                debug_assert_eq!(x, "x");
            }
            let (item, end) = if input.peek(token::Brace) {
                let g: proc_macro2::Group = input.fork().parse()?;
                let body = self.braced_body(input)?;
                input.parse::<Option<Token![;]>>()?;
                (RepeatItem::Body(body), g.span())
            } else {
                let call = self.call(input)?;
                let end = call.span;
                self.semi(input, call.span, &call.name.text);
                (RepeatItem::Call(call), end)
            };
            let span = join(count.span, end);
            return Ok(Stmt { label, kind: StmtKind::Repeat { count, item }, span });
        }
        if !input.peek(Ident::peek_any) {
            return Err(input.error("expected a layer, a block, `N x ...`, `concat`, `add`, `residual`, `scale`, `side` or `if`"));
        }
        if input.peek2(token::Brace) {
            let kw = name(input)?;
            let span = kw.span;
            let kind = match kw.text.as_str() {
                "concat" | "add" => {
                    let branches = self.branches(input)?;
                    if kw.text == "concat" {
                        StmtKind::Concat(branches)
                    } else {
                        StmtKind::Add(branches)
                    }
                }
                "residual" => {
                    let main = self.braced_body(input)?;
                    let shortcut = if peek_word(input, "shortcut") {
                        let sc = name(input)?;
                        let auto = if input.peek(token::Paren) {
                            let c;
                            syn::parenthesized!(c in input);
                            let a = name(&c)?;
                            if a.text != "auto" || !c.is_empty() {
                                return err(a.span, "expected `shortcut(auto)` or `shortcut`");
                            }
                            true
                        } else {
                            false
                        };
                        if !input.peek(token::Brace) {
                            return err(sc.span, "expected `{ ... }` after `shortcut`");
                        }
                        Some(Shortcut { auto, body: self.braced_body(input)? })
                    } else {
                        None
                    };
                    StmtKind::Residual { main, shortcut }
                }
                "scale" => StmtKind::Scale(self.braced_body(input)?),
                "side" => StmtKind::Side(self.braced_body(input)?),
                other => {
                    return err(
                        kw.span,
                        format!("`{other} {{ ... }}` is not a statement: expected `concat`, `add`, `residual`, `scale` or `side` before a `{{`"),
                    )
                }
            };
            input.parse::<Option<Token![;]>>()?;
            return Ok(Stmt { label, kind, span });
        }
        let call = self.call(input)?;
        self.semi(input, call.span, &call.name.text);
        Ok(Stmt { label, span: call.span, kind: StmtKind::Call(call) })
    }

    fn if_stmt(&self, input: ParseStream, kw: Span) -> syn::Result<Stmt> {
        let cond = self.expr(input)?;
        let then = self.braced_body(input)?;
        let els = if input.peek(Token![else]) {
            let e: Token![else] = input.parse()?;
            if input.peek(Token![if]) {
                let k: Token![if] = input.parse()?;
                Some(vec![self.if_stmt(input, k.span)?])
            } else if input.peek(token::Brace) {
                Some(self.braced_body(input)?)
            } else {
                return err(e.span, "expected `{ ... }` or `if` after `else`");
            }
        } else {
            None
        };
        input.parse::<Option<Token![;]>>()?;
        Ok(Stmt { label: None, kind: StmtKind::If { cond, then, els }, span: join(kw, kw) })
    }

    fn branches(&self, input: ParseStream) -> syn::Result<Vec<Branch>> {
        let content;
        syn::braced!(content in input);
        let mut out = Vec::new();
        while !content.is_empty() {
            if content.peek(Token![;]) || content.peek(Token![,]) {
                let _: proc_macro2::TokenTree = content.parse()?;
                continue;
            }
            let label = if content.peek(Ident::peek_any) && content.peek2(Token![:]) {
                let n = name(&content)?;
                content.parse::<Token![:]>()?;
                Some(n)
            } else {
                None
            };
            if !content.peek(token::Brace) {
                return Err(content.error("expected a branch `{ ... }`: write each branch of `concat`/`add` in its own braces"));
            }
            out.push(Branch { label, body: self.braced_body(&content)? });
        }
        Ok(out)
    }

    fn is_repeat(&self, input: ParseStream) -> bool {
        let f = input.fork();
        if f.peek(LitInt) {
            let Ok(l) = f.parse::<LitInt>() else { return false };
            return l.suffix() == "x" || (l.suffix().is_empty() && peek_word(&f, "x"));
        }
        if f.peek(Ident::peek_any) {
            let _ = Ident::parse_any(&f);
            return peek_word(&f, "x");
        }
        if f.peek(token::Paren) {
            let _ = f.parse::<proc_macro2::Group>();
            return peek_word(&f, "x");
        }
        false
    }

    /// The `N` of `N x item`; returns whether the `x` was already consumed (as a suffix `3x`).
    fn repeat_count(&self, input: ParseStream) -> syn::Result<(Expr, bool)> {
        if input.peek(LitInt) {
            let l: LitInt = input.parse()?;
            let n: i64 = l.base10_parse().map_err(|e| syn::Error::new(l.span(), format!("bad repetition count: {e}")))?;
            return Ok((Expr { kind: ExprKind::Int(n), span: l.span() }, l.suffix() == "x"));
        }
        Ok((self.primary(input)?, false))
    }

    fn call(&self, input: ParseStream) -> syn::Result<Call> {
        if !input.peek(Ident::peek_any) {
            return Err(input.error("expected a layer or block name"));
        }
        let n = name(input)?;
        let mut span = n.span;
        let mut args = Vec::new();
        if input.peek(token::Paren) {
            let g: proc_macro2::Group = input.fork().parse()?;
            span = join(n.span, g.span());
            let content;
            syn::parenthesized!(content in input);
            while !content.is_empty() {
                let key = if content.peek(Ident::peek_any) && content.peek2(Token![=]) && !content.peek2(Token![==]) {
                    let k = name(&content)?;
                    content.parse::<Token![=]>()?;
                    Some(k)
                } else {
                    None
                };
                let value = self.expr(&content)?;
                let aspan = key.as_ref().map_or(value.span, |k| join(k.span, value.span));
                args.push(Arg { key, value, span: aspan });
                if !content.is_empty() {
                    content.parse::<Token![,]>()?;
                }
            }
        }
        Ok(Call { name: n, args, span })
    }

    // ---- expressions, by precedence: || && comparison dims(x) +- */ unary primary ----

    pub(crate) fn expr(&self, input: ParseStream) -> syn::Result<Expr> {
        let mut l = self.and(input)?;
        while input.peek(Token![||]) {
            input.parse::<Token![||]>()?;
            let r = self.and(input)?;
            l = bin(BinOp::Or, l, r);
        }
        Ok(l)
    }

    fn and(&self, input: ParseStream) -> syn::Result<Expr> {
        let mut l = self.cmp(input)?;
        while input.peek(Token![&&]) {
            input.parse::<Token![&&]>()?;
            let r = self.cmp(input)?;
            l = bin(BinOp::And, l, r);
        }
        Ok(l)
    }

    fn cmp(&self, input: ParseStream) -> syn::Result<Expr> {
        let l = self.dims(input)?;
        let op = if input.peek(Token![==]) {
            input.parse::<Token![==]>()?;
            BinOp::Eq
        } else if input.peek(Token![!=]) {
            input.parse::<Token![!=]>()?;
            BinOp::Ne
        } else if input.peek(Token![<=]) {
            input.parse::<Token![<=]>()?;
            BinOp::Le
        } else if input.peek(Token![>=]) {
            input.parse::<Token![>=]>()?;
            BinOp::Ge
        } else if input.peek(Token![<]) {
            input.parse::<Token![<]>()?;
            BinOp::Lt
        } else if input.peek(Token![>]) {
            input.parse::<Token![>]>()?;
            BinOp::Gt
        } else {
            return Ok(l);
        };
        let r = self.dims(input)?;
        Ok(bin(op, l, r))
    }

    /// `a x b x c` with spaces (a literal `3x3` is decoded in [`P::primary`]).
    fn dims(&self, input: ParseStream) -> syn::Result<Expr> {
        let first = self.sum(input)?;
        if !peek_word(input, "x") {
            return Ok(first);
        }
        let mut span = first.span;
        let mut parts = vec![first];
        while peek_word(input, "x") {
            Ident::parse_any(input)?;
            let e = self.sum(input)?;
            span = join(span, e.span);
            parts.push(e);
        }
        Ok(Expr { kind: ExprKind::Dims(parts), span })
    }

    fn sum(&self, input: ParseStream) -> syn::Result<Expr> {
        let mut l = self.product(input)?;
        loop {
            let op = if input.peek(Token![+]) && !input.peek(Token![+=]) {
                input.parse::<Token![+]>()?;
                BinOp::Add
            } else if input.peek(Token![-]) && !input.peek(Token![->]) {
                input.parse::<Token![-]>()?;
                BinOp::Sub
            } else {
                return Ok(l);
            };
            let r = self.product(input)?;
            l = bin(op, l, r);
        }
    }

    fn product(&self, input: ParseStream) -> syn::Result<Expr> {
        let mut l = self.unary(input)?;
        loop {
            let op = if input.peek(Token![*]) {
                input.parse::<Token![*]>()?;
                BinOp::Mul
            } else if input.peek(Token![/]) {
                input.parse::<Token![/]>()?;
                BinOp::Div
            } else if input.peek(Token![%]) {
                let p: Token![%] = input.parse()?;
                return err(p.span, "`%` is not supported; use exact division `/`");
            } else {
                return Ok(l);
            };
            let r = self.unary(input)?;
            l = bin(op, l, r);
        }
    }

    fn unary(&self, input: ParseStream) -> syn::Result<Expr> {
        let (op, span) = if input.peek(Token![-]) {
            (UnOp::Neg, input.parse::<Token![-]>()?.span)
        } else if input.peek(Token![!]) {
            (UnOp::Not, input.parse::<Token![!]>()?.span)
        } else {
            return self.primary(input);
        };
        let e = self.unary(input)?;
        Ok(Expr { span: join(span, e.span), kind: ExprKind::Unary(op, Box::new(e)) })
    }

    fn primary(&self, input: ParseStream) -> syn::Result<Expr> {
        if input.peek(LitInt) {
            let l: LitInt = input.parse()?;
            return int_literal(&l);
        }
        if input.peek(LitFloat) {
            let l: LitFloat = input.parse()?;
            if !l.suffix().is_empty() {
                return err(l.span(), format!("bad number `{l}`: drop the suffix `{}`", l.suffix()));
            }
            let v: f64 = l.base10_parse()?;
            return Ok(Expr { kind: ExprKind::Float(v), span: l.span() });
        }
        if input.peek(token::Paren) {
            let g: proc_macro2::Group = input.fork().parse()?;
            let content;
            syn::parenthesized!(content in input);
            let mut items = Vec::new();
            let mut trailing = false;
            while !content.is_empty() {
                items.push(self.expr(&content)?);
                trailing = false;
                if !content.is_empty() {
                    content.parse::<Token![,]>()?;
                    trailing = true;
                }
            }
            return match items.len() {
                0 => err(g.span(), "empty parentheses: expected a value"),
                1 if !trailing => Ok(Expr { span: g.span(), ..items.pop().unwrap() }),
                _ => Ok(Expr { kind: ExprKind::Tuple(items), span: g.span() }),
            };
        }
        if input.peek(Ident::peek_any) {
            let n = name(input)?;
            let kind = match n.text.as_str() {
                "true" => ExprKind::Bool(true),
                "false" => ExprKind::Bool(false),
                "same" => ExprKind::Word("same"),
                "valid" => ExprKind::Word("valid"),
                _ => ExprKind::Param(n.text),
            };
            return Ok(Expr { kind, span: n.span });
        }
        if input.peek(syn::Lit) {
            let l: syn::Lit = input.parse()?;
            return err(l.span(), "expected a number, `true`/`false`, `same`/`valid` or a parameter; strings and characters are not values here");
        }
        Err(input.error("expected a value (a number, a size like `3x3`, a parameter or `( ... )`)"))
    }
}

fn bin(op: BinOp, l: Expr, r: Expr) -> Expr {
    Expr { span: join(l.span, r.span), kind: ExprKind::Binary(op, Box::new(l), Box::new(r)) }
}

/// Decode `64`, `3x3`, `1x7`, `3x224x224` (an integer literal whose suffix is `x<digits>...`).
fn int_literal(l: &LitInt) -> syn::Result<Expr> {
    let text = l.to_string();
    let span = l.span();
    if text.len() > 1 && text.starts_with('0') && matches!(text.as_bytes()[1], b'x' | b'b' | b'o') {
        return err(
            span,
            format!("bad size literal `{text}`: every dimension must be at least 1 (and `0{}` starts a base-prefixed number)", &text[1..2]),
        );
    }
    let first: i64 = l
        .base10_parse()
        .map_err(|e| syn::Error::new(span, format!("bad number `{text}`: {e}")))?;
    let suffix = l.suffix();
    if suffix.is_empty() {
        return Ok(Expr { kind: ExprKind::Int(first), span });
    }
    let bad = || {
        err(
            span,
            format!("bad size literal `{text}`: expected dimensions joined by `x`, like `3x3`, `1x7` or `3x224x224`"),
        )
    };
    let Some(rest) = suffix.strip_prefix('x') else { return bad() };
    let mut dims = vec![Expr { kind: ExprKind::Int(first), span }];
    for part in rest.split('x') {
        let digits = part.replace('_', "");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return bad();
        }
        let v: i64 = digits.parse().map_err(|_| syn::Error::new(span, format!("bad size literal `{text}`: dimension too large")))?;
        dims.push(Expr { kind: ExprKind::Int(v), span });
    }
    if dims.iter().any(|d| matches!(d.kind, ExprKind::Int(0))) || first == 0 {
        return err(span, format!("bad size literal `{text}`: every dimension must be at least 1"));
    }
    Ok(Expr { kind: ExprKind::Dims(dims), span })
}
