//! Graph-to-plan passes, one per file. `crate::pipeline` lists them in order.

pub mod bn_stats;
pub mod concat_inplace;
pub mod fuse;
pub mod layout;
pub mod memplan;
pub mod pool_fuse;
