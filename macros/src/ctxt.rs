//! The error context: every step pushes spanned errors here instead of stopping at the first,
//! so independent mistakes are all reported by one compilation.

use std::cell::RefCell;

/// Collects `syn::Error`s; [`Ctxt::check`] must be called before it is dropped.
#[derive(Default)]
pub(crate) struct Ctxt {
    errors: RefCell<Option<Vec<syn::Error>>>,
}

impl Ctxt {
    /// An empty context.
    pub fn new() -> Ctxt {
        Ctxt { errors: RefCell::new(Some(Vec::new())) }
    }

    /// Record an error.
    pub fn push(&self, e: syn::Error) {
        self.errors.borrow_mut().as_mut().expect("Ctxt used after check").push(e);
    }

    /// Every recorded error combined into one (reported together), or `Ok` if there were none.
    pub fn check(self) -> syn::Result<()> {
        let errors = self.errors.borrow_mut().take().unwrap_or_default();
        let mut it = errors.into_iter();
        let Some(mut first) = it.next() else { return Ok(()) };
        for e in it {
            first.combine(e);
        }
        Err(first)
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.errors.borrow().is_some() {
            panic!("forgot to check for errors");
        }
    }
}
