//! The model language: parse (`syn`) -> check -> expand into a [`crate::ir::Graph`].
//! See `docs/language.md` for the grammar.
//!
//! ```
//! use cnnc_compiler::lang;
//! let program = lang::parse_source("lenet.cnn", "
//!     /// LeNet-5.
//!     model LeNet5(input: 1x28x28) {
//!         conv1: conv(6, 5x5, pad=2); relu; pool1: maxpool(2x2);
//!         conv2: conv(16, 5x5); relu; pool2: maxpool(2x2);
//!         flatten; dense(120); relu; dense(84); relu; dense(10);
//!     }
//! ").unwrap();
//! let graph = program.expand("LeNet5").unwrap();
//! assert_eq!(graph.node(graph.outputs()[0]).shape.to_string(), "10");
//! ```
//!
//! Phases:
//! - [`parse_tokens`] / [`parse_source`] / [`load_file`] parse the program *and* check it:
//!   every independent error (syntax, unknown names, argument mistakes, duplicate names,
//!   recursion, constant arithmetic) is reported at once as [`Diagnostics`].
//! - [`Program::expand`] instantiates one model (evaluating parameters, `if`s and repetitions)
//!   and builds the graph; shape errors become a [`Diagnostic`] at the offending statement.

mod ast;
mod check;
mod diag;
mod eval;
mod expand;
mod layers;
mod parse;

pub use diag::{Diagnostic, Diagnostics};
pub use eval::Value;

use crate::ir::{Graph, Shape};
use proc_macro2::{Span, TokenStream};
use std::path::Path;

/// A parsed and checked program: the `model` and `block` items of one file or macro call.
#[derive(Clone, Debug)]
pub struct Program {
    items: Vec<ast::Item>,
    models: Vec<ModelDecl>,
}

/// A model declared in a [`Program`].
#[derive(Clone, Debug)]
pub struct ModelDecl {
    /// The model's name (`LeNet5`).
    pub name: String,
    /// Its doc comment, one entry per `///` line, with the leading space removed.
    pub docs: Vec<String>,
    /// The span of the name.
    pub span: Span,
    /// The per-sample input shape (`1x28x28`, or a flat `784`).
    pub input: Shape,
    /// The model's extra parameters with their default values, in declaration order.
    pub params: Vec<(String, Value)>,
    item: usize,
}

/// Parse and check a program given as tokens (what the `cnn_model!` macro receives).
pub fn parse_tokens(ts: TokenStream) -> Result<Program, Diagnostics> {
    let (items, syntax) = parse::parse_program(ts);
    let mut diags: Vec<Diagnostic> =
        syntax.into_iter().flat_map(|e| e.into_iter()).map(|e| Diagnostic::new(e.span(), e.to_string())).collect();
    // A checker run on a partly parsed program would report the skipped parts as missing,
    // so syntax errors are reported alone.
    if diags.is_empty() {
        let (models, errs) = check::check(&items);
        if errs.is_empty() {
            return Ok(Program { items, models });
        }
        diags = errs;
    }
    diags.sort_by_key(|d| {
        let s = d.span.start();
        (s.line, s.column)
    });
    Err(Diagnostics(diags))
}

/// Parse and check the text of a `.cnn` file. Spans carry line and column (relative to `text`),
/// so [`Diagnostics::render`] can show the offending line; `file_name` only labels lexing errors.
pub fn parse_source(file_name: &str, text: &str) -> Result<Program, Diagnostics> {
    match text.parse::<TokenStream>() {
        Ok(ts) => parse_tokens(ts),
        Err(e) => {
            let _ = file_name;
            Err(Diagnostics::single(diag::lex_error(text, e.span())))
        }
    }
}

/// Read and parse the `.cnn` file at `path`. On error, render with
/// [`Diagnostics::render_file`] (or [`Diagnostics::render`] with the text).
pub fn load_file(path: &Path) -> Result<Program, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostics::single(Diagnostic::new(Span::call_site(), format!("cannot read `{}`: {e}", path.display())))
    })?;
    parse_source(&path.display().to_string(), &text)
}

impl Program {
    /// The models, in source order.
    pub fn models(&self) -> impl Iterator<Item = &ModelDecl> {
        self.models.iter()
    }

    /// The model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelDecl> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The names of the blocks, in source order.
    pub fn block_names(&self) -> impl Iterator<Item = &str> {
        self.items.iter().filter_map(|i| match i {
            ast::Item::Block(b) => Some(b.name.text.as_str()),
            ast::Item::Model(_) => None,
        })
    }

    /// The doc comment lines of block `name`.
    pub fn block_docs(&self, name: &str) -> Option<&[String]> {
        self.items.iter().find_map(|i| match i {
            ast::Item::Block(b) if b.name.text == name => Some(b.docs.as_slice()),
            _ => None,
        })
    }

    /// Expand model `name` with its default parameters into a shape-checked graph.
    pub fn expand(&self, name: &str) -> Result<Graph, Diagnostics> {
        self.expand_with(name, &[])
    }

    /// Expand model `name`, overriding some of its parameters (`[("aux", Value::Bool(true))]`).
    pub fn expand_with(&self, name: &str, overrides: &[(&str, Value)]) -> Result<Graph, Diagnostics> {
        let Some(decl) = self.model(name) else {
            let mut d = Diagnostic::new(Span::call_site(), format!("no model named `{name}`"));
            let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            d = match diag::did_you_mean(name, names.iter().copied()) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None if names.is_empty() => d.help("the program declares no model"),
                None => d.help(format!("models: {}", names.join(", "))),
            };
            return Err(Diagnostics::single(d));
        };
        let ast::Item::Model(m) = &self.items[decl.item] else { unreachable!("ModelDecl points at a model") };
        expand::expand_model(&self.items, m, decl, overrides).map_err(Diagnostics::single)
    }

    /// Expand every model with its defaults, in source order; all failures are collected.
    pub fn expand_all(&self) -> Result<Vec<Graph>, Diagnostics> {
        let mut out = Vec::new();
        let mut errs = Vec::new();
        for m in &self.models {
            match self.expand(&m.name) {
                Ok(g) => out.push(g),
                Err(d) => errs.extend(d),
            }
        }
        if errs.is_empty() {
            Ok(out)
        } else {
            Err(Diagnostics(errs))
        }
    }
}

impl ModelDecl {
    /// The doc comment as one string (lines joined with `\n`).
    pub fn doc(&self) -> String {
        self.docs.join("\n")
    }
}
