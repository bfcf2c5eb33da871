//! What carries a connection's bytes: the socket itself, or TLS over it
//! (`--tls-cert`/`--tls-key`, PROTOCOL §13).
//!
//! rustls is sans-IO like tungstenite: the loop reads ciphertext into it and
//! takes plaintext out, and moves queued plaintext into it only as far as
//! the socket takes the ciphertext, so a slow TLS client never makes the
//! loop encrypt more than one batch ahead of what it could send.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use crate::outbound::{OutboundQueue, Staging};

/// Plaintext moved into rustls per batch: with the staging buffer this is
/// four records of 16 KiB, the largest a record holds.
const TLS_BATCH: usize = 64 * 1024;

/// Why the certificate and key cannot be used; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain file cannot be read or holds no certificate.
    #[error("--tls-cert {path}: {reason}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key file cannot be read or holds no private key.
    #[error("--tls-key {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the certificate (or rustls refuses it).
    #[error("--tls-key {key} does not fit --tls-cert {cert}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What rustls said.
        reason: String,
    },
}

/// Reads a PEM certificate chain and a PKCS#8, PKCS#1 or SEC1 private key
/// into a server configuration: TLS 1.2 and 1.3, ALPN `http/1.1`, the
/// `ring` provider.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_name = cert.display().to_string();
    let key_name = key.display().to_string();
    let certificate_error = |reason: String| TlsError::Certificate {
        path: cert_name.clone(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|error| certificate_error(error.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|error| certificate_error(error.to_string()))?;
    if chain.is_empty() {
        return Err(certificate_error("no certificate in the file".into()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Key {
        path: key_name.clone(),
        reason: error.to_string(),
    })?;
    // ring has no post-quantum key exchange (rustls marks its provider
    // deprecated for that); aws-lc-rs, which has, would need cmake to build.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // A PEM block that decodes but is no usable key is the key file's fault,
    // not a mismatch with the certificate.
    if let Err(error) = provider
        .key_provider
        .load_private_key(private_key.clone_key())
    {
        return Err(TlsError::Key {
            path: key_name,
            reason: error.to_string(),
        });
    }
    let mismatch = |reason: String| TlsError::Mismatch {
        cert: cert_name.clone(),
        key: key_name.clone(),
        reason,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| mismatch(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|error| mismatch(error.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection's socket, with TLS when the server has a certificate.
pub(super) enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream>),
}

/// rustls's server state beside its socket.
pub(super) struct TlsStream {
    socket: TcpStream,
    session: ServerConnection,
    /// The handshake has been seen to finish (reported once).
    handshake_reported: bool,
}

impl Transport {
    /// A transport for an accepted socket: TLS when `tls` is given.
    pub(super) fn new(socket: TcpStream, tls: Option<&Arc<ServerConfig>>) -> io::Result<Self> {
        match tls {
            None => Ok(Transport::Plain(socket)),
            Some(config) => {
                let session =
                    ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
                Ok(Transport::Tls(Box::new(TlsStream {
                    socket,
                    session,
                    handshake_reported: false,
                })))
            }
        }
    }

    /// The socket, for registering with the poll.
    pub(super) fn socket_mut(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(socket) => socket,
            Transport::Tls(tls) => &mut tls.socket,
        }
    }

    /// Whether a short read means the socket ran dry: with TLS it does not
    /// (a record boundary ends a read as well).
    pub(super) fn trusts_short_reads(&self) -> bool {
        matches!(self, Transport::Plain(_))
    }

    /// Whether the TLS handshake is still under way.
    pub(super) fn handshaking(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.session.is_handshaking(),
        }
    }

    /// True once, when a TLS handshake has just finished: the request head
    /// that follows gets its own handshake timeout (§13).
    pub(super) fn take_handshake_done(&mut self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => {
                let done = !tls.session.is_handshaking() && !tls.handshake_reported;
                tls.handshake_reported |= done;
                done
            }
        }
    }

    /// Writes as much of the queue as the socket takes; returns the bytes of
    /// the queue it took (plaintext, with TLS).
    pub(super) fn write_queue(
        &mut self,
        queue: &mut OutboundQueue,
        staging: &mut Staging,
    ) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => queue.write_to(socket, staging),
            Transport::Tls(tls) => tls.write_queue(queue, staging),
        }
    }

    /// Whether bytes wait in TLS for the socket (the queue may be empty).
    pub(super) fn has_pending_output(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.session.wants_write(),
        }
    }

    /// Ends our side: TLS says `close_notify` first (best effort).
    pub(super) fn shutdown_write(&mut self) {
        match self {
            Transport::Plain(socket) => {
                let _ = socket.shutdown(Shutdown::Write);
            }
            Transport::Tls(tls) => {
                tls.session.send_close_notify();
                let _ = tls.flush_tls();
                let _ = tls.socket.shutdown(Shutdown::Write);
            }
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => socket.read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }
}

impl TlsStream {
    /// Plaintext when rustls has some; else ciphertext from the socket
    /// until it gives plaintext, or the socket would block.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.session.reader().read(buf) {
                Ok(read) => return Ok(read),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
            if self.session.read_tls(&mut self.socket)? == 0 {
                return Ok(0);
            }
            if let Err(error) = self.session.process_new_packets() {
                // The alert rustls prepared goes out before the close.
                let _ = self.flush_tls();
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
            // The handshake's answers, session tickets, key updates.
            match self.flush_tls() {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Sends the ciphertext rustls holds, until done or the socket blocks.
    fn flush_tls(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            self.session.write_tls(&mut self.socket)?;
        }
        Ok(())
    }

    /// Encrypts the queue one batch at a time, each batch only once the
    /// previous one has gone to the socket.
    fn write_queue(
        &mut self,
        queue: &mut OutboundQueue,
        staging: &mut Staging,
    ) -> io::Result<usize> {
        let mut taken = 0;
        loop {
            match self.flush_tls() {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(taken),
                Err(error) => return Err(error),
            }
            if queue.is_empty() || self.session.is_handshaking() {
                return Ok(taken);
            }
            let mut batch = Batch {
                writer: self.session.writer(),
                left: TLS_BATCH,
            };
            let moved = queue.write_to(&mut batch, staging)?;
            if moved == 0 {
                return Ok(taken);
            }
            taken += moved;
        }
    }
}

/// rustls's plaintext writer, taking at most one batch: past it, it says
/// `WouldBlock`, as a full socket would.
struct Batch<'a> {
    writer: rustls::Writer<'a>,
    left: usize,
}

impl Write for Batch<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let take = buf.len().min(self.left);
        let written = self.writer.write(buf.get(..take).unwrap_or_default())?;
        if written == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.left -= written;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
