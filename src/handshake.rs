//! The HTTP side of a connection: one request head in, one decision out.
//!
//! Everything that can refuse a client is decided here, before any `101`, so a
//! rejected request never reaches the message loop (PROTOCOL §2). The module is
//! sans-IO — it reads bytes and returns bytes, and the time comes in through
//! [`Policy`] — which keeps every rule of PROTOCOL §11 "Handshake" testable
//! without sockets, and lets the event loop call [`decide`] again after every
//! read without any parser state to carry.
//!
//! Decisions taken where the contract leaves room (all covered by the tests):
//! - Checks run in the §11 order and the first failure answers: size (`431`),
//!   malformed (`400`), path (`404`), method (`405`), upgrade headers (`426` /
//!   `400`), version (`426`), origin (`403`), capacity (`503`), token (`401`).
//! - More than 64 header lines is answered `431` (it is a head too large for
//!   this server), any other parse error `400`.
//! - "Malformed" includes a request target with a broken `%` escape anywhere
//!   (path or query) and a room in `/ws/{room}` that is not UTF-8 once decoded.
//! - `HTTP/1.0` is served on the plain endpoints, but a WebSocket endpoint needs
//!   HTTP/1.1 (RFC 6455 §4.1): `/ws…` or `/echo` over 1.0 is `400`, checked right
//!   after the method.
//! - Routing looks at the raw path (before percent-decoding, without the
//!   query); only the room segment of `/ws/{room}` is decoded, with `+` kept.
//!   Query values are form-decoded (`+` is a space), the first occurrence of a
//!   parameter wins, and an empty `name` counts as no name.
//! - Header names are matched case-insensitively. `Sec-WebSocket-Key` must
//!   appear once (RFC 6455 §11.3.1, else `400`); for the other single-valued
//!   headers (`Sec-WebSocket-Version`, `Origin`) the first line wins. The list-valued ones (`Upgrade`, `Connection`, `Cookie`) are read
//!   across all their lines, as HTTP defines a repeated list header to mean the
//!   concatenation (a proxy may split `Connection: keep-alive, Upgrade`).
//! - `Host` is not required: it carries nothing this server uses.
//! - No extensions or subprotocols are negotiated.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::auth::{Identity, Verifier};

/// The largest request head (request line through the blank line) the server
/// reads; a client that needs more is refused with `431` rather than buffered.
pub const MAX_HEAD_BYTES: usize = 8192;

/// Header lines parsed per request; the array lives on the stack, so a client
/// cannot make the server allocate for headers. More lines → `431`.
const MAX_HEADERS: usize = 64;

/// Content type of every refusal body.
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// The cookie a browser client carries its token in (PROTOCOL §2).
const TOKEN_COOKIE: &[u8] = b"roomcast_token";

/// Why a request was refused; `label()` gives the metrics label.
///
/// One closed set so that `roomcast_handshakes_rejected_total` can export every
/// label from start-up (PROTOCOL §11 "Finer points") and the shell cannot invent
/// a reason the stats endpoint does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Head over [`MAX_HEAD_BYTES`] or over 64 header lines (`431`).
    TooLarge,
    /// Malformed request or an incomplete WebSocket handshake (`400`).
    BadRequest,
    /// No such endpoint, or one switched off by configuration (`404`).
    NotFound,
    /// Known endpoint, other method (`405`, with `Allow`).
    Method,
    /// A WebSocket endpoint asked for without any upgrade headers (`426`).
    UpgradeRequired,
    /// `Sec-WebSocket-Version` other than 13 (`426`, advertising 13).
    Version,
    /// `Origin` outside `--allowed-origin` (`403`).
    Origin,
    /// `--max-connections` upgraded connections already open (`503`).
    Capacity,
    /// No token, or one the verifier refused (`401`).
    Unauthorized,
    /// The head did not arrive within the handshake timeout; decided by the
    /// shell (which owns the clock), listed here so it is counted like the rest.
    Timeout,
    /// The server API was asked for but no `--api-key` is configured (`403`).
    ApiDisabled,
    /// A request body over `--max-message-size` (`413`).
    PayloadTooLarge,
}

impl RejectReason {
    /// Every reason, so the metrics can be registered at 0 before the first
    /// rejection happens.
    pub const ALL: [RejectReason; 12] = [
        RejectReason::TooLarge,
        RejectReason::BadRequest,
        RejectReason::NotFound,
        RejectReason::Method,
        RejectReason::UpgradeRequired,
        RejectReason::Version,
        RejectReason::Origin,
        RejectReason::Capacity,
        RejectReason::Unauthorized,
        RejectReason::Timeout,
        RejectReason::ApiDisabled,
        RejectReason::PayloadTooLarge,
    ];

    /// The `reason` label of `roomcast_handshakes_rejected_total` and the key in
    /// `/api/stats`; these exact strings are part of the contract (§11 "Stats").
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::BadRequest => "bad_request",
            RejectReason::NotFound => "not_found",
            RejectReason::Method => "method",
            RejectReason::UpgradeRequired => "upgrade_required",
            RejectReason::Version => "version",
            RejectReason::Origin => "origin",
            RejectReason::Capacity => "capacity",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Timeout => "timeout",
            RejectReason::ApiDisabled => "api_disabled",
            RejectReason::PayloadTooLarge => "payload_too_large",
        }
    }

    /// The HTTP status the refusal is answered with. `Timeout` maps to `408`
    /// for completeness, although the contract lets the shell simply close.
    pub fn status(self) -> u16 {
        match self {
            RejectReason::TooLarge => 431,
            RejectReason::BadRequest => 400,
            RejectReason::NotFound => 404,
            RejectReason::Method => 405,
            RejectReason::UpgradeRequired | RejectReason::Version => 426,
            RejectReason::Origin => 403,
            RejectReason::Capacity => 503,
            RejectReason::Unauthorized => 401,
            RejectReason::Timeout => 408,
            RejectReason::ApiDisabled => 403,
            RejectReason::PayloadTooLarge => 413,
        }
    }
}

/// What the server knows when it decides (all borrowed; time as a parameter).
///
/// Built by the shell for each decision, so configuration and live counters
/// reach the rules without this module holding any state or reading a clock.
pub struct Policy<'a> {
    /// Checks the token (signature, algorithm, expiry) at `now_secs`.
    pub verifier: &'a Verifier,
    /// `--allowed-origin` values, compared byte for byte with `Origin`; empty
    /// means any origin, as when the flag is not given.
    pub allowed_origins: &'a [String],
    /// `--max-connections`: the ceiling on upgraded WebSocket connections.
    pub max_connections: usize,
    /// Upgraded WebSocket connections open now; plain HTTP requests and
    /// sockets still in their handshake do not count.
    pub open_connections: usize,
    /// `--echo`: whether `/echo` exists (otherwise it is `404`).
    pub echo_enabled: bool,
    /// True when no `--jwt-secret` was given: only then does `/demo/token`
    /// exist (otherwise it is `404` for every method).
    pub demo_mode: bool,
    /// Seconds since the Unix epoch, for the token's `exp` / `nbf`.
    pub now_secs: u64,
    /// `--api-key`: the bearer key of the server API; `None` disables it (`403`).
    pub api_key: Option<&'a str>,
    /// `--max-message-size`: the largest request body accepted (`413` above).
    pub max_body_bytes: usize,
}

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

/// The outcome of one complete request head.
///
/// Every variant is final for this head; the shell only acts on it (write,
/// switch to WebSocket, close) and counts rejections by `reason`.
#[derive(Debug)]
pub enum Decision {
    /// Send `response` (the 101), then speak WebSocket; `head_len` bytes of the
    /// buffer were the head: bytes after it are the first frame bytes.
    Upgrade {
        /// The complete `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Who the verified token says the client is.
        identity: Identity,
        /// Rooms or echo, and the room to join.
        endpoint: Endpoint,
        /// Length of the request head within the buffer.
        head_len: usize,
    },
    /// A plain HTTP answer the shell serves (health, demo token) — see
    /// [`HttpRoute`]. The answer needs state this module does not have.
    Serve {
        /// Which answer to build.
        route: HttpRoute,
        /// Length of the request head within the buffer; a later request on a
        /// kept-alive connection starts after it (and after any body).
        head_len: usize,
        /// `Content-Length` of the body that follows the head (0 without one).
        body_len: usize,
        /// Whether the connection stays open for another request afterwards.
        keep_alive: bool,
    },
    /// Refuse: write `response` (it carries `Connection: close`), then close
    /// the socket.
    Reject {
        /// For `roomcast_handshakes_rejected_total`.
        reason: RejectReason,
        /// The complete HTTP error response.
        response: Vec<u8>,
    },
}

/// A plain HTTP endpoint the shell answers itself.
///
/// Its body depends on server state (Redis health, the secret, randomness for
/// guest names), which stays out of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpRoute {
    /// `GET /health`.
    Health,
    /// `GET /`: the demo chat page.
    Page,
    /// `GET /roomcast.js`: the page's client module.
    ClientScript,
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// `GET /api/stats`: the same figures as JSON.
    Stats,
    /// `POST /api/publish` with a verified API key; the body follows the head.
    Publish,
    /// `POST /api/disconnect` with a verified API key; the body follows the head.
    Disconnect,
    /// `GET /token/check`: the token checked as an upgrade would check it.
    TokenCheck(TokenCheck),
    /// `GET /demo/token` (demo mode only).
    DemoToken {
        /// The percent-decoded query `name` (`+` as space); `None` when absent
        /// or empty, so the shell makes a `guest-XXXX` name.
        name: Option<String>,
    },
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

/// Feed the bytes received so far (from the first byte of the request).
/// `None` = need more bytes (head incomplete and under the cap).
///
/// Stateless by design: the shell calls it again with the whole buffer after
/// every read, and only the first [`MAX_HEAD_BYTES`] bytes are ever parsed, so
/// the work per call is bounded however much a client sends.
pub fn decide(buffer: &[u8], policy: &Policy<'_>) -> Option<Decision> {
    // Parsing only the first MAX_HEAD_BYTES makes "head too large" win over any
    // error that lies beyond the limit, and keeps the decision identical however
    // the bytes were split across reads.
    let window = buffer.get(..MAX_HEAD_BYTES).unwrap_or(buffer);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD_BYTES => {
            return Some(reject(RejectReason::TooLarge));
        }
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => return Some(reject(RejectReason::TooLarge)),
        Err(_) => return Some(reject(malformed_head_reason(buffer))),
    };
    let decision = decide_head(&request, head_len, policy);
    if let Decision::Reject { reason, .. } = &decision {
        log::debug!("handshake refused: {}", reason.label());
    }
    Some(decision)
}

/// A malformed head is still "too large" first when it is (§11 order): when
/// its blank line ends past the cap, or more than the cap arrived without one.
/// A malformed head whose end is not in sight yet is answered `400` at once:
/// it cannot become valid, and waiting for 8 KiB of garbage helps nobody.
fn malformed_head_reason(buffer: &[u8]) -> RejectReason {
    let head_end = buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|position| position + 4);
    match head_end {
        Some(end) if end > MAX_HEAD_BYTES => RejectReason::TooLarge,
        None if buffer.len() > MAX_HEAD_BYTES => RejectReason::TooLarge,
        _ => RejectReason::BadRequest,
    }
}

/// Build a complete HTTP/1.1 response with Content-Length, the given content
/// type and `Connection: close`.
///
/// Shared by the refusals here and the shell's plain endpoints so every
/// non-`101` answer is framed the same way. CR and LF are dropped from the
/// content type and extra headers, so a caller passing a client-influenced
/// value cannot split the response.
pub fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    response_with(status, content_type, body, extra_headers, false)
}

/// As [`response`], saying `Connection: keep-alive` when `keep_alive`.
pub fn response_with(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = String::with_capacity(128);
    head.push_str("HTTP/1.1 ");
    head.push_str(&status.to_string());
    head.push(' ');
    head.push_str(reason_phrase(status));
    head.push_str("\r\nContent-Type: ");
    push_field(&mut head, content_type);
    head.push_str("\r\nContent-Length: ");
    head.push_str(&body.len().to_string());
    head.push_str(if keep_alive {
        "\r\nConnection: keep-alive\r\n"
    } else {
        "\r\nConnection: close\r\n"
    });
    for (name, value) in extra_headers {
        push_field(&mut head, name);
        head.push_str(": ");
        push_field(&mut head, value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Append a header name or value without any CR or LF.
fn push_field(out: &mut String, field: &str) {
    out.extend(field.chars().filter(|c| *c != '\r' && *c != '\n'));
}

/// The reason phrase for the statuses this server sends; others get an empty
/// phrase, which HTTP/1.1 allows.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A refusal with the standard short body.
fn reject(reason: RejectReason) -> Decision {
    reject_with(reason, &[])
}

/// A refusal with extra headers (`Allow`, `Sec-WebSocket-Version`, `Upgrade`).
fn reject_with(reason: RejectReason, extra_headers: &[(&str, &str)]) -> Decision {
    let status = reason.status();
    let body = format!("{status} {}\n", reason_phrase(status));
    Decision::Reject {
        reason,
        response: response(status, TEXT_PLAIN, body.as_bytes(), extra_headers),
    }
}

/// Where a request goes, before method and headers are looked at.
enum Route {
    /// `/ws` or `/ws/{room}` (room already percent-decoded).
    Rooms(Option<String>),
    /// `/echo`.
    Echo,
    /// `/health`.
    Health,
    /// `/demo/token`.
    DemoToken,
    /// `/token/check`.
    TokenCheck,
    /// A plain `GET` endpoint answered from server state.
    Plain(HttpRoute),
    /// A `POST` endpoint of the server API.
    Api(HttpRoute),
}

impl Route {
    /// The one method each endpoint answers; also the `Allow` header of a 405.
    fn method(&self) -> &'static str {
        match self {
            Route::Rooms(_)
            | Route::Echo
            | Route::Health
            | Route::DemoToken
            | Route::TokenCheck
            | Route::Plain(_) => "GET",
            Route::Api(_) => "POST",
        }
    }
}

/// The route table. `Err` is the refusal: `404` for unknown (or switched-off)
/// paths, `400` for a room segment that does not decode.
fn route(path: &str, policy: &Policy<'_>) -> Result<Route, RejectReason> {
    match path {
        "/ws" => Ok(Route::Rooms(None)),
        "/health" => Ok(Route::Health),
        "/echo" if policy.echo_enabled => Ok(Route::Echo),
        "/demo/token" if policy.demo_mode => Ok(Route::DemoToken),
        "/token/check" => Ok(Route::TokenCheck),
        "/" => Ok(Route::Plain(HttpRoute::Page)),
        "/roomcast.js" => Ok(Route::Plain(HttpRoute::ClientScript)),
        "/metrics" => Ok(Route::Plain(HttpRoute::Metrics)),
        "/api/stats" => Ok(Route::Plain(HttpRoute::Stats)),
        "/api/publish" => Ok(Route::Api(HttpRoute::Publish)),
        "/api/disconnect" => Ok(Route::Api(HttpRoute::Disconnect)),
        _ => match path.strip_prefix("/ws/") {
            // Exactly one non-empty segment: `/ws/` and `/ws/a/b` are unknown.
            Some(room) if !room.is_empty() && !room.contains('/') => {
                let decoded =
                    percent_decode(room.as_bytes(), false).ok_or(RejectReason::BadRequest)?;
                let room = String::from_utf8(decoded).map_err(|_| RejectReason::BadRequest)?;
                Ok(Route::Rooms(Some(room)))
            }
            _ => Err(RejectReason::NotFound),
        },
    }
}

/// Apply the §11 rules after the size check, to a complete parsed head.
/// A `HEAD` request is refused like any other unserved method, and its
/// refusal carries no body (RFC 9110 §9.3.2): the headers, `Content-Length`
/// included, are those the body would have had.
fn decide_head(
    request: &httparse::Request<'_, '_>,
    head_len: usize,
    policy: &Policy<'_>,
) -> Decision {
    let mut decision = decide_request(request, head_len, policy);
    if request.method == Some("HEAD")
        && let Decision::Reject { response, .. } = &mut decision
        && let Some(end) = find_subsequence(response, b"\r\n\r\n")
    {
        response.truncate(end + 4);
    }
    decision
}

fn find_subsequence(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn decide_request(
    request: &httparse::Request<'_, '_>,
    head_len: usize,
    policy: &Policy<'_>,
) -> Decision {
    // httparse fills all three on a complete parse; treat anything else as
    // malformed rather than trusting that.
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return reject(RejectReason::BadRequest);
    };
    let headers: &[httparse::Header<'_>] = request.headers;

    // Malformed: a broken `%` escape anywhere in the target.
    if !percent_well_formed(target.as_bytes()) {
        return reject(RejectReason::BadRequest);
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };

    let route = match route(path, policy) {
        Ok(route) => route,
        Err(reason) => return reject(reason),
    };

    let allowed = route.method();
    if method != allowed {
        return reject_with(RejectReason::Method, &[("Allow", allowed)]);
    }

    let keep_alive = version == 1 && !list_has_token(headers, "connection", b"close");
    let endpoint = match route {
        Route::Health => {
            return Decision::Serve {
                route: HttpRoute::Health,
                head_len,
                body_len: 0,
                keep_alive,
            };
        }
        Route::Plain(route) => {
            return Decision::Serve {
                route,
                head_len,
                body_len: 0,
                keep_alive,
            };
        }
        Route::Api(route) => return decide_api(route, headers, head_len, keep_alive, policy),
        Route::DemoToken => {
            let name = match query.and_then(|q| query_param(q, "name")) {
                None => None,
                Some(raw) => match percent_decode(raw.as_bytes(), true).map(String::from_utf8) {
                    Some(Ok(name)) if name.is_empty() => None,
                    Some(Ok(name)) => Some(name),
                    _ => return reject(RejectReason::BadRequest),
                },
            };
            return Decision::Serve {
                route: HttpRoute::DemoToken { name },
                head_len,
                body_len: 0,
                keep_alive,
            };
        }
        Route::TokenCheck => {
            return Decision::Serve {
                route: HttpRoute::TokenCheck(check_token(query, headers, policy)),
                head_len,
                body_len: 0,
                keep_alive,
            };
        }
        Route::Rooms(join) => Endpoint::Rooms { join },
        Route::Echo => Endpoint::Echo,
    };

    // A WebSocket upgrade needs HTTP/1.1 (RFC 6455 §4.1).
    if version != 1 {
        return reject(RejectReason::BadRequest);
    }

    // A `Connection` header without the `upgrade` token (`close`,
    // `keep-alive`) is not an upgrade header: such a request is a plain GET,
    // answered 426 like one without any (§1, §11).
    let has_upgrade = header_lines(headers, "upgrade").next().is_some();
    let has_connection = list_has_token(headers, "connection", b"upgrade");
    match (has_upgrade, has_connection) {
        (false, false) => {
            return reject_with(RejectReason::UpgradeRequired, &[("Upgrade", "websocket")]);
        }
        (true, true) => {}
        _ => return reject(RejectReason::BadRequest),
    }
    if !list_has_token(headers, "upgrade", b"websocket") {
        return reject(RejectReason::BadRequest);
    }
    // RFC 6455 §11.3.1: the key must not appear more than once.
    if header_lines(headers, "sec-websocket-key").nth(1).is_some() {
        return reject(RejectReason::BadRequest);
    }
    let Some(key) = first_header(headers, "sec-websocket-key") else {
        return reject(RejectReason::BadRequest);
    };
    if !valid_key(key) {
        return reject(RejectReason::BadRequest);
    }
    let Some(ws_version) = first_header(headers, "sec-websocket-version") else {
        return reject(RejectReason::BadRequest);
    };
    if ws_version != b"13" {
        return reject_with(RejectReason::Version, &[("Sec-WebSocket-Version", "13")]);
    }

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

    let accept = tungstenite::handshake::derive_accept_key(key);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes();
    Decision::Upgrade {
        response,
        identity,
        endpoint,
        head_len,
    }
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
fn check_token(
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

/// The server API's checks (§6): a configured key (`403`), the bearer key
/// compared in constant time (`401`), a body framed by `Content-Length` and no
/// larger than `--max-message-size` (`413`).
fn decide_api(
    route: HttpRoute,
    headers: &[httparse::Header<'_>],
    head_len: usize,
    keep_alive: bool,
    policy: &Policy<'_>,
) -> Decision {
    // An empty key is no key: it must never match a missing `Authorization`.
    let Some(key) = policy.api_key.filter(|key| !key.is_empty()) else {
        return reject(RejectReason::ApiDisabled);
    };
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let presented = first_header(headers, "authorization")
        .and_then(|value| {
            let (scheme, credentials) = value.split_at_checked(7)?;
            scheme
                .eq_ignore_ascii_case(b"bearer ")
                .then_some(credentials)
        })
        .unwrap_or_default();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(presented, key.as_bytes())) {
        return reject(RejectReason::Unauthorized);
    }
    if first_header(headers, "transfer-encoding").is_some() {
        // Only Content-Length framing is spoken here; chunked bodies are refused.
        return reject(RejectReason::BadRequest);
    }
    let Some(body_len) = content_length(headers) else {
        return reject(RejectReason::BadRequest);
    };
    if body_len > policy.max_body_bytes {
        return reject(RejectReason::PayloadTooLarge);
    }
    Decision::Serve {
        route,
        head_len,
        body_len,
        keep_alive,
    }
}

/// The body length: 0 without `Content-Length`; `None` (a `400`) unless every
/// `Content-Length` line is the same run of digits (RFC 9112 §6.3).
fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
    let mut length = None;
    for value in header_lines(headers, "content-length") {
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let parsed = std::str::from_utf8(value).ok()?.parse::<usize>().ok()?;
        if length.is_some_and(|earlier| earlier != parsed) {
            return None;
        }
        length = Some(parsed);
    }
    Some(length.unwrap_or(0))
}

/// Values (trimmed of surrounding whitespace) of every line of header `name`.
fn header_lines<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |header| header.name.eq_ignore_ascii_case(name))
        .map(|header| header.value.trim_ascii())
}

/// The first line of a single-valued header.
fn first_header<'h>(headers: &'h [httparse::Header<'_>], name: &'static str) -> Option<&'h [u8]> {
    header_lines(headers, name).next()
}

/// Whether a comma-separated list header, across all its lines, contains
/// `token` (ASCII case-insensitive).
fn list_has_token(headers: &[httparse::Header<'_>], name: &'static str, token: &[u8]) -> bool {
    header_lines(headers, name).any(|value| {
        value
            .split(|b| *b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// RFC 6455 §4.1: the key is the base64 of 16 bytes, so exactly 24 characters.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24 && STANDARD.decode(key).is_ok_and(|raw| raw.len() == 16)
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
    header_lines(headers, "cookie").find_map(|line| {
        line.split(|b| *b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            let (name, value) = pair.split_at(eq);
            if name.trim_ascii() != TOKEN_COOKIE {
                return None;
            }
            let value = value.get(1..).unwrap_or_default().trim_ascii();
            // RFC 6265 allows a value wrapped in double quotes.
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            Some(value.to_vec())
        })
    })
}

/// The raw (still encoded) value of the first query parameter whose decoded
/// name is `key`; a parameter without `=` has an empty value.
fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name.as_bytes(), true)? == key.as_bytes()).then_some(value)
    })
}

/// The value of one hex digit.
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode `%XX` escapes (and `+` as a space when `plus_as_space`, as in a
/// query); `None` when an escape is broken. Never longer than the input.
fn percent_decode(input: &[u8], plus_as_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let high = bytes.next().and_then(hex_digit)?;
                let low = bytes.next().and_then(hex_digit)?;
                out.push(high << 4 | low);
            }
            b'+' if plus_as_space => out.push(b' '),
            _ => out.push(b),
        }
    }
    Some(out)
}

/// Whether every `%` is followed by two hex digits, without allocating.
fn percent_well_formed(input: &[u8]) -> bool {
    let mut bytes = input.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'%'
            && (bytes.next().and_then(hex_digit).is_none()
                || bytes.next().and_then(hex_digit).is_none())
        {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, Mac};
    use serde_json::json;
    use sha2::Sha256;

    const SECRET: &[u8] = b"handshake-test-secret";
    const NOW: u64 = 1_700_000_000;
    const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    /// An HS256 JWT signed by hand, so the tests exercise the real verifier
    /// without depending on any signing helper.
    fn sign(secret: &[u8], claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    fn token_for(sub: &str) -> String {
        sign(
            SECRET,
            json!({"sub": sub, "name": "Test", "exp": NOW + 3600}),
        )
    }

    struct Setup {
        verifier: Verifier,
        origins: Vec<String>,
        max_connections: usize,
        open_connections: usize,
        echo_enabled: bool,
        demo_mode: bool,
        api_key: Option<String>,
    }

    impl Setup {
        fn new() -> Self {
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

        fn policy(&self) -> Policy<'_> {
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

        fn decide(&self, request: &str) -> Decision {
            decide(request.as_bytes(), &self.policy()).expect("complete head")
        }
    }

    /// A valid upgrade for `target` with `extra` header lines appended.
    fn ws(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {SAMPLE_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn ws_token(target_without_query: &str, extra: &str) -> String {
        ws(
            &format!("{target_without_query}?token={}", token_for("u1")),
            extra,
        )
    }

    /// A request with exactly the given header lines (each ending in CRLF).
    fn raw(method: &str, target: &str, headers: &str) -> String {
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n")
    }

    fn reason_of(decision: &Decision) -> Option<RejectReason> {
        match decision {
            Decision::Reject { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[track_caller]
    fn assert_reject(decision: &Decision, expected: RejectReason) {
        assert_eq!(reason_of(decision), Some(expected), "{decision:?}");
    }

    #[track_caller]
    fn expect_upgrade(decision: Decision) -> (Vec<u8>, Identity, Endpoint, usize) {
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

    fn response_text(decision: &Decision) -> String {
        match decision {
            Decision::Upgrade { response, .. } | Decision::Reject { response, .. } => {
                String::from_utf8_lossy(response).into_owned()
            }
            Decision::Serve { .. } => String::new(),
        }
    }

    /// Comparable summary of a decision (Decision itself has no PartialEq).
    fn summary(decision: &Option<Decision>) -> String {
        match decision {
            None => "incomplete".to_string(),
            Some(Decision::Upgrade {
                response,
                identity,
                endpoint,
                head_len,
            }) => format!(
                "upgrade {} {endpoint:?} {head_len} {}",
                identity.user_id,
                String::from_utf8_lossy(response)
            ),
            Some(Decision::Serve {
                route, head_len, ..
            }) => format!("serve {route:?} {head_len}"),
            Some(Decision::Reject { reason, response }) => {
                format!("reject {reason:?} {}", String::from_utf8_lossy(response))
            }
        }
    }

    fn token_check_of(request: &str) -> TokenCheck {
        match Setup::new().decide(request) {
            Decision::Serve {
                route: HttpRoute::TokenCheck(check),
                ..
            } => check,
            other => panic!("expected a token check, got {other:?}"),
        }
    }

    #[test]
    fn token_check_predicts_the_upgrade() {
        let valid = token_check_of(&raw(
            "GET",
            &format!("/token/check?token={}", token_for("u1")),
            "",
        ));
        assert_eq!(
            valid,
            TokenCheck::Valid {
                user_id: "u1".into(),
                name: "Test".into(),
                expires_at: Some(NOW + 3600),
            }
        );
        assert_eq!(valid.answer().0, 200);
        let expired = sign(SECRET, json!({"sub": "u1", "exp": NOW}));
        for (target, headers, code) in [
            ("/token/check".to_string(), "", "missing"),
            ("/token/check?token=".to_string(), "", "missing"),
            ("/token/check?token=x.y".to_string(), "", "malformed"),
            (
                format!(
                    "/token/check?token={}",
                    sign(b"other", json!({"sub": "u1"}))
                ),
                "",
                "bad_signature",
            ),
            (format!("/token/check?token={expired}"), "", "expired"),
            (
                "/token/check".to_string(),
                "Cookie: roomcast_token=nope\r\n",
                "malformed",
            ),
        ] {
            let check = token_check_of(&raw("GET", &target, headers));
            assert_eq!(check, TokenCheck::Refused(code), "{target}");
            assert_eq!(check.answer(), (401, format!(r#"{{"error":"{code}"}}"#)));
            // The same token on an upgrade is refused.
            let upgrade = ws(&target.replacen("/token/check", "/ws", 1), headers);
            assert_reject(&Setup::new().decide(&upgrade), RejectReason::Unauthorized);
        }
    }

    #[test]
    fn connection_without_the_upgrade_token_is_a_plain_get() {
        let setup = Setup::new();
        for headers in ["Connection: close\r\n", "Connection: keep-alive\r\n"] {
            assert_reject(
                &setup.decide(&raw("GET", "/ws", headers)),
                RejectReason::UpgradeRequired,
            );
        }
        let upgrade_only = "Upgrade: websocket\r\nConnection: keep-alive\r\n";
        assert_reject(
            &setup.decide(&raw("GET", "/ws", upgrade_only)),
            RejectReason::BadRequest,
        );
    }

    #[test]
    fn a_repeated_key_is_refused() {
        let request = ws_token("/ws", &format!("Sec-WebSocket-Key: {SAMPLE_KEY}\r\n"));
        assert_reject(&Setup::new().decide(&request), RejectReason::BadRequest);
    }

    #[test]
    fn an_empty_api_key_is_no_key() {
        let mut setup = Setup::new();
        setup.api_key = Some(String::new());
        let publish = raw("POST", "/api/publish", "Content-Length: 0\r\n");
        assert_reject(&setup.decide(&publish), RejectReason::ApiDisabled);
    }

    #[test]
    fn labels_statuses_and_all_are_consistent() {
        let labels: Vec<&str> = RejectReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "too_large",
                "bad_request",
                "not_found",
                "method",
                "upgrade_required",
                "version",
                "origin",
                "capacity",
                "unauthorized",
                "timeout",
                "api_disabled",
                "payload_too_large"
            ]
        );
        let statuses: Vec<u16> = RejectReason::ALL.iter().map(|r| r.status()).collect();
        assert_eq!(
            statuses,
            [431, 400, 404, 405, 426, 426, 403, 503, 401, 408, 403, 413]
        );
    }

    /// RFC 6455 §1.3's worked example. (The value is the RFC's and matches
    /// base64(SHA-1(key + GUID)).)
    #[test]
    fn accept_key_matches_rfc_6455_sample() {
        let setup = Setup::new();
        let (response, identity, endpoint, head_len) =
            expect_upgrade(setup.decide(&ws_token("/ws", "")));
        assert_eq!(
            String::from_utf8(response).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        assert_eq!(identity.user_id, "u1");
        assert_eq!(endpoint, Endpoint::Rooms { join: None });
        assert_eq!(head_len, ws_token("/ws", "").len());
    }

    #[test]
    fn partial_heads_need_more_bytes() {
        let setup = Setup::new();
        let request = ws_token("/ws", "");
        for end in 0..request.len() {
            assert!(
                decide(&request.as_bytes()[..end], &setup.policy()).is_none(),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn split_heads_decide_like_whole_ones() {
        let mut setup = Setup::new();
        setup.demo_mode = true;
        let requests = [
            ws_token("/ws/lobby", ""),
            ws_token("/ws", "Origin: https://x\r\n"),
            ws("/ws", ""),
            raw("GET", "/ws", ""),
            raw("GET", "/health", ""),
            raw("GET", "/demo/token?name=A+B", ""),
            raw("POST", "/ws", ""),
            raw("GET", "/nope", ""),
            "GET /ws HTTP/1.1\r\nBroken header\r\n\r\n".to_string(),
            "\x16\x03\x01\x02\x00garbage".to_string(),
            format!("GET /ws HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000)),
        ];
        for request in &requests {
            let bytes = request.as_bytes();
            let whole = summary(&decide(bytes, &setup.policy()));
            for split in 0..=bytes.len() {
                let first = decide(&bytes[..split], &setup.policy());
                let seen = if first.is_some() {
                    summary(&first)
                } else {
                    summary(&decide(bytes, &setup.policy()))
                };
                assert_eq!(seen, whole, "split at {split} of {request:?}");
            }
        }
    }

    #[test]
    fn bytes_after_the_head_are_left_for_the_frame_parser() {
        let setup = Setup::new();
        let request = ws_token("/ws", "");
        let mut buffer = request.clone().into_bytes();
        buffer.extend_from_slice(b"\x81\x85abcd\x00\x00\x00\x00\x00");
        let decision = decide(&buffer, &setup.policy()).unwrap();
        let (_, _, _, head_len) = expect_upgrade(decision);
        assert_eq!(head_len, request.len());

        let mut buffer = raw("GET", "/health", "").into_bytes();
        let len = buffer.len();
        buffer.extend_from_slice(b"GET /health HTTP/1.1\r\n");
        match decide(&buffer, &setup.policy()) {
            Some(Decision::Serve {
                route: HttpRoute::Health,
                head_len,
                ..
            }) => assert_eq!(head_len, len),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_api_checks_key_then_body_size() {
        let mut setup = Setup::new();
        let publish = |headers: &str| raw("POST", "/api/publish", headers);
        assert_reject(
            &setup.decide(&publish("Authorization: Bearer k\r\n")),
            RejectReason::ApiDisabled,
        );
        setup.api_key = Some("k".into());
        assert_reject(&setup.decide(&publish("")), RejectReason::Unauthorized);
        assert_reject(
            &setup.decide(&publish("Authorization: Bearer wrong\r\n")),
            RejectReason::Unauthorized,
        );
        assert_reject(
            &setup.decide(&publish(
                "Authorization: Bearer k\r\nContent-Length: 1025\r\n",
            )),
            RejectReason::PayloadTooLarge,
        );
        assert_reject(
            &setup.decide(&publish("Authorization: Bearer k\r\nContent-Length: x\r\n")),
            RejectReason::BadRequest,
        );
        assert_reject(
            &setup.decide(&publish(
                "Authorization: Bearer k\r\nTransfer-Encoding: chunked\r\n",
            )),
            RejectReason::BadRequest,
        );
        match setup.decide(&publish(
            "Authorization: Bearer k\r\nContent-Length: 12\r\n",
        )) {
            Decision::Serve {
                route: HttpRoute::Publish,
                body_len: 12,
                keep_alive: true,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        match setup.decide(&raw(
            "POST",
            "/api/disconnect",
            "Authorization: Bearer k\r\nConnection: close\r\n",
        )) {
            Decision::Serve {
                route: HttpRoute::Disconnect,
                body_len: 0,
                keep_alive: false,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert_reject(
            &setup.decide(&raw("GET", "/api/publish", "")),
            RejectReason::Method,
        );
        for (target, route) in [
            ("/", HttpRoute::Page),
            ("/roomcast.js", HttpRoute::ClientScript),
            ("/metrics", HttpRoute::Metrics),
            ("/api/stats", HttpRoute::Stats),
        ] {
            match setup.decide(&raw("GET", target, "")) {
                Decision::Serve { route: got, .. } => assert_eq!(got, route),
                other => panic!("{target}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_requests_are_400() {
        let setup = Setup::new();
        for request in [
            "GET /ws HTTP/1.1\r\nNo colon here\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03",
            "GET /ws HTTP/2.0\r\n\r\n",
            "GET  /ws HTTP/1.1\r\n\r\n",
            "GET /ws\r\n\r\n",
            "GET /ws?token=%zz HTTP/1.1\r\n\r\n",
            "GET /ws/%4 HTTP/1.1\r\n\r\n",
            "GET /nowhere?x=%g0 HTTP/1.1\r\n\r\n",
            "GET /ws/%FF%FE HTTP/1.1\r\n\r\n",
        ] {
            assert_reject(&setup.decide(request), RejectReason::BadRequest);
        }
        // Non-UTF-8 bytes in the request target.
        let decision = decide(b"GET /ws\xff HTTP/1.1\r\n\r\n", &setup.policy()).unwrap();
        assert_reject(&decision, RejectReason::BadRequest);
    }

    #[test]
    fn head_size_limit() {
        let setup = Setup::new();
        // A complete head of exactly MAX_HEAD_BYTES is fine...
        let filler = |total: usize| {
            let base = ws_token("/ws", "X-Pad: \r\n").len();
            ws_token("/ws", &format!("X-Pad: {}\r\n", "p".repeat(total - base)))
        };
        let exact = filler(MAX_HEAD_BYTES);
        assert_eq!(exact.len(), MAX_HEAD_BYTES);
        expect_upgrade(setup.decide(&exact));
        // ...one byte more is 431.
        let over = filler(MAX_HEAD_BYTES + 1);
        assert_eq!(over.len(), MAX_HEAD_BYTES + 1);
        assert_reject(&setup.decide(&over), RejectReason::TooLarge);
        // An incomplete head: 8192 bytes may still end well, 8193 cannot.
        let endless = "GET /ws HTTP/1.1\r\nX-Pad: ".to_string() + &"p".repeat(10_000);
        assert!(decide(&endless.as_bytes()[..MAX_HEAD_BYTES], &setup.policy()).is_none());
        let decision = decide(&endless.as_bytes()[..MAX_HEAD_BYTES + 1], &setup.policy());
        assert_reject(&decision.unwrap(), RejectReason::TooLarge);
        // Too many header lines is also "too large".
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_reject(
            &setup.decide(&ws_token("/ws", &many)),
            RejectReason::TooLarge,
        );
        // The 431 carries Connection: close.
        assert!(response_text(&setup.decide(&over)).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn check_order_matches_the_protocol() {
        let mut setup = Setup::new();
        // Oversize head with a bad path → 431.
        let big = format!("X-Pad: {}\r\n", "p".repeat(9000));
        assert_reject(
            &setup.decide(&raw("POST", "/nope", &big)),
            RejectReason::TooLarge,
        );
        // Malformed and unknown → 400.
        assert_reject(
            &setup.decide(&raw("POST", "/nope%", "")),
            RejectReason::BadRequest,
        );
        // Bad path with bad method → 404.
        assert_reject(
            &setup.decide(&raw("POST", "/nope", "")),
            RejectReason::NotFound,
        );
        // Wrong method on /ws with no upgrade headers → 405.
        assert_reject(&setup.decide(&raw("POST", "/ws", "")), RejectReason::Method);
        // No upgrade headers and a bad version → 426 upgrade_required.
        assert_reject(
            &setup.decide(&raw("GET", "/ws", "Sec-WebSocket-Version: 8\r\n")),
            RejectReason::UpgradeRequired,
        );
        // Missing key and a bad version → 400.
        assert_reject(
            &setup.decide(&raw(
                "GET",
                "/ws",
                "Upgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 8\r\n",
            )),
            RejectReason::BadRequest,
        );
        setup.origins = vec!["https://good.example".into()];
        setup.open_connections = 10;
        // Bad version and bad origin → 426 version.
        let bad_version = ws_token("/ws", "Origin: https://evil.example\r\n")
            .replace("Version: 13", "Version: 8");
        assert_reject(&setup.decide(&bad_version), RejectReason::Version);
        // Bad origin and capacity full → 403.
        assert_reject(
            &setup.decide(&ws_token("/ws", "Origin: https://evil.example\r\n")),
            RejectReason::Origin,
        );
        // Capacity full and no token → 503.
        assert_reject(&setup.decide(&ws("/ws", "")), RejectReason::Capacity);
        setup.open_connections = 9;
        assert_reject(&setup.decide(&ws("/ws", "")), RejectReason::Unauthorized);
    }

    #[test]
    fn routes() {
        let mut setup = Setup::new();
        for target in [
            "/wsx",
            "/ws/",
            "/ws/a/b",
            "/ws//",
            "/metricsx",
            "/api/statsx",
            "/echo",
            "/demo/token",
            "*",
            "http://localhost/ws",
            "/w\u{e9}",
        ] {
            assert_reject(&setup.decide(&ws_token(target, "")), RejectReason::NotFound);
            assert_reject(
                &setup.decide(&raw("POST", target, "")),
                RejectReason::NotFound,
            );
        }
        // Percent-encoded room, `+` kept literally in the path.
        let (_, _, endpoint, _) = expect_upgrade(setup.decide(&ws_token("/ws/caf%C3%A9+x", "")));
        assert_eq!(
            endpoint,
            Endpoint::Rooms {
                join: Some("café+x".into())
            }
        );
        // An encoded slash is part of the name; the hub validates it.
        let (_, _, endpoint, _) = expect_upgrade(setup.decide(&ws_token("/ws/a%2Fb", "")));
        assert_eq!(
            endpoint,
            Endpoint::Rooms {
                join: Some("a/b".into())
            }
        );
        // Echo only when enabled.
        setup.echo_enabled = true;
        let (_, _, endpoint, _) = expect_upgrade(setup.decide(&ws_token("/echo", "")));
        assert_eq!(endpoint, Endpoint::Echo);
        assert_reject(
            &setup.decide(&raw("GET", "/echo", "")),
            RejectReason::UpgradeRequired,
        );
        // Demo token only in demo mode.
        setup.demo_mode = true;
        match setup.decide(&raw("GET", "/demo/token?x=1&name=Ann+Lee%21&name=Z", "")) {
            Decision::Serve {
                route: HttpRoute::DemoToken { name },
                ..
            } => assert_eq!(name.as_deref(), Some("Ann Lee!")),
            other => panic!("{other:?}"),
        }
        for target in ["/demo/token", "/demo/token?name=", "/demo/token?other=1"] {
            match setup.decide(&raw("GET", target, "")) {
                Decision::Serve {
                    route: HttpRoute::DemoToken { name: None },
                    ..
                } => {}
                other => panic!("{target}: {other:?}"),
            }
        }
        assert_reject(
            &setup.decide(&raw("GET", "/demo/token?name=%C3", "")),
            RejectReason::BadRequest,
        );
        assert_reject(
            &setup.decide(&raw("POST", "/demo/token", "")),
            RejectReason::Method,
        );
    }

    #[test]
    fn plain_endpoints() {
        let setup = Setup::new();
        for request in [
            raw("GET", "/health", ""),
            raw("GET", "/health?x=1", ""),
            ws("/health", ""),
            "GET /health HTTP/1.0\r\n\r\n".to_string(),
        ] {
            match setup.decide(&request) {
                Decision::Serve {
                    route: HttpRoute::Health,
                    head_len,
                    ..
                } => assert_eq!(head_len, request.len()),
                other => panic!("{request:?}: {other:?}"),
            }
        }
        for method in ["POST", "HEAD", "PUT", "get"] {
            let decision = setup.decide(&raw(method, "/health", ""));
            assert_reject(&decision, RejectReason::Method);
            assert!(response_text(&decision).contains("\r\nAllow: GET\r\n"));
        }
    }

    #[test]
    fn a_refused_head_request_gets_headers_without_a_body() {
        let setup = Setup::new();
        for (target, reason) in [
            ("/health", RejectReason::Method),
            ("/ws", RejectReason::Method),
            ("/nowhere", RejectReason::NotFound),
        ] {
            let decision = setup.decide(&raw("HEAD", target, ""));
            assert_reject(&decision, reason);
            let text = response_text(&decision);
            assert!(text.ends_with("\r\n\r\n"), "{target}: {text:?}");
            let with_body = response_text(&setup.decide(&raw("PUT", target, "")));
            let length = |text: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix("Content-Length: "))
                    .map(str::to_string)
            };
            assert_eq!(length(&text), length(&with_body), "{target}");
        }
    }

    #[test]
    fn upgrade_header_rules() {
        let setup = Setup::new();
        let token = token_for("u1");
        let target = format!("/ws?token={token}");
        let key = format!("Sec-WebSocket-Key: {SAMPLE_KEY}\r\n");
        let version = "Sec-WebSocket-Version: 13\r\n";
        let both = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
        let case = |headers: String| setup.decide(&raw("GET", &target, &headers));

        let decision = case(format!("{key}{version}"));
        assert_reject(&decision, RejectReason::UpgradeRequired);
        let text = response_text(&decision);
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nUpgrade: websocket\r\n"), "{text}");

        for headers in [
            format!("Upgrade: websocket\r\n{key}{version}"),
            format!("Connection: Upgrade\r\n{key}{version}"),
            format!("Upgrade: h2c\r\nConnection: Upgrade\r\n{key}{version}"),
            format!("Upgrade: websocket\r\nConnection: keep-alive\r\n{key}{version}"),
            format!("Upgrade: websocket\r\nConnection: upgrade-ish\r\n{key}{version}"),
            format!("{both}{version}"),
            format!("{both}{key}"),
            format!("{both}Sec-WebSocket-Key: c2hvcnQ=\r\n{version}"),
            format!("{both}Sec-WebSocket-Key: not base64 at all!!!!!!!\r\n{version}"),
            format!("{both}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n{version}"),
            format!("{both}Sec-WebSocket-Key: \r\n{version}"),
        ] {
            assert_reject(&case(headers.clone()), RejectReason::BadRequest);
        }

        let decision = case(format!("{both}{key}Sec-WebSocket-Version: 8\r\n"));
        assert_reject(&decision, RejectReason::Version);
        let text = response_text(&decision);
        assert!(text.starts_with("HTTP/1.1 426 "), "{text}");
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");

        // Case-insensitive names and tokens, lists, and split list headers.
        for headers in [
            format!("upgrade: WebSocket\r\nCONNECTION: keep-alive, Upgrade\r\n{key}{version}"),
            format!(
                "Upgrade: websocket\r\nConnection: keep-alive\r\nConnection: upgrade\r\n{key}{version}"
            ),
            format!("{both}sec-websocket-key:   {SAMPLE_KEY}  \r\nsec-websocket-version: 13\r\n"),
        ] {
            expect_upgrade(case(headers));
        }

        // HTTP/1.0 cannot upgrade.
        let old = ws_token("/ws", "").replacen("HTTP/1.1", "HTTP/1.0", 1);
        assert_reject(&setup.decide(&old), RejectReason::BadRequest);
    }

    #[test]
    fn origin_rules() {
        let mut setup = Setup::new();
        expect_upgrade(setup.decide(&ws_token("/ws", "Origin: https://any.example\r\n")));
        setup.origins = vec!["https://a.example".into(), "https://b.example".into()];
        expect_upgrade(setup.decide(&ws_token("/ws", "")));
        expect_upgrade(setup.decide(&ws_token("/ws", "Origin: https://b.example\r\n")));
        for origin in ["https://c.example", "https://B.example", "null", ""] {
            assert_reject(
                &setup.decide(&ws_token("/ws", &format!("Origin: {origin}\r\n"))),
                RejectReason::Origin,
            );
        }
    }

    #[test]
    fn capacity() {
        let mut setup = Setup::new();
        setup.max_connections = 2;
        setup.open_connections = 1;
        expect_upgrade(setup.decide(&ws_token("/ws", "")));
        setup.open_connections = 2;
        assert_reject(&setup.decide(&ws_token("/ws", "")), RejectReason::Capacity);
    }

    #[test]
    fn token_sources() {
        let setup = Setup::new();
        let good = token_for("cookie-user");
        let query_good = token_for("query-user");
        let forged = sign(b"another secret", json!({"sub": "u1"}));
        let expired = sign(SECRET, json!({"sub": "u1", "exp": NOW - 1}));

        // Cookie among others, across several Cookie lines, quoted or not.
        for cookies in [
            format!("Cookie: a=1; roomcast_token={good}; b=2\r\n"),
            format!("Cookie: a=1\r\nCookie: roomcast_token=\"{good}\"\r\n"),
            format!("Cookie: roomcast_token={good};roomcast_token=junk\r\n"),
        ] {
            let (_, identity, _, _) = expect_upgrade(setup.decide(&ws("/ws", &cookies)));
            assert_eq!(identity.user_id, "cookie-user");
        }

        // The query wins over the cookie, both ways.
        let cookie = format!("Cookie: roomcast_token={good}\r\n");
        let (_, identity, _, _) =
            expect_upgrade(setup.decide(&ws(&format!("/ws?token={query_good}"), &cookie)));
        assert_eq!(identity.user_id, "query-user");
        for query in [
            format!("token={forged}"),
            "token=".to_string(),
            "token".to_string(),
            "token=%FF".to_string(),
        ] {
            assert_reject(
                &setup.decide(&ws(&format!("/ws?{query}"), &cookie)),
                RejectReason::Unauthorized,
            );
        }

        // First `token` parameter wins; other parameters are ignored.
        let (_, identity, _, _) = expect_upgrade(setup.decide(&ws(
            &format!("/ws/room?a=b&token={query_good}&token=junk"),
            "",
        )));
        assert_eq!(identity.user_id, "query-user");

        for request in [
            ws("/ws", ""),
            ws("/ws", "Cookie: other=1\r\n"),
            ws("/ws?tokens=x", ""),
            ws(&format!("/ws?token={expired}"), ""),
            ws(&format!("/ws?token={forged}"), ""),
            ws("/ws?token=not.a.jwt", ""),
            ws("/ws", &format!("Cookie: roomcast_token={forged}\r\n")),
        ] {
            let decision = setup.decide(&request);
            assert_reject(&decision, RejectReason::Unauthorized);
            assert!(response_text(&decision).starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        }
    }

    #[test]
    fn refusals_are_well_framed_and_close() {
        let mut setup = Setup::new();
        setup.origins = vec!["https://a.example".into()];
        for request in [
            raw("GET", "/nope", ""),
            raw("POST", "/ws", ""),
            raw("GET", "/ws", ""),
            ws("/ws", "Origin: https://z.example\r\n"),
            ws("/ws", ""),
            "GET /ws HTTP/1.1\r\nbad\r\n\r\n".to_string(),
        ] {
            let text = response_text(&setup.decide(&request));
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.contains("\r\nConnection: close"), "{head}");
            assert!(
                head.contains("\r\nContent-Type: text/plain; charset=utf-8"),
                "{head}"
            );
            assert!(
                head.contains(&format!("\r\nContent-Length: {}", body.len())),
                "{head}"
            );
            assert!(body.ends_with('\n') && !body.is_empty());
        }
    }

    #[test]
    fn response_builder() {
        let built = response(
            200,
            "application/json",
            br#"{"status":"ok"}"#,
            &[
                ("Cache-Control", "no-store"),
                ("X-Evil", "a\r\nSet-Cookie: x"),
            ],
        );
        assert_eq!(
            String::from_utf8(built).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\
             Connection: close\r\nCache-Control: no-store\r\nX-Evil: aSet-Cookie: x\r\n\r\n\
             {\"status\":\"ok\"}"
        );
        let odd = String::from_utf8(response(299, "text/plain", b"", &[])).unwrap();
        assert!(odd.starts_with("HTTP/1.1 299 \r\n"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"a%20b+c", false).unwrap(), b"a b+c");
        assert_eq!(percent_decode(b"a%20b+c", true).unwrap(), b"a b c");
        assert_eq!(percent_decode(b"%e2%82%AC", false).unwrap(), "€".as_bytes());
        for bad in [&b"%"[..], b"%4", b"%4g", b"%%", b"abc%"] {
            assert!(percent_decode(bad, false).is_none());
            assert!(!percent_well_formed(bad));
        }
        assert!(percent_well_formed(b"/ws/a%2Fb?x=%41"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut setup = Setup::new();
        setup.echo_enabled = true;
        setup.demo_mode = true;
        let seeds = [
            ws_token("/ws/room", "Cookie: a=b; roomcast_token=x\r\nOrigin: o\r\n"),
            raw("GET", "/demo/token?name=%41+b&token", ""),
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"%+?&=;/\r\n: \"\xff\x00aZ09,";
        for seed in &seeds {
            for _ in 0..3000 {
                let mut bytes = seed.clone().into_bytes();
                for _ in 0..(next() % 6 + 1) {
                    let at = (next() as usize) % bytes.len();
                    let symbol = alphabet[(next() as usize) % alphabet.len()];
                    match next() % 3 {
                        0 => bytes[at] = symbol,
                        1 => bytes.insert(at, symbol),
                        _ => {
                            bytes.remove(at);
                        }
                    }
                }
                let _ = decide(&bytes, &setup.policy());
            }
        }
    }
}
