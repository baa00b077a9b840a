//! Diagnostics: see the `diagnostics` crate, shared with the policy
//! language.

pub use diagnostics::*;
