//! Replays the fuzz corpora on stable, without libFuzzer: every file under
//! `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/` goes through the
//! same checks as `cargo fuzz run <target>` (the logic lives in
//! `fuzz/fuzz_targets/common.rs`, shared with the fuzz crate).
//!
//! The seed files are written by [`write_seeds`] (`cargo test --test
//! fuzz_replay -- --ignored write_seeds`); [`generated_seeds_replay`] runs
//! the same generator in memory so the two cannot drift apart silently.

#[path = "../fuzz/fuzz_targets/common.rs"]
mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use common::{HS_API, HS_DEMO, HS_ECHO, HS_FULL, HS_ORIGINS, HS_SMALL_BODY, op, template};
use roomcast::auth::{TokenClaims, sign};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("handshake_head", common::handshake_head),
    ("envelope", common::envelope),
    ("hub_events", common::hub_events),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted; none when the folder is absent.
fn corpus_files(kind: &str, target: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .filter(|path| {
            // `.gitkeep`, a README: not inputs.
            !path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with('.') || name.ends_with(".md"))
        })
        .collect();
    files.sort();
    files
}

/// Runs every input, then fails naming each one that panicked.
fn replay(target: &str, run: Target, inputs: Vec<(String, Vec<u8>)>) -> usize {
    let count = inputs.len();
    let failed: Vec<String> = inputs
        .into_iter()
        .filter(|(_, data)| catch_unwind(AssertUnwindSafe(|| run(data))).is_err())
        .map(|(name, _)| name)
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {count} inputs failed (panic messages above): {failed:#?}",
        failed.len()
    );
    count
}

fn replay_files(target: &str, run: Target) {
    let mut inputs = Vec::new();
    for kind in ["seeds", "regressions"] {
        for path in corpus_files(kind, target) {
            let data = std::fs::read(&path).expect("readable corpus file");
            inputs.push((path.display().to_string(), data));
        }
    }
    assert!(
        !corpus_files("seeds", target).is_empty(),
        "no seeds for {target} under fuzz/seeds/{target}/"
    );
    replay(target, run, inputs);
}

#[test]
fn handshake_head_corpus() {
    replay_files("handshake_head", common::handshake_head);
}

#[test]
fn envelope_corpus() {
    replay_files("envelope", common::envelope);
}

#[test]
fn hub_events_corpus() {
    replay_files("hub_events", common::hub_events);
}

#[test]
fn generated_seeds_replay() {
    for (target, run) in TARGETS {
        let inputs = seeds(target)
            .into_iter()
            .map(|(name, data)| (format!("generated {target}/{name}"), data))
            .collect();
        assert!(replay(target, run, inputs) > 0);
    }
}

/// Writes the generated seeds to `fuzz/seeds/<target>/` (replacing files of
/// the same name). Run it after changing the generator or an input format.
#[test]
#[ignore = "writes fuzz/seeds/; run by hand"]
fn write_seeds() {
    for (target, _) in TARGETS {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).expect("create the seed folder");
        for (name, data) in seeds(target) {
            std::fs::write(dir.join(name), data).expect("write a seed");
        }
    }
}

// ---------------------------------------------------------------------------
// Seed generators
// ---------------------------------------------------------------------------

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "handshake_head" => handshake_seeds(),
        "envelope" => envelope_seeds(),
        _ => hub_seeds(),
    }
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn token(sub: &str, expires_at: Option<u64>) -> String {
    sign(
        common::SECRET,
        &TokenClaims {
            sub: sub.to_string(),
            name: Some(format!("{sub} name")),
            expires_at,
            rooms: None,
        },
    )
}

fn upgrade(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A server-API request head with the `Authorization` value and extra headers.
fn api(target: &str, authorization: &str, extra: &str) -> String {
    format!("POST {target} HTTP/1.1\r\nAuthorization: {authorization}\r\n{extra}\r\n")
}

fn handshake_seeds() -> Vec<(String, Vec<u8>)> {
    let now = common::HANDSHAKE_NOW_SECS;
    let good = token("alice", Some(now + 3600));
    let expired = token("alice", Some(now - 1));
    let forged = sign(
        b"other",
        &TokenClaims {
            sub: "alice".into(),
            ..TokenClaims::default()
        },
    );
    let cases: Vec<(&str, u8, u8, String)> = vec![
        (
            "upgrade_query_token",
            0,
            0,
            upgrade(&format!("/ws?token={good}"), ""),
        ),
        (
            "upgrade_room_cookie_origin",
            HS_ORIGINS,
            3,
            upgrade(
                "/ws/team%3Aa",
                &format!("Origin: https://a.example\r\nCookie: a=1; roomcast_token=\"{good}\"\r\n"),
            ),
        ),
        (
            "upgrade_split_lists",
            0,
            1,
            format!(
                "GET /ws?token={good} HTTP/1.1\r\nupgrade: WebSocket\r\nConnection: keep-alive\r\n\
                 Connection: upgrade\r\nsec-websocket-key:  {KEY} \r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
        ),
        (
            "echo",
            HS_ECHO,
            2,
            upgrade(&format!("/echo?token={good}"), ""),
        ),
        ("health", 0, 0, "GET /health HTTP/1.0\r\n\r\n".into()),
        (
            "health_keepalive_tail",
            0,
            5,
            "GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /health HTTP/1.1\r\n\r\n".into(),
        ),
        (
            "demo_token",
            HS_DEMO,
            0,
            "GET /demo/token?x&name=Ann+Lee%21&name=Z HTTP/1.1\r\n\r\n".into(),
        ),
        (
            "capacity",
            HS_FULL,
            0,
            upgrade(&format!("/ws?token={good}"), ""),
        ),
        (
            "origin_refused",
            HS_ORIGINS,
            0,
            upgrade(
                &format!("/ws?token={good}"),
                "Origin: https://evil.example\r\n",
            ),
        ),
        (
            "expired_token",
            0,
            0,
            upgrade(&format!("/ws?token={expired}"), ""),
        ),
        (
            "forged_token",
            0,
            0,
            upgrade(&format!("/ws?token={forged}"), ""),
        ),
        ("no_token", 0, 0, upgrade("/ws", "Cookie: other=1\r\n")),
        (
            "bad_version",
            0,
            0,
            upgrade("/ws", "").replace("Version: 13", "Version: 8"),
        ),
        (
            "http10_upgrade",
            0,
            0,
            upgrade("/ws", "").replacen("HTTP/1.1", "HTTP/1.0", 1),
        ),
        (
            "no_upgrade_headers",
            0,
            0,
            "GET /ws HTTP/1.1\r\n\r\n".into(),
        ),
        ("post_ws", 0, 0, "POST /ws HTTP/1.1\r\n\r\n".into()),
        ("not_found", 0, 0, "GET /ws/a/b HTTP/1.1\r\n\r\n".into()),
        ("bad_escape", 0, 0, "GET /ws/a%zz HTTP/1.1\r\n\r\n".into()),
        (
            "bad_header_line",
            0,
            7,
            "GET /ws HTTP/1.1\r\nbad\r\n\r\n".into(),
        ),
        (
            "oversize_head",
            0,
            255,
            format!("GET /ws HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(9000)),
        ),
        (
            "too_many_headers",
            0,
            9,
            format!("GET /health HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(70)),
        ),
        ("partial", 0, 0, "GET /ws HTTP/1.1\r\nUpgrade: webso".into()),
        ("garbage", 0, 0, "\u{0}\u{1}\u{ff}zz \r\n\r\n".into()),
        (
            "page",
            0,
            0,
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n".into(),
        ),
        (
            "client_script",
            0,
            4,
            "GET /roomcast.js HTTP/1.1\r\n\r\n".into(),
        ),
        ("metrics", 0, 0, "GET /metrics HTTP/1.0\r\n\r\n".into()),
        (
            "stats",
            0,
            0,
            "GET /api/stats?x=1 HTTP/1.1\r\nConnection: keep-alive\r\n\r\n".into(),
        ),
        (
            "api_publish",
            HS_API,
            2,
            api("/api/publish", "Bearer key", "Content-Length: 38\r\n")
                + r#"{"room":"lobby","content":{"n":1}}   "#,
        ),
        (
            "api_disconnect",
            HS_API,
            0,
            api("/api/disconnect", "Bearer key", "Content-Length: 16\r\n") + r#"{"user":"alice"}"#,
        ),
        (
            "api_wrong_key",
            HS_API,
            0,
            api("/api/publish", "Bearer nope", "Content-Length: 2\r\n") + "{}",
        ),
        ("api_disabled", 0, 0, api("/api/publish", "Bearer key", "")),
        (
            "api_too_large",
            HS_API | HS_SMALL_BODY,
            0,
            api("/api/publish", "Bearer key", "Content-Length: 17\r\n"),
        ),
        (
            "api_chunked",
            HS_API,
            0,
            api(
                "/api/publish",
                "Bearer key",
                "Transfer-Encoding: chunked\r\n",
            ),
        ),
        (
            "api_bad_length",
            HS_API,
            0,
            api("/api/publish", "Bearer key", "Content-Length: -1\r\n"),
        ),
        (
            "api_get",
            HS_API,
            0,
            "GET /api/publish HTTP/1.1\r\n\r\n".into(),
        ),
        (
            "api_lowercase_scheme_two_lengths",
            HS_API,
            1,
            api(
                "/api/disconnect",
                "bearer key",
                "Content-Length: 16\r\nContent-Length: 16\r\nConnection: close\r\n",
            ) + r#"{"user":"alice"}"#,
        ),
    ];
    cases
        .into_iter()
        .map(|(name, flags, chunk, request)| {
            let mut data = vec![flags, chunk];
            data.extend_from_slice(request.as_bytes());
            (name.to_string(), data)
        })
        .collect()
}

fn envelope_seeds() -> Vec<(String, Vec<u8>)> {
    let long_id = "x".repeat(257);
    let cases: Vec<(&str, String)> = vec![
        (
            "join",
            r#"{"type":"join","id":"j1","payload":{"room":"lobby","since":42,"epoch":"9f2c"}}"#.into(),
        ),
        ("join_plain", r#"{"type":"join","payload":{"room":"team:eng"}}"#.into()),
        ("leave", r#"{"type":"leave","id":3,"payload":{"room":"lobby"}}"#.into()),
        (
            "message",
            r#"{"type":"message","id":-1.5e3,"payload":{"room":"lobby","content":{"t":"hi","n":[1,2.5,null]}}}"#.into(),
        ),
        (
            "direct",
            r#"{"type":"direct","payload":{"to":"b\u00f6b","content":"\ud83d\ude00"}}"#.into(),
        ),
        (
            "typing",
            r#"{"type":"typing","payload":{"room":"lobby","is_typing":true}}"#.into(),
        ),
        ("presence", r#"{"type":"presence","payload":{"room":"lobby"}}"#.into()),
        ("ping", r#"{"type":"ping","id":null,"payload":null}"#.into()),
        ("ping_bare", r#" {"type":"ping"} "#.into()),
        (
            "refresh",
            r#"{"type":"refresh","id":"rf","payload":{"token":"a.b.c"}}"#.into(),
        ),
        ("unknown_type", r#"{"type":"Join","id":"u"}"#.into()),
        ("long_id", format!(r#"{{"type":"ping","id":"{long_id}"}}"#)),
        ("bool_id", r#"{"type":"ping","id":true}"#.into()),
        ("array", "[1,2]".into()),
        ("not_json", "not json".into()),
        ("truncated", r#"{"type":"join","payload":{"room":"#.into()),
        ("duplicate_type", r#"{"type":"ping","type":"join"}"#.into()),
        (
            "bad_since",
            r#"{"type":"join","payload":{"room":"a","since":-1,"epoch":3}}"#.into(),
        ),
        (
            "escaped_keys",
            r#"{"\u0074ype":"le\u0061ve","payload":{"ro\u006fm":"l\u006fbby"}}"#.into(),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, text)| (name.to_string(), text.into_bytes()))
        .collect()
}

/// Builds `hub_events` inputs op by op.
#[derive(Default)]
struct Ops(Vec<u8>);

impl Ops {
    fn raw_op(mut self, code: u8, args: &[u8]) -> Self {
        self.0.push(code);
        self.0.extend_from_slice(args);
        self
    }

    /// `join`: 0 for none, else index into `ROOMS` plus one.
    fn connect(self, conn: u8, user: u8, profile: u8, join: u8) -> Self {
        self.raw_op(op::CONNECT, &[conn, user, profile, join])
    }

    fn text(self, conn: u8, kind: u8, args: &[u8]) -> Self {
        let mut all = vec![conn, kind];
        all.extend_from_slice(args);
        self.raw_op(op::TEXT, &all)
    }

    /// A text frame of up to 255 bytes, not from a template.
    fn raw_text(self, conn: u8, text: &str) -> Self {
        let mut args = vec![conn, u8::try_from(text.len()).expect("at most 255 bytes")];
        args.extend_from_slice(text.as_bytes());
        self.raw_op(op::RAW, &args)
    }

    fn write(self, conn: u8, budget: u8) -> Self {
        self.raw_op(op::WRITE, &[conn, budget])
    }

    fn flush(self) -> Self {
        self.raw_op(op::FLUSH_DIRTY, &[255])
    }

    /// `step` indexes `STEPS`.
    fn tick(self, step: u8) -> Self {
        self.raw_op(op::TICK, &[step])
    }
}

fn hub_seeds() -> Vec<(String, Vec<u8>)> {
    use template::*;
    let lobby = 0;
    let team_a = 1;
    let cases: Vec<(&str, Ops)> = vec![
        (
            "chat",
            Ops::default()
                .connect(0, 0, 0, 1)
                .connect(1, 1, 0, 1)
                .text(0, MESSAGE, &[lobby, 2, 0, 1])
                .text(1, TYPING, &[lobby, 0, 0])
                .text(1, PRESENCE, &[lobby, 2])
                .flush()
                .tick(7)
                .text(1, DIRECT, &[0, 1, 0, 2])
                .text(0, LEAVE, &[lobby, 1])
                .flush(),
        ),
        (
            "recovery",
            Ops::default()
                .connect(0, 0, 0, 0)
                .text(0, JOIN, &[lobby, 0, 0, 0])
                .connect(1, 1, 0, 1)
                .text(1, MESSAGE, &[lobby, 0, 0, 0])
                .text(1, MESSAGE, &[lobby, 1, 0, 0])
                .flush()
                .text(0, LEAVE, &[lobby, 0])
                .text(1, MESSAGE, &[lobby, 2, 0, 0])
                .flush()
                .text(0, JOIN, &[lobby, 2, 1, 2])
                .text(0, JOIN, &[lobby, 1, 2, 1])
                .flush(),
        ),
        (
            "forget_room",
            Ops::default()
                .connect(0, 0, 0, 1)
                .text(0, MESSAGE, &[lobby, 0, 0, 0])
                .flush()
                .text(0, LEAVE, &[lobby, 0])
                .tick(21)
                .text(0, JOIN, &[lobby, 2, 1, 0])
                .flush(),
        ),
        (
            "too_many_rooms_and_bad_names",
            Ops::default()
                .connect(2, 2, 1, 2)
                .text(2, JOIN, &[lobby, 0, 0, 0])
                .text(2, JOIN, &[2, 0, 0, 0])
                .text(2, JOIN, &[3, 0, 0, 0])
                .text(2, JOIN, &[4, 0, 0, 0])
                .text(2, JOIN, &[5, 0, 0, 0])
                .text(2, ESCAPED_JOIN, &[team_a, 2])
                .text(2, BAD_JSON, &[])
                .text(2, BAD_PAYLOAD, &[4])
                .text(2, UNKNOWN, &[5])
                .flush(),
        ),
        (
            "heartbeat_timeout",
            Ops::default()
                .connect(0, 0, 0, 0)
                .raw_op(op::CONNECT_ECHO, &[1])
                .raw_op(op::NEXT_DEADLINE, &[])
                .flush()
                .raw_op(op::NEXT_DEADLINE, &[])
                .flush()
                .raw_op(op::RELEASE, &[0])
                .raw_op(op::RELEASE, &[1]),
        ),
        (
            "token_expiry_and_refresh",
            Ops::default()
                .connect(0, 0, 3, 1)
                .connect(1, 1, 3, 1)
                .text(0, REFRESH, &[0, 2])
                .text(1, REFRESH, &[1, 0])
                .flush()
                .tick(16)
                .flush(),
        ),
        (
            "rate_flood",
            Ops::default()
                .connect(3, 3, 0, 1)
                .raw_op(op::BURST, &[3, 15, 1, lobby])
                .flush(),
        ),
        (
            "slow_consumer_soft_mark",
            Ops::default()
                .connect(0, 0, 0, 1)
                .connect(1, 1, 0, 1)
                .write(1, 0)
                .raw_op(op::BURST, &[0, 4, 20, lobby])
                .tick(12)
                .raw_op(op::BURST, &[0, 4, 20, lobby])
                .write(1, 255)
                .raw_op(op::DRAINED, &[1])
                .flush(),
        ),
        (
            "api_and_restart",
            Ops::default()
                .connect(0, 0, 0, 1)
                .connect(1, 1, 0, 1)
                .text(0, MESSAGE, &[lobby, 0, 0, 0])
                .raw_op(op::API_PUBLISH, &[0, lobby, 2, 0])
                .raw_op(op::API_PUBLISH, &[1, 0, 1, 0])
                .raw_op(op::API_PUBLISH, &[1, 4, 1, 0])
                .raw_op(op::API_PUBLISH, &[3])
                .flush()
                .raw_op(op::API_DISCONNECT, &[0, 1])
                .flush()
                .raw_op(op::RESTART, &[])
                .connect(0, 0, 0, 0)
                .text(0, JOIN, &[lobby, 1, 1, 0])
                .flush()
                .raw_op(op::API_DISCONNECT, &[2, 3])
                .raw_op(op::API_DISCONNECT, &[1]),
        ),
        (
            "disconnect_release_reconnect",
            Ops::default()
                .connect(0, 0, 0, 1)
                .connect(1, 0, 0, 1)
                .raw_op(op::DISCONNECT, &[0])
                .raw_op(op::TAKE_DIRTY, &[])
                .flush()
                .raw_op(op::RELEASE, &[0])
                .connect(0, 1, 0, 1)
                .raw_text(0, r#"{"type":"ping","id":"é"}"#)
                .raw_op(op::ADVANCE, &[3])
                .raw_op(op::SAW_ACTIVITY, &[1])
                .raw_op(op::MARK_DIRTY, &[1])
                .flush(),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, ops)| (name.to_string(), ops.0))
        .collect()
}
