//! `--threads N` (PROTOCOL §12): one process runs N event loops, each
//! connection lives on one of them, and the contract of §2–§11 is the same
//! for every N. Each test starts its own server with `--threads 4`, whatever
//! `ROOMCAST_TEST_THREADS` says, and opens enough connections that they land
//! on every loop (the kernel's hash or a round-robin acceptor spreads them).
//!
//! Every rule checked here also holds with one loop, so these tests pass
//! against a one-loop server too, except those that read the loop count
//! itself (`threads` in `/api/stats`, `roomcast_threads` in `/metrics`).
//!
//! As in the other suites, nothing sleeps where an event can be awaited:
//! reads block, bounded by the harness's 10 s timeout. The few figures that
//! may settle after the event a client sees (a closed tab leaving `presence`,
//! a freed slot, `/api/stats`) are polled, bounded.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, SECRET, TestServer, WAIT, token};
use serde_json::{Value, json};

use tungstenite::Message;

/// The loops every server of this file runs.
const LOOPS: &str = "4";

/// The API key of the servers that need the server API.
const KEY: &str = "threads-api-key";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Starts a server with `--threads 4` and `extra`.
fn start(extra: &[&str]) -> TestServer {
    let mut args = vec!["--threads", LOOPS];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

/// Retries `condition` (bounded: 500 tries, 10 ms apart) for figures that
/// may settle just after the event the test saw, e.g. a closed connection
/// leaving the count its loop reports to the others.
#[track_caller]
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}");
}

/// One HTTP request on its own connection (`Connection: close`), with the
/// API key: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("write request");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the server answers and closes");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (common::status_of(&answer), body)
}

/// A `POST` to the server API expecting `200`; the JSON answer.
#[track_caller]
fn api_ok(addr: SocketAddr, path: &str, body: Value) -> Value {
    let (status, answer) = http(addr, "POST", path, &body.to_string());
    assert_eq!(status, 200, "{path} {body} → {answer}");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {answer}"))
}

/// `GET /api/stats`.
fn stats(addr: SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/api/stats", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("stats not JSON ({e}): {body}"))
}

/// `GET /metrics`: the raw text and its samples (`name` or `name{labels}` → value).
fn metrics(addr: SocketAddr) -> (String, BTreeMap<String, f64>) {
    let (status, text) = http(addr, "GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    let samples = text
        .lines()
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
        .collect();
    (text, samples)
}

/// A `message` request for `room`.
fn message(room: &str, content: Value, id: Option<Value>) -> Value {
    let mut frame = json!({"type": "message", "payload": {"room": room, "content": content}});
    if let Some(id) = id {
        frame["id"] = id;
    }
    frame
}

/// Whether `frame` is a `kind` event about `user`.
fn is_about(frame: &Value, kind: &str, user: &str) -> bool {
    frame["type"] == kind && frame["payload"]["user"]["id"] == user
}

/// Reads until a frame of `kind` about `user` arrives; the frames before it
/// go to `log`.
fn recv_about(client: &mut Client, kind: &str, user: &str, log: &mut Vec<Value>) -> Value {
    loop {
        let frame = client.recv();
        if is_about(&frame, kind, user) {
            return frame;
        }
        log.push(frame);
    }
}

/// Sends a `ping` and returns every frame that came before its `pong`: with
/// one loop, everything queued for the client before the request.
fn frames_until_pong(client: &mut Client) -> Vec<Value> {
    client.send(json!({"type": "ping", "id": "barrier"}));
    let mut frames = Vec::new();
    loop {
        let frame = client.recv();
        if frame["type"] == "pong" && frame["id"] == "barrier" {
            return frames;
        }
        frames.push(frame);
    }
}

/// `presence` of `room` as sorted `(user id, connections)`; the frames read
/// before the reply go to `log`.
fn presence(client: &mut Client, room: &str, log: &mut Vec<Value>) -> Vec<(String, u64)> {
    client.send(json!({"type": "presence", "id": "who", "payload": {"room": room}}));
    let reply = loop {
        let frame = client.recv();
        if frame["id"] == "who" {
            break frame;
        }
        log.push(frame);
    };
    assert_eq!(reply["type"], "presence", "{reply}");
    let mut users: Vec<(String, u64)> = reply["payload"]["users"]
        .as_array()
        .unwrap_or_else(|| panic!("no users in {reply}"))
        .iter()
        .map(|user| {
            (
                user["id"].as_str().expect("user id").to_string(),
                user["connections"].as_u64().expect("connections"),
            )
        })
        .collect();
    users.sort();
    users
}

/// Closes from the client side and waits for the server's close reply.
fn hang_up(mut client: Client) {
    client.ws.close(None).expect("send close");
    loop {
        match client.ws.read() {
            Ok(Message::Close(_)) => return,
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => return,
            Err(error) => panic!("closing handshake failed: {error}"),
        }
    }
}

/// A WebSocket upgrade to `path` on `addr` (what `TestServer::try_open`
/// does, without borrowing the server, for threads).
fn try_upgrade(addr: SocketAddr, path: &str) -> Result<Client, tungstenite::Error> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    match tungstenite::client(format!("ws://{addr}{path}").as_str(), stream) {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(tungstenite::HandshakeError::Failure(error)) => Err(error),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
    }
}

/// `/ws?token=…` for `sub`.
fn ws_path(sub: &str) -> String {
    format!("/ws?token={}", token(sub))
}

/// The status of a refused upgrade; panics on a `101`.
#[track_caller]
fn refused_status(result: Result<Client, tungstenite::Error>, what: &str) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{what}: expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("{what}: upgraded"),
    }
}

/// The number after `retry_ms=` in a close reason.
#[track_caller]
fn retry_ms(reason: &str) -> u64 {
    let hint = reason
        .split("retry_ms=")
        .nth(1)
        .unwrap_or_else(|| panic!("no retry_ms= in {reason:?}"));
    let digits: String = hint.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("bad retry_ms in {reason:?}"))
}

/// Joins a thread, naming what it was doing if it panicked.
fn joined<T>(handle: thread::JoinHandle<T>, what: &str) -> T {
    handle
        .join()
        .unwrap_or_else(|_| panic!("{what} failed (its panic is printed above)"))
}

// ===========================================================================
// One seq order across loops
// ===========================================================================

/// A message as a member saw it: (seq, publisher, n).
type Seen = (u64, String, u64);

/// What a member read: the room's messages, and the acks of its own (id, seq).
type Heard = (Vec<Seen>, Vec<(u64, u64)>);

#[test]
fn every_member_on_every_loop_gets_every_message_once_in_one_seq_order() {
    const MEMBERS: usize = 40;
    const PUBLISHERS: usize = 4;
    const EACH: u64 = 50;
    const TOTAL: usize = PUBLISHERS * EACH as usize;
    let server = start(&["--rate-limit", "0"]);
    let members: Vec<Client> = (0..MEMBERS)
        .map(|i| {
            let mut member = server.connect(&format!("m{i}"));
            let joined = member.join("hall");
            assert_eq!(
                joined["payload"]["count"],
                i + 1,
                "count of distinct users, whatever loop each is on: {joined}"
            );
            assert_eq!(joined["payload"]["seq"], 0, "{joined}");
            member
        })
        .collect();

    // The first PUBLISHERS members publish at once, each from its own
    // thread, with an id so that each message's ack names its seq; every
    // member (publishers included) reads everything.
    let start_line = Arc::new(Barrier::new(PUBLISHERS));
    let mut readers = Vec::new();
    for (i, mut member) in members.into_iter().enumerate() {
        let start_line = Arc::clone(&start_line);
        readers.push(thread::spawn(move || {
            let mut acks = Vec::new();
            if i < PUBLISHERS {
                start_line.wait();
                for n in 0..EACH {
                    member.send(message(
                        "hall",
                        json!({"from": format!("m{i}"), "n": n}),
                        Some(json!(n)),
                    ));
                }
            }
            let mut seen = Vec::with_capacity(TOTAL);
            while seen.len() < TOTAL || (i < PUBLISHERS && acks.len() < EACH as usize) {
                let frame = member.recv();
                match frame["type"].as_str() {
                    Some("ack") => acks.push((
                        frame["id"].as_u64().expect("ack id"),
                        frame["payload"]["seq"].as_u64().expect("ack seq"),
                    )),
                    Some("message") => {
                        let payload = &frame["payload"];
                        let from = payload["content"]["from"].as_str().expect("from");
                        assert_eq!(payload["user"]["id"], from, "{frame}");
                        seen.push((
                            payload["seq"].as_u64().expect("seq"),
                            from.to_string(),
                            payload["content"]["n"].as_u64().expect("n"),
                        ));
                    }
                    Some("error") => panic!("member m{i}: {frame}"),
                    _ => continue,
                }
                assert!(seen.len() <= TOTAL, "m{i}: more than {TOTAL} messages");
            }
            (seen, acks)
        }));
    }
    let results: Vec<Heard> = readers
        .into_iter()
        .enumerate()
        .map(|(i, reader)| joined(reader, &format!("member m{i}")))
        .collect();

    let expected_seqs: Vec<u64> = (1..=TOTAL as u64).collect();
    let reference = &results[0].0;
    for (i, (seen, _)) in results.iter().enumerate() {
        let seqs: Vec<u64> = seen.iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(
            seqs, expected_seqs,
            "m{i}: seq 1..={TOTAL} in order, no gap, no duplicate"
        );
        // Each publisher's messages in the order it sent them, each once.
        let mut next: HashMap<&str, u64> = HashMap::new();
        for (seq, from, n) in seen {
            let expected = next.entry(from.as_str()).or_insert(0);
            assert_eq!(
                *n, *expected,
                "m{i}: {from}'s messages in order (seq {seq})"
            );
            *expected += 1;
        }
        assert_eq!(next.len(), PUBLISHERS, "m{i}: every publisher heard");
        assert_eq!(
            seen, reference,
            "m{i} and m0 saw different (seq, message) sequences"
        );
    }
    // Every ack carries the seq its message took in that one order.
    for (i, (_, acks)) in results.iter().enumerate().take(PUBLISHERS) {
        let from = format!("m{i}");
        let mut acks = acks.clone();
        acks.sort();
        let mine: Vec<(u64, u64)> = reference
            .iter()
            .filter(|(_, publisher, _)| *publisher == from)
            .map(|(seq, _, n)| (*n, *seq))
            .collect();
        assert_eq!(acks, mine, "{from}'s acks (id, seq) against the order");
    }
}

// ===========================================================================
// Users across loops: count, presence, user_joined / user_left, typing
// ===========================================================================

#[test]
fn four_tabs_of_one_user_on_several_loops_are_one_user() {
    let server = start(&["--typing-timeout-ms", "0"]);
    let mut observer = server.connect("observer");
    assert_eq!(observer.join("room")["payload"]["count"], 1);
    let mut log = Vec::new(); // every other frame the observer reads
    let mut tabs = Vec::new();
    for tab in 0..4 {
        let mut client = server.connect("tabby");
        let joined = client.join("room");
        assert_eq!(
            joined["payload"]["count"], 2,
            "tab {tab}: observer and tabby, however many tabs: {joined}"
        );
        tabs.push(client);
    }
    assert_eq!(
        presence(&mut observer, "room", &mut log),
        vec![("observer".to_string(), 1), ("tabby".to_string(), 4)],
        "one user with four connections"
    );

    // Another user arriving counts tabby once.
    let mut late = server.connect("late");
    let joined = late.join("room");
    assert_eq!(joined["payload"]["count"], 3, "{joined}");
    let announced = recv_about(&mut observer, "user_joined", "late", &mut log);
    assert_eq!(announced["payload"]["count"], 3, "{announced}");
    for (tab, client) in tabs.iter_mut().enumerate() {
        let announced = recv_about(client, "user_joined", "late", &mut Vec::new());
        assert_eq!(announced["payload"]["count"], 3, "tab {tab}: {announced}");
    }

    // Typing in one tab reaches the others' members once, and no tab.
    for is_typing in [true, false] {
        tabs[0]
            .send(json!({"type": "typing", "payload": {"room": "room", "is_typing": is_typing}}));
        for (who, client) in [("observer", &mut observer), ("late", &mut late)] {
            let typing = client.recv_type("typing");
            assert_eq!(typing["payload"]["user"]["id"], "tabby", "{who}: {typing}");
            assert_eq!(typing["payload"]["is_typing"], is_typing, "{who}: {typing}");
        }
    }
    for (tab, client) in tabs.iter_mut().enumerate() {
        let frames = frames_until_pong(client);
        assert!(
            frames.iter().all(|frame| frame["type"] != "typing"),
            "tab {tab} got its own user's typing: {frames:?}"
        );
    }

    // Tabs close one by one: tabby stays, with one connection fewer each time.
    while tabs.len() > 1 {
        hang_up(tabs.remove(0));
        let left = tabs.len() as u64;
        eventually(
            &format!("presence shows tabby with {left} connections"),
            || {
                presence(&mut observer, "room", &mut log)
                    == vec![
                        ("late".to_string(), 1),
                        ("observer".to_string(), 1),
                        ("tabby".to_string(), left),
                    ]
            },
        );
        assert!(
            !log.iter()
                .any(|frame| is_about(frame, "user_left", "tabby")),
            "user_left with {left} tabs still open: {log:?}"
        );
    }

    // The last tab closes: now tabby leaves, once.
    hang_up(tabs.pop().unwrap());
    let left = recv_about(&mut observer, "user_left", "tabby", &mut log);
    assert_eq!(left["payload"]["room"], "room", "{left}");
    assert_eq!(left["payload"]["count"], 2, "observer and late: {left}");
    let mut late_log = Vec::new();
    let left = recv_about(&mut late, "user_left", "tabby", &mut late_log);
    assert_eq!(left["payload"]["count"], 2, "{left}");
    assert_eq!(
        presence(&mut observer, "room", &mut log),
        vec![("late".to_string(), 1), ("observer".to_string(), 1)]
    );
    log.extend(frames_until_pong(&mut observer));
    late_log.extend(frames_until_pong(&mut late));

    let joins: Vec<&Value> = log
        .iter()
        .filter(|frame| is_about(frame, "user_joined", "tabby"))
        .collect();
    assert_eq!(joins.len(), 1, "one user_joined for four tabs: {joins:?}");
    assert_eq!(joins[0]["payload"]["count"], 2, "{}", joins[0]);
    for (who, frames) in [("observer", &log), ("late", &late_log)] {
        assert!(
            !frames
                .iter()
                .any(|frame| is_about(frame, "user_left", "tabby")),
            "{who}: a second user_left for tabby: {frames:?}"
        );
        assert!(
            !frames.iter().any(|frame| frame["type"] == "typing"),
            "{who}: a typing frame nobody sent: {frames:?}"
        );
    }
}

// ===========================================================================
// direct, /api/publish and /api/disconnect reach every loop
// ===========================================================================

#[test]
fn direct_publish_and_disconnect_reach_every_loop() {
    const TABS: usize = 6;
    let server = start(&["--api-key", KEY]);
    let mut alice = server.connect("alice");
    alice.join("r");
    let mut outsider = server.connect("outsider");
    let mut multi: Vec<Client> = (0..TABS)
        .map(|_| {
            let mut client = server.connect("multi");
            client.join("r");
            client
        })
        .collect();
    let mut bob = server.connect("bob");
    assert_eq!(bob.join("r")["payload"]["count"], 3);

    // A direct from a client reaches every connection of the user.
    alice.send(json!({
        "type": "direct", "id": "d", "payload": {"to": "multi", "content": "hi"}
    }));
    let ack = loop {
        let frame = alice.recv();
        if frame["id"] == "d" {
            break frame;
        }
    };
    assert_eq!(ack["type"], "ack", "{ack}");
    for (tab, client) in multi.iter_mut().enumerate() {
        let direct = client.recv_type("direct");
        assert_eq!(
            direct["payload"]["from"]["id"], "alice",
            "tab {tab}: {direct}"
        );
        assert_eq!(direct["payload"]["content"], "hi", "tab {tab}: {direct}");
    }

    // A room publish: delivered counts member connections on every loop.
    let answer = api_ok(
        server.addr,
        "/api/publish",
        json!({"room": "r", "content": "to the room"}),
    );
    assert_eq!(
        answer,
        json!({"delivered": TABS + 2, "seq": 1}),
        "alice, bob and {TABS} tabs"
    );
    for (who, client) in multi.iter_mut().chain([&mut alice, &mut bob]).enumerate() {
        let message = client.recv_type("message");
        assert_eq!(
            message["payload"]["user"]["id"], "server",
            "{who}: {message}"
        );
        assert_eq!(message["payload"]["content"], "to the room", "{message}");
        assert_eq!(message["payload"]["seq"], 1, "{message}");
    }
    let frames = frames_until_pong(&mut outsider);
    assert!(frames.is_empty(), "a non-member got {frames:?}");

    // A user publish: delivered counts that user's connections on every loop.
    let answer = api_ok(
        server.addr,
        "/api/publish",
        json!({"user": "multi", "content": "to the user"}),
    );
    assert_eq!(answer, json!({"delivered": TABS}));
    for (tab, client) in multi.iter_mut().enumerate() {
        let direct = client.recv_type("direct");
        assert_eq!(
            direct["payload"]["from"]["id"], "server",
            "tab {tab}: {direct}"
        );
        assert_eq!(direct["payload"]["content"], "to the user", "{direct}");
    }

    // Disconnect closes every connection of the user, with 4003, on every loop.
    let answer = api_ok(server.addr, "/api/disconnect", json!({"user": "multi"}));
    assert_eq!(answer, json!({"closed": TABS}));
    for (tab, client) in multi.iter_mut().enumerate() {
        let (code, reason) = client.expect_close();
        assert_eq!(code, 4003, "tab {tab}: {reason}");
    }
    for (who, client) in [("alice", &mut alice), ("bob", &mut bob)] {
        let left = recv_about(client, "user_left", "multi", &mut Vec::new());
        assert_eq!(left["payload"]["count"], 2, "{who}: {left}");
    }
    let answer = api_ok(
        server.addr,
        "/api/publish",
        json!({"room": "r", "content": "after"}),
    );
    assert_eq!(answer, json!({"delivered": 2, "seq": 2}), "alice and bob");
    for (who, client) in [("alice", &mut alice), ("bob", &mut bob)] {
        let message = client.recv_type("message");
        assert_eq!(message["payload"]["content"], "after", "{who}: {message}");
        assert_eq!(message["payload"]["seq"], 2, "{who}: {message}");
    }
    let frames = frames_until_pong(&mut outsider);
    assert!(frames.is_empty(), "a non-member got {frames:?}");
}

// ===========================================================================
// --max-connections counts the whole process
// ===========================================================================

#[test]
fn max_connections_counts_every_loop() {
    const LIMIT: usize = 10;
    let server = start(&["--max-connections", "10"]);
    let mut clients: Vec<Client> = (0..LIMIT)
        .map(|i| server.connect(&format!("c{i}")))
        .collect();
    assert_eq!(
        refused_status(server.try_open(&ws_path("eleventh")), "the 11th"),
        503
    );

    // One closes: a slot frees (once its loop has let it go) and only one.
    hang_up(clients.remove(0));
    let mut replacement = None;
    for _ in 0..200 {
        match server.try_open(&ws_path("replacement")) {
            Ok(client) => {
                replacement = Some(client);
                break;
            }
            Err(tungstenite::Error::Http(response)) if response.status() == 503 => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(other) => panic!("waiting for the freed slot: {other}"),
        }
    }
    let mut replacement = replacement.expect("a slot frees once a client has closed");
    assert_eq!(replacement.recv()["type"], "welcome");
    clients.push(replacement);
    assert_eq!(
        refused_status(server.try_open(&ws_path("again")), "full again"),
        503
    );
    for client in &mut clients {
        client.assert_alive();
    }

    // All leave; then 16 upgrades race on every loop at once: exactly 10 win.
    for client in clients.drain(..) {
        hang_up(client);
    }
    eventually("stats count 0 connections", || {
        stats(server.addr)["connections"] == 0
    });
    const RACERS: usize = 16;
    let start_line = Arc::new(Barrier::new(RACERS));
    let addr = server.addr;
    let racers: Vec<_> = (0..RACERS)
        .map(|i| {
            let start_line = Arc::clone(&start_line);
            let path = ws_path(&format!("racer{i}"));
            thread::spawn(move || {
                start_line.wait();
                match try_upgrade(addr, &path) {
                    Ok(mut client) => {
                        assert_eq!(client.recv()["type"], "welcome");
                        Some(client)
                    }
                    Err(tungstenite::Error::Http(response)) => {
                        assert_eq!(response.status(), 503, "racer {i}");
                        None
                    }
                    Err(other) => panic!("racer {i}: {other}"),
                }
            })
        })
        .collect();
    let mut winners: Vec<Client> = racers
        .into_iter()
        .enumerate()
        .filter_map(|(i, racer)| joined(racer, &format!("racer {i}")))
        .collect();
    assert_eq!(
        winners.len(),
        LIMIT,
        "of {RACERS} simultaneous upgrades, exactly --max-connections are let in"
    );
    for client in &mut winners {
        client.assert_alive();
    }
    assert_eq!(stats(server.addr)["connections"], LIMIT);
}

// ===========================================================================
// A stuck client delays no one, on its loop or another
// ===========================================================================

/// About 8 KB of JSON content.
fn bulky(n: u64) -> Value {
    json!({"n": n, "pad": "x".repeat(8000)})
}

#[test]
fn a_stuck_member_delays_no_member_on_any_loop() {
    // 1000 x 8 KB: more than the server's send buffer to the stuck member
    // can absorb (even autotuned to its usual 4 MiB ceiling) plus the soft
    // mark, so its broadcasts must be dropped while the others get them all.
    const COUNT: u64 = 1000;
    const HEALTHY: usize = 6;
    let server = start(&[
        "--write-buffer-soft",
        "20000",
        "--write-buffer-hard",
        "2000000",
        "--max-message-size",
        "16384",
        "--rate-limit",
        "0",
    ]);
    let mut stuck = server.connect_small_receive_buffer("stuck");
    stuck.join("feed");
    let mut healthy: Vec<Client> = (0..HEALTHY)
        .map(|i| {
            let mut client = server.connect(&format!("healthy{i}"));
            client.join("feed");
            client
        })
        .collect();
    let mut publisher = server.connect("publisher");
    publisher.join("feed");
    for client in &mut healthy {
        recv_about(client, "user_joined", "publisher", &mut Vec::new());
    }

    // The publisher never reads; every healthy member, whatever its loop,
    // gets each message before the next one is sent.
    for n in 1..=COUNT {
        publisher.send(message("feed", bulky(n), None));
        for (i, client) in healthy.iter_mut().enumerate() {
            let frame = client.recv_type("message");
            assert_eq!(frame["payload"]["seq"], n, "healthy{i}: {frame}");
            assert_eq!(frame["payload"]["content"]["n"], n, "healthy{i}");
        }
    }

    // The stuck member reads at last: what it got is in order, and what it
    // missed is announced by `lagged` (a broadcast never crosses the hard mark).
    let mut next = 1;
    let mut gaps = Vec::new();
    while next <= COUNT {
        let frame = stuck.recv();
        match frame["type"].as_str() {
            Some("message") => {
                assert_eq!(
                    frame["payload"]["seq"], next,
                    "a gap without lagged before it (gaps so far {gaps:?})"
                );
                next += 1;
            }
            Some("lagged") => {
                let from = frame["payload"]["from_seq"].as_u64().expect("from_seq");
                let to = frame["payload"]["to_seq"].as_u64().expect("to_seq");
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
        "{COUNT} bulky messages never pushed the stuck member over its soft mark"
    );

    // Everyone is still served, and so is a newcomer.
    stuck.assert_alive();
    for client in &mut healthy {
        client.assert_alive();
    }
    server.connect("newcomer").assert_alive();
    assert_eq!(http(server.addr, "GET", "/health", "").0, 200);
}

// ===========================================================================
// The drain spreads every loop's clients over one window
// ===========================================================================

#[test]
fn the_drain_spreads_every_loops_clients_over_one_window() {
    const CLIENTS: usize = 40;
    const DRAIN_MS: u64 = 2000;
    let server = start(&["--drain-ms", "2000"]);
    let clients: Vec<Client> = (0..CLIENTS)
        .map(|i| server.connect(&format!("d{i}")))
        .collect();
    let signalled = Instant::now();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            thread::spawn(move || {
                let (code, reason) = client.expect_close();
                (code, reason, signalled.elapsed())
            })
        })
        .collect();
    let (status_tx, status_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = status_tx.send(server.terminate());
    });
    let closes: Vec<(u16, String, Duration)> = readers
        .into_iter()
        .enumerate()
        .map(|(i, reader)| joined(reader, &format!("client d{i}")))
        .collect();

    let mut hints = Vec::new();
    for (code, reason, _) in &closes {
        assert_eq!(*code, 1001, "{reason}");
        let retry = retry_ms(reason);
        assert!(
            retry <= DRAIN_MS,
            "retry_ms={retry} beyond --drain-ms {DRAIN_MS}"
        );
        hints.push(retry);
    }
    // The hints are drawn per client, uniform over the window: 40 draws from
    // 2001 values. Fewer than 20 distinct ones, or a range under half the
    // window, would take astronomically bad luck (the range alone: about
    // 40 × 2^-39), not a loaded machine.
    hints.sort();
    let mut distinct = hints.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= CLIENTS / 2,
        "retry_ms values not jittered per client: {hints:?}"
    );
    assert!(
        hints[CLIENTS - 1] - hints[0] >= DRAIN_MS / 2,
        "retry_ms values not spread over the window: {hints:?}"
    );
    // The closes themselves are spread over the window, whichever loop holds
    // each client: the last one comes at least half a window after the
    // signal. This cannot flake: the clock started before the signal was
    // sent, and load only makes closes later; a server that closed everyone
    // at once would have to be stalled for a whole second to pass.
    let last = closes.iter().map(|(_, _, at)| *at).max().expect("closes");
    assert!(
        last >= Duration::from_millis(DRAIN_MS / 2),
        "every client was closed within {last:?} of SIGTERM: not spread over --drain-ms {DRAIN_MS}"
    );
    let status = status_rx
        .recv_timeout(WAIT)
        .expect("the server exits after the drain");
    assert!(status.success(), "exit status {status:?}");
}

// ===========================================================================
// --state-file saves and restores every room, whatever loop holds it
// ===========================================================================

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roomcast-threads-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_state_file_saves_and_restores_rooms_of_every_loop() {
    const ROOMS: u64 = 8;
    let dir = scratch("state");
    let path = dir.join("state.json");
    let path_arg = path.to_str().unwrap();
    let server = start(&["--state-file", path_arg, "--drain-ms", "0"]);
    // One connection in every room, to see every room's messages in one place.
    let mut watcher = server.connect("watcher");
    let epochs: Vec<String> = (0..ROOMS)
        .map(|i| {
            let joined = watcher.join(&format!("saved-{i}"));
            joined["payload"]["epoch"]
                .as_str()
                .expect("epoch")
                .to_string()
        })
        .collect();
    let mut writers: Vec<Client> = (0..ROOMS)
        .map(|i| {
            let mut writer = server.connect(&format!("writer{i}"));
            let joined = writer.join(&format!("saved-{i}"));
            assert_eq!(joined["payload"]["epoch"], epochs[i as usize], "{joined}");
            writer
        })
        .collect();
    // Room i gets i + 2 messages, each awaited before the next.
    for (i, writer) in writers.iter_mut().enumerate() {
        let room = format!("saved-{i}");
        for n in 1..=i as u64 + 2 {
            writer.send(message(&room, json!(format!("{room}/{n}")), None));
            assert_eq!(writer.recv_type("message")["payload"]["seq"], n, "{room}");
        }
    }
    let mut next_seq = vec![1u64; ROOMS as usize];
    let total: u64 = (0..ROOMS).map(|i| i + 2).sum();
    for _ in 0..total {
        let frame = watcher.recv_type("message");
        let room = frame["payload"]["room"].as_str().expect("room");
        let i: usize = room["saved-".len()..].parse().expect("room number");
        assert_eq!(frame["payload"]["seq"], next_seq[i], "watcher: {frame}");
        next_seq[i] += 1;
    }
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(path.exists(), "the state was written on shutdown");

    // Restarted on the same file, every room recovers, whichever loop holds it now.
    let server = start(&["--state-file", path_arg]);
    for i in 0..ROOMS {
        let room = format!("saved-{i}");
        let count = i + 2;
        let mut reader = server.connect(&format!("reader{i}"));
        let joined = reader.request(json!({
            "type": "join",
            "id": "j",
            "payload": {"room": room, "since": 1, "epoch": epochs[i as usize]}
        }));
        assert_eq!(joined["type"], "joined", "{joined}");
        assert_eq!(joined["payload"]["epoch"], epochs[i as usize], "{joined}");
        assert_eq!(joined["payload"]["seq"], count, "{joined}");
        assert_eq!(joined["payload"]["recovered"], true, "{joined}");
        assert_eq!(joined["payload"]["missed"], count - 1, "{joined}");
        for n in 2..=count {
            let replayed = reader.recv();
            assert_eq!(replayed["type"], "message", "{room}: {replayed}");
            assert_eq!(replayed["payload"]["seq"], n, "{room}: {replayed}");
            assert_eq!(
                replayed["payload"]["content"],
                format!("{room}/{n}"),
                "{replayed}"
            );
        }
        // The sequence goes on where it stopped.
        reader.send(message(&room, json!("live"), None));
        assert_eq!(
            reader.recv_type("message")["payload"]["seq"],
            count + 1,
            "{room}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ===========================================================================
// /api/stats and /metrics: process totals, and the loop count
// ===========================================================================

#[test]
fn stats_and_metrics_report_process_totals() {
    let server = start(&[]);
    // Six connections (over the loops), two in each of three rooms.
    let mut clients: Vec<Client> = (0..6)
        .map(|i| {
            let mut client = server.connect(&format!("s{i}"));
            client.join(&format!("totals-{}", i % 3));
            client
        })
        .collect();
    eventually("stats: 6 connections in 3 rooms", || {
        let stats = stats(server.addr);
        stats["connections"] == 6 && stats["rooms"] == 3
    });
    let (text, samples) = metrics(server.addr);
    assert_eq!(samples.get("roomcast_connections"), Some(&6.0), "{text}");
    assert_eq!(
        samples.get("roomcast_rooms"),
        Some(&3.0),
        "a room with members on several loops counts once: {text}"
    );

    // Two leave (one room empties): the totals follow.
    hang_up(clients.remove(0));
    hang_up(clients.remove(2));
    eventually("stats: 4 connections in 2 rooms", || {
        let stats = stats(server.addr);
        stats["connections"] == 4 && stats["rooms"] == 2
    });
    for client in &mut clients {
        frames_until_pong(client);
    }
}

/// `/api/stats` `threads` and the `roomcast_threads` gauge of `/metrics`.
fn reported_threads(addr: SocketAddr) -> (Value, Option<f64>) {
    let stats = stats(addr);
    let (text, samples) = metrics(addr);
    if samples.contains_key("roomcast_threads") {
        assert!(
            text.contains("# TYPE roomcast_threads gauge"),
            "roomcast_threads is a gauge: {text}"
        );
    }
    (
        stats["threads"].clone(),
        samples.get("roomcast_threads").copied(),
    )
}

#[test]
fn stats_and_metrics_report_the_loop_count() {
    let server = start(&[]);
    let (threads, gauge) = reported_threads(server.addr);
    assert_eq!(threads, 4, "/api/stats \"threads\"");
    // §11: the stats keys are the metric names without the prefix.
    assert_eq!(gauge, Some(4.0), "roomcast_threads in /metrics");

    let server = TestServer::start(&["--threads", "1"]);
    assert_eq!(reported_threads(server.addr), (json!(1), Some(1.0)));
}

#[test]
fn without_the_flag_the_loops_are_the_cores_the_process_may_use() {
    // No --threads at all (not even ROOMCAST_TEST_THREADS's): the default.
    let server = TestServer::start_exact(&["--jwt-secret", SECRET]);
    let expected = match std::env::var("ROOMCAST_THREADS") {
        // The server inherits this process's environment.
        Ok(value) if !value.is_empty() => value.parse::<u64>().expect("ROOMCAST_THREADS"),
        _ => thread::available_parallelism()
            .expect("available_parallelism")
            .get() as u64,
    };
    let (threads, gauge) = reported_threads(server.addr);
    assert_eq!(threads, expected, "/api/stats \"threads\"");
    assert_eq!(gauge, Some(expected as f64), "roomcast_threads");
    server.connect("default").assert_alive();
}

// ===========================================================================
// /echo on every loop
// ===========================================================================

#[test]
fn echo_works_on_every_loop() {
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 50;
    let server = start(&["--echo", "--max-message-size", "1024"]);
    let path = format!("/echo?token={}", token("echo"));
    let echoes: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut client = server.open(&path);
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    let text = format!("client {i} round {round}");
                    client.ws.send(Message::text(text.clone())).unwrap();
                    let blob: Vec<u8> = (0..=255u8).map(|b| b ^ round as u8 ^ i as u8).collect();
                    client.ws.send(Message::binary(blob.clone())).unwrap();
                    match client.ws.read().expect("read") {
                        Message::Text(got) => assert_eq!(got.as_str(), text),
                        other => panic!("client {i}: expected text, got {other:?}"),
                    }
                    match client.ws.read().expect("read") {
                        Message::Binary(got) => assert_eq!(got.as_ref(), &blob[..]),
                        other => panic!("client {i}: expected binary, got {other:?}"),
                    }
                }
                // The same limits on every loop.
                client.ws.send(Message::text("t".repeat(1025))).unwrap();
                assert_eq!(client.expect_close().0, 1009, "client {i}: over the limit");
            })
        })
        .collect();
    for (i, echo) in echoes.into_iter().enumerate() {
        joined(echo, &format!("echo client {i}"));
    }
    // The rooms side of the same server is unaffected.
    let mut member = server.connect("member");
    member.join("after-echo");
    member.assert_alive();
}
