//! One request head: parsing, the types of the decision, and the steps a head
//! goes through (size, well-formed target, route, method, then the endpoint's
//! own checks), plus the header helpers every step reads with.

use crate::auth::{Identity, Verifier};
use crate::ws::{self, Endpoint, TokenCheck};

use super::api::{check_api_key, decide_api, inspect_route};
use super::query::{percent_decode, percent_well_formed, query_param};
use super::response::{reject, reject_with};
use super::route::{Route, route};

/// The largest request head (request line through the blank line) the server
/// reads; a client that needs more is refused with `431` rather than buffered.
pub const MAX_HEAD_BYTES: usize = 8192;

/// Header lines parsed per request; the array lives on the stack, so a client
/// cannot make the server allocate for headers. More lines → `431`.
const MAX_HEADERS: usize = 64;

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
    /// `--max-connections-per-user` connections of the token's user already
    /// open (`429`, §14.4); decided by the shell after the token check.
    UserLimit,
}

impl RejectReason {
    /// Every reason, so the metrics can be registered at 0 before the first
    /// rejection happens.
    pub const ALL: [RejectReason; 13] = [
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
        RejectReason::UserLimit,
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
            RejectReason::UserLimit => "user_limit",
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
            RejectReason::UserLimit => 429,
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
    /// `GET /api/rooms?prefix=P&limit=N` with a verified API key (§14.3).
    RoomList {
        /// Names start with this (percent-decoded); empty for all.
        prefix: String,
        /// At most this many rooms (default 1000, clamped to 10000).
        limit: usize,
    },
    /// `GET /api/rooms/{room}` with a verified API key; the name is
    /// percent-decoded but not validated (an invalid one is not known).
    Room {
        /// The room's name.
        room: String,
    },
    /// `GET /api/rooms/{room}/history?since=S` with a verified API key.
    RoomHistory {
        /// The room's name, as for [`HttpRoute::Room`].
        room: String,
        /// Messages with a greater seq are listed (default 0).
        since: u64,
    },
    /// `GET /api/users/{user}` with a verified API key.
    User {
        /// The user id, percent-decoded.
        user: String,
    },
    /// `POST /api/subscribe` with a verified API key; the body follows.
    Subscribe,
    /// `POST /api/unsubscribe` with a verified API key; the body follows.
    Unsubscribe,
    /// `GET /demo/token` (demo mode only).
    DemoToken {
        /// The percent-decoded query `name` (`+` as space); `None` when absent
        /// or empty, so the shell makes a `guest-XXXX` name.
        name: Option<String>,
    },
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

/// The steps of a parsed head: a well-formed target (`400`), the route
/// (`404`), the method (`405`), then the endpoint's own: a plain answer, the
/// server API's checks, or the upgrade checks of a WebSocket endpoint.
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
    let serve = |route: HttpRoute| Decision::Serve {
        route,
        head_len,
        body_len: 0,
        keep_alive,
    };
    match route {
        Route::Health => serve(HttpRoute::Health),
        Route::Plain(route) => serve(route),
        Route::Api(route) => decide_api(route, headers, head_len, keep_alive, policy),
        // The key first (401/403), then the query (400), as for POST.
        Route::Inspect(target) => {
            match check_api_key(headers, policy).and_then(|()| inspect_route(target, query)) {
                Ok(route) => serve(route),
                Err(reason) => reject(reason),
            }
        }
        Route::DemoToken => match demo_token_name(query) {
            Ok(name) => serve(HttpRoute::DemoToken { name }),
            Err(reason) => reject(reason),
        },
        Route::TokenCheck => serve(HttpRoute::TokenCheck(ws::check_token(
            query, headers, policy,
        ))),
        Route::Rooms(join) => ws::decide_upgrade(
            Endpoint::Rooms { join },
            version,
            query,
            headers,
            head_len,
            policy,
        ),
        Route::Echo => {
            ws::decide_upgrade(Endpoint::Echo, version, query, headers, head_len, policy)
        }
    }
}

/// The `name` of `/demo/token`: form-decoded, `None` when absent or empty;
/// `Err` (a `400`) when it does not decode to UTF-8.
fn demo_token_name(query: Option<&str>) -> Result<Option<String>, RejectReason> {
    match query.and_then(|q| query_param(q, "name")) {
        None => Ok(None),
        Some(raw) => match percent_decode(raw.as_bytes(), true).map(String::from_utf8) {
            Some(Ok(name)) if name.is_empty() => Ok(None),
            Some(Ok(name)) => Ok(Some(name)),
            _ => Err(RejectReason::BadRequest),
        },
    }
}

/// The body length: 0 without `Content-Length`; `None` (a `400`) unless every
/// `Content-Length` line is the same run of digits (RFC 9112 §6.3).
pub(super) fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
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
pub(crate) fn header_lines<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |header| header.name.eq_ignore_ascii_case(name))
        .map(|header| header.value.trim_ascii())
}

/// The first line of a single-valued header.
pub(crate) fn first_header<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'static str,
) -> Option<&'h [u8]> {
    header_lines(headers, name).next()
}

/// Whether a comma-separated list header, across all its lines, contains
/// `token` (ASCII case-insensitive).
pub(crate) fn list_has_token(
    headers: &[httparse::Header<'_>],
    name: &'static str,
    token: &[u8],
) -> bool {
    header_lines(headers, name).any(|value| {
        value
            .split(|b| *b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
    })
}
