//! Reading YAML documents (saphyr's `MarkedYaml`) into typed values while
//! collecting positioned diagnostics: what the policy language's and the
//! detection rules' parsers share.

use std::collections::BTreeMap;

use saphyr::{LoadableYamlNode, MarkedYaml, YamlData};

use crate::{did_you_mean, Diagnostic, Diagnostics, Position};

pub type Node<'a> = MarkedYaml<'a>;

/// The documents of `text`; a syntax error is one diagnostic at its place.
pub fn load(text: &str) -> Result<Vec<Node<'_>>, Diagnostics> {
    MarkedYaml::load_from_str(text).map_err(|err| {
        let marker = err.marker();
        Diagnostics(vec![Diagnostic::new(
            Position {
                line: marker.line(),
                column: marker.col() + 1,
            },
            format!("not valid YAML: {}", err.info()),
        )])
    })
}

/// Where a node starts (line and column, 1-based).
pub fn position(node: &Node<'_>) -> Position {
    Position {
        line: node.span.start.line(),
        column: node.span.start.col() + 1,
    }
}

/// The fields of a mapping, by key, with the key's position.
pub struct Fields<'n, 'a> {
    /// Where the mapping starts.
    pub at: Position,
    pub entries: BTreeMap<String, (Position, &'n Node<'a>)>,
}

impl<'n, 'a> Fields<'n, 'a> {
    /// An empty mapping at `at`.
    pub fn empty(at: Position) -> Self {
        Self {
            at,
            entries: BTreeMap::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'n Node<'a>> {
        self.entries.get(key).map(|(_, n)| *n)
    }
}

/// The diagnostics of one document, and the checks every parser makes.
#[derive(Debug, Default)]
pub struct YamlReader {
    pub diagnostics: Vec<Diagnostic>,
}

impl YamlReader {
    pub fn error(&mut self, at: Position, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::new(at, message));
    }

    pub fn error_hint(
        &mut self,
        at: Position,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.diagnostics
            .push(Diagnostic::new(at, message).with_hint(hint));
    }

    /// A key that `what` does not take, with the nearest one it does.
    pub fn unknown_key(&mut self, at: Position, name: &str, what: &str, allowed: &[&str]) {
        let message = format!("unknown key `{name}` in {what}");
        match did_you_mean(name, allowed.iter().copied()) {
            Some(near) => self.error_hint(at, message, format!("did you mean `{near}`?")),
            None => self.error_hint(at, message, format!("{what} takes: {}", allowed.join(", "))),
        }
    }

    /// The fields of `node` when it is a mapping (`None` when it is not,
    /// with nothing reported: callers differ on what else they accept);
    /// keys outside `allowed` (`None`: any key) are reported and left out.
    pub fn fields<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        what: &str,
        allowed: Option<&[&str]>,
    ) -> Option<Fields<'n, 'a>> {
        let YamlData::Mapping(map) = &node.data else {
            return None;
        };
        let mut fields = Fields::empty(position(node));
        for (key, value) in map.iter() {
            let Some(name) = key.data.as_str() else {
                self.error(position(key), format!("keys of {what} must be text"));
                continue;
            };
            if let Some(allowed) = allowed {
                if !allowed.contains(&name) {
                    self.unknown_key(position(key), name, what, allowed);
                    continue;
                }
            }
            fields
                .entries
                .insert(name.to_owned(), (position(key), value));
        }
        Some(fields)
    }

    /// The field `key`, reported when missing.
    pub fn required<'n, 'a>(
        &mut self,
        fields: &Fields<'n, 'a>,
        key: &str,
        what: &str,
    ) -> Option<&'n Node<'a>> {
        let node = fields.get(key);
        if node.is_none() {
            self.error(fields.at, format!("{what} needs `{key}`"));
        }
        node
    }

    /// `text` as one of `options`, or a diagnostic at `node` naming the
    /// nearest.
    pub fn choose<T>(
        &mut self,
        node: &Node<'_>,
        text: &str,
        what: &str,
        options: &[&str],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let value = parse(text);
        if value.is_none() {
            self.error_hint(
                position(node),
                format!("{what} `{text}` is not one of {}", options.join(", ")),
                match did_you_mean(text, options.iter().copied()) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("write one of {}", options.join(", ")),
                },
            );
        }
        value
    }

    /// Everything reported, in the order of the text.
    pub fn into_diagnostics(mut self) -> Diagnostics {
        self.diagnostics.sort_by_key(|d| d.position);
        Diagnostics(self.diagnostics)
    }
}
