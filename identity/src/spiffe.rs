//! SPIFFE-style identities: `spiffe://<trust-domain>/org/<org>/device/<device-id>`
//! for enrolled devices and `spiffe://<trust-domain>/org/<org>/user/<name>` for
//! `ztctl` and console users.
//!
//! The grammar is deliberately narrower than the SPIFFE ID specification, so
//! that an identity has exactly one spelling and can be compared as a string:
//!
//! * the scheme is exactly `spiffe://` (lowercase);
//! * the trust domain is one or more lowercase DNS labels (`[a-z0-9-]`, not
//!   starting or ending with `-`, at most 63 bytes each, 255 in all);
//! * there is no userinfo, port, query, fragment or percent-encoding;
//! * the path is exactly `/org/<org>/device/<id>` or `/org/<org>/user/<name>`,
//!   and every name is `[a-z0-9._-]`, non-empty, not `.` or `..`, and at most
//!   [`MAX_NAME_LEN`] bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The URI scheme and authority separator of every SPIFFE id.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Longest SPIFFE id accepted, in bytes (the SPIFFE specification's limit).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest DNS label in a trust domain, in bytes.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest organisation, device id or user name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a string is not an acceptable SPIFFE id, trust domain or name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("SPIFFE id is empty")]
    Empty,
    /// The input is longer than [`MAX_ID_LEN`].
    #[error("SPIFFE id is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// The input does not start with `spiffe://`.
    #[error("SPIFFE id must start with \"spiffe://\" (lowercase)")]
    WrongScheme,
    /// The authority contains `user@`.
    #[error("SPIFFE id must not contain userinfo ('@')")]
    UserInfo,
    /// The authority contains `:port`.
    #[error("SPIFFE id must not contain a port (':')")]
    Port,
    /// The input contains `?`.
    #[error("SPIFFE id must not contain a query ('?')")]
    Query,
    /// The input contains `#`.
    #[error("SPIFFE id must not contain a fragment ('#')")]
    Fragment,
    /// The input contains `%`.
    #[error("SPIFFE id must not contain percent-encoding ('%')")]
    PercentEncoded,
    /// The trust domain is empty (`spiffe:///...`).
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is not made of lowercase DNS labels.
    #[error("invalid trust domain {value:?}: {reason}")]
    InvalidTrustDomain {
        /// The rejected trust domain.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A path segment or name is empty (also a trailing or doubled `/`).
    #[error("{what} is empty")]
    EmptySegment {
        /// Which part of the id.
        what: &'static str,
    },
    /// A path segment or name is `.` or `..`.
    #[error("{what} {value:?} is a dot segment")]
    DotSegment {
        /// Which part of the id.
        what: &'static str,
        /// The rejected value.
        value: String,
    },
    /// A name contains a character outside `[a-z0-9._-]`.
    #[error("{what} {value:?} contains {ch:?}; only a-z, 0-9, '.', '_' and '-' are allowed")]
    InvalidCharacter {
        /// Which part of the id.
        what: &'static str,
        /// The rejected value.
        value: String,
        /// The first offending character.
        ch: char,
    },
    /// A name is longer than [`MAX_NAME_LEN`].
    #[error("{what} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong {
        /// Which part of the id.
        what: &'static str,
    },
    /// The path is not one of the two known shapes.
    #[error("path {path:?} is neither /org/<org>/device/<id> nor /org/<org>/user/<name>")]
    UnknownPath {
        /// The rejected path ("" when there is none).
        path: String,
    },
}

/// A trust domain such as `pref.example`: lowercase DNS labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates `name` as a trust domain.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name, e.g. `pref.example`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE id, `spiffe://<td>` (placed in the CA certificate).
    pub fn id_uri(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// Parses `spiffe://<td>` (no path) back into a trust domain.
    pub fn from_id_uri(uri: &str) -> Result<Self, SpiffeIdError> {
        let rest = uri
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        check_forbidden_characters(rest)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        check_authority(authority)?;
        Self::new(authority)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate_trust_domain(&s)?;
        Ok(Self(s))
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.0
    }
}

/// Who an identity names inside an organisation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// An enrolled endpoint: `/org/<org>/device/<device>`.
    Device {
        /// The organisation the device enrolled into.
        org: String,
        /// The device id, unique within the organisation.
        device: String,
    },
    /// A person using `ztctl` or the console: `/org/<org>/user/<name>`.
    User {
        /// The organisation the user belongs to.
        org: String,
        /// The user name, unique within the organisation.
        name: String,
    },
}

impl Subject {
    /// The organisation of the subject.
    pub fn org(&self) -> &str {
        match self {
            Subject::Device { org, .. } | Subject::User { org, .. } => org,
        }
    }

    fn validate(&self) -> Result<(), SpiffeIdError> {
        match self {
            Subject::Device { org, device } => {
                validate_name("organisation", org)?;
                validate_name("device id", device)
            }
            Subject::User { org, name } => {
                validate_name("organisation", org)?;
                validate_name("user name", name)
            }
        }
    }
}

/// A validated identity: trust domain plus [`Subject`].
///
/// Serialised (serde) and displayed as the URI string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    subject: Subject,
}

impl SpiffeId {
    /// Builds an id from parts, validating the names in `subject`.
    pub fn new(trust_domain: TrustDomain, subject: Subject) -> Result<Self, SpiffeIdError> {
        subject.validate()?;
        let id = Self {
            trust_domain,
            subject,
        };
        if id.to_string().len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(id)
    }

    /// `spiffe://<td>/org/<org>/device/<device>`.
    pub fn device(
        trust_domain: &TrustDomain,
        org: &str,
        device: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::new(
            trust_domain.clone(),
            Subject::Device {
                org: org.to_owned(),
                device: device.to_owned(),
            },
        )
    }

    /// `spiffe://<td>/org/<org>/user/<name>`.
    pub fn user(trust_domain: &TrustDomain, org: &str, name: &str) -> Result<Self, SpiffeIdError> {
        Self::new(
            trust_domain.clone(),
            Subject::User {
                org: org.to_owned(),
                name: name.to_owned(),
            },
        )
    }

    /// Parses and validates a SPIFFE id string.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        check_forbidden_characters(rest)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_authority(authority)?;
        let trust_domain = TrustDomain::new(authority)?;

        let Some(path_body) = path.strip_prefix('/') else {
            return Err(SpiffeIdError::UnknownPath {
                path: path.to_owned(),
            });
        };
        let segments: Vec<&str> = path_body.split('/').collect();
        for segment in &segments {
            check_segment("path segment", segment)?;
        }
        let subject = match segments.as_slice() {
            ["org", org, "device", device] => Subject::Device {
                org: (*org).to_owned(),
                device: (*device).to_owned(),
            },
            ["org", org, "user", name] => Subject::User {
                org: (*org).to_owned(),
                name: (*name).to_owned(),
            },
            _ => {
                return Err(SpiffeIdError::UnknownPath {
                    path: path.to_owned(),
                })
            }
        };
        Self::new(trust_domain, subject)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The subject (device or user).
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The organisation.
    pub fn org(&self) -> &str {
        self.subject.org()
    }

    /// The device id, when this identity names a device.
    pub fn device_id(&self) -> Option<&str> {
        match &self.subject {
            Subject::Device { device, .. } => Some(device),
            Subject::User { .. } => None,
        }
    }

    /// The user name, when this identity names a user.
    pub fn user_name(&self) -> Option<&str> {
        match &self.subject {
            Subject::User { name, .. } => Some(name),
            Subject::Device { .. } => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Subject::Device { org, device } => write!(
                f,
                "{SCHEME_PREFIX}{}/org/{org}/device/{device}",
                self.trust_domain
            ),
            Subject::User { org, name } => {
                write!(
                    f,
                    "{SCHEME_PREFIX}{}/org/{org}/user/{name}",
                    self.trust_domain
                )
            }
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

/// Checks an organisation, device id or user name: `[a-z0-9._-]`, non-empty,
/// not `.` or `..`, at most [`MAX_NAME_LEN`] bytes. `what` names the field in
/// the error ("organisation", "device id", ...).
pub fn validate_name(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    check_segment(what, value)
}

fn check_segment(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    if value.is_empty() {
        return Err(SpiffeIdError::EmptySegment { what });
    }
    if value == "." || value == ".." {
        return Err(SpiffeIdError::DotSegment {
            what,
            value: value.to_owned(),
        });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(SpiffeIdError::NameTooLong { what });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        return Err(SpiffeIdError::InvalidCharacter {
            what,
            value: value.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// Rejects query, fragment and percent-encoding anywhere after the scheme,
/// reporting whichever comes first.
fn check_forbidden_characters(rest: &str) -> Result<(), SpiffeIdError> {
    match rest.chars().find(|c| matches!(c, '?' | '#' | '%')) {
        Some('?') => Err(SpiffeIdError::Query),
        Some('#') => Err(SpiffeIdError::Fragment),
        Some(_) => Err(SpiffeIdError::PercentEncoded),
        None => Ok(()),
    }
}

fn check_authority(authority: &str) -> Result<(), SpiffeIdError> {
    if authority.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if authority.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if authority.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    Ok(())
}

fn validate_trust_domain(name: &str) -> Result<(), SpiffeIdError> {
    let invalid = |reason| SpiffeIdError::InvalidTrustDomain {
        value: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(invalid("longer than 255 bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid("empty DNS label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(invalid("DNS label longer than 63 bytes"));
        }
        if label.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid("must be lowercase"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid("only a-z, 0-9, '-' and '.' are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("a DNS label must not start or end with '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("pref.example").unwrap()
    }

    #[test]
    fn device_id_round_trips() {
        let s = "spiffe://pref.example/org/city-a/device/host-01.lan";
        let id = SpiffeId::parse(s).unwrap();
        assert_eq!(id.trust_domain().as_str(), "pref.example");
        assert_eq!(id.org(), "city-a");
        assert_eq!(id.device_id(), Some("host-01.lan"));
        assert_eq!(id.user_name(), None);
        assert_eq!(id.to_string(), s);
        assert_eq!(
            SpiffeId::device(&td(), "city-a", "host-01.lan").unwrap(),
            id
        );
        assert_eq!(s.parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn user_id_round_trips() {
        let s = "spiffe://pref.example/org/pref/user/alice_soc";
        let id = SpiffeId::parse(s).unwrap();
        assert_eq!(
            id.subject(),
            &Subject::User {
                org: "pref".into(),
                name: "alice_soc".into()
            }
        );
        assert_eq!(id.to_string(), s);
        assert_eq!(SpiffeId::user(&td(), "pref", "alice_soc").unwrap(), id);
    }

    #[test]
    fn serde_uses_the_uri_string_and_validates() {
        let id = SpiffeId::device(&td(), "o", "d").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://pref.example/org/o/device/d\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(
            serde_json::from_str::<SpiffeId>("\"spiffe://pref.example/org/O/device/d\"").is_err()
        );
    }

    #[test]
    fn trust_domain_id_uri_round_trips() {
        let td = td();
        assert_eq!(td.id_uri(), "spiffe://pref.example");
        assert_eq!(TrustDomain::from_id_uri(&td.id_uri()).unwrap(), td);
        assert_eq!(
            TrustDomain::from_id_uri("spiffe://pref.example/").unwrap(),
            td
        );
        assert!(TrustDomain::from_id_uri("spiffe://pref.example:443").is_err());
        assert!(TrustDomain::from_id_uri("https://pref.example").is_err());
    }

    #[test]
    fn rejects_each_malformed_form() {
        use SpiffeIdError as E;
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, E::Empty)),
            ("https://pref.example/org/o/device/d", |e| {
                matches!(e, E::WrongScheme)
            }),
            ("SPIFFE://pref.example/org/o/device/d", |e| {
                matches!(e, E::WrongScheme)
            }),
            ("spiffe:/pref.example/org/o/device/d", |e| {
                matches!(e, E::WrongScheme)
            }),
            ("spiffe:///org/o/device/d", |e| {
                matches!(e, E::EmptyTrustDomain)
            }),
            ("spiffe://Pref.example/org/o/device/d", |e| {
                matches!(
                    e,
                    E::InvalidTrustDomain {
                        reason: "must be lowercase",
                        ..
                    }
                )
            }),
            ("spiffe://pref..example/org/o/device/d", |e| {
                matches!(e, E::InvalidTrustDomain { .. })
            }),
            ("spiffe://-pref.example/org/o/device/d", |e| {
                matches!(e, E::InvalidTrustDomain { .. })
            }),
            ("spiffe://pref_x.example/org/o/device/d", |e| {
                matches!(e, E::InvalidTrustDomain { .. })
            }),
            ("spiffe://user@pref.example/org/o/device/d", |e| {
                matches!(e, E::UserInfo)
            }),
            ("spiffe://pref.example:8443/org/o/device/d", |e| {
                matches!(e, E::Port)
            }),
            ("spiffe://pref.example/org/o/device/d?x=1", |e| {
                matches!(e, E::Query)
            }),
            ("spiffe://pref.example/org/o/device/d#frag", |e| {
                matches!(e, E::Fragment)
            }),
            ("spiffe://pref.example/org/o/device/d%2e", |e| {
                matches!(e, E::PercentEncoded)
            }),
            ("spiffe://pref.example/org/%2e%2e/device/d", |e| {
                matches!(e, E::PercentEncoded)
            }),
            ("spiffe://pref.example/org/../device/d", |e| {
                matches!(e, E::DotSegment { .. })
            }),
            ("spiffe://pref.example/org/o/device/.", |e| {
                matches!(e, E::DotSegment { .. })
            }),
            ("spiffe://pref.example/org/o/device/d/", |e| {
                matches!(e, E::EmptySegment { .. })
            }),
            ("spiffe://pref.example/org//device/d", |e| {
                matches!(e, E::EmptySegment { .. })
            }),
            ("spiffe://pref.example/org/o/device/Host", |e| {
                matches!(e, E::InvalidCharacter { ch: 'H', .. })
            }),
            ("spiffe://pref.example/org/o/device/a b", |e| {
                matches!(e, E::InvalidCharacter { ch: ' ', .. })
            }),
            ("spiffe://pref.example/org/o/device/ü", |e| {
                matches!(e, E::InvalidCharacter { ch: 'ü', .. })
            }),
            ("spiffe://pref.example", |e| {
                matches!(e, E::UnknownPath { .. })
            }),
            ("spiffe://pref.example/", |e| {
                matches!(e, E::EmptySegment { .. })
            }),
            ("spiffe://pref.example/org/o", |e| {
                matches!(e, E::UnknownPath { .. })
            }),
            ("spiffe://pref.example/org/o/host/d", |e| {
                matches!(e, E::UnknownPath { .. })
            }),
            ("spiffe://pref.example/org/o/device/d/extra", |e| {
                matches!(e, E::UnknownPath { .. })
            }),
            ("spiffe://pref.example/ORG/o/device/d", |e| {
                matches!(e, E::InvalidCharacter { ch: 'O', .. })
            }),
        ];
        for (input, check) in cases {
            match SpiffeId::parse(input) {
                Ok(id) => panic!("{input:?} was accepted as {id}"),
                Err(e) => assert!(check(&e), "{input:?} gave unexpected error {e:?}"),
            }
        }
    }

    #[test]
    fn rejects_overlong_inputs() {
        let long_name = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            SpiffeId::device(&td(), "o", &long_name),
            Err(SpiffeIdError::NameTooLong { what: "device id" })
        );
        let huge = format!(
            "spiffe://pref.example/org/o/device/{}",
            "a".repeat(MAX_ID_LEN)
        );
        assert_eq!(SpiffeId::parse(&huge), Err(SpiffeIdError::TooLong));
        let label = "a".repeat(MAX_LABEL_LEN + 1);
        assert!(TrustDomain::new(&format!("{label}.example")).is_err());
    }

    #[test]
    fn constructors_validate_names() {
        assert!(matches!(
            SpiffeId::device(&td(), "", "d"),
            Err(SpiffeIdError::EmptySegment {
                what: "organisation"
            })
        ));
        assert!(matches!(
            SpiffeId::device(&td(), "o", "a/b"),
            Err(SpiffeIdError::InvalidCharacter { ch: '/', .. })
        ));
        assert!(matches!(
            SpiffeId::user(&td(), "o", ".."),
            Err(SpiffeIdError::DotSegment { .. })
        ));
        assert!(validate_name("organisation", "city-a.north_1").is_ok());
    }

    #[test]
    fn error_messages_are_clear() {
        let e = SpiffeId::parse("spiffe://pref.example/org/o/device/Host").unwrap_err();
        assert_eq!(
            e.to_string(),
            "path segment \"Host\" contains 'H'; only a-z, 0-9, '.', '_' and '-' are allowed"
        );
        let e = SpiffeId::parse("spiffe://pref.example:1/org/o/device/d").unwrap_err();
        assert_eq!(e.to_string(), "SPIFFE id must not contain a port (':')");
    }
}
