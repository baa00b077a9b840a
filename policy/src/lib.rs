//! Policy model, validation and compilation to agent rule tables (sans-IO).
//! The language, bundles and rollout arrive with the policy issue; this crate
//! holds the workspace place for them so the layout of ARCHITECTURE.md stays.
