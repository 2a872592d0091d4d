//! The generated items: per model, a unit struct and an `impl` with its shapes, counts, source
//! and graph. Items of models that failed to check are left out; the errors are emitted next to
//! the items that did check, so one mistake does not hide the others.

use crate::check::{self, CheckedModel};
use crate::ctxt::Ctxt;
use crate::input::{self, Invocation};
use crate::source;
use cnnc_compiler::ir::Shape;
use proc_macro2::{Span, TokenStream};
use quote::quote;

/// The whole expansion of one invocation: generated items followed by any errors.
pub(crate) fn cnn_model(ts: TokenStream) -> TokenStream {
    let cx = Ctxt::new();
    let items = match input::parse(&cx, ts) {
        Some(Invocation::Inline(inline)) => inline_items(&cx, inline),
        Some(Invocation::File(f)) => file_items(&cx, &f),
        None => TokenStream::new(),
    };
    match cx.check() {
        Ok(()) => items,
        Err(e) => {
            let errors = e.to_compile_error();
            quote!(#items #errors)
        }
    }
}

fn inline_items(cx: &Ctxt, inline: input::Inline) -> TokenStream {
    let checked = check::inline(cx, inline.program.clone());
    if checked.is_empty() {
        return TokenStream::new();
    }
    let text = source::text(&inline.original, &inline.stripped, &inline.program);
    let mut out = TokenStream::new();
    for m in &checked {
        let Some(decl) = inline.models.iter().find(|d| d.name == m.name) else {
            cx.push(syn::Error::new(Span::call_site(), format!("internal error: model `{}` not found in the tokens", m.name)));
            continue;
        };
        let attrs = &decl.attrs;
        let model = Model { attrs: quote!(#(#attrs)*), vis: &decl.vis, name: &decl.name, checked: m };
        out.extend(model_items(&model, &text));
    }
    out
}

fn file_items(cx: &Ctxt, f: &input::FileRef) -> TokenStream {
    let Some(file) = check::file(cx, f) else { return TokenStream::new() };
    let at = f.path.span();
    let abs = file.path.to_string_lossy().into_owned();
    // Tracks the file: rustc recompiles the crate (re-running this macro) when it changes.
    let mut out = quote::quote_spanned!(at=> const _: &[u8] = ::core::include_bytes!(#abs););
    for m in &file.models {
        let Some(name) = check::type_ident(cx, &m.name, at) else { continue };
        let docs = &m.docs;
        let attrs = quote!(#(#[doc = #docs])*);
        let model = Model { attrs, vis: &f.vis, name: &name, checked: m };
        out.extend(model_items(&model, &file.text));
    }
    out
}

/// One model's Rust face.
struct Model<'a> {
    /// Attributes for the struct (doc comments).
    attrs: TokenStream,
    vis: &'a TokenStream,
    name: &'a syn::Ident,
    checked: &'a CheckedModel,
}

/// `::cnnc::compiler::ir::Shape::...` for a shape known now.
fn shape_tokens(s: Shape) -> TokenStream {
    match s {
        Shape::Chw { c, h, w } => quote!(::cnnc::compiler::ir::Shape::Chw { c: #c, h: #h, w: #w }),
        Shape::Flat { n } => quote!(::cnnc::compiler::ir::Shape::Flat { n: #n }),
    }
}

/// `1_234_567`, for the docs.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(ch);
    }
    out
}

/// `source` is the model-language text the model was declared in.
fn model_items(m: &Model, source: &str) -> TokenStream {
    let Model { attrs, vis, name, checked: c } = m;
    let name_str = &c.name;
    let input = shape_tokens(c.input);
    let main = c.outputs.first().copied().unwrap_or(c.input);
    let output = shape_tokens(main);
    let outputs = c.outputs.iter().map(|&s| shape_tokens(s));
    let (params, macs, layers) = (c.params, c.macs, c.layers);

    let doc_input = format!("Per-sample input shape: `{}`.", c.input);
    let doc_output = if c.outputs.len() > 1 {
        format!("Per-sample shape of the main output: `{main}` (the last statement of the body).")
    } else {
        format!("Per-sample output shape: `{main}`.")
    };
    let shown: Vec<String> = c.outputs.iter().map(|s| format!("`{s}`")).collect();
    let doc_outputs = format!(
        "Per-sample shapes of every output, the main one first (then `side` branches): {}.",
        shown.join(", ")
    );
    let doc_params = format!("Number of parameters: {} (weights, biases, batch-norm scale and shift).", grouped(params));
    let doc_macs = format!(
        "Multiply-accumulates of one forward pass of one sample: {} (convolutions and dense layers, without bias).",
        grouped(macs)
    );
    let doc_layers = format!("Number of graph nodes, the input included: {layers}.");

    quote! {
        #attrs
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #[allow(dead_code)]
        #vis struct #name;

        #[allow(dead_code)]
        impl #name {
            /// The model's name in the source.
            pub const NAME: &'static str = #name_str;
            #[doc = #doc_input]
            pub const INPUT: ::cnnc::compiler::ir::Shape = #input;
            #[doc = #doc_output]
            pub const OUTPUT: ::cnnc::compiler::ir::Shape = #output;
            #[doc = #doc_outputs]
            pub const OUTPUTS: &'static [::cnnc::compiler::ir::Shape] = &[#(#outputs),*];
            #[doc = #doc_params]
            pub const PARAMS: u64 = #params;
            #[doc = #doc_macs]
            pub const MACS: u64 = #macs;
            #[doc = #doc_layers]
            pub const LAYERS: usize = #layers;

            /// The model-language source this model was declared in: the `cnn_model!`
            /// invocation (without Rust visibilities, so it is also a valid `.cnn` file) or
            /// the file, blocks and other models included.
            pub const fn source() -> &'static str {
                #source
            }

            /// The shape-checked graph, with the model's default parameters (built once,
            /// then cloned).
            pub fn graph() -> ::cnnc::compiler::ir::Graph {
                static GRAPH: ::std::sync::OnceLock<::cnnc::compiler::ir::Graph> = ::std::sync::OnceLock::new();
                GRAPH.get_or_init(|| ::cnnc::__private::graph(#source, #name_str)).clone()
            }

            /// The cost report (parameters, MACs, FLOPs, memory, receptive field) for a batch
            /// of `batch` samples.
            pub fn report(batch: usize) -> ::cnnc::compiler::cost::CostReport {
                ::cnnc::compiler::cost::analyze(&Self::graph(), batch)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn digit_groups() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1_000");
        assert_eq!(grouped(61_706), "61_706");
        assert_eq!(grouped(25_557_032), "25_557_032");
    }
}
