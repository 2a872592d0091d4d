//! The text of an inline invocation with its original layout (line breaks, indentation,
//! doc comments), rebuilt from the tokens' line/column positions.
//!
//! A proc macro only receives tokens, but on Rust 1.88+ each token knows its line and column
//! and the source text behind it. Laying the tokens out again at their positions gives back what
//! the user wrote (ordinary `//` comments excepted), minus the Rust visibilities: the result is
//! model-language source, what `source()` returns, what the generated `graph()` parses again at
//! run time, and what the `cnnc` CLI accepts as a `.cnn` file. If positions are unavailable or
//! the rebuilt text does not lex back to the same tokens (tokens pasted by `macro_rules!`, say),
//! the token stream's plain `to_string()` is used instead.

use proc_macro2::{Delimiter, LineColumn, Span, TokenStream, TokenTree};

/// One token (or delimiter) to print.
struct Leaf {
    start: LineColumn,
    end: LineColumn,
    text: String,
    stripped: bool,
}

/// The text of `program`: the tokens of `original` less its top-level tokens flagged in
/// `stripped` (the Rust visibilities), laid out as `original` was written.
pub(crate) fn text(original: &TokenStream, stripped: &[bool], program: &TokenStream) -> String {
    let fallback = || program.to_string();
    let mut leaves = Vec::new();
    for (i, t) in original.clone().into_iter().enumerate() {
        if !flatten(&t, stripped.get(i).copied().unwrap_or(false), &mut leaves) {
            return fallback();
        }
    }
    let Some(kept) = layout(leaves) else { return fallback() };
    let text = render(&kept);
    match text.parse::<TokenStream>() {
        Ok(ts) if same_tokens(&ts, program) => text,
        _ => fallback(),
    }
}

/// Append the leaves of `t`; false when a position is unknown.
fn flatten(t: &TokenTree, stripped: bool, out: &mut Vec<Leaf>) -> bool {
    let leaf = |span: Span, text: String, out: &mut Vec<Leaf>| {
        let start = span.start();
        if start.line == 0 {
            return false;
        }
        out.push(Leaf { start, end: span.end(), text, stripped });
        true
    };
    match t {
        TokenTree::Group(g) => {
            let (open, close) = match g.delimiter() {
                Delimiter::Parenthesis => ("(", ")"),
                Delimiter::Brace => ("{", "}"),
                Delimiter::Bracket => ("[", "]"),
                Delimiter::None => ("", ""),
            };
            if g.delimiter() == Delimiter::None {
                return false;
            }
            if !leaf(g.span_open(), open.to_string(), out) {
                return false;
            }
            for inner in g.stream() {
                if !flatten(&inner, stripped, out) {
                    return false;
                }
            }
            leaf(g.span_close(), close.to_string(), out)
        }
        _ => {
            let span = t.span();
            let text = span.source_text().unwrap_or_else(|| t.to_string());
            leaf(span, text, out)
        }
    }
}

/// Drop leaves that start inside text already covered (the tokens a doc comment expands to
/// all carry the comment's span), keeping the rest in order.
fn layout(leaves: Vec<Leaf>) -> Option<Vec<Leaf>> {
    let mut kept: Vec<Leaf> = Vec::with_capacity(leaves.len());
    for l in leaves {
        if let Some(prev) = kept.last() {
            if pos(l.start) < pos(prev.end) {
                continue;
            }
        }
        kept.push(l);
    }
    (!kept.is_empty()).then_some(kept)
}

fn pos(p: LineColumn) -> (usize, usize) {
    (p.line, p.column)
}

/// Lay the leaves out at their positions, indentation relative to the leftmost line start.
/// Stripped leaves print as nothing, and the next token on their line takes their place.
fn render(leaves: &[Leaf]) -> String {
    let mut base = usize::MAX;
    let mut line = 0;
    for l in leaves {
        if l.start.line != line {
            base = base.min(l.start.column);
            line = l.start.line;
        }
    }
    let mut out = String::new();
    let mut cur = LineColumn { line: leaves[0].start.line, column: base };
    let mut collapse = false;
    for l in leaves {
        if l.start.line > cur.line {
            for _ in cur.line..l.start.line {
                out.push('\n');
            }
            cur = LineColumn { line: l.start.line, column: base };
            collapse = false;
        }
        if !collapse {
            out.extend(std::iter::repeat_n(' ', l.start.column.saturating_sub(cur.column)));
        }
        collapse = l.stripped;
        if !l.stripped {
            out.push_str(&l.text);
        }
        cur = l.end;
    }
    let mut lines: Vec<&str> = out.lines().map(str::trim_end).collect();
    while lines.last() == Some(&"") {
        lines.pop();
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// Structural equality of token streams (idents, punctuation, literals, delimiters).
fn same_tokens(a: &TokenStream, b: &TokenStream) -> bool {
    let a: Vec<TokenTree> = a.clone().into_iter().collect();
    let b: Vec<TokenTree> = b.clone().into_iter().collect();
    a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| match (x, y) {
            (TokenTree::Group(x), TokenTree::Group(y)) => x.delimiter() == y.delimiter() && same_tokens(&x.stream(), &y.stream()),
            (TokenTree::Ident(x), TokenTree::Ident(y)) => x == y,
            (TokenTree::Punct(x), TokenTree::Punct(y)) => x.as_char() == y.as_char(),
            (TokenTree::Literal(x), TokenTree::Literal(y)) => x.to_string() == y.to_string(),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "
    /// Tiny.
    /// Two lines.
    pub(crate) model Tiny(input: 1x8x8) {
        conv1: conv(4, 3x3, pad=1); relu;
        concat { {} { conv(2, 1x1); } }
    }
    block B(c) { dense(c); }";

    fn text_of(src: &str) -> String {
        let original: TokenStream = src.parse().unwrap();
        let tokens: Vec<TokenTree> = original.clone().into_iter().collect();
        let stripped: Vec<bool> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.to_string() == "pub"
                    || (i > 0 && tokens[i - 1].to_string() == "pub" && matches!(t, TokenTree::Group(_)))
            })
            .collect();
        let program: TokenStream =
            tokens.iter().zip(&stripped).filter(|(_, s)| !**s).map(|(t, _)| t.clone()).collect();
        text(&original, &stripped, &program)
    }

    #[test]
    fn layout_is_kept_without_visibility() {
        let t = text_of(SRC);
        let expected = "/// Tiny.\n/// Two lines.\nmodel Tiny(input: 1x8x8) {\n    conv1: conv(4, 3x3, pad=1); relu;\n    concat { {} { conv(2, 1x1); } }\n}\nblock B(c) { dense(c); }\n";
        assert_eq!(t, expected);
        let t = text_of("  pub model A(input: 4) {\n    relu;\n  }\n  pub  model B(input: 4) { relu; }");
        assert_eq!(t, "model A(input: 4) {\n  relu;\n}\nmodel B(input: 4) { relu; }\n");
    }

    #[test]
    fn unknown_positions_fall_back_to_tokens() {
        let program: TokenStream = quote::quote!(model M(input: 4) { relu; });
        assert_eq!(text(&program, &[], &program), program.to_string());
    }
}
