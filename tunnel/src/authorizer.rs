//! The gateway's policy interface: what it asks, what it is told, and what
//! it records.
//!
//! The gateway knows nothing of policy itself. For every tunnelled
//! connection it asks an [`Authorizer`] (the agent's compiled policy) about
//! the verified peer device and the caller the client agent reports, and
//! sends every outcome to the agent as a [`GatewayDecision`].

use std::net::SocketAddr;
use std::time::SystemTime;

use crate::peer::PeerIdentity;
use crate::protocol::{DenyReason, OpenAnswer, OpenRequest};

/// The longest `detail` sent back to the client (records keep all of it).
const MAX_ANSWER_DETAIL: usize = 1024;

/// What the authorizer decided about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    /// Whether the connection may go through.
    pub allowed: bool,
    /// The rule that decided.
    pub rule_id: String,
    /// The policy version it decided with.
    pub policy_version: u64,
    /// Why not (`Unspecified` when allowed).
    pub reason: DenyReason,
    /// Human-readable detail.
    pub detail: String,
    /// Where to connect on allow; `None` → the request's destination. Lets
    /// a gateway publish a service under an address other than where it
    /// listens.
    pub target: Option<SocketAddr>,
    /// The published service the destination belongs to, if any (for the
    /// decision records; not sent to the client).
    pub service: Option<String>,
    /// On deny, the rules that came closest to allowing (for the decision
    /// records and `explain`; not sent to the client).
    pub nearest: Vec<String>,
}

impl Authorization {
    /// Allowed by `rule_id`, to the requested destination.
    pub fn allow(rule_id: impl Into<String>, policy_version: u64) -> Self {
        Self {
            allowed: true,
            rule_id: rule_id.into(),
            policy_version,
            reason: DenyReason::Unspecified,
            detail: String::new(),
            target: None,
            service: None,
            nearest: Vec::new(),
        }
    }

    /// Denied by `rule_id` for `reason`.
    pub fn deny(
        reason: DenyReason,
        rule_id: impl Into<String>,
        policy_version: u64,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            allowed: false,
            rule_id: rule_id.into(),
            policy_version,
            reason,
            detail: detail.into(),
            target: None,
            service: None,
            nearest: Vec::new(),
        }
    }

    /// Connect to `target` instead of the requested destination.
    pub fn with_target(mut self, target: SocketAddr) -> Self {
        self.target = Some(target);
        self
    }

    /// This allow turned into a refusal because the service did not accept.
    pub(crate) fn unreachable(self, detail: String) -> Self {
        Self {
            allowed: false,
            reason: DenyReason::ServiceUnreachable,
            detail,
            ..self
        }
    }

    /// The answer to send the client.
    pub(crate) fn answer(&self) -> OpenAnswer {
        let mut detail = self.detail.as_str();
        if detail.len() > MAX_ANSWER_DETAIL {
            let mut end = MAX_ANSWER_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail = &detail[..end];
        }
        OpenAnswer {
            allowed: self.allowed,
            rule_id: self.rule_id.clone(),
            policy_version: self.policy_version,
            reason: self.reason as i32,
            detail: detail.to_owned(),
        }
    }
}

/// Whether a peer may keep a connection at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerCheck {
    /// It may.
    Admit,
    /// It may not; its connection is closed (with
    /// [`ErrorCode::Revoked`](crate::ErrorCode::Revoked) if `reason` is
    /// [`DenyReason::Revoked`]).
    Refuse {
        /// Why.
        reason: DenyReason,
        /// Detail for logs and the connection close.
        detail: String,
    },
}

/// The gateway's policy: who may reach what.
///
/// Called on the connection's task for every stream, so it must answer from
/// memory (a compiled policy) without blocking.
pub trait Authorizer: Send + Sync + 'static {
    /// May `peer` (the verified device) open `request` (the user and process
    /// the client agent reports, and the destination)?
    fn authorize(&self, peer: &PeerIdentity, request: &OpenRequest) -> Authorization;

    /// May `peer` keep a connection at all? Checked when the connection is
    /// accepted and at every re-evaluation; the default admits every peer the
    /// TLS verifier accepted.
    fn check_peer(&self, _peer: &PeerIdentity) -> PeerCheck {
        PeerCheck::Admit
    }
}

impl<F> Authorizer for F
where
    F: Fn(&PeerIdentity, &OpenRequest) -> Authorization + Send + Sync + 'static,
{
    fn authorize(&self, peer: &PeerIdentity, request: &OpenRequest) -> Authorization {
        self(peer, request)
    }
}

/// What happened to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    /// Allowed and connected; bytes flow.
    Opened,
    /// Denied, or allowed but the service was unreachable.
    Refused,
    /// Was open, and a re-evaluation closed it.
    ClosedByPolicy,
}

/// A gateway decision, for the agent's decision records.
#[derive(Clone, Debug)]
pub struct GatewayDecision {
    /// The verified peer device.
    pub peer: PeerIdentity,
    /// The peer's UDP address.
    pub peer_addr: SocketAddr,
    /// What it asked for.
    pub request: OpenRequest,
    /// The decision (for `Refused` after a failed service connect: the
    /// allowing rule, with reason `ServiceUnreachable`).
    pub authorization: Authorization,
    /// When.
    pub at: SystemTime,
    /// What happened.
    pub kind: DecisionKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_carries_the_decision_and_a_bounded_detail() {
        let long = "é".repeat(MAX_ANSWER_DETAIL); // 2 bytes each
        let answer = Authorization::deny(DenyReason::NoService, "r-9", 12, long).answer();
        assert!(!answer.allowed);
        assert_eq!(answer.rule_id, "r-9");
        assert_eq!(answer.policy_version, 12);
        assert_eq!(answer.reason(), DenyReason::NoService);
        assert_eq!(answer.detail.len(), MAX_ANSWER_DETAIL);
        let allow = Authorization::allow("r-1", 3).answer();
        assert!(allow.allowed);
        assert_eq!(allow.reason(), DenyReason::Unspecified);
    }

    #[test]
    fn unreachable_keeps_the_allowing_rule() {
        let refused = Authorization::allow("r-1", 3)
            .with_target("127.0.0.1:1".parse().unwrap())
            .unreachable("connection refused".into());
        assert!(!refused.allowed);
        assert_eq!(refused.reason, DenyReason::ServiceUnreachable);
        assert_eq!(refused.rule_id, "r-1");
        assert_eq!(refused.detail, "connection refused");
    }
}
