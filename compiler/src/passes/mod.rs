//! Graph-to-plan passes, one per file. `crate::pipeline` lists them in order.

pub mod concat_inplace;
pub mod fuse;
pub mod memplan;
