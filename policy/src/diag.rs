//! Diagnostics: see the `diagnostics` crate, shared with the detection
//! rules.

pub use diagnostics::*;
