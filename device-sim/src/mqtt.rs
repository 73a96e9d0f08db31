//! The simulator's side of a vehicle's MQTT connection: the [`Link`] (a TCP connection, or
//! TLS over one ([`TlsTarget`])) that moves the bytes of the vehicle's
//! [`Session`], and the [`SessionClock`] that gives it time.
//!
//! The protocol state (CONNECT, keep-alive, packet ids, PUBACK matching, buffers) is all in
//! the `no_std` [`session`](crate::session) module, the very code the firmware runs: this
//! module adds only tokio I/O and a millisecond clock. Each vehicle's session owns fixed
//! buffers ([`VehicleSession`](crate::session::VehicleSession): 256 bytes in, 512 out), so
//! nothing is allocated per message and 10 000 vehicles fit in one process.
//!
//! A driver sleeps until the session's [`deadline`](crate::session::Session::deadline) (as a
//! tokio instant: [`SessionClock::instant`]), reads and writes with [`Link::exchange`] and
//! [`Link::write_now`], and takes decoded packets from
//! [`Session::next_incoming`](crate::session::Session::next_incoming).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::session::{Session, SessionError};

/// Monotonic milliseconds for a [`Session`], from a tokio [`Instant`] (so tests with paused
/// time drive it too).
#[derive(Debug, Clone, Copy)]
pub struct SessionClock {
    epoch: Instant,
}

impl SessionClock {
    /// A clock counting from now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the clock started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant of `ms` milliseconds after the clock started (a session deadline).
    pub fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

impl Default for SessionClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a connection is over. Every variant means: drop the [`Link`], reset the session
/// ([`Session::reset`]), and connect again later.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed.
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    /// The TCP connection (and the TLS handshake, over TLS) could not be made in time.
    #[error("connecting timed out")]
    ConnectTimeout,
    /// The TLS handshake failed: the broker's certificate is not signed by a trusted CA or
    /// does not name the broker's host, the broker wants a client certificate, no common
    /// protocol, ...
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    /// The TLS layer failed after the handshake (a fatal alert from the broker, such as
    /// the refusal of a missing or unknown client certificate, or a bad record).
    #[error("TLS failed: {0}")]
    Tls(rustls::Error),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// The session ended the connection: refused, a timeout, an oversized, malformed or
    /// unexpected packet.
    #[error(transparent)]
    Session(#[from] SessionError),
}

impl LinkError {
    /// Whether the broker sent a packet larger than the session accepts.
    pub const fn is_oversized(&self) -> bool {
        matches!(self, Self::Session(err) if err.is_oversized())
    }
}

/// How to reach the broker over TLS: the rustls client configuration (the trusted CAs and,
/// with mutual TLS, the client certificate) and the name the broker's certificate must carry
/// (a DNS name or an IP address). Cheap to clone: the configuration is shared.
#[derive(Clone)]
pub struct TlsTarget {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsTarget {
    /// TLS with `config`, expecting a certificate for `server_name`.
    pub fn new(
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Self {
        Self {
            connector: TlsConnector::from(config),
            server_name,
        }
    }

    /// The name the broker's certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTarget")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A connection to the broker, moving a [`Session`]'s bytes: plain TCP (`TCP_NODELAY`), or
/// TLS over it.
#[derive(Debug)]
pub struct Link {
    stream: Stream,
}

/// The socket under a [`Link`].
#[derive(Debug)]
enum Stream {
    /// Plain TCP, driven by readiness (`try_read` / `try_write`), no copies.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS session is large, and the plain path stays small).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Link {
    /// Connects to `host:port` within `timeout`, with `TCP_NODELAY`; over TLS if `tls` is
    /// given (the handshake is part of the `timeout`).
    ///
    /// # Errors
    /// [`LinkError::Io`], [`LinkError::ConnectTimeout`] or [`LinkError::TlsHandshake`].
    pub async fn connect(
        host: &str,
        port: u16,
        tls: Option<&TlsTarget>,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let connecting = async {
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let stream = match tls {
                None => Stream::Plain(stream),
                Some(tls) => Stream::Tls(Box::new(
                    tls.connector
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(LinkError::TlsHandshake)?,
                )),
            };
            Ok(Self { stream })
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| LinkError::ConnectTimeout)?
    }

    /// Writes as much of the session's output as the socket takes now, without waiting.
    ///
    /// # Errors
    /// [`LinkError::Io`], [`LinkError::Tls`] or [`LinkError::Closed`].
    pub fn write_now<T: Copy, const RX: usize, const TX: usize>(
        &mut self,
        session: &mut Session<T, RX, TX>,
    ) -> Result<(), LinkError> {
        match &mut self.stream {
            Stream::Plain(stream) => write_plain(stream, session),
            Stream::Tls(stream) => {
                // Polled once, without a waker to call: whatever the socket does not take now
                // is written by the next `exchange`, which waits with a real one.
                let mut cx = Context::from_waker(Waker::noop());
                match poll_write_tls(stream, &mut cx, session) {
                    Poll::Ready(Err(err)) => Err(err),
                    Poll::Ready(Ok(_)) | Poll::Pending => Ok(()),
                }
            }
        }
    }

    /// Writes all of the session's output, waiting for the socket as needed. Put a timeout
    /// around it.
    ///
    /// # Errors
    /// [`LinkError::Io`], [`LinkError::Tls`] or [`LinkError::Closed`].
    pub async fn write_all<T: Copy, const RX: usize, const TX: usize>(
        &mut self,
        session: &mut Session<T, RX, TX>,
    ) -> Result<(), LinkError> {
        match &mut self.stream {
            Stream::Plain(stream) => {
                while session.has_output() {
                    stream.writable().await?;
                    write_plain(stream, session)?;
                }
            }
            Stream::Tls(stream) => {
                while session.has_output() {
                    match stream.write(session.output()).await {
                        Ok(0) => return Err(LinkError::Closed),
                        Ok(n) => session.wrote(n),
                        Err(err) => return Err(tls_error(err)),
                    }
                }
                stream.flush().await.map_err(tls_error)?;
            }
        }
        Ok(())
    }

    /// Waits until the socket can be read (while the session has room to receive) or
    /// written (while it has output), then writes what it can and reads what arrived into
    /// the session: take the packets with [`Session::next_incoming`]. Cancel safe: nothing
    /// is lost if it is dropped while waiting.
    ///
    /// # Errors
    /// [`LinkError::Io`], [`LinkError::Tls`] or [`LinkError::Closed`].
    pub async fn exchange<T: Copy, const RX: usize, const TX: usize>(
        &mut self,
        session: &mut Session<T, RX, TX>,
    ) -> Result<(), LinkError> {
        let stream = match &mut self.stream {
            Stream::Plain(stream) => return exchange_plain(stream, session).await,
            Stream::Tls(stream) => stream,
        };
        poll_fn(|cx| {
            let wrote = match poll_write_tls(stream, cx, session) {
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(wrote)) => wrote,
                Poll::Pending => false,
            };
            if session.receive_buffer().is_empty() {
                // Complete packets wait to be taken: nothing to read into.
                return if wrote || !session.has_output() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            match poll_read_tls(stream, cx, session) {
                Poll::Ready(Ok(0)) => Poll::Ready(Err(LinkError::Closed)),
                Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
                Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                Poll::Pending if wrote => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Ends the connection cleanly: writes the rest of the output (a DISCONNECT last, see
    /// [`Session::disconnect`]), closes the sending side (over TLS after a `close_notify`),
    /// and waits until the broker has closed its side, discarding whatever it still sends.
    /// Put a timeout around it.
    ///
    /// # Errors
    /// [`LinkError::Io`] or [`LinkError::Tls`] if the socket fails on the way.
    pub async fn close<T: Copy, const RX: usize, const TX: usize>(
        mut self,
        session: &mut Session<T, RX, TX>,
    ) -> Result<(), LinkError> {
        self.write_all(session).await?;
        session.discard_input();
        match &mut self.stream {
            Stream::Plain(stream) => {
                stream.shutdown().await?;
                loop {
                    stream.readable().await?;
                    match stream.try_read(session.receive_buffer()) {
                        Ok(0) => return Ok(()),
                        Ok(_) => {}
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => return Err(err.into()),
                    }
                }
            }
            Stream::Tls(stream) => {
                stream.shutdown().await.map_err(tls_error)?;
                loop {
                    match poll_fn(|cx| poll_read_tls(stream.as_mut(), cx, session)).await {
                        Ok(0) | Err(LinkError::Closed) => return Ok(()),
                        Ok(_) => session.discard_input(),
                        Err(err) => return Err(err),
                    }
                }
            }
        }
    }
}

/// Writes as much of the session's output as the TCP socket takes now, without waiting.
fn write_plain<T: Copy, const RX: usize, const TX: usize>(
    stream: &TcpStream,
    session: &mut Session<T, RX, TX>,
) -> Result<(), LinkError> {
    while session.has_output() {
        match stream.try_write(session.output()) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(n) => session.wrote(n),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// [`Link::exchange`] over plain TCP: readiness, then `try_write` / `try_read`.
async fn exchange_plain<T: Copy, const RX: usize, const TX: usize>(
    stream: &TcpStream,
    session: &mut Session<T, RX, TX>,
) -> Result<(), LinkError> {
    let can_read = !session.receive_buffer().is_empty();
    let interest = match (session.has_output(), can_read) {
        (true, true) => Interest::READABLE | Interest::WRITABLE,
        (true, false) => Interest::WRITABLE,
        (false, true) => Interest::READABLE,
        // Complete packets wait to be taken, and there is nothing to write.
        (false, false) => return Ok(()),
    };
    let ready = stream.ready(interest).await?;
    if ready.is_writable() {
        write_plain(stream, session)?;
    }
    if can_read && (ready.is_readable() || ready.is_read_closed()) {
        match stream.try_read(session.receive_buffer()) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(n) => session.received(n),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Hands the session's output to the TLS session as far as it takes it, and pushes the
/// session's records to the socket. `Ready(true)` if any output was taken; `Pending` (with
/// `cx` woken when the socket can take more) if the socket is full and nothing was taken.
fn poll_write_tls<S, T: Copy, const RX: usize, const TX: usize>(
    stream: &mut S,
    cx: &mut Context<'_>,
    session: &mut Session<T, RX, TX>,
) -> Poll<Result<bool, LinkError>>
where
    S: AsyncWrite + Unpin,
{
    let mut wrote = false;
    while session.has_output() {
        match Pin::new(&mut *stream).poll_write(cx, session.output()) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(LinkError::Closed)),
            Poll::Ready(Ok(n)) => {
                session.wrote(n);
                wrote = true;
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(tls_error(err))),
            Poll::Pending => break,
        }
    }
    // Records the TLS session holds back (the socket was full) go out as the socket takes
    // them.
    match Pin::new(&mut *stream).poll_flush(cx) {
        Poll::Ready(Err(err)) => Poll::Ready(Err(tls_error(err))),
        Poll::Ready(Ok(())) => Poll::Ready(Ok(wrote)),
        Poll::Pending if wrote => Poll::Ready(Ok(true)),
        Poll::Pending => Poll::Pending,
    }
}

/// Reads what the TLS stream has into the session's receive buffer (which must not be
/// full); `Ready(Ok(0))` when the broker closed.
fn poll_read_tls<S, T: Copy, const RX: usize, const TX: usize>(
    stream: &mut S,
    cx: &mut Context<'_>,
    session: &mut Session<T, RX, TX>,
) -> Poll<Result<usize, LinkError>>
where
    S: AsyncRead + Unpin,
{
    let mut buf = ReadBuf::new(session.receive_buffer());
    match Pin::new(stream).poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => {
            let n = buf.filled().len();
            session.received(n);
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(err)) => Poll::Ready(Err(tls_error(err))),
        Poll::Pending => Poll::Pending,
    }
}

/// An I/O error of a TLS stream as a [`LinkError`]: the TLS layer's own errors (alerts, bad
/// records) as [`LinkError::Tls`], an end without `close_notify` as [`LinkError::Closed`].
fn tls_error(err: io::Error) -> LinkError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        return LinkError::Closed;
    }
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => LinkError::Tls(tls.clone()),
        None => LinkError::Io(err),
    }
}

#[cfg(test)]
mod tests;
