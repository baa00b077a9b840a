//! The policy language (sans-IO): who may connect to what, as admins write
//! it, and everything done with it before it reaches a kernel map.
//!
//! * [`parse`]: YAML text → one layer ([`Policy`]), every problem with its
//!   line, column and a hint ([`Diagnostics`]).
//! * [`PolicySet`]: the prefecture baseline and an organisation's layer,
//!   linked; strictest verdict wins, so the baseline cannot be loosened.
//! * [`PolicySet::evaluate`]: the one evaluation used for enforcement at
//!   the gateway, for compiling the kernel tables, for `explain` and for
//!   `tests:`.
//! * [`compile`]: the tables an agent loads: kernel verdict-map entries,
//!   condition chains, group bits, protected ports.
//! * [`bundle`]: signed, serial-numbered bundles (Ed25519).
//!
//! The format is documented in `docs/policy.md`.

pub mod bundle;
pub mod compile;
pub mod diag;
pub mod eval;
pub mod model;
pub mod parse;
pub mod set;

pub use diag::{Diagnostic, Diagnostics, Position};
pub use eval::{Decision, Flow};
pub use model::*;
pub use parse::parse;
pub use set::PolicySet;

/// Parses and links a baseline and, optionally, an organisation's layer.
/// Errors carry the layer they were found in.
pub fn load(baseline: &str, organisation: Option<&str>) -> Result<PolicySet, LoadError> {
    let base = parse(baseline).map_err(LoadError::Baseline)?;
    let org = organisation
        .map(parse)
        .transpose()
        .map_err(LoadError::Organisation)?;
    let in_org = org.is_some();
    PolicySet::link(base, org).map_err(|d| {
        if in_org {
            LoadError::Organisation(d)
        } else {
            LoadError::Baseline(d)
        }
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("baseline: {0}")]
    Baseline(Diagnostics),
    #[error("organisation layer: {0}")]
    Organisation(Diagnostics),
}
