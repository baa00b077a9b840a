//! Rules: the YAML format (see docs/detections.md), parsed with every problem reported
//! at its line and column, and compiled to typed matchers.

use std::{collections::HashSet, fmt, net::IpAddr};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use ipnet::IpNet;
use regex::Regex;
use saphyr::{Scalar, YamlData};
use serde::{Deserialize, Serialize};

use crate::{
    diag::{
        did_you_mean,
        yaml::{self, position, Fields, Node, YamlReader},
        Diagnostics, Position,
    },
    event::{Ancestor, Event, FieldRef, FieldType, Kind, Value},
};

/// How bad a detection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// Lowest first; the order [`Ord`] follows.
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// The name (`low`, `medium`, `high`, `critical`); same as [`name`](Self::name).
    pub fn as_str(self) -> &'static str {
        self.name()
    }

    pub fn from_name(name: &str) -> Option<Severity> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// `levels` steps up, capped at [`Severity::Critical`].
    pub fn raised(self, levels: u32) -> Severity {
        let i = (self as usize).saturating_add(levels as usize);
        Self::ALL[i.min(Self::ALL.len() - 1)]
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One detection rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub title: String,
    pub description: String,
    pub severity: Severity,
    /// ATT&CK technique ids, e.g. `T1059.004`.
    pub mitre: Vec<String>,
    pub logic: Logic,
    /// Cap on this rule's open state (sequences, threshold windows, absence
    /// entities); `None`: the engine's default.
    pub max_open: Option<usize>,
    pub fixtures: Vec<Fixture>,
    /// Where the rule starts in its file.
    pub position: Position,
}

impl Rule {
    /// Describes the shape of the rule's state, so that a snapshot taken
    /// under another definition of the rule is not restored into it.
    pub fn shape(&self) -> String {
        match &self.logic {
            Logic::Match(_) => "match".to_owned(),
            Logic::Sequence(s) => {
                let joins: Vec<&str> = s
                    .steps
                    .iter()
                    .map(|st| st.join.map_or("", |f| f.name()))
                    .collect();
                format!(
                    "sequence/{}/{}/{}",
                    s.by.name(),
                    s.steps.len(),
                    joins.join(",")
                )
            }
            Logic::Threshold(t) => {
                let distinct: Vec<&str> = t.distinct.iter().map(|f| f.name()).collect();
                format!("threshold/{}/{}", t.by.name(), distinct.join(","))
            }
            Logic::Absence(a) => format!("absence/{}", a.by.name()),
        }
    }
}

/// What makes a rule fire.
#[derive(Debug, Clone)]
pub enum Logic {
    Match(Matcher),
    Sequence(Sequence),
    Threshold(Threshold),
    Absence(Absence),
}

/// Kinds and a condition on one event.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub kinds: Vec<Kind>,
    pub cond: Cond,
}

impl Matcher {
    /// Whether the event matches; the caller has already checked the kind.
    #[inline]
    pub fn matches(&self, event: &Event) -> bool {
        self.cond.eval(event)
    }
}

/// Ordered steps for one entity within a span.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub by: By,
    pub within_ns: u64,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub matcher: Matcher,
    /// A field whose value joins the steps as well as the entity (e.g. the
    /// path written, then chmod-ed, then executed).
    pub join: Option<FieldRef>,
}

/// N matching events (or N distinct values) for one entity within a span.
#[derive(Debug, Clone)]
pub struct Threshold {
    pub matcher: Matcher,
    pub by: By,
    pub count: u32,
    pub distinct: Vec<FieldRef>,
    pub within_ns: u64,
}

/// An entity seen before stays silent for longer than a span.
#[derive(Debug, Clone)]
pub struct Absence {
    pub matcher: Matcher,
    pub by: By,
    pub for_ns: u64,
}

/// What state is kept per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum By {
    /// One process (host, pid, start time): unchanged across exec.
    Process,
    /// The process tree: the topmost ancestor below pid 1.
    ProcessTree,
    Host,
    /// The user (name, else uid) across the organisation's hosts.
    User,
}

impl By {
    pub fn name(self) -> &'static str {
        match self {
            By::Process => "process",
            By::ProcessTree => "process_tree",
            By::Host => "host",
            By::User => "user",
        }
    }

    const NAMES: &'static [&'static str] = &["process", "process_tree", "host", "user"];

    fn from_name(name: &str) -> Option<By> {
        match name {
            "process" => Some(By::Process),
            "process_tree" => Some(By::ProcessTree),
            "host" => Some(By::Host),
            "user" => Some(By::User),
            _ => None,
        }
    }
}

/// A condition on an event.
#[derive(Debug, Clone)]
pub enum Cond {
    Field(FieldRef, Pred),
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
}

impl Cond {
    #[inline]
    pub fn eval(&self, event: &Event) -> bool {
        match self {
            Cond::Field(field, pred) => pred.eval(event.field(field)),
            Cond::All(all) => all.iter().all(|c| c.eval(event)),
            Cond::Any(any) => any.iter().any(|c| c.eval(event)),
            Cond::Not(c) => !c.eval(event),
        }
    }
}

/// A predicate on a field's value. On a list, a leaf predicate holds when
/// it holds for any element; `not` negates the whole (no element matches).
#[derive(Debug, Clone)]
pub enum Pred {
    StrEq(Box<str>),
    StrIn(StrSet),
    Glob(GlobSet),
    Regex(Regex),
    Prefix(Vec<Box<str>>),
    Suffix(Vec<Box<str>>),
    Contains(Vec<Box<str>>),
    IntIn(Vec<i64>),
    Gt(i64),
    Lt(i64),
    MaskAny(i64),
    MaskAll(i64),
    IpIn(Vec<IpAddr>),
    Cidr(Vec<IpNet>),
    All(Vec<Pred>),
    Not(Box<Pred>),
}

/// A set of strings: a scan when small, a hash set when large.
#[derive(Debug, Clone)]
pub enum StrSet {
    Small(Vec<Box<str>>),
    Large(HashSet<Box<str>>),
}

impl StrSet {
    fn new(items: Vec<Box<str>>) -> Self {
        if items.len() <= 16 {
            StrSet::Small(items)
        } else {
            StrSet::Large(items.into_iter().collect())
        }
    }

    #[inline]
    fn contains(&self, s: &str) -> bool {
        match self {
            StrSet::Small(items) => items.iter().any(|i| &**i == s),
            StrSet::Large(items) => items.contains(s),
        }
    }
}

impl Pred {
    #[inline]
    pub fn eval(&self, value: Value<'_>) -> bool {
        match self {
            Pred::Not(p) => !p.eval(value),
            Pred::All(ps) => ps.iter().all(|p| p.eval(value)),
            _ => match value {
                Value::List(list) => list.iter().any(|s| self.leaf(Value::Str(s))),
                other => self.leaf(other),
            },
        }
    }

    #[inline]
    fn leaf(&self, value: Value<'_>) -> bool {
        match (self, value) {
            (Pred::StrEq(want), Value::Str(s)) => &**want == s,
            (Pred::StrIn(set), Value::Str(s)) => set.contains(s),
            (Pred::Glob(set), Value::Str(s)) => set.is_match(s),
            (Pred::Regex(re), Value::Str(s)) => re.is_match(s),
            (Pred::Prefix(ps), Value::Str(s)) => ps.iter().any(|p| s.starts_with(&**p)),
            (Pred::Suffix(ps), Value::Str(s)) => ps.iter().any(|p| s.ends_with(&**p)),
            (Pred::Contains(ps), Value::Str(s)) => ps.iter().any(|p| s.contains(&**p)),
            (Pred::IntIn(set), Value::Int(i)) => set.contains(&i),
            (Pred::Gt(n), Value::Int(i)) => i > *n,
            (Pred::Lt(n), Value::Int(i)) => i < *n,
            (Pred::MaskAny(m), Value::Int(i)) => i & m != 0,
            (Pred::MaskAll(m), Value::Int(i)) => i & m == *m,
            (Pred::IpIn(set), Value::Ip(ip)) => set.contains(&ip),
            (Pred::Cidr(nets), Value::Ip(ip)) => nets.iter().any(|n| n.contains(&ip)),
            _ => false,
        }
    }
}

/// Events that must (or must not) make the rule fire.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub expect_match: bool,
    pub steps: Vec<FixtureStep>,
    pub position: Position,
}

#[derive(Debug, Clone)]
pub enum FixtureStep {
    Event(Box<Event>),
    /// Move the engine's clock to this time (absence, expiry).
    Advance(u64),
}

/// Where fixture time starts: 2023-11-14T22:13:20Z.
pub const FIXTURE_EPOCH_NS: u64 = 1_700_000_000 * 1_000_000_000;

/// Parses a rule file: a mapping with `rules:`, a list of rules.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, Diagnostics> {
    let documents = yaml::load(text)?;
    let mut reader = Reader {
        text,
        yaml: YamlReader::default(),
    };
    let rules = match documents.as_slice() {
        [] => {
            reader.error(Position { line: 1, column: 1 }, "the rule file is empty");
            Vec::new()
        }
        [document] => reader.file(document),
        [_, second, ..] => {
            reader.error(
                position(second),
                "a rule file holds one YAML document; this is a second one",
            );
            Vec::new()
        }
    };
    if reader.diagnostics.is_empty() {
        Ok(rules)
    } else {
        Err(reader.yaml.into_diagnostics())
    }
}

/// The rule parser: the shared YAML reader, and the text (for messages
/// that quote it).
struct Reader<'t> {
    text: &'t str,
    yaml: YamlReader,
}

impl std::ops::Deref for Reader<'_> {
    type Target = YamlReader;
    fn deref(&self) -> &YamlReader {
        &self.yaml
    }
}

impl std::ops::DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut YamlReader {
        &mut self.yaml
    }
}

const FILE_KEYS: &[&str] = &["rules"];
const RULE_KEYS: &[&str] = &[
    "id",
    "title",
    "description",
    "severity",
    "mitre",
    "match",
    "sequence",
    "threshold",
    "absence",
    "max_open",
    "fixtures",
];
const LOGIC_KEYS: &[&str] = &["match", "sequence", "threshold", "absence"];
const MATCH_KEYS: &[&str] = &["kind", "where"];
const STEP_KEYS: &[&str] = &["kind", "where", "join"];
const SEQUENCE_KEYS: &[&str] = &["by", "within", "steps"];
const THRESHOLD_KEYS: &[&str] = &["kind", "where", "by", "count", "distinct", "within"];
const ABSENCE_KEYS: &[&str] = &["kind", "where", "by", "for"];
const FIXTURES_KEYS: &[&str] = &["match", "no_match"];
const OPS: &[&str] = &[
    "eq", "in", "glob", "regex", "prefix", "suffix", "contains", "gt", "lt", "mask_any",
    "mask_all", "cidr", "not",
];
const EVENT_KEYS: &[&str] = &[
    "kind",
    "at",
    "id",
    "org",
    "host",
    "pid",
    "ppid",
    "start",
    "ancestry",
    "exe",
    "argv",
    "user",
    "uid",
    "path",
    "new_path",
    "mode",
    "flags",
    "remote_ip",
    "remote_port",
    "dns_name",
    "verdict",
    "action",
    "rule",
    "reason",
    "peer_id",
    "enforcement_point",
];

impl Reader<'_> {
    /// A mapping whose keys are all in `allowed`.
    fn mapping<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        what: &str,
        allowed: Option<&[&str]>,
    ) -> Option<Fields<'n, 'a>> {
        let fields = self.fields(node, what, allowed);
        if fields.is_none() {
            self.error(
                position(node),
                format!("{what} must be a mapping (key: value)"),
            );
        }
        fields
    }

    fn string(&mut self, node: &Node<'_>, what: &str) -> Option<String> {
        match &node.data {
            YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
            YamlData::Value(Scalar::Integer(i)) => Some(i.to_string()),
            YamlData::Value(Scalar::FloatingPoint(f)) => Some(f.to_string()),
            _ => {
                self.error(position(node), format!("{what} must be text"));
                None
            }
        }
    }

    /// The node's text as written (for plain scalars).
    fn raw(&self, node: &Node<'_>) -> String {
        let start = node.span.start.index();
        let end = node.span.end.index();
        self.text
            .chars()
            .skip(start)
            .take(end.saturating_sub(start))
            .collect()
    }

    fn int(&mut self, node: &Node<'_>, what: &str) -> Option<i64> {
        let parsed = match &node.data {
            YamlData::Value(Scalar::Integer(i)) => {
                let raw = self.raw(node);
                let raw = raw.trim();
                if raw.len() > 1 && raw.starts_with('0') && raw.bytes().all(|b| b.is_ascii_digit())
                {
                    self.error_hint(
                        position(node),
                        format!("{what} `{raw}` has a leading 0: YAML reads it as decimal {i}"),
                        format!("write 0o{} for octal", &raw[1..]),
                    );
                    return None;
                }
                Some(*i)
            }
            YamlData::Value(Scalar::String(s)) => {
                let s = s.trim();
                if let Some(octal) = s.strip_prefix("0o") {
                    i64::from_str_radix(octal, 8).ok()
                } else if let Some(hex) = s.strip_prefix("0x") {
                    i64::from_str_radix(hex, 16).ok()
                } else {
                    s.parse().ok()
                }
            }
            _ => None,
        };
        if parsed.is_none() {
            self.error_hint(
                position(node),
                format!("{what} must be a whole number"),
                "e.g. 10, 0o4000 (octal) or 0x1ff",
            );
        }
        parsed
    }

    fn list<'n, 'a>(&mut self, node: &'n Node<'a>, what: &str) -> Vec<&'n Node<'a>> {
        match &node.data {
            YamlData::Sequence(items) => items.iter().collect(),
            _ => {
                self.error_hint(
                    position(node),
                    format!("{what} must be a list"),
                    "write `[a, b]` or one `- item` per line",
                );
                Vec::new()
            }
        }
    }

    /// One item or a list of items.
    fn one_or_list<'n, 'a>(&mut self, node: &'n Node<'a>) -> Vec<&'n Node<'a>> {
        match &node.data {
            YamlData::Sequence(items) => items.iter().collect(),
            _ => vec![node],
        }
    }

    fn choice<T>(
        &mut self,
        node: &Node<'_>,
        what: &str,
        options: &[&str],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let text = self.string(node, what)?;
        self.choose(node, &text, what, options, parse)
    }

    /// A time span: `500ms`, `30s`, `5m`, `1h`, `2d`, or a number of seconds.
    fn span(&mut self, node: &Node<'_>, what: &str) -> Option<u64> {
        let hint = "write a number and a unit: 500ms, 30s, 5m, 1h or 2d";
        let ns = match &node.data {
            YamlData::Value(Scalar::Integer(s)) if *s >= 0 => {
                (*s as u64).checked_mul(1_000_000_000)
            }
            YamlData::Value(Scalar::String(s)) => parse_span(s),
            _ => None,
        };
        match ns {
            Some(ns) => Some(ns),
            None => {
                self.error_hint(position(node), format!("{what} is not a time span"), hint);
                None
            }
        }
    }

    fn positive_span(&mut self, node: &Node<'_>, what: &str) -> Option<u64> {
        let ns = self.span(node, what)?;
        if ns == 0 {
            self.error(position(node), format!("{what} must be longer than 0"));
            return None;
        }
        Some(ns)
    }

    fn file(&mut self, root: &Node<'_>) -> Vec<Rule> {
        let Some(top) = self.mapping(root, "the rule file", Some(FILE_KEYS)) else {
            return Vec::new();
        };
        let Some(list) = self.required(&top, "rules", "the rule file") else {
            return Vec::new();
        };
        let mut rules: Vec<Rule> = Vec::new();
        for item in self.list(list, "rules") {
            if let Some(rule) = self.rule(item) {
                if rules.iter().any(|r| r.id == rule.id) {
                    self.error(
                        rule.position,
                        format!("rule id `{}` is used twice in this file", rule.id),
                    );
                    continue;
                }
                rules.push(rule);
            }
        }
        rules
    }

    fn rule(&mut self, node: &Node<'_>) -> Option<Rule> {
        let f = self.mapping(node, "a rule", Some(RULE_KEYS))?;
        let errors_before = self.diagnostics.len();
        let id = self.required(&f, "id", "a rule").and_then(|n| {
            let id = self.string(n, "a rule id")?;
            let valid = !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
            if !valid {
                self.error_hint(
                    position(n),
                    format!("rule id `{id}` is not valid"),
                    "use lower-case letters, digits and - _ . (at most 128)",
                );
                return None;
            }
            Some(id)
        });
        let title = self
            .required(&f, "title", "a rule")
            .and_then(|n| self.string(n, "title"));
        let description = f
            .get("description")
            .and_then(|n| self.string(n, "description"))
            .unwrap_or_default();
        let severity = self.required(&f, "severity", "a rule").and_then(|n| {
            self.choice(
                n,
                "severity",
                &["low", "medium", "high", "critical"],
                |s| match s {
                    "low" => Some(Severity::Low),
                    "medium" => Some(Severity::Medium),
                    "high" => Some(Severity::High),
                    "critical" => Some(Severity::Critical),
                    _ => None,
                },
            )
        });
        let mut mitre = Vec::new();
        if let Some(n) = self.required(&f, "mitre", "a rule") {
            for item in self.list(n, "mitre") {
                if let Some(t) = self.string(item, "an ATT&CK technique id") {
                    if !is_technique(&t) {
                        self.error_hint(
                            position(item),
                            format!("`{t}` is not an ATT&CK technique id"),
                            "write T and four digits, with an optional sub-technique: T1059 or T1059.004",
                        );
                        continue;
                    }
                    mitre.push(t);
                }
            }
            if mitre.is_empty() && self.diagnostics.len() == errors_before {
                self.error(position(n), "list at least one ATT&CK technique id");
            }
        }
        let max_open = f.get("max_open").and_then(|n| {
            let v = self.int(n, "max_open")?;
            if v < 1 {
                self.error(position(n), "max_open must be at least 1");
                return None;
            }
            Some(v as usize)
        });
        let present: Vec<&str> = LOGIC_KEYS
            .iter()
            .copied()
            .filter(|k| f.get(k).is_some())
            .collect();
        let logic = match present.as_slice() {
            [] => {
                self.error_hint(
                    f.at,
                    "a rule needs what makes it fire",
                    "add one of `match`, `sequence`, `threshold` or `absence`",
                );
                None
            }
            [one] => {
                let node = f.get(one)?;
                match *one {
                    "match" => self.matcher(node, "match", MATCH_KEYS).map(Logic::Match),
                    "sequence" => self.sequence(node).map(Logic::Sequence),
                    "threshold" => self.threshold(node).map(Logic::Threshold),
                    _ => self.absence(node).map(Logic::Absence),
                }
            }
            [_, second, ..] => {
                let at = f.entries.get(*second).map_or(f.at, |(p, _)| *p);
                self.error_hint(
                    at,
                    format!("a rule has exactly one of match, sequence, threshold, absence; this one also has `{second}`"),
                    "split it into two rules",
                );
                None
            }
        };
        let fixtures = match (f.get("fixtures"), &logic) {
            (Some(n), Some(logic)) => self.fixtures(n, logic),
            (None, _) => {
                self.error_hint(
                    f.at,
                    "a rule needs `fixtures`",
                    "add `fixtures:` with `match:` (events that must fire it) and `no_match:` (events that must not)",
                );
                Vec::new()
            }
            _ => Vec::new(),
        };
        if self.diagnostics.len() != errors_before {
            return None;
        }
        Some(Rule {
            id: id?,
            title: title?,
            description,
            severity: severity?,
            mitre,
            logic: logic?,
            max_open,
            fixtures,
            position: f.at,
        })
    }

    fn kinds(&mut self, node: &Node<'_>) -> Vec<Kind> {
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        let mut kinds = Vec::new();
        for item in self.one_or_list(node) {
            if let Some(kind) = self.choice(item, "kind", &names, Kind::from_name) {
                if kinds.contains(&kind) {
                    self.error(
                        position(item),
                        format!("kind `{}` is listed twice", kind.name()),
                    );
                    continue;
                }
                kinds.push(kind);
            }
        }
        kinds
    }

    fn matcher(&mut self, node: &Node<'_>, what: &str, keys: &[&str]) -> Option<Matcher> {
        let f = self.mapping(node, what, Some(keys))?;
        self.matcher_fields(&f, what)
    }

    fn matcher_fields(&mut self, f: &Fields<'_, '_>, what: &str) -> Option<Matcher> {
        let kinds = self
            .required(f, "kind", what)
            .map(|n| self.kinds(n))
            .unwrap_or_default();
        let cond = match f.get("where") {
            Some(n) => self.condition(n)?,
            None => Cond::All(Vec::new()),
        };
        if kinds.is_empty() {
            return None;
        }
        Some(Matcher { kinds, cond })
    }

    fn by(&mut self, f: &Fields<'_, '_>, what: &str) -> Option<By> {
        let n = self.required(f, "by", what)?;
        self.choice(n, "by", By::NAMES, By::from_name)
    }

    fn sequence(&mut self, node: &Node<'_>) -> Option<Sequence> {
        let f = self.mapping(node, "sequence", Some(SEQUENCE_KEYS))?;
        let by = self.by(&f, "sequence");
        let within = self
            .required(&f, "within", "sequence")
            .and_then(|n| self.positive_span(n, "within"));
        let steps_node = self.required(&f, "steps", "sequence")?;
        let items = self.list(steps_node, "steps");
        if items.len() < 2 {
            self.error_hint(
                position(steps_node),
                "a sequence needs at least two steps",
                "for one step, write `match:` instead",
            );
        }
        let mut steps = Vec::new();
        let mut join_positions = Vec::new();
        for item in items {
            let sf = self.mapping(item, "a step", Some(STEP_KEYS))?;
            let matcher = self.matcher_fields(&sf, "a step");
            let join = sf.get("join").and_then(|n| self.field(n));
            join_positions.push((position(item), sf.get("join").is_some()));
            if let Some(matcher) = matcher {
                steps.push(Step { matcher, join });
            }
        }
        let joined = join_positions.iter().filter(|(_, j)| *j).count();
        if joined != 0 && joined != join_positions.len() {
            if let Some((at, _)) = join_positions.iter().find(|(_, j)| !*j) {
                self.error_hint(
                    *at,
                    "some steps have `join` and this one has not",
                    "give every step a `join` field (they may differ, e.g. path then exe) or none",
                );
            }
        }
        Some(Sequence {
            by: by?,
            within_ns: within?,
            steps,
        })
    }

    fn threshold(&mut self, node: &Node<'_>) -> Option<Threshold> {
        let f = self.mapping(node, "threshold", Some(THRESHOLD_KEYS))?;
        let matcher = self.matcher_fields(&f, "threshold");
        let by = self.by(&f, "threshold");
        let count = self.required(&f, "count", "threshold").and_then(|n| {
            let c = self.int(n, "count")?;
            if !(2..=100_000).contains(&c) {
                self.error_hint(
                    position(n),
                    "count must be from 2 to 100000",
                    "for one event, write `match:` instead",
                );
                return None;
            }
            Some(c as u32)
        });
        let distinct = match f.get("distinct") {
            Some(n) => {
                let mut fields = Vec::new();
                for item in self.one_or_list(n) {
                    if let Some(field) = self.field(item) {
                        fields.push(field);
                    }
                }
                fields
            }
            None => Vec::new(),
        };
        let within = self
            .required(&f, "within", "threshold")
            .and_then(|n| self.positive_span(n, "within"));
        Some(Threshold {
            matcher: matcher?,
            by: by?,
            count: count?,
            distinct,
            within_ns: within?,
        })
    }

    fn absence(&mut self, node: &Node<'_>) -> Option<Absence> {
        let f = self.mapping(node, "absence", Some(ABSENCE_KEYS))?;
        let matcher = self.matcher_fields(&f, "absence");
        let by = self.by(&f, "absence");
        let for_ns = self
            .required(&f, "for", "absence")
            .and_then(|n| self.positive_span(n, "for"));
        Some(Absence {
            matcher: matcher?,
            by: by?,
            for_ns: for_ns?,
        })
    }

    fn field(&mut self, node: &Node<'_>) -> Option<FieldRef> {
        let name = self.string(node, "a field")?;
        let field = FieldRef::from_name(&name);
        if field.is_none() {
            let names = FieldRef::ALL.iter().map(|f| f.name());
            match did_you_mean(&name, names) {
                Some(near) => self.error_hint(
                    position(node),
                    format!("unknown field `{name}`"),
                    format!("did you mean `{near}`?"),
                ),
                None => self.error_hint(
                    position(node),
                    format!("unknown field `{name}`"),
                    "docs/detections.md lists the fields",
                ),
            }
        }
        field
    }

    /// A `where` mapping: every entry must hold. Keys are field names or
    /// `any` / `all` (lists of such mappings) or `not` (one such mapping).
    fn condition(&mut self, node: &Node<'_>) -> Option<Cond> {
        let YamlData::Mapping(map) = &node.data else {
            self.error_hint(
                position(node),
                "a condition must be a mapping",
                "write `field: value` or `field: {op: value}`, or `any:`/`all:`/`not:`",
            );
            return None;
        };
        let mut all = Vec::new();
        let mut ok = true;
        for (key, value) in map.iter() {
            let Some(name) = key.data.as_str() else {
                self.error(position(key), "keys of a condition must be text");
                ok = false;
                continue;
            };
            let cond = match name {
                "any" | "all" => {
                    let mut parts = Vec::new();
                    let items = self.list(value, name);
                    if items.is_empty() {
                        self.error(
                            position(value),
                            format!("`{name}` needs at least one condition"),
                        );
                    }
                    for item in items {
                        match self.condition(item) {
                            Some(c) => parts.push(c),
                            None => ok = false,
                        }
                    }
                    Some(if name == "any" {
                        Cond::Any(parts)
                    } else {
                        Cond::All(parts)
                    })
                }
                "not" => self.condition(value).map(|c| Cond::Not(Box::new(c))),
                field_name => match FieldRef::from_name(field_name) {
                    Some(field) => self.predicate(value, field).map(|p| Cond::Field(field, p)),
                    None => {
                        let mut names: Vec<&str> = FieldRef::ALL.iter().map(|f| f.name()).collect();
                        names.extend(["any", "all", "not"]);
                        self.unknown_key(
                            position(key),
                            field_name,
                            "a condition (fields and any, all, not)",
                            &names,
                        );
                        None
                    }
                },
            };
            match cond {
                Some(c) => all.push(c),
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        Some(if all.len() == 1 {
            all.pop()?
        } else {
            Cond::All(all)
        })
    }

    /// A predicate on `field`: a scalar (equal), a list (one of), or a
    /// mapping of operators (all must hold).
    fn predicate(&mut self, node: &Node<'_>, field: FieldRef) -> Option<Pred> {
        match &node.data {
            YamlData::Sequence(_) => self.op("in", node, field),
            YamlData::Mapping(map) => {
                let mut preds = Vec::new();
                let mut ok = true;
                for (key, value) in map.iter() {
                    let Some(op) = key.data.as_str() else {
                        self.error(position(key), "operators must be text");
                        ok = false;
                        continue;
                    };
                    if !OPS.contains(&op) {
                        self.unknown_key(position(key), op, "a predicate", OPS);
                        ok = false;
                        continue;
                    }
                    match self.op(op, value, field) {
                        Some(p) => preds.push(p),
                        None => ok = false,
                    }
                }
                if preds.is_empty() && ok {
                    self.error_hint(
                        position(node),
                        "an empty predicate",
                        format!("write an operator: {}", OPS.join(", ")),
                    );
                    return None;
                }
                if !ok {
                    return None;
                }
                Some(if preds.len() == 1 {
                    preds.pop()?
                } else {
                    Pred::All(preds)
                })
            }
            _ => self.op("eq", node, field),
        }
    }

    fn op(&mut self, op: &str, node: &Node<'_>, field: FieldRef) -> Option<Pred> {
        let ty = field.ty();
        let text_field = matches!(ty, FieldType::Str | FieldType::StrList);
        let wrong = |reader: &mut Self, fits: &str| {
            reader.error_hint(
                position(node),
                format!(
                    "`{op}` does not apply to `{}`, a {} field",
                    field.name(),
                    type_name(ty)
                ),
                format!("`{op}` applies to {fits} fields"),
            );
            None
        };
        match op {
            "not" => self.predicate(node, field).map(|p| Pred::Not(Box::new(p))),
            "eq" | "in" => {
                let items = if op == "in" {
                    self.list(node, "`in`")
                } else {
                    vec![node]
                };
                match ty {
                    FieldType::Str | FieldType::StrList => {
                        let mut set = Vec::new();
                        for item in items {
                            set.push(self.string(item, "a value")?.into_boxed_str());
                        }
                        Some(if set.len() == 1 && op == "eq" {
                            Pred::StrEq(set.pop()?)
                        } else {
                            Pred::StrIn(StrSet::new(set))
                        })
                    }
                    FieldType::Int => {
                        let mut set = Vec::new();
                        for item in items {
                            set.push(self.int(item, "a value")?);
                        }
                        Some(Pred::IntIn(set))
                    }
                    FieldType::Ip => {
                        let mut set = Vec::new();
                        for item in items {
                            let text = self.string(item, "an address")?;
                            match text.parse::<IpAddr>() {
                                Ok(ip) => set.push(ip),
                                Err(_) => {
                                    self.error_hint(
                                        position(item),
                                        format!("`{text}` is not an IP address"),
                                        "for a prefix, use `cidr`",
                                    );
                                    return None;
                                }
                            }
                        }
                        Some(Pred::IpIn(set))
                    }
                }
            }
            "glob" | "regex" | "prefix" | "suffix" | "contains" => {
                if !text_field {
                    return wrong(self, "text");
                }
                let mut patterns = Vec::new();
                for item in self.one_or_list(node) {
                    let text = self.string(item, "a pattern")?;
                    patterns.push((position(item), text));
                }
                match op {
                    "glob" => {
                        let mut builder = GlobSetBuilder::new();
                        for (at, p) in &patterns {
                            match GlobBuilder::new(p).literal_separator(true).build() {
                                Ok(glob) => {
                                    builder.add(glob);
                                }
                                Err(err) => {
                                    self.error_hint(
                                        *at,
                                        format!("`{p}` is not a glob: {}", err.kind()),
                                        "`*` matches within a path segment, `**` across, `?` one character, `{a,b}` either",
                                    );
                                    return None;
                                }
                            }
                        }
                        match builder.build() {
                            Ok(set) => Some(Pred::Glob(set)),
                            Err(err) => {
                                self.error(position(node), format!("globs do not build: {err}"));
                                None
                            }
                        }
                    }
                    "regex" => {
                        for (at, p) in &patterns {
                            if let Err(err) = Regex::new(p) {
                                let first = err.to_string();
                                let last = first.lines().last().unwrap_or("").to_owned();
                                self.error_hint(
                                    *at,
                                    format!("`{p}` is not a regular expression: {last}"),
                                    "the syntax is the `regex` crate's (RE2-like, no look-around)",
                                );
                                return None;
                            }
                        }
                        let joined = patterns
                            .iter()
                            .map(|(_, p)| format!("(?:{p})"))
                            .collect::<Vec<_>>()
                            .join("|");
                        match Regex::new(&joined) {
                            Ok(re) => Some(Pred::Regex(re)),
                            Err(err) => {
                                self.error(
                                    position(node),
                                    format!("regular expressions do not combine: {err}"),
                                );
                                None
                            }
                        }
                    }
                    _ => {
                        let items: Vec<Box<str>> = patterns
                            .into_iter()
                            .map(|(_, p)| p.into_boxed_str())
                            .collect();
                        Some(match op {
                            "prefix" => Pred::Prefix(items),
                            "suffix" => Pred::Suffix(items),
                            _ => Pred::Contains(items),
                        })
                    }
                }
            }
            "gt" | "lt" | "mask_any" | "mask_all" => {
                if ty != FieldType::Int {
                    return wrong(self, "number");
                }
                let n = self.int(node, "a number")?;
                Some(match op {
                    "gt" => Pred::Gt(n),
                    "lt" => Pred::Lt(n),
                    "mask_any" => Pred::MaskAny(n),
                    _ => Pred::MaskAll(n),
                })
            }
            "cidr" => {
                if ty != FieldType::Ip {
                    return wrong(self, "address");
                }
                let mut nets = Vec::new();
                for item in self.one_or_list(node) {
                    let text = self.string(item, "a prefix")?;
                    let net = text
                        .parse::<IpNet>()
                        .ok()
                        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
                    match net {
                        Some(net) => nets.push(net),
                        None => {
                            self.error_hint(
                                position(item),
                                format!("`{text}` is not an address prefix"),
                                "e.g. 10.0.0.0/8 or fd00::/8",
                            );
                            return None;
                        }
                    }
                }
                Some(Pred::Cidr(nets))
            }
            _ => None,
        }
    }

    fn fixtures(&mut self, node: &Node<'_>, logic: &Logic) -> Vec<Fixture> {
        let Some(f) = self.mapping(node, "fixtures", Some(FIXTURES_KEYS)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, expect_match) in [("match", true), ("no_match", false)] {
            let Some(list) = f.get(key) else {
                self.error_hint(
                    f.at,
                    format!("fixtures need `{key}`"),
                    "every rule shows events that fire it and events that must not",
                );
                continue;
            };
            let items = self.list(list, key);
            if items.is_empty() {
                self.error(position(list), format!("`{key}` needs at least one case"));
            }
            for item in items {
                let steps = match &item.data {
                    YamlData::Sequence(events) => {
                        let mut steps = Vec::new();
                        for (i, e) in events.iter().enumerate() {
                            if let Some(step) = self.fixture_step(e, i) {
                                steps.push(step);
                            }
                        }
                        steps
                    }
                    _ => self.fixture_step(item, 0).into_iter().collect(),
                };
                if steps.len() == 1 && !matches!(logic, Logic::Match(_)) && expect_match {
                    self.error_hint(
                        position(item),
                        "one event cannot fire a sequence, threshold or absence rule",
                        "write the case as a list of events: `- [ {kind: ...}, {kind: ...} ]`",
                    );
                }
                out.push(Fixture {
                    expect_match,
                    steps,
                    position: position(item),
                });
            }
        }
        out
    }

    fn fixture_step(&mut self, node: &Node<'_>, index: usize) -> Option<FixtureStep> {
        if let YamlData::Mapping(map) = &node.data {
            if map.len() == 1 {
                if let Some((k, v)) = map.iter().next() {
                    if k.data.as_str() == Some("advance") {
                        let ns = self.span(v, "advance")?;
                        return Some(FixtureStep::Advance(FIXTURE_EPOCH_NS + ns));
                    }
                }
            }
        }
        self.fixture_event(node, index)
            .map(|e| FixtureStep::Event(Box::new(e)))
    }

    fn fixture_event(&mut self, node: &Node<'_>, index: usize) -> Option<Event> {
        let f = self.mapping(node, "a fixture event", Some(EVENT_KEYS))?;
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        let kind = self
            .required(&f, "kind", "a fixture event")
            .and_then(|n| self.choice(n, "kind", &names, Kind::from_name))?;
        let at = match f.get("at") {
            Some(n) => self.span(n, "at")?,
            None => index as u64 * 1_000_000_000,
        };
        let mut e = Event::new(kind, "org1", "host1", FIXTURE_EPOCH_NS + at);
        e.id = index as u64 + 1;
        let mut ok = true;
        for (key, (_, n)) in &f.entries {
            let n: &Node<'_> = n;
            let done = match key.as_str() {
                "kind" | "at" => Some(()),
                "id" => self.int(n, "id").map(|v| e.id = v as u64),
                "org" => self.string(n, "org").map(|v| e.org = v),
                "host" => self.string(n, "host").map(|v| e.host = v),
                "pid" => self.int(n, "pid").map(|v| e.pid = v as u32),
                "ppid" => self.int(n, "ppid").map(|v| e.ppid = v as u32),
                "start" => self.int(n, "start").map(|v| e.start_ns = v as u64),
                "exe" => self.string(n, "exe").map(|v| e.exe = v),
                "user" => self.string(n, "user").map(|v| e.user = v),
                "uid" => self.int(n, "uid").map(|v| e.uid = Some(v as u32)),
                "path" => self.string(n, "path").map(|v| e.path = v),
                "new_path" => self.string(n, "new_path").map(|v| e.new_path = v),
                "mode" => self.int(n, "mode").map(|v| e.mode = Some(v as u32)),
                "flags" => self.int(n, "flags").map(|v| e.flags = Some(v as u32)),
                "remote_port" => self
                    .int(n, "remote_port")
                    .map(|v| e.remote_port = Some(v as u16)),
                "dns_name" => self.string(n, "dns_name").map(|v| e.dns_name = v),
                "verdict" => self.string(n, "verdict").map(|v| e.verdict = v),
                "action" => self.string(n, "action").map(|v| e.action = v),
                "rule" => self.string(n, "rule").map(|v| e.rule = v),
                "reason" => self.string(n, "reason").map(|v| e.reason = v),
                "peer_id" => self.string(n, "peer_id").map(|v| e.peer_id = v),
                "enforcement_point" => self
                    .string(n, "enforcement_point")
                    .map(|v| e.enforcement_point = v),
                "remote_ip" => self.string(n, "remote_ip").and_then(|v| match v.parse() {
                    Ok(ip) => {
                        e.remote_ip = Some(ip);
                        Some(())
                    }
                    Err(_) => {
                        self.error(position(n), format!("`{v}` is not an IP address"));
                        None
                    }
                }),
                "argv" => {
                    let mut argv = Vec::new();
                    for item in self.list(n, "argv") {
                        argv.push(self.string(item, "an argument")?);
                    }
                    e.argv = argv;
                    Some(())
                }
                "ancestry" => {
                    let mut ancestry = Vec::new();
                    for (i, item) in self.list(n, "ancestry").into_iter().enumerate() {
                        match &item.data {
                            YamlData::Mapping(_) => {
                                let af =
                                    self.mapping(item, "an ancestor", Some(&["pid", "exe"]))?;
                                let pid =
                                    af.get("pid").and_then(|p| self.int(p, "pid")).unwrap_or(0);
                                let exe = af
                                    .get("exe")
                                    .and_then(|x| self.string(x, "exe"))
                                    .unwrap_or_default();
                                ancestry.push(Ancestor {
                                    pid: pid as u32,
                                    exe,
                                });
                            }
                            _ => {
                                let exe = self.string(item, "an ancestor's exe")?;
                                ancestry.push(Ancestor {
                                    pid: 1000 - i as u32,
                                    exe,
                                });
                            }
                        }
                    }
                    e.ancestry = ancestry;
                    Some(())
                }
                _ => None,
            };
            ok &= done.is_some();
        }
        if f.get("ppid").is_none() {
            if let Some(parent) = e.ancestry.first() {
                e.ppid = parent.pid;
            }
        }
        ok.then_some(e)
    }
}

fn type_name(ty: FieldType) -> &'static str {
    match ty {
        FieldType::Str => "text",
        FieldType::Int => "number",
        FieldType::Ip => "address",
        FieldType::StrList => "list-of-text",
    }
}

fn is_technique(t: &str) -> bool {
    let b = t.as_bytes();
    let base = b.len() >= 5 && b[0] == b'T' && b[1..5].iter().all(u8::is_ascii_digit);
    match b.len() {
        5 => base,
        9 => base && b[5] == b'.' && b[6..9].iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// `500ms`, `30s`, `5m`, `1h`, `2d` → nanoseconds.
pub fn parse_span(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_ns: u64 = match unit.trim() {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return None,
    };
    number.checked_mul(unit_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(parse_span("30s"), Some(30_000_000_000));
        assert_eq!(parse_span("5m"), Some(300_000_000_000));
        assert_eq!(parse_span("500ms"), Some(500_000_000));
        assert_eq!(parse_span("5"), None);
        assert_eq!(parse_span("5w"), None);
    }

    #[test]
    fn techniques() {
        assert!(is_technique("T1059"));
        assert!(is_technique("T1059.004"));
        assert!(!is_technique("T105"));
        assert!(!is_technique("t1059"));
        assert!(!is_technique("T1059.4"));
    }
}
