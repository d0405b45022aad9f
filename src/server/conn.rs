//! Accepted connections: `TCP_NODELAY` and TCP keepalive on every socket, a cap on open
//! connections, and an idle timeout.
//!
//! * Without `TCP_NODELAY`, Nagle's algorithm and delayed ACKs hold each answer of more than
//!   one packet for about 40 ms.
//! * TCP keepalive (kernel probes, invisible to the connection's reads) finds peers that
//!   vanished without closing.
//! * Past [`ConnLimits::max_connections`] open connections, a new one is accepted and closed at
//!   once (logged at most once a second), so idle clients cannot exhaust file descriptors or
//!   memory; connections already open are unaffected.
//! * A connection that sends nothing for [`ConnLimits::idle_timeout`] is closed (gRPC clients
//!   reconnect on their next call; HTTP/2 keepalive pings from a client count as traffic).
//! * A connection must send its first [`GREETING_BYTES`] (the HTTP/2 preface, or a TLS
//!   ClientHello) within [`ConnLimits::greeting_timeout`]: until then its reads do not extend
//!   its life, so a client that trickles a byte at a time cannot hold a slot for good.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// Limits on the server's connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnLimits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Idle time before the kernel's first TCP keepalive probe.
    pub tcp_keepalive: Duration,
    /// Time from accept to the connection's first [`GREETING_BYTES`] bytes.
    pub greeting_timeout: Duration,
}

/// Bytes a client sends first on any connection it means to use: the HTTP/2 client preface is
/// 24 bytes, a TLS ClientHello more.
pub const GREETING_BYTES: usize = 24;

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            tcp_keepalive: Duration::from_secs(60),
            greeting_timeout: Duration::from_secs(10),
        }
    }
}

impl ConnLimits {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("the idle timeout must be at least 1 second".into());
        }
        Ok(())
    }
}

/// The listener's accepted connections, with the limits applied.
pub fn incoming(listener: TcpListener, limits: ConnLimits) -> impl Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let last_warning = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(limits.tcp_keepalive))
        .filter_map(move |accepted| match accepted {
            Err(e) => Some(Err(e)),
            Ok(stream) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => Some(Ok(Conn::new(stream, permit, &limits))),
                Err(_) => {
                    let now = started.elapsed().as_secs() + 1;
                    if last_warning.swap(now, Ordering::Relaxed) != now {
                        tracing::warn!(
                            limit = limits.max_connections,
                            peer = ?stream.peer_addr().ok(),
                            "connection refused: the server holds its maximum of open connections (--max-connections)"
                        );
                    }
                    None
                }
            },
        })
}

/// An accepted connection holding one of the connection slots until it closes.
pub struct Conn {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// Bytes read so far, counted up to [`GREETING_BYTES`].
    greeted: usize,
}

impl Conn {
    fn new(inner: TcpStream, slot: OwnedSemaphorePermit, limits: &ConnLimits) -> Self {
        let first = limits.idle_timeout.min(limits.greeting_timeout);
        Self {
            inner,
            _slot: slot,
            idle: Box::pin(tokio::time::sleep(first)),
            idle_timeout: limits.idle_timeout,
            greeted: 0,
        }
    }

    /// The underlying socket (for tests and diagnostics).
    pub fn socket(&self) -> &TcpStream {
        &self.inner
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                this.greeted = (this.greeted + read).min(GREETING_BYTES);
                if read > 0 && this.greeted == GREETING_BYTES {
                    let deadline = Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) if this.greeted < GREETING_BYTES => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection sent {} bytes, no HTTP/2 preface, in time", this.greeted),
                ))),
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection idle for {} s", this.idle_timeout.as_secs()),
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Regression: the listener was wrapped without TCP_NODELAY, so every answer of more than
    /// one packet waited ~44 ms for a delayed ACK.
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inc = incoming(listener, ConnLimits::default());
        tokio::pin!(inc);
        let _client = TcpStream::connect(addr).await.unwrap();
        let accepted = inc.next().await.unwrap().unwrap();
        assert!(accepted.socket().nodelay().unwrap(), "accepted socket must have TCP_NODELAY");
        let sock = socket2::SockRef::from(accepted.socket());
        assert!(sock.keepalive().unwrap(), "accepted socket must have SO_KEEPALIVE");
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_slots_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits { max_connections: 2, ..ConnLimits::default() };
        let inc = incoming(listener, limits);
        tokio::pin!(inc);
        let _a = TcpStream::connect(addr).await.unwrap();
        let first = inc.next().await.unwrap().unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let _second = inc.next().await.unwrap().unwrap();
        // The third is accepted and closed: its reads see the end of the stream.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(300), inc.next()).await;
        assert!(next.is_err(), "no third connection is handed to the server");
        let mut byte = [0u8; 1];
        assert_eq!(c.read(&mut byte).await.unwrap(), 0, "the refused connection is closed");
        // Closing one frees its slot.
        drop(first);
        let _d = TcpStream::connect(addr).await.unwrap();
        assert!(inc.next().await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_silent_connection_times_out_and_traffic_keeps_one_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits { idle_timeout: Duration::from_secs(2), ..ConnLimits::default() };
        let inc = incoming(listener, limits);
        tokio::pin!(inc);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = inc.next().await.unwrap().unwrap();
        let mut buf = [0u8; 32];
        // The greeting first (a trickle before it does not count, see below)...
        client.write_all(&[b'p'; GREETING_BYTES]).await.unwrap();
        let mut got = 0;
        while got < GREETING_BYTES {
            got += conn.read(&mut buf).await.unwrap();
        }
        // ...then traffic every half second keeps it open past the 2 s timeout...
        let started = Instant::now();
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(started.elapsed() > Duration::from_secs(2));
        client.write_all(b"y").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        // ...silence does not.
        let silent = Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(silent.elapsed() >= Duration::from_secs(2), "not before the timeout");
    }

    #[tokio::test]
    async fn a_trickle_that_never_greets_is_closed_at_the_greeting_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits {
            idle_timeout: Duration::from_secs(300),
            greeting_timeout: Duration::from_secs(1),
            ..ConnLimits::default()
        };
        let inc = incoming(listener, limits);
        tokio::pin!(inc);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = inc.next().await.unwrap().unwrap();
        let started = Instant::now();
        // A byte every 200 ms: far more often than the idle timeout, never a whole greeting
        // before the deadline.
        let trickle = tokio::spawn(async move {
            for _ in 0..GREETING_BYTES - 1 {
                if client.write_all(b"P").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut buf = [0u8; 8];
        let err = loop {
            match conn.read(&mut buf).await {
                Ok(n) => assert!(n > 0, "the client never closes"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("no HTTP/2 preface"), "{err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{took:?}");
        trickle.abort();
    }
}
