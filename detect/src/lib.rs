//! Detection engine (sans-IO): YAML rules — single-event matches,
//! sequences, thresholds and absence — run over the collector's live event
//! stream, with bounded state that survives a restart through
//! [`Engine::snapshot`] / [`Engine::restore`]; and [`Incidents`], which groups
//! the alerts into incidents with a lifecycle, and the zero-incident
//! [`kpi`]. The rule format and incidents are described in
//! docs/detections.md.

pub mod diag;
pub mod engine;
pub mod event;
pub mod incidents;
pub mod rules;

pub use diag::{Diagnostic, Diagnostics, Position};
pub use engine::{
    check_fixtures, Alert, Config, Engine, EventRef, FixtureFailure, RestoreError, Restored,
    Snapshot, Stats,
};
pub use event::{Ancestor, Event, FieldRef, Kind, Value};
pub use incidents::{
    alert_tree_root, incident_id, kpi, process_tree_root, Action as IncidentAction, Changes,
    FiscalYear, Incident, IncidentConfig, Incidents, KpiFigures, Linked, ParseNameError,
    Status as IncidentStatus, TransitionError, MAX_NOTE_BYTES,
};
pub use rules::{parse_rules, Rule, Severity};

/// The default rule pack, one file per theme.
pub const DEFAULT_PACK: &[(&str, &str)] = &[
    ("process.yaml", include_str!("../rules/process.yaml")),
    ("files.yaml", include_str!("../rules/files.yaml")),
    ("network.yaml", include_str!("../rules/network.yaml")),
    ("fleet.yaml", include_str!("../rules/fleet.yaml")),
];

/// A rule file that does not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("{file}: {diagnostics}")]
    Parse {
        file: String,
        diagnostics: Diagnostics,
    },
    #[error("{file}:{position}: rule id `{id}` is already used in {first}")]
    DuplicateId {
        file: String,
        position: Position,
        id: String,
        first: String,
    },
}

/// Loads rule files (name, text) into one list, with ids unique across them.
pub fn load_pack<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<Rule>, PackError> {
    let mut rules: Vec<Rule> = Vec::new();
    let mut files_of: Vec<&str> = Vec::new();
    for (file, text) in files {
        let parsed = parse_rules(text).map_err(|diagnostics| PackError::Parse {
            file: file.to_owned(),
            diagnostics,
        })?;
        for rule in parsed {
            if let Some(i) = rules.iter().position(|r| r.id == rule.id) {
                return Err(PackError::DuplicateId {
                    file: file.to_owned(),
                    position: rule.position,
                    id: rule.id,
                    first: files_of[i].to_owned(),
                });
            }
            files_of.push(file);
            rules.push(rule);
        }
    }
    Ok(rules)
}

/// The embedded default rule pack.
pub fn default_pack() -> Result<Vec<Rule>, PackError> {
    load_pack(DEFAULT_PACK.iter().copied())
}
