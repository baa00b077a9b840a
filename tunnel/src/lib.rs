//! The zero-trust tunnel's transport: TCP connections carried over QUIC with
//! mutual TLS, from a client agent to a gateway agent.
//!
//! On a staff PC the agent's kernel hook redirects a connection that policy
//! sends through the tunnel to the agent's local listener. The agent recovers
//! the original destination and the calling process and hands both to a
//! [`TunnelClient`], which carries the connection to the gateway agent in
//! front of the service:
//!
//! ```text
//!  caller ──TCP──▶ agent ══ QUIC stream ══▶ gateway ──TCP──▶ service
//!                  (TunnelClient)           (Gateway: mTLS peer + Authorizer)
//! ```
//!
//! * **One QUIC connection per gateway**, pooled and kept warm, and **one
//!   bidirectional stream per TCP connection** ([`client`]): a new tunnelled
//!   connection costs one round trip, not a handshake.
//! * **The stream starts with a header** ([`protocol`]): the client's
//!   [`OpenRequest`] (destination, user, process, its policy version), then
//!   the gateway's [`OpenAnswer`]. The client pipelines
//!   ([`TunnelClient::carry`]): the caller's first bytes follow the request
//!   at once, and the gateway reads them only after an allow (and after
//!   connecting to the service), discarding them on a refusal.
//! * **The gateway decides per stream** ([`gateway`]) with the device
//!   identity from the peer's certificate ([`PeerIdentity`]) and the request,
//!   through an [`Authorizer`] the agent supplies ([`authorizer`]), records
//!   every decision, and can re-evaluate live connections after a policy or
//!   revocation change ([`GatewayHandle::reevaluate`]).
//! * **Splicing** ([`splice`]) copies both directions with end-to-end
//!   backpressure, carries TCP half-close as QUIC FIN, and turns a reset on
//!   either side into a reset on the other.
//! * **Transport tuning** ([`config`]) for a LAN link with many streams.
//!
//! The TLS configurations come from `zt_identity::tls`
//! (`spiffe_client_config` for the client, verifying the gateway by SPIFFE
//! id; `server_config_with_revocation` for the gateway); this crate only
//! sets the ALPN ([`ALPN`]) and keeps 0-RTT off.
//!
//! Everything here must be created within a tokio runtime.

pub mod authorizer;
pub mod client;
pub mod config;
pub mod error;
pub mod gateway;
mod live;
pub mod peer;
pub mod protocol;
pub mod splice;

pub use authorizer::{Authorization, Authorizer, DecisionKind, GatewayDecision, PeerCheck};
pub use client::{ClientOptions, TunnelClient, TunnelStream};
pub use config::Tuning;
pub use error::TunnelError;
pub use gateway::{Gateway, GatewayHandle, GatewayOptions};
pub use peer::PeerIdentity;
pub use protocol::{DenyReason, ErrorCode, OpenAnswer, OpenRequest, ALPN, MAX_HEADER_LEN};
pub use splice::{reset, SpliceError, SpliceFailure, SpliceStats};
