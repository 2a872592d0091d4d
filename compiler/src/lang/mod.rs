//! The model language: parse (`syn`) -> check -> expand into a [`crate::ir::Graph`].
//! See `docs/language.md` for the grammar.
