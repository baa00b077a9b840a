//! Copying a TCP connection to a QUIC stream and back.
//!
//! Both ends of the tunnel do the same thing: the client agent splices the
//! caller's (redirected) TCP connection, the gateway the connection it made to
//! the service. The two directions run concurrently in one task:
//!
//! * **TCP → QUIC** reads into a buffer and hands what it read to quinn as
//!   one chunk (no further copy). A TCP EOF finishes the QUIC send side (FIN).
//! * **QUIC → TCP** writes what quinn has received to the socket: a lone
//!   chunk as it is, several (a transfer in full flow) gathered into one
//!   buffer first, so one `write(2)` carries many packets. The end of the
//!   QUIC stream shuts down the TCP write side (FIN), leaving the other
//!   direction open: half-close carries through the tunnel both ways.
//!
//! **Memory.** Both directions wait for data holding no buffer, so an idle
//! tunnelled connection costs only its task and quinn's stream state. Read
//! sizes start at 16 KiB and double while reads fill them, up to
//! [`Tuning::copy_buffer`]: interactive connections stay small, a bulk
//! transfer soon moves large pieces (fewer system calls and fewer hand-offs
//! to the QUIC connection task, where a bulk tunnel spends its CPU).
//!
//! **Backpressure** is end to end and needs no buffer of our own beyond one
//! read: while the receiving TCP socket is full, we stop reading the QUIC
//! stream, so its flow-control credit is not extended and the sender's
//! `write_chunk` waits, so the sender stops reading its TCP socket, whose
//! window closes towards the original sender.
//!
//! **The first bytes of a new connection** skip a wake-up: tokio reads from
//! or writes to a socket only once epoll has said it may, which on a socket
//! just accepted or connected is one wake-up of tokio's I/O driver away. So
//! the gateway connects to the service with a plain non-blocking
//! `connect(2)` (complete on return on loopback) and every write to TCP is
//! first tried straight on the socket; a pipelined client reads the caller's
//! first flight straight off the socket too.
//!
//! **Failures abort both directions.** A TCP error or reset on one end resets
//! the QUIC stream ([`ErrorCode::TcpReset`]); the far end, seeing the reset,
//! resets its own TCP connection (`SO_LINGER` 0, so the peer gets an RST
//! rather than a FIN that could pass for a complete response). The same
//! happens when the stream is aborted locally (policy re-evaluation) or the
//! QUIC connection is lost.
//!
//! [`Tuning::copy_buffer`]: crate::Tuning::copy_buffer

use std::borrow::Borrow;
use std::future::pending;
use std::future::Future as _;
use std::io::{self, Read as _};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::{BufMut as _, Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::AsyncWriteExt as _;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use crate::protocol::ErrorCode;

/// Bytes carried by a tunnelled connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// Read from the TCP connection and sent into the tunnel.
    pub tcp_to_tunnel: u64,
    /// Received from the tunnel and written to the TCP connection.
    pub tunnel_to_tcp: u64,
}

/// Why a tunnelled connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SpliceFailure {
    /// The local TCP connection failed (reset by its peer, write to a closed
    /// socket, ...).
    #[error("TCP connection failed: {0}")]
    Tcp(#[source] io::Error),
    /// The tunnel peer reset the stream (its TCP side failed, or it closed the
    /// connection by policy).
    #[error("tunnel peer reset the stream: {}", ErrorCode::describe(*.0))]
    PeerReset(VarInt),
    /// The tunnel peer stopped reading the stream.
    #[error("tunnel peer stopped reading: {}", ErrorCode::describe(*.0))]
    PeerStopped(VarInt),
    /// The QUIC connection was closed or lost.
    #[error("QUIC connection lost: {0}")]
    Connection(#[source] quinn::ConnectionError),
    /// Aborted locally (policy re-evaluation).
    #[error("aborted locally: {0}")]
    Aborted(ErrorCode),
}

/// A tunnelled connection that ended abnormally, with what it had carried.
#[derive(Debug, thiserror::Error)]
#[error("tunnelled connection aborted after {} bytes out and {} bytes in: {failure}",
    stats.tcp_to_tunnel, stats.tunnel_to_tcp)]
pub struct SpliceError {
    /// Why.
    #[source]
    pub failure: SpliceFailure,
    /// What was carried until then.
    pub stats: SpliceStats,
}

impl From<SpliceError> for io::Error {
    fn from(error: SpliceError) -> Self {
        let kind = match &error.failure {
            SpliceFailure::Tcp(e) => e.kind(),
            SpliceFailure::PeerReset(_) | SpliceFailure::PeerStopped(_) => {
                io::ErrorKind::ConnectionReset
            }
            SpliceFailure::Connection(_) | SpliceFailure::Aborted(_) => {
                io::ErrorKind::ConnectionAborted
            }
        };
        io::Error::new(kind, error)
    }
}

/// Resets a TCP connection: the peer gets an RST instead of a FIN. For a
/// caller whose tunnel was denied, so its connect fails visibly rather than
/// looking like an empty response.
pub fn reset(tcp: TcpStream) {
    zero_linger(&tcp);
    drop(tcp);
}

fn zero_linger(tcp: &TcpStream) {
    if let Err(e) = tcp.set_zero_linger() {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; closing with FIN");
    }
}

/// A tunnelled connection's QUIC stream and TCP connection, both reset if
/// dropped before they have ended: a splice cancelled half-way (its task
/// aborted) must not pass for a complete exchange, as it would if quinn
/// finished the dropped stream and the socket closed with a FIN.
pub(crate) struct Ends<T: Borrow<TcpStream>> {
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    pub(crate) tcp: T,
    ended: bool,
}

impl<T: Borrow<TcpStream>> Ends<T> {
    pub(crate) fn new(send: SendStream, recv: RecvStream, tcp: T) -> Self {
        Self {
            send,
            recv,
            tcp,
            ended: false,
        }
    }

    /// Both directions ended cleanly: dropping now just closes.
    pub(crate) fn ended(mut self) {
        self.ended = true;
    }

    /// Gives up on the stream (both ways, with `code`); the TCP connection
    /// is left to its owner.
    pub(crate) fn abandon(mut self, code: ErrorCode) {
        self.reset_stream(code);
    }

    /// Resets the stream (with `code`) and the TCP connection.
    pub(crate) fn reset(mut self, code: ErrorCode) {
        self.reset_stream(code);
        zero_linger(self.tcp.borrow());
    }

    fn reset_stream(&mut self, code: ErrorCode) {
        // Either may already be closed (finished, reset by the peer, or the
        // connection is gone); that is fine.
        let _ = self.send.reset(code.varint());
        let _ = self.recv.stop(code.varint());
        self.ended = true;
    }
}

impl<T: Borrow<TcpStream>> Drop for Ends<T> {
    fn drop(&mut self) {
        if !self.ended {
            self.reset_stream(ErrorCode::TcpReset);
            zero_linger(self.tcp.borrow());
        }
    }
}

/// Connects to `target` with `TCP_NODELAY` set. When the handshake is
/// already complete as `connect(2)` returns (always on loopback, where the
/// kernel answers the SYN within the call), the connection is ready at
/// once; tokio's own connect would first wait for epoll to report it
/// writable, one wake-up of its I/O driver on the first byte's path.
pub(crate) async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let tcp = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if tcp.peer_addr().is_err() {
        // Still connecting: wait for the outcome.
        tcp.writable().await?;
    }
    match tcp.take_error()? {
        Some(e) => Err(e),
        None => Ok(tcp),
    }
}

/// Writes all of `bytes` to `tcp`: straight to the socket first, then
/// through tokio for whatever did not fit. Straight, because tokio writes
/// to a socket only once epoll has reported it writable, and on a new
/// connection (the gateway's to the service) that report is a wake-up of
/// its I/O driver away, on the first byte's path.
async fn write_all(tcp: &mut WriteHalf<'_>, bytes: &[u8]) -> io::Result<()> {
    let sent = match SockRef::from(tcp.as_ref()).send_with_flags(bytes, libc::MSG_NOSIGNAL) {
        Ok(sent) => sent,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            0
        }
        Err(e) => return Err(e),
    };
    match bytes.get(sent..) {
        Some(rest) if !rest.is_empty() => tcp.write_all(rest).await,
        _ => Ok(()),
    }
}

/// Splices `tcp` with the QUIC stream `send`/`recv` until both directions
/// have ended (Ok) or one of them failed or `abort` fired (Err, with both
/// the stream and the TCP connection reset).
pub(crate) async fn splice(
    send: SendStream,
    recv: RecvStream,
    tcp: TcpStream,
    mut abort: Option<oneshot::Receiver<ErrorCode>>,
    copy_buffer: usize,
) -> Result<SpliceStats, SpliceError> {
    // Interactive protocols (SSH, RDP) must not wait for Nagle; bulk
    // transfers lose nothing, as we write whole chunks.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY failed");
    }
    let mut ends = Ends::new(send, recv, tcp);
    let mut stats = SpliceStats::default();
    let outcome = {
        let (mut tcp_read, mut tcp_write) = ends.tcp.split();
        let mut up = pin!(tcp_to_quic(
            &mut tcp_read,
            &mut ends.send,
            copy_buffer,
            &mut stats.tcp_to_tunnel,
            None
        ));
        let mut down = pin!(quic_to_tcp(
            &mut ends.recv,
            &mut tcp_write,
            copy_buffer,
            &mut stats.tunnel_to_tcp
        ));
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                result = &mut up, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err(failure) => break Err(failure),
                },
                result = &mut down, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err(failure) => break Err(failure),
                },
                code = aborted(&mut abort) => break Err(SpliceFailure::Aborted(code)),
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    match outcome {
        Ok(()) => {
            ends.ended();
            Ok(stats)
        }
        Err(failure) => {
            ends.reset(match failure {
                SpliceFailure::Aborted(code) => code,
                _ => ErrorCode::TcpReset,
            });
            Err(SpliceError { failure, stats })
        }
    }
}

/// Resolves with the abort code once one is sent; never, if the sender is
/// dropped (the stream was deregistered) or there is none.
pub(crate) async fn aborted(abort: &mut Option<oneshot::Receiver<ErrorCode>>) -> ErrorCode {
    if let Some(receiver) = abort.as_mut() {
        if let Ok(code) = receiver.await {
            return code;
        }
        // Never poll a completed receiver again.
        *abort = None;
    }
    pending().await
}

/// Where a connection's copy buffers start (see [`ReadSize`]).
const INITIAL_COPY_BUFFER: usize = 16 * 1024;

/// How much to read at a time: starts at [`INITIAL_COPY_BUFFER`] and doubles
/// each time a read fills it, up to [`Tuning::copy_buffer`].
///
/// [`Tuning::copy_buffer`]: crate::Tuning::copy_buffer
struct ReadSize {
    current: usize,
    max: usize,
}

impl ReadSize {
    fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            current: INITIAL_COPY_BUFFER.min(max),
            max,
        }
    }

    fn get(&self) -> usize {
        self.current
    }

    /// Notes a read of `n` bytes; true if the size grew.
    fn record(&mut self, n: usize) -> bool {
        if n >= self.current && self.current < self.max {
            self.current = (self.current * 2).min(self.max);
            true
        } else {
            false
        }
    }
}

/// The caller → tunnel direction of a pipelined connection (one whose bytes
/// start flowing before the gateway has answered): the request header to
/// send first, and how far the direction may run ahead of the answer.
pub(crate) struct Pipelined<'a> {
    /// The request, sent before any byte of the TCP connection, in the
    /// same chunk as the first bytes if they are already there.
    pub(crate) header: &'a [u8],
    /// Opened once the gateway has allowed the connection.
    pub(crate) gate: &'a Gate,
    /// The most bytes sent before the gate opens.
    pub(crate) limit: u64,
}

/// Holds a pipelined connection's caller → tunnel direction at
/// [`Pipelined::limit`] until the gateway's answer allows it on. Shared
/// between the two directions of one connection, in one task.
pub(crate) struct Gate {
    open: AtomicBool,
    opened: Notify,
}

impl Gate {
    pub(crate) fn closed() -> Self {
        Self {
            open: AtomicBool::new(false),
            opened: Notify::new(),
        }
    }

    pub(crate) fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_waiters();
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        // Made before the check, so an `open` in between is not missed.
        let opened = self.opened.notified();
        if !self.is_open() {
            opened.await;
        }
    }
}

pub(crate) async fn tcp_to_quic(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream,
    copy_buffer: usize,
    count: &mut u64,
    pipelined: Option<Pipelined<'_>>,
) -> Result<(), SpliceFailure> {
    let mut size = ReadSize::new(copy_buffer);
    let mut buffer = BytesMut::new();
    // Until the gate opens, how many more bytes may go; `None`: no limit.
    let room = |count: u64| match &pipelined {
        Some(p) if !p.gate.is_open() => Some(p.limit.saturating_sub(count)),
        _ => None,
    };
    if let Some(p) = &pipelined {
        let max = room(*count).map_or(size.get(), |room| room.min(size.get() as u64) as usize);
        let (request, read) = first_flight(tcp, p.header, max);
        // Counted before it goes: what is read is the caller's, sent or not.
        if let Ok(Some(n)) = read {
            *count += n as u64;
            size.record(n);
        }
        // The request goes in any case: the gateway's answer is what the
        // connection is reported with.
        send.write_chunk(request).await.map_err(write_failure)?;
        if read.map_err(SpliceFailure::Tcp)? == Some(0) {
            let _ = send.finish();
            return Ok(());
        }
    }
    loop {
        if let (Some(0), Some(p)) = (room(*count), &pipelined) {
            // As much as may go before the answer has gone.
            p.gate.wait().await;
        }
        // Wait for data before taking a buffer: a quiet connection holds none.
        tcp.readable().await.map_err(SpliceFailure::Tcp)?;
        // Read into the spare capacity a previous read left, if there is a
        // fair amount of it; otherwise reserve afresh, which reuses the
        // allocation if quinn has released every chunk split off it (they
        // were acknowledged) and allocates a new one if not.
        if buffer.capacity() < size.get() / 4 {
            buffer.reserve(size.get());
        }
        let read = match room(*count) {
            Some(room) => tcp.try_read_buf(&mut (&mut buffer).limit(room as usize)),
            None => tcp.try_read_buf(&mut buffer),
        };
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(SpliceFailure::Tcp(e)),
        };
        if n == 0 {
            // Fails only if the stream was already reset, which surfaces
            // through the other direction.
            let _ = send.finish();
            return Ok(());
        }
        *count += n as u64;
        size.record(n);
        let chunk = buffer.split().freeze();
        if n < size.get() / 4 {
            // Not streaming: let the rest of the buffer go with the chunk.
            buffer = BytesMut::new();
        }
        // The chunk goes to quinn as it is: no copy.
        send.write_chunk(chunk).await.map_err(write_failure)?;
    }
}

/// The request header followed by whatever the caller has already sent, up
/// to `max` bytes, read without waiting: on a warm connection the caller's
/// first bytes then travel in the request's packet. Read straight from the
/// socket, because tokio reads only once epoll has reported it readable, and
/// on a connection just accepted that report may still be a wake-up of its
/// I/O driver away. Returns the chunk to send and what the read gave:
/// `Some(0)` for the end of the caller's data, `None` for nothing yet.
fn first_flight(
    tcp: &ReadHalf<'_>,
    header: &[u8],
    max: usize,
) -> (Bytes, io::Result<Option<usize>>) {
    // Read on the stack and copied out at the size read: a heap buffer of
    // the full size would be touched (zeroed) for every connection, and
    // kept until the peer acknowledged the chunk.
    let mut first = [0u8; INITIAL_COPY_BUFFER];
    let read = match first.get_mut(..max.min(INITIAL_COPY_BUFFER)) {
        Some([]) | None => Ok(None),
        Some(first) => match (&*SockRef::from(tcp.as_ref())).read(first) {
            Ok(n) => Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        },
    };
    let n = match &read {
        Ok(Some(n)) => *n,
        _ => 0,
    };
    let mut chunk = BytesMut::with_capacity(header.len() + n);
    chunk.extend_from_slice(header);
    chunk.extend_from_slice(&first[..n]);
    (chunk.freeze(), read)
}

pub(crate) async fn quic_to_tcp(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    copy_buffer: usize,
    count: &mut u64,
) -> Result<(), SpliceFailure> {
    let mut size = ReadSize::new(copy_buffer);
    let mut batch = BytesMut::new();
    loop {
        // Wait for data holding no buffer: quinn hands over the chunk it
        // received (about one packet's payload), without a copy.
        let first = match recv.read_chunk(size.get(), true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => {
                tcp.shutdown().await.map_err(SpliceFailure::Tcp)?;
                return Ok(());
            }
            Err(e) => return Err(read_failure(e)),
        };
        let n = match received_chunk(recv, size.get() - first.len()).await {
            // One packet's worth, nothing more yet (interactive traffic):
            // write it as it is, and hold no buffer while quiet.
            None => {
                batch = BytesMut::new();
                write_all(tcp, &first).await.map_err(SpliceFailure::Tcp)?;
                first.len()
            }
            // More has arrived (a transfer in full flow): gather what is
            // there, up to the read size, so one write(2) carries it all.
            Some(mut next) => {
                batch.reserve(size.get());
                batch.extend_from_slice(&first);
                let mut end = None;
                loop {
                    match next {
                        Ok(Some(chunk)) => batch.extend_from_slice(&chunk),
                        // The stream ended or failed: deliver what came
                        // before, then act on it.
                        ended => {
                            end = Some(ended);
                            break;
                        }
                    }
                    let room = size.get().saturating_sub(batch.len());
                    if room == 0 {
                        break;
                    }
                    match received_chunk(recv, room).await {
                        Some(read) => next = read,
                        None => break,
                    }
                }
                write_all(tcp, &batch).await.map_err(SpliceFailure::Tcp)?;
                let n = batch.len();
                batch.clear();
                match end {
                    Some(Ok(None)) => {
                        *count += n as u64;
                        tcp.shutdown().await.map_err(SpliceFailure::Tcp)?;
                        return Ok(());
                    }
                    Some(Err(e)) => {
                        *count += n as u64;
                        return Err(read_failure(e));
                    }
                    _ => n,
                }
            }
        };
        *count += n as u64;
        size.record(n);
    }
}

/// A chunk quinn has already received, if any, without waiting for one:
/// `None` if nothing is there yet, else what a read returns.
async fn received_chunk(
    recv: &mut RecvStream,
    max: usize,
) -> Option<Result<Option<Bytes>, ReadError>> {
    if max == 0 {
        return None;
    }
    // Polled once with this task's context; `read_chunk` is cancel-safe, so
    // dropping it when pending loses nothing (at worst a spurious wake-up).
    std::future::poll_fn(|cx| {
        let read = pin!(recv.read_chunk(max, true));
        Poll::Ready(match read.poll(cx) {
            Poll::Ready(result) => Some(result.map(|chunk| chunk.map(|chunk| chunk.bytes))),
            Poll::Pending => None,
        })
    })
    .await
}

fn write_failure(error: WriteError) -> SpliceFailure {
    match error {
        WriteError::Stopped(code) => SpliceFailure::PeerStopped(code),
        WriteError::ConnectionLost(e) => SpliceFailure::Connection(e),
        // We never write after finishing, and 0-RTT is off.
        WriteError::ClosedStream | WriteError::ZeroRttRejected => {
            SpliceFailure::Aborted(ErrorCode::Internal)
        }
    }
}

fn read_failure(error: ReadError) -> SpliceFailure {
    match error {
        ReadError::Reset(code) => SpliceFailure::PeerReset(code),
        ReadError::ConnectionLost(e) => SpliceFailure::Connection(e),
        ReadError::ClosedStream | ReadError::IllegalOrderedRead | ReadError::ZeroRttRejected => {
            SpliceFailure::Aborted(ErrorCode::Internal)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_grows_only_while_reads_fill_it() {
        let mut size = ReadSize::new(64 * 1024);
        assert_eq!(size.get(), INITIAL_COPY_BUFFER);
        assert!(!size.record(100), "a short read keeps the size");
        assert!(size.record(INITIAL_COPY_BUFFER));
        assert_eq!(size.get(), 32 * 1024);
        assert!(size.record(32 * 1024));
        assert!(!size.record(64 * 1024), "capped at the maximum");
        assert_eq!(size.get(), 64 * 1024);
        assert_eq!(ReadSize::new(1000).get(), 1000, "a small maximum wins");
    }

    #[test]
    fn splice_errors_map_to_io_kinds() {
        let error = |failure| SpliceError {
            failure,
            stats: SpliceStats::default(),
        };
        let kind = |failure| io::Error::from(error(failure)).kind();
        assert_eq!(
            kind(SpliceFailure::PeerReset(ErrorCode::TcpReset.varint())),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!(
            kind(SpliceFailure::Aborted(ErrorCode::PolicyClosed)),
            io::ErrorKind::ConnectionAborted
        );
        assert_eq!(
            kind(SpliceFailure::Tcp(io::ErrorKind::BrokenPipe.into())),
            io::ErrorKind::BrokenPipe
        );
    }
}
