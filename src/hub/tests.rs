//! Unit tests of the sans-IO hub against PROTOCOL.md §3–§5 and §11.
//!
//! Connections are plain ids, time is the `NOW` constant (plus offsets), and
//! what a connection was sent is read back from its outbound queue: the bytes
//! are split into WebSocket text frames and each payload parsed as JSON.

use serde_json::{Value, json};

use super::test_support::{SECRET, config, split_frames};
use super::*;
use crate::auth::{RoomAccess, TokenClaims, sign};
use crate::backplane::deferred::DeferredBackplane;

/// The fake clock's "now", in milliseconds since the epoch.
const NOW: Millis = 1_700_000_000_000;

const TYPING_TIMEOUT_MS: Millis = 6000;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

thread_local! {
    /// Set while the suite runs against a backplane that answers later.
    static ANSWER_LATER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A hub over the local backplane, or over one that answers later when the
/// suite runs that way (`the_rules_hold_when_the_backplane_answers_later`).
fn hub_from(config: HubConfig) -> Hub {
    if ANSWER_LATER.get() {
        let backplane = Box::new(DeferredBackplane::new(std::sync::Arc::clone(
            &config.namespaces,
        )));
        Hub::with_backplane(config, backplane)
    } else {
        Hub::new(config)
    }
}

/// With a backplane that answers later: lets every answer and all room
/// traffic arrive before the test looks at what connections were sent.
fn settle_backplane(hub: &mut Hub) {
    while hub
        .backplane_mut::<DeferredBackplane>()
        .is_some_and(|backplane| backplane.release())
    {
        hub.backplane_changed(NOW);
    }
}

fn new_hub() -> Hub {
    hub_from(config())
}

fn hub_with(change: impl FnOnce(&mut HubConfig)) -> Hub {
    let mut config = config();
    change(&mut config);
    hub_from(config)
}

/// `"alice"` → id `alice`, name `Alice`, no expiry, every room.
fn identity(user: &str) -> Identity {
    let mut name = user.to_owned();
    if let Some(first) = name.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    Identity {
        user_id: user.to_owned(),
        name,
        expires_at: None,
        rooms: RoomAccess::Every,
    }
}

/// An identity whose token carries a `rooms` claim.
fn identity_with_rooms(user: &str, patterns: &[&str]) -> Identity {
    Identity {
        rooms: RoomAccess::Patterns(patterns.iter().map(|p| (*p).to_owned()).collect()),
        ..identity(user)
    }
}

/// Connects `conn` as `user` at `NOW` and throws its `welcome` away.
fn connect(hub: &mut Hub, conn: ConnId, user: &str) {
    hub.connect(conn, identity(user), None, NOW);
    let frames = drain(hub, conn);
    assert_eq!(types(&frames), ["welcome"]);
}

/// One text frame from the client at `NOW`.
fn send(hub: &mut Hub, conn: ConnId, text: &str) {
    hub.receive_text(conn, text, NOW);
}

/// One text frame from the client at `now`.
fn send_at(hub: &mut Hub, conn: ConnId, text: &str, now: Millis) {
    hub.receive_text(conn, text, now);
}

/// Sends `join` for `room` and returns the `joined` payload. Only the
/// joiner's queue is drained.
fn join(hub: &mut Hub, conn: ConnId, room: &str) -> Value {
    send(
        hub,
        conn,
        &json!({"type": "join", "payload": {"room": room}}).to_string(),
    );
    let frames = drain(hub, conn);
    assert_eq!(types(&frames), ["joined"], "{frames:?}");
    frames[0]["payload"].clone()
}

/// A `message` request with `content` given as raw JSON text.
fn message(room: &str, content: &str) -> String {
    format!(r#"{{"type":"message","payload":{{"room":"{room}","content":{content}}}}}"#)
}

/// Publishes messages with contents 1..=n to `room` from `conn`, at `NOW + i`.
fn publish(hub: &mut Hub, conn: ConnId, room: &str, n: u64) {
    for i in 1..=n {
        send_at(hub, conn, &message(room, &i.to_string()), NOW + i);
    }
}

/// The frames queued to `conn` as raw JSON text, without clearing the queue.
fn peek_text(hub: &mut Hub, conn: ConnId) -> Vec<String> {
    settle_backplane(hub);
    split_frames(&hub.outbound_mut(conn).expect("connection exists").to_vec())
}

/// The frames queued to `conn`, parsed, without clearing the queue.
fn peek(hub: &mut Hub, conn: ConnId) -> Vec<Value> {
    peek_text(hub, conn)
        .iter()
        .map(|text| serde_json::from_str(text).expect("a frame holds one JSON value"))
        .collect()
}

/// The frames queued to `conn` as raw JSON text; clears the queue.
fn drain_text(hub: &mut Hub, conn: ConnId) -> Vec<String> {
    let texts = peek_text(hub, conn);
    hub.outbound_mut(conn).unwrap().clear();
    texts
}

/// The frames queued to `conn`, parsed; clears the queue (as if written).
fn drain(hub: &mut Hub, conn: ConnId) -> Vec<Value> {
    let frames = peek(hub, conn);
    hub.outbound_mut(conn).unwrap().clear();
    frames
}

fn drain_all(hub: &mut Hub, conns: &[ConnId]) {
    for &conn in conns {
        drain(hub, conn);
    }
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|frame| frame["type"].as_str().expect("`type` is a string"))
        .collect()
}

/// The `code` of an `error` frame.
fn error_code(frame: &Value) -> &str {
    assert_eq!(frame["type"], "error", "{frame}");
    assert!(frame["payload"]["message"].is_string(), "{frame}");
    frame["payload"]["code"].as_str().unwrap()
}

/// The only frame `conn` was sent, which must be an error; returns its code and frame.
fn single_error(hub: &mut Hub, conn: ConnId) -> (String, Value) {
    let frames = drain(hub, conn);
    assert_eq!(frames.len(), 1, "{frames:?}");
    (error_code(&frames[0]).to_owned(), frames[0].clone())
}

/// The closes the hub decided on since the last call.
fn closes(hub: &mut Hub) -> Vec<CloseRequest> {
    let mut closes = Vec::new();
    hub.take_closes(&mut closes);
    closes
}

fn user(id: &str) -> Value {
    let identity = identity(id);
    json!({"id": identity.user_id, "name": identity.name})
}

fn token(claims: TokenClaims) -> String {
    sign(SECRET, &claims)
}

fn refresh_request(token: &str) -> String {
    json!({"type": "refresh", "id": "rf", "payload": {"token": token}}).to_string()
}

// ---------------------------------------------------------------------------
// welcome
// ---------------------------------------------------------------------------

#[test]
fn welcome_carries_connection_id_user_heartbeat_and_server_time() {
    let mut hub = hub_with(|config| config.heartbeat_ms = 30_000);
    hub.connect(0, identity("alice"), None, NOW);
    hub.connect(1, identity("alice"), None, NOW + 1);
    let first = drain(&mut hub, 0);
    let second = drain(&mut hub, 1);

    assert_eq!(types(&first), ["welcome"]);
    assert!(first[0].get("id").is_none());
    let payload = &first[0]["payload"];
    let connection_id = payload["connection_id"].as_str().expect("a string");
    assert!(!connection_id.is_empty());
    assert_eq!(payload["user"], json!({"id": "alice", "name": "Alice"}));
    assert_eq!(payload["heartbeat_ms"], 30_000);
    assert_eq!(payload["server_time"], NOW);

    assert_eq!(types(&second), ["welcome"]);
    assert_eq!(second[0]["payload"]["server_time"], NOW + 1);
    assert_ne!(second[0]["payload"]["connection_id"], connection_id);
    assert_eq!(hub.connection_count(), 2);
}

#[test]
fn connect_after_queues_the_upgrade_response_ahead_of_welcome() {
    let mut hub = new_hub();
    let response = Bytes::from_static(b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
    hub.connect_after(0, response.clone(), identity("alice"), Some("lobby"), NOW);
    settle_backplane(&mut hub);
    let queued = hub.outbound_mut(0).unwrap().to_vec();
    assert!(queued.starts_with(&response));
    let frames: Vec<Value> = split_frames(&queued[response.len()..])
        .iter()
        .map(|text| serde_json::from_str(text).unwrap())
        .collect();
    assert_eq!(types(&frames), ["welcome", "joined"]);
    let mut dirty = Vec::new();
    hub.take_dirty(&mut dirty);
    assert_eq!(dirty, [0]);
}

// ---------------------------------------------------------------------------
// join
// ---------------------------------------------------------------------------

#[test]
fn join_replies_joined_with_count_seq_epoch_and_string_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send(
        &mut hub,
        0,
        r#"{"type":"join","id":"j1","payload":{"room":"lobby"}}"#,
    );
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["joined"]);
    assert_eq!(frames[0]["id"], "j1");
    let payload = &frames[0]["payload"];
    assert_eq!(payload["room"], "lobby");
    assert_eq!(payload["count"], 1);
    assert_eq!(payload["seq"], 0);
    assert!(!payload["epoch"].as_str().expect("a string").is_empty());
    assert!(payload.get("recovered").is_none());
    assert!(payload.get("missed").is_none());
    assert_eq!(hub.occupied_room_count(), 1);
}

#[test]
fn join_echoes_a_numeric_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send(
        &mut hub,
        0,
        r#"{"type":"join","id":7,"payload":{"room":"lobby"}}"#,
    );
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["joined"]);
    assert_eq!(frames[0]["id"], 7);
    assert!(frames[0]["id"].is_number());
}

#[test]
fn join_without_id_has_no_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send(&mut hub, 0, r#"{"type":"join","payload":{"room":"lobby"}}"#);
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["joined"]);
    assert!(frames[0].get("id").is_none());
}

#[test]
fn second_join_is_idempotent() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    let first = join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1]);

    send(
        &mut hub,
        1,
        r#"{"type":"join","id":"again","payload":{"room":"lobby"}}"#,
    );
    let frames = drain(&mut hub, 1);
    assert_eq!(types(&frames), ["joined"]);
    assert_eq!(frames[0]["id"], "again");
    assert_eq!(frames[0]["payload"]["count"], 2);
    assert_eq!(frames[0]["payload"]["epoch"], first["epoch"]);
    assert!(drain(&mut hub, 0).is_empty(), "no second user_joined");

    // Still one membership: one copy of each message.
    send(&mut hub, 0, &message("lobby", r#""hi""#));
    assert_eq!(types(&drain(&mut hub, 1)), ["message"]);
}

#[test]
fn join_rejects_invalid_room_names() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    let too_long = "a".repeat(65);
    for room in ["", "a b", "caf\u{e9}", "a/b", too_long.as_str()] {
        send(
            &mut hub,
            0,
            &json!({"type": "join", "id": "j", "payload": {"room": room}}).to_string(),
        );
        let (code, frame) = single_error(&mut hub, 0);
        assert_eq!(code, "invalid_room", "room {room:?}");
        assert_eq!(frame["id"], "j");
    }
    let longest = "a".repeat(64);
    join(&mut hub, 0, &longest);
    join(&mut hub, 0, "Team:a-b_c.9");
    assert_eq!(hub.known_room_count(), 2);
}

#[test]
fn join_outside_rooms_claim_is_forbidden() {
    let mut hub = new_hub();
    hub.connect(
        0,
        identity_with_rooms("alice", &["team:*", "lobby"]),
        None,
        NOW,
    );
    drain(&mut hub, 0);
    send(
        &mut hub,
        0,
        r#"{"type":"join","id":1,"payload":{"room":"general"}}"#,
    );
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "forbidden");
    assert_eq!(frame["id"], 1);
    assert_eq!(hub.known_room_count(), 0, "a refused join creates no room");

    join(&mut hub, 0, "lobby");
    join(&mut hub, 0, "team:");
    join(&mut hub, 0, "team:red");
}

#[test]
fn empty_rooms_claim_allows_no_room() {
    let mut hub = new_hub();
    hub.connect(0, identity_with_rooms("alice", &[]), None, NOW);
    drain(&mut hub, 0);
    send(&mut hub, 0, r#"{"type":"join","payload":{"room":"lobby"}}"#);
    assert_eq!(single_error(&mut hub, 0).0, "forbidden");
}

// ---------------------------------------------------------------------------
// /ws/{room}: join on connect
// ---------------------------------------------------------------------------

#[test]
fn connect_with_room_sends_welcome_then_joined() {
    let mut hub = new_hub();
    hub.connect(0, identity("alice"), Some("lobby"), NOW);
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["welcome", "joined"]);
    let joined = &frames[1];
    assert!(joined.get("id").is_none());
    assert_eq!(joined["payload"]["room"], "lobby");
    assert_eq!(joined["payload"]["count"], 1);
    assert_eq!(joined["payload"]["seq"], 0);
    assert!(joined["payload"]["epoch"].is_string());
    assert_eq!(hub.occupied_room_count(), 1);

    // Exactly like a join: others hear user_joined.
    hub.connect(1, identity("bob"), Some("lobby"), NOW);
    assert_eq!(types(&drain(&mut hub, 1)), ["welcome", "joined"]);
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["user_joined"]);
    assert_eq!(frames[0]["payload"]["user"], user("bob"));
}

#[test]
fn connect_with_invalid_room_sends_error_and_stays_usable() {
    let mut hub = new_hub();
    hub.connect(0, identity("alice"), Some("no spaces"), NOW);
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["welcome", "error"]);
    assert_eq!(error_code(&frames[1]), "invalid_room");
    assert!(frames[1].get("id").is_none());
    assert_eq!(hub.known_room_count(), 0);
    assert!(closes(&mut hub).is_empty());

    send(&mut hub, 0, r#"{"type":"ping","id":"p"}"#);
    assert_eq!(types(&drain(&mut hub, 0)), ["pong"]);
    join(&mut hub, 0, "lobby");
}

#[test]
fn connect_with_room_outside_claim_is_forbidden() {
    let mut hub = new_hub();
    hub.connect(
        0,
        identity_with_rooms("alice", &["team:*"]),
        Some("lobby"),
        NOW,
    );
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["welcome", "error"]);
    assert_eq!(error_code(&frames[1]), "forbidden");
    assert!(closes(&mut hub).is_empty());
    assert_eq!(hub.occupied_room_count(), 0);

    join(&mut hub, 0, "team:blue");
}

// ---------------------------------------------------------------------------
// user_joined / user_left and counts
// ---------------------------------------------------------------------------

#[test]
fn user_joined_goes_to_others_not_the_joiner() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");

    send(&mut hub, 1, r#"{"type":"join","payload":{"room":"lobby"}}"#);
    let bob = drain(&mut hub, 1);
    assert_eq!(types(&bob), ["joined"], "the joiner gets no user_joined");
    assert_eq!(bob[0]["payload"]["count"], 2);

    let alice = drain(&mut hub, 0);
    assert_eq!(types(&alice), ["user_joined"]);
    assert!(alice[0].get("id").is_none());
    assert_eq!(
        alice[0]["payload"],
        json!({"room": "lobby", "user": user("bob"), "count": 2})
    );
}

#[test]
fn second_tab_of_a_user_is_not_announced_and_does_not_count() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    connect(&mut hub, 2, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain(&mut hub, 0);

    let joined = join(&mut hub, 2, "lobby");
    assert_eq!(joined["count"], 2, "count is distinct users");
    assert!(drain(&mut hub, 0).is_empty());
    assert!(drain(&mut hub, 1).is_empty());
}

#[test]
fn user_left_only_when_the_last_tab_leaves_or_disconnects() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    connect(&mut hub, 2, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    join(&mut hub, 2, "lobby");
    drain_all(&mut hub, &[0, 1, 2]);

    // One of bob's tabs leaves: bob is still there.
    send(
        &mut hub,
        1,
        r#"{"type":"leave","payload":{"room":"lobby"}}"#,
    );
    assert_eq!(types(&drain(&mut hub, 1)), ["left"]);
    assert!(drain(&mut hub, 0).is_empty());
    assert!(drain(&mut hub, 2).is_empty());

    // The other one goes away: now bob left.
    hub.disconnect(2, NOW);
    let alice = drain(&mut hub, 0);
    assert_eq!(types(&alice), ["user_left"]);
    assert_eq!(
        alice[0]["payload"],
        json!({"room": "lobby", "user": user("bob"), "count": 1})
    );
    assert!(drain(&mut hub, 1).is_empty(), "not a member any more");
}

#[test]
fn counts_are_distinct_users() {
    let mut hub = new_hub();
    for (conn, name) in [
        (0, "alice"),
        (1, "alice"),
        (2, "bob"),
        (3, "bob"),
        (4, "carol"),
    ] {
        connect(&mut hub, conn, name);
    }
    assert_eq!(join(&mut hub, 0, "lobby")["count"], 1);
    assert_eq!(join(&mut hub, 1, "lobby")["count"], 1);
    assert_eq!(join(&mut hub, 2, "lobby")["count"], 2);
    assert_eq!(join(&mut hub, 3, "lobby")["count"], 2);
    drain(&mut hub, 0);
    join(&mut hub, 4, "lobby");
    let alice = drain(&mut hub, 0);
    assert_eq!(types(&alice), ["user_joined"]);
    assert_eq!(alice[0]["payload"]["count"], 3);
}

// ---------------------------------------------------------------------------
// message
// ---------------------------------------------------------------------------

#[test]
fn message_reaches_every_member_including_the_sender() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    connect(&mut hub, 2, "bob");
    connect(&mut hub, 3, "carol");
    for conn in 0..3 {
        join(&mut hub, conn, "lobby");
    }
    join(&mut hub, 3, "elsewhere");
    drain_all(&mut hub, &[0, 1, 2, 3]);

    send_at(&mut hub, 0, &message("lobby", r#""hello""#), NOW + 10);
    let expected = json!({
        "type": "message",
        "payload": {"room": "lobby", "user": user("alice"), "content": "hello", "seq": 1, "ts": NOW + 10},
    });
    for conn in 0..3 {
        assert_eq!(
            drain(&mut hub, conn),
            std::slice::from_ref(&expected),
            "connection {conn}"
        );
    }
    assert!(drain(&mut hub, 3).is_empty(), "not a member");
}

#[test]
fn message_seq_counts_up_from_one_and_ts_is_now() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain(&mut hub, 0);
    join(&mut hub, 0, "other");
    drain(&mut hub, 1);

    send_at(&mut hub, 0, &message("lobby", "1"), NOW + 1);
    send_at(&mut hub, 1, &message("lobby", "2"), NOW + 2);
    send_at(&mut hub, 0, &message("lobby", "3"), NOW + 3);
    send_at(&mut hub, 0, &message("other", "4"), NOW + 4);
    let frames = drain(&mut hub, 1);
    assert_eq!(types(&frames), ["message", "message", "message"]);
    for (i, frame) in frames.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(frame["payload"]["seq"], n);
        assert_eq!(frame["payload"]["ts"], NOW + n);
        assert_eq!(frame["payload"]["content"], n);
    }
    assert_eq!(frames[1]["payload"]["user"], user("bob"));
    let alice = drain(&mut hub, 0);
    assert_eq!(alice[3]["payload"]["room"], "other");
    assert_eq!(alice[3]["payload"]["seq"], 1, "seq is per room");

    // The next joiner learns the last seq.
    connect(&mut hub, 2, "carol");
    assert_eq!(join(&mut hub, 2, "lobby")["seq"], 3);
}

#[test]
fn message_content_is_carried_verbatim() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1]);

    let contents = [
        r#"{"a":{"b":[1,2.5,{"c":null}],"d":"e"},"f":[]}"#,
        r#""caf\u00e9 \ud83d\ude00 \"quoted\" \n""#,
        "null",
        "false",
        "-12.5e3",
        "[]",
        r#""""#,
    ];
    for content in contents {
        send(&mut hub, 0, &message("lobby", content));
        let texts = drain_text(&mut hub, 1);
        assert_eq!(texts.len(), 1);
        assert!(
            texts[0].contains(&format!(r#""content":{content}"#)),
            "content bytes unchanged: {}",
            texts[0]
        );
        let frame: Value = serde_json::from_str(&texts[0]).unwrap();
        let expected: Value = serde_json::from_str(content).unwrap();
        assert_eq!(frame["payload"]["content"], expected);
        assert!(frame["payload"].get("content").is_some(), "null is kept");
    }
}

#[test]
fn message_with_id_gets_ack_with_seq_and_without_id_none() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1]);

    send(&mut hub, 0, &message("lobby", "1"));
    assert_eq!(types(&drain(&mut hub, 0)), ["message"], "no id, no ack");
    drain(&mut hub, 1);

    send(
        &mut hub,
        0,
        r#"{"type":"message","id":"m2","payload":{"room":"lobby","content":2}}"#,
    );
    let alice = drain(&mut hub, 0);
    let ack = alice.iter().find(|f| f["type"] == "ack").expect("an ack");
    assert_eq!(ack["id"], "m2");
    assert_eq!(ack["payload"], json!({"seq": 2}));
    let echo = alice
        .iter()
        .find(|f| f["type"] == "message")
        .expect("own message");
    assert_eq!(echo["payload"]["seq"], 2);
    assert_eq!(alice.len(), 2);

    let bob = drain(&mut hub, 1);
    assert_eq!(types(&bob), ["message"], "only the sender gets the ack");
}

#[test]
fn message_to_a_room_not_joined_is_not_in_room() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 1, "lobby");
    drain(&mut hub, 1);

    for room in ["lobby", "nowhere"] {
        send(
            &mut hub,
            0,
            &json!({"type": "message", "id": "m", "payload": {"room": room, "content": 1}})
                .to_string(),
        );
        let (code, frame) = single_error(&mut hub, 0);
        assert_eq!(code, "not_in_room", "room {room}");
        assert_eq!(frame["id"], "m");
    }
    assert!(drain(&mut hub, 1).is_empty(), "nothing published");
    connect(&mut hub, 2, "carol");
    assert_eq!(join(&mut hub, 2, "lobby")["seq"], 0, "no seq taken");
}

#[test]
fn forbidden_wins_over_not_in_room() {
    let mut hub = new_hub();
    hub.connect(0, identity_with_rooms("alice", &["team:*"]), None, NOW);
    drain(&mut hub, 0);
    let requests = [
        r#"{"type":"message","id":1,"payload":{"room":"lobby","content":1}}"#,
        r#"{"type":"leave","id":1,"payload":{"room":"lobby"}}"#,
        r#"{"type":"typing","id":1,"payload":{"room":"lobby","is_typing":true}}"#,
        r#"{"type":"presence","id":1,"payload":{"room":"lobby"}}"#,
    ];
    for request in requests {
        send(&mut hub, 0, request);
        let (code, frame) = single_error(&mut hub, 0);
        assert_eq!(code, "forbidden", "{request}");
        assert_eq!(frame["id"], 1);
    }
    // Inside the claim but not a member: not_in_room.
    send(&mut hub, 0, &message("team:a", "1"));
    assert_eq!(single_error(&mut hub, 0).0, "not_in_room");
}

#[test]
fn invalid_room_comes_before_forbidden() {
    let mut hub = new_hub();
    hub.connect(0, identity_with_rooms("alice", &["team:*"]), None, NOW);
    drain(&mut hub, 0);
    let requests = [
        r#"{"type":"message","payload":{"room":"bad room","content":1}}"#,
        r#"{"type":"leave","payload":{"room":"bad room"}}"#,
        r#"{"type":"typing","payload":{"room":"","is_typing":true}}"#,
        r#"{"type":"presence","payload":{"room":"bad/room"}}"#,
        r#"{"type":"join","payload":{"room":"bad room"}}"#,
    ];
    for request in requests {
        send(&mut hub, 0, request);
        assert_eq!(single_error(&mut hub, 0).0, "invalid_room", "{request}");
    }
}

#[test]
fn broadcast_shares_identical_frame_bytes() {
    let mut hub = new_hub();
    for (conn, name) in [(0, "alice"), (1, "bob"), (2, "carol")] {
        connect(&mut hub, conn, name);
        join(&mut hub, conn, "lobby");
    }
    drain_all(&mut hub, &[0, 1, 2]);

    send(
        &mut hub,
        0,
        &message("lobby", r#"{"text":"same for everyone"}"#),
    );
    settle_backplane(&mut hub);
    let queues: Vec<Vec<u8>> = (0..3)
        .map(|conn| {
            let queue = hub.outbound_mut(conn).unwrap();
            assert_eq!(queue.chunk_count(), 1, "one frame, queued as one chunk");
            queue.to_vec()
        })
        .collect();
    assert_eq!(queues[0], queues[1]);
    assert_eq!(queues[1], queues[2]);
    assert_eq!(split_frames(&queues[0]).len(), 1);
}

// ---------------------------------------------------------------------------
// leave
// ---------------------------------------------------------------------------

#[test]
fn leave_replies_left_and_stops_delivery() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1]);

    send(
        &mut hub,
        0,
        r#"{"type":"leave","id":"l1","payload":{"room":"lobby"}}"#,
    );
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "left", "id": "l1", "payload": {"room": "lobby"}})]
    );
    let bob = drain(&mut hub, 1);
    assert_eq!(
        bob,
        [
            json!({"type": "user_left", "payload": {"room": "lobby", "user": user("alice"), "count": 1}})
        ]
    );

    send(&mut hub, 1, &message("lobby", r#""after""#));
    assert!(
        drain(&mut hub, 0).is_empty(),
        "no more messages after leave"
    );
    assert_eq!(types(&drain(&mut hub, 1)), ["message"]);
}

#[test]
fn leave_without_id_has_no_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    join(&mut hub, 0, "lobby");
    send(
        &mut hub,
        0,
        r#"{"type":"leave","payload":{"room":"lobby"}}"#,
    );
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "left", "payload": {"room": "lobby"}})]
    );
    assert_eq!(hub.occupied_room_count(), 0);
}

#[test]
fn leave_when_not_a_member_is_not_in_room() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 1, "lobby");
    drain(&mut hub, 1);

    send(
        &mut hub,
        0,
        r#"{"type":"leave","id":"l","payload":{"room":"lobby"}}"#,
    );
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "not_in_room");
    assert_eq!(frame["id"], "l");
    assert!(drain(&mut hub, 1).is_empty());

    // Twice in a row: the second one is not_in_room.
    join(&mut hub, 0, "lobby");
    send(
        &mut hub,
        0,
        r#"{"type":"leave","payload":{"room":"lobby"}}"#,
    );
    assert_eq!(types(&drain(&mut hub, 0)), ["left"]);
    send(
        &mut hub,
        0,
        r#"{"type":"leave","payload":{"room":"lobby"}}"#,
    );
    assert_eq!(single_error(&mut hub, 0).0, "not_in_room");
}

// ---------------------------------------------------------------------------
// direct
// ---------------------------------------------------------------------------

#[test]
fn direct_reaches_every_connection_of_the_target_with_from() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    connect(&mut hub, 2, "bob");
    connect(&mut hub, 3, "carol");

    send_at(
        &mut hub,
        0,
        r#"{"type":"direct","id":"d1","payload":{"to":"bob","content":{"x":[1,"y"]}}}"#,
        NOW + 5,
    );
    let expected = json!({
        "type": "direct",
        "payload": {"from": user("alice"), "content": {"x": [1, "y"]}, "ts": NOW + 5},
    });
    assert_eq!(drain(&mut hub, 1), std::slice::from_ref(&expected));
    assert_eq!(drain(&mut hub, 2), [expected]);
    assert!(drain(&mut hub, 3).is_empty());
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "ack", "id": "d1", "payload": {}})],
        "ack without seq"
    );

    send(
        &mut hub,
        0,
        r#"{"type":"direct","payload":{"to":"bob","content":null}}"#,
    );
    assert!(drain(&mut hub, 0).is_empty(), "no id, no ack");
    let bob = drain(&mut hub, 1);
    assert_eq!(types(&bob), ["direct"]);
    assert_eq!(bob[0]["payload"]["content"], Value::Null);
    assert!(bob[0]["payload"].get("content").is_some());
}

#[test]
fn direct_to_oneself_reaches_all_of_ones_connections() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "alice");
    send(
        &mut hub,
        0,
        r#"{"type":"direct","id":9,"payload":{"to":"alice","content":"note to self"}}"#,
    );
    let sender = drain(&mut hub, 0);
    assert_eq!(types(&sender), ["direct", "ack"]);
    assert_eq!(sender[0]["payload"]["from"], user("alice"));
    assert_eq!(sender[1]["id"], 9);
    let other = drain(&mut hub, 1);
    assert_eq!(types(&other), ["direct"]);
    assert_eq!(other[0]["payload"]["content"], "note to self");
}

#[test]
fn direct_to_unknown_user_is_user_offline() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    send(
        &mut hub,
        0,
        r#"{"type":"direct","id":"d","payload":{"to":"nobody","content":1}}"#,
    );
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "user_offline");
    assert_eq!(frame["id"], "d");

    // A user whose connections are all gone is offline too.
    hub.disconnect(1, NOW);
    send(
        &mut hub,
        0,
        r#"{"type":"direct","payload":{"to":"bob","content":1}}"#,
    );
    assert_eq!(single_error(&mut hub, 0).0, "user_offline");
}

// ---------------------------------------------------------------------------
// typing
// ---------------------------------------------------------------------------

/// alice on connections 0 and 1, bob on 2, all in `lobby`, queues drained.
fn typing_room(hub: &mut Hub) {
    connect(hub, 0, "alice");
    connect(hub, 1, "alice");
    connect(hub, 2, "bob");
    for conn in 0..3 {
        join(hub, conn, "lobby");
    }
    drain_all(hub, &[0, 1, 2]);
}

const TYPING_ON: &str = r#"{"type":"typing","payload":{"room":"lobby","is_typing":true}}"#;
const TYPING_OFF: &str = r#"{"type":"typing","payload":{"room":"lobby","is_typing":false}}"#;

fn typing_frame_json(user_id: &str, is_typing: bool) -> Value {
    json!({"type": "typing", "payload": {"room": "lobby", "user": user(user_id), "is_typing": is_typing}})
}

#[test]
fn typing_goes_to_others_but_none_of_the_senders_connections() {
    let mut hub = new_hub();
    typing_room(&mut hub);
    send(&mut hub, 0, TYPING_ON);
    assert_eq!(drain(&mut hub, 2), [typing_frame_json("alice", true)]);
    assert!(drain(&mut hub, 0).is_empty());
    assert!(
        drain(&mut hub, 1).is_empty(),
        "not to the sender's other tab"
    );

    send(&mut hub, 0, TYPING_OFF);
    assert_eq!(drain(&mut hub, 2), [typing_frame_json("alice", false)]);
    assert!(drain(&mut hub, 1).is_empty());
}

#[test]
fn typing_in_a_room_not_joined_is_not_in_room() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send(
        &mut hub,
        0,
        r#"{"type":"typing","id":"t","payload":{"room":"lobby","is_typing":true}}"#,
    );
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "not_in_room");
    assert_eq!(frame["id"], "t");
}

#[test]
fn typing_expires_after_the_timeout() {
    let mut hub = new_hub();
    typing_room(&mut hub);
    send(&mut hub, 0, TYPING_ON);
    drain(&mut hub, 2);
    assert_eq!(hub.next_deadline(), Some(NOW + TYPING_TIMEOUT_MS));

    hub.tick(NOW + TYPING_TIMEOUT_MS - 1);
    assert!(drain(&mut hub, 2).is_empty(), "not yet");

    hub.tick(NOW + TYPING_TIMEOUT_MS);
    assert_eq!(drain(&mut hub, 2), [typing_frame_json("alice", false)]);
    assert!(drain(&mut hub, 0).is_empty());
    assert!(drain(&mut hub, 1).is_empty());

    hub.tick(NOW + 10 * TYPING_TIMEOUT_MS);
    assert!(drain(&mut hub, 2).is_empty(), "expires once");
}

#[test]
fn renewed_typing_pushes_the_deadline() {
    let mut hub = new_hub();
    typing_room(&mut hub);
    send_at(&mut hub, 0, TYPING_ON, NOW);
    send_at(&mut hub, 0, TYPING_ON, NOW + 3000);
    assert_eq!(drain(&mut hub, 2).len(), 2);

    hub.tick(NOW + TYPING_TIMEOUT_MS);
    assert!(
        drain(&mut hub, 2).is_empty(),
        "the old deadline no longer counts"
    );
    hub.tick(NOW + 3000 + TYPING_TIMEOUT_MS - 1);
    assert!(drain(&mut hub, 2).is_empty());
    hub.tick(NOW + 3000 + TYPING_TIMEOUT_MS);
    assert_eq!(drain(&mut hub, 2), [typing_frame_json("alice", false)]);
}

#[test]
fn typing_stopped_explicitly_does_not_expire_again() {
    let mut hub = new_hub();
    typing_room(&mut hub);
    send(&mut hub, 0, TYPING_ON);
    send(&mut hub, 0, TYPING_OFF);
    assert_eq!(drain(&mut hub, 2).len(), 2);
    hub.tick(NOW + TYPING_TIMEOUT_MS);
    assert!(drain(&mut hub, 2).is_empty());
}

#[test]
fn leaving_while_typing_sends_typing_false_then_user_left() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    send(&mut hub, 0, TYPING_ON);
    drain_all(&mut hub, &[0, 1]);

    send(
        &mut hub,
        0,
        r#"{"type":"leave","payload":{"room":"lobby"}}"#,
    );
    let bob = drain(&mut hub, 1);
    assert_eq!(types(&bob), ["typing", "user_left"]);
    assert_eq!(bob[0], typing_frame_json("alice", false));

    hub.tick(NOW + TYPING_TIMEOUT_MS);
    assert!(drain(&mut hub, 1).is_empty(), "no second typing false");
}

#[test]
fn disconnecting_while_typing_sends_typing_false_then_user_left() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    send(&mut hub, 0, TYPING_ON);
    drain_all(&mut hub, &[0, 1]);

    hub.disconnect(0, NOW + 1);
    let bob = drain(&mut hub, 1);
    assert_eq!(types(&bob), ["typing", "user_left"]);
    assert_eq!(bob[0], typing_frame_json("alice", false));
}

#[test]
fn one_tab_leaving_keeps_the_users_typing_state() {
    let mut hub = new_hub();
    typing_room(&mut hub);
    send(&mut hub, 0, TYPING_ON);
    drain(&mut hub, 2);

    send(
        &mut hub,
        0,
        r#"{"type":"leave","payload":{"room":"lobby"}}"#,
    );
    assert!(drain(&mut hub, 2).is_empty(), "alice is still a member");
    hub.tick(NOW + TYPING_TIMEOUT_MS);
    assert_eq!(drain(&mut hub, 2), [typing_frame_json("alice", false)]);
}

#[test]
fn typing_timeout_zero_never_expires() {
    let mut hub = hub_with(|config| config.typing_timeout_ms = 0);
    typing_room(&mut hub);
    send(&mut hub, 0, TYPING_ON);
    assert_eq!(drain(&mut hub, 2).len(), 1);
    hub.tick(NOW + 365 * 24 * 3600 * 1000);
    assert!(drain(&mut hub, 2).is_empty());
    assert_eq!(hub.next_deadline(), None, "nothing left to wait for");
}

#[test]
fn next_deadline_is_none_for_an_empty_hub() {
    let hub = new_hub();
    assert_eq!(hub.next_deadline(), None);
}

// ---------------------------------------------------------------------------
// presence
// ---------------------------------------------------------------------------

fn presence_users(frame: &Value) -> Vec<Value> {
    let mut users = frame["payload"]["users"]
        .as_array()
        .expect("an array")
        .clone();
    users.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    users
}

#[test]
fn presence_lists_users_with_connection_counts_without_membership() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "alice");
    connect(&mut hub, 2, "bob");
    connect(&mut hub, 3, "carol");
    for conn in 0..3 {
        join(&mut hub, conn, "lobby");
    }

    send(
        &mut hub,
        3,
        r#"{"type":"presence","id":"p1","payload":{"room":"lobby"}}"#,
    );
    let frames = drain(&mut hub, 3);
    assert_eq!(types(&frames), ["presence"]);
    assert_eq!(frames[0]["id"], "p1");
    assert_eq!(frames[0]["payload"]["room"], "lobby");
    assert_eq!(
        presence_users(&frames[0]),
        [
            json!({"id": "alice", "name": "Alice", "connections": 2}),
            json!({"id": "bob", "name": "Bob", "connections": 1}),
        ]
    );
}

#[test]
fn presence_of_an_unknown_room_is_empty() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send(
        &mut hub,
        0,
        r#"{"type":"presence","payload":{"room":"nobody-here"}}"#,
    );
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "presence", "payload": {"room": "nobody-here", "users": []}})]
    );
    assert_eq!(hub.known_room_count(), 0, "presence creates no room");
}

#[test]
fn presence_obeys_the_rooms_claim() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    join(&mut hub, 0, "lobby");
    hub.connect(1, identity_with_rooms("bob", &["team:*"]), None, NOW);
    drain(&mut hub, 1);

    send(
        &mut hub,
        1,
        r#"{"type":"presence","id":2,"payload":{"room":"lobby"}}"#,
    );
    let (code, frame) = single_error(&mut hub, 1);
    assert_eq!(code, "forbidden");
    assert_eq!(frame["id"], 2);
}

// ---------------------------------------------------------------------------
// ping
// ---------------------------------------------------------------------------

#[test]
fn ping_gets_pong_with_server_time() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send_at(&mut hub, 0, r#"{"type":"ping","id":"p"}"#, NOW + 42);
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "pong", "id": "p", "payload": {"server_time": NOW + 42}})]
    );
    send_at(&mut hub, 0, r#"{"type":"ping","payload":{}}"#, NOW + 43);
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "pong", "payload": {"server_time": NOW + 43}})]
    );
    send(&mut hub, 0, r#"{"type":"ping","id":null,"payload":null}"#);
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["pong"]);
    assert!(frames[0].get("id").is_none(), "`id: null` is no id");
}

// ---------------------------------------------------------------------------
// refresh
// ---------------------------------------------------------------------------

#[test]
fn refresh_with_same_sub_replies_refreshed_with_exp() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    let exp = NOW / 1000 + 3600;
    let token = token(TokenClaims {
        sub: "alice".into(),
        expires_at: Some(exp),
        ..TokenClaims::default()
    });
    send(&mut hub, 0, &refresh_request(&token));
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "refreshed", "id": "rf", "payload": {"exp": exp}})]
    );
    assert_eq!(hub.token_expiry(0), Some(exp));
}

#[test]
fn refresh_without_exp_replies_exp_null() {
    let mut hub = new_hub();
    hub.connect(
        0,
        Identity {
            expires_at: Some(NOW / 1000 + 10),
            ..identity("alice")
        },
        None,
        NOW,
    );
    drain(&mut hub, 0);
    let token = token(TokenClaims {
        sub: "alice".into(),
        ..TokenClaims::default()
    });
    send(&mut hub, 0, &refresh_request(&token));
    assert_eq!(
        drain(&mut hub, 0),
        [json!({"type": "refreshed", "id": "rf", "payload": {"exp": null}})]
    );
    assert_eq!(hub.token_expiry(0), None);
}

#[test]
fn refresh_with_another_sub_is_invalid_token_and_keeps_the_old_one() {
    let mut hub = new_hub();
    let old_exp = NOW / 1000 + 10;
    hub.connect(
        0,
        Identity {
            expires_at: Some(old_exp),
            ..identity("alice")
        },
        None,
        NOW,
    );
    drain(&mut hub, 0);
    let token = token(TokenClaims {
        sub: "mallory".into(),
        expires_at: Some(NOW / 1000 + 3600),
        ..TokenClaims::default()
    });
    send(&mut hub, 0, &refresh_request(&token));
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "invalid_token");
    assert_eq!(frame["id"], "rf");
    assert_eq!(hub.token_expiry(0), Some(old_exp));
}

#[test]
fn refresh_with_a_bad_token_is_invalid_token() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    let wrong_secret = sign(
        b"another secret",
        &TokenClaims {
            sub: "alice".into(),
            ..TokenClaims::default()
        },
    );
    let expired = token(TokenClaims {
        sub: "alice".into(),
        expires_at: Some(NOW / 1000),
        ..TokenClaims::default()
    });
    for bad in [
        "garbage",
        "",
        "a.b.c",
        wrong_secret.as_str(),
        expired.as_str(),
    ] {
        send(&mut hub, 0, &refresh_request(bad));
        assert_eq!(
            single_error(&mut hub, 0).0,
            "invalid_token",
            "token {bad:?}"
        );
    }
    assert_eq!(hub.token_expiry(0), None);
}

#[test]
fn refresh_applies_the_new_name_to_later_frames() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1]);

    let token = token(TokenClaims {
        sub: "alice".into(),
        name: Some("Alicia".into()),
        ..TokenClaims::default()
    });
    send(&mut hub, 0, &refresh_request(&token));
    assert_eq!(types(&drain(&mut hub, 0)), ["refreshed"]);

    send(&mut hub, 0, &message("lobby", "1"));
    let bob = drain(&mut hub, 1);
    assert_eq!(
        bob[0]["payload"]["user"],
        json!({"id": "alice", "name": "Alicia"})
    );
    send(
        &mut hub,
        1,
        r#"{"type":"presence","payload":{"room":"lobby"}}"#,
    );
    let presence = drain(&mut hub, 1);
    let users = presence_users(&presence[0]);
    assert_eq!(
        users[0],
        json!({"id": "alice", "name": "Alicia", "connections": 1})
    );
}

#[test]
fn refresh_applies_the_new_rooms_claim_to_later_requests() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "general");
    join(&mut hub, 1, "general");
    drain_all(&mut hub, &[0, 1]);

    let token = token(TokenClaims {
        sub: "alice".into(),
        rooms: Some(vec!["team:*".into()]),
        ..TokenClaims::default()
    });
    send(&mut hub, 0, &refresh_request(&token));
    assert_eq!(types(&drain(&mut hub, 0)), ["refreshed"]);

    send(&mut hub, 0, r#"{"type":"join","payload":{"room":"lobby"}}"#);
    assert_eq!(single_error(&mut hub, 0).0, "forbidden");
    join(&mut hub, 0, "team:x");

    // Current memberships stay: alice still receives general…
    send(&mut hub, 1, &message("general", "1"));
    assert_eq!(types(&drain(&mut hub, 0)), ["message"]);
    // …but naming it is now outside the claim.
    send(&mut hub, 0, &message("general", "2"));
    assert_eq!(single_error(&mut hub, 0).0, "forbidden");
}

#[test]
fn a_room_the_api_subscribed_stays_usable_after_a_refresh_narrows_the_claim() {
    let mut hub = new_hub();
    hub.connect(0, identity_with_rooms("alice", &["team:*"]), None, NOW);
    drain(&mut hub, 0);
    let body = br#"{"user":"alice","room":"ops"}"#;
    assert_eq!(
        api_result(hub.api_membership(body, true, NOW, 1)),
        Ok(r#"{"joined":1}"#.to_string())
    );
    assert_eq!(types(&drain(&mut hub, 0)), ["joined"]);
    let token = token(TokenClaims {
        sub: "alice".into(),
        rooms: Some(vec!["team:a".into()]),
        ..TokenClaims::default()
    });
    send(&mut hub, 0, &refresh_request(&token));
    assert_eq!(types(&drain(&mut hub, 0)), ["refreshed"]);
    // The backend's decision outlives the token: the room is still hers.
    send(&mut hub, 0, &message("ops", "1"));
    assert_eq!(types(&drain(&mut hub, 0)), ["message"]);
    // Until the backend takes it back: then the claim rules again.
    assert_eq!(
        api_result(hub.api_membership(body, false, NOW, 2)),
        Ok(r#"{"left":1}"#.to_string())
    );
    assert_eq!(types(&drain(&mut hub, 0)), ["left"]);
    send(&mut hub, 0, r#"{"type":"join","payload":{"room":"ops"}}"#);
    assert_eq!(single_error(&mut hub, 0).0, "forbidden");
}

// ---------------------------------------------------------------------------
// recovery
// ---------------------------------------------------------------------------

/// alice (connection 0) in `news` with 5 messages published; returns the
/// epoch and the raw text of each message frame, in seq order.
fn news_with_five_messages(hub: &mut Hub) -> (String, Vec<String>) {
    connect(hub, 0, "alice");
    let epoch = join(hub, 0, "news")["epoch"].as_str().unwrap().to_owned();
    publish(hub, 0, "news", 5);
    let sent = drain_text(hub, 0);
    assert_eq!(sent.len(), 5);
    (epoch, sent)
}

fn join_since(room: &str, since: u64, epoch: Option<&str>) -> String {
    let mut payload = json!({"room": room, "since": since});
    if let Some(epoch) = epoch {
        payload["epoch"] = json!(epoch);
    }
    json!({"type": "join", "id": "r", "payload": payload}).to_string()
}

#[test]
fn join_with_since_replays_missed_messages_before_live_ones() {
    let mut hub = new_hub();
    let (epoch, sent) = news_with_five_messages(&mut hub);
    connect(&mut hub, 1, "bob");

    send_at(&mut hub, 1, &join_since("news", 2, Some(&epoch)), NOW + 100);
    send_at(&mut hub, 0, &message("news", r#""live""#), NOW + 101);

    let texts = drain_text(&mut hub, 1);
    let frames: Vec<Value> = texts
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    assert_eq!(
        types(&frames),
        ["joined", "message", "message", "message", "message"]
    );
    let joined = &frames[0];
    assert_eq!(joined["id"], "r");
    assert_eq!(
        joined["payload"],
        json!({"room": "news", "count": 2, "seq": 5, "epoch": epoch, "recovered": true, "missed": 3})
    );
    // The replay is exactly the frames sent live at the time.
    assert_eq!(texts[1..4], sent[2..5]);
    let seqs: Vec<&Value> = frames[1..].iter().map(|f| &f["payload"]["seq"]).collect();
    assert_eq!(seqs, [3, 4, 5, 6]);
    assert_eq!(frames[1]["payload"]["ts"], NOW + 3);
    assert_eq!(frames[4]["payload"]["content"], "live");
}

#[test]
fn join_with_since_equal_to_seq_recovers_nothing_missed() {
    let mut hub = new_hub();
    let (epoch, _) = news_with_five_messages(&mut hub);
    connect(&mut hub, 1, "bob");
    send(&mut hub, 1, &join_since("news", 5, Some(&epoch)));
    let frames = drain(&mut hub, 1);
    assert_eq!(types(&frames), ["joined"]);
    assert_eq!(frames[0]["payload"]["recovered"], true);
    assert_eq!(frames[0]["payload"]["missed"], 0);
}

#[test]
fn join_with_since_beyond_seq_is_not_recovered() {
    let mut hub = new_hub();
    let (epoch, _) = news_with_five_messages(&mut hub);
    connect(&mut hub, 1, "bob");
    send(&mut hub, 1, &join_since("news", 9, Some(&epoch)));
    let frames = drain(&mut hub, 1);
    assert_eq!(types(&frames), ["joined"]);
    assert_eq!(frames[0]["payload"]["recovered"], false);
    assert_eq!(frames[0]["payload"]["missed"], 0);
    assert_eq!(frames[0]["payload"]["seq"], 5);
}

#[test]
fn join_with_another_epoch_replays_nothing() {
    let mut hub = new_hub();
    let (epoch, _) = news_with_five_messages(&mut hub);
    connect(&mut hub, 1, "bob");
    send(&mut hub, 1, &join_since("news", 2, Some("an-old-epoch")));
    let frames = drain(&mut hub, 1);
    assert_eq!(types(&frames), ["joined"]);
    let payload = &frames[0]["payload"];
    assert_eq!(payload["recovered"], false);
    assert_eq!(payload["missed"], 0);
    assert_eq!(payload["epoch"], epoch.as_str());
    assert_eq!(payload["seq"], 5);
}

#[test]
fn join_without_since_has_no_recovery_keys() {
    let mut hub = new_hub();
    let (epoch, _) = news_with_five_messages(&mut hub);
    connect(&mut hub, 1, "bob");
    // `epoch` without `since` is ignored.
    for request in [
        r#"{"type":"join","payload":{"room":"news"}}"#.to_owned(),
        json!({"type": "join", "payload": {"room": "news", "epoch": epoch}}).to_string(),
        json!({"type": "join", "payload": {"room": "news", "epoch": "stale"}}).to_string(),
    ] {
        send(&mut hub, 1, &request);
        let frames = drain(&mut hub, 1);
        assert_eq!(types(&frames), ["joined"], "{request}");
        let payload = &frames[0]["payload"];
        assert!(payload.get("recovered").is_none(), "{request}");
        assert!(payload.get("missed").is_none(), "{request}");
        assert_eq!(payload["seq"], 5);
    }
}

#[test]
fn join_with_since_and_no_epoch_means_the_current_epoch() {
    let mut hub = new_hub();
    news_with_five_messages(&mut hub);
    // A member rejoining with since also gets the replay.
    send(&mut hub, 0, &join_since("news", 4, None));
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["joined", "message"]);
    assert_eq!(frames[0]["payload"]["recovered"], true);
    assert_eq!(frames[0]["payload"]["missed"], 1);
    assert_eq!(frames[1]["payload"]["seq"], 5);
}

#[test]
fn join_with_since_past_the_history_cap_replays_what_is_held() {
    let mut hub =
        hub_with(|config| config.namespaces = std::sync::Arc::new(crate::hub::Namespaces::none(3)));
    let (epoch, _) = news_with_five_messages(&mut hub);
    connect(&mut hub, 1, "bob");

    send(&mut hub, 1, &join_since("news", 0, Some(&epoch)));
    let frames = drain(&mut hub, 1);
    assert_eq!(types(&frames), ["joined", "message", "message", "message"]);
    assert_eq!(frames[0]["payload"]["recovered"], false);
    assert_eq!(frames[0]["payload"]["missed"], 3);
    let seqs: Vec<&Value> = frames[1..].iter().map(|f| &f["payload"]["seq"]).collect();
    assert_eq!(seqs, [3, 4, 5]);

    // Everything after seq 2 is still held: recovered.
    send(&mut hub, 1, &join_since("news", 2, Some(&epoch)));
    let frames = drain(&mut hub, 1);
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[0]["payload"]["recovered"], true);
    assert_eq!(frames[0]["payload"]["missed"], 3);
}

// ---------------------------------------------------------------------------
// rooms without members
// ---------------------------------------------------------------------------

#[test]
fn empty_room_keeps_seq_and_epoch_for_five_minutes_then_is_forgotten() {
    const MINUTE: Millis = 60_000;
    let mut hub = new_hub();
    let (epoch, _) = news_with_five_messages(&mut hub);
    send(&mut hub, 0, r#"{"type":"leave","payload":{"room":"news"}}"#);
    assert_eq!(hub.occupied_room_count(), 0);
    assert_eq!(hub.known_room_count(), 1);

    // Back after four minutes: same life of the room.
    let back = NOW + 4 * MINUTE;
    hub.tick(back);
    assert_eq!(hub.known_room_count(), 1);
    connect(&mut hub, 1, "bob");
    send_at(
        &mut hub,
        1,
        r#"{"type":"join","payload":{"room":"news"}}"#,
        back,
    );
    let joined = drain(&mut hub, 1);
    assert_eq!(joined[0]["payload"]["seq"], 5);
    assert_eq!(joined[0]["payload"]["epoch"], epoch.as_str());

    // The first leave's deadline passes while bob is there: nothing happens.
    hub.tick(NOW + EMPTY_ROOM_TTL_MS + MINUTE);
    assert_eq!(hub.known_room_count(), 1);

    // Empty again: the clock restarts from this leave.
    let left = NOW + 6 * MINUTE;
    send_at(
        &mut hub,
        1,
        r#"{"type":"leave","payload":{"room":"news"}}"#,
        left,
    );
    assert_eq!(types(&drain(&mut hub, 1)), ["left"]);
    hub.tick(left + EMPTY_ROOM_TTL_MS - 1);
    assert_eq!(hub.known_room_count(), 1);
    hub.tick(left + EMPTY_ROOM_TTL_MS);
    assert_eq!(hub.known_room_count(), 0);

    send_at(
        &mut hub,
        1,
        r#"{"type":"join","payload":{"room":"news"}}"#,
        left + EMPTY_ROOM_TTL_MS,
    );
    let joined = drain(&mut hub, 1);
    assert_eq!(joined[0]["payload"]["seq"], 0);
    assert_ne!(joined[0]["payload"]["epoch"], epoch.as_str());
    assert!(joined[0]["payload"]["epoch"].is_string());
}

#[test]
fn recovery_into_a_forgotten_room_is_not_recovered() {
    let mut hub = new_hub();
    let (epoch, _) = news_with_five_messages(&mut hub);
    hub.disconnect(0, NOW + 10);
    hub.tick(NOW + 10 + EMPTY_ROOM_TTL_MS);
    assert_eq!(hub.known_room_count(), 0);

    connect(&mut hub, 1, "bob");
    send(&mut hub, 1, &join_since("news", 5, Some(&epoch)));
    let frames = drain(&mut hub, 1);
    assert_eq!(types(&frames), ["joined"]);
    assert_eq!(frames[0]["payload"]["recovered"], false);
    assert_eq!(frames[0]["payload"]["missed"], 0);
    assert_eq!(frames[0]["payload"]["seq"], 0);
}

// ---------------------------------------------------------------------------
// too_many_rooms
// ---------------------------------------------------------------------------

#[test]
fn too_many_rooms_at_the_per_connection_limit() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    for room in ["a", "b", "c"] {
        join(&mut hub, 0, room);
    }
    send(
        &mut hub,
        0,
        r#"{"type":"join","id":"4th","payload":{"room":"d"}}"#,
    );
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "too_many_rooms");
    assert_eq!(frame["id"], "4th");
    assert_eq!(hub.known_room_count(), 3, "the refused room is not created");

    // Rejoining a room already held at the cap is fine.
    join(&mut hub, 0, "b");

    // The limit is per connection: another tab of the same user may join.
    connect(&mut hub, 1, "alice");
    join(&mut hub, 1, "d");

    // Leaving frees a place.
    send(&mut hub, 0, r#"{"type":"leave","payload":{"room":"c"}}"#);
    drain(&mut hub, 0);
    join(&mut hub, 0, "d");
}

// ---------------------------------------------------------------------------
// parse errors
// ---------------------------------------------------------------------------

#[test]
fn invalid_json_gets_invalid_json_without_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    for text in ["not json", r#"{"type":"ping","id":"x""#, ""] {
        send(&mut hub, 0, text);
        let (code, frame) = single_error(&mut hub, 0);
        assert_eq!(code, "invalid_json", "{text:?}");
        assert!(frame.get("id").is_none());
    }
}

#[test]
fn invalid_message_echoes_a_readable_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    for text in [
        r#"{"id":"j","payload":{"room":"lobby"}}"#,
        r#"{"type":5,"id":"j"}"#,
        r#"{"type":"join","id":"j","payload":{"room":5}}"#,
        r#"{"type":"join","id":"j"}"#,
        r#"{"type":"join","id":"j","payload":{"room":"a","since":-1}}"#,
        r#"{"type":"join","id":"j","payload":{"room":"a","since":1,"epoch":3}}"#,
        r#"{"type":"message","id":"j","payload":{"room":"a"}}"#,
        r#"{"type":"unknown","id":"j","payload":[1]}"#,
    ] {
        send(&mut hub, 0, text);
        let (code, frame) = single_error(&mut hub, 0);
        assert_eq!(code, "invalid_message", "{text}");
        assert_eq!(frame["id"], "j", "{text}");
    }
}

#[test]
fn invalid_message_without_a_readable_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    let long_id = "x".repeat(257);
    for text in [
        "[1,2]".to_owned(),
        "\"ping\"".to_owned(),
        r#"{"type":"ping","id":true}"#.to_owned(),
        r#"{"type":"ping","id":{"a":1}}"#.to_owned(),
        r#"{"type":"nope","id":[1]}"#.to_owned(),
        format!(r#"{{"type":"ping","id":"{long_id}"}}"#),
    ] {
        send(&mut hub, 0, &text);
        let (code, frame) = single_error(&mut hub, 0);
        assert_eq!(code, "invalid_message", "{text}");
        assert!(frame.get("id").is_none(), "{text}");
    }
}

#[test]
fn unknown_type_echoes_the_id() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send(&mut hub, 0, r#"{"type":"Ping","id":3}"#);
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "unknown_type");
    assert_eq!(frame["id"], 3);
    send(&mut hub, 0, r#"{"type":"subscribe","id":"s"}"#);
    let (code, frame) = single_error(&mut hub, 0);
    assert_eq!(code, "unknown_type");
    assert_eq!(frame["id"], "s");
}

#[test]
fn errors_keep_the_connection_usable() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    send(&mut hub, 0, "{");
    send(&mut hub, 0, r#"{"type":"what"}"#);
    send(&mut hub, 0, r#"{"type":"ping","id":1}"#);
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["error", "error", "pong"]);
    assert!(closes(&mut hub).is_empty());
    assert_eq!(hub.metrics().messages_received, 3);
}

// ---------------------------------------------------------------------------
// slow consumers
// ---------------------------------------------------------------------------

const SMALL_MARKS: Marks = Marks {
    soft: 200,
    hard: 1000,
};

/// alice (0), bob (1) and carol (2) in `lobby`; alice keeps publishing until
/// bob, who reads nothing, is above the soft mark. Returns the seqs bob holds.
fn bob_above_soft(hub: &mut Hub) -> u64 {
    for (conn, name) in [(0, "alice"), (1, "bob"), (2, "carol")] {
        connect(hub, conn, name);
        join(hub, conn, "lobby");
    }
    drain_all(hub, &[0, 1, 2]);
    let mut published = 0;
    while hub.outbound_mut(1).unwrap().len() <= SMALL_MARKS.soft {
        published += 1;
        assert!(published < 20, "bob should pass the soft mark");
        send(hub, 0, &message("lobby", r#""some text""#));
        drain_all(hub, &[0, 2]);
    }
    assert_eq!(hub.metrics().messages_dropped, 0);
    published
}

#[test]
fn above_the_soft_mark_broadcasts_are_dropped_but_replies_are_queued() {
    let mut hub = hub_with(|config| config.marks = SMALL_MARKS);
    let held = bob_above_soft(&mut hub);
    let queued = hub.outbound_mut(1).unwrap().len();
    let dropped = hub.metrics().messages_dropped;

    let mut carol = Vec::new();
    for _ in 0..3 {
        send(&mut hub, 0, &message("lobby", r#""more""#));
        drain(&mut hub, 0);
        carol.extend(drain(&mut hub, 2));
    }
    send(&mut hub, 0, TYPING_ON);
    carol.extend(drain(&mut hub, 2));
    assert_eq!(hub.outbound_mut(1).unwrap().len(), queued, "nothing queued");
    assert_eq!(hub.metrics().messages_dropped, dropped + 4);
    // `/api/users` shows the connection's own count (§14.3) and its queue.
    let bob = hub.connections_of("bob");
    assert_eq!(bob.first().map(|c| c.dropped), Some(4));
    assert_eq!(bob.first().map(|c| c.queued_bytes), Some(queued));
    assert_eq!(
        hub.connections_of("alice").first().map(|c| c.dropped),
        Some(0)
    );
    assert_eq!(
        types(&carol),
        ["message", "message", "message", "typing"],
        "others are unaffected"
    );

    // Its own requests are still answered.
    send(&mut hub, 1, r#"{"type":"ping","id":"p"}"#);
    let bob = peek(&mut hub, 1);
    assert_eq!(bob.last().unwrap()["type"], "pong");
    // What it holds is the first messages, in order, then the gap.
    let seqs: Vec<u64> = bob
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["payload"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=held).collect::<Vec<_>>());
    let mut closes = Vec::new();
    hub.take_closes(&mut closes);
    assert!(closes.is_empty());
}

#[test]
fn crossing_the_hard_mark_closes_with_4000_and_leaves_the_rooms() {
    let mut hub = hub_with(|config| config.marks = SMALL_MARKS);
    bob_above_soft(&mut hub);
    let mut closes = Vec::new();
    let direct =
        json!({"type": "direct", "payload": {"to": "bob", "content": "x".repeat(150)}}).to_string();
    let mut sent = 0;
    while closes.is_empty() {
        sent += 1;
        assert!(sent < 20, "bob should cross the hard mark");
        let before = hub.outbound_mut(1).unwrap().len();
        send(&mut hub, 0, &direct);
        hub.take_closes(&mut closes);
        if closes.is_empty() {
            assert!(
                hub.outbound_mut(1).unwrap().len() > before,
                "direct is never dropped"
            );
        }
    }
    assert_eq!(
        closes,
        [CloseRequest {
            conn: 1,
            code: 4000,
            reason: "slow consumer"
        }]
    );
    assert!(
        hub.outbound_mut(1).unwrap().is_empty(),
        "what was queued is discarded"
    );
    assert_eq!(hub.metrics().slow_consumers_closed, 1);

    // bob left the room: the others hear it.
    let left =
        json!({"type": "user_left", "payload": {"room": "lobby", "user": user("bob"), "count": 2}});
    assert!(drain(&mut hub, 0).contains(&left));
    assert_eq!(drain(&mut hub, 2), [left]);

    // Nothing more is queued to bob, and bob's frames are ignored.
    send(&mut hub, 0, &message("lobby", "1"));
    send(&mut hub, 1, r#"{"type":"ping"}"#);
    assert!(hub.outbound_mut(1).unwrap().is_empty());
    send(
        &mut hub,
        2,
        r#"{"type":"presence","payload":{"room":"lobby"}}"#,
    );
    let presence = drain(&mut hub, 2);
    let ids: Vec<&Value> = presence
        .iter()
        .filter(|f| f["type"] == "presence")
        .flat_map(|f| f["payload"]["users"].as_array().unwrap())
        .map(|u| &u["id"])
        .collect();
    assert!(!ids.contains(&&json!("bob")), "{ids:?}");

    // The close is decided once; the shell releases the socket later.
    hub.take_closes(&mut closes);
    assert_eq!(closes.len(), 1);
    assert_eq!(hub.connection_count(), 3);
    hub.release(1, NOW);
    assert_eq!(hub.connection_count(), 2);
}

#[test]
fn lagged_follows_once_a_slow_consumer_drains() {
    let mut hub = hub_with(|config| config.marks = SMALL_MARKS);
    let held = bob_above_soft(&mut hub);
    for _ in 0..3 {
        send(&mut hub, 0, &message("lobby", r#""dropped""#));
    }
    hub.drained(1);
    assert!(
        !types(&peek(&mut hub, 1)).contains(&"lagged"),
        "no notice while still above the soft mark"
    );
    // The shell writes bob's queue out; it is back under the soft mark.
    hub.outbound_mut(1).unwrap().clear();
    hub.drained(1);
    let bob = drain(&mut hub, 1);
    assert_eq!(
        bob,
        [
            json!({"type": "lagged", "payload": {"room": "lobby", "from_seq": held + 1, "to_seq": held + 3}})
        ]
    );
    hub.drained(1);
    assert!(drain(&mut hub, 1).is_empty(), "one notice per gap");
    send(&mut hub, 0, &message("lobby", r#""after""#));
    assert_eq!(types(&drain(&mut hub, 1)), ["message"]);
}

#[test]
fn no_lagged_for_a_room_the_connection_left() {
    let mut hub = hub_with(|config| config.marks = SMALL_MARKS);
    bob_above_soft(&mut hub);
    send(&mut hub, 0, &message("lobby", r#""dropped""#));
    send(
        &mut hub,
        1,
        r#"{"type":"leave","payload":{"room":"lobby"}}"#,
    );
    hub.outbound_mut(1).unwrap().clear();
    hub.drained(1);
    assert!(drain(&mut hub, 1).is_empty());
}

// ---------------------------------------------------------------------------
// heartbeat, token expiry, rate limit
// ---------------------------------------------------------------------------

/// Whether the connection's queue holds a server ping.
fn has_ping(hub: &mut Hub, conn: ConnId) -> bool {
    hub.outbound_mut(conn)
        .unwrap()
        .to_vec()
        .windows(2)
        .any(|w| w == [0x89, 0x00])
}

#[test]
fn a_silent_connection_is_pinged_then_closed_with_1011() {
    let mut hub = hub_with(|config| {
        config.heartbeat_ms = 1000;
        config.pong_timeout_ms = 500;
    });
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    drain_all(&mut hub, &[0, 1]);
    assert_eq!(hub.next_deadline(), Some(NOW + 1000));
    hub.tick(NOW + 999);
    assert!(!has_ping(&mut hub, 0));
    hub.tick(NOW + 1000);
    assert!(has_ping(&mut hub, 0) && has_ping(&mut hub, 1));
    drain_all(&mut hub, &[0, 1]);
    // alice answers (any frame counts); bob stays silent.
    hub.saw_activity(0, NOW + 1200);
    hub.tick(NOW + 1500);
    assert_eq!(
        closes(&mut hub),
        [CloseRequest {
            conn: 1,
            code: 1011,
            reason: "no answer to ping"
        }]
    );
    // alice's next ping comes a heartbeat after the previous one.
    hub.tick(NOW + 1999);
    assert!(!has_ping(&mut hub, 0));
    hub.tick(NOW + 2000);
    assert!(has_ping(&mut hub, 0));
    assert!(!has_ping(&mut hub, 1), "a closed connection is not pinged");
}

#[test]
fn pings_come_every_heartbeat_even_with_a_longer_pong_timeout() {
    let mut hub = hub_with(|config| {
        config.heartbeat_ms = 100;
        config.pong_timeout_ms = 1000;
    });
    connect(&mut hub, 0, "alice");
    for beat in 1..=5 {
        hub.tick(NOW + beat * 100);
        assert!(has_ping(&mut hub, 0), "ping {beat}");
        drain(&mut hub, 0);
        hub.saw_activity(0, NOW + beat * 100 + 1);
    }
    // The deadlines of the five answered pings (1100..1500) pass quietly.
    hub.tick(NOW + 1500);
    assert!(closes(&mut hub).is_empty(), "every ping was answered");
    // That tick also sent the next ping (due since 600); it is never answered.
    hub.tick(NOW + 2500);
    assert_eq!(closes(&mut hub)[0].code, 1011);
}

#[test]
fn a_heartbeat_of_zero_sends_no_pings() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    drain(&mut hub, 0);
    hub.tick(NOW + 3_600_000);
    assert!(!has_ping(&mut hub, 0));
    assert!(closes(&mut hub).is_empty());
}

#[test]
fn an_expired_token_closes_with_4001_unless_refreshed() {
    let mut hub = new_hub();
    let expires = NOW / 1000 + 60;
    let mut alice = identity("alice");
    alice.expires_at = Some(expires);
    hub.connect(0, alice, None, NOW);
    let mut bob = identity("bob");
    bob.expires_at = Some(expires);
    hub.connect(1, bob, None, NOW);
    drain_all(&mut hub, &[0, 1]);
    let later = token(TokenClaims {
        sub: "alice".into(),
        expires_at: Some(expires + 3600),
        ..Default::default()
    });
    send(
        &mut hub,
        0,
        &format!(r#"{{"type":"refresh","payload":{{"token":"{later}"}}}}"#),
    );
    assert_eq!(types(&drain(&mut hub, 0)), ["refreshed"]);
    hub.tick(expires * 1000 - 1);
    assert!(closes(&mut hub).is_empty(), "not before exp");
    hub.tick(expires * 1000);
    assert_eq!(
        closes(&mut hub),
        [CloseRequest {
            conn: 1,
            code: 4001,
            reason: "token expired"
        }]
    );
    hub.tick((expires + 3600) * 1000);
    assert_eq!(
        closes(&mut hub)[0].code,
        4001,
        "the refreshed token expires too"
    );
}

#[test]
fn over_the_rate_messages_are_refused_and_a_flood_is_closed() {
    let mut hub = hub_with(|config| {
        config.rate_limit = 10;
        config.rate_burst = 3;
    });
    connect(&mut hub, 0, "alice");
    join(&mut hub, 0, "lobby");
    drain(&mut hub, 0);
    // The join took one of the three tokens.
    for i in 0..2 {
        send(&mut hub, 0, &format!(r#"{{"type":"ping","id":{i}}}"#));
    }
    assert_eq!(types(&drain(&mut hub, 0)), ["pong", "pong"]);
    send(
        &mut hub,
        0,
        r#"{"type":"message","id":"m","payload":{"room":"lobby","content":1}}"#,
    );
    let refused = drain(&mut hub, 0);
    assert_eq!(refused[0]["type"], "error");
    assert_eq!(refused[0]["id"], "m");
    assert_eq!(refused[0]["payload"]["code"], "rate_limited");
    // A tenth of a second later one token is back.
    send_at(&mut hub, 0, r#"{"type":"ping"}"#, NOW + 100);
    assert_eq!(types(&drain(&mut hub, 0)), ["pong"]);
    // 2 × burst refusals in a row close the connection with 1008.
    for _ in 0..5 {
        send_at(&mut hub, 0, r#"{"type":"ping"}"#, NOW + 100);
    }
    assert!(closes(&mut hub).is_empty());
    send_at(&mut hub, 0, r#"{"type":"ping"}"#, NOW + 100);
    assert_eq!(closes(&mut hub)[0].code, 1008);
    // The refused message took no seq.
    connect(&mut hub, 1, "bob");
    assert_eq!(join(&mut hub, 1, "lobby")["seq"], 0);
}

// ---------------------------------------------------------------------------
// disconnect and release
// ---------------------------------------------------------------------------

#[test]
fn disconnect_removes_memberships_and_the_user() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 0, "news");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1]);
    assert_eq!(hub.connection_count(), 2);
    assert_eq!(hub.occupied_room_count(), 2);

    hub.disconnect(0, NOW);
    assert_eq!(
        drain(&mut hub, 1),
        [
            json!({"type": "user_left", "payload": {"room": "lobby", "user": user("alice"), "count": 1}})
        ]
    );
    assert_eq!(hub.occupied_room_count(), 1, "news is empty now");

    // alice is gone as a user and as a member.
    send(
        &mut hub,
        1,
        r#"{"type":"direct","payload":{"to":"alice","content":1}}"#,
    );
    assert_eq!(single_error(&mut hub, 1).0, "user_offline");
    send(
        &mut hub,
        1,
        r#"{"type":"presence","payload":{"room":"lobby"}}"#,
    );
    let presence = drain(&mut hub, 1);
    assert_eq!(
        presence_users(&presence[0]),
        [json!({"id": "bob", "name": "Bob", "connections": 1})]
    );
    send(&mut hub, 1, &message("lobby", "1"));
    assert!(hub.outbound_mut(0).unwrap().is_empty());

    // Frames from a disconnected connection are ignored.
    send(&mut hub, 0, r#"{"type":"ping"}"#);
    assert!(hub.outbound_mut(0).unwrap().is_empty());

    // Idempotent.
    drain(&mut hub, 1);
    hub.disconnect(0, NOW);
    assert!(drain(&mut hub, 1).is_empty());
    assert_eq!(hub.occupied_room_count(), 1);

    // The queue lives until release.
    assert_eq!(hub.connection_count(), 2);
    hub.release(0, NOW);
    assert_eq!(hub.connection_count(), 1);
    assert!(hub.outbound_mut(0).is_none());
    hub.release(0, NOW);
    hub.disconnect(0, NOW);
    assert_eq!(hub.connection_count(), 1);

    hub.release(1, NOW);
    assert_eq!(hub.connection_count(), 0);
    assert_eq!(hub.occupied_room_count(), 0);
}

#[test]
fn disconnecting_one_tab_keeps_the_user_online() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "alice");
    connect(&mut hub, 2, "bob");
    hub.release(0, NOW);
    send(
        &mut hub,
        2,
        r#"{"type":"direct","id":1,"payload":{"to":"alice","content":1}}"#,
    );
    assert_eq!(types(&drain(&mut hub, 2)), ["ack"]);
    assert_eq!(types(&drain(&mut hub, 1)), ["direct"]);
}

#[test]
fn a_released_slot_can_be_reused() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    join(&mut hub, 0, "lobby");
    hub.release(0, NOW);
    connect(&mut hub, 0, "bob");
    assert_eq!(hub.connection_count(), 1);
    let joined = join(&mut hub, 0, "lobby");
    assert_eq!(joined["count"], 1, "alice is gone");
}

// ---------------------------------------------------------------------------
// dirty list
// ---------------------------------------------------------------------------

#[test]
fn take_dirty_lists_each_connection_with_queued_bytes_once() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    connect(&mut hub, 2, "carol");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1, 2]);
    let mut dirty = Vec::new();
    hub.take_dirty(&mut dirty);
    dirty.clear();

    for i in 0..3 {
        send(&mut hub, 0, &message("lobby", &i.to_string()));
    }
    settle_backplane(&mut hub);
    hub.take_dirty(&mut dirty);
    dirty.sort_unstable();
    assert_eq!(dirty, [0, 1], "once each, and not carol");

    dirty.clear();
    hub.take_dirty(&mut dirty);
    assert!(dirty.is_empty(), "nothing new");

    // Queued again while still holding bytes: listed again.
    send(&mut hub, 2, r#"{"type":"ping"}"#);
    hub.take_dirty(&mut dirty);
    assert_eq!(dirty, [2]);

    // The shell queued bytes itself (a WebSocket pong).
    dirty.clear();
    drain(&mut hub, 2);
    hub.mark_dirty(2);
    hub.take_dirty(&mut dirty);
    assert!(dirty.is_empty(), "an empty queue is not dirty");
    hub.outbound_mut(2)
        .unwrap()
        .push(Bytes::from_static(&[0x8a, 0x00]));
    hub.mark_dirty(2);
    hub.mark_dirty(2);
    hub.take_dirty(&mut dirty);
    assert_eq!(dirty, [2]);
}

// ---------------------------------------------------------------------------
// metrics
// ---------------------------------------------------------------------------

#[test]
fn metrics_count_received_and_sent_frames() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    let before = hub.metrics().clone();
    send(&mut hub, 0, &message("lobby", "1"));
    settle_backplane(&mut hub);
    assert_eq!(
        hub.metrics().messages_received,
        before.messages_received + 1
    );
    assert_eq!(hub.metrics().messages_sent, before.messages_sent + 2);
    assert_eq!(hub.metrics().messages_dropped, 0);
}

// ---------------------------------------------------------------------------
// membership bookkeeping under churn
// ---------------------------------------------------------------------------

#[test]
fn membership_stays_consistent_under_churn() {
    const CONNS: usize = 8;
    const ROOMS: [&str; 3] = ["r0", "r1", "r2"];
    let user_of = |conn: usize| format!("u{}", conn % 3);
    let mut hub = new_hub();
    // The model: which rooms each open connection is in.
    let mut open: Vec<Option<Vec<&str>>> = vec![None; CONNS];
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |bound: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % bound as u64) as usize
    };

    for step in 0..400 {
        let conn = next(CONNS);
        let room = ROOMS[next(ROOMS.len())];
        match &mut open[conn] {
            None => {
                hub.connect(conn, identity(&user_of(conn)), None, NOW);
                open[conn] = Some(Vec::new());
            }
            Some(rooms) => match next(5) {
                0 => {
                    hub.release(conn, NOW);
                    open[conn] = None;
                }
                1 | 2 if rooms.contains(&room) => {
                    send(
                        &mut hub,
                        conn,
                        &json!({"type": "leave", "payload": {"room": room}}).to_string(),
                    );
                    rooms.retain(|r| *r != room);
                }
                _ => {
                    send(
                        &mut hub,
                        conn,
                        &json!({"type": "join", "payload": {"room": room}}).to_string(),
                    );
                    if !rooms.contains(&room) {
                        rooms.push(room);
                    }
                }
            },
        }
        let members = |room: &str| -> Vec<usize> {
            (0..CONNS)
                .filter(|&c| open[c].as_ref().is_some_and(|rooms| rooms.contains(&room)))
                .collect()
        };
        if let Err(broken) = hub.check_invariants() {
            panic!("step {step}: {broken}");
        }
        assert_eq!(
            hub.connection_count(),
            open.iter().flatten().count(),
            "step {step}"
        );
        assert_eq!(
            hub.occupied_room_count(),
            ROOMS.iter().filter(|r| !members(r).is_empty()).count(),
            "step {step}"
        );
        for c in (0..CONNS).filter(|&c| open[c].is_some()) {
            drain(&mut hub, c);
        }
        for room in ROOMS {
            let members = members(room);
            let Some(&sender) = members.first() else {
                continue;
            };
            send(&mut hub, sender, &message(room, &step.to_string()));
            for c in (0..CONNS).filter(|&c| open[c].is_some()) {
                let got = drain(&mut hub, c);
                let expected = if members.contains(&c) { 1 } else { 0 };
                assert_eq!(
                    got.len(),
                    expected,
                    "step {step}, room {room}, conn {c}: {got:?}"
                );
            }
            // presence: distinct users with their connection counts
            send(
                &mut hub,
                sender,
                &json!({"type": "presence", "payload": {"room": room}}).to_string(),
            );
            let presence = drain(&mut hub, sender);
            let mut expected: Vec<Value> = Vec::new();
            for u in 0..3 {
                let n = members.iter().filter(|&&c| c % 3 == u).count();
                if n > 0 {
                    let id = format!("u{u}");
                    expected.push(json!({"id": id, "name": identity(&id).name, "connections": n}));
                }
            }
            assert_eq!(
                presence_users(&presence[0]),
                expected,
                "step {step}, room {room}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// server API (§6)
// ---------------------------------------------------------------------------

#[test]
fn api_publish_to_a_room_comes_from_the_server_user_and_takes_a_seq() {
    let mut hub = new_hub();
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "lobby");
    join(&mut hub, 1, "lobby");
    drain_all(&mut hub, &[0, 1]);
    let answer =
        api_result(hub.api_publish(br#"{"room":"lobby","content":{"n":1}}"#, NOW + 5, 0)).unwrap();
    assert_eq!(answer, r#"{"delivered":2,"seq":1}"#);
    for conn in [0, 1] {
        let frames = drain(&mut hub, conn);
        assert_eq!(
            frames,
            [
                json!({"type": "message", "payload": {"room": "lobby", "user": {"id": "server", "name": "server"}, "content": {"n": 1}, "seq": 1, "ts": NOW + 5}})
            ]
        );
    }
}

#[test]
fn api_publish_to_an_empty_room_enters_its_history() {
    let mut hub = new_hub();
    let answer =
        api_result(hub.api_publish(br#"{"room":"later","content":"early"}"#, NOW, 0)).unwrap();
    assert_eq!(answer, r#"{"delivered":0,"seq":1}"#);
    connect(&mut hub, 0, "alice");
    send(
        &mut hub,
        0,
        r#"{"type":"join","payload":{"room":"later","since":0}}"#,
    );
    let frames = drain(&mut hub, 0);
    assert_eq!(frames[0]["payload"]["missed"], 1);
    assert_eq!(frames[1]["payload"]["content"], "early");
}

#[test]
fn api_publish_to_a_user_is_a_direct_from_the_server() {
    let mut hub = new_hub();
    hub.connect(0, identity("bob"), None, NOW);
    hub.connect(1, identity("bob"), None, NOW);
    drain_all(&mut hub, &[0, 1]);
    let answer = api_result(hub.api_publish(br#"{"user":"bob","content":null}"#, NOW, 0)).unwrap();
    assert_eq!(answer, r#"{"delivered":2}"#);
    assert_eq!(
        drain(&mut hub, 1),
        [
            json!({"type": "direct", "payload": {"from": {"id": "server", "name": "server"}, "content": null, "ts": NOW}})
        ]
    );
    assert_eq!(
        api_result(hub.api_publish(br#"{"user":"nobody","content":1}"#, NOW, 0)).unwrap(),
        r#"{"delivered":0}"#
    );
}

#[test]
fn api_publish_refuses_bad_bodies() {
    let mut hub = new_hub();
    for body in [
        &br#"{"room":"bad room","content":1}"#[..],
        br#"{"room":"a","user":"b","content":1}"#,
        br#"{"room":"a"}"#,
        b"not json",
    ] {
        assert!(api_result(hub.api_publish(body, NOW, 0)).is_err());
    }
    assert_eq!(hub.known_room_count(), 0, "nothing was created");
}

#[test]
fn api_disconnect_closes_every_connection_of_the_user_with_4003() {
    let mut hub = new_hub();
    hub.connect(0, identity("bob"), None, NOW);
    hub.connect(1, identity("bob"), None, NOW);
    connect(&mut hub, 2, "alice");
    assert_eq!(
        api_result(hub.api_disconnect(br#"{"user":"bob"}"#, NOW, 0)).unwrap(),
        r#"{"closed":2}"#
    );
    let codes: Vec<(ConnId, u16)> = closes(&mut hub).iter().map(|c| (c.conn, c.code)).collect();
    assert_eq!(codes, [(0, 4003), (1, 4003)]);
    assert_eq!(
        api_result(hub.api_disconnect(br#"{"user":"bob"}"#, NOW, 0)).unwrap(),
        r#"{"closed":0}"#
    );
    assert!(api_result(hub.api_disconnect(br#"{"name":"bob"}"#, NOW, 0)).is_err());
    hub.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------
// --state-file: export and import
// ---------------------------------------------------------------------------

#[test]
fn rooms_survive_export_and_import_for_recovery() {
    let mut hub = new_hub();
    let (epoch, _) = news_with_five_messages(&mut hub);
    let saved = hub.export_rooms();
    let mut restarted = new_hub();
    restarted.import_rooms(saved, NOW + 60_000);
    restarted.connect(0, identity("carol"), None, NOW + 60_000);
    drain(&mut restarted, 0);
    send(
        &mut restarted,
        0,
        &json!({"type": "join", "payload": {"room": "news", "since": 2, "epoch": epoch}})
            .to_string(),
    );
    let frames = drain(&mut restarted, 0);
    assert_eq!(frames[0]["payload"]["recovered"], true);
    assert_eq!(frames[0]["payload"]["missed"], 3);
    assert_eq!(frames[0]["payload"]["epoch"], epoch.as_str());
    let seqs: Vec<u64> = frames[1..]
        .iter()
        .map(|f| f["payload"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 4, 5]);
    restarted.check_invariants().unwrap();
}

/// A server API answer as the tests read it: the `200` JSON, or the `400` text.
fn api_result(answer: Option<ApiAnswer>) -> Result<String, String> {
    match answer {
        Some(ApiAnswer::Ok(json)) => Ok(json),
        Some(ApiAnswer::BadRequest(message)) => Err(message),
        other => panic!("a local hub answers at once: {other:?}"),
    }
}

/// Every test of this suite again, over a backplane that answers later (as
/// Redis does, or a room's authority on another loop): the rules must give
/// the same frames in the same order. The tests listed in `LOCAL_ONLY` look
/// at what only an answer at once can show.
#[test]
fn the_rules_hold_when_the_backplane_answers_later() {
    let tests: &[(&str, fn())] = &[
        (
            "a_read_only_namespace_refuses_client_messages_but_not_the_server_api",
            a_read_only_namespace_refuses_client_messages_but_not_the_server_api,
        ),
        (
            "without_member_events_members_hear_no_joins_or_leaves_but_counts_hold",
            without_member_events_members_hear_no_joins_or_leaves_but_counts_hold,
        ),
        (
            "max_members_counts_users_and_refuses_one_more_with_room_full",
            max_members_counts_users_and_refuses_one_more_with_room_full,
        ),
        (
            "a_namespace_keeps_its_own_history",
            a_namespace_keeps_its_own_history,
        ),
        (
            "welcome_carries_connection_id_user_heartbeat_and_server_time",
            welcome_carries_connection_id_user_heartbeat_and_server_time,
        ),
        (
            "connect_after_queues_the_upgrade_response_ahead_of_welcome",
            connect_after_queues_the_upgrade_response_ahead_of_welcome,
        ),
        (
            "join_replies_joined_with_count_seq_epoch_and_string_id",
            join_replies_joined_with_count_seq_epoch_and_string_id,
        ),
        ("join_echoes_a_numeric_id", join_echoes_a_numeric_id),
        ("join_without_id_has_no_id", join_without_id_has_no_id),
        ("second_join_is_idempotent", second_join_is_idempotent),
        (
            "join_rejects_invalid_room_names",
            join_rejects_invalid_room_names,
        ),
        (
            "join_outside_rooms_claim_is_forbidden",
            join_outside_rooms_claim_is_forbidden,
        ),
        (
            "empty_rooms_claim_allows_no_room",
            empty_rooms_claim_allows_no_room,
        ),
        (
            "connect_with_room_sends_welcome_then_joined",
            connect_with_room_sends_welcome_then_joined,
        ),
        (
            "connect_with_invalid_room_sends_error_and_stays_usable",
            connect_with_invalid_room_sends_error_and_stays_usable,
        ),
        (
            "connect_with_room_outside_claim_is_forbidden",
            connect_with_room_outside_claim_is_forbidden,
        ),
        (
            "user_joined_goes_to_others_not_the_joiner",
            user_joined_goes_to_others_not_the_joiner,
        ),
        (
            "second_tab_of_a_user_is_not_announced_and_does_not_count",
            second_tab_of_a_user_is_not_announced_and_does_not_count,
        ),
        (
            "user_left_only_when_the_last_tab_leaves_or_disconnects",
            user_left_only_when_the_last_tab_leaves_or_disconnects,
        ),
        ("counts_are_distinct_users", counts_are_distinct_users),
        (
            "message_reaches_every_member_including_the_sender",
            message_reaches_every_member_including_the_sender,
        ),
        (
            "message_seq_counts_up_from_one_and_ts_is_now",
            message_seq_counts_up_from_one_and_ts_is_now,
        ),
        (
            "message_content_is_carried_verbatim",
            message_content_is_carried_verbatim,
        ),
        (
            "message_with_id_gets_ack_with_seq_and_without_id_none",
            message_with_id_gets_ack_with_seq_and_without_id_none,
        ),
        (
            "message_to_a_room_not_joined_is_not_in_room",
            message_to_a_room_not_joined_is_not_in_room,
        ),
        (
            "forbidden_wins_over_not_in_room",
            forbidden_wins_over_not_in_room,
        ),
        (
            "invalid_room_comes_before_forbidden",
            invalid_room_comes_before_forbidden,
        ),
        (
            "broadcast_shares_identical_frame_bytes",
            broadcast_shares_identical_frame_bytes,
        ),
        (
            "leave_replies_left_and_stops_delivery",
            leave_replies_left_and_stops_delivery,
        ),
        ("leave_without_id_has_no_id", leave_without_id_has_no_id),
        (
            "leave_when_not_a_member_is_not_in_room",
            leave_when_not_a_member_is_not_in_room,
        ),
        (
            "direct_reaches_every_connection_of_the_target_with_from",
            direct_reaches_every_connection_of_the_target_with_from,
        ),
        (
            "direct_to_oneself_reaches_all_of_ones_connections",
            direct_to_oneself_reaches_all_of_ones_connections,
        ),
        (
            "direct_to_unknown_user_is_user_offline",
            direct_to_unknown_user_is_user_offline,
        ),
        (
            "typing_goes_to_others_but_none_of_the_senders_connections",
            typing_goes_to_others_but_none_of_the_senders_connections,
        ),
        (
            "typing_in_a_room_not_joined_is_not_in_room",
            typing_in_a_room_not_joined_is_not_in_room,
        ),
        (
            "typing_expires_after_the_timeout",
            typing_expires_after_the_timeout,
        ),
        (
            "renewed_typing_pushes_the_deadline",
            renewed_typing_pushes_the_deadline,
        ),
        (
            "typing_stopped_explicitly_does_not_expire_again",
            typing_stopped_explicitly_does_not_expire_again,
        ),
        (
            "leaving_while_typing_sends_typing_false_then_user_left",
            leaving_while_typing_sends_typing_false_then_user_left,
        ),
        (
            "disconnecting_while_typing_sends_typing_false_then_user_left",
            disconnecting_while_typing_sends_typing_false_then_user_left,
        ),
        (
            "one_tab_leaving_keeps_the_users_typing_state",
            one_tab_leaving_keeps_the_users_typing_state,
        ),
        (
            "typing_timeout_zero_never_expires",
            typing_timeout_zero_never_expires,
        ),
        (
            "next_deadline_is_none_for_an_empty_hub",
            next_deadline_is_none_for_an_empty_hub,
        ),
        (
            "presence_lists_users_with_connection_counts_without_membership",
            presence_lists_users_with_connection_counts_without_membership,
        ),
        (
            "presence_of_an_unknown_room_is_empty",
            presence_of_an_unknown_room_is_empty,
        ),
        (
            "presence_obeys_the_rooms_claim",
            presence_obeys_the_rooms_claim,
        ),
        (
            "ping_gets_pong_with_server_time",
            ping_gets_pong_with_server_time,
        ),
        (
            "refresh_with_same_sub_replies_refreshed_with_exp",
            refresh_with_same_sub_replies_refreshed_with_exp,
        ),
        (
            "refresh_without_exp_replies_exp_null",
            refresh_without_exp_replies_exp_null,
        ),
        (
            "refresh_with_another_sub_is_invalid_token_and_keeps_the_old_one",
            refresh_with_another_sub_is_invalid_token_and_keeps_the_old_one,
        ),
        (
            "refresh_with_a_bad_token_is_invalid_token",
            refresh_with_a_bad_token_is_invalid_token,
        ),
        (
            "refresh_applies_the_new_name_to_later_frames",
            refresh_applies_the_new_name_to_later_frames,
        ),
        (
            "refresh_applies_the_new_rooms_claim_to_later_requests",
            refresh_applies_the_new_rooms_claim_to_later_requests,
        ),
        (
            "join_with_since_replays_missed_messages_before_live_ones",
            join_with_since_replays_missed_messages_before_live_ones,
        ),
        (
            "join_with_since_equal_to_seq_recovers_nothing_missed",
            join_with_since_equal_to_seq_recovers_nothing_missed,
        ),
        (
            "join_with_since_beyond_seq_is_not_recovered",
            join_with_since_beyond_seq_is_not_recovered,
        ),
        (
            "join_with_another_epoch_replays_nothing",
            join_with_another_epoch_replays_nothing,
        ),
        (
            "join_without_since_has_no_recovery_keys",
            join_without_since_has_no_recovery_keys,
        ),
        (
            "join_with_since_and_no_epoch_means_the_current_epoch",
            join_with_since_and_no_epoch_means_the_current_epoch,
        ),
        (
            "join_with_since_past_the_history_cap_replays_what_is_held",
            join_with_since_past_the_history_cap_replays_what_is_held,
        ),
        (
            "empty_room_keeps_seq_and_epoch_for_five_minutes_then_is_forgotten",
            empty_room_keeps_seq_and_epoch_for_five_minutes_then_is_forgotten,
        ),
        (
            "recovery_into_a_forgotten_room_is_not_recovered",
            recovery_into_a_forgotten_room_is_not_recovered,
        ),
        (
            "too_many_rooms_at_the_per_connection_limit",
            too_many_rooms_at_the_per_connection_limit,
        ),
        (
            "invalid_json_gets_invalid_json_without_id",
            invalid_json_gets_invalid_json_without_id,
        ),
        (
            "invalid_message_echoes_a_readable_id",
            invalid_message_echoes_a_readable_id,
        ),
        (
            "invalid_message_without_a_readable_id",
            invalid_message_without_a_readable_id,
        ),
        ("unknown_type_echoes_the_id", unknown_type_echoes_the_id),
        (
            "errors_keep_the_connection_usable",
            errors_keep_the_connection_usable,
        ),
        (
            "above_the_soft_mark_broadcasts_are_dropped_but_replies_are_queued",
            above_the_soft_mark_broadcasts_are_dropped_but_replies_are_queued,
        ),
        (
            "crossing_the_hard_mark_closes_with_4000_and_leaves_the_rooms",
            crossing_the_hard_mark_closes_with_4000_and_leaves_the_rooms,
        ),
        (
            "lagged_follows_once_a_slow_consumer_drains",
            lagged_follows_once_a_slow_consumer_drains,
        ),
        (
            "no_lagged_for_a_room_the_connection_left",
            no_lagged_for_a_room_the_connection_left,
        ),
        (
            "a_silent_connection_is_pinged_then_closed_with_1011",
            a_silent_connection_is_pinged_then_closed_with_1011,
        ),
        (
            "pings_come_every_heartbeat_even_with_a_longer_pong_timeout",
            pings_come_every_heartbeat_even_with_a_longer_pong_timeout,
        ),
        (
            "a_heartbeat_of_zero_sends_no_pings",
            a_heartbeat_of_zero_sends_no_pings,
        ),
        (
            "an_expired_token_closes_with_4001_unless_refreshed",
            an_expired_token_closes_with_4001_unless_refreshed,
        ),
        (
            "over_the_rate_messages_are_refused_and_a_flood_is_closed",
            over_the_rate_messages_are_refused_and_a_flood_is_closed,
        ),
        (
            "disconnect_removes_memberships_and_the_user",
            disconnect_removes_memberships_and_the_user,
        ),
        (
            "disconnecting_one_tab_keeps_the_user_online",
            disconnecting_one_tab_keeps_the_user_online,
        ),
        (
            "a_released_slot_can_be_reused",
            a_released_slot_can_be_reused,
        ),
        (
            "take_dirty_lists_each_connection_with_queued_bytes_once",
            take_dirty_lists_each_connection_with_queued_bytes_once,
        ),
        (
            "metrics_count_received_and_sent_frames",
            metrics_count_received_and_sent_frames,
        ),
        (
            "membership_stays_consistent_under_churn",
            membership_stays_consistent_under_churn,
        ),
        (
            "api_publish_to_a_room_comes_from_the_server_user_and_takes_a_seq",
            api_publish_to_a_room_comes_from_the_server_user_and_takes_a_seq,
        ),
        (
            "api_publish_to_an_empty_room_enters_its_history",
            api_publish_to_an_empty_room_enters_its_history,
        ),
        (
            "api_publish_to_a_user_is_a_direct_from_the_server",
            api_publish_to_a_user_is_a_direct_from_the_server,
        ),
        (
            "api_publish_refuses_bad_bodies",
            api_publish_refuses_bad_bodies,
        ),
        (
            "api_disconnect_closes_every_connection_of_the_user_with_4003",
            api_disconnect_closes_every_connection_of_the_user_with_4003,
        ),
        (
            "rooms_survive_export_and_import_for_recovery",
            rooms_survive_export_and_import_for_recovery,
        ),
    ];
    ANSWER_LATER.set(true);
    let mut failed = Vec::new();
    for (name, test) in tests {
        if LOCAL_ONLY.contains(name) {
            continue;
        }
        if std::panic::catch_unwind(test).is_err() {
            failed.push(*name);
        }
    }
    ANSWER_LATER.set(false);
    assert!(
        failed.is_empty(),
        "failed with a backplane that answers later: {failed:?}"
    );
}

/// Tests that read what only the local backplane gives: a server API answer
/// at once (with its `delivered`), and rooms imported from a state file.
const LOCAL_ONLY: &[&str] = &[
    "api_publish_to_a_room_comes_from_the_server_user_and_takes_a_seq",
    "api_publish_to_an_empty_room_enters_its_history",
    "rooms_survive_export_and_import_for_recovery",
];

#[test]
fn replies_wait_in_order_behind_an_answer_that_comes_later() {
    let backplane = Box::new(DeferredBackplane::new(std::sync::Arc::clone(
        &config().namespaces,
    )));
    let mut hub = Hub::with_backplane(config(), backplane);
    hub.connect(0, identity("alice"), None, NOW);
    send(
        &mut hub,
        0,
        r#"{"type":"join","id":"j","payload":{"room":"lobby"}}"#,
    );
    send(
        &mut hub,
        0,
        &message("lobby", "1").replacen('{', r#"{"id":"m","#, 1),
    );
    send(&mut hub, 0, r#"{"type":"ping","id":"p"}"#);
    // Nothing has answered yet: only `welcome` is out, the pong waits.
    let queued = split_frames(&hub.outbound_mut(0).unwrap().to_vec());
    assert_eq!(queued.len(), 1, "{queued:?}");
    let frames = drain(&mut hub, 0);
    assert_eq!(
        types(&frames),
        ["welcome", "joined", "message", "ack", "pong"],
        "{frames:?}"
    );
    assert_eq!(frames[3]["id"], "m");
    assert_eq!(frames[3]["payload"]["seq"], 1);
    hub.check_invariants().unwrap();
}

// ---------------------------------------------------------------------------
// Namespaces (§14.1)
// ---------------------------------------------------------------------------

/// A hub whose rooms under `prefix` have the namespace `spec` sets.
fn hub_with_namespace(spec: crate::hub::NamespaceSpec) -> Hub {
    hub_with(|config| {
        config.namespaces = std::sync::Arc::new(crate::hub::Namespaces::new(
            crate::hub::RoomOptions::defaults(100),
            &[spec],
        ));
    })
}

fn namespace(prefix: &str) -> crate::hub::NamespaceSpec {
    crate::hub::NamespaceSpec {
        prefix: prefix.into(),
        ..Default::default()
    }
}

#[test]
fn a_read_only_namespace_refuses_client_messages_but_not_the_server_api() {
    let mut hub = hub_with_namespace(crate::hub::NamespaceSpec {
        client_publish: Some(false),
        ..namespace("feed:")
    });
    connect(&mut hub, 0, "alice");
    join(&mut hub, 0, "feed:news");
    join(&mut hub, 0, "chat");
    send(&mut hub, 0, &message("feed:news", "1"));
    assert_eq!(single_error(&mut hub, 0).0, "forbidden");
    // Before `not_in_room`: a client may never publish there.
    send(&mut hub, 0, &message("feed:other", "1"));
    assert_eq!(single_error(&mut hub, 0).0, "forbidden");
    send(&mut hub, 0, &message("chat", "1"));
    assert_eq!(types(&drain(&mut hub, 0)), ["message"]);
    let answer = hub.api_publish(br#"{"room":"feed:news","content":"news"}"#, NOW, 0);
    // Over a backplane that answers later, the answer comes by its ticket.
    if let Some(answer) = answer {
        assert_eq!(answer, ApiAnswer::Ok(r#"{"delivered":1,"seq":1}"#.into()));
    }
    let frames = drain(&mut hub, 0);
    assert_eq!(types(&frames), ["message"]);
    assert_eq!(frames[0]["payload"]["content"], "news");
}

#[test]
fn without_member_events_members_hear_no_joins_or_leaves_but_counts_hold() {
    let mut hub = hub_with_namespace(crate::hub::NamespaceSpec {
        member_events: Some(false),
        ..namespace("quiet:")
    });
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "quiet:room");
    let joined = join(&mut hub, 1, "quiet:room");
    assert_eq!(joined["count"], 2);
    send(
        &mut hub,
        1,
        r#"{"type":"leave","payload":{"room":"quiet:room"}}"#,
    );
    assert_eq!(types(&drain(&mut hub, 1)), ["left"]);
    assert!(drain(&mut hub, 0).is_empty());
    // Rooms outside the namespace still announce.
    join(&mut hub, 0, "loud");
    join(&mut hub, 1, "loud");
    assert_eq!(types(&drain(&mut hub, 0)), ["user_joined"]);
}

#[test]
fn max_members_counts_users_and_refuses_one_more_with_room_full() {
    let mut hub = hub_with_namespace(crate::hub::NamespaceSpec {
        max_members: Some(2),
        ..namespace("duo:")
    });
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    connect(&mut hub, 2, "carol");
    connect(&mut hub, 3, "alice");
    join(&mut hub, 0, "duo:x");
    join(&mut hub, 1, "duo:x");
    drain_all(&mut hub, &[0, 1]);
    send(
        &mut hub,
        2,
        r#"{"type":"join","id":1,"payload":{"room":"duo:x"}}"#,
    );
    let (code, frame) = single_error(&mut hub, 2);
    assert_eq!(code, "room_full");
    assert_eq!(frame["id"], 1);
    // Nobody heard of carol, and she is not a member.
    assert!(drain(&mut hub, 0).is_empty());
    send(&mut hub, 2, &message("duo:x", "1"));
    assert_eq!(single_error(&mut hub, 2).0, "not_in_room");
    // A second connection of a member is no new user.
    assert_eq!(join(&mut hub, 3, "duo:x")["count"], 2);
    // When a user leaves, there is room again.
    send(
        &mut hub,
        1,
        r#"{"type":"leave","payload":{"room":"duo:x"}}"#,
    );
    drain_all(&mut hub, &[0, 1, 3]);
    assert_eq!(join(&mut hub, 2, "duo:x")["count"], 2);
}

#[test]
fn a_namespace_keeps_its_own_history() {
    let mut hub = hub_with_namespace(crate::hub::NamespaceSpec {
        history: Some(2),
        ..namespace("short:")
    });
    connect(&mut hub, 0, "alice");
    connect(&mut hub, 1, "bob");
    join(&mut hub, 0, "short:a");
    join(&mut hub, 0, "long");
    publish(&mut hub, 0, "short:a", 5);
    publish(&mut hub, 0, "long", 5);
    drain(&mut hub, 0);
    for (room, held) in [("short:a", 2), ("long", 5)] {
        send(
            &mut hub,
            1,
            &json!({"type": "join", "payload": {"room": room, "since": 0}}).to_string(),
        );
        let frames = drain(&mut hub, 1);
        let messages = frames.iter().filter(|f| f["type"] == "message").count();
        assert_eq!(messages, held, "{room}: {frames:?}");
    }
}
