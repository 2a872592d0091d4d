//! Diagnostics of the model language: located error messages, rendered like rustc's for `.cnn`
//! files and turned into one combined [`syn::Error`] for the `cnn_model!` macro.

use proc_macro2::Span;
use std::fmt;

/// One error, located at a span of the source.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    /// What is wrong, in the user's terms (the `error:` line).
    pub message: String,
    /// The offending tokens. Parsed from a string (a `.cnn` file), it carries line and column;
    /// inside a proc macro it points the compiler at the tokens.
    pub span: Span,
    /// A short remark printed under the carets (`input is 6x4x4 (output of `pool2`)`).
    pub label: Option<String>,
    /// What would fix it (the `= help:` line).
    pub help: Option<String>,
    /// Further context (`= note:` lines), e.g. which block instance the error occurred in.
    pub notes: Vec<String>,
}

impl Diagnostic {
    /// An error with `message` at `span` and nothing else.
    pub fn new(span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic { message: message.into(), span, label: None, help: None, notes: Vec::new() }
    }

    /// Set the label printed under the carets.
    pub fn label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = Some(label.into());
        self
    }

    /// Set the help line.
    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// Set the help line if `help` is `Some`.
    pub fn maybe_help(mut self, help: Option<String>) -> Diagnostic {
        if help.is_some() {
            self.help = help;
        }
        self
    }

    /// Add a note.
    pub fn note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    /// `line:column` of the span's start (1-based both, as printed by rustc), when known.
    pub fn line_col(&self) -> Option<(usize, usize)> {
        let s = self.span.start();
        (s.line > 0).then_some((s.line, s.column + 1))
    }

    /// The message with label, help and notes appended on further lines (what the macro
    /// reports, since `compile_error!` has a single message).
    pub fn full_message(&self) -> String {
        let mut m = self.message.clone();
        if let Some(l) = &self.label {
            m.push_str(&format!("\n  {l}"));
        }
        if let Some(h) = &self.help {
            m.push_str(&format!("\n  = help: {h}"));
        }
        for n in &self.notes {
            m.push_str(&format!("\n  = note: {n}"));
        }
        m
    }

    /// Render rustc-style against `source`, the text `span` was parsed from.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let mut out = format!("error: {}\n", self.message);
        let start = self.span.start();
        let end = self.span.end();
        let line_text = if start.line > 0 { source.lines().nth(start.line - 1) } else { None };
        let width = start.line.to_string().len();
        let pad = " ".repeat(width);
        match line_text {
            Some(text) => {
                out.push_str(&format!("{pad}--> {file_name}:{}:{}\n", start.line, start.column + 1));
                out.push_str(&format!("{pad} |\n"));
                out.push_str(&format!("{} | {}\n", start.line, text.trim_end()));
                let chars: Vec<char> = text.chars().collect();
                let first = start.column.min(chars.len());
                let last = if end.line == start.line { end.column.min(chars.len()) } else { chars.len() };
                let lead: String = chars[..first].iter().map(|&c| if c == '\t' { '\t' } else { ' ' }).collect();
                let carets = "^".repeat(last.saturating_sub(first).max(1));
                out.push_str(&format!("{pad} | {lead}{carets}"));
                if let Some(l) = &self.label {
                    out.push(' ');
                    out.push_str(l);
                }
                out.push('\n');
            }
            None => {
                out.push_str(&format!("{pad}--> {file_name}\n"));
                if let Some(l) = &self.label {
                    out.push_str(&format!("{pad} = {l}\n"));
                }
            }
        }
        if let Some(h) = &self.help {
            out.push_str(&format!("{pad} = help: {h}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("{pad} = note: {n}\n"));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    /// `line:col: message` (or just the message when the location is unknown), then the help.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((l, c)) = self.line_col() {
            write!(f, "{l}:{c}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.help {
            write!(f, " (help: {h})")?;
        }
        Ok(())
    }
}

/// All the errors found in one program (never empty when returned as an `Err`).
#[derive(Clone, Debug)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// One error.
    pub fn single(d: Diagnostic) -> Diagnostics {
        Diagnostics(vec![d])
    }

    /// The errors, in source order of discovery.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no errors.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One `syn::Error` holding every diagnostic (via [`syn::Error::combine`]), so a proc macro
    /// reports them all at once with `to_compile_error()`.
    pub fn to_syn_error(&self) -> syn::Error {
        let mut it = self.0.iter().map(|d| syn::Error::new(d.span, d.full_message()));
        let mut first = it.next().unwrap_or_else(|| syn::Error::new(Span::call_site(), "unknown error"));
        for e in it {
            first.combine(e);
        }
        first
    }

    /// Render every diagnostic rustc-style (blank line between them), followed by a summary
    /// line when there is more than one. `source` is the text the program was parsed from.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let mut out: Vec<String> = self.0.iter().map(|d| d.render(file_name, source)).collect();
        if self.0.len() > 1 {
            out.push(format!("error: aborting due to {} previous errors\n", self.0.len()));
        }
        out.join("\n")
    }

    /// Render against the file at `path` (read again from disk; without source lines if it
    /// cannot be read). Convenient after [`crate::lang::load_file`] fails.
    pub fn render_file(&self, path: &std::path::Path) -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        self.render(&path.display().to_string(), &text)
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Diagnostics {
        Diagnostics(vec![d])
    }
}

impl fmt::Display for Diagnostics {
    /// One line per error, `line:col: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// A span at 1-based `line` and 0-based `column`, for rendering only: text parsed on its
/// own, padded so its single token starts there (proc-macro2 gives every parsed string its
/// own line numbering).
fn span_at(line: usize, column: usize) -> Span {
    let text = format!("{}{}x", "\n".repeat(line.saturating_sub(1)), " ".repeat(column));
    text.parse::<proc_macro2::TokenStream>()
        .ok()
        .and_then(|ts| ts.into_iter().next())
        .map_or_else(Span::call_site, |t| t.span())
}

/// Explain why `text` does not split into tokens. The lexer only says where it stopped
/// (`fallback`); delimiters are matched here (skipping comments, strings and characters) so
/// an unclosed `(` is reported at the `(`.
pub(crate) fn lex_error(text: &str, fallback: Span) -> Diagnostic {
    let help = "a model file must be valid Rust tokens: balanced `()`, `{}` and `[]`, closed strings and `/* */` comments";
    let mut stack: Vec<(char, usize, usize)> = Vec::new();
    let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
    let (mut block_comment, mut string): (usize, Option<(usize, usize)>) = (0, None);
    for (li, l) in lines.iter().enumerate() {
        let mut i = 0;
        while i < l.len() {
            let (c, next) = (l[i], l.get(i + 1).copied());
            if block_comment > 0 {
                if c == '*' && next == Some('/') {
                    block_comment -= 1;
                    i += 1;
                } else if c == '/' && next == Some('*') {
                    block_comment += 1;
                    i += 1;
                }
            } else if string.is_some() {
                if c == '\\' {
                    i += 1;
                } else if c == '"' {
                    string = None;
                }
            } else {
                match c {
                    '/' if next == Some('/') => break,
                    '/' if next == Some('*') => {
                        block_comment = 1;
                        i += 1;
                    }
                    '"' => string = Some((li + 1, i)),
                    '(' | '[' | '{' => stack.push((c, li + 1, i)),
                    ')' | ']' | '}' => {
                        let open = match c {
                            ')' => '(',
                            ']' => '[',
                            _ => '{',
                        };
                        let deeper = stack.iter().any(|s| s.0 == open);
                        match stack.pop() {
                            Some((o, ..)) if o == open => {}
                            Some((o, ol, oc)) if deeper => {
                                return Diagnostic::new(span_at(ol, oc), format!("unclosed `{o}`"))
                                    .label(format!("this `{o}` is closed by the `{c}` at {}:{}", li + 1, i + 1))
                                    .help(help)
                            }
                            _ => {
                                return Diagnostic::new(span_at(li + 1, i), format!("unmatched closing `{c}`")).help(help)
                            }
                        }
                    }
                    _ => {}
                }
            }
            i += 1;
        }
    }
    if let Some((l, c)) = string {
        return Diagnostic::new(span_at(l, c), "unterminated string").help(help);
    }
    if let Some((o, l, c)) = stack.pop() {
        return Diagnostic::new(span_at(l, c), format!("unclosed `{o}`")).label("never closed").help(help);
    }
    let at = fallback.start();
    let ch = lines.get(at.line.saturating_sub(1)).and_then(|l| l.get(at.column)).copied();
    let msg = match ch {
        Some(c) if !c.is_whitespace() => format!("unexpected character `{c}`"),
        _ => "cannot split the text into tokens".to_string(),
    };
    Diagnostic::new(fallback, msg).help(help)
}

/// Join two spans into one covering both (falls back to `a` where joining is unsupported,
/// i.e. inside a proc macro on stable Rust).
pub(crate) fn join(a: Span, b: Span) -> Span {
    a.join(b).unwrap_or(a)
}

/// Levenshtein distance between two short names.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a plausible typo
/// (edit distance at most a third of the name's length, and at least 1).
pub(crate) fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_suggestions() {
        assert_eq!(edit_distance("incepton", "inception"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(did_you_mean("incepton", ["conv", "inception", "relu"]), Some("inception"));
        assert_eq!(did_you_mean("maxpol", ["maxpool", "avgpool"]), Some("maxpool"));
        assert_eq!(did_you_mean("xyz", ["conv", "dense"]), None);
    }

    #[test]
    fn render_points_at_the_span() {
        let src = "model M(input: 1x8x8) {\n    conv(4, 3x3);\n    bogus;\n}\n";
        let ts: proc_macro2::TokenStream = src.parse().unwrap();
        // find the `bogus` ident
        let body = ts.into_iter().nth(3).unwrap();
        let proc_macro2::TokenTree::Group(g) = body else { panic!() };
        let bogus = g.stream().into_iter().find(|t| t.to_string() == "bogus").unwrap();
        let d = Diagnostic::new(bogus.span(), "unknown layer `bogus`").label("not a layer").help("try `relu`");
        assert_eq!(d.line_col(), Some((3, 5)));
        let r = d.render("m.cnn", src);
        assert_eq!(
            r,
            "error: unknown layer `bogus`\n --> m.cnn:3:5\n  |\n3 |     bogus;\n  |     ^^^^^ not a layer\n  = help: try `relu`\n"
        );
    }
}
