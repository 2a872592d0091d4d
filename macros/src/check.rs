//! Checking: the model language parses and checks the program, every model is expanded into a
//! graph (which infers and checks every shape), and the numbers the generated constants hold
//! are computed here, during expansion.
//!
//! Inline programs report each diagnostic at the user's own token. A `.cnn` file is parsed with
//! proc-macro2's fallback lexer so its spans carry line and column; its diagnostics are rendered
//! rustc-style (`--> path:line:col`, the source line and carets) and reported at the path
//! literal.

use crate::ctxt::Ctxt;
use crate::input::FileRef;
use cnnc_compiler::cost;
use cnnc_compiler::ir::Shape;
use cnnc_compiler::lang::{self, Diagnostics, Program};
use proc_macro2::Span;
use std::path::PathBuf;

/// What the generated code needs to know about one model.
pub(crate) struct CheckedModel {
    /// The model's name.
    pub name: String,
    /// Its doc comment lines (used for models read from a file).
    pub docs: Vec<String>,
    /// Per-sample input shape.
    pub input: Shape,
    /// Per-sample output shapes, the main output first.
    pub outputs: Vec<Shape>,
    /// Parameter count.
    pub params: u64,
    /// Multiply-accumulates for one sample.
    pub macs: u64,
    /// Number of graph nodes (input included).
    pub layers: usize,
}

/// Check an inline program; diagnostics are reported at the user's tokens.
pub(crate) fn inline(cx: &Ctxt, program: proc_macro2::TokenStream) -> Vec<CheckedModel> {
    match lang::parse_tokens(program) {
        Ok(p) => summarize(&p, &mut |d| cx.push(d.to_syn_error())),
        Err(d) => {
            cx.push(d.to_syn_error());
            Vec::new()
        }
    }
}

/// A model file, read and checked.
pub(crate) struct CheckedFile {
    /// Absolute path (for `include_bytes!`, so edits trigger recompilation).
    pub path: PathBuf,
    /// The file's text, exactly as checked.
    pub text: String,
    /// Its models.
    pub models: Vec<CheckedModel>,
}

/// Read and check the file named by `file`; every error is reported at the path literal.
pub(crate) fn file(cx: &Ctxt, file: &FileRef) -> Option<CheckedFile> {
    let shown = file.path.value();
    let at = file.path.span();
    let candidates = candidates(&shown, at);
    let mut found = None;
    let mut first_err = None;
    for p in &candidates {
        match std::fs::read_to_string(p) {
            Ok(t) => {
                found = Some((p.clone(), t));
                break;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let (path, text) = match found {
        Some(r) => r,
        None => {
            let tried: Vec<String> = candidates.iter().map(|p| format!("`{}`", p.display())).collect();
            let why = first_err.map_or_else(|| "not found".to_string(), |e| e.to_string());
            cx.push(syn::Error::new(
                at,
                format!(
                    "cannot read model file `{shown}`: {why}\n  = note: tried {}\n  = note: a relative path is resolved against the crate's directory (CARGO_MANIFEST_DIR), then the directory of the invoking source file",
                    tried.join(", ")
                ),
            ));
            return None;
        }
    };
    let path = path.canonicalize().unwrap_or(path);

    // Lex and check with proc-macro2's own implementation: its spans know line and column in
    // `text`, which the compiler's spans for a string parsed inside a macro do not. Nothing
    // created while forced leaves this block except strings and numbers.
    let mut rendered = Vec::new();
    let models = {
        let _fallback = ForceFallback::new();
        match lang::parse_source(&shown, &text) {
            Ok(p) => summarize(&p, &mut |d| rendered.extend(render(&d, &shown, &text))),
            Err(d) => {
                rendered.extend(render(&d, &shown, &text));
                Vec::new()
            }
        }
    };

    for r in rendered {
        cx.push(syn::Error::new(at, r));
    }
    Some(CheckedFile { path, text, models })
}

/// proc-macro2's fallback implementation while alive; the compiler's again when dropped (also
/// on unwinding, so a later invocation in the same compilation is not left with span-less
/// tokens).
struct ForceFallback;

impl ForceFallback {
    fn new() -> ForceFallback {
        proc_macro2::fallback::force();
        ForceFallback
    }
}

impl Drop for ForceFallback {
    fn drop(&mut self) {
        proc_macro2::fallback::unforce();
    }
}

/// Where `file = "shown"` may be: relative to `CARGO_MANIFEST_DIR`, then (like
/// `include_str!`) to the directory of the file containing the invocation.
fn candidates(shown: &str, at: Span) -> Vec<PathBuf> {
    let p = PathBuf::from(shown);
    if p.is_absolute() {
        return vec![p];
    }
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        out.push(PathBuf::from(dir).join(&p));
    }
    if let Some(dir) = at.local_file().as_deref().and_then(std::path::Path::parent) {
        let c = dir.join(&p);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    if out.is_empty() {
        out.push(p);
    }
    out
}

/// Each diagnostic rendered against the file (without the leading `error: `, which rustc adds).
fn render(d: &Diagnostics, shown: &str, text: &str) -> Vec<String> {
    d.iter()
        .map(|d| {
            let r = d.render(shown, text);
            let r = r.strip_prefix("error: ").unwrap_or(&r);
            r.trim_end().to_string()
        })
        .collect()
}

/// Expand every model and compute its constants; failures go to `report`.
fn summarize(p: &Program, report: &mut dyn FnMut(Diagnostics)) -> Vec<CheckedModel> {
    let mut out = Vec::new();
    for m in p.models() {
        match p.expand(&m.name) {
            Ok(g) => {
                let c = cost::analyze(&g, 1);
                out.push(CheckedModel {
                    name: m.name.clone(),
                    docs: m.docs.clone(),
                    input: m.input,
                    outputs: g.outputs().into_iter().map(|o| g.node(o).shape).collect(),
                    params: c.totals.params,
                    macs: c.totals.macs,
                    layers: g.len(),
                });
            }
            Err(d) => report(d),
        }
    }
    out
}

/// A Rust identifier for a model read from a file (inline models keep the user's own token).
pub(crate) fn type_ident(cx: &Ctxt, name: &str, span: Span) -> Option<syn::Ident> {
    match syn::parse_str::<syn::Ident>(name) {
        Ok(mut id) => {
            id.set_span(span);
            Some(id)
        }
        Err(_) => {
            cx.push(syn::Error::new(span, format!("model name `{name}` is not a valid Rust type name")));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(path: &std::path::Path) -> FileRef {
        let s = path.to_string_lossy().into_owned();
        FileRef { vis: proc_macro2::TokenStream::new(), path: syn::LitStr::new(&s, Span::call_site()) }
    }

    fn messages(cx: Ctxt) -> Vec<String> {
        cx.check().err().map_or_else(Vec::new, |e| e.into_iter().map(|e| e.to_string()).collect())
    }

    /// A file holding `text` in a fresh temporary directory, removed when the guard drops.
    fn scratch(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn file_is_read_checked_and_summarized() {
        let (_dir, p) = scratch("ok.cnn", "/// Doc.\nmodel M(input: 2x6x6) {\n  conv(3, 3x3); relu; flatten; dense(5);\n}\n");
        let cx = Ctxt::new();
        let f = file(&cx, &lit(&p)).unwrap();
        assert!(messages(cx).is_empty());
        assert_eq!(f.text, std::fs::read_to_string(&p).unwrap());
        assert!(f.path.is_absolute());
        let m = &f.models[0];
        assert_eq!((m.name.as_str(), m.docs.clone()), ("M", vec!["Doc.".to_string()]));
        assert_eq!(m.input, Shape::chw(2, 6, 6));
        assert_eq!(m.outputs, vec![Shape::flat(5)]);
        // conv: 3*2*9 + 3 = 57, 4*4*3*18 = 864 MACs; dense: 48*5 + 5 = 245, 240 MACs.
        assert_eq!((m.params, m.macs, m.layers), (57 + 245, 864 + 240, 5));
    }

    #[test]
    fn file_errors_are_rendered_with_line_and_column() {
        let (_dir, p) = scratch("bad.cnn", "model M(input: 1x4x4) {\n    relu;\n    c: conv(2, 5x5);\n}\n\nmodel N(input: 4) { bogus; }\n");
        let cx = Ctxt::new();
        let shown = p.to_string_lossy().into_owned();
        let f = file(&cx, &lit(&p)).unwrap();
        assert!(f.models.is_empty());
        let msgs = messages(cx);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].starts_with("unknown layer or block `bogus`"), "{msgs:?}");
        assert!(msgs[0].contains(&format!("--> {shown}:6:21")), "{msgs:?}");
        assert!(msgs[0].contains("6 | model N(input: 4) { bogus; }"), "{msgs:?}");

        let (_dir, p) = scratch("shape.cnn", "model M(input: 1x4x4) {\n    relu;\n    c: conv(2, 5x5);\n}\n");
        let cx = Ctxt::new();
        file(&cx, &lit(&p)).unwrap();
        let msgs = messages(cx);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains(":3:8"), "{msgs:?}");
        assert!(msgs[0].contains("    c: conv(2, 5x5);\n"), "{msgs:?}");
    }

    #[test]
    fn missing_file_says_where_it_looked() {
        let cx = Ctxt::new();
        let f = FileRef { vis: proc_macro2::TokenStream::new(), path: syn::LitStr::new("no/such.cnn", Span::call_site()) };
        assert!(file(&cx, &f).is_none());
        let msgs = messages(cx);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].starts_with("cannot read model file `no/such.cnn`"), "{msgs:?}");
        let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap();
        assert!(msgs[0].contains(&format!("{manifest}/no/such.cnn")), "{msgs:?}");
    }

    #[test]
    fn type_names_must_be_rust_identifiers() {
        let cx = Ctxt::new();
        assert_eq!(type_ident(&cx, "LeNet5", Span::call_site()).unwrap().to_string(), "LeNet5");
        assert!(type_ident(&cx, "type", Span::call_site()).is_none());
        assert_eq!(messages(cx).len(), 1);
    }
}
