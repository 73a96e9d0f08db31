//! HTTPS (and so WSS for Socket.IO) on the bridge's one listener, when `tls_cert` and
//! `tls_key` are set.
//!
//! [`HttpsListener`] is an [`axum::serve::Listener`]: a task of its own accepts TCP
//! connections and runs each TLS handshake in a task of its own, with a timeout
//! ([`HANDSHAKE_TIMEOUT`]) and a cap on how many run at once ([`MAX_HANDSHAKES`]), and hands
//! the finished ones to axum through a channel. A slow or garbage client costs one task until
//! its timeout; it never holds up the next `accept`. A client that speaks plain HTTP to the
//! port is answered `400` in plain text (use `https://`). Failed handshakes are counted
//! (`fleetbeat_bridge_tls_handshake_failures_total`, `..._timeouts_total`) and logged at most
//! once per [`LOG_EVERY`].
//!
//! [`ServerCertificate`] is the certificate in use: its files are looked at again as
//! connections come, at most once per [`broker::FileWatch::INTERVAL`] (the rule the bridge
//! reloads the device keys by), and reloaded when either changed. A replacement that does not
//! load (a key that does not match, half a file) is logged as an ERROR and counted; the
//! previous certificate stays in use.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use broker::FileWatch;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, info, warn};

use crate::metrics::{Counter, Metrics};
use crate::tls::{TlsError, TlsFiles, server_config};

/// How long a client has to complete its TLS handshake after its TCP connection is accepted.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes running at once; a connection accepted beyond it is closed at once
/// (counted as a failed handshake).
pub(crate) const MAX_HANDSHAKES: usize = 1024;

/// Handshake failures are logged at most this often (the others are counted, and the next
/// log line says how many were not logged).
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for axum to take them.
const READY_QUEUE: usize = 64;

/// The HTTPS server's certificate and key, reloaded when their files change.
#[derive(Debug)]
pub(crate) struct ServerCertificate {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The certificate's and the key's watches.
    watch: Mutex<(FileWatch, FileWatch)>,
    metrics: Arc<Metrics>,
}

impl ServerCertificate {
    /// Loads the certificate and key of `files`, to be reloaded when they change (reloads
    /// are counted in `metrics`).
    ///
    /// # Errors
    /// [`TlsError`] if they do not load.
    pub(crate) fn load(files: &TlsFiles, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        let watch = (FileWatch::new(&files.cert), FileWatch::new(&files.key));
        let config = server_config(&files.cert, &files.key)?;
        Ok(Self {
            files: files.clone(),
            current: RwLock::new(config),
            watch: Mutex::new(watch),
            metrics,
        })
    }

    /// The configuration for the next handshake: the files are reloaded first if either
    /// changed (looked at no more than once per [`FileWatch::INTERVAL`]).
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        if self.changed() {
            self.reload();
        }
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn changed(&self) -> bool {
        let mut watch = match self.watch.lock() {
            Ok(watch) => watch,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (cert, key) = &mut *watch;
        // Both are looked at (no short circuit), so both remember what they saw.
        let cert_changed = cert.changed(&self.files.cert);
        let key_changed = key.changed(&self.files.key);
        cert_changed || key_changed
    }

    fn reload(&self) {
        match server_config(&self.files.cert, &self.files.key) {
            Ok(config) => {
                match self.current.write() {
                    Ok(mut current) => *current = config,
                    Err(poisoned) => *poisoned.into_inner() = config,
                }
                self.metrics.count(Counter::TlsReloads);
                info!(cert = %self.files.cert.display(), "HTTPS certificate reloaded");
            }
            Err(err) => {
                self.metrics.count(Counter::TlsReloadFailed);
                error!(
                    cause = %err,
                    "the HTTPS certificate files changed but do not load: the previous \
                     certificate stays in use"
                );
            }
        }
    }

    /// Makes the next [`Self::config`] reload the files (tests that rewrite them quickly).
    #[cfg(test)]
    fn expire(&self) {
        if let Ok(mut watch) = self.watch.lock() {
            watch.0.expire();
            watch.1.expire();
        }
    }
}

/// A TCP listener whose connections come out TLS-terminated, for `axum::serve`.
#[derive(Debug)]
pub(crate) struct HttpsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl HttpsListener {
    /// Starts accepting on `tcp`, with the certificate `cert`; failures are counted in
    /// `metrics`. The accepting task ends when the listener is dropped.
    ///
    /// # Errors
    /// If the address of `tcp` cannot be read.
    pub(crate) fn new(
        tcp: TcpListener,
        cert: Arc<ServerCertificate>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(tcp, cert, metrics, tx));
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task is gone (it ends only when this listener is dropped, or if
            // it panicked): nothing will come any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Why a TLS connection did not make it to HTTP.
#[derive(Debug)]
enum Failure {
    /// The handshake failed (an unknown CA on the client's side, garbage, ...).
    Handshake(std::io::Error),
    /// The client spoke plain HTTP: it was answered 400 in plain text, and closed.
    PlainHttp,
    /// The handshake did not finish within [`HANDSHAKE_TIMEOUT`].
    Timeout,
    /// [`MAX_HANDSHAKES`] were running already.
    Busy,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Handshake(err) => write!(f, "handshake failed: {err}"),
            Self::PlainHttp => f.write_str("plain HTTP sent to the HTTPS port (answered 400)"),
            Self::Timeout => write!(f, "no handshake within {HANDSHAKE_TIMEOUT:?}"),
            Self::Busy => write!(f, "{MAX_HANDSHAKES} handshakes running already"),
        }
    }
}

/// Whether the client's first byte is a letter, as an HTTP request line starts (a TLS
/// handshake starts with the record type 0x16). Waits for that byte.
async fn speaks_plain_http(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// Tells a plain-HTTP client (a browser sent to `http://`) to use `https://`, and closes.
async fn answer_plain_http(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    const ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
        Content-Length: 46\r\nConnection: close\r\n\r\n\
        This port speaks HTTPS: use https:// instead.\n";
    // Best effort: the client may be gone already.
    let _ = stream.write_all(ANSWER).await;
    let _ = stream.shutdown().await;
}

/// Logs handshake failures at most once per [`LOG_EVERY`], saying how many were not logged.
#[derive(Debug)]
struct FailureLog {
    last: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
    metrics: Arc<Metrics>,
}

impl FailureLog {
    fn record(&self, failure: Failure, peer: SocketAddr) {
        self.metrics.count(match failure {
            Failure::Handshake(_) | Failure::PlainHttp | Failure::Busy => {
                Counter::TlsHandshakeFailed
            }
            Failure::Timeout => Counter::TlsHandshakeTimedOut,
        });
        let due = {
            let mut last = match self.last.lock() {
                Ok(last) => last,
                Err(poisoned) => poisoned.into_inner(),
            };
            let due = last.is_none_or(|at| at.elapsed() >= LOG_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
            warn!(
                %peer,
                cause = %failure,
                unlogged,
                "TLS handshake failed (further failures within 10 s are only counted)"
            );
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Accepts TCP connections until the listener is dropped, each handshake in a task of its own.
async fn accept_loop(
    tcp: TcpListener,
    cert: Arc<ServerCertificate>,
    metrics: Arc<Metrics>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let failures = Arc::new(FailureLog {
        last: Mutex::new(None),
        unlogged: AtomicU64::new(0),
        metrics,
    });
    loop {
        let accepted = tokio::select! {
            () = ready.closed() => break,
            accepted = tcp.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                accept_error(err).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
            failures.record(Failure::Busy, peer);
            continue;
        };
        // Position batches are written as they are made: without TCP_NODELAY, Nagle holds a
        // batch's last segment until the browser's delayed ACK (up to 40 ms on Linux).
        if let Err(err) = stream.set_nodelay(true) {
            debug!(cause = %err, "cannot set TCP_NODELAY on an HTTPS connection");
        }
        let acceptor = TlsAcceptor::from(cert.config());
        let ready = ready.clone();
        let failures = Arc::clone(&failures);
        tokio::spawn(async move {
            let _permit = permit;
            let handshake = async {
                if speaks_plain_http(&stream).await {
                    answer_plain_http(stream).await;
                    return Err(Failure::PlainHttp);
                }
                acceptor.accept(stream).await.map_err(Failure::Handshake)
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                // A send fails only when the server has stopped: the connection is dropped.
                Ok(Ok(tls)) => drop(ready.send((tls, peer)).await),
                Ok(Err(failure)) => failures.record(failure, peer),
                Err(_) => failures.record(Failure::Timeout, peer),
            }
        });
    }
    debug!("HTTPS accept loop stopped");
}

/// As axum's own TCP listener does: a per-connection error is ignored, any other (out of file
/// descriptors) is logged and waited out for a second.
async fn accept_error(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    error!(cause = %err, "HTTPS accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Reloads `cert` now if its files changed (for tests).
#[cfg(test)]
fn reload_now(cert: &ServerCertificate) -> Arc<ServerConfig> {
    cert.expire();
    cert.config()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tls::testing::self_signed;

    #[test]
    fn a_broken_replacement_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = self_signed(dir.path(), "server");
        let metrics = Arc::new(Metrics::default());
        let cert = ServerCertificate::load(&files, Arc::clone(&metrics)).expect("loads");
        let first = cert.config();
        assert!(Arc::ptr_eq(&first, &cert.config()), "unchanged: the same");

        std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nnope\n").expect("write");
        let kept = reload_now(&cert);
        assert!(
            Arc::ptr_eq(&first, &kept),
            "a broken file keeps the old one"
        );
        assert_eq!(metrics.counter(Counter::TlsReloadFailed), 1);

        self_signed(dir.path(), "server");
        let renewed = reload_now(&cert);
        assert!(!Arc::ptr_eq(&first, &renewed), "a good file is taken");
        assert_eq!(metrics.counter(Counter::TlsReloads), 1);
        assert_eq!(renewed.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
