//! The invocation: which form it is, and the Rust-only parts (visibility, doc attributes)
//! peeled off before the model language sees the tokens.
//!
//! Two forms:
//!
//! - inline items: `[#[doc]]* [vis] model Name(...) { ... }` and `block Name(...) { ... }`, any
//!   number, in any order. The language has no visibility, so a `pub`, `pub(crate)`, ... in
//!   front of an item is removed here and remembered for the generated type.
//! - a file: `[vis] file = "path/to/model.cnn"`, the path relative to `CARGO_MANIFEST_DIR`.

use crate::ctxt::Ctxt;
use proc_macro2::{Delimiter, Ident, Span, TokenStream, TokenTree};
use syn::LitStr;

/// What the user wrote.
pub(crate) enum Invocation {
    /// Items written in the macro.
    Inline(Inline),
    /// `file = "..."`.
    File(FileRef),
}

/// Inline items.
pub(crate) struct Inline {
    /// The tokens exactly as written (for the source text).
    pub original: TokenStream,
    /// The tokens with the visibilities removed: what the model language parses.
    pub program: TokenStream,
    /// For each top-level token of `original`: whether it is a removed visibility.
    pub stripped: Vec<bool>,
    /// The `model` items found, in order.
    pub models: Vec<ModelDecl>,
}

/// The Rust-facing parts of one `model` item.
pub(crate) struct ModelDecl {
    /// `pub`, `pub(crate)`, ..., or empty (private).
    pub vis: TokenStream,
    /// The item's attributes (`#[doc = ...]` from `///`), passed to the generated struct.
    pub attrs: Vec<TokenStream>,
    /// The model's name, with the user's span.
    pub name: Ident,
}

/// `[vis] file = "path"`.
pub(crate) struct FileRef {
    /// Visibility of every generated type.
    pub vis: TokenStream,
    /// The path literal (errors in the file are reported at it).
    pub path: LitStr,
}

/// Classify and pre-parse the invocation. Errors go to `cx`; the result is `None` only when
/// nothing sensible can be generated.
pub(crate) fn parse(cx: &Ctxt, input: TokenStream) -> Option<Invocation> {
    let tokens: Vec<TokenTree> = input.clone().into_iter().collect();
    if tokens.is_empty() {
        cx.push(syn::Error::new(
            Span::call_site(),
            "expected a model: `cnn_model! { model Name(input: 3x32x32) { ... } }` or `cnn_model!(file = \"model.cnn\")`",
        ));
        return None;
    }
    let (vis, rest) = split_vis(&tokens, 0);
    if let Some(TokenTree::Ident(id)) = tokens.get(rest) {
        if id == "file" && is_punct(tokens.get(rest + 1), '=') {
            return file_form(cx, vis, &tokens[rest..]);
        }
    }
    Some(Invocation::Inline(inline_form(cx, input)))
}

fn is_punct(t: Option<&TokenTree>, c: char) -> bool {
    matches!(t, Some(TokenTree::Punct(p)) if p.as_char() == c)
}

/// A visibility starting at `i`: `pub` and an optional `( ... )`. Returns its tokens and the
/// index after it (`i` itself when there is none).
fn split_vis(tokens: &[TokenTree], i: usize) -> (TokenStream, usize) {
    match tokens.get(i) {
        Some(TokenTree::Ident(id)) if id == "pub" => {
            let mut vis: Vec<TokenTree> = vec![tokens[i].clone()];
            if let Some(TokenTree::Group(g)) = tokens.get(i + 1) {
                if g.delimiter() == Delimiter::Parenthesis {
                    vis.push(tokens[i + 1].clone());
                    return (vis.into_iter().collect(), i + 2);
                }
            }
            (vis.into_iter().collect(), i + 1)
        }
        _ => (TokenStream::new(), i),
    }
}

/// `file = "path" [,]` (starting at `file`).
fn file_form(cx: &Ctxt, vis: TokenStream, tokens: &[TokenTree]) -> Option<Invocation> {
    let lit = match tokens.get(2) {
        Some(TokenTree::Literal(l)) => syn::parse2::<LitStr>(TokenTree::Literal(l.clone()).into()).ok(),
        _ => None,
    };
    let Some(path) = lit else {
        let span = tokens.get(2).map_or(tokens[1].span(), |t| t.span());
        cx.push(syn::Error::new(span, "expected a string literal: `file = \"models/net.cnn\"`"));
        return None;
    };
    let mut extra = &tokens[3..];
    if is_punct(extra.first(), ',') {
        extra = &extra[1..];
    }
    if let Some(t) = extra.first() {
        cx.push(syn::Error::new(
            t.span(),
            "unexpected tokens after the file path: `file = \"...\"` takes the whole invocation",
        ));
    }
    Some(Invocation::File(FileRef { vis, path }))
}

/// Walk the top level of the items: remove visibilities, remember each model's name,
/// visibility and attributes.
fn inline_form(cx: &Ctxt, input: TokenStream) -> Inline {
    let tokens: Vec<TokenTree> = input.clone().into_iter().collect();
    let mut program: Vec<TokenTree> = Vec::with_capacity(tokens.len());
    let mut stripped = vec![false; tokens.len()];
    let mut models = Vec::new();
    let mut attrs: Vec<TokenStream> = Vec::new();
    let mut vis = TokenStream::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        match t {
            TokenTree::Punct(p) if p.as_char() == '#' => {
                if let Some(TokenTree::Group(g)) = tokens.get(i + 1) {
                    if g.delimiter() == Delimiter::Bracket {
                        attrs.push([t.clone(), tokens[i + 1].clone()].into_iter().collect());
                        program.extend([t.clone(), tokens[i + 1].clone()]);
                        i += 2;
                        continue;
                    }
                }
            }
            TokenTree::Ident(id) if id == "pub" => {
                let (v, next) = split_vis(&tokens, i);
                if !vis.is_empty() {
                    cx.push(syn::Error::new(id.span(), "duplicate visibility"));
                }
                vis = v;
                stripped[i..next].iter_mut().for_each(|s| *s = true);
                i = next;
                continue;
            }
            TokenTree::Ident(id) if id == "model" || id == "block" => {
                if let Some(TokenTree::Ident(name)) = tokens.get(i + 1) {
                    if id == "model" {
                        models.push(ModelDecl {
                            vis: std::mem::take(&mut vis),
                            attrs: std::mem::take(&mut attrs),
                            name: name.clone(),
                        });
                    } else if let Some(v) = std::mem::take(&mut vis).into_iter().next() {
                        cx.push(syn::Error::new(
                            v.span(),
                            format!(
                                "a block is not a Rust item and has no visibility: remove `pub` before `block {name}`"
                            ),
                        ));
                    }
                }
                attrs.clear();
            }
            TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => {
                // The end of an item's body: whatever preceded belongs to no later item.
                attrs.clear();
                if let Some(v) = std::mem::take(&mut vis).into_iter().next() {
                    cx.push(syn::Error::new(v.span(), "expected `model` after the visibility"));
                }
            }
            _ => {}
        }
        program.push(t.clone());
        i += 1;
    }
    if let Some(v) = vis.into_iter().next() {
        cx.push(syn::Error::new(v.span(), "expected `model` after the visibility"));
    }
    Inline { original: input, program: program.into_iter().collect(), stripped, models }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(src: &str) -> (Inline, syn::Result<()>) {
        let cx = Ctxt::new();
        let Some(Invocation::Inline(i)) = parse(&cx, src.parse().unwrap()) else { panic!("not inline") };
        (i, cx.check())
    }

    #[test]
    fn visibility_is_peeled_and_remembered() {
        let (i, r) = inline(
            "/// Doc.\n pub model A(input: 1x8x8) { relu; }\n block B(c) { conv(c, 3x3); }\n pub(crate) model C(input: 4) { dense(2); }\n model D(input: 4) { relu; }",
        );
        assert!(r.is_ok());
        let names: Vec<String> = i.models.iter().map(|m| m.name.to_string()).collect();
        assert_eq!(names, ["A", "C", "D"]);
        assert_eq!(i.models[0].vis.to_string(), "pub");
        assert_eq!(i.models[0].attrs.len(), 1);
        assert!(i.models[0].attrs[0].to_string().contains("Doc."));
        assert_eq!(i.models[1].vis.to_string(), "pub (crate)");
        assert!(i.models[2].vis.is_empty());
        assert!(i.models[2].attrs.is_empty());
        let p = i.program.to_string();
        assert!(!p.contains("pub"), "{p}");
        assert!(p.contains("model A") && p.contains("block B") && p.contains("model C"), "{p}");
    }

    #[test]
    fn misplaced_visibility_is_an_error() {
        let (_, r) = inline("pub block B(c) { conv(c, 3x3); } model A(input: 4) { relu; } pub");
        let e = r.unwrap_err();
        let msgs: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].contains("no visibility"), "{msgs:?}");
        assert!(msgs[1].contains("expected `model`"), "{msgs:?}");
    }

    #[test]
    fn file_form() {
        let cx = Ctxt::new();
        let Some(Invocation::File(f)) = parse(&cx, "pub(crate) file = \"m/x.cnn\",".parse().unwrap()) else { panic!() };
        cx.check().unwrap();
        assert_eq!(f.path.value(), "m/x.cnn");
        assert_eq!(f.vis.to_string(), "pub (crate)");

        let cx = Ctxt::new();
        assert!(parse(&cx, "file = 3".parse().unwrap()).is_none());
        assert!(cx.check().unwrap_err().to_string().contains("string literal"));

        let cx = Ctxt::new();
        assert!(parse(&cx, "file = \"a.cnn\" extra".parse().unwrap()).is_some());
        assert!(cx.check().unwrap_err().to_string().contains("unexpected tokens"));

        let cx = Ctxt::new();
        assert!(parse(&cx, TokenStream::new()).is_none());
        assert!(cx.check().is_err());
    }
}
