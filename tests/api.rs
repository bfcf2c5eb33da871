//! The HTTP side of roomcast against the real binary over real sockets:
//! the server API (`POST /api/publish`, `POST /api/disconnect`, PROTOCOL §6 and
//! §11 "Publish API"), its statuses, keep-alive and pipelining, the handshake
//! timeout applied to bodies and idle keep-alive connections, `/metrics` and
//! `/api/stats` (§7, §11 "Stats"), and the embedded page and client module.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use common::{Client, TestServer, WAIT};
use serde_json::{Value, json};
use tungstenite::Message;

/// The API key the servers of these tests are started with.
const KEY: &str = "api-key-1";

/// Every handshake rejection reason of PROTOCOL §11 "Stats".
const PROTOCOL_REASONS: [&str; 10] = [
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
];

/// The two extra reasons the README adds for the server API.
/// Reasons the server documents beyond §11's (`user_limit` is §14.4's).
const API_REASONS: [&str; 3] = ["api_disabled", "payload_too_large", "user_limit"];

// ---------------------------------------------------------------------------
// A small HTTP/1.1 client that frames responses by Content-Length
// ---------------------------------------------------------------------------

/// One parsed HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// The first header `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    fn connection(&self) -> &str {
        self.header("connection").unwrap_or("")
    }
}

/// Reads one response; `None` on a clean EOF before its first byte.
fn read_response(reader: &mut impl BufRead) -> Option<Response> {
    try_read_response(reader).expect("read a response")
}

/// As [`read_response`], with the I/O error (a reset, the read timeout) returned.
fn try_read_response(reader: &mut impl BufRead) -> std::io::Result<Option<Response>> {
    let mut status_line = String::new();
    let read = reader.read_line(&mut status_line)?;
    if read == 0 {
        return Ok(None);
    }
    assert!(
        status_line.starts_with("HTTP/1.1 ") && status_line.ends_with("\r\n"),
        "bad status line {status_line:?}"
    );
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line)?;
        assert!(read > 0, "EOF inside a response head");
        assert!(line.ends_with("\r\n"), "header line without CRLF: {line:?}");
        let line = line.trim_end_matches("\r\n");
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("bad header line {line:?}"));
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().expect("Content-Length is a number"))
        .expect("every response carries Content-Length");
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some(Response {
        status,
        headers,
        body,
    }))
}

/// Parses a complete answer captured by `TestServer::raw` (exactly one response).
fn parse_one(raw: &str) -> Response {
    let mut reader = raw.as_bytes();
    let response = read_response(&mut reader).unwrap_or_else(|| panic!("no response: {raw:?}"));
    assert!(reader.is_empty(), "bytes after the response: {reader:?}");
    response
}

/// One HTTP connection that may carry several requests.
struct Http {
    reader: BufReader<TcpStream>,
}

impl Http {
    fn connect(server: &TestServer) -> Self {
        let stream = TcpStream::connect(server.addr).expect("tcp connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Http {
            reader: BufReader::new(stream),
        }
    }

    /// Writes bytes as they are (one `write_all`).
    fn send(&mut self, bytes: &[u8]) {
        self.reader
            .get_mut()
            .write_all(bytes)
            .expect("write request");
    }

    /// The next complete response (panics on EOF).
    fn response(&mut self) -> Response {
        read_response(&mut self.reader).expect("connection closed before a response")
    }

    fn request(&mut self, request: &str) -> Response {
        self.send(request.as_bytes());
        self.response()
    }

    /// The server closes without sending anything (more).
    fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .expect("the server closes the connection (EOF, within the read timeout)");
        assert!(
            rest.is_empty(),
            "unexpected bytes before EOF: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// Sends one request on a fresh connection and reads one response.
fn call(server: &TestServer, request: &str) -> Response {
    Http::connect(server).request(request)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: roomcast.test\r\n\r\n")
}

/// A POST to the server API with `Authorization: Bearer key` (when given).
fn post(path: &str, key: Option<&str>, body: &str) -> String {
    let auth = key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: roomcast.test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn publish(body: &str) -> String {
    post("/api/publish", Some(KEY), body)
}

fn disconnect(body: &str) -> String {
    post("/api/disconnect", Some(KEY), body)
}

/// Publishes on a fresh connection, expecting `200`; returns the JSON answer.
fn publish_ok(server: &TestServer, body: &str) -> Value {
    let response = call(server, &publish(body));
    assert_eq!(response.status, 200, "{body} → {}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{response:?}"
    );
    response.json()
}

/// A publish or disconnect refused with `400` and a `{"error": …}` body.
fn expect_400(server: &TestServer, request: &str) {
    let response = call(server, request);
    assert_eq!(response.status, 400, "{request:?} → {}", response.text());
    assert!(
        response.json()["error"].is_string(),
        "{request:?} → {}",
        response.text()
    );
}

// ---------------------------------------------------------------------------
// WebSocket helpers
// ---------------------------------------------------------------------------

/// The next text frame as received, unparsed (control frames skipped).
fn recv_raw(client: &mut Client) -> String {
    loop {
        match client.ws.read().expect("read") {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The next frame of type `kind`, raw and parsed (others are skipped).
fn recv_raw_type(client: &mut Client, kind: &str) -> (String, Value) {
    loop {
        let raw = recv_raw(client);
        let value: Value = serde_json::from_str(&raw).expect("json frame");
        if value["type"] == kind {
            return (raw, value);
        }
    }
}

fn server_user() -> Value {
    json!({"id": "server", "name": "server"})
}

fn user(id: &str) -> Value {
    json!({"id": id, "name": id})
}

// ---------------------------------------------------------------------------
// /metrics and /api/stats helpers
// ---------------------------------------------------------------------------

/// The samples of a Prometheus text exposition: `name` or `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value {line:?}"));
            (name.to_string(), value)
        })
        .collect()
}

/// `# TYPE` lines: family name (with the prefix) → kind.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            (name.to_string(), kind.to_string())
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

fn rejected(samples: &BTreeMap<String, f64>, reason: &str) -> f64 {
    sample(
        samples,
        &format!("roomcast_handshakes_rejected_total{{reason=\"{reason}\"}}"),
    )
}

fn metrics(server: &TestServer) -> (Response, BTreeMap<String, f64>) {
    let response = call(server, &get("/metrics"));
    assert_eq!(response.status, 200, "{}", response.text());
    let samples = samples(&response.text());
    (response, samples)
}

fn stats(server: &TestServer) -> Value {
    let response = call(server, &get("/api/stats"));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    response.json()
}

// ---------------------------------------------------------------------------
// POST /api/publish to a room
// ---------------------------------------------------------------------------

#[test]
fn publish_to_a_room_reaches_every_member_connection_from_the_server_user() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("lobby");
    let mut bob1 = server.connect("bob");
    bob1.join("lobby");
    let mut bob2 = server.connect("bob");
    bob2.join("lobby");
    // An outsider, connected but in no room.
    let mut carol = server.connect("carol");

    // Odd number spellings and non-ASCII text show that `content` is carried verbatim.
    let content =
        r#"{"text":"deploy finished","n":[1,2.50,-0,1e3,null],"nested":{"z":true,"a":"é\u00e9"}}"#;
    let answer = publish_ok(
        &server,
        &format!(r#"{{"room":"lobby","content":{content}}}"#),
    );
    assert_eq!(answer, json!({"delivered": 3, "seq": 1}));

    for member in [&mut alice, &mut bob1, &mut bob2] {
        let (raw, message) = recv_raw_type(member, "message");
        assert!(raw.contains(content), "content not carried verbatim: {raw}");
        let payload = &message["payload"];
        assert_eq!(payload["room"], "lobby", "{message}");
        assert_eq!(payload["user"], server_user(), "{message}");
        assert_eq!(payload["seq"], 1, "{message}");
        assert_eq!(
            payload["content"],
            serde_json::from_str::<Value>(content).unwrap()
        );
        assert!(payload["ts"].is_u64(), "{message}");
    }

    // The next publish takes the next seq, and the members get it in order.
    let answer = publish_ok(&server, r#"{"room":"lobby","content":"second"}"#);
    assert_eq!(answer, json!({"delivered": 3, "seq": 2}));
    for member in [&mut alice, &mut bob1, &mut bob2] {
        let message = member.recv();
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(message["payload"]["seq"], 2);
        assert_eq!(message["payload"]["content"], "second");
        member.assert_alive();
    }
    // The outsider got nothing.
    carol.assert_alive();
}

#[test]
fn publish_seq_is_shared_with_client_messages() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("r");
    let ack = alice
        .request(json!({"type": "message", "id": 1, "payload": {"room": "r", "content": "hi"}}));
    // The sender's ack and its own message may come in either order.
    let mut frames = vec![ack, alice.recv()];
    frames.sort_by_key(|frame| frame["type"].as_str().unwrap_or("").to_string());
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["payload"]["seq"], 1);
    assert_eq!(frames[1]["type"], "message", "{frames:?}");

    let answer = publish_ok(&server, r#"{"room":"r","content":{"from":"backend"}}"#);
    assert_eq!(answer, json!({"delivered": 1, "seq": 2}));
    let message = alice.recv();
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["payload"]["seq"], 2);
    assert_eq!(message["payload"]["user"], server_user());
}

#[test]
fn publish_to_a_room_without_members_takes_a_seq_and_is_recovered_by_a_later_join() {
    let server = TestServer::start(&["--api-key", KEY]);
    let first = publish_ok(&server, r#"{"room":"empty","content":{"n":1}}"#);
    assert_eq!(first, json!({"delivered": 0, "seq": 1}));
    let second = publish_ok(&server, r#"{"room":"empty","content":{"n":2}}"#);
    assert_eq!(second, json!({"delivered": 0, "seq": 2}));
    // A room with no members is not counted as a room.
    let (_, samples) = metrics(&server);
    assert_eq!(sample(&samples, "roomcast_rooms"), 0.0);

    let mut carol = server.connect("carol");
    let joined = carol.request(json!({"type": "join", "payload": {"room": "empty", "since": 0}}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["seq"], 2, "{joined}");
    assert_eq!(joined["payload"]["recovered"], true, "{joined}");
    assert_eq!(joined["payload"]["missed"], 2, "{joined}");
    assert_eq!(joined["payload"]["count"], 1, "{joined}");
    for n in 1..=2u64 {
        let replayed = carol.recv();
        assert_eq!(replayed["type"], "message", "{replayed}");
        assert_eq!(replayed["payload"]["seq"], n);
        assert_eq!(replayed["payload"]["room"], "empty");
        assert_eq!(replayed["payload"]["user"], server_user());
        assert_eq!(replayed["payload"]["content"], json!({"n": n}));
    }
    carol.assert_alive();
    // The next publish continues the sequence and now reaches carol.
    let third = publish_ok(&server, r#"{"room":"empty","content":{"n":3}}"#);
    assert_eq!(third, json!({"delivered": 1, "seq": 3}));
    assert_eq!(carol.recv()["payload"]["seq"], 3);
}

#[test]
fn publish_content_null_is_accepted_and_delivered_as_null() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("lobby");
    let answer = publish_ok(&server, r#"{"room":"lobby","content":null}"#);
    assert_eq!(answer, json!({"delivered": 1, "seq": 1}));
    let message = alice.recv();
    assert_eq!(message["type"], "message", "{message}");
    assert!(
        message["payload"]
            .as_object()
            .is_some_and(|p| p.get("content") == Some(&Value::Null)),
        "{message}"
    );
    let answer = publish_ok(&server, r#"{"user":"alice","content":null}"#);
    assert_eq!(answer, json!({"delivered": 1}));
    let direct = alice.recv();
    assert_eq!(direct["type"], "direct", "{direct}");
    assert!(
        direct["payload"]
            .as_object()
            .is_some_and(|p| p.get("content") == Some(&Value::Null)),
        "{direct}"
    );
}

// ---------------------------------------------------------------------------
// POST /api/publish to a user
// ---------------------------------------------------------------------------

#[test]
fn publish_to_a_user_reaches_each_of_their_connections_as_direct() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut bob1 = server.connect("bob");
    let mut bob2 = server.connect("bob");
    let mut alice = server.connect("alice");

    let content = r#"{"report":"ready","size":1.50}"#;
    let answer = publish_ok(&server, &format!(r#"{{"user":"bob","content":{content}}}"#));
    assert_eq!(answer, json!({"delivered": 2}));
    for tab in [&mut bob1, &mut bob2] {
        let (raw, direct) = recv_raw_type(tab, "direct");
        assert!(raw.contains(content), "content not verbatim: {raw}");
        assert_eq!(direct["payload"]["from"], server_user(), "{direct}");
        assert_eq!(
            direct["payload"]["content"],
            json!({"report": "ready", "size": 1.5})
        );
        assert!(direct["payload"]["ts"].is_u64(), "{direct}");
        tab.assert_alive();
    }
    // Nobody else heard it.
    alice.assert_alive();

    // Membership does not matter for a user publish, and no seq is involved.
    bob1.join("lobby");
    let answer = publish_ok(&server, r#"{"user":"bob","content":"again"}"#);
    assert_eq!(answer, json!({"delivered": 2}));
    assert_eq!(bob1.recv()["payload"]["content"], "again");
    assert_eq!(bob2.recv()["payload"]["content"], "again");

    // An unknown (or offline) user: delivered 0, still 200.
    let answer = publish_ok(&server, r#"{"user":"nobody","content":"hello?"}"#);
    assert_eq!(answer, json!({"delivered": 0}));
    drop(alice);
    for tab in [&mut bob1, &mut bob2] {
        tab.assert_alive();
    }
}

// ---------------------------------------------------------------------------
// POST /api/disconnect
// ---------------------------------------------------------------------------

#[test]
fn disconnect_closes_every_connection_of_the_user_with_4003() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("lobby");
    let mut bob1 = server.connect("bob");
    bob1.join("lobby");
    let mut bob2 = server.connect("bob");
    bob2.join("lobby");
    let mut carol = server.connect("carol");
    carol.join("lobby");
    // Drain the presence traffic so that what follows is only the disconnect's.
    let joined = alice.recv_type("user_joined");
    assert_eq!(joined["payload"]["user"], user("bob"));
    let joined = alice.recv_type("user_joined");
    assert_eq!(joined["payload"]["user"], user("carol"));
    alice.assert_alive();
    let joined = bob1.recv_type("user_joined");
    assert_eq!(joined["payload"]["user"], user("carol"));
    carol.assert_alive();

    let response = call(&server, &disconnect(r#"{"user":"bob"}"#));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({"closed": 2}));

    for tab in [&mut bob1, &mut bob2] {
        let (code, _reason) = tab.expect_close();
        assert_eq!(code, 4003);
    }
    // The others stay, and hear once that bob (all of him) left.
    for other in [&mut alice, &mut carol] {
        let left = other.recv();
        assert_eq!(left["type"], "user_left", "{left}");
        assert_eq!(
            left["payload"],
            json!({"room": "lobby", "user": user("bob"), "count": 2})
        );
        other.assert_alive();
    }
    let presence = alice.request(json!({"type": "presence", "payload": {"room": "lobby"}}));
    let ids: Vec<&str> = presence["payload"]["users"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|u| u["id"].as_str())
        .collect();
    assert!(!ids.contains(&"bob"), "{presence}");

    // Again: bob has no connection left.
    let response = call(&server, &disconnect(r#"{"user":"bob"}"#));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({"closed": 0}));
    // Bob may come back.
    let mut bob3 = server.connect("bob");
    bob3.assert_alive();
}

#[test]
fn disconnect_of_an_unknown_user_closes_nothing() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    let response = call(&server, &disconnect(r#"{"user":"nobody"}"#));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({"closed": 0}));
    alice.assert_alive();
}

// ---------------------------------------------------------------------------
// Statuses
// ---------------------------------------------------------------------------

#[test]
fn without_an_api_key_the_api_answers_403() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("alice");
    alice.join("lobby");
    for path in ["/api/publish", "/api/disconnect"] {
        for key in [None, Some(KEY), Some("")] {
            let request = post(path, key, r#"{"room":"lobby","user":"alice","content":1}"#);
            let response = parse_one(&server.raw(request.as_bytes()));
            assert_eq!(response.status, 403, "{path} {key:?}: {}", response.text());
            assert_eq!(response.connection(), "close");
        }
    }
    // Nothing was published or closed.
    alice.assert_alive();
    let stats = stats(&server);
    assert_eq!(stats["handshakes_rejected_total"]["api_disabled"], 6);
    assert_eq!(stats["handshakes_rejected_total"]["unauthorized"], 0);
}

#[test]
fn a_missing_or_wrong_key_is_401() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("lobby");
    let body = r#"{"room":"lobby","content":"nope"}"#;
    let length = body.len();
    let requests = [
        post("/api/publish", None, body),
        post("/api/publish", Some("wrong"), body),
        post("/api/publish", Some(""), body),
        // A prefix and an extension of the right key.
        post("/api/publish", Some(&KEY[..KEY.len() - 1]), body),
        post("/api/publish", Some(&format!("{KEY}x")), body),
        // Not the Bearer scheme.
        format!(
            "POST /api/publish HTTP/1.1\r\nAuthorization: Basic {KEY}\r\nContent-Length: {length}\r\n\r\n{body}"
        ),
        format!(
            "POST /api/publish HTTP/1.1\r\nAuthorization: {KEY}\r\nContent-Length: {length}\r\n\r\n{body}"
        ),
        post("/api/disconnect", None, r#"{"user":"alice"}"#),
        post("/api/disconnect", Some("wrong"), r#"{"user":"alice"}"#),
    ];
    for request in &requests {
        let response = parse_one(&server.raw(request.as_bytes()));
        assert_eq!(response.status, 401, "{request:?}: {}", response.text());
        assert_eq!(response.connection(), "close");
    }
    // Nothing reached alice, nor closed her; the room's seq did not move.
    alice.assert_alive();
    let answer = publish_ok(&server, r#"{"room":"lobby","content":"yes"}"#);
    assert_eq!(answer, json!({"delivered": 1, "seq": 1}));
    let stats = stats(&server);
    assert_eq!(
        stats["handshakes_rejected_total"]["unauthorized"],
        requests.len()
    );
}

#[test]
fn bad_bodies_are_400_with_an_error() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("lobby");
    let long_room = "r".repeat(1000);
    let bodies = [
        // Bad JSON.
        "{".to_string(),
        r#"{"room":"lobby","content":}"#.to_string(),
        r#"{"room":"lobby","content":1} trailing"#.to_string(),
        "not json".to_string(),
        String::new(),
        // JSON that is not an object.
        "[1,2]".to_string(),
        r#""lobby""#.to_string(),
        "null".to_string(),
        // Both room and user, or neither.
        r#"{"room":"lobby","user":"alice","content":1}"#.to_string(),
        r#"{"content":1}"#.to_string(),
        "{}".to_string(),
        // Invalid room names.
        r#"{"room":"","content":1}"#.to_string(),
        r#"{"room":"has space","content":1}"#.to_string(),
        r#"{"room":"a/b","content":1}"#.to_string(),
        format!(r#"{{"room":"{long_room}","content":1}}"#),
        // Wrong types.
        r#"{"room":5,"content":1}"#.to_string(),
        r#"{"user":["alice"],"content":1}"#.to_string(),
        // No content.
        r#"{"room":"lobby"}"#.to_string(),
        r#"{"user":"alice"}"#.to_string(),
    ];
    for body in &bodies {
        expect_400(&server, &publish(body));
    }
    // A body that is not UTF-8.
    let mut request = b"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer ".to_vec();
    request.extend_from_slice(KEY.as_bytes());
    let body = b"{\"room\":\"lobby\",\"content\":\"\xff\"}";
    request.extend_from_slice(format!("\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    let mut http = Http::connect(&server);
    http.send(&request);
    assert_eq!(http.response().status, 400);

    for body in ["{", "{}", r#"{"user":5}"#, r#"{"room":"lobby"}"#, "[]", ""] {
        expect_400(&server, &disconnect(body));
    }
    // None of it reached alice or took a seq.
    alice.assert_alive();
    let answer = publish_ok(&server, r#"{"room":"lobby","content":"ok"}"#);
    assert_eq!(answer["seq"], 1);
    let stats = stats(&server);
    assert_eq!(
        stats["handshakes_rejected_total"]["bad_request"],
        bodies.len() + 1 + 6
    );
}

#[test]
fn transfer_encoding_bodies_are_refused_with_400() {
    let server = TestServer::start(&["--api-key", KEY]);
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n\
         1e\r\n{{\"room\":\"lobby\",\"content\":1}}\r\n0\r\n\r\n"
    );
    let response = parse_one(&server.raw(request.as_bytes()));
    assert_eq!(response.status, 400, "{}", response.text());
    assert_eq!(response.connection(), "close");
}

#[test]
fn a_body_over_max_message_size_is_413_and_the_limit_itself_is_accepted() {
    let server = TestServer::start(&["--api-key", KEY, "--max-message-size", "1024"]);
    let mut alice = server.connect("alice");
    alice.join("lobby");

    // Content-Length 2000 announced; the server answers without waiting for the body.
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 2000\r\n\r\n"
    );
    let response = parse_one(&server.raw(head.as_bytes()));
    assert_eq!(response.status, 413, "{}", response.text());
    assert_eq!(response.connection(), "close");

    // The same with the body sent along.
    let body = format!(
        r#"{{"room":"lobby","content":"{}"}}"#,
        "x".repeat(1030 - 27)
    );
    assert!(body.len() > 1024);
    let response = parse_one(&server.raw(publish(&body).as_bytes()));
    assert_eq!(response.status, 413, "{}", response.text());

    // One byte over, and exactly the limit.
    let make = |length: usize| {
        let prefix = r#"{"room":"lobby","content":""#;
        let suffix = r#""}"#;
        let body = format!(
            "{prefix}{}{suffix}",
            "y".repeat(length - prefix.len() - suffix.len())
        );
        assert_eq!(body.len(), length);
        body
    };
    let response = call(&server, &publish(&make(1025)));
    assert_eq!(response.status, 413, "{}", response.text());
    let answer = publish_ok(&server, &make(1024));
    assert_eq!(answer, json!({"delivered": 1, "seq": 1}));
    let message = alice.recv();
    assert_eq!(message["payload"]["seq"], 1, "{message}");

    // The key is checked before the size: a wrong key with a large body is 401.
    let head =
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer wrong\r\nContent-Length: 2000\r\n\r\n";
    assert_eq!(server.raw_status(head.as_bytes()), 401);

    let stats = stats(&server);
    assert_eq!(stats["handshakes_rejected_total"]["payload_too_large"], 3);
}

#[test]
fn other_methods_on_the_api_are_405_with_allow_post() {
    let server = TestServer::start(&["--api-key", KEY]);
    for path in ["/api/publish", "/api/disconnect"] {
        for method in ["GET", "PUT", "DELETE", "HEAD"] {
            let request =
                format!("{method} {path} HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n");
            let raw = server.raw(request.as_bytes());
            if method == "HEAD" {
                // The answer to a HEAD has the headers and no body (RFC 9110 §9.3.2).
                assert!(raw.starts_with("HTTP/1.1 405 "), "{raw:?}");
                assert!(raw.contains("\r\nAllow: POST\r\n"), "{raw:?}");
                assert!(raw.ends_with("\r\n\r\n"), "{raw:?}");
                continue;
            }
            let response = parse_one(&raw);
            assert_eq!(response.status, 405, "{method} {path}");
            assert_eq!(response.header("allow"), Some("POST"), "{method} {path}");
            assert_eq!(response.connection(), "close");
        }
    }
    // And the reverse: the GET endpoints refuse POST with Allow: GET.
    let response = parse_one(&server.raw(post("/api/stats", Some(KEY), "{}").as_bytes()));
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET"));
    let stats = stats(&server);
    assert_eq!(stats["handshakes_rejected_total"]["method"], 9);
}

#[test]
fn refusals_close_the_connection_even_with_keep_alive_requested() {
    let server = TestServer::start(&["--api-key", KEY]);
    let requests = [
        "POST /api/publish HTTP/1.1\r\nConnection: keep-alive\r\nAuthorization: Bearer nope\r\nContent-Length: 2\r\n\r\n{}"
            .to_string(),
        "GET /api/publish HTTP/1.1\r\nConnection: keep-alive\r\n\r\n".to_string(),
        "GET /nowhere HTTP/1.1\r\nConnection: keep-alive\r\n\r\n".to_string(),
    ];
    for request in &requests {
        let mut http = Http::connect(&server);
        // A second request follows in the same write: it must not be answered.
        http.send(format!("{request}{}", get("/health")).as_bytes());
        let response = http.response();
        assert!(response.status >= 400, "{request:?}");
        assert_eq!(response.connection(), "close", "{request:?}");
        http.expect_eof();
    }
}

// ---------------------------------------------------------------------------
// Keep-alive and pipelining
// ---------------------------------------------------------------------------

#[test]
fn several_requests_share_one_keep_alive_connection() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("feed");
    let mut http = Http::connect(&server);

    let health = http.request(&get("/health"));
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    assert_eq!(health.connection(), "keep-alive");

    for n in 1..=3u64 {
        let response = http.request(&publish(&format!(r#"{{"room":"feed","content":{n}}}"#)));
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.connection(), "keep-alive");
        assert_eq!(response.json(), json!({"delivered": 1, "seq": n}));
        let message = alice.recv();
        assert_eq!(message["payload"]["seq"], n, "{message}");
        assert_eq!(message["payload"]["content"], n);
    }

    let stats = http.request(&get("/api/stats"));
    assert_eq!(stats.status, 200);
    assert_eq!(stats.connection(), "keep-alive");
    assert_eq!(stats.json()["connections"], 1);

    let metrics = http.request(&get("/metrics"));
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.connection(), "keep-alive");

    // A disconnect on the same connection, then one more request.
    let response = http.request(&disconnect(r#"{"user":"alice"}"#));
    assert_eq!(response.json(), json!({"closed": 1}));
    assert_eq!(response.connection(), "keep-alive");
    assert_eq!(alice.expect_close().0, 4003);
    assert_eq!(http.request(&get("/health")).status, 200);
    // None of this was a refusal.
    let stats = http.request(&get("/api/stats")).json();
    for (reason, count) in stats["handshakes_rejected_total"].as_object().unwrap() {
        assert_eq!(count, 0, "{reason}");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut http = Http::connect(&server);
    // Two requests in one write.
    http.send(format!("{}{}", get("/health"), get("/api/stats")).as_bytes());
    let first = http.response();
    assert_eq!(first.json(), json!({"status": "ok"}));
    assert_eq!(first.connection(), "keep-alive");
    let second = http.response();
    assert!(
        second.json().get("connections").is_some(),
        "{}",
        second.text()
    );
    assert_eq!(second.connection(), "keep-alive");

    // Bodies in the middle of a pipeline: three publishes, their seqs in order.
    let batch: String = (1..=3)
        .map(|n| publish(&format!(r#"{{"room":"p","content":{n}}}"#)))
        .collect();
    http.send(format!("{batch}{}", get("/health")).as_bytes());
    for n in 1..=3u64 {
        let response = http.response();
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json(), json!({"delivered": 0, "seq": n}));
    }
    assert_eq!(http.response().json(), json!({"status": "ok"}));

    // A request split in the middle of its body, then completed together with the next one.
    let split = publish(r#"{"room":"p","content":"split"}"#);
    let (front, back) = split.split_at(split.len() - 5);
    http.send(front.as_bytes());
    http.send(format!("{back}{}", get("/health")).as_bytes());
    assert_eq!(http.response().json(), json!({"delivered": 0, "seq": 4}));
    assert_eq!(http.response().json(), json!({"status": "ok"}));
}

#[test]
fn connection_close_on_a_request_closes_after_the_answer() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut http = Http::connect(&server);
    assert_eq!(http.request(&get("/health")).connection(), "keep-alive");
    let body = r#"{"room":"lobby","content":"bye"}"#;
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = http.request(&request);
    assert_eq!(response.status, 200);
    assert_eq!(response.json(), json!({"delivered": 0, "seq": 1}));
    assert_eq!(response.connection(), "close");
    http.expect_eof();

    // The same for a GET, and with the token among others.
    let mut http = Http::connect(&server);
    let response = http.request("GET /health HTTP/1.1\r\nConnection: foo, Close\r\n\r\n");
    assert_eq!(response.status, 200);
    assert_eq!(response.connection(), "close");
    http.expect_eof();

    // HTTP/1.0 is not kept alive.
    let mut http = Http::connect(&server);
    let response = http.request("GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(response.status, 200);
    assert_eq!(response.connection(), "close");
    http.expect_eof();

    // A request pipelined after the one with `Connection: close` is not answered.
    let mut http = Http::connect(&server);
    http.send(
        format!(
            "GET /health HTTP/1.1\r\nConnection: close\r\n\r\n{}",
            publish(r#"{"room":"lobby","content":"late"}"#)
        )
        .as_bytes(),
    );
    assert_eq!(http.response().connection(), "close");
    http.expect_eof();
    // So the second publish never happened: the next seq is 2.
    let answer = publish_ok(&server, r#"{"room":"lobby","content":"next"}"#);
    assert_eq!(answer["seq"], 2);
}

// ---------------------------------------------------------------------------
// The handshake timeout bounds bodies and idle keep-alive connections
// ---------------------------------------------------------------------------

#[test]
fn a_half_sent_body_is_closed_at_the_handshake_timeout_without_an_answer() {
    let server = TestServer::start(&["--api-key", KEY, "--handshake-timeout-ms", "300"]);
    let mut alice = server.connect("alice");
    alice.join("lobby");
    let mut http = Http::connect(&server);
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
    );
    http.send(head.as_bytes());
    http.send(br#"{"room":"lo"#); // 10 of the 100 announced bytes.
    http.expect_eof();
    // Nothing was published.
    alice.assert_alive();
    let stats = stats(&server);
    assert_eq!(stats["handshakes_rejected_total"]["timeout"], 1);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_at_the_handshake_timeout() {
    let server = TestServer::start(&["--api-key", KEY, "--handshake-timeout-ms", "300"]);
    let mut http = Http::connect(&server);
    let response = http.request(&get("/health"));
    assert_eq!(response.connection(), "keep-alive");
    let response = http.request(&publish(r#"{"room":"r","content":1}"#));
    assert_eq!(response.json(), json!({"delivered": 0, "seq": 1}));
    // Send nothing more: the server closes once the timeout has passed.
    http.expect_eof();
    let stats = stats(&server);
    let timeouts = stats["handshakes_rejected_total"]["timeout"]
        .as_u64()
        .unwrap();
    assert!(timeouts >= 1, "{stats}");
    // Upgraded WebSocket connections are not subject to it.
    let mut alice = server.connect("alice");
    let mut idle = Http::connect(&server);
    idle.expect_eof();
    alice.assert_alive();
}

#[test]
fn a_head_trickled_past_the_timeout_is_closed_without_an_answer() {
    let server = TestServer::start(&["--handshake-timeout-ms", "300"]);
    let mut http = Http::connect(&server);
    http.send(b"GET /health HTTP/1.1\r\nHost: x\r\n");
    http.expect_eof();
    assert_eq!(stats(&server)["handshakes_rejected_total"]["timeout"], 1);
}

// ---------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------

#[test]
fn metrics_exports_every_family_and_every_reason_from_start_up() {
    let server = TestServer::start(&["--heartbeat-ms", "0"]);
    let (response, samples) = metrics(&server);
    let content_type = response.header("content-type").unwrap_or("");
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text();
    let families = families(&text);
    for (family, kind) in [
        ("roomcast_connections", "gauge"),
        ("roomcast_rooms", "gauge"),
        ("roomcast_messages_received_total", "counter"),
        ("roomcast_messages_sent_total", "counter"),
        ("roomcast_messages_dropped_total", "counter"),
        ("roomcast_slow_consumers_closed_total", "counter"),
        ("roomcast_handshakes_rejected_total", "counter"),
        ("roomcast_bytes_sent_total", "counter"),
        ("roomcast_drops_total", "counter"),
        ("roomcast_loop_iteration_seconds", "histogram"),
    ] {
        assert_eq!(
            families.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family}\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "# HELP of {family}"
        );
    }
    for family in [
        "roomcast_connections",
        "roomcast_rooms",
        "roomcast_messages_received_total",
        "roomcast_messages_sent_total",
        "roomcast_messages_dropped_total",
        "roomcast_slow_consumers_closed_total",
    ] {
        assert_eq!(sample(&samples, family), 0.0, "{family}");
    }
    // Nothing has been written to any socket before this answer.
    assert_eq!(sample(&samples, "roomcast_bytes_sent_total"), 0.0);
    for reason in PROTOCOL_REASONS.iter().chain(&API_REASONS) {
        assert_eq!(rejected(&samples, reason), 0.0, "{reason}");
    }
    let labelled = samples
        .keys()
        .filter(|name| name.starts_with("roomcast_handshakes_rejected_total{"))
        .count();
    assert_eq!(labelled, PROTOCOL_REASONS.len() + API_REASONS.len());
    for reason in ["soft_mark", "hard_mark"] {
        assert_eq!(
            sample(
                &samples,
                &format!("roomcast_drops_total{{reason=\"{reason}\"}}")
            ),
            0.0
        );
    }
    // No Redis, no redis_up.
    assert!(!text.contains("redis_up"));

    // The histogram: cumulative buckets ending in +Inf, which equals _count.
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("roomcast_loop_iteration_seconds_bucket{le=\""))
        .map(|rest| {
            let (bound, value) = rest.split_once("\"} ").expect("bucket line");
            (bound.to_string(), value.parse().expect("bucket value"))
        })
        .collect();
    assert!(buckets.len() >= 2, "{text}");
    assert_eq!(buckets.last().unwrap().0, "+Inf");
    for pair in buckets.windows(2) {
        assert!(pair[0].1 <= pair[1].1, "buckets not cumulative: {pair:?}");
        if pair[1].0 != "+Inf" {
            let (a, b): (f64, f64) = (pair[0].0.parse().unwrap(), pair[1].0.parse().unwrap());
            assert!(a < b, "bounds not increasing: {pair:?}");
        }
    }
    let count = sample(&samples, "roomcast_loop_iteration_seconds_count");
    assert_eq!(buckets.last().unwrap().1, count);
    assert!(count >= 1.0, "the loop has run at least once");
    assert!(sample(&samples, "roomcast_loop_iteration_seconds_sum") >= 0.0);
}

#[test]
fn metrics_move_with_activity() {
    let server = TestServer::start(&["--heartbeat-ms", "0"]);
    let (_, before) = metrics(&server);

    let mut alice = server.connect("alice");
    alice.join("lobby");
    let mut bob = server.connect("bob");
    bob.join("lobby");
    assert_eq!(alice.recv()["type"], "user_joined");
    let sent = 3;
    for n in 0..sent {
        alice.send(json!({"type": "message", "id": n, "payload": {"room": "lobby", "content": n}}));
        // Bob's copy shows the server has handled it.
        let message = bob.recv();
        assert_eq!(message["type"], "message", "{message}");
    }
    // One refused upgrade.
    let refused = server.try_open("/ws?token=not-a-token");
    match refused {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        Err(other) => panic!("expected a 401, got {other}"),
        Ok(_) => panic!("a bad token was accepted"),
    }

    let (_, after) = metrics(&server);
    assert_eq!(sample(&after, "roomcast_connections"), 2.0);
    assert_eq!(sample(&after, "roomcast_rooms"), 1.0);
    assert_eq!(rejected(&after, "unauthorized"), 1.0);
    for reason in PROTOCOL_REASONS.iter().chain(&API_REASONS) {
        if *reason != "unauthorized" {
            assert_eq!(rejected(&after, reason), 0.0, "{reason}");
        }
    }
    // 2 joins and 3 messages were received.
    let received = sample(&after, "roomcast_messages_received_total");
    assert!(received >= f64::from(sent) + 2.0, "received {received}");
    // At least: 2 welcomes, 2 joined, 1 user_joined, 3 copies to bob, 3 acks.
    let queued = sample(&after, "roomcast_messages_sent_total");
    assert!(queued >= 2.0 + 2.0 + 1.0 + 3.0 + 3.0, "sent {queued}");
    assert!(
        sample(&after, "roomcast_bytes_sent_total") > sample(&before, "roomcast_bytes_sent_total")
    );
    assert_eq!(sample(&after, "roomcast_messages_dropped_total"), 0.0);
    assert_eq!(sample(&after, "roomcast_slow_consumers_closed_total"), 0.0);
    assert!(
        sample(&after, "roomcast_loop_iteration_seconds_count")
            > sample(&before, "roomcast_loop_iteration_seconds_count")
    );

    // Gauges come down again when the connections go.
    bob.ws.close(None).expect("close");
    let gone = alice.recv_type("user_left");
    assert_eq!(gone["type"], "user_left", "{gone}");
    let (_, later) = metrics(&server);
    assert_eq!(sample(&later, "roomcast_connections"), 1.0);
    assert_eq!(sample(&later, "roomcast_rooms"), 1.0);
    let left = alice.request(json!({"type": "leave", "payload": {"room": "lobby"}}));
    assert_eq!(left["type"], "left");
    let (_, last) = metrics(&server);
    assert_eq!(sample(&last, "roomcast_rooms"), 0.0);
}

// ---------------------------------------------------------------------------
// /api/stats
// ---------------------------------------------------------------------------

#[test]
fn stats_keys_are_the_metric_names_and_agree_with_metrics() {
    let server = TestServer::start(&["--api-key", KEY, "--heartbeat-ms", "0"]);
    // Some activity first, so the figures are not all zero.
    let mut alice = server.connect("alice");
    alice.join("lobby");
    let mut bob = server.connect("bob");
    bob.join("lobby");
    publish_ok(&server, r#"{"room":"lobby","content":"x"}"#);
    assert_eq!(alice.recv_type("message")["payload"]["seq"], 1);
    assert_eq!(bob.recv_type("message")["payload"]["seq"], 1);
    assert!(server.try_open("/ws").is_err());
    assert_eq!(server.raw_status(b"GET /nope HTTP/1.1\r\n\r\n"), 404);

    // A quiet moment: both figures in one write, with no traffic in between.
    let mut http = Http::connect(&server);
    http.send(format!("{}{}", get("/metrics"), get("/api/stats")).as_bytes());
    let metrics = http.response();
    let stats_response = http.response();
    assert_eq!(metrics.status, 200);
    assert_eq!(stats_response.status, 200);
    assert_eq!(
        stats_response.header("content-type"),
        Some("application/json")
    );
    let text = metrics.text();
    let samples = samples(&text);
    let stats = stats_response.json();
    let object = stats.as_object().expect("stats is a JSON object");

    let mut plain = 0;
    for (family, kind) in families(&text) {
        let key = family
            .strip_prefix("roomcast_")
            .unwrap_or_else(|| panic!("{family} lacks the prefix"));
        if kind == "histogram" {
            continue;
        }
        let value = object
            .get(key)
            .unwrap_or_else(|| panic!("/api/stats lacks {key}: {stats}"));
        if let Some(labels) = value.as_object() {
            // A labelled family: an object keyed by label value, the same values.
            let exported: Vec<&String> = samples
                .keys()
                .filter(|name| name.starts_with(&format!("{family}{{")))
                .collect();
            assert_eq!(labels.len(), exported.len(), "{key}: {value}");
            for (label, count) in labels {
                let name = format!("{family}{{reason=\"{label}\"}}");
                assert_eq!(
                    count.as_f64(),
                    Some(sample(&samples, &name)),
                    "{name} vs stats {key}.{label}"
                );
            }
        } else {
            plain += 1;
            let number = value
                .as_f64()
                .unwrap_or_else(|| panic!("{key} is not a number: {value}"));
            let exported = sample(&samples, &family);
            if family == "roomcast_bytes_sent_total" && number != exported {
                // Only possible if the two requests were read apart: then the
                // /metrics answer itself was written in between.
                assert_eq!(
                    number,
                    exported + (text.len() + metrics_head_len(&metrics)) as f64,
                    "bytes_sent_total"
                );
            } else {
                assert_eq!(number, exported, "{family} vs stats {key}");
            }
        }
    }
    assert!(plain >= 7, "plain families compared: {plain}");

    // Every §11 reason is a key of the labelled family.
    let reasons = stats["handshakes_rejected_total"]
        .as_object()
        .expect("handshakes_rejected_total is an object");
    for reason in PROTOCOL_REASONS.iter().chain(&API_REASONS) {
        assert!(reasons.contains_key(*reason), "{reason} missing: {stats}");
    }
    assert_eq!(reasons["unauthorized"], 1);
    assert_eq!(reasons["not_found"], 1);
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["rooms"], 1);
    assert_eq!(stats["drops_total"]["soft_mark"], 0);
    // The histogram's count and sum (README).
    assert!(stats["loop_iteration_seconds_sum"].is_number(), "{stats}");
}

/// The length of a response's head as the server wrote it.
fn metrics_head_len(response: &Response) -> usize {
    let mut head = format!("HTTP/1.1 {} OK\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.len() + 2
}

// ---------------------------------------------------------------------------
// The demo page and its client module
// ---------------------------------------------------------------------------

#[test]
fn the_page_and_the_client_module_are_served_uncached() {
    let server = TestServer::start(&[]);
    let mut http = Http::connect(&server);
    let page = http.request(&get("/"));
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{page:?}"
    );
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    assert!(page.text().contains("roomcast"));

    let script = http.request(&get("/roomcast.js"));
    assert_eq!(script.status, 200);
    assert!(
        script
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/javascript")),
        "{:?}",
        script.headers
    );
    assert_eq!(script.header("cache-control"), Some("no-cache"));
    assert!(script.text().contains("RoomcastClient"));

    // With a query string too; POST is refused.
    assert_eq!(http.request(&get("/roomcast.js?v=1")).status, 200);
    let response = parse_one(&server.raw(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"));
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET"));
}

// ---------------------------------------------------------------------------
// Regressions: bugs these tests found, fixed
// ---------------------------------------------------------------------------

#[test]
fn pipelined_requests_beyond_the_read_buffer_cap_are_all_answered() {
    // The read buffer cap is 8192 + 1024 here; ~30 KB of pipelined GETs.
    let server = TestServer::start(&["--max-message-size", "1024"]);
    let mut http = Http::connect(&server);
    let one = get("/health");
    let count = 30_000 / one.len() + 1;
    http.send(one.repeat(count).as_bytes());
    for n in 0..count {
        match try_read_response(&mut http.reader) {
            Ok(Some(response)) => assert_eq!(response.status, 200, "response {n}"),
            Ok(None) => panic!("EOF after {n} of {count} responses"),
            Err(error) => panic!("{error} after {n} of {count} responses"),
        }
    }
}

#[test]
fn invalid_content_length_values_are_400() {
    let server = TestServer::start(&["--api-key", KEY]);
    let body = r#"{"room":"r","content":1}"#;
    let length = body.len();
    for framing in [
        format!("Content-Length: +{length}\r\n"),
        format!("Content-Length: {length}\r\nContent-Length: 5\r\n"),
        format!("Content-Length: {length}, 5\r\n"),
    ] {
        let request = format!(
            "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n{framing}\r\n{body}"
        );
        let response = call(&server, &request);
        assert_eq!(response.status, 400, "{framing:?}: {}", response.text());
        assert_eq!(response.connection(), "close", "{framing:?}");
    }
}

#[test]
fn a_400_for_a_bad_body_closes_the_connection_like_every_refusal() {
    let server = TestServer::start(&["--api-key", KEY]);
    let mut http = Http::connect(&server);
    let response = http.request(&publish("{"));
    assert_eq!(response.status, 400);
    assert_eq!(response.connection(), "close");
    http.expect_eof();
}

#[test]
fn every_unlabelled_metric_sample_is_a_stats_key() {
    let server = TestServer::start(&[]);
    let (response, samples) = metrics(&server);
    let stats = stats(&server);
    for name in samples.keys().filter(|name| !name.contains('{')) {
        let key = name.strip_prefix("roomcast_").expect("prefix");
        assert!(
            stats.get(key).is_some(),
            "{key} missing from /api/stats: {stats}\n{}",
            response.text()
        );
    }
}
