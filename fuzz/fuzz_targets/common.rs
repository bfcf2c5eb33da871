//! The bodies of the fuzz targets, shared by `cargo fuzz` (each target in
//! `fuzz/fuzz_targets/` includes this file as `mod common`) and by the stable
//! replay test `tests/fuzz_replay.rs` (which includes it with `#[path]`).
//!
//! Depends only on `roomcast` and `serde_json`, so it compiles in both crates.
//! Every check is a `panic!`/`assert!`: libFuzzer reports it as a crash, and
//! the replay test fails on it.
//!
//! - [`handshake_head`]: `http::decide` on arbitrary bytes under a policy
//!   the first input byte picks, fed whole and in read-sized chunks.
//! - [`envelope`]: `protocol::parse_request` on arbitrary UTF-8, with round
//!   trips of what it accepts.
//! - [`hub_events`]: a byte-coded sequence of shell events on a small `Hub`,
//!   `check_invariants` after every step, and every byte the hub hands the
//!   "socket" parsed back into WebSocket frames and checked.

// Each fuzz target uses one entry point; the replay test uses them all.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::OnceLock;

use roomcast::auth::{Identity, RoomAccess, TokenClaims, Verifier, sign};
use roomcast::http::{self, Decision, Endpoint, HttpRoute, Policy, RejectReason, TokenCheck};
use roomcast::hub::{ApiAnswer, CloseRequest, ConnId, Hub, HubConfig, Millis};
use roomcast::outbound::{Marks, Staging};
use roomcast::protocol::{self, ErrorCode, MAX_ID_BYTES, RequestBody};
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// The secret of every verifier and token here.
pub const SECRET: &[u8] = b"secret";

/// The handshake policy's clock (seconds).
pub const HANDSHAKE_NOW_SECS: u64 = 1_700_000_000;

// ===========================================================================
// handshake_head
// ===========================================================================

/// Policy flags, from the first input byte.
pub const HS_ECHO: u8 = 1;
/// `/demo/token` exists.
pub const HS_DEMO: u8 = 2;
/// `--allowed-origin https://a.example`.
pub const HS_ORIGINS: u8 = 4;
/// Capacity reached: every upgrade is `503`.
pub const HS_FULL: u8 = 8;
/// `--api-key key`: the server API exists (otherwise `403`).
pub const HS_API: u8 = 16;
/// `--max-message-size 16`: API bodies over 16 bytes are `413`.
pub const HS_SMALL_BODY: u8 = 32;

/// The API key of `HS_API`.
pub const API_KEY: &str = "key";

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::new(SECRET))
}

/// Input: `[flags, chunk, request bytes…]`. `flags` picks the policy (see
/// the `HS_*` bits); `chunk` the read size the shell is emulated with.
///
/// Checks: no panic; `None` only for at most `MAX_HEAD_BYTES`; every
/// decision well formed and allowed by the policy; the first decision of a
/// chunked feed agrees with the decision on the whole input.
pub fn handshake_head(data: &[u8]) {
    let [flags, chunk, request @ ..] = data else {
        return;
    };
    let origins = vec!["https://a.example".to_string()];
    let policy = Policy {
        verifier: verifier(),
        allowed_origins: if flags & HS_ORIGINS != 0 {
            &origins
        } else {
            &[]
        },
        max_connections: 10,
        open_connections: if flags & HS_FULL != 0 { 10 } else { 3 },
        echo_enabled: flags & HS_ECHO != 0,
        demo_mode: flags & HS_DEMO != 0,
        now_secs: HANDSHAKE_NOW_SECS,
        api_key: (flags & HS_API != 0).then_some(API_KEY),
        max_body_bytes: if flags & HS_SMALL_BODY != 0 { 16 } else { 4096 },
    };

    let whole = http::decide(request, &policy);
    match &whole {
        None => assert!(
            request.len() <= http::MAX_HEAD_BYTES,
            "no decision on {} bytes (over the {}-byte cap)",
            request.len(),
            http::MAX_HEAD_BYTES
        ),
        Some(decision) => check_decision(decision, request, &policy),
    }

    // The shell calls `decide` again with the whole buffer after every read
    // and acts on the first decision: emulate reads of `chunk_len` bytes.
    let chunk_len = 1 + usize::from(*chunk) * 8;
    let mut end = 0;
    while end < request.len() {
        end = (end + chunk_len).min(request.len());
        let prefix = &request[..end];
        if let Some(first) = http::decide(prefix, &policy) {
            check_decision(&first, prefix, &policy);
            let Some(whole) = &whole else {
                panic!("prefix of {end} bytes decided {first:?}, the whole input nothing");
            };
            check_same_decision(&first, whole, end);
            break;
        }
    }
}

/// Whether `head` (a head as `httparse` took it) ends with its blank line.
fn ends_with_blank_line(head: &[u8]) -> bool {
    head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n")
}

/// Whether the head carries `Bearer key` (the scheme in any case).
fn presents_key(head: &[u8]) -> bool {
    let credentials = format!(" {API_KEY}");
    (0..head.len()).any(|at| {
        head[at..].len() >= 6
            && head[at..at + 6].eq_ignore_ascii_case(b"bearer")
            && head[at + 6..].starts_with(credentials.as_bytes())
    })
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Whether the request line (after any empty lines) is a `GET`.
fn is_get(buffer: &[u8]) -> bool {
    let start = buffer
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buffer.len());
    buffer[start..].starts_with(b"GET ")
}

fn check_head_len(head_len: usize, buffer: &[u8]) {
    assert!(
        head_len <= buffer.len() && head_len <= http::MAX_HEAD_BYTES,
        "head_len {head_len} of a {}-byte buffer",
        buffer.len()
    );
    assert!(
        ends_with_blank_line(&buffer[..head_len]),
        "head_len {head_len} does not end at a blank line"
    );
}

fn check_decision(decision: &Decision, buffer: &[u8], policy: &Policy<'_>) {
    match decision {
        Decision::Upgrade {
            response,
            identity,
            endpoint,
            head_len,
        } => {
            check_head_len(*head_len, buffer);
            let text = std::str::from_utf8(response).expect("a 101 is ASCII");
            assert!(
                text.starts_with("HTTP/1.1 101 Switching Protocols\r\n")
                    && text.ends_with("\r\n\r\n"),
                "{text:?}"
            );
            let accept = text
                .split("\r\n")
                .find_map(|line| line.strip_prefix("Sec-WebSocket-Accept: "))
                .expect("an accept header");
            assert_eq!(accept.len(), 28, "{text:?}");
            assert!(!identity.user_id.is_empty(), "{identity:?}");
            assert!(
                identity.expires_at.is_none_or(|exp| exp > policy.now_secs),
                "expired token accepted: {identity:?}"
            );
            assert!(
                policy.open_connections < policy.max_connections,
                "upgrade at capacity"
            );
            assert!(
                !matches!(endpoint, Endpoint::Echo) || policy.echo_enabled,
                "echo upgrade with echo off"
            );
            assert!(is_get(buffer), "upgrade of a non-GET");
        }
        Decision::Serve {
            route,
            head_len,
            body_len,
            keep_alive,
        } => {
            check_head_len(*head_len, buffer);
            let head = &buffer[..*head_len];
            let api = matches!(
                route,
                HttpRoute::Publish
                    | HttpRoute::Disconnect
                    | HttpRoute::Subscribe
                    | HttpRoute::Unsubscribe
            );
            // The introspection API (§14.3) is GET, with the same key.
            let keyed = api
                || matches!(
                    route,
                    HttpRoute::RoomList { .. }
                        | HttpRoute::Room { .. }
                        | HttpRoute::RoomHistory { .. }
                        | HttpRoute::User { .. }
                );
            assert!(api || is_get(buffer), "serve of a non-GET");
            assert!(api || *body_len == 0, "a body on a GET endpoint");
            assert!(*body_len <= policy.max_body_bytes, "body over the limit");
            assert!(!keyed || policy.api_key.is_some(), "API without a key");
            assert!(
                !keyed || presents_key(head),
                "API served without the key: {:?}",
                String::from_utf8_lossy(head)
            );
            assert!(
                !keep_alive || contains(head, b" HTTP/1.1\r\n") || contains(head, b" HTTP/1.1\n"),
                "keep-alive for a request that is not HTTP/1.1: {:?}",
                String::from_utf8_lossy(head)
            );
            match route {
                HttpRoute::Health
                | HttpRoute::Page
                | HttpRoute::ClientScript
                | HttpRoute::Metrics
                | HttpRoute::Stats
                | HttpRoute::Publish
                | HttpRoute::Disconnect
                | HttpRoute::Subscribe
                | HttpRoute::Unsubscribe
                | HttpRoute::Room { .. }
                | HttpRoute::RoomHistory { .. }
                | HttpRoute::User { .. } => {}
                HttpRoute::RoomList { limit, .. } => {
                    assert!(*limit <= 10_000, "a room list over the maximum");
                }
                HttpRoute::TokenCheck(check) => {
                    // The check answers for any token, and a refusal names a
                    // code of the contract (§1).
                    if let TokenCheck::Refused(code) = check {
                        assert!(
                            [
                                "missing",
                                "malformed",
                                "bad_signature",
                                "expired",
                                "not_yet_valid",
                                "invalid_claims"
                            ]
                            .contains(code),
                            "unknown token check code {code}"
                        );
                    }
                }
                HttpRoute::DemoToken { name } => {
                    assert!(policy.demo_mode, "demo token outside demo mode");
                    assert!(name.as_deref() != Some(""), "empty name kept");
                }
            }
        }
        Decision::Reject { reason, response } => {
            assert_ne!(*reason, RejectReason::Timeout, "decide never times out");
            let text = std::str::from_utf8(response).expect("a refusal is UTF-8");
            let status = format!("HTTP/1.1 {} ", reason.status());
            assert!(text.starts_with(&status), "{reason:?}: {text:?}");
            let (head, body) = text.split_once("\r\n\r\n").expect("a framed refusal");
            assert!(head.contains("\r\nConnection: close"), "{text:?}");
            let length = format!("\r\nContent-Length: {}\r\n", body.len());
            assert!(format!("{head}\r\n").contains(&length), "{text:?}");
            if *reason == RejectReason::Capacity {
                assert!(policy.open_connections >= policy.max_connections);
            }
            if *reason == RejectReason::Origin {
                assert!(!policy.allowed_origins.is_empty());
            }
            if *reason == RejectReason::ApiDisabled {
                assert!(policy.api_key.is_none(), "api_disabled with a key");
            }
            if *reason == RejectReason::PayloadTooLarge {
                assert!(policy.api_key.is_some(), "413 before the key check");
            }
        }
    }
}

/// The first decision on a prefix must be the decision on the whole input:
/// the same upgrade or answer for the same head, a refusal for a refusal. A
/// malformed head answered `400` as soon as it was seen may be `431` once the
/// blank line is seen past the cap (see `malformed_head_reason`).
fn check_same_decision(first: &Decision, whole: &Decision, end: usize) {
    let same = match (first, whole) {
        (
            Decision::Upgrade {
                response: a,
                identity: ia,
                endpoint: ea,
                head_len: ha,
            },
            Decision::Upgrade {
                response: b,
                identity: ib,
                endpoint: eb,
                head_len: hb,
            },
        ) => a == b && ia == ib && ea == eb && ha == hb,
        (
            Decision::Serve {
                route: ra,
                head_len: ha,
                body_len: ba,
                keep_alive: ka,
            },
            Decision::Serve {
                route: rb,
                head_len: hb,
                body_len: bb,
                keep_alive: kb,
            },
        ) => ra == rb && ha == hb && ba == bb && ka == kb,
        (Decision::Reject { reason: a, .. }, Decision::Reject { reason: b, .. }) => {
            a == b || (*a == RejectReason::BadRequest && *b == RejectReason::TooLarge)
        }
        _ => false,
    };
    assert!(
        same,
        "the first {end} bytes decided {first:?}, the whole input {whole:?}"
    );
}

// ===========================================================================
// envelope
// ===========================================================================

/// Input: any bytes; only valid UTF-8 reaches the parser (a text frame is
/// UTF-8 by the time the hub sees it).
///
/// Checks: no panic; a kept `id` is a string of at most 256 bytes or a
/// number; errors are among the three codes the parser owns and agree with
/// whether the text is JSON at all; an accepted request survives a round
/// trip through `serde_json` unchanged.
pub fn envelope(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Two oracles: `RawValue` checks the JSON grammar only; `Value` also
    // decodes every string and number, so it refuses lone surrogate escapes
    // (`"\ud800"`) and numbers beyond f64 (`1e400`). Text between the two is
    // a judgment call either error code may make.
    let is_json = serde_json::from_str::<&RawValue>(text).is_ok();
    let is_strict_json = serde_json::from_str::<Value>(text).is_ok();
    match protocol::parse_request(text) {
        Ok(request) => {
            assert!(is_json, "accepted text that is not JSON: {text:?}");
            if let Some(id) = request.id {
                check_id(id.get());
            }
            let canonical = canonical_request(request.id.map(|id| id.get()), &request.body);
            let again = protocol::parse_request(&canonical)
                .unwrap_or_else(|error| panic!("{canonical:?} refused: {error:?}"));
            let round = canonical_request(again.id.map(|id| id.get()), &again.body);
            assert_eq!(canonical, round, "round trip of {text:?}");
        }
        Err(error) => {
            assert!(
                matches!(
                    error.code,
                    ErrorCode::InvalidJson | ErrorCode::InvalidMessage | ErrorCode::UnknownType
                ),
                "parser answered {:?} for {text:?}",
                error.code
            );
            assert!(!error.message.is_empty());
            if let Some(id) = error.id {
                check_id(id.get());
            }
            if error.code == ErrorCode::InvalidJson {
                assert!(!is_strict_json, "valid JSON called invalid_json: {text:?}");
            } else {
                assert!(
                    is_json,
                    "{:?} ({}) for text that is not JSON (PROTOCOL §5: invalid_json comes \
                     first): {text:?}",
                    error.code, error.message
                );
            }
        }
    }
}

/// A kept `id` is a JSON string of at most 256 bytes (decoded) or a number
/// (any the JSON grammar allows: it is echoed verbatim, never converted).
fn check_id(raw: &str) {
    let is_value = serde_json::from_str::<&RawValue>(raw).is_ok_and(|value| value.get() == raw);
    match raw.as_bytes().first() {
        Some(b'"') => match serde_json::from_str::<String>(raw) {
            Ok(id) => assert!(id.len() <= MAX_ID_BYTES, "{} byte id kept", id.len()),
            Err(error) => panic!("id {raw:?} kept: {error}"),
        },
        Some(b'-' | b'0'..=b'9') if is_value => {}
        _ => panic!("id {raw:?} kept"),
    }
}

/// The request written back as canonical JSON (content and id kept raw).
fn canonical_request(id: Option<&str>, body: &RequestBody<'_>) -> String {
    let (kind, payload) = match body {
        RequestBody::Join { room, since, epoch } => {
            let mut payload = json!({ "room": room });
            if let Some(since) = since {
                payload["since"] = json!(since);
            }
            if let Some(epoch) = epoch {
                payload["epoch"] = json!(epoch);
            }
            ("join", payload.to_string())
        }
        RequestBody::Leave { room } => ("leave", json!({ "room": room }).to_string()),
        RequestBody::Message { room, content } => (
            "message",
            format!("{{\"room\":{},\"content\":{}}}", json!(room), content.get()),
        ),
        RequestBody::Direct { to, content } => (
            "direct",
            format!("{{\"to\":{},\"content\":{}}}", json!(to), content.get()),
        ),
        RequestBody::Typing { room, is_typing } => (
            "typing",
            json!({ "room": room, "is_typing": is_typing }).to_string(),
        ),
        RequestBody::Presence { room } => ("presence", json!({ "room": room }).to_string()),
        RequestBody::Ping => ("ping", "{}".to_string()),
        RequestBody::Refresh { token } => ("refresh", json!({ "token": token }).to_string()),
    };
    match id {
        Some(id) => format!("{{\"type\":\"{kind}\",\"id\":{id},\"payload\":{payload}}}"),
        None => format!("{{\"type\":\"{kind}\",\"payload\":{payload}}}"),
    }
}

// ===========================================================================
// hub_events
// ===========================================================================

/// The fake clock's start (ms); tokens' `exp` are relative to it.
pub const HUB_NOW: Millis = 1_700_000_000_000;

/// Connection ids the fuzzer uses: `0..CONNS`.
pub const CONNS: usize = 8;

/// Users; the last has characters JSON must escape.
pub const USERS: [&str; 4] = ["alice", "bob", "carol", "d\u{e9}\"q\\"];

/// Rooms: valid ones (more than the per-connection limit), then invalid.
pub const ROOMS: [&str; 9] = [
    "lobby",
    "team:a",
    "team:b",
    "r.1-2_3",
    "",
    "bad room",
    "caf\u{e9}",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "lobby\n",
];

/// Clock steps (ms) around every timer of the config below.
pub const STEPS: [Millis; 24] = [
    0, 1, 7, 50, 100, 250, 299, 300, 301, 499, 500, 501, 999, 1000, 1001, 2000, 5000, 6000, 10_000,
    60_000, 299_999, 300_000, 300_001, 3_600_000,
];

/// Operation codes: the op byte modulo [`op::COUNT`].
pub mod op {
    /// `conn, user, profile, join`.
    pub const CONNECT: u8 = 0;
    /// `conn, template, args…` (see `template_text`).
    pub const TEXT: u8 = 1;
    /// `conn, len, bytes[len]` as (lossy) UTF-8 text.
    pub const RAW: u8 = 2;
    /// `conn`: the client went away.
    pub const DISCONNECT: u8 = 3;
    /// `conn`: the socket is gone.
    pub const RELEASE: u8 = 4;
    /// `step`: advance the clock by `STEPS[step]`, then `tick`.
    pub const TICK: u8 = 5;
    /// `step`: advance the clock without a tick.
    pub const ADVANCE: u8 = 6;
    /// `conn, budget`: write up to `budget × 24` bytes (255 = all).
    pub const WRITE: u8 = 7;
    /// `conn`.
    pub const DRAINED: u8 = 8;
    /// `conn`.
    pub const SAW_ACTIVITY: u8 = 9;
    /// Take the dirty list.
    pub const TAKE_DIRTY: u8 = 10;
    /// `budget`: the shell's flush: take the dirty list and write each
    /// connection as `WRITE` does.
    pub const FLUSH_DIRTY: u8 = 11;
    /// `conn`: an `/echo` connection.
    pub const CONNECT_ECHO: u8 = 12;
    /// `conn`.
    pub const MARK_DIRTY: u8 = 13;
    /// `conn, count, size, room`: `count` messages of `size × 16` bytes at once.
    pub const BURST: u8 = 14;
    /// Jump to the next timer deadline and `tick`.
    pub const NEXT_DEADLINE: u8 = 15;
    /// `kind, args…`: `POST /api/publish` (see `api_publish_body`).
    pub const API_PUBLISH: u8 = 16;
    /// `kind, args…`: `POST /api/disconnect` of a user, or a raw body.
    pub const API_DISCONNECT: u8 = 17;
    /// A restart with `--state-file`: the rooms are saved, the state file
    /// parsed back, a fresh hub imports them; every connection is gone.
    pub const RESTART: u8 = 18;
    /// How many op codes there are: the op byte is taken modulo this.
    pub const COUNT: u8 = 19;
}

/// `TEXT` templates: the first argument byte modulo 12.
pub mod template {
    /// `room, since, epoch, id`.
    pub const JOIN: u8 = 0;
    /// `room, id`.
    pub const LEAVE: u8 = 1;
    /// `room, content, id`.
    pub const MESSAGE: u8 = 2;
    /// `user, content, id`.
    pub const DIRECT: u8 = 3;
    /// `room, typing, id`.
    pub const TYPING: u8 = 4;
    /// `room, id`.
    pub const PRESENCE: u8 = 5;
    /// `id`.
    pub const PING: u8 = 6;
    /// `token, id`.
    pub const REFRESH: u8 = 7;
    /// `id`: a type of the wrong case.
    pub const UNKNOWN: u8 = 8;
    /// Truncated JSON.
    pub const BAD_JSON: u8 = 9;
    /// `id`: a payload that is not an object.
    pub const BAD_PAYLOAD: u8 = 10;
    /// `room, id`: a join with the room name spelled with escapes.
    pub const ESCAPED_JOIN: u8 = 11;
}

fn hub_config() -> HubConfig {
    HubConfig {
        namespaces: std::sync::Arc::new(roomcast::hub::Namespaces::none(4)),
        max_rooms_per_connection: 3,
        typing_timeout_ms: 300,
        heartbeat_ms: 1000,
        pong_timeout_ms: 500,
        rate_limit: 20,
        rate_burst: 5,
        marks: Marks {
            soft: 512,
            hard: 4096,
        },
        verifier: Verifier::new(SECRET),
        webhooks: None,
    }
}

/// Reads the op stream; 0 once it runs out, so a truncated op still runs.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn next(&mut self) -> Option<u8> {
        let (&first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(first)
    }

    fn byte(&mut self) -> u8 {
        self.next().unwrap_or(0)
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[usize::from(self.byte()) % items.len()]
    }

    fn conn(&mut self) -> ConnId {
        usize::from(self.byte()) % CONNS
    }

    fn take(&mut self, len: usize) -> &[u8] {
        let (taken, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        taken
    }
}

/// Refresh tokens: for each user, valid for an hour, valid for one second,
/// limited to `team:*`; then expired, forged and garbage ones.
fn tokens() -> &'static Vec<String> {
    static TOKENS: OnceLock<Vec<String>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let now = HUB_NOW / 1000;
        let mut tokens = Vec::new();
        for user in USERS {
            let claims = |expires_at: Option<u64>, rooms: Option<Vec<String>>| TokenClaims {
                sub: user.to_string(),
                name: Some(format!("{user} (refreshed)")),
                expires_at,
                rooms,
            };
            tokens.push(sign(SECRET, &claims(Some(now + 3600), None)));
            tokens.push(sign(SECRET, &claims(Some(now + 1), None)));
            tokens.push(sign(
                SECRET,
                &claims(None, Some(vec!["team:*".to_string()])),
            ));
        }
        let alice = |expires_at| TokenClaims {
            sub: "alice".to_string(),
            name: None,
            expires_at,
            rooms: None,
        };
        tokens.push(sign(SECRET, &alice(Some(now - 10))));
        tokens.push(sign(b"another secret", &alice(None)));
        tokens.push("not.a.jwt".to_string());
        tokens
    })
}

/// The identity a `CONNECT` profile byte gives `user`.
fn identity(user: &str, profile: u8) -> Identity {
    let rooms = match profile % 3 {
        0 => RoomAccess::Every,
        1 => RoomAccess::Patterns(vec!["team:*".to_string(), "lobby".to_string()]),
        _ => RoomAccess::Patterns(Vec::new()),
    };
    let expires_at = match (profile / 3) % 3 {
        0 => None,
        1 => Some(HUB_NOW / 1000 + 2),
        _ => Some(HUB_NOW / 1000 + 3600),
    };
    Identity {
        user_id: user.to_string(),
        name: user.to_uppercase(),
        expires_at,
        rooms,
    }
}

fn id_json(choice: u8) -> Option<String> {
    match choice % 7 {
        0 => None,
        1 => Some("7".to_string()),
        2 => Some("\"r1\"".to_string()),
        3 => Some("null".to_string()),
        4 => Some(format!("\"{}\"", "x".repeat(257))),
        5 => Some("true".to_string()),
        _ => Some("-1.5e3".to_string()),
    }
}

fn content_json(choice: u8, size: u8) -> String {
    match choice % 6 {
        0 => "1".to_string(),
        1 => "\"hi \\\"there\\\"\"".to_string(),
        2 => "{\"k\":[1,2,{\"n\":null}]}".to_string(),
        3 => "null".to_string(),
        4 => json!("m".repeat(usize::from(size) * 16)).to_string(),
        _ => "[]".to_string(),
    }
}

/// A request frame from a template.
fn template_text(input: &mut Input<'_>, user: usize, epochs: &HashMap<String, String>) -> String {
    let kind = input.byte() % 12;
    let envelope = |kind: &str, id: Option<String>, payload: String| match id {
        Some(id) => format!("{{\"type\":\"{kind}\",\"id\":{id},\"payload\":{payload}}}"),
        None => format!("{{\"type\":\"{kind}\",\"payload\":{payload}}}"),
    };
    match kind {
        template::JOIN => {
            let room = *input.pick(&ROOMS);
            let since = match input.byte() % 8 {
                0 => None,
                1 => Some("0".to_string()),
                2 => Some("1".to_string()),
                3 => Some("2".to_string()),
                4 => Some("5".to_string()),
                5 => Some("18446744073709551615".to_string()),
                6 => Some("-1".to_string()),
                _ => Some("3".to_string()),
            };
            let epoch = match input.byte() % 4 {
                0 => None,
                1 => Some(json!(epochs.get(room).map_or("unknown", String::as_str)).to_string()),
                2 => Some("\"bogus\"".to_string()),
                _ => Some("3".to_string()),
            };
            let mut payload = format!("{{\"room\":{}", json!(room));
            if let Some(since) = since {
                payload.push_str(&format!(",\"since\":{since}"));
            }
            if let Some(epoch) = epoch {
                payload.push_str(&format!(",\"epoch\":{epoch}"));
            }
            payload.push('}');
            envelope("join", id_json(input.byte()), payload)
        }
        template::LEAVE => {
            let room = *input.pick(&ROOMS);
            envelope(
                "leave",
                id_json(input.byte()),
                json!({ "room": room }).to_string(),
            )
        }
        template::MESSAGE => {
            let room = *input.pick(&ROOMS);
            let content = content_json(input.byte(), input.byte());
            let payload = format!("{{\"room\":{},\"content\":{content}}}", json!(room));
            envelope("message", id_json(input.byte()), payload)
        }
        template::DIRECT => {
            let to = match input.byte() % 5 {
                4 => "nobody",
                n => USERS[usize::from(n)],
            };
            let content = content_json(input.byte(), input.byte());
            let payload = format!("{{\"to\":{},\"content\":{content}}}", json!(to));
            envelope("direct", id_json(input.byte()), payload)
        }
        template::TYPING => {
            let room = *input.pick(&ROOMS);
            let typing = match input.byte() % 3 {
                0 => "true",
                1 => "false",
                _ => "\"yes\"",
            };
            let payload = format!("{{\"room\":{},\"is_typing\":{typing}}}", json!(room));
            envelope("typing", id_json(input.byte()), payload)
        }
        template::PRESENCE => {
            let room = *input.pick(&ROOMS);
            envelope(
                "presence",
                id_json(input.byte()),
                json!({ "room": room }).to_string(),
            )
        }
        template::PING => envelope("ping", id_json(input.byte()), "null".to_string()),
        template::REFRESH => {
            let tokens = tokens();
            // Half the choices are the connection's own user's tokens.
            let choice = usize::from(input.byte());
            let token = if choice % 2 == 0 {
                &tokens[user * 3 + (choice / 2) % 3]
            } else {
                &tokens[(choice / 2) % tokens.len()]
            };
            envelope(
                "refresh",
                id_json(input.byte()),
                json!({ "token": token }).to_string(),
            )
        }
        template::UNKNOWN => envelope("Join", id_json(input.byte()), "{}".to_string()),
        template::BAD_JSON => "{\"type\":\"join\",\"payload\":{\"room\":".to_string(),
        template::BAD_PAYLOAD => {
            envelope("leave", id_json(input.byte()), "[\"lobby\"]".to_string())
        }
        _ => {
            let room = *input.pick(&ROOMS);
            let escaped: String = room
                .chars()
                .map(|c| format!("\\u{:04x}", c as u32))
                .collect();
            envelope(
                "join",
                id_json(input.byte()),
                format!("{{\"room\":\"{escaped}\"}}"),
            )
        }
    }
}

/// The `version` of the state file (`state::VERSION`, private there).
const STATE_VERSION: u32 = 1;

/// A `POST /api/publish` body: to a room (any of `ROOMS`), to a user (or
/// nobody), malformed, or raw fuzz bytes.
fn api_publish_body(input: &mut Input<'_>) -> Vec<u8> {
    match input.byte() % 5 {
        0 => {
            let room = *input.pick(&ROOMS);
            let content = content_json(input.byte(), input.byte());
            format!("{{\"room\":{},\"content\":{content}}}", json!(room)).into_bytes()
        }
        1 => {
            let to = match input.byte() % 5 {
                4 => "nobody",
                n => USERS[usize::from(n)],
            };
            let content = content_json(input.byte(), input.byte());
            format!("{{\"user\":{},\"content\":{content}}}", json!(to)).into_bytes()
        }
        2 => br#"{"room":"lobby","user":"alice","content":1}"#.to_vec(),
        3 => br#"{"room":"lobby"}"#.to_vec(),
        _ => {
            let len = usize::from(input.byte());
            input.take(len).to_vec()
        }
    }
}

/// An API answer is a JSON object; a refusal has a message.
fn check_api_answer(answer: &Option<ApiAnswer>, step: usize) {
    match answer {
        Some(ApiAnswer::Ok(body)) => assert!(
            serde_json::from_str::<Value>(body).is_ok_and(|value| value.is_object()),
            "step {step}: API answer {body:?}"
        ),
        Some(ApiAnswer::BadRequest(message)) => {
            assert!(!message.is_empty(), "step {step}: empty API error")
        }
        other => panic!("step {step}: a local hub answers at once: {other:?}"),
    }
}

/// A write budget byte: `n × 24` bytes, 255 for everything.
fn budget(byte: u8) -> usize {
    match byte {
        255 => usize::MAX,
        n => usize::from(n) * 24,
    }
}

/// A socket that takes `budget` bytes, then would block.
struct Socket {
    taken: Vec<u8>,
    budget: usize,
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.budget);
        self.taken.extend_from_slice(&buf[..n]);
        self.budget -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the harness knows of one open (not yet released) connection.
struct Client {
    user: usize,
    echo: bool,
    /// Bytes written to the socket and not yet parsed into whole frames.
    pending: Vec<u8>,
    /// Frames parsed so far.
    frames: usize,
    /// The harness queued a close frame (as the shell does for a hub close).
    close_queued: bool,
    /// A close frame was read off the socket.
    closed: bool,
    /// Rooms between `joined` and `left`, with the last message seq seen.
    rooms: HashMap<String, u64>,
}

impl Client {
    fn new(user: usize, echo: bool) -> Self {
        Client {
            user,
            echo,
            pending: Vec::new(),
            frames: 0,
            close_queued: false,
            closed: false,
            rooms: HashMap::new(),
        }
    }
}

/// The hub and the shell's view of it.
struct Harness {
    hub: Hub,
    now: Millis,
    clients: Vec<Option<Client>>,
    /// The last epoch announced for each room name.
    epochs: HashMap<String, String>,
    step: usize,
    /// The shell's write staging buffer.
    staging: Staging,
}

/// Input: a sequence of operations (see [`op`]); each op byte is followed by
/// its argument bytes.
///
/// Checks, after every step: `Hub::check_invariants`, the open-connection
/// count; on every write: the queue gives out exactly its bytes, in order;
/// the bytes a client reads are whole, well-formed server frames (valid JSON
/// objects of known types, `welcome` first, messages only for rooms it is in
/// and in seq order, nothing after a close), and once a closing connection's
/// queue is empty the stream ends with the close frame.
pub fn hub_events(data: &[u8]) {
    let mut harness = Harness {
        hub: Hub::new(hub_config()),
        now: HUB_NOW,
        clients: (0..CONNS).map(|_| None).collect(),
        epochs: HashMap::new(),
        step: 0,
        staging: Staging::new(),
    };
    let mut input = Input { data };
    while let Some(code) = input.next() {
        harness.step += 1;
        harness.apply(code % op::COUNT, &mut input);
        harness.check();
    }
}

impl Harness {
    fn apply(&mut self, code: u8, input: &mut Input<'_>) {
        match code {
            op::CONNECT => {
                let conn = input.conn();
                let user = usize::from(input.byte()) % USERS.len();
                let profile = input.byte();
                let join = match input.byte() {
                    0 => None,
                    n => Some(ROOMS[usize::from(n - 1) % ROOMS.len()]),
                };
                if self.clients[conn].is_none() {
                    self.hub
                        .connect(conn, identity(USERS[user], profile), join, self.now);
                    self.clients[conn] = Some(Client::new(user, false));
                }
            }
            op::CONNECT_ECHO => {
                let conn = input.conn();
                if self.clients[conn].is_none() {
                    self.hub.connect_echo(conn, self.now);
                    self.clients[conn] = Some(Client::new(0, true));
                }
            }
            op::TEXT => {
                let conn = input.conn();
                let user = self.clients[conn].as_ref().map_or(0, |c| c.user);
                let text = template_text(input, user, &self.epochs);
                self.receive(conn, &text);
            }
            op::RAW => {
                let conn = input.conn();
                let len = usize::from(input.byte());
                let text = String::from_utf8_lossy(input.take(len)).into_owned();
                self.receive(conn, &text);
            }
            op::BURST => {
                let conn = input.conn();
                let count = 1 + input.byte() % 16;
                let size = input.byte();
                let room = *input.pick(&ROOMS);
                let text = format!(
                    "{{\"type\":\"message\",\"payload\":{{\"room\":{},\"content\":{}}}}}",
                    json!(room),
                    json!("b".repeat(usize::from(size) * 16))
                );
                for _ in 0..count {
                    self.receive(conn, &text);
                }
            }
            op::DISCONNECT => {
                let conn = input.conn();
                self.hub.disconnect(conn, self.now);
            }
            op::RELEASE => {
                let conn = input.conn();
                self.hub.release(conn, self.now);
                self.clients[conn] = None;
            }
            op::TICK => {
                self.now += *input.pick(&STEPS);
                self.hub.tick(self.now);
            }
            op::ADVANCE => {
                self.now += *input.pick(&STEPS);
            }
            op::NEXT_DEADLINE => {
                if let Some(due) = self.hub.next_deadline() {
                    self.now = self.now.max(due);
                }
                self.hub.tick(self.now);
            }
            op::API_PUBLISH => {
                let body = api_publish_body(input);
                let answer = self.hub.api_publish(&body, self.now, 0);
                check_api_answer(&answer, self.step);
            }
            op::API_DISCONNECT => {
                let body = match input.byte() % 3 {
                    0 => json!({ "user": USERS[usize::from(input.byte()) % USERS.len()] })
                        .to_string()
                        .into_bytes(),
                    1 => br#"{"user":"nobody"}"#.to_vec(),
                    _ => {
                        let len = usize::from(input.byte());
                        input.take(len).to_vec()
                    }
                };
                let answer = self.hub.api_disconnect(&body, self.now, 0);
                check_api_answer(&answer, self.step);
            }
            op::RESTART => self.restart(),
            op::WRITE => {
                let conn = input.conn();
                let budget = budget(input.byte());
                self.write(conn, budget);
            }
            op::DRAINED => {
                let conn = input.conn();
                self.hub.drained(conn);
            }
            op::SAW_ACTIVITY => {
                let conn = input.conn();
                self.hub.saw_activity(conn, self.now);
            }
            op::MARK_DIRTY => {
                let conn = input.conn();
                self.hub.mark_dirty(conn);
            }
            op::TAKE_DIRTY => {
                self.take_dirty();
            }
            _ => {
                let budget = budget(input.byte());
                for conn in self.take_dirty() {
                    self.write(conn, budget);
                }
            }
        }
        // The shell applies the hub's closes after every event.
        let mut closes = Vec::new();
        self.hub.take_closes(&mut closes);
        for close in closes {
            self.apply_close(&close);
        }
    }

    /// Save, load and import the rooms into a fresh hub, as a restart with
    /// `--state-file` does: what was saved loads, and imports unchanged.
    fn restart(&mut self) {
        let step = self.step;
        let mut saved = self.hub.export_rooms();
        let file = json!({ "version": STATE_VERSION, "rooms": saved });
        let bytes = serde_json::to_vec(&file).expect("a snapshot serializes");
        let loaded = roomcast::state::parse(&bytes)
            .unwrap_or_else(|error| panic!("step {step}: the saved state does not load: {error}"));
        assert_eq!(
            loaded, saved,
            "step {step}: the state file changed the rooms"
        );
        self.hub = Hub::new(hub_config());
        self.hub.import_rooms(loaded, self.now);
        let mut imported = self.hub.export_rooms();
        saved.sort_by(|a, b| a.name.cmp(&b.name));
        imported.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(imported, saved, "step {step}: import changed the rooms");
        for client in &mut self.clients {
            *client = None;
        }
    }

    /// `Hub::take_dirty`: open connections only, each listed once.
    fn take_dirty(&mut self) -> Vec<ConnId> {
        let mut dirty = Vec::new();
        self.hub.take_dirty(&mut dirty);
        for (index, &conn) in dirty.iter().enumerate() {
            assert!(
                self.clients.get(conn).is_some_and(Option::is_some),
                "step {}: dirty list names connection {conn}, which is not open",
                self.step
            );
            assert!(
                !dirty[..index].contains(&conn),
                "step {}: dirty list names {conn} twice: {dirty:?}",
                self.step
            );
        }
        dirty
    }

    /// A text frame from the client; the shell only reads frames from rooms
    /// connections (an echo connection echoes in the shell).
    fn receive(&mut self, conn: ConnId, text: &str) {
        if self.clients[conn].as_ref().is_some_and(|c| !c.echo) {
            self.hub.receive_text(conn, text, self.now);
        }
    }

    /// What the shell does with a hub close: tungstenite queues a close frame
    /// behind whatever is queued, then the hub forgets the rooms.
    fn apply_close(&mut self, close: &CloseRequest) {
        let step = self.step;
        assert!(
            matches!(close.code, 1008 | 1011 | 4000 | 4001 | 4003),
            "step {step}: close code {} ({})",
            close.code,
            close.reason
        );
        // The shell ignores a close for a connection it has freed.
        let Some(client) = self.clients.get_mut(close.conn).and_then(Option::as_mut) else {
            return;
        };
        // The queue is empty but the client holds part of a frame: the hub
        // dropped the rest of a frame already half on the wire, and the
        // close frame would land inside it.
        let queue_empty = self
            .hub
            .outbound_mut(close.conn)
            .is_none_or(|q| q.is_empty());
        assert!(
            !queue_empty || client.pending.is_empty(),
            "step {step}: connection {}: closed with {} ({}) after its queue was cleared in the \
             middle of a frame: the client has {} bytes of an unfinished frame ({:02x?}), and \
             the close frame would be read as its payload",
            close.conn,
            close.code,
            close.reason,
            client.pending.len(),
            &client.pending[..client.pending.len().min(16)]
        );
        if !client.close_queued {
            client.close_queued = true;
            let mut frame = vec![0x88, (2 + close.reason.len()) as u8];
            frame.extend_from_slice(&close.code.to_be_bytes());
            frame.extend_from_slice(close.reason.as_bytes());
            if let Some(queue) = self.hub.outbound_mut(close.conn) {
                queue.write_all(&frame).expect("the queue never refuses");
            }
            self.hub.mark_dirty(close.conn);
        }
        self.hub.disconnect(close.conn, self.now);
    }

    /// Writes up to `budget` bytes of the queue to the client, as the shell does.
    fn write(&mut self, conn: ConnId, budget: usize) {
        let step = self.step;
        let Some(queue) = self.hub.outbound_mut(conn) else {
            return;
        };
        let before = queue.to_vec();
        assert_eq!(before.len(), queue.len(), "step {step}: queue length");
        let mut socket = Socket {
            taken: Vec::new(),
            budget,
        };
        let written = queue
            .write_to(&mut socket, &mut self.staging)
            .unwrap_or_else(|error| panic!("step {step}: write_to failed: {error}"));
        assert_eq!(written, socket.taken.len(), "step {step}: bytes written");
        assert_eq!(
            socket.taken,
            before[..written],
            "step {step}: bytes out of order"
        );
        assert_eq!(
            queue.to_vec(),
            before[written..],
            "step {step}: queue after write"
        );
        let empty = queue.is_empty();
        if written > 0 {
            self.hub.drained(conn);
        }
        let Some(client) = self.clients[conn].as_mut() else {
            return;
        };
        client.pending.extend_from_slice(&socket.taken);
        read_frames(client, &mut self.epochs, step, conn);
        if empty && client.close_queued {
            assert!(
                client.pending.is_empty() && client.closed,
                "step {step}: connection {conn}: its queue is empty, but the bytes it was sent do \
                 not end with the close frame ({} bytes of an unfinished frame: {:02x?})",
                client.pending.len(),
                &client.pending[..client.pending.len().min(64)]
            );
        }
    }

    fn check(&self) {
        if let Err(error) = self.hub.check_invariants() {
            panic!("step {}: check_invariants: {error}", self.step);
        }
        let open = self.clients.iter().filter(|c| c.is_some()).count();
        assert_eq!(
            self.hub.connection_count(),
            open,
            "step {}: connection_count",
            self.step
        );
    }
}

/// Parses the whole frames at the front of `client.pending` and checks them.
fn read_frames(
    client: &mut Client,
    epochs: &mut HashMap<String, String>,
    step: usize,
    conn: ConnId,
) {
    loop {
        let bytes = &client.pending;
        if bytes.len() < 2 {
            return;
        }
        let (first, second) = (bytes[0], bytes[1]);
        let (header, len) = match second & 0x7f {
            126 if bytes.len() >= 4 => (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
            127 if bytes.len() >= 10 => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&bytes[2..10]);
                (
                    10,
                    usize::try_from(u64::from_be_bytes(raw)).unwrap_or(usize::MAX),
                )
            }
            126 | 127 => return,
            n => (2, usize::from(n)),
        };
        if bytes.len() - header < len {
            return;
        }
        let payload = bytes[header..header + len].to_vec();
        client.pending.drain(..header + len);
        let what = format!("step {step}: connection {conn}, frame {}", client.frames);
        client.frames += 1;
        assert!(!client.closed, "{what}: a frame after the close frame");
        assert_eq!(second & 0x80, 0, "{what}: a masked server frame");
        match first {
            0x81 => read_text(client, epochs, &payload, &what),
            0x89 => assert!(payload.is_empty(), "{what}: a ping with a payload"),
            0x88 => {
                assert!(client.close_queued, "{what}: a close frame nobody queued");
                client.closed = true;
            }
            other => panic!("{what}: frame header byte {other:#04x} ({payload:02x?})"),
        }
    }
}

fn read_text(
    client: &mut Client,
    epochs: &mut HashMap<String, String>,
    payload: &[u8],
    what: &str,
) {
    assert!(
        !client.echo,
        "{what}: an application frame on an echo connection"
    );
    let text = std::str::from_utf8(payload).unwrap_or_else(|_| panic!("{what}: text not UTF-8"));
    let frame: Value =
        serde_json::from_str(text).unwrap_or_else(|error| panic!("{what}: {error}: {text}"));
    let kind = frame["type"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no type: {text}"));
    let body = &frame["payload"];
    assert!(body.is_object(), "{what}: payload not an object: {text}");
    if client.frames == 1 {
        assert_eq!(kind, "welcome", "{what}: the first frame: {text}");
    }
    let room = body["room"].as_str().map(str::to_string);
    let seq = body["seq"].as_u64();
    match kind {
        "welcome" => assert_eq!(client.frames, 1, "{what}: a second welcome"),
        "joined" => {
            let (Some(room), Some(seq), Some(epoch)) = (room, seq, body["epoch"].as_str()) else {
                panic!("{what}: {text}");
            };
            assert!(
                protocol::is_valid_room_name(&room),
                "{what}: joined {room:?}"
            );
            let missed = body["missed"].as_u64().unwrap_or(0);
            assert_eq!(
                body["recovered"].is_boolean(),
                body["missed"].is_u64(),
                "{what}: recovered and missed go together: {text}"
            );
            assert!(missed <= seq, "{what}: {text}");
            epochs.insert(room.clone(), epoch.to_string());
            client.rooms.insert(room, seq - missed);
        }
        "left" => {
            let room = room.unwrap_or_else(|| panic!("{what}: {text}"));
            assert!(
                client.rooms.remove(&room).is_some(),
                "{what}: left a room never joined: {text}"
            );
        }
        "message" => {
            let (Some(room), Some(seq)) = (room, seq) else {
                panic!("{what}: {text}");
            };
            let Some(last) = client.rooms.get_mut(&room) else {
                panic!("{what}: a message for {room:?}, which this connection is not in: {text}");
            };
            assert!(seq > *last, "{what}: seq {seq} after {last} in {room:?}");
            *last = seq;
        }
        "lagged" => {
            let (Some(from), Some(to)) = (body["from_seq"].as_u64(), body["to_seq"].as_u64())
            else {
                panic!("{what}: {text}");
            };
            assert!(from <= to, "{what}: {text}");
            let room = room.unwrap_or_else(|| panic!("{what}: {text}"));
            assert!(
                client.rooms.contains_key(&room),
                "{what}: lagged for a room not in: {text}"
            );
        }
        "error" => {
            let code = body["code"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: {text}"));
            let known = [
                "invalid_json",
                "invalid_message",
                "unknown_type",
                "invalid_room",
                "not_in_room",
                "too_many_rooms",
                "forbidden",
                "user_offline",
                "invalid_token",
                "rate_limited",
            ];
            assert!(known.contains(&code), "{what}: error code {code}");
        }
        "ack" | "pong" | "presence" | "typing" | "user_joined" | "user_left" | "direct"
        | "refreshed" => {}
        other => panic!("{what}: unknown frame type {other:?}: {text}"),
    }
    if let Some(id) = frame.get("id") {
        assert!(
            id.is_number() || id.as_str().is_some_and(|s| s.len() <= MAX_ID_BYTES),
            "{what}: id {id}"
        );
    }
}
