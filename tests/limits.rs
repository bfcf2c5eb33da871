//! Integration tests for the limits of PROTOCOL.md §8 and §11: heartbeat,
//! handshake timeout, rate limit, slow consumers, connection limits and file
//! descriptor exhaustion, live token expiry, drain on SIGTERM, abrupt peers,
//! hostile frames and the `/echo` endpoint's size limit.
//!
//! Every test runs the real binary on a loopback port over real sockets.
//! Nothing sleeps: each test blocks on the read that brings the event it
//! expects (bounded by the harness's 10 s read timeout). No test asserts a
//! duration; small flag values only make the events come quickly.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, SECRET, TestServer, WAIT, now_secs, status_of, token, token_with};
use roomcast::auth::TokenClaims;
use serde_json::{Value, json};
use socket2::SockRef;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;

// ---------------------------------------------------------------------------
// Raw HTTP and WebSocket helpers
// ---------------------------------------------------------------------------

/// The RFC 6455 sample key.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A complete upgrade request for `target`.
fn upgrade_request(target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// `/ws?token=…` for `sub`.
fn ws_path(sub: &str) -> String {
    format!("/ws?token={}", token(sub))
}

fn raw_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A client frame: `first` is the FIN/RSV/opcode byte; the payload is masked
/// unless `masked` is false. Any length, with the 16- and 64-bit encodings.
fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = vec![first];
    match payload.len() {
        len if len < 126 => frame.push(mask_bit | len as u8),
        len if len <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// A WebSocket spoken by hand over a plain `TcpStream`: it never answers a
/// ping unless told to, and can send any bytes at all.
struct RawWs {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawWs {
    /// Upgrades `target` and asserts the `101`; frames sent with it stay buffered.
    fn open(addr: SocketAddr, target: &str) -> RawWs {
        let mut stream = raw_connect(addr);
        stream
            .write_all(upgrade_request(target).as_bytes())
            .expect("write upgrade request");
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(at) = find(&buffer, b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "closed before the upgrade answer: {:?}",
                    String::from_utf8_lossy(&buffer)
                ),
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading the upgrade answer: {e}"),
            }
        };
        let rest = buffer.split_off(end);
        let head = String::from_utf8_lossy(&buffer);
        assert_eq!(status_of(&head), 101, "{head}");
        RawWs {
            stream,
            buffer: rest,
        }
    }

    /// Reads until `buffer` holds `want` bytes; false on EOF or reset.
    fn fill(&mut self, want: usize) -> bool {
        let mut chunk = [0u8; 16384];
        while self.buffer.len() < want {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("no frame from the server within {WAIT:?}")
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// The next server frame as (first byte, payload), or None once the connection ended.
    fn try_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        if !self.fill(2) {
            return None;
        }
        assert_eq!(self.buffer[1] & 0x80, 0, "server frames are not masked");
        let (len, start) = match self.buffer[1] & 0x7f {
            126 => {
                if !self.fill(4) {
                    return None;
                }
                (
                    usize::from(u16::from_be_bytes([self.buffer[2], self.buffer[3]])),
                    4,
                )
            }
            127 => {
                if !self.fill(10) {
                    return None;
                }
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&self.buffer[2..10]);
                (u64::from_be_bytes(raw) as usize, 10)
            }
            n => (usize::from(n), 2),
        };
        if !self.fill(start + len) {
            return None;
        }
        let first = self.buffer[0];
        let payload = self.buffer[start..start + len].to_vec();
        self.buffer.drain(..start + len);
        Some((first, payload))
    }

    fn frame(&mut self) -> (u8, Vec<u8>) {
        self.try_frame()
            .expect("the connection ended while a frame was expected")
    }

    /// The next text frame as JSON; pings are skipped.
    fn json(&mut self) -> Value {
        loop {
            let (first, payload) = self.frame();
            match first & 0x0f {
                0x1 => return serde_json::from_slice(&payload).expect("json"),
                0x9 => continue,
                other => panic!("expected a text frame, got opcode {other:#x}: {payload:?}"),
            }
        }
    }

    /// Reads frames until the close frame; returns its code and how many pings came first.
    fn close_code(&mut self) -> (u16, usize) {
        let mut pings = 0;
        loop {
            let (first, payload) = self.frame();
            match first & 0x0f {
                0x8 => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    return (u16::from_be_bytes([payload[0], payload[1]]), pings);
                }
                0x9 => pings += 1,
                _ => continue,
            }
        }
    }

    /// The server hung up: nothing but the end of the stream is left.
    fn expect_end(&mut self) {
        if let Some((first, payload)) = self.try_frame() {
            panic!("expected the end of the connection, got {first:#x} {payload:?}");
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }
}

/// Reads until a frame of `kind` about `user` arrives.
fn recv_about(client: &mut Client, kind: &str, user: &str) -> Value {
    loop {
        let frame = client.recv_type(kind);
        if frame["payload"]["user"]["id"] == user {
            return frame;
        }
    }
}

/// The user ids `presence` lists for `room`.
fn presence_ids(client: &mut Client, room: &str) -> Vec<String> {
    let reply = client.request(json!({"type": "presence", "id": "who", "payload": {"room": room}}));
    assert_eq!(reply["type"], "presence", "{reply}");
    assert_eq!(reply["id"], "who");
    let mut ids: Vec<String> = reply["payload"]["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

/// A `message` request with an id, whose content is the id itself.
fn message(room: &str, id: &str) -> Value {
    json!({"type": "message", "id": id, "payload": {"room": room, "content": id}})
}

/// The close code a `tungstenite` close frame carries (1005 for none).
fn code_of(frame: Option<CloseFrame>) -> u16 {
    frame.map_or(1005, |CloseFrame { code, .. }| u16::from(code))
}

// ===========================================================================
// 1. Heartbeat (§8, §11)
// ===========================================================================

#[test]
fn heartbeat_pings_answered_by_a_reading_client_keep_it_alive() {
    // A client that answered nothing would be closed 200 ms after the first ping,
    // before the second: three pings prove the automatic pongs count as life.
    let server = TestServer::start(&["--heartbeat-ms", "100", "--pong-timeout-ms", "200"]);
    let mut client = server.connect("reader");
    let mut pings = 0;
    while pings < 3 {
        match client.ws.read().expect("read") {
            Message::Ping(_) => pings += 1,
            Message::Close(frame) => panic!("closed with {} despite pongs", code_of(frame)),
            other => panic!("unexpected {other:?}"),
        }
    }
    client.assert_alive();
}

#[test]
fn heartbeat_closes_a_silent_client_with_1011() {
    let server = TestServer::start(&["--heartbeat-ms", "200", "--pong-timeout-ms", "200"]);
    let mut silent = RawWs::open(server.addr, &ws_path("silent"));
    let welcome = silent.json();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["payload"]["heartbeat_ms"], 200);
    // It never sends a byte: pings go unanswered, then close 1011, then EOF.
    let (code, pings) = silent.close_code();
    assert!(pings >= 1, "a ping precedes the heartbeat close");
    assert_eq!(code, 1011);
    silent.expect_end();
    server.connect("other").assert_alive();
}

#[test]
fn heartbeat_reclaims_the_slot_of_a_half_open_peer() {
    let server = TestServer::start(&[
        "--heartbeat-ms",
        "200",
        "--pong-timeout-ms",
        "200",
        "--max-connections",
        "1",
    ]);
    // Upgraded, then neither reads nor writes: to the server it looks half-open.
    let mut ghost = RawWs::open(server.addr, &ws_path("ghost"));
    match server.try_open(&ws_path("next")) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Ok(_) => panic!("the ghost's slot was free at once"),
        Err(other) => panic!("expected 503, got {other}"),
    }
    // Each attempt blocks on the server's answer; the heartbeat frees the slot.
    let deadline = Instant::now() + WAIT;
    let mut next = loop {
        match server.try_open(&ws_path("next")) {
            Ok(client) => break client,
            Err(tungstenite::Error::Http(response)) if response.status() == 503 => {
                assert!(Instant::now() < deadline, "the slot was never reclaimed");
            }
            Err(other) => panic!("unexpected answer while waiting for the slot: {other}"),
        }
    };
    assert_eq!(next.recv()["type"], "welcome");
    next.assert_alive();
    // The ghost was closed by the heartbeat rule, not by anything else.
    assert_eq!(ghost.json()["type"], "welcome");
    let (code, pings) = ghost.close_code();
    assert!(pings >= 1);
    assert_eq!(code, 1011);
    ghost.expect_end();
}

// ===========================================================================
// 2. Handshake timeout (§2, §11)
// ===========================================================================

#[test]
fn handshake_timeout_closes_a_half_sent_head() {
    let server = TestServer::start(&["--handshake-timeout-ms", "300"]);
    let mut stream = raw_connect(server.addr);
    let request = upgrade_request(&ws_path("half"));
    stream
        .write_all(&request.as_bytes()[..request.len() / 2])
        .unwrap();
    let mut answer = Vec::new();
    // EOF (or a reset) ends the read; a read timeout would be a failure.
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the half-sent head was never closed")
        }
        Err(_) => {}
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains(" 101 "), "{answer}");
    server.connect("after").assert_alive();
}

#[test]
fn handshake_timeout_defeats_a_byte_dripping_client() {
    let server = TestServer::start(&["--handshake-timeout-ms", "300"]);
    let base = upgrade_request(&ws_path("drip"));
    // Pad with a header to 2000 bytes: a valid upgrade, if it were ever finished.
    let cut = base.len() - 2;
    let pad = format!("X-Pad: {}\r\n", "a".repeat(2000 - base.len() - 9));
    let head = format!("{}{pad}\r\n", &base[..cut]);
    assert_eq!(head.len(), 2000);

    let mut stream = raw_connect(server.addr);
    // Only pacing: each read waits at most 50 ms for the server to say something.
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut sent = 0;
    let mut closed = false;
    'drip: for byte in head.as_bytes() {
        if stream.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        sent += 1;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break 'drip;
                }
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break 'drip;
                }
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        closed,
        "a head dripped byte by byte was never cut off ({sent} bytes sent)"
    );
    assert!(sent < head.len(), "closed only after the whole head");
    assert!(!answer.contains(" 101 "), "{answer}");
    server.connect("after").assert_alive();
}

// ===========================================================================
// 3. Rate limit (§8, §11)
// ===========================================================================

#[test]
fn rate_limit_lets_a_burst_through_then_refuses_with_the_id() {
    let server = TestServer::start(&["--rate-limit", "5", "--rate-burst", "5"]);
    let mut client = server.connect("pinger");
    // Sent back to back: the full bucket holds exactly five.
    for n in 1..=6 {
        client.send(json!({"type": "ping", "id": format!("p{n}")}));
    }
    for n in 1..=5 {
        let reply = client.recv();
        assert_eq!(reply["type"], "pong", "{reply}");
        assert_eq!(reply["id"], format!("p{n}"));
    }
    let refused = client.recv();
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "rate_limited");
    assert_eq!(refused["id"], "p6");
}

#[test]
fn rate_limited_messages_take_no_seq_and_control_frames_are_free() {
    let server = TestServer::start(&[
        "--rate-limit",
        "5",
        "--rate-burst",
        "5",
        "--heartbeat-ms",
        "600",
    ]);
    let mut member = server.connect("member");
    member.join("r");
    let mut sender = server.connect("sender");
    sender.join("r"); // one token
    recv_about(&mut member, "user_joined", "sender");

    for n in 1..=5 {
        sender.send(message("r", &format!("m{n}")));
    }
    let mut replies = Vec::new();
    while replies.len() < 5 {
        let frame = sender.recv();
        if frame["type"] != "message" {
            replies.push(frame);
        }
    }
    for (n, reply) in replies.iter().take(4).enumerate() {
        assert_eq!(reply["type"], "ack", "{reply}");
        assert_eq!(reply["id"], format!("m{}", n + 1));
        assert_eq!(reply["payload"]["seq"], n as u64 + 1);
    }
    assert_eq!(replies[4]["type"], "error", "{}", replies[4]);
    assert_eq!(replies[4]["payload"]["code"], "rate_limited");
    assert_eq!(replies[4]["id"], "m5");

    // Control frames take no token: more WebSocket pings than the flood rule
    // allows refusals, each answered, no error, no close.
    for n in 0..12u8 {
        sender.ws.send(Message::Ping(vec![n].into())).unwrap();
    }
    let mut pongs = 0;
    while pongs < 12 {
        match sender.ws.read().expect("read") {
            Message::Pong(_) => pongs += 1,
            Message::Ping(_) => continue,
            other => panic!("control frames were rate limited: {other:?}"),
        }
    }

    // The server's next heartbeat comes after the bucket has refilled a token.
    match sender.ws.read().expect("read") {
        Message::Ping(_) => {}
        other => panic!("unexpected {other:?}"),
    }
    sender.send(message("r", "m6"));
    let ack = sender.recv_type("ack");
    assert_eq!(ack["id"], "m6", "{ack}");
    assert_eq!(ack["payload"]["seq"], 5, "the refused message took no seq");

    let mut seen = Vec::new();
    while seen.len() < 5 {
        let frame = member.recv_type("message");
        seen.push((
            frame["payload"]["seq"].as_u64().unwrap(),
            frame["payload"]["content"].as_str().unwrap().to_string(),
        ));
    }
    let expected: Vec<(u64, String)> = [(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4"), (5, "m6")]
        .iter()
        .map(|(seq, id)| (*seq, id.to_string()))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn flooding_is_closed_with_1008_and_others_are_unaffected() {
    let server = TestServer::start(&["--rate-limit", "5", "--rate-burst", "5"]);
    let mut bystander = server.connect("bystander");
    bystander.join("r");
    let mut flooder = server.connect("flooder");
    flooder.join("r");
    recv_about(&mut bystander, "user_joined", "flooder");

    for n in 1..=30 {
        // The server may hang up mid-flood; a failed send is part of the story.
        let _ = flooder
            .ws
            .send(Message::text(message("r", &format!("f{n}")).to_string()));
    }
    let mut replies = Vec::new();
    let code = loop {
        match flooder.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] != "message" {
                    replies.push(frame);
                }
            }
            Ok(Message::Close(frame)) => break code_of(frame),
            Ok(_) => continue,
            Err(e) => panic!("the flood ended without a close frame: {e}"),
        }
    };
    assert_eq!(code, 1008, "replies: {replies:?}");
    let streak = replies
        .iter()
        .rev()
        .take_while(|r| r["type"] == "error" && r["payload"]["code"] == "rate_limited")
        .count();
    assert_eq!(
        streak, 10,
        "closed after 2 x burst refusals in a row: {replies:?}"
    );
    let acked: Vec<(u64, String)> = replies
        .iter()
        .filter(|r| r["type"] == "ack")
        .map(|r| {
            (
                r["payload"]["seq"].as_u64().unwrap(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(!acked.is_empty(), "the burst was accepted: {replies:?}");
    for error in replies.iter().filter(|r| r["type"] == "error") {
        assert_eq!(error["payload"]["code"], "rate_limited", "{error}");
        assert!(
            error["id"].is_string(),
            "the refusal echoes the id: {error}"
        );
    }

    // The bystander got exactly the accepted messages, in order, without gaps.
    let mut seen = Vec::new();
    loop {
        let frame = bystander.recv();
        match frame["type"].as_str() {
            Some("message") => seen.push((
                frame["payload"]["seq"].as_u64().unwrap(),
                frame["payload"]["content"].as_str().unwrap().to_string(),
            )),
            Some("user_left") => {
                assert_eq!(frame["payload"]["user"]["id"], "flooder");
                break;
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(seen, acked);
    for (index, (seq, _)) in seen.iter().enumerate() {
        assert_eq!(*seq, index as u64 + 1, "seqs without gaps: {seen:?}");
    }
    bystander.assert_alive();
}

// ===========================================================================
// 4. Slow consumers (§8, §11)
// ===========================================================================

/// About 8 KB of JSON content.
fn bulky(n: u64) -> Value {
    json!({"n": n, "pad": "x".repeat(8000)})
}

#[test]
fn slow_consumer_gets_lagged_for_the_gap_and_recovers_from_history() {
    // 1000 x 8 KB: more than the server's send buffer can absorb even when
    // autotuned to its usual 4 MiB ceiling, plus the soft mark.
    const COUNT: u64 = 1000;
    let server = TestServer::start(&[
        "--write-buffer-soft",
        "20000",
        "--write-buffer-hard",
        "2000000",
        "--max-message-size",
        "16384",
        "--rate-limit",
        "0",
    ]);
    let mut stalled = server.connect_small_receive_buffer("stalled");
    let joined = stalled.join("feed");
    let epoch = joined["payload"]["epoch"].as_str().unwrap().to_string();
    let mut healthy = server.connect("healthy");
    healthy.join("feed");
    let mut publisher = server.connect("publisher");
    publisher.join("feed");
    recv_about(&mut healthy, "user_joined", "publisher");

    // The publisher never reads (its own copies are droppable broadcasts);
    // the healthy member reads each message before the next one is sent.
    for n in 1..=COUNT {
        publisher
            .send(json!({"type": "message", "payload": {"room": "feed", "content": bulky(n)}}));
        let frame = healthy.recv();
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["payload"]["seq"], n);
        assert_eq!(frame["payload"]["content"]["n"], n);
    }

    // Now the stalled member reads: every gap is announced, exactly.
    let mut next = 1;
    let mut gaps = Vec::new();
    while next <= COUNT {
        let frame = stalled.recv();
        match frame["type"].as_str() {
            Some("message") => {
                assert_eq!(
                    frame["payload"]["seq"], next,
                    "a gap without lagged before it (gaps so far {gaps:?})"
                );
                next += 1;
            }
            Some("lagged") => {
                assert_eq!(frame["payload"]["room"], "feed", "{frame}");
                let from = frame["payload"]["from_seq"].as_u64().unwrap();
                let to = frame["payload"]["to_seq"].as_u64().unwrap();
                assert_eq!(from, next, "from_seq is the first missing: {frame}");
                assert!(to >= from, "{frame}");
                gaps.push((from, to));
                next = to + 1;
            }
            _ => continue,
        }
    }
    assert_eq!(next, COUNT + 1, "to_seq beyond the last seq");
    assert!(
        !gaps.is_empty(),
        "{COUNT} bulky messages never pushed the stalled member over its soft mark"
    );

    // Recovery: join again from before the first gap with the epoch seen.
    let since = gaps[0].0 - 1;
    let history = 100; // the default --history
    let oldest_held = COUNT - history + 1;
    let rejoined = stalled.request(json!({
        "type": "join",
        "id": "again",
        "payload": {"room": "feed", "since": since, "epoch": epoch}
    }));
    assert_eq!(rejoined["type"], "joined", "{rejoined}");
    assert_eq!(rejoined["payload"]["epoch"], epoch.as_str());
    assert_eq!(rejoined["payload"]["seq"], COUNT);
    let first_replayed = (since + 1).max(oldest_held);
    assert_eq!(rejoined["payload"]["recovered"], since + 1 >= oldest_held);
    assert_eq!(rejoined["payload"]["missed"], COUNT - first_replayed + 1);
    for seq in first_replayed..=COUNT {
        let frame = stalled.recv();
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["payload"]["seq"], seq);
        assert_eq!(frame["payload"]["content"]["n"], seq);
    }
    stalled.assert_alive();
    healthy.assert_alive();
}

/// A stalled member pushed over the hard mark by undroppable directs. Returns
/// it, the observer, and how many directs were acknowledged before `user_offline`.
fn push_over_the_hard_mark(server: &TestServer) -> (Client, Client, u64) {
    let mut observer = server.connect("observer");
    observer.join("r");
    let mut stalled = server.connect_small_receive_buffer("stalled");
    stalled.join("r");
    recv_about(&mut observer, "user_joined", "stalled");
    let mut sender = server.connect("sender");

    let mut acked = 0;
    loop {
        assert!(
            acked < 2000,
            "2000 directs of 8 KB never crossed the hard mark"
        );
        sender.send(json!({
            "type": "direct",
            "id": acked,
            "payload": {"to": "stalled", "content": bulky(acked)}
        }));
        let reply = sender.recv();
        match reply["type"].as_str() {
            Some("ack") => acked += 1,
            // The direct that crossed the mark found nobody left to deliver to.
            Some("error") if reply["payload"]["code"] == "user_offline" => break,
            _ => panic!("unexpected {reply}"),
        }
    }
    let left = recv_about(&mut observer, "user_left", "stalled");
    assert_eq!(left["payload"]["room"], "r");
    (stalled, observer, acked)
}

#[test]
fn slow_consumer_over_the_hard_mark_is_closed_4000_and_others_carry_on() {
    let server = TestServer::start(&[
        "--write-buffer-soft",
        "20000",
        "--write-buffer-hard",
        "60000",
        "--max-message-size",
        "16384",
        "--rate-limit",
        "0",
    ]);
    let (mut stalled, mut observer, acked) = push_over_the_hard_mark(&server);
    // It starts reading at once, well within the 1 s the server gives the
    // close frame: it gets what had reached its socket, in order, then the
    // close 4000 queued alone after the discarded rest.
    let mut received = 0;
    let code = loop {
        match stalled.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "direct" {
                    assert_eq!(frame["payload"]["content"]["n"], received, "in order");
                    received += 1;
                }
            }
            Ok(Message::Close(frame)) => break code_of(frame),
            Ok(_) => continue,
            Err(e) => {
                panic!("after {received} of {acked} directs the stream ended without a close: {e}")
            }
        }
    };
    assert_eq!(code, 4000);
    assert!(
        received < acked,
        "what was queued past the socket was discarded ({received} of {acked})"
    );
    assert_eq!(presence_ids(&mut observer, "r"), vec!["observer"]);
    observer.assert_alive();
    server.connect("newcomer").assert_alive();
}

// ===========================================================================
// 5. Connection limits and descriptor exhaustion (§2, §11)
// ===========================================================================

#[test]
fn connection_limit_answers_503_before_any_upgrade() {
    let server = TestServer::start(&["--max-connections", "3"]);
    let mut clients: Vec<Client> = ["a", "b", "c"].iter().map(|u| server.connect(u)).collect();
    let answer = server.raw(upgrade_request(&ws_path("d")).as_bytes());
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(!answer.contains(" 101 "), "{answer}");
    for client in &mut clients {
        client.assert_alive();
    }
}

/// A server started under `ulimit -n`; killed on drop.
struct FdLimitedServer {
    child: Child,
    addr: SocketAddr,
}

impl FdLimitedServer {
    fn start(limit: u32) -> Self {
        Self::start_logging(limit, "error", Stdio::inherit())
    }

    fn start_logging(limit: u32, level: &str, stderr: Stdio) -> Self {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_roomcast"))
            .args(["--listen", "127.0.0.1:0", "--log-level", level])
            .args(["--jwt-secret", SECRET])
            .args(common::threads_args())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start roomcast under ulimit");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        reader.read_line(&mut first).expect("banner");
        let addr = first
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected banner line {first:?}"));
        thread::spawn(move || {
            let mut sink = String::new();
            let _ = reader.read_to_string(&mut sink);
        });
        FdLimitedServer { child, addr }
    }

    /// Descriptor numbers below `limit` the process holds now: once all are
    /// taken, `accept` fails with EMFILE. (Descriptors inherited above the
    /// limit, such as a jobserver pipe, are open but do not count.)
    fn fds_below(&self, limit: usize) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .expect("/proc/PID/fd")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<usize>().ok())
            .filter(|fd| *fd < limit)
            .count()
    }

    fn connect(&self, sub: &str) -> Client {
        let stream = raw_connect(self.addr);
        let url = format!("ws://{}{}", self.addr, ws_path(sub));
        let ws = match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _)) => ws,
            Err(tungstenite::HandshakeError::Failure(error)) => panic!("upgrade: {error}"),
            Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("interrupted"),
        };
        let mut client = Client { ws };
        assert_eq!(client.recv()["type"], "welcome");
        client
    }
}

impl Drop for FdLimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// `Connection: close`: each answer ends with EOF, so `read_to_end` returns.
const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[test]
fn out_of_descriptors_pauses_accepting_and_recovers() {
    const LIMIT: usize = 40;
    let mut server = FdLimitedServer::start(LIMIT as u32);
    // Fill every descriptor the process may have with upgraded clients.
    let mut held = Vec::new();
    while server.fds_below(LIMIT) < LIMIT {
        assert!(held.len() < 60, "the descriptor limit was not in force");
        held.push(server.connect(&format!("h{}", held.len())));
    }
    // More connections complete in the kernel's backlog but are not served.
    let mut waiting: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut stream = raw_connect(server.addr);
            stream.write_all(HEALTH).unwrap();
            stream
        })
        .collect();
    // Those already in keep being served while accepting is stuck.
    held[0].assert_alive();
    held.last_mut().unwrap().assert_alive();
    assert_eq!(server.fds_below(LIMIT), LIMIT);
    waiting[0].set_nonblocking(true).unwrap();
    let mut probe = [0u8; 64];
    match waiting[0].read(&mut probe) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("a connection past the descriptor limit was served: {other:?}"),
    }
    waiting[0].set_nonblocking(false).unwrap();
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );

    // Free most descriptors: the waiting connections are accepted and answered.
    let mut kept = held.split_off(held.len() - 2);
    drop(held);
    for stream in &mut waiting {
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .expect("the answer once descriptors are free");
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status_of(&answer), 200, "{answer}");
    }
    let mut fresh = raw_connect(server.addr);
    fresh.write_all(HEALTH).unwrap();
    let mut answer = Vec::new();
    fresh.read_to_end(&mut answer).unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 200);
    server.connect("fresh").assert_alive();
    for client in &mut kept {
        client.assert_alive();
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
}

#[test]
fn an_accept_outage_is_logged_when_it_starts_and_when_it_ends() {
    const LIMIT: usize = 40;
    let mut server = FdLimitedServer::start_logging(LIMIT as u32, "info", Stdio::piped());
    let (lines, log) = std::sync::mpsc::channel::<String>();
    let stderr = server.child.stderr.take().expect("stderr");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut held = Vec::new();
    while server.fds_below(LIMIT) < LIMIT {
        assert!(held.len() < 60, "the descriptor limit was not in force");
        held.push(server.connect(&format!("h{}", held.len())));
    }
    let mut waiting = raw_connect(server.addr);
    waiting.write_all(HEALTH).unwrap();
    let mut seen = Vec::new();
    let next_line = |seen: &mut Vec<String>| {
        let line = log.recv_timeout(WAIT).expect("a log line");
        seen.push(line.clone());
        line
    };
    while !next_line(&mut seen).contains("accept failed") {}
    // The retries run on a 100 ms timer with no outside event to await:
    // give them time to fail several times, which used to log each time.
    thread::sleep(Duration::from_millis(450));
    drop(held);
    let mut answer = Vec::new();
    waiting
        .read_to_end(&mut answer)
        .expect("served once descriptors are free");
    assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 200);
    let summary = loop {
        let line = next_line(&mut seen);
        if line.contains("accepting again") {
            break line;
        }
    };
    let failures = seen
        .iter()
        .filter(|line| line.contains("accept failed"))
        .count();
    assert_eq!(failures, 1, "the outage is logged once: {seen:#?}");
    let refused: u64 = summary
        .split_whitespace()
        .zip(summary.split_whitespace().skip(1))
        .find(|(_, next)| next.starts_with("attempt"))
        .and_then(|(count, _)| count.parse().ok())
        .unwrap_or_else(|| panic!("a count of refused attempts in {summary:?}"));
    assert!(refused >= 2, "several retries were refused: {summary}");
}

// ===========================================================================
// 6. Live token expiry (§8)
// ===========================================================================

#[test]
fn token_expiry_closes_4001_unless_refreshed() {
    let server = TestServer::start(&[]);
    let soon = now_secs() + 2;
    let connect = |sub: &str| {
        let token = token_with(TokenClaims {
            sub: sub.into(),
            expires_at: Some(soon),
            ..Default::default()
        });
        let mut client = server.open(&format!("/ws?token={token}"));
        assert_eq!(client.recv()["type"], "welcome");
        client.join("r");
        client
    };
    let mut keeper = connect("keeper");
    let mut expiring = connect("expiring");
    recv_about(&mut keeper, "user_joined", "expiring");

    let later = now_secs() + 3600;
    let fresh = token_with(TokenClaims {
        sub: "keeper".into(),
        expires_at: Some(later),
        ..Default::default()
    });
    let refreshed =
        keeper.request(json!({"type": "refresh", "id": "r1", "payload": {"token": fresh}}));
    assert_eq!(refreshed["type"], "refreshed", "{refreshed}");
    assert_eq!(refreshed["id"], "r1");
    assert_eq!(refreshed["payload"]["exp"], later);

    let (code, reason) = expiring.expect_close();
    assert_eq!(code, 4001, "{reason}");
    // The refreshed connection outlived its first expiry.
    recv_about(&mut keeper, "user_left", "expiring");
    keeper.assert_alive();
}

// ===========================================================================
// 7. Drain on SIGTERM (§8, §11)
// ===========================================================================

#[test]
fn sigterm_drains_with_1001_and_retry_hints_then_exits_0() {
    let server = TestServer::start(&["--drain-ms", "500"]);
    let addr = server.addr;
    let mut clients: Vec<Client> = (0..5).map(|n| server.connect(&format!("d{n}"))).collect();
    let (status_tx, status_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = status_tx.send(server.terminate());
    });
    let check = |(code, reason): (u16, String)| {
        assert_eq!(code, 1001, "{reason}");
        let hint = reason
            .split("retry_ms=")
            .nth(1)
            .unwrap_or_else(|| panic!("no retry_ms= in {reason:?}"));
        let digits: String = hint.chars().take_while(char::is_ascii_digit).collect();
        let retry: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("bad retry_ms in {reason:?}"));
        assert!(retry <= 500, "retry_ms={retry} beyond --drain-ms 500");
    };
    // The first close proves the signal was handled: no new connection now.
    check(clients[0].expect_close());
    match TcpStream::connect(addr) {
        Err(_) => {}
        Ok(mut stream) => {
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let _ = stream.write_all(upgrade_request(&ws_path("late")).as_bytes());
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                !answer.contains(" 101 "),
                "upgraded while draining: {answer}"
            );
        }
    }
    for client in &mut clients[1..] {
        check(client.expect_close());
    }
    drop(clients);
    let status = status_rx
        .recv_timeout(WAIT)
        .expect("the server exits after the drain");
    assert!(status.success(), "exit status {status:?}");
}

// ===========================================================================
// 8. Abrupt ends (§8)
// ===========================================================================

#[test]
fn peer_reset_leaves_the_room() {
    let server = TestServer::start(&[]);
    let mut observer = server.connect("observer");
    observer.join("r");
    let mut resetter = server.connect("resetter");
    resetter.join("r");
    recv_about(&mut observer, "user_joined", "resetter");
    assert_eq!(
        presence_ids(&mut observer, "r"),
        vec!["observer", "resetter"]
    );

    SockRef::from(resetter.ws.get_ref())
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(resetter); // RST, no close frame, no FIN

    recv_about(&mut observer, "user_left", "resetter");
    assert_eq!(presence_ids(&mut observer, "r"), vec!["observer"]);
    server.connect("newcomer").assert_alive();
}

#[test]
fn peer_vanishing_mid_frame_leaves_the_room() {
    let server = TestServer::start(&[]);
    let mut observer = server.connect("observer");
    observer.join("r");
    let mut vanisher = RawWs::open(server.addr, &format!("/ws/r?token={}", token("vanisher")));
    assert_eq!(vanisher.json()["type"], "welcome");
    assert_eq!(vanisher.json()["type"], "joined");
    recv_about(&mut observer, "user_joined", "vanisher");

    let text = json!({"type": "message", "payload": {"room": "r", "content": "x".repeat(80)}});
    let frame = client_frame(0x81, text.to_string().as_bytes(), true);
    vanisher.send(&frame[..frame.len() / 2]);
    drop(vanisher);

    recv_about(&mut observer, "user_left", "vanisher");
    assert_eq!(presence_ids(&mut observer, "r"), vec!["observer"]);
    server.connect("newcomer").assert_alive();
}

/// The loop trusts a short read to mean "drained" and waits for the next
/// readiness edge instead of reading again: a frame whose halves arrive in
/// separate reads must still be parsed once the second half comes.
#[test]
fn a_frame_split_across_reads_is_parsed_when_its_rest_arrives() {
    let server = TestServer::start(&[]);
    let mut observer = server.connect("observer");
    observer.join("r");
    let mut splitter = RawWs::open(server.addr, &format!("/ws/r?token={}", token("splitter")));
    assert_eq!(splitter.json()["type"], "welcome");
    assert_eq!(splitter.json()["type"], "joined");
    recv_about(&mut observer, "user_joined", "splitter");

    for round in 0..20 {
        let text = json!({"type": "message", "payload": {"room": "r", "content": round}});
        let frame = client_frame(0x81, text.to_string().as_bytes(), true);
        let cut = 1 + round % (frame.len() - 1);
        splitter.send(&frame[..cut]);
        // A round trip of another connection through the loop: by its end the
        // loop has most likely read the first part on its own.
        presence_ids(&mut observer, "r");
        splitter.send(&frame[cut..]);
        let delivered = observer.recv_type("message");
        assert_eq!(delivered["payload"]["content"], round, "{delivered}");
        assert_eq!(splitter.json()["payload"]["content"], round);
    }
}

/// A message and the end of the stream in one burst: the message is
/// delivered and the end is noticed (a short read is not trusted when the
/// event also reports the hang-up).
#[test]
fn a_message_followed_by_a_hang_up_is_delivered_and_the_peer_leaves() {
    let server = TestServer::start(&[]);
    let mut observer = server.connect("observer");
    observer.join("r");
    for n in 0..10 {
        let name = format!("leaver-{n}");
        let mut leaver = RawWs::open(server.addr, &format!("/ws/r?token={}", token(&name)));
        assert_eq!(leaver.json()["type"], "welcome");
        assert_eq!(leaver.json()["type"], "joined");
        recv_about(&mut observer, "user_joined", &name);

        let text = json!({"type": "message", "payload": {"room": "r", "content": n}});
        // Corked, the message waits and leaves with the FIN in one segment:
        // the server sees both in one readiness event.
        SockRef::from(&leaver.stream)
            .set_tcp_cork(true)
            .expect("TCP_CORK");
        leaver.send(&client_frame(0x81, text.to_string().as_bytes(), true));
        leaver
            .stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");

        let delivered = observer.recv_type("message");
        assert_eq!(delivered["payload"]["content"], n);
        recv_about(&mut observer, "user_left", &name);
        assert_eq!(presence_ids(&mut observer, "r"), vec!["observer"]);
    }
}

#[test]
fn peer_closing_with_a_full_queue_leaves_the_room() {
    let server = TestServer::start(&["--rate-limit", "0"]);
    let mut observer = server.connect("observer");
    observer.join("r");
    let mut doomed = server.connect_small_receive_buffer("doomed");
    doomed.join("r");
    doomed.join("flood");
    recv_about(&mut observer, "user_joined", "doomed");
    let mut publisher = server.connect("publisher");
    publisher.join("flood");

    // ~5.7 MB to a member that does not read: past what its socket buffers
    // take (the server's send buffer autotunes up to 4 MiB) and its 256 KiB
    // soft mark, so the server holds a full queue for it.
    for n in 0..700 {
        publisher.send(json!({
            "type": "message",
            "id": n,
            "payload": {"room": "flood", "content": bulky(n)}
        }));
        let ack = publisher.recv_type("ack");
        assert_eq!(ack["id"], n);
    }
    // Closing with unread data in its receive buffer resets the connection:
    // the server's next write or read on it fails.
    drop(doomed);
    recv_about(&mut observer, "user_left", "doomed");
    assert_eq!(presence_ids(&mut observer, "r"), vec!["observer"]);
    recv_about(&mut publisher, "user_left", "doomed");
    assert_eq!(presence_ids(&mut publisher, "flood"), vec!["publisher"]);
    server.connect("newcomer").assert_alive();
}

/// With the rate limit off, nothing stops a client from sending faster than
/// the loop can parse: reading it until its socket is empty would never end.
/// Each connection gets a bounded turn per loop iteration, so the others
/// are still served while it floods.
#[test]
fn a_client_flooding_without_a_rate_limit_does_not_starve_the_others() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let server = TestServer::start(&["--rate-limit", "0"]);
    let mut flooder = RawWs::open(server.addr, &ws_path("flooder"));
    assert_eq!(flooder.json()["type"], "welcome");
    flooder.send(&client_frame(
        0x81,
        br#"{"type":"join","payload":{"room":"alone"}}"#,
        true,
    ));
    assert_eq!(flooder.json()["type"], "joined");
    let mut bystander = server.connect("bystander");

    // `typing` in a room of one sends nothing back, so the flood only ever
    // costs the server reading and parsing, never queue space; the padding
    // (an unknown field, ignored) costs the server several passes over each
    // byte and the flooder one.
    let padding = "p".repeat(16 * 1024);
    let typing = client_frame(
        0x81,
        format!(
            r#"{{"type":"typing","pad":"{padding}","payload":{{"room":"alone","is_typing":true}}}}"#
        )
        .as_bytes(),
        true,
    );
    let burst: Vec<u8> = typing.repeat(64 * 1024 / typing.len());
    let stop = Arc::new(AtomicBool::new(false));
    let mut stream = flooder
        .stream
        .try_clone()
        .expect("clone the flooder's socket");
    let (under_way, flood_started) = mpsc::channel();
    let flooding = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut bursts = 0u64;
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(&burst).expect("flood");
                bursts += 1;
                // 2 MiB: more than the socket buffers hold, so the server
                // has been reading the flood for a while.
                if bursts == 32 {
                    let _ = under_way.send(());
                }
            }
            bursts
        })
    };

    flood_started.recv().expect("the flood got under way");
    let pong = bystander.request(json!({"type": "ping", "id": "while flooded", "payload": {}}));
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], "while flooded");
    stop.store(true, Ordering::Relaxed);
    assert!(flooding.join().expect("flooding thread") >= 32);
    bystander.assert_alive();

    // The flood was read over many turns without losing a byte: the frame
    // after it still parses.
    flooder.send(&client_frame(
        0x81,
        br#"{"type":"ping","id":"after the flood","payload":{}}"#,
        true,
    ));
    let pong = flooder.json();
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "after the flood");
}

/// Waits until the process is stopped (state `T` in `/proc/PID/stat`).
fn await_stopped(pid: u32) {
    let path = format!("/proc/{pid}/stat");
    let deadline = Instant::now() + WAIT;
    loop {
        let stat = std::fs::read_to_string(&path).expect("read /proc/PID/stat");
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        if state == Some("T") {
            return;
        }
        assert!(Instant::now() < deadline, "the server did not stop: {stat}");
        thread::yield_now();
    }
}

/// The turn itself, made visible: while the server is stopped, a flooder's
/// megabyte and then a bystander's message wait in their sockets, the
/// flooder's first. Reading the flooder until its socket ran dry would
/// publish its closing message before the bystander's; with bounded turns
/// the bystander's message comes first.
#[test]
fn a_bystander_is_served_between_the_turns_of_a_flooder() {
    // Turns are a property of one loop: both sockets must share it.
    let server = TestServer::start(&["--rate-limit", "0", "--threads", "1"]);
    let mut flooder = RawWs::open(server.addr, &ws_path("flooder"));
    assert_eq!(flooder.json()["type"], "welcome");
    for room in ["alone", "shared"] {
        flooder.send(&client_frame(
            0x81,
            format!(r#"{{"type":"join","payload":{{"room":"{room}"}}}}"#).as_bytes(),
            true,
        ));
        assert_eq!(flooder.json()["type"], "joined");
    }
    let mut bystander = server.connect("bystander");
    bystander.join("shared");

    let padding = "p".repeat(16 * 1024);
    let typing = client_frame(
        0x81,
        format!(
            r#"{{"type":"typing","pad":"{padding}","payload":{{"room":"alone","is_typing":true}}}}"#
        )
        .as_bytes(),
        true,
    );
    let flood: Vec<u8> = typing.repeat(1024 * 1024 / typing.len());
    // A first flood, read by a running server, lets the kernel grow the
    // connection's receive buffer well past what one turn reads.
    flooder.send(&flood);
    flooder.send(&client_frame(
        0x81,
        br#"{"type":"ping","id":"warm","payload":{}}"#,
        true,
    ));
    while flooder.json()["type"] != "pong" {}

    let pid = server.pid().to_string();
    Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP");
    await_stopped(server.pid());
    let mut last = flood.clone();
    last.extend_from_slice(&client_frame(
        0x81,
        br#"{"type":"message","payload":{"room":"shared","content":"end of the flood"}}"#,
        true,
    ));
    flooder.send(&last);
    bystander
        .send(json!({"type": "message", "payload": {"room": "shared", "content": "bystander"}}));
    Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .expect("kill -CONT");

    let first = bystander.recv_type("message");
    assert_eq!(first["payload"]["content"], "bystander", "{first}");
    let second = bystander.recv_type("message");
    assert_eq!(second["payload"]["content"], "end of the flood", "{second}");
}

// ===========================================================================
// 9. Hostile frames (RFC 6455, §8)
// ===========================================================================

/// Upgrades a raw connection, sends `bytes`, and returns the close code the server sends.
fn close_code_for(server: &TestServer, bytes: &[u8]) -> u16 {
    let mut raw = RawWs::open(server.addr, &ws_path("hostile"));
    assert_eq!(raw.json()["type"], "welcome");
    raw.send(bytes);
    let (code, _) = raw.close_code();
    raw.expect_end();
    code
}

#[test]
fn protocol_violations_close_1002() {
    let server = TestServer::start(&[]);
    let ping = json!({"type": "ping"}).to_string();
    let cases: [(&str, Vec<u8>); 7] = [
        ("fragmented ping (FIN=0)", client_frame(0x09, b"", true)),
        (
            "control frame with a 126-byte payload",
            client_frame(0x89, &[b'p'; 126], true),
        ),
        ("RSV1 set", client_frame(0xC1, ping.as_bytes(), true)),
        ("RSV3 set on a ping", client_frame(0x99, b"", true)),
        (
            "unmasked text frame",
            client_frame(0x81, ping.as_bytes(), false),
        ),
        ("reserved data opcode 0x3", client_frame(0x83, b"", true)),
        ("reserved control opcode 0xB", client_frame(0x8B, b"", true)),
    ];
    for (what, bytes) in &cases {
        assert_eq!(close_code_for(&server, bytes), 1002, "{what}");
    }
    server.connect("after").assert_alive();
}

#[test]
fn payload_length_of_2_pow_63_minus_1_closes_1009_before_allocating() {
    let server = TestServer::start(&[]);
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]); // the mask
    header.extend_from_slice(b"and a few bytes of the payload");
    assert_eq!(close_code_for(&server, &header), 1009);
    // The process survived (no allocation of 8 EiB) and serves on.
    server.connect("after").assert_alive();
    let health = server.raw(HEALTH);
    assert_eq!(status_of(&health), 200, "{health}");
}

// ===========================================================================
// 10. The echo endpoint obeys the same limits (§1, §8, §11)
// ===========================================================================

#[test]
fn echo_enforces_the_message_size_limit() {
    let server = TestServer::start(&["--echo", "--max-message-size", "1024"]);
    let echo = format!("/echo?token={}", token("echo"));

    let mut client = server.open(&echo);
    client.ws.send(Message::text("hello, echo")).unwrap();
    match client.ws.read().unwrap() {
        Message::Text(text) => assert_eq!(text.as_str(), "hello, echo"),
        other => panic!("expected text, got {other:?}"),
    }
    let blob: Vec<u8> = (0..=255).collect();
    client.ws.send(Message::binary(blob.clone())).unwrap();
    match client.ws.read().unwrap() {
        Message::Binary(data) => assert_eq!(data.as_ref(), &blob[..]),
        other => panic!("expected binary, got {other:?}"),
    }
    // Exactly at the limit is still echoed.
    let exact = "e".repeat(1024);
    client.ws.send(Message::text(exact.clone())).unwrap();
    match client.ws.read().unwrap() {
        Message::Text(text) => assert_eq!(text.as_str(), exact),
        other => panic!("expected text, got {other:?}"),
    }
    client.ws.send(Message::text("t".repeat(1025))).unwrap();
    assert_eq!(client.expect_close().0, 1009, "text over the limit");

    let mut client = server.open(&echo);
    client.ws.send(Message::binary(vec![7u8; 2000])).unwrap();
    assert_eq!(client.expect_close().0, 1009, "binary over the limit");

    // Two fragments under the limit each, over it together.
    let mut raw = RawWs::open(server.addr, &echo);
    let mut bytes = client_frame(0x01, &[b'a'; 600], true);
    bytes.extend(client_frame(0x80, &[b'b'; 600], true));
    raw.send(&bytes);
    assert_eq!(
        raw.close_code().0,
        1009,
        "reassembled message over the limit"
    );
    raw.expect_end();

    let mut client = server.open(&echo);
    client.ws.send(Message::text("still here")).unwrap();
    match client.ws.read().unwrap() {
        Message::Text(text) => assert_eq!(text.as_str(), "still here"),
        other => panic!("expected text, got {other:?}"),
    }
}

#[test]
fn a_request_answered_as_the_drain_starts_gets_its_answer() {
    // One loop, so that the request and the signal land in one batch, in
    // the order they came: the request first.
    let server = TestServer::start(&["--api-key", "k", "--drain-ms", "0", "--threads", "1"]);
    let mut member = server.connect("member");
    member.join("news");
    let mut backend = TcpStream::connect(server.addr).unwrap();
    backend.set_read_timeout(Some(WAIT)).unwrap();
    // A first answer on the connection: the loop has accepted it before the
    // stop (else the accept and the signal could come in one batch, the
    // signal first, and the request after the drain began).
    backend
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut health = Vec::new();
    let mut chunk = [0u8; 1024];
    while !common::complete_keep_alive_response(&health) {
        let read = backend.read(&mut chunk).expect("the /health answer");
        assert!(read > 0, "closed before answering /health");
        health.extend_from_slice(&chunk[..read]);
    }
    let body = r#"{"room":"news","content":"last words"}"#;
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let pid = server.pid().to_string();
    Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP");
    await_stopped(server.pid());
    backend.write_all(request.as_bytes()).unwrap();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .expect("kill -CONT");
    // The publish took effect: the member gets the message...
    let message = member.recv_type("message");
    assert_eq!(message["payload"]["content"], "last words");
    // ...and the backend its answer, before the connection closes.
    let mut answer = Vec::new();
    let _ = backend.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(
        status_of(&answer),
        200,
        "the answer was cut off: {answer:?}"
    );
    assert!(answer.contains(r#""seq":1"#), "{answer}");
}
