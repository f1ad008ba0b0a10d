//! The gRPC listener's accept loop ([`Incoming`]), handed to tonic in place of its own
//! `TcpIncoming`. Besides accepting (with `TCP_NODELAY`) it keeps an idle broker idle and
//! reachable when clients misbehave or the process runs out of file descriptors:
//!
//! - **Accept errors back off.** tonic retries a failed accept at once; when the process is out
//!   of file descriptors (`EMFILE`, `ENFILE`) or kernel memory (`ENOBUFS`, `ENOMEM`) the pending
//!   connection stays in the backlog, so every retry fails again and the loop burns a core. Here a
//!   failed accept waits ([`Backoff`]: 5 ms, doubling to 1 s) and the first error of a burst is
//!   logged, then the burst's end. Errors that concern one connection (reset or aborted before it
//!   was accepted) are retried at once.
//! - **At most `max_connections` open connections.** A connection over the bound is closed as soon
//!   as it is accepted, counted, and logged at most every [`OVER_LIMIT_LOG_EVERY`].
//! - **A handshake deadline.** A plaintext connection that has not sent the HTTP/2 client preface
//!   (the 24-byte magic and its first SETTINGS frame) within `handshake_timeout` is closed. Under
//!   TLS ([`with_tls`]) the TLS handshake has `handshake_timeout`, and then the preface has it
//!   again, read from the decrypted stream: a client that completes TLS and then sends nothing
//!   holds its slot no longer than one that never starts TLS.
//!
//! It imports nothing of the crate: the configuration fills its [`ListenerSettings`], and
//! `server::App::serve` builds the stream.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;

/// Default bound on open gRPC connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default time a new connection has to complete its HTTP/2 preface (or TLS handshake).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest request header list the broker serves, in bytes as HTTP/2 counts them.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// How much larger than the broker's own limit the header list limit given to HTTP/2 is (see
/// [`ListenerSettings::h2_max_header_list_size`]).
pub const H2_HEADER_LIST_FACTOR: u32 = 4;
/// First wait after a failed accept.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(5);
/// Longest wait after failed accepts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Connections closed for being over `max_connections` are logged at most this often.
pub const OVER_LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Connections accepted in one poll before the stream yields to other tasks.
const ACCEPTS_PER_POLL: usize = 64;

/// What one listener and its connections may cost (config `max_connections`,
/// `handshake_timeout`, `max_header_list_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerSettings {
    /// Open connections at most; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time a connection has to send the HTTP/2 preface (plaintext) or finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Largest request header list served, in bytes as HTTP/2 counts them (each field's name
    /// and value plus 32); a larger one is answered RESOURCE_EXHAUSTED on its own stream.
    pub max_header_list_size: u32,
}

impl Default for ListenerSettings {
    fn default() -> Self {
        ListenerSettings {
            max_connections: default_max_connections(open_file_limit()),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
        }
    }
}

impl ListenerSettings {
    /// The header list limit HTTP/2 (the `h2` crate, through hyper and tonic) is given:
    /// [`H2_HEADER_LIST_FACTOR`] times the broker's own. h2 guards the connection with limits
    /// derived from it — a header block that is still arriving once the list is over the limit
    /// must fit in that many bytes per CONTINUATION frame, at most four times the limit is
    /// decoded, at most `limit / frame size` CONTINUATION frames (5 or more) — and past those it
    /// sends GOAWAY, ending every stream of the connection. Were it given the broker's limit, any
    /// list over it sent in full 16 KiB frames would end the connection. Given more, a list up to
    /// it reaches the broker, which answers that stream alone (gRPC RESOURCE_EXHAUSTED,
    /// `HeaderListTooLarge`); up to its guards h2 answers the stream alone with HTTP 431.
    pub fn h2_max_header_list_size(&self) -> u32 {
        self.max_header_list_size.saturating_mul(H2_HEADER_LIST_FACTOR)
    }
}

/// The warning for plaintext gRPC served on an address other hosts can reach, if it applies.
pub fn plaintext_warning(addr: SocketAddr, tls: bool) -> Option<String> {
    (!tls && !addr.ip().is_loopback()).then(|| {
        format!(
            "serving PLAINTEXT gRPC on non-loopback address {addr} (--insecure): bearer tokens and key material cross the network unencrypted; turn TLS on (--tls auto or --tls-cert/--tls-key) or bind to 127.0.0.1"
        )
    })
}

/// Descriptors kept free beside the gRPC connections when the bound is derived from the
/// open-file limit: the store and its log, the audit log, the admin listener and its clients,
/// the blocking pool's files.
const RESERVED_FILES: u64 = 64;

/// The default bound on open connections: [`DEFAULT_MAX_CONNECTIONS`], or fewer when the
/// open-file limit (`files`) is lower, so that the bound is met before descriptors run out and a
/// broker started with the defaults under a common limit of 1,024 needs no tuning and gives no
/// warning. An explicit `--max-connections` is taken as given.
pub fn default_max_connections(files: Option<u64>) -> usize {
    files.map_or(DEFAULT_MAX_CONNECTIONS, |files| {
        let room = files.saturating_sub(RESERVED_FILES).max(1);
        usize::try_from(room).map_or(DEFAULT_MAX_CONNECTIONS, |room| room.min(DEFAULT_MAX_CONNECTIONS))
    })
}

/// The process's soft limit on open files, when the platform tells it (Linux:
/// `/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    open: AtomicUsize,
    accepted: AtomicU64,
    over_limit: AtomicU64,
    handshake_timeouts: AtomicU64,
    accept_errors: AtomicU64,
}

impl ListenerStats {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
    /// Connections accepted and kept, in all.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed at once for being over `max_connections`.
    pub fn over_limit(&self) -> u64 {
        self.over_limit.load(Ordering::Relaxed)
    }
    /// Connections closed for not finishing the TLS handshake or not sending the HTTP/2 preface
    /// in time.
    pub fn handshake_timeouts(&self) -> u64 {
        self.handshake_timeouts.load(Ordering::Relaxed)
    }
    /// Failed accepts that made the loop back off.
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }
}

/// Where connections come from: a TCP listener, or a test's source of injected errors.
pub trait Accept {
    /// A connection.
    type Io;
    /// Accepts the next connection, as `TcpListener::poll_accept` does.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        TcpListener::poll_accept(self, cx).map_ok(|(stream, _)| {
            // Small gRPC frames must not wait for Nagle's algorithm to meet the client's delayed
            // ACK (a 40 ms stall per call on the hot path).
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY could not be set on an accepted connection");
            }
            stream
        })
    }
}

/// Whether a failed accept concerns only the connection being accepted (retried at once) rather
/// than the process (file descriptors, memory: backed off).
fn concerns_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// The waits after failed accepts: [`BACKOFF_FIRST`], doubling up to [`BACKOFF_MAX`], until an
/// accept succeeds. A run of failures is a burst: its first failure and its end are reported
/// (to be logged) once each.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    failures: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_FIRST, failures: 0 }
    }
}

impl Backoff {
    /// An accept failed: how long to wait, and whether this failure starts a burst.
    pub fn failed(&mut self) -> (Duration, bool) {
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        self.failures += 1;
        (wait, self.failures == 1)
    }

    /// An accept succeeded: the number of failures of the burst it ends, if one was running.
    pub fn succeeded(&mut self) -> Option<u64> {
        if self.failures == 0 {
            return None;
        }
        let failures = self.failures;
        *self = Backoff::default();
        Some(failures)
    }
}

/// Counts events and says when to log them: at most once per `every`, with how many happened
/// since the last log.
#[derive(Debug)]
struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        RateLimited { every, last: None, unlogged: 0 }
    }

    /// Notes one event at `now`: `Some(events since the last log)` when it is time to log.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self.last.is_some_and(|last| now.duration_since(last) < self.every) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// The stream of accepted connections tonic serves (see the module documentation).
pub struct Incoming<A = TcpListener> {
    source: A,
    settings: ListenerSettings,
    /// Whether connections must send the HTTP/2 preface in time (plaintext); under TLS the TLS
    /// acceptor times the handshake instead.
    watch_preface: bool,
    stats: Arc<ListenerStats>,
    backoff: Backoff,
    /// The wait after a failed accept (one timer, reset for each wait).
    pause: Pin<Box<Sleep>>,
    paused: bool,
    over_limit_log: RateLimited,
}

impl<A: Accept> Incoming<A> {
    /// Accepts from `source` under `settings`; `watch_preface` for plaintext serving. Call it on
    /// the runtime (it makes a timer).
    pub fn new(source: A, settings: ListenerSettings, watch_preface: bool) -> Self {
        Incoming {
            source,
            settings,
            watch_preface,
            stats: Arc::new(ListenerStats::default()),
            backoff: Backoff::default(),
            pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
            paused: false,
            over_limit_log: RateLimited::new(OVER_LIMIT_LOG_EVERY),
        }
    }

    /// The listener's counters (they outlive the stream).
    pub fn stats(&self) -> Arc<ListenerStats> {
        self.stats.clone()
    }

    /// Takes a connection's slot, or `None` when `max_connections` are open.
    fn slot(&self) -> Option<Slot> {
        let open = &self.stats.open;
        let mut now = open.load(Ordering::Acquire);
        loop {
            if now >= self.settings.max_connections {
                return None;
            }
            match open.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Slot(self.stats.clone())),
                Err(actual) => now = actual,
            }
        }
    }

    fn refuse_over_limit(&mut self) {
        self.stats.over_limit.fetch_add(1, Ordering::Relaxed);
        if let Some(closed) = self.over_limit_log.note(Instant::now()) {
            tracing::warn!(
                closed,
                max_connections = self.settings.max_connections,
                "closed new gRPC connections: max_connections are open"
            );
        }
    }

    /// Starts the wait after a failed accept; `Ready` when it is already over.
    fn back_off(&mut self, error: &io::Error, cx: &mut Context<'_>) -> Poll<()> {
        self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
        let (wait, first) = self.backoff.failed();
        if first {
            tracing::warn!(
                %error,
                "accepting gRPC connections failed (out of file descriptors or memory?); retrying with a growing pause (up to 1 s) until it succeeds"
            );
        }
        self.pause.as_mut().reset(tokio::time::Instant::now() + wait);
        self.paused = true;
        self.poll_pause(cx)
    }

    fn poll_pause(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.paused {
            std::task::ready!(self.pause.as_mut().poll(cx));
            self.paused = false;
        }
        Poll::Ready(())
    }
}

impl<A> Stream for Incoming<A>
where
    A: Accept + Unpin,
{
    type Item = io::Result<Connection<A::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pause(cx));
        for _ in 0..ACCEPTS_PER_POLL {
            match this.source.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(io)) => {
                    if let Some(failures) = this.backoff.succeeded() {
                        tracing::info!(failures, "accepting gRPC connections again");
                    }
                    let Some(slot) = this.slot() else {
                        drop(io);
                        this.refuse_over_limit();
                        continue;
                    };
                    this.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let preface =
                        this.watch_preface.then(|| PrefaceWatch::new(this.settings.handshake_timeout));
                    return Poll::Ready(Some(Ok(Connection { io, preface, slot })));
                }
                Poll::Ready(Err(e)) if concerns_one_connection(&e) => continue,
                Poll::Ready(Err(e)) => std::task::ready!(this.back_off(&e, cx)),
            }
        }
        // A flood of connections: let the connections already accepted make progress.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A connection's place among `max_connections`; freed when the connection is dropped.
#[derive(Debug)]
struct Slot(Arc<ListenerStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Length of the HTTP/2 client preface's magic (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_MAGIC: usize = 24;
/// Length of an HTTP/2 frame header; the first 3 bytes hold the payload length.
const FRAME_HEADER: usize = 9;

/// Times a plaintext connection's HTTP/2 client preface: the magic, then a frame (SETTINGS),
/// header and payload, within the handshake timeout. HTTP/2 checks what the bytes say; this
/// counts them.
#[derive(Debug)]
struct PrefaceWatch {
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// Bytes the client sent so far.
    seen: usize,
    /// The first frame's payload length, from its header's first 3 bytes.
    frame_len: usize,
}

impl PrefaceWatch {
    fn new(timeout: Duration) -> Self {
        PrefaceWatch { deadline: Box::pin(tokio::time::sleep(timeout)), timeout, seen: 0, frame_len: 0 }
    }

    /// Notes bytes the client sent; true once the preface is complete.
    fn saw(&mut self, bytes: &[u8]) -> bool {
        let start = self.seen;
        let end = start.saturating_add(bytes.len());
        for at in start.max(PREFACE_MAGIC)..end.min(PREFACE_MAGIC + 3) {
            let byte = bytes.get(at - start).copied().unwrap_or_default();
            self.frame_len = (self.frame_len << 8) | usize::from(byte);
        }
        self.seen = end;
        self.seen >= PREFACE_MAGIC + 3 && self.seen >= PREFACE_MAGIC + FRAME_HEADER + self.frame_len
    }
}

/// An accepted connection: the stream, its slot among `max_connections`, and — on plaintext
/// until the HTTP/2 preface is complete — the handshake deadline. Past the preface, reads and
/// writes go straight to the stream.
#[derive(Debug)]
pub struct Connection<IO> {
    io: IO,
    preface: Option<PrefaceWatch>,
    slot: Slot,
}

impl<IO> Connection<IO> {
    /// Whether the connection is still waiting for the client's HTTP/2 preface.
    pub fn awaiting_preface(&self) -> bool {
        self.preface.is_some()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Connection<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_watched(&mut this.io, &mut this.preface, &this.slot.0, cx, buf)
    }
}

/// Reads from `io`, timing the HTTP/2 preface while `watch` is set: the watch ends once the
/// preface is complete, and a read still waiting at the deadline fails the connection.
fn poll_read_watched<IO: AsyncRead + Unpin>(
    io: &mut IO,
    watch: &mut Option<PrefaceWatch>,
    stats: &ListenerStats,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let before = buf.filled().len();
    let read = Pin::new(io).poll_read(cx, buf);
    let Some(w) = watch else { return read };
    match read {
        Poll::Ready(Ok(())) => {
            let fresh = buf.filled().get(before..).unwrap_or_default();
            if w.saw(fresh) {
                *watch = None;
            }
            Poll::Ready(Ok(()))
        }
        Poll::Pending if w.deadline.as_mut().poll(cx).is_ready() => {
            stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(timeout = ?w.timeout, "closing a connection that sent no HTTP/2 preface in time");
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no HTTP/2 preface within {:?}", w.timeout),
            )))
        }
        other => other,
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Connection<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Connection<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A connection over TLS, past its TLS handshake: its HTTP/2 preface is timed on the decrypted
/// stream. Its `Connected` info is tonic's for a TLS stream, so the peer's address and client
/// certificates reach each request as they do when tonic runs TLS itself.
pub struct TlsConnection<IO> {
    tls: TlsStream<Connection<IO>>,
    preface: Option<PrefaceWatch>,
    stats: Arc<ListenerStats>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConnection<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_watched(&mut this.tls, &mut this.preface, &this.stats, cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConnection<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

impl<IO> tonic::transport::server::Connected for TlsConnection<IO>
where
    IO: tonic::transport::server::Connected + AsyncRead + AsyncWrite + Unpin,
{
    type ConnectInfo = <TlsStream<Connection<IO>> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

/// Handshakes under way at once before the accept loop waits for one to finish (each is bounded
/// by `handshake_timeout`, and each connection holds its slot among `max_connections`).
const TLS_HANDSHAKES_QUEUED: usize = 64;

/// The connections of `incoming` over TLS with `config`. Each handshake runs in its own task
/// within `handshake_timeout` (a slow or silent client delays nobody else); a connection that
/// completes it is served once it sends the HTTP/2 preface within `handshake_timeout` more.
/// Failed and timed-out handshakes close their connection (logged at debug; timeouts counted).
/// The stream ends when `incoming` does, and dropping it stops accepting.
pub fn with_tls<A>(
    incoming: Incoming<A>,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<TlsConnection<A::Io>>> + Send + 'static
where
    A: Accept + Unpin + Send + 'static,
    A::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(TLS_HANDSHAKES_QUEUED);
    let timeout = incoming.settings.handshake_timeout;
    let stats = incoming.stats();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut incoming = incoming;
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = tx.closed() => return,
                next = tokio_stream::StreamExt::next(&mut incoming) => next,
            };
            let Some(Ok(connection)) = next else {
                if next.is_none() {
                    return;
                }
                continue;
            };
            let (tx, acceptor, stats) = (tx.clone(), acceptor.clone(), stats.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(connection)).await {
                    Ok(Ok(tls)) => {
                        let preface = Some(PrefaceWatch::new(timeout));
                        let _ = tx.send(Ok(TlsConnection { tls, preface, stats })).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => {
                        stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            ?timeout,
                            "closing a connection that did not finish its TLS handshake in time"
                        );
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;
    use tokio_stream::StreamExt as _;

    #[test]
    fn accept_errors_back_off_growing_to_a_second_and_are_reported_once_per_burst() {
        let mut b = Backoff::default();
        let waits: Vec<(u128, bool)> =
            (0..10).map(|_| b.failed()).map(|(d, first)| (d.as_millis(), first)).collect();
        assert_eq!(
            waits,
            [
                (5, true),
                (10, false),
                (20, false),
                (40, false),
                (80, false),
                (160, false),
                (320, false),
                (640, false),
                (1000, false),
                (1000, false)
            ]
        );
        assert_eq!(b.succeeded(), Some(10), "the burst's end is reported with its size");
        assert_eq!(b.succeeded(), None, "once");
        assert_eq!(b.failed(), (BACKOFF_FIRST, true), "a new burst starts from the first wait");
    }

    #[test]
    fn over_limit_closes_are_logged_at_a_rate_limit_with_their_count() {
        let mut log = RateLimited::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(1));
        assert_eq!(log.note(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(10)), Some(3));
    }

    #[test]
    fn the_preface_is_the_magic_and_its_first_frame_in_any_pieces() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend_from_slice(&[0, 0, 12, 4, 0, 0, 0, 0, 0]); // SETTINGS, 12 bytes
        bytes.extend_from_slice(&[0; 12]);
        for piece in [1, 5, 24, 26, 27, 33, bytes.len()] {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let _guard = rt.enter();
            let mut w = PrefaceWatch::new(Duration::from_secs(1));
            let mut done = false;
            for (i, chunk) in bytes.chunks(piece).enumerate() {
                assert!(!done, "complete before chunk {i} of {piece}-byte pieces");
                done = w.saw(chunk);
            }
            assert!(done, "{piece}-byte pieces");
            assert_eq!(w.frame_len, 12);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let _guard = rt.enter();
        let mut w = PrefaceWatch::new(Duration::from_secs(1));
        assert!(!w.saw(&bytes[..bytes.len() - 1]), "one byte short");
    }

    #[test]
    fn plaintext_on_a_non_loopback_address_is_warned_about() {
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let lan: SocketAddr = "10.1.2.3:50051".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let local6: SocketAddr = "[::1]:50051".parse().unwrap();
        assert!(plaintext_warning(public, false).is_some_and(|w| w.contains("PLAINTEXT")));
        assert!(plaintext_warning(lan, false).is_some());
        assert_eq!(plaintext_warning(public, true), None, "TLS");
        assert_eq!(plaintext_warning(local, false), None);
        assert_eq!(plaintext_warning(local6, false), None);
    }

    /// Fails the first `failures` accepts with EMFILE, then hands out one end of a duplex pipe.
    struct Exhausted {
        failures: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Accept for Exhausted {
        type Io = tokio::io::DuplexStream;
        fn poll_accept(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.failures > 0 {
                self.failures -= 1;
                return Poll::Ready(Err(io::Error::from_raw_os_error(24))); // EMFILE
            }
            Poll::Ready(Ok(tokio::io::duplex(64).0))
        }
    }

    #[tokio::test]
    async fn the_accept_loop_waits_between_failed_accepts_instead_of_spinning() {
        let polls = Arc::new(AtomicUsize::new(0));
        let source = Exhausted { failures: 6, polls: polls.clone() };
        let mut incoming = Incoming::new(source, ListenerSettings::default(), false);
        let stats = incoming.stats();
        let started = Instant::now();
        let first = incoming.next().await.expect("a connection").expect("accepted");
        let waited = started.elapsed();
        // 5 + 10 + 20 + 40 + 80 + 160 ms of pauses, one accept attempt after each.
        assert!(waited >= Duration::from_millis(315), "waited only {waited:?}");
        assert_eq!(polls.load(Ordering::Relaxed), 7, "one attempt per pause, no spinning");
        assert_eq!(stats.accept_errors(), 6);
        assert_eq!(stats.open(), 1);
        drop(first);
        assert_eq!(stats.open(), 0, "a dropped connection frees its slot");
    }

    #[tokio::test]
    async fn connections_over_the_bound_are_closed_at_once_and_counted() {
        let polls = Arc::new(AtomicUsize::new(0));
        let source = Exhausted { failures: 0, polls };
        let settings = ListenerSettings { max_connections: 2, ..Default::default() };
        let mut incoming = Incoming::new(source, settings, false);
        let stats = incoming.stats();
        let a = incoming.next().await.unwrap().unwrap();
        let _b = incoming.next().await.unwrap().unwrap();
        assert_eq!(stats.open(), 2);
        // The source always has another connection: over the bound, each is closed, and the
        // stream yields to the runtime after a batch rather than looping forever.
        let third = tokio::time::timeout(Duration::from_millis(50), incoming.next()).await;
        assert!(third.is_err(), "no third connection while two are open");
        assert!(stats.over_limit() >= ACCEPTS_PER_POLL as u64, "{}", stats.over_limit());
        drop(a);
        assert!(incoming.next().await.unwrap().is_ok(), "a slot freed is taken again");
    }

    #[tokio::test]
    async fn a_connection_without_a_preface_times_out_and_one_with_it_does_not() {
        struct Pipe(Option<tokio::io::DuplexStream>);
        impl Accept for Pipe {
            type Io = tokio::io::DuplexStream;
            fn poll_accept(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
                match self.0.take() {
                    Some(s) => Poll::Ready(Ok(s)),
                    None => Poll::Pending,
                }
            }
        }
        use tokio::io::AsyncReadExt as _;
        let settings =
            ListenerSettings { handshake_timeout: Duration::from_millis(100), ..Default::default() };

        let (server, _client) = tokio::io::duplex(1024);
        let mut incoming = Incoming::new(Pipe(Some(server)), settings, true);
        let stats = incoming.stats();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        let err = conn.read(&mut buf).await.expect_err("silent client times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(stats.handshake_timeouts(), 1);

        let (server, mut client) = tokio::io::duplex(1024);
        let mut incoming = Incoming::new(Pipe(Some(server)), settings, true);
        let mut conn = incoming.next().await.unwrap().unwrap();
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(n, 33);
        assert!(!conn.awaiting_preface());
        // Past the preface no deadline applies: an idle connection simply waits.
        let idle = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await;
        assert!(idle.is_err(), "no timeout after the preface: {idle:?}");
    }

    #[test]
    fn the_default_connection_bound_stays_below_the_open_file_limit() {
        assert_eq!(default_max_connections(None), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(default_max_connections(Some(1_024)), 960);
        assert_eq!(default_max_connections(Some(1_048_576)), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(default_max_connections(Some(10)), 1);
    }
}
