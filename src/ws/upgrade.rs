//! The upgrade checks of a WebSocket endpoint, in the PROTOCOL §11 order once
//! the route and the method are right: HTTP/1.1 and the upgrade headers
//! (`426` / `400`), the key, the version (`426`), the origin (`403`), capacity
//! (`503`), the token (`401`); then the `101`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::auth::Identity;
use crate::http::{
    Decision, Policy, RejectReason, cookie, first_header, header_lines, list_has_token,
    percent_decode, query_param, reject, reject_with,
};

/// The cookie a browser client carries its token in (PROTOCOL §2).
const TOKEN_COOKIE: &[u8] = b"roomcast_token";

/// Which WebSocket endpoint an accepted upgrade is for.
///
/// The shell needs it to pick the message handler (rooms or echo) and, for
/// `/ws/{room}`, the room to join right after `welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws` or `/ws/{room}`.
    Rooms {
        /// The percent-decoded room of `/ws/{room}`. Deliberately not
        /// validated here: the contract wants a bad name answered with an
        /// `invalid_room` error on an open connection, which only the hub can do.
        join: Option<String>,
    },
    /// `/echo` (only with `--echo`).
    Echo,
}

/// What `GET /token/check` found (PROTOCOL §1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    /// The token would be accepted by an upgrade now.
    Valid {
        /// The user id (`sub`).
        user_id: String,
        /// The display name.
        name: String,
        /// `exp`, when the token has one.
        expires_at: Option<u64>,
    },
    /// The token would be refused with `401`; the code names why.
    Refused(&'static str),
}

impl TokenCheck {
    /// The HTTP status and JSON body of the answer. Refusals are `401` and
    /// count as `unauthorized`, like a refused upgrade.
    pub fn answer(&self) -> (u16, String) {
        match self {
            TokenCheck::Valid {
                user_id,
                name,
                expires_at,
            } => (
                200,
                serde_json::json!({
                    "user": {"id": user_id, "name": name},
                    "exp": expires_at,
                })
                .to_string(),
            ),
            TokenCheck::Refused(code) => (401, serde_json::json!({ "error": code }).to_string()),
        }
    }
}

/// A refusal of the upgrade headers: the reason, and the headers its answer
/// carries (none, `Upgrade` or `Sec-WebSocket-Version`).
type Refusal = (RejectReason, &'static [(&'static str, &'static str)]);

/// The checks of a request for a WebSocket endpoint, after the route and the
/// method: an `Upgrade` decision with the `101`, or the first refusal.
pub(crate) fn decide_upgrade(
    endpoint: Endpoint,
    version: u8,
    query: Option<&str>,
    headers: &[httparse::Header<'_>],
    head_len: usize,
    policy: &Policy<'_>,
) -> Decision {
    // A WebSocket upgrade needs HTTP/1.1 (RFC 6455 §4.1).
    if version != 1 {
        return reject(RejectReason::BadRequest);
    }
    let key = match upgrade_key(headers) {
        Ok(key) => key,
        Err((reason, extra_headers)) => return reject_with(reason, extra_headers),
    };

    if let Some(origin) = first_header(headers, "origin")
        && !policy.allowed_origins.is_empty()
        && !policy
            .allowed_origins
            .iter()
            .any(|allowed| allowed.as_bytes() == origin)
    {
        return reject(RejectReason::Origin);
    }

    if policy.open_connections >= policy.max_connections {
        return reject(RejectReason::Capacity);
    }

    let identity = match verify_token(query, headers, policy) {
        Ok(identity) => identity,
        Err(code) => {
            log::debug!("handshake token refused: {code}");
            return reject(RejectReason::Unauthorized);
        }
    };

    Decision::Upgrade {
        response: switching_protocols(key),
        identity,
        endpoint,
        head_len,
    }
}

/// The upgrade headers (`426` without any, `400` when incomplete), the key
/// (once, valid: `400`) and the version (`426`); `Ok` is the key.
fn upgrade_key<'h>(headers: &'h [httparse::Header<'_>]) -> Result<&'h [u8], Refusal> {
    // A `Connection` header without the `upgrade` token (`close`,
    // `keep-alive`) is not an upgrade header: such a request is a plain GET,
    // answered 426 like one without any (§1, §11).
    let has_upgrade = header_lines(headers, "upgrade").next().is_some();
    let has_connection = list_has_token(headers, "connection", b"upgrade");
    match (has_upgrade, has_connection) {
        (false, false) => {
            return Err((RejectReason::UpgradeRequired, &[("Upgrade", "websocket")]));
        }
        (true, true) => {}
        _ => return Err((RejectReason::BadRequest, &[])),
    }
    if !list_has_token(headers, "upgrade", b"websocket") {
        return Err((RejectReason::BadRequest, &[]));
    }
    // RFC 6455 §11.3.1: the key must not appear more than once.
    if header_lines(headers, "sec-websocket-key").nth(1).is_some() {
        return Err((RejectReason::BadRequest, &[]));
    }
    let Some(key) = first_header(headers, "sec-websocket-key") else {
        return Err((RejectReason::BadRequest, &[]));
    };
    if !valid_key(key) {
        return Err((RejectReason::BadRequest, &[]));
    }
    let Some(ws_version) = first_header(headers, "sec-websocket-version") else {
        return Err((RejectReason::BadRequest, &[]));
    };
    if ws_version != b"13" {
        return Err((RejectReason::Version, &[("Sec-WebSocket-Version", "13")]));
    }
    Ok(key)
}

/// RFC 6455 §4.1: the key is the base64 of 16 bytes, so exactly 24 characters.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24 && STANDARD.decode(key).is_ok_and(|raw| raw.len() == 16)
}

/// The complete `101 Switching Protocols` answer to a valid `key`.
fn switching_protocols(key: &[u8]) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key);
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// The token of a request checked at `policy.now_secs`; `Err` is the
/// `/token/check` code. One function for the upgrade and the check, so the
/// check can never answer differently from the upgrade it predicts.
fn verify_token(
    query: Option<&str>,
    headers: &[httparse::Header<'_>],
    policy: &Policy<'_>,
) -> Result<Identity, &'static str> {
    let token = match find_token(query, headers) {
        Some(token) if !token.is_empty() => token,
        _ => return Err("missing"),
    };
    let token = std::str::from_utf8(&token).map_err(|_| "malformed")?;
    policy
        .verifier
        .verify(token, policy.now_secs)
        .map_err(|error| error.code())
}

/// `GET /token/check` (PROTOCOL §1).
pub(crate) fn check_token(
    query: Option<&str>,
    headers: &[httparse::Header<'_>],
    policy: &Policy<'_>,
) -> TokenCheck {
    match verify_token(query, headers, policy) {
        Ok(identity) => TokenCheck::Valid {
            user_id: identity.user_id,
            name: identity.name,
            expires_at: identity.expires_at,
        },
        Err(code) => TokenCheck::Refused(code),
    }
}

/// The token: the `token` query parameter when present (even if invalid),
/// else the first `roomcast_token` cookie. Returned as bytes; the caller checks
/// UTF-8, as a non-UTF-8 token is simply an invalid one.
fn find_token(query: Option<&str>, headers: &[httparse::Header<'_>]) -> Option<Vec<u8>> {
    if let Some(raw) = query.and_then(|q| query_param(q, "token")) {
        // The target's escapes were checked already; a failure here still
        // means "present but unusable", never "absent".
        return Some(percent_decode(raw.as_bytes(), true).unwrap_or_default());
    }
    cookie(headers, TOKEN_COOKIE).map(<[u8]>::to_vec)
}
