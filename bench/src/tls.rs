//! `wss://`: the client side of TLS (PROTOCOL §13) for the harness's own
//! loop. This module builds the one [`ClientConfig`] every connection
//! shares; `net.rs` drives each connection's rustls session over its
//! non-blocking socket (ciphertext in and out, plaintext to the frame
//! parser), the same way it drives a plain socket.
//!
//! Trust is explicit: `--ca FILE` (a PEM certificate or CA to trust), or
//! `--insecure-skip-verify`, which accepts any certificate and exists only
//! for benchmarks against a self-signed test certificate.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates from this PEM file are the trust anchors: the server's
    /// chain must lead to one and hold the URL's host (a `subjectAltName`:
    /// DNS `localhost`, IP `127.0.0.1`…).
    Ca(String),
    /// UNSAFE: any certificate for any name. The handshake signature is
    /// still checked against the certificate's key, so the client does the
    /// same crypto work as a verifying one.
    InsecureSkipVerify,
}

impl Trust {
    /// The label in the JSON line's params.
    pub fn label(&self) -> &'static str {
        match self {
            Trust::Ca(_) => "ca",
            Trust::InsecureSkipVerify => "insecure-skip-verify",
        }
    }
}

/// ring, as the server uses (it builds with the C compiler alone), with
/// the key exchange groups offered in the order browsers and most clients
/// use: X25519, then P-256, then P-384. A TLS 1.3 server takes the client's
/// first group it supports, so this order decides the handshake's cost; the
/// ring provider's own default list in this rustls puts P-384 first.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    // ring has no post-quantum key exchange (rustls marks its provider
    // deprecated for that); the server makes the same choice.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(provider)
}

/// The configuration every `wss://` connection of the run shares: TLS 1.3
/// and 1.2, ALPN `http/1.1`, key exchange X25519 first, no session
/// resumption (every connection pays a full handshake, as distinct clients
/// would).
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = match trust {
        Trust::Ca(path) => {
            let roots = load_roots(Path::new(path))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("--ca {shown}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--ca {shown}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("--ca {shown}: no PEM certificate in the file"));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("--ca {shown}: not usable as a trust anchor: {e}"))?;
    }
    Ok(roots)
}

/// A new client session for one connection to `name`.
pub fn connect(
    config: &Arc<ClientConfig>,
    name: ServerName<'static>,
) -> std::io::Result<ClientConnection> {
    ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)
}

/// What the first finished handshake of the run negotiated (version,
/// cipher suite, key exchange, ALPN), for the report.
static NEGOTIATED: OnceLock<String> = OnceLock::new();

/// Records the first finished handshake; later calls return at once.
#[inline]
pub fn note_negotiated(conn: &ClientConnection) {
    if NEGOTIATED.get().is_some() || conn.is_handshaking() {
        return;
    }
    let version = conn
        .protocol_version()
        .map_or_else(|| "?".to_string(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "?".to_string(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or_else(|| "?".to_string(), |g| format!("{:?}", g.name()));
    let alpn = conn.alpn_protocol().map_or_else(
        || "none".to_string(),
        |a| String::from_utf8_lossy(a).into_owned(),
    );
    let _ = NEGOTIATED.set(format!("{version} {suite} {group} alpn={alpn}"));
}

/// The first handshake's parameters, once one finished.
pub fn negotiated() -> Option<&'static str> {
    NEGOTIATED.get().map(String::as_str)
}

/// `--insecure-skip-verify`: every certificate, every name. For benchmarks
/// against a self-signed test certificate only.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
