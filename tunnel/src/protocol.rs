//! What travels on a tunnel stream before the tunnelled bytes.
//!
//! Every tunnelled TCP connection is one bidirectional QUIC stream. The
//! client speaks first:
//!
//! ```text
//! client → gateway   u32 big-endian length ‖ OpenRequest (protobuf)
//!                    then raw TCP bytes, at once (pipelined) or after the answer
//! gateway → client   u32 big-endian length ‖ OpenAnswer  (protobuf)
//! then, on allow     raw TCP bytes both ways, FIN = TCP half-close
//!       on deny      the gateway finishes its side and stops reading,
//!                    discarding whatever the client had sent
//! ```
//!
//! **Pipelining.** The client may send the caller's bytes right behind the
//! request, without waiting for the answer (`TunnelClient::carry`), so the
//! caller's first byte pays no round trip for it. The gateway reads nothing
//! past the request until it has authorized it *and* connected to the
//! service; until then the bytes wait in the stream's receive buffer, bounded
//! by QUIC flow control (the gateway's stream and connection windows), and
//! the client sends only a first flight of them before the answer
//! (`ClientOptions::max_bytes_before_answer`). On a refusal the gateway
//! stops the stream (`STOP_SENDING`), which discards them: a denied caller
//! still gets no byte to the far network. The answer is also where the
//! gateway reports that the service is unreachable. The client reads the
//! answer before any byte coming back, and resets the caller's connection on
//! a refusal. A client may also wait for the answer before sending anything
//! (`TunnelClient::open`); the gateway cannot tell the difference.
//!
//! A header is at most [`MAX_HEADER_LEN`] bytes. The length is read first and
//! checked before anything is allocated, so a peer cannot make the gateway
//! buffer more than that; a longer or undecodable header is a protocol error
//! and the stream is reset with [`ErrorCode::Protocol`].
//!
//! Protobuf (prost, messages declared here rather than generated from a
//! `.proto` file) gives forward compatibility: a newer agent may add fields
//! and an older gateway ignores them. Incompatible changes get a new [`ALPN`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use prost::Message;
use quinn::VarInt;

use crate::error::TunnelError;

/// The ALPN protocol both ends must offer; a peer speaking anything else fails
/// the handshake instead of misreading the stream.
pub const ALPN: &[u8] = b"zt-tunnel/1";

/// The largest header (request or answer, without its length prefix) either
/// end accepts.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

/// The first message on every stream, client → gateway: where the caller
/// wants to go, and who the caller is on the client device.
///
/// The gateway learns the device from the TLS client certificate; everything
/// here is what the client agent *asserts* about the user and the process,
/// which the gateway's policy may use because it trusts the enrolled agent.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct OpenRequest {
    /// The client's id for this TCP connection (shows up in both sides'
    /// decision records, so they can be joined).
    #[prost(string, tag = "1")]
    pub connection_id: String,
    /// The original destination address: 4 bytes (IPv4) or 16 bytes (IPv6).
    #[prost(bytes = "vec", tag = "2")]
    pub destination_ip: Vec<u8>,
    /// The original destination port (1–65535).
    #[prost(uint32, tag = "3")]
    pub destination_port: u32,
    /// The calling process's uid.
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    /// The calling process's user name.
    #[prost(string, tag = "5")]
    pub user: String,
    /// The calling process's pid.
    #[prost(uint32, tag = "6")]
    pub pid: u32,
    /// The calling process's executable path.
    #[prost(string, tag = "7")]
    pub exe: String,
    /// SHA-256 of the executable, lowercase hex.
    #[prost(string, tag = "8")]
    pub exe_sha256: String,
    /// The version of the policy the client decided with.
    #[prost(uint64, tag = "9")]
    pub policy_version: u64,
    /// The client rule that sent this connection into the tunnel.
    #[prost(string, tag = "10")]
    pub rule_id: String,
}

impl OpenRequest {
    /// The original destination. Fails on an address that is neither 4 nor 16
    /// bytes, or a port outside 1–65535.
    pub fn destination(&self) -> Result<SocketAddr, TunnelError> {
        let ip = match self.destination_ip.len() {
            4 => {
                let mut octets = [0u8; 4];
                octets.copy_from_slice(&self.destination_ip);
                IpAddr::V4(Ipv4Addr::from(octets))
            }
            16 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&self.destination_ip);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            n => {
                return Err(TunnelError::Protocol(format!(
                    "destination address is {n} bytes, expected 4 or 16"
                )))
            }
        };
        let port = u16::try_from(self.destination_port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| {
                TunnelError::Protocol(format!(
                    "destination port {} is not in 1-65535",
                    self.destination_port
                ))
            })?;
        Ok(SocketAddr::new(ip, port))
    }

    /// Sets `destination_ip` and `destination_port`.
    pub fn set_destination(&mut self, destination: SocketAddr) {
        self.destination_ip = match destination.ip() {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        self.destination_port = u32::from(destination.port());
    }

    /// A request for `destination` with every other field empty.
    pub fn to(destination: SocketAddr) -> Self {
        let mut request = Self::default();
        request.set_destination(destination);
        request
    }
}

/// The gateway's answer, gateway → client. On allow the tunnelled bytes
/// follow; on deny the gateway's side of the stream ends right after it.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct OpenAnswer {
    /// Whether the connection was allowed (and the service connected).
    #[prost(bool, tag = "1")]
    pub allowed: bool,
    /// The gateway rule that decided.
    #[prost(string, tag = "2")]
    pub rule_id: String,
    /// The gateway's policy version.
    #[prost(uint64, tag = "3")]
    pub policy_version: u64,
    /// Why it was denied ([`DenyReason`]); `Unspecified` on allow.
    #[prost(enumeration = "DenyReason", tag = "4")]
    pub reason: i32,
    /// Human-readable detail for logs (never shown to the peer's user as-is).
    #[prost(string, tag = "5")]
    pub detail: String,
}

/// Why a gateway refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DenyReason {
    /// No reason given (also what an unknown value from a newer peer reads as).
    Unspecified = 0,
    /// A policy rule denies it.
    Policy = 1,
    /// The gateway publishes no service at that destination.
    NoService = 2,
    /// The calling device is revoked.
    Revoked = 3,
    /// Allowed, but the service did not accept the connection.
    ServiceUnreachable = 4,
    /// The gateway has no usable policy and fails closed.
    FailClosed = 5,
    /// The request was malformed (e.g. a bad destination).
    BadRequest = 6,
}

impl DenyReason {
    /// A short stable name for logs and records.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Unspecified => "unspecified",
            DenyReason::Policy => "policy",
            DenyReason::NoService => "no_service",
            DenyReason::Revoked => "revoked",
            DenyReason::ServiceUnreachable => "service_unreachable",
            DenyReason::FailClosed => "fail_closed",
            DenyReason::BadRequest => "bad_request",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Application error codes carried in QUIC `RESET_STREAM`, `STOP_SENDING` and
/// `CONNECTION_CLOSE`, so either end can tell why the other gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// Nothing went wrong (closing an idle connection, stopping a stream
    /// that is no longer read after it ended).
    Done = 0,
    /// The TCP connection at the other end was reset or failed; the receiver
    /// resets its own TCP connection in turn.
    TcpReset = 1,
    /// A policy re-evaluation closed the connection.
    PolicyClosed = 2,
    /// The stream header was malformed or too large.
    Protocol = 3,
    /// The gateway denied the request and reads no more of the stream.
    Denied = 4,
    /// The peer's device is revoked (connection close).
    Revoked = 5,
    /// The endpoint is shutting down (connection close).
    Shutdown = 6,
    /// An unexpected local failure.
    Internal = 7,
}

impl ErrorCode {
    /// The code as QUIC sends it.
    pub fn varint(self) -> VarInt {
        VarInt::from_u32(self as u32)
    }

    /// The code `raw` stands for, if it is one of ours.
    pub fn from_varint(raw: VarInt) -> Option<Self> {
        Some(match raw.into_inner() {
            0 => ErrorCode::Done,
            1 => ErrorCode::TcpReset,
            2 => ErrorCode::PolicyClosed,
            3 => ErrorCode::Protocol,
            4 => ErrorCode::Denied,
            5 => ErrorCode::Revoked,
            6 => ErrorCode::Shutdown,
            7 => ErrorCode::Internal,
            _ => return None,
        })
    }

    /// Describes a raw code from the peer, ours or not.
    pub fn describe(raw: VarInt) -> String {
        match Self::from_varint(raw) {
            Some(code) => code.to_string(),
            None => format!("unknown error code {raw}"),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::Done => "done",
            ErrorCode::TcpReset => "TCP connection reset",
            ErrorCode::PolicyClosed => "closed by policy",
            ErrorCode::Protocol => "tunnel protocol error",
            ErrorCode::Denied => "denied",
            ErrorCode::Revoked => "device revoked",
            ErrorCode::Shutdown => "shutting down",
            ErrorCode::Internal => "internal error",
        })
    }
}

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    /// The declared length exceeds [`MAX_HEADER_LEN`].
    #[error("header of {declared} bytes exceeds the limit of {MAX_HEADER_LEN}")]
    TooLarge { declared: u64 },
    /// The stream ended inside the header.
    #[error("stream ended inside the header")]
    Truncated,
    /// The bytes are not the expected message.
    #[error("header does not decode: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// Reading the stream failed (reset, connection lost).
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
}

impl HeaderError {
    /// Whether the peer sent something it should not have (as opposed to the
    /// stream or connection failing underneath).
    pub(crate) fn is_peer_fault(&self) -> bool {
        !matches!(self, HeaderError::Read(_))
    }
}

/// Encodes `message` with its length prefix. Fails if it exceeds
/// [`MAX_HEADER_LEN`]: better to refuse locally than to be reset by the peer.
pub fn encode_header<M: Message>(message: &M) -> Result<Vec<u8>, TunnelError> {
    let len = message.encoded_len();
    if len > MAX_HEADER_LEN {
        return Err(TunnelError::Protocol(format!(
            "header of {len} bytes exceeds the limit of {MAX_HEADER_LEN}"
        )));
    }
    let mut out = Vec::with_capacity(4 + len);
    // `len` ≤ MAX_HEADER_LEN, so the cast is lossless.
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message
        .encode(&mut out)
        .map_err(|e| TunnelError::Protocol(format!("encoding header: {e}")))?;
    Ok(out)
}

/// Reads one length-prefixed message, reading nothing past it (the bytes
/// after the header belong to the tunnelled connection).
pub(crate) async fn read_header<M: Message + Default>(
    recv: &mut quinn::RecvStream,
) -> Result<M, HeaderError> {
    let mut prefix = [0u8; 4];
    read_exact(recv, &mut prefix).await?;
    let declared = u32::from_be_bytes(prefix);
    let len = usize::try_from(declared)
        .ok()
        .filter(|len| *len <= MAX_HEADER_LEN)
        .ok_or(HeaderError::TooLarge {
            declared: u64::from(declared),
        })?;
    let mut body = vec![0u8; len];
    read_exact(recv, &mut body).await?;
    Ok(M::decode(body.as_slice())?)
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), HeaderError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => HeaderError::Truncated,
        quinn::ReadExactError::ReadError(e) => HeaderError::Read(e),
    })
}

/// Decodes a header from a byte slice (length prefix included): the inverse
/// of [`encode_header`], for tests and fuzzing without a QUIC stream.
pub fn decode_header<M: Message + Default>(bytes: &[u8]) -> Result<M, TunnelError> {
    let (prefix, body) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| TunnelError::Protocol("header shorter than its length prefix".into()))?;
    let declared = u32::from_be_bytes(*prefix) as usize;
    if declared > MAX_HEADER_LEN {
        return Err(TunnelError::Protocol(format!(
            "header of {declared} bytes exceeds the limit of {MAX_HEADER_LEN}"
        )));
    }
    let body = body
        .get(..declared)
        .ok_or_else(|| TunnelError::Protocol("header truncated".into()))?;
    M::decode(body).map_err(|e| TunnelError::Protocol(format!("header does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OpenRequest {
        OpenRequest {
            connection_id: "c-1".into(),
            uid: 1000,
            user: "alice".into(),
            pid: 4242,
            exe: "/usr/bin/curl".into(),
            exe_sha256: "ab".repeat(32),
            policy_version: 7,
            rule_id: "tunnel-intranet".into(),
            ..OpenRequest::to("10.1.2.3:443".parse().unwrap())
        }
    }

    #[test]
    fn request_round_trips() {
        let request = sample();
        let bytes = encode_header(&request).unwrap();
        assert_eq!(decode_header::<OpenRequest>(&bytes).unwrap(), request);
        assert_eq!(
            request.destination().unwrap(),
            "10.1.2.3:443".parse().unwrap()
        );
    }

    #[test]
    fn ipv6_destination() {
        let addr: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        assert_eq!(OpenRequest::to(addr).destination().unwrap(), addr);
    }

    #[test]
    fn bad_destinations_are_errors() {
        let mut request = sample();
        request.destination_ip = vec![1, 2, 3];
        assert!(request.destination().is_err());
        let mut request = sample();
        request.destination_port = 0;
        assert!(request.destination().is_err());
        request.destination_port = 70_000;
        assert!(request.destination().is_err());
    }

    #[test]
    fn answer_reason_round_trips_and_unknown_reads_as_unspecified() {
        let answer = OpenAnswer {
            allowed: false,
            reason: DenyReason::Revoked as i32,
            ..Default::default()
        };
        let bytes = encode_header(&answer).unwrap();
        let back: OpenAnswer = decode_header(&bytes).unwrap();
        assert_eq!(back.reason(), DenyReason::Revoked);
        let future = OpenAnswer {
            reason: 99,
            ..Default::default()
        };
        assert_eq!(future.reason(), DenyReason::Unspecified);
    }

    #[test]
    fn oversized_headers_are_refused_both_ways() {
        let mut request = sample();
        request.exe = "x".repeat(MAX_HEADER_LEN);
        assert!(encode_header(&request).is_err());
        let mut bytes = (MAX_HEADER_LEN as u32 + 1).to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0u8, 32));
        assert!(decode_header::<OpenRequest>(&bytes).is_err());
    }

    #[test]
    fn garbage_does_not_decode() {
        let mut bytes = 8u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff; 8]);
        assert!(decode_header::<OpenRequest>(&bytes).is_err());
        assert!(decode_header::<OpenRequest>(&[0, 0]).is_err());
    }

    #[test]
    fn error_codes_round_trip() {
        for code in [
            ErrorCode::Done,
            ErrorCode::TcpReset,
            ErrorCode::PolicyClosed,
            ErrorCode::Protocol,
            ErrorCode::Denied,
            ErrorCode::Revoked,
            ErrorCode::Shutdown,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_varint(code.varint()), Some(code));
        }
        assert_eq!(ErrorCode::from_varint(VarInt::from_u32(1000)), None);
    }
}
