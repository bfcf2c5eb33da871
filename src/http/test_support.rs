//! Fixtures shared by the unit tests of `http` and `ws`: a policy to decide
//! under, tokens signed by hand, requests, and ways to look at a decision.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::auth::{Identity, Verifier};
use crate::http::{Decision, Endpoint, Policy, RejectReason, decide};

pub(crate) const SECRET: &[u8] = b"handshake-test-secret";
pub(crate) const NOW: u64 = 1_700_000_000;
pub(crate) const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An HS256 JWT signed by hand, so the tests exercise the real verifier
/// without depending on any signing helper.
pub(crate) fn sign(secret: &[u8], claims: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

pub(crate) fn token_for(sub: &str) -> String {
    sign(
        SECRET,
        json!({"sub": sub, "name": "Test", "exp": NOW + 3600}),
    )
}

pub(crate) struct Setup {
    pub(crate) verifier: Verifier,
    pub(crate) origins: Vec<String>,
    pub(crate) max_connections: usize,
    pub(crate) open_connections: usize,
    pub(crate) echo_enabled: bool,
    pub(crate) demo_mode: bool,
    pub(crate) api_key: Option<String>,
}

impl Setup {
    pub(crate) fn new() -> Self {
        Setup {
            verifier: Verifier::new(SECRET),
            origins: Vec::new(),
            max_connections: 10,
            open_connections: 0,
            echo_enabled: false,
            demo_mode: false,
            api_key: None,
        }
    }

    pub(crate) fn policy(&self) -> Policy<'_> {
        Policy {
            verifier: &self.verifier,
            allowed_origins: &self.origins,
            max_connections: self.max_connections,
            open_connections: self.open_connections,
            echo_enabled: self.echo_enabled,
            demo_mode: self.demo_mode,
            now_secs: NOW,
            api_key: self.api_key.as_deref(),
            max_body_bytes: 1024,
        }
    }

    pub(crate) fn decide(&self, request: &str) -> Decision {
        decide(request.as_bytes(), &self.policy()).expect("complete head")
    }
}

/// A valid upgrade for `target` with `extra` header lines appended.
pub(crate) fn ws(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {SAMPLE_KEY}\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

pub(crate) fn ws_token(target_without_query: &str, extra: &str) -> String {
    ws(
        &format!("{target_without_query}?token={}", token_for("u1")),
        extra,
    )
}

/// A request with exactly the given header lines (each ending in CRLF).
pub(crate) fn raw(method: &str, target: &str, headers: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n")
}

pub(crate) fn reason_of(decision: &Decision) -> Option<RejectReason> {
    match decision {
        Decision::Reject { reason, .. } => Some(*reason),
        _ => None,
    }
}

#[track_caller]
pub(crate) fn assert_reject(decision: &Decision, expected: RejectReason) {
    assert_eq!(reason_of(decision), Some(expected), "{decision:?}");
}

#[track_caller]
pub(crate) fn expect_upgrade(decision: Decision) -> (Vec<u8>, Identity, Endpoint, usize) {
    match decision {
        Decision::Upgrade {
            response,
            identity,
            endpoint,
            head_len,
        } => (response, identity, endpoint, head_len),
        other => panic!("expected an upgrade, got {other:?}"),
    }
}

pub(crate) fn response_text(decision: &Decision) -> String {
    match decision {
        Decision::Upgrade { response, .. } | Decision::Reject { response, .. } => {
            String::from_utf8_lossy(response).into_owned()
        }
        Decision::Serve { .. } => String::new(),
    }
}
