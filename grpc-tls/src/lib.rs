//! gRPC over TLS with rustls configurations the caller builds (mutual TLS
//! with SPIFFE identities, pinned CAs, revocation-aware verifiers): tonic's
//! own TLS settings take only PEM files and cannot carry custom verifiers.
//!
//! - Server: [`TlsIncoming`] accepts TCP connections and completes each TLS
//!   handshake in its own task (a slow or silent client never holds up the
//!   others), then hands the streams to `Server::serve_with_incoming`.
//!   Handlers read the client's certificate chain with
//!   `tonic::Request::peer_certs()`.
//! - Client: [`channel`] connects a tonic `Channel` through rustls to an
//!   `https://host:port` URL, checking the server as the config says.
//!
//! Both sides speak HTTP/2 and set the `h2` ALPN protocol themselves.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A TLS handshake that takes longer than this is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake completed, waiting for the gRPC server.
const ACCEPTED_BACKLOG: usize = 128;

const H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsTransportError {
    #[error("invalid collector URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
}

/// The server side: TLS streams for `Server::serve_with_incoming`.
pub type TlsIncoming = ReceiverStream<std::io::Result<TlsStream<TcpStream>>>;

/// Accepts connections on `listener` and completes their TLS handshakes with
/// `config` (ALPN set to `h2`). Failed handshakes are logged and dropped;
/// the stream ends when the returned value is dropped.
pub fn serve_tls(listener: TcpListener, mut config: rustls::ServerConfig) -> TlsIncoming {
    config.alpn_protocols = vec![H2.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: wait, retry.
                        tracing::warn!(error = %err, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match handshake(&acceptor, tcp).await {
                    Ok(stream) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(err) => {
                        tracing::info!(%peer, error = %err, "TLS handshake refused");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> std::io::Result<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "handshake timed out",
        )),
    }
}

/// Where an `https://host:port` URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to.
    pub authority: String,
    /// The name the server's certificate must carry (DNS name or IP).
    pub server_name: ServerName<'static>,
}

/// Parses an `https://host[:port]` URL (port 443 when absent).
pub fn parse_url(url: &str) -> Result<Target, TlsTransportError> {
    let bad = |reason: &str| TlsTransportError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let port = uri.port_u16().unwrap_or(443);
    // IPv6 literals come bracketed in URLs; certificates hold the address.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(bare.to_owned())
        .map_err(|_| bad("the host is neither a DNS name nor an IP address"))?;
    Ok(Target {
        authority: format!("{host}:{port}"),
        server_name,
    })
}

/// A tonic endpoint for `url` whose connections go through rustls with
/// `config` (ALPN set to `h2`); adjust it (timeouts, keep-alive) and connect
/// it with [`connect`].
pub fn endpoint(
    url: &str,
    mut config: rustls::ClientConfig,
) -> Result<(Endpoint, TlsConnect), TlsTransportError> {
    let target = parse_url(url)?;
    config.alpn_protocols = vec![H2.to_vec()];
    // The connector does TLS itself; tonic sees plain HTTP/2.
    let endpoint = Endpoint::from_shared(format!("http://{}", target.authority)).map_err(|e| {
        TlsTransportError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        }
    })?;
    Ok((
        endpoint,
        TlsConnect {
            target,
            connector: TlsConnector::from(Arc::new(config)),
        },
    ))
}

/// Connects `endpoint` through `tls` (both from [`endpoint`]).
pub async fn connect(
    endpoint: Endpoint,
    tls: TlsConnect,
) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(tls).await
}

/// A `Channel` to `url` over TLS with `config`, connected now.
pub async fn channel(
    url: &str,
    config: rustls::ClientConfig,
) -> Result<Channel, TlsTransportError> {
    let (endpoint, tls) = endpoint(url, config)?;
    connect(endpoint, tls)
        .await
        .map_err(|source| TlsTransportError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// The connector: TCP to the URL's authority, then a TLS handshake that
/// checks the server against the URL's host name.
#[derive(Clone)]
pub struct TlsConnect {
    target: Target,
    connector: TlsConnector,
}

impl tower_service::Service<Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let target = self.target.clone();
        let connector = self.connector.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&target.authority).await?;
            let _ = tcp.set_nodelay(true);
            let tls = connector.connect(target.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
