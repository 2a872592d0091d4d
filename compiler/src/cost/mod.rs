//! The architecture cost model and report.
