//! Integration tests for the message layer of PROTOCOL.md §3–§5, §8 and §11:
//! the envelope, every client request, every server event and error code,
//! rooms claims, recovery, frame-level closes, slow consumers and shutdown.
//!
//! Every test runs the real binary on a loopback port and talks to it over
//! real sockets. Nothing sleeps: a test waits for the event it expects (reads
//! block, bounded by the harness's 10 s timeout), and a `ping`→`pong` round
//! trip serves as a barrier proving that nothing else was queued before it.

mod common;

use std::io::Write;
use std::sync::mpsc;
use std::thread;

use common::{Client, TestServer, WAIT, now_secs, token, token_with};
use roomcast::auth::{TokenClaims, sign};
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Milliseconds since the Unix epoch, by the test's clock.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An `MS` field: an integer within a day of the test's clock.
#[track_caller]
fn assert_plausible_ms(value: &Value) {
    let ms = value
        .as_u64()
        .unwrap_or_else(|| panic!("expected integer milliseconds, got {value}"));
    let now = now_ms();
    assert!(
        ms.abs_diff(now) < 86_400_000,
        "timestamp {ms} is not within a day of {now}"
    );
}

/// The `USER` object of a user whose name defaulted to its id.
fn user(id: &str) -> Value {
    json!({"id": id, "name": id})
}

/// Claims for `sub` with a `rooms` claim.
fn with_rooms(sub: &str, rooms: &[&str]) -> TokenClaims {
    TokenClaims {
        sub: sub.into(),
        rooms: Some(rooms.iter().map(|room| room.to_string()).collect()),
        ..Default::default()
    }
}

/// Connects with a token carrying `claims`; returns the client and its `welcome`.
fn connect_with(server: &TestServer, claims: TokenClaims) -> (Client, Value) {
    let mut client = server.open(&format!("/ws?token={}", token_with(claims)));
    let welcome = client.recv();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (client, welcome)
}

/// Asserts an `error` frame with `code`, a human message, and exactly `id`
/// echoed (`None`: no `id` key at all).
#[track_caller]
fn assert_error(reply: &Value, code: &str, id: Option<Value>) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["payload"]["code"], code, "{reply}");
    assert!(reply["payload"]["message"].is_string(), "{reply}");
    assert_eq!(reply.get("id"), id.as_ref(), "id echo in {reply}");
}

/// Sends `request`, expects `error` `code` with `id` echoed, then proves the
/// connection is still open and nothing else was queued.
#[track_caller]
fn expect_error(client: &mut Client, request: Value, code: &str) -> Value {
    let id = request.get("id").filter(|id| !id.is_null()).cloned();
    let reply = client.request(request);
    assert_error(&reply, code, id);
    client.assert_alive();
    reply
}

/// Sends raw text, expects `error` `code` with exactly `id`, then `assert_alive`.
#[track_caller]
fn expect_raw_error(client: &mut Client, text: &str, code: &str, id: Option<Value>) {
    client.send_text(text);
    let reply = client.recv();
    assert_error(&reply, code, id);
    client.assert_alive();
}

/// Joins `room` with a request of our own and returns the reply (whatever it is).
fn join_reply(client: &mut Client, payload: Value) -> Value {
    client.request(json!({"type": "join", "id": "j", "payload": payload}))
}

/// Publishes `content` to `room` with an `id`; reads the sender's own broadcast
/// and then the `ack`; returns the broadcast.
#[track_caller]
fn publish(client: &mut Client, room: &str, content: Value) -> Value {
    client.send(
        json!({"type": "message", "id": "pub", "payload": {"room": room, "content": content}}),
    );
    let echo = client.recv();
    assert_eq!(echo["type"], "message", "{echo}");
    let ack = client.recv();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "pub", "{ack}");
    assert_eq!(
        ack["payload"]["seq"], echo["payload"]["seq"],
        "{ack} vs {echo}"
    );
    echo
}

/// Connects each of `subs` (distinct users) and joins them to `room` in order,
/// consuming the `user_joined` frames each earlier member receives.
fn room_of(server: &TestServer, room: &str, subs: &[&str]) -> Vec<Client> {
    let mut clients: Vec<Client> = Vec::new();
    for (index, sub) in subs.iter().enumerate() {
        let mut client = server.connect(sub);
        let joined = client.join(room);
        assert_eq!(joined["payload"]["count"], index + 1, "{joined}");
        for earlier in clients.iter_mut() {
            let announce = earlier.recv();
            assert_eq!(announce["type"], "user_joined", "{announce}");
            assert_eq!(announce["payload"]["user"], user(sub), "{announce}");
        }
        clients.push(client);
    }
    clients
}

/// Closes the WebSocket from the client side and waits for the server's
/// close reply, which the server sends only after it has processed the
/// disconnect (user_left, typing end).
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

/// A masked client frame with the given first byte (FIN, RSV bits, opcode).
fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![first_byte];
    let len = payload.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= 0xffff {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Writes bytes straight to the client's socket, bypassing tungstenite.
fn write_raw(client: &mut Client, bytes: &[u8]) {
    let stream = client.ws.get_mut();
    stream.write_all(bytes).expect("raw write");
    stream.flush().expect("raw flush");
}

/// Two bystanders in `room` who can still chat: proves a close of another
/// client left the server and its other connections unaffected.
#[track_caller]
fn assert_bystanders_chat(pair: &mut [Client], room: &str, text: &str) {
    let [first, second] = pair else {
        panic!("two bystanders expected")
    };
    let echo = publish(first, room, json!({"text": text}));
    let got = second.recv();
    assert_eq!(got["type"], "message", "{got}");
    assert_eq!(got["payload"]["content"]["text"], text);
    assert_eq!(got["payload"]["seq"], echo["payload"]["seq"]);
    second.assert_alive();
}

// ---------------------------------------------------------------------------
// welcome
// ---------------------------------------------------------------------------

#[test]
fn welcome_carries_connection_id_user_heartbeat_and_server_time() {
    let server = TestServer::start(&["--heartbeat-ms", "12345"]);
    let mut first = server.open(&format!("/ws?token={}", token("alice")));
    let welcome = first.recv();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert!(welcome.get("id").is_none(), "{welcome}");
    let payload = &welcome["payload"];
    let connection_id = payload["connection_id"]
        .as_str()
        .unwrap_or_else(|| panic!("connection_id must be a string: {welcome}"));
    assert!(!connection_id.is_empty());
    assert_eq!(payload["user"], user("alice"), "name defaults to sub");
    assert_eq!(payload["heartbeat_ms"], 12345);
    assert_plausible_ms(&payload["server_time"]);

    // A second connection of the same user is a different connection.
    let mut second = server.open(&format!("/ws?token={}", token("alice")));
    let other = second.recv();
    assert_eq!(other["type"], "welcome");
    assert_ne!(other["payload"]["connection_id"], payload["connection_id"]);
    first.assert_alive();
    second.assert_alive();
}

#[test]
fn welcome_user_name_comes_from_the_token() {
    let server = TestServer::start(&[]);
    let (mut client, welcome) = connect_with(
        &server,
        TokenClaims {
            sub: "u-17".into(),
            name: Some("Zoë \"Z\" ☃".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        welcome["payload"]["user"],
        json!({"id": "u-17", "name": "Zoë \"Z\" ☃"})
    );
    assert_eq!(
        welcome["payload"]["heartbeat_ms"], 30000,
        "default heartbeat"
    );
    client.assert_alive();
}

// ---------------------------------------------------------------------------
// join / joined
// ---------------------------------------------------------------------------

#[test]
fn join_replies_joined_with_room_count_seq_epoch_and_echoes_ids() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("alice");
    let joined = alice.request(json!({"type": "join", "id": "j-1", "payload": {"room": "lobby"}}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["id"], "j-1");
    let payload = joined["payload"].as_object().unwrap();
    assert_eq!(payload["room"], "lobby");
    assert_eq!(payload["count"], 1);
    assert_eq!(payload["seq"], 0, "a new room starts at seq 0");
    let epoch = payload["epoch"].as_str().expect("epoch is a string");
    assert!(!epoch.is_empty());
    assert!(!payload.contains_key("recovered") && !payload.contains_key("missed"));

    publish(&mut alice, "lobby", json!("one"));
    publish(&mut alice, "lobby", json!("two"));

    // A numeric id is echoed as a number; the seq is the room's last seq.
    let mut bob = server.connect("bob");
    let joined = bob.request(json!({"type": "join", "id": 42, "payload": {"room": "lobby"}}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["id"], json!(42));
    assert_eq!(joined["payload"]["count"], 2);
    assert_eq!(joined["payload"]["seq"], 2);
    assert_eq!(
        joined["payload"]["epoch"], epoch,
        "same room life, same epoch"
    );

    // Without an id there is no id in the reply.
    let mut carol = server.connect("carol");
    let joined = carol.join("lobby");
    assert!(joined.get("id").is_none(), "{joined}");
    assert_eq!(joined["payload"]["count"], 3);

    // Another room has its own epoch.
    let other = carol.join("elsewhere");
    assert_ne!(other["payload"]["epoch"], epoch, "{other}");
    assert_eq!(other["payload"]["seq"], 0);
}

#[test]
fn join_is_idempotent() {
    let server = TestServer::start(&[]);
    let mut clients = room_of(&server, "r", &["bob", "alice"]);
    let mut alice = clients.pop().unwrap();
    let mut bob = clients.pop().unwrap();
    let first_epoch = alice.join("r")["payload"]["epoch"].clone();
    let again = alice.request(json!({"type": "join", "id": "again", "payload": {"room": "r"}}));
    assert_eq!(again["type"], "joined", "{again}");
    assert_eq!(again["id"], "again");
    assert_eq!(again["payload"]["count"], 2);
    assert_eq!(again["payload"]["seq"], 0);
    assert_eq!(again["payload"]["epoch"], first_epoch);
    // Bob heard about alice once only.
    bob.assert_alive();
    // One leave undoes the membership: the joins did not stack up.
    let left = alice.request(json!({"type": "leave", "payload": {"room": "r"}}));
    assert_eq!(left["type"], "left", "{left}");
    expect_error(
        &mut alice,
        json!({"type": "message", "id": 1, "payload": {"room": "r", "content": 1}}),
        "not_in_room",
    );
    let gone = bob.recv();
    assert_eq!(gone["type"], "user_left", "{gone}");
    assert_eq!(gone["payload"]["count"], 1);
}

// ---------------------------------------------------------------------------
// leave / left, not_in_room
// ---------------------------------------------------------------------------

#[test]
fn leave_replies_left_with_id_and_stops_delivery() {
    let server = TestServer::start(&[]);
    let mut clients = room_of(&server, "r", &["alice", "bob"]);
    let mut bob = clients.pop().unwrap();
    let mut alice = clients.pop().unwrap();
    let left = alice.request(json!({"type": "leave", "id": "l-1", "payload": {"room": "r"}}));
    assert_eq!(left["type"], "left", "{left}");
    assert_eq!(left["id"], "l-1");
    assert_eq!(left["payload"], json!({"room": "r"}));
    let gone = bob.recv();
    assert_eq!(gone["type"], "user_left", "{gone}");
    assert_eq!(
        gone["payload"],
        json!({"room": "r", "user": user("alice"), "count": 1})
    );
    // Bob's message (processed: bob got its ack) does not reach alice any more.
    publish(&mut bob, "r", json!("after"));
    alice.assert_alive();
    // Leave with a numeric id, after re-joining.
    alice.join("r");
    let left = alice.request(json!({"type": "leave", "id": 5, "payload": {"room": "r"}}));
    assert_eq!(left["id"], json!(5), "{left}");
}

#[test]
fn leave_message_and_typing_outside_membership_are_not_in_room() {
    let server = TestServer::start(&[]);
    let mut bob = server.connect("bob");
    bob.join("busy");
    let mut alice = server.connect("alice");
    for room in ["busy", "ghost"] {
        expect_error(
            &mut alice,
            json!({"type": "leave", "id": "l", "payload": {"room": room}}),
            "not_in_room",
        );
        expect_error(
            &mut alice,
            json!({"type": "message", "id": "m", "payload": {"room": room, "content": "x"}}),
            "not_in_room",
        );
        expect_error(
            &mut alice,
            json!({"type": "typing", "id": 3, "payload": {"room": room, "is_typing": true}}),
            "not_in_room",
        );
    }
    // Nothing reached bob, and the refused message took no seq.
    bob.assert_alive();
    let echo = publish(&mut bob, "busy", json!("first"));
    assert_eq!(echo["payload"]["seq"], 1);
}

// ---------------------------------------------------------------------------
// message / ack
// ---------------------------------------------------------------------------

#[test]
fn message_reaches_every_member_including_sender_with_growing_seq() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob", "carol"]);
    let senders = [0usize, 1, 2];
    for (index, &sender) in senders.iter().enumerate() {
        let text = format!("m{}", index + 1);
        members[sender]
            .send(json!({"type": "message", "payload": {"room": "r", "content": {"text": text}}}));
        for member in members.iter_mut() {
            let got = member.recv();
            assert_eq!(got["type"], "message", "{got}");
            assert!(got.get("id").is_none(), "{got}");
            let payload = &got["payload"];
            assert_eq!(payload["room"], "r");
            assert_eq!(payload["user"], user(["alice", "bob", "carol"][sender]));
            assert_eq!(payload["content"], json!({"text": text}));
            assert_eq!(payload["seq"], index + 1);
            assert_plausible_ms(&payload["ts"]);
        }
    }
    for member in members.iter_mut() {
        member.assert_alive();
    }
}

#[test]
fn message_with_id_is_acked_with_its_seq_after_the_broadcast() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    for (seq, id) in [(1, json!("m-1")), (2, json!(77))] {
        members[0]
            .send(json!({"type": "message", "id": id, "payload": {"room": "r", "content": seq}}));
        let own = members[0].recv();
        assert_eq!(own["type"], "message", "the broadcast comes first: {own}");
        assert!(
            own.get("id").is_none(),
            "the broadcast carries no id: {own}"
        );
        assert_eq!(own["payload"]["seq"], seq);
        let ack = members[0].recv();
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], id);
        assert_eq!(ack["payload"], json!({"seq": seq}));
        let other = members[1].recv();
        assert_eq!(other["payload"]["seq"], seq);
    }
}

#[test]
fn message_without_id_gets_no_ack() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    members[0].send(json!({"type": "message", "payload": {"room": "r", "content": "quiet"}}));
    let own = members[0].recv();
    assert_eq!(own["type"], "message", "{own}");
    // The next frame is the pong: no ack was queued.
    members[0].assert_alive();
    assert_eq!(members[1].recv()["payload"]["content"], "quiet");
}

#[test]
fn message_content_is_carried_verbatim() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    let contents = [
        r#"{"text":"hi","n":1,"ok":true,"none":null}"#,
        r#"[1,"two",3.5,false,null,{"k":[]}]"#,
        r#""tab\tquote\"backslash\\newline\nunicode é 日本 \u00e9 \ud83d\ude00 nul\u0000 slash\/""#,
        r#""😀 raw emoji and ünïcödé""#,
        "42",
        "-7",
        "3.14159",
        "1e3",
        "12345678901234567890",
        "null",
        "true",
        "false",
        r#""""#,
        "{}",
        "[]",
        r#"{"a":{"b":{"c":[[1,[2,[3,{"d":"deep","e":[{},[]]}]]]]}}}"#,
        r#"{ "spaced" : [ 1 , 2 ] ,	"tab" : "x" }"#,
        r#"{"type":"message","payload":{"room":"other"},"id":"inner"}"#,
    ];
    for (index, content) in contents.iter().enumerate() {
        let expected: Value = serde_json::from_str(content).unwrap();
        members[0].send_text(&format!(
            r#"{{"type":"message","id":{index},"payload":{{"room":"r","content":{content}}}}}"#
        ));
        for member in members.iter_mut() {
            let got = member.recv();
            assert_eq!(got["type"], "message", "{got}");
            let payload = got["payload"].as_object().unwrap();
            assert!(payload.contains_key("content"), "{got}");
            assert_eq!(payload["content"], expected, "content {content}");
            assert_eq!(payload["seq"], index + 1);
        }
        let ack = members[0].recv();
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], index);
    }
}

#[test]
fn message_to_a_room_not_joined_is_not_in_room_and_takes_no_seq() {
    let server = TestServer::start(&[]);
    let mut bob = server.connect("bob");
    bob.join("r");
    let mut alice = server.connect("alice");
    expect_error(
        &mut alice,
        json!({"type": "message", "id": "m-9", "payload": {"room": "r", "content": {"x": 1}}}),
        "not_in_room",
    );
    bob.assert_alive();
    let echo = publish(&mut bob, "r", json!("first"));
    assert_eq!(echo["payload"]["seq"], 1);
}

// ---------------------------------------------------------------------------
// direct
// ---------------------------------------------------------------------------

#[test]
fn direct_reaches_every_connection_of_the_target_and_is_acked() {
    let server = TestServer::start(&[]);
    let mut tab1 = server.connect("alice");
    let mut tab2 = server.connect("alice");
    let (mut bob, _) = connect_with(
        &server,
        TokenClaims {
            sub: "bob".into(),
            name: Some("Bob B.".into()),
            ..Default::default()
        },
    );
    let content = json!({"text": "psst", "list": [1, null, "é"]});
    bob.send(
        json!({"type": "direct", "id": "d-1", "payload": {"to": "alice", "content": content}}),
    );
    for tab in [&mut tab1, &mut tab2] {
        let got = tab.recv();
        assert_eq!(got["type"], "direct", "{got}");
        assert!(got.get("id").is_none(), "{got}");
        let payload = got["payload"].as_object().unwrap();
        assert_eq!(payload["from"], json!({"id": "bob", "name": "Bob B."}));
        assert_eq!(payload["content"], content);
        assert_plausible_ms(&payload["ts"]);
        assert!(!payload.contains_key("seq"), "{got}");
        assert!(!payload.contains_key("room"), "{got}");
        tab.assert_alive();
    }
    let ack = bob.recv();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "d-1");
    assert_eq!(ack["payload"], json!({}), "a direct's ack has no seq");
    // Bob is not a recipient of his own direct to alice.
    bob.assert_alive();
}

#[test]
fn direct_without_id_gets_no_ack() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    bob.send(json!({"type": "direct", "payload": {"to": "alice", "content": null}}));
    let got = alice.recv();
    assert_eq!(got["type"], "direct", "{got}");
    assert_eq!(got["payload"]["content"], Value::Null);
    assert!(got["payload"].as_object().unwrap().contains_key("content"));
    bob.assert_alive();
}

#[test]
fn direct_to_oneself_reaches_all_own_connections() {
    let server = TestServer::start(&[]);
    let mut tab1 = server.connect("alice");
    let mut tab2 = server.connect("alice");
    tab1.send(
        json!({"type": "direct", "id": 8, "payload": {"to": "alice", "content": "note to self"}}),
    );
    let own = tab1.recv();
    assert_eq!(own["type"], "direct", "{own}");
    assert_eq!(own["payload"]["from"], user("alice"));
    assert_eq!(own["payload"]["content"], "note to self");
    let ack = tab1.recv();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], 8);
    let other = tab2.recv();
    assert_eq!(other["type"], "direct", "{other}");
    assert_eq!(other["payload"]["content"], "note to self");
}

#[test]
fn direct_to_an_offline_user_is_user_offline() {
    let server = TestServer::start(&[]);
    let mut bob = server.connect("bob");
    expect_error(
        &mut bob,
        json!({"type": "direct", "id": "d-x", "payload": {"to": "nobody", "content": 1}}),
        "user_offline",
    );
    // A user who was online and left is offline again.
    let carol = server.connect("carol");
    bob.send(json!({"type": "direct", "id": "d-c", "payload": {"to": "carol", "content": 1}}));
    assert_eq!(bob.recv()["type"], "ack");
    hang_up(carol);
    expect_error(
        &mut bob,
        json!({"type": "direct", "id": 12, "payload": {"to": "carol", "content": 1}}),
        "user_offline",
    );
}

// ---------------------------------------------------------------------------
// typing
// ---------------------------------------------------------------------------

#[test]
fn typing_reaches_other_members_but_never_the_typists_connections() {
    let server = TestServer::start(&[]);
    let mut bob = server.connect("bob");
    bob.join("r");
    let mut tab1 = server.connect("alice");
    tab1.join("r");
    assert_eq!(bob.recv()["type"], "user_joined");
    let mut tab2 = server.connect("alice");
    tab2.join("r");
    for is_typing in [true, false] {
        tab1.send(json!({"type": "typing", "payload": {"room": "r", "is_typing": is_typing}}));
        let got = bob.recv();
        assert_eq!(got["type"], "typing", "{got}");
        assert_eq!(
            got["payload"],
            json!({"room": "r", "user": user("alice"), "is_typing": is_typing})
        );
        // Bob got it, so it was processed: neither of alice's tabs got anything.
        tab2.assert_alive();
        tab1.assert_alive();
    }
}

#[test]
fn typing_expires_after_the_typing_timeout() {
    let server = TestServer::start(&["--typing-timeout-ms", "300"]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    members[0].send(json!({"type": "typing", "payload": {"room": "r", "is_typing": true}}));
    let started = members[1].recv();
    assert_eq!(started["type"], "typing", "{started}");
    assert_eq!(started["payload"]["is_typing"], true);
    // Nothing else is sent: the next frame is the expiry.
    let expired = members[1].recv();
    assert_eq!(expired["type"], "typing", "{expired}");
    assert_eq!(
        expired["payload"],
        json!({"room": "r", "user": user("alice"), "is_typing": false})
    );
    members[0].assert_alive();
    members[1].assert_alive();
}

#[test]
fn leaving_while_typing_ends_the_typing_for_the_others() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    members[0].send(json!({"type": "typing", "payload": {"room": "r", "is_typing": true}}));
    assert_eq!(members[1].recv()["payload"]["is_typing"], true);
    let left = members[0].request(json!({"type": "leave", "payload": {"room": "r"}}));
    assert_eq!(left["type"], "left", "{left}");
    let stopped = members[1].recv();
    assert_eq!(stopped["type"], "typing", "{stopped}");
    assert_eq!(
        stopped["payload"],
        json!({"room": "r", "user": user("alice"), "is_typing": false})
    );
    let gone = members[1].recv();
    assert_eq!(gone["type"], "user_left", "{gone}");
    assert_eq!(gone["payload"]["count"], 1);
    members[0].assert_alive();
}

#[test]
fn disconnecting_while_typing_ends_the_typing_for_the_others() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    let mut bob = members.pop().unwrap();
    let mut alice = members.pop().unwrap();
    alice.send(json!({"type": "typing", "payload": {"room": "r", "is_typing": true}}));
    assert_eq!(bob.recv()["payload"]["is_typing"], true);
    hang_up(alice);
    let stopped = bob.recv();
    assert_eq!(stopped["type"], "typing", "{stopped}");
    assert_eq!(stopped["payload"]["is_typing"], false);
    assert_eq!(stopped["payload"]["user"], user("alice"));
    let gone = bob.recv();
    assert_eq!(gone["type"], "user_left", "{gone}");
    assert_eq!(gone["payload"]["count"], 1);
}

// ---------------------------------------------------------------------------
// presence
// ---------------------------------------------------------------------------

/// The `users` of a presence reply, sorted by id.
fn presence_users(reply: &Value) -> Vec<Value> {
    let mut users = reply["payload"]["users"]
        .as_array()
        .unwrap_or_else(|| panic!("users must be an array: {reply}"))
        .clone();
    users.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    users
}

#[test]
fn presence_lists_users_with_their_connection_counts_without_membership() {
    let server = TestServer::start(&[]);
    let mut bob = server.connect("bob");
    bob.join("r");
    let (mut tab1, _) = connect_with(
        &server,
        TokenClaims {
            sub: "alice".into(),
            name: Some("Alice".into()),
            ..Default::default()
        },
    );
    tab1.join("r");
    let mut tab2 = server.connect("alice");
    tab2.join("r");
    // Carol is not a member.
    let mut carol = server.connect("carol");
    let reply = carol.request(json!({"type": "presence", "id": "p-1", "payload": {"room": "r"}}));
    assert_eq!(reply["type"], "presence", "{reply}");
    assert_eq!(reply["id"], "p-1");
    assert_eq!(reply["payload"]["room"], "r");
    assert_eq!(
        presence_users(&reply),
        vec![
            json!({"id": "alice", "name": "Alice", "connections": 2}),
            json!({"id": "bob", "name": "bob", "connections": 1}),
        ]
    );
    // A room nobody is in has no users.
    let empty = carol.request(json!({"type": "presence", "id": 2, "payload": {"room": "void"}}));
    assert_eq!(empty["type"], "presence", "{empty}");
    assert_eq!(empty["id"], 2);
    assert_eq!(empty["payload"], json!({"room": "void", "users": []}));
    // One tab closing leaves one connection.
    hang_up(tab2);
    let reply = carol.request(json!({"type": "presence", "payload": {"room": "r"}}));
    assert!(reply.get("id").is_none(), "{reply}");
    assert_eq!(
        presence_users(&reply)[0],
        json!({"id": "alice", "name": "Alice", "connections": 1})
    );
}

#[test]
fn presence_outside_the_rooms_claim_is_forbidden() {
    let server = TestServer::start(&[]);
    let mut bob = server.connect("bob");
    bob.join("secret");
    let (mut carol, _) = connect_with(&server, with_rooms("carol", &["allowed"]));
    expect_error(
        &mut carol,
        json!({"type": "presence", "id": "p", "payload": {"room": "secret"}}),
        "forbidden",
    );
    let reply = carol.request(json!({"type": "presence", "payload": {"room": "allowed"}}));
    assert_eq!(reply["type"], "presence", "{reply}");
}

// ---------------------------------------------------------------------------
// user_joined / user_left
// ---------------------------------------------------------------------------

#[test]
fn user_joined_is_announced_once_per_user() {
    let server = TestServer::start(&[]);
    let mut clients = room_of(&server, "r", &["observer", "third"]);
    let mut third = clients.pop().unwrap();
    let mut observer = clients.pop().unwrap();
    let mut tab1 = server.connect("alice");
    let joined = tab1.join("r");
    assert_eq!(joined["payload"]["count"], 3);
    for member in [&mut observer, &mut third] {
        let announce = member.recv();
        assert_eq!(announce["type"], "user_joined", "{announce}");
        assert_eq!(
            announce["payload"],
            json!({"room": "r", "user": user("alice"), "count": 3})
        );
    }
    // The joiner itself is not told about itself.
    tab1.assert_alive();
    // A second tab of the same user does not re-announce her.
    let mut tab2 = server.connect("alice");
    let joined = tab2.join("r");
    assert_eq!(joined["payload"]["count"], 3, "count is distinct users");
    observer.assert_alive();
    tab1.assert_alive();
    publish(&mut third, "r", json!("from third"));
    let next = observer.recv();
    assert_eq!(next["type"], "message", "{next}");
    assert_eq!(next["payload"]["content"], "from third");
}

#[test]
fn user_left_is_sent_only_when_the_last_connection_goes() {
    let server = TestServer::start(&[]);
    let mut observer = server.connect("observer");
    observer.join("r");
    let mut tab1 = server.connect("alice");
    tab1.join("r");
    let announce = observer.recv();
    assert_eq!(announce["type"], "user_joined", "{announce}");
    let mut tab2 = server.connect("alice");
    assert_eq!(tab2.join("r")["payload"]["count"], 2);
    // Closing one of two tabs: no user_left.
    hang_up(tab2);
    observer.assert_alive();
    tab1.assert_alive();
    // Closing the last one: user_left with the new count.
    hang_up(tab1);
    let gone = observer.recv();
    assert_eq!(gone["type"], "user_left", "{gone}");
    assert!(gone.get("id").is_none());
    assert_eq!(
        gone["payload"],
        json!({"room": "r", "user": user("alice"), "count": 1})
    );
}

#[test]
fn counts_are_distinct_users() {
    let server = TestServer::start(&[]);
    let mut tab1 = server.connect("alice");
    assert_eq!(tab1.join("r")["payload"]["count"], 1);
    let mut tab2 = server.connect("alice");
    assert_eq!(tab2.join("r")["payload"]["count"], 1);
    let mut bob = server.connect("bob");
    assert_eq!(bob.join("r")["payload"]["count"], 2);
    for tab in [&mut tab1, &mut tab2] {
        let announce = tab.recv();
        assert_eq!(announce["type"], "user_joined", "{announce}");
        assert_eq!(announce["payload"]["count"], 2);
    }
    let left = tab1.request(json!({"type": "leave", "payload": {"room": "r"}}));
    assert_eq!(left["type"], "left");
    // Alice is still in through tab2: bob hears nothing, the count stays 2.
    bob.assert_alive();
    let mut carol = server.connect("carol");
    assert_eq!(carol.join("r")["payload"]["count"], 3);
}

#[test]
fn membership_survives_members_leaving_in_any_order() {
    let server = TestServer::start(&[]);
    let subs = ["u0", "u1", "u2", "u3", "u4"];
    let mut members: Vec<Option<Client>> =
        room_of(&server, "r", &subs).into_iter().map(Some).collect();
    let mut outside: Vec<Client> = Vec::new();
    // u1 leaves, u3 hangs up, u0 leaves: each time the rest hear it and still get messages.
    for (step, (gone, by_leave)) in [(1usize, true), (3, false), (0, true)]
        .into_iter()
        .enumerate()
    {
        let mut client = members[gone].take().unwrap();
        if by_leave {
            let left = client.request(json!({"type": "leave", "payload": {"room": "r"}}));
            assert_eq!(left["type"], "left", "{left}");
            outside.push(client);
        } else {
            hang_up(client);
        }
        let remaining = members.iter().flatten().count();
        for member in members.iter_mut().flatten() {
            let notice = member.recv();
            assert_eq!(notice["type"], "user_left", "{notice}");
            assert_eq!(notice["payload"]["user"], user(subs[gone]));
            assert_eq!(notice["payload"]["count"], remaining);
        }
        let sender = members[4].as_mut().unwrap();
        let echo = publish(sender, "r", json!({"step": step}));
        for (index, member) in members.iter_mut().enumerate() {
            if index == 4 {
                continue;
            }
            if let Some(member) = member {
                let got = member.recv();
                assert_eq!(got["payload"]["seq"], echo["payload"]["seq"], "{got}");
            }
        }
        for client in outside.iter_mut() {
            client.assert_alive();
        }
        let presence = members[4]
            .as_mut()
            .unwrap()
            .request(json!({"type": "presence", "payload": {"room": "r"}}));
        let ids: Vec<Value> = presence_users(&presence)
            .iter()
            .map(|u| u["id"].clone())
            .collect();
        let expected: Vec<Value> = subs
            .iter()
            .enumerate()
            .filter(|(index, _)| members[*index].is_some())
            .map(|(_, sub)| json!(sub))
            .collect();
        assert_eq!(ids, expected);
    }
    // u1 comes back and gets the next message.
    let mut back = outside.remove(0);
    assert_eq!(back.join("r")["payload"]["count"], 3);
    for member in members.iter_mut().flatten() {
        let notice = member.recv();
        assert_eq!(notice["type"], "user_joined", "{notice}");
        assert_eq!(notice["payload"]["user"], user("u1"));
    }
    let echo = publish(members[4].as_mut().unwrap(), "r", json!("welcome back"));
    let got = back.recv();
    assert_eq!(got["payload"]["seq"], echo["payload"]["seq"], "{got}");
}

// ---------------------------------------------------------------------------
// ping / pong
// ---------------------------------------------------------------------------

#[test]
fn ping_gets_pong_with_server_time_and_id() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    let pong = client.request(json!({"type": "ping", "id": "p-1", "payload": {}}));
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "p-1");
    let payload = pong["payload"].as_object().unwrap();
    assert_plausible_ms(&payload["server_time"]);
    let pong = client.request(json!({"type": "ping", "id": -3.5}));
    assert_eq!(pong["id"], json!(-3.5), "{pong}");
    let pong = client.request(json!({"type": "ping"}));
    assert_eq!(pong["type"], "pong", "{pong}");
    assert!(pong.get("id").is_none(), "{pong}");
}

// ---------------------------------------------------------------------------
// refresh
// ---------------------------------------------------------------------------

#[test]
fn refresh_with_a_valid_token_replies_refreshed_with_exp() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    let exp = now_secs() + 3600;
    let fresh = token_with(TokenClaims {
        sub: "alice".into(),
        expires_at: Some(exp),
        ..Default::default()
    });
    let reply =
        client.request(json!({"type": "refresh", "id": "r-1", "payload": {"token": fresh}}));
    assert_eq!(reply["type"], "refreshed", "{reply}");
    assert_eq!(reply["id"], "r-1");
    assert_eq!(reply["payload"], json!({"exp": exp}));
    // A token without exp: exp is present and null.
    let reply =
        client.request(json!({"type": "refresh", "id": 2, "payload": {"token": token("alice")}}));
    assert_eq!(reply["type"], "refreshed", "{reply}");
    assert_eq!(reply["id"], 2);
    let payload = reply["payload"].as_object().unwrap();
    assert_eq!(payload.get("exp"), Some(&Value::Null), "{reply}");
    client.assert_alive();
}

#[test]
fn refresh_with_another_sub_is_invalid_token_and_the_old_token_stays() {
    let server = TestServer::start(&[]);
    let (mut client, _) = connect_with(&server, with_rooms("alice", &["a"]));
    let other = token_with(TokenClaims {
        sub: "mallory".into(),
        ..Default::default()
    });
    expect_error(
        &mut client,
        json!({"type": "refresh", "id": "r-x", "payload": {"token": other}}),
        "invalid_token",
    );
    // The old claim is still in force: "b" is forbidden, "a" is fine.
    expect_error(
        &mut client,
        json!({"type": "join", "id": "jb", "payload": {"room": "b"}}),
        "forbidden",
    );
    let joined = client.join("a");
    assert_eq!(joined["payload"]["room"], "a");
}

#[test]
fn refresh_with_a_bad_token_is_invalid_token_and_the_connection_continues() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    let wrong_secret = sign(
        b"not-the-secret",
        &TokenClaims {
            sub: "alice".into(),
            ..Default::default()
        },
    );
    let expired = token_with(TokenClaims {
        sub: "alice".into(),
        expires_at: Some(now_secs() - 60),
        ..Default::default()
    });
    for (index, bad) in ["garbage", "", "a.b.c", &wrong_secret, &expired]
        .into_iter()
        .enumerate()
    {
        expect_error(
            &mut client,
            json!({"type": "refresh", "id": index, "payload": {"token": bad}}),
            "invalid_token",
        );
    }
    // Still the same user, still working.
    let joined = client.join("r");
    assert_eq!(joined["payload"]["count"], 1);
    let echo = publish(&mut client, "r", json!("still here"));
    assert_eq!(echo["payload"]["user"], user("alice"));
}

#[test]
fn refresh_before_expiry_keeps_the_connection_and_a_failed_one_does_not() {
    let server = TestServer::start(&[]);
    let exp = now_secs() + 2;
    let expiring = |sub: &str| TokenClaims {
        sub: sub.into(),
        expires_at: Some(exp),
        ..Default::default()
    };
    let (mut refreshed, _) = connect_with(&server, expiring("alice"));
    let (mut failed, _) = connect_with(&server, expiring("alice"));
    let (mut control, _) = connect_with(&server, expiring("bob"));
    let reply = refreshed.request(json!({"type": "refresh", "payload": {"token": token("alice")}}));
    assert_eq!(reply["type"], "refreshed", "{reply}");
    assert_eq!(reply["payload"]["exp"], Value::Null);
    expect_error(
        &mut failed,
        json!({"type": "refresh", "id": "bad", "payload": {"token": "garbage"}}),
        "invalid_token",
    );
    // When the old exp passes, the connections still on it are closed with 4001...
    assert_eq!(control.expect_close().0, 4001);
    assert_eq!(failed.expect_close().0, 4001);
    // ...and the refreshed one, due at the same instant, is not.
    refreshed.assert_alive();
}

/// A JWT with exactly this header and claims, signed HS256 with the test secret.
fn raw_jwt(header: &Value, claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, Mac};
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(common::SECRET.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

#[test]
fn refresh_rejects_tokens_the_handshake_would_reject() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    // The crafted token is accepted when its claims are fine...
    let good = raw_jwt(&hs256, &json!({"sub": "alice", "rooms": ["a"], "extra": 1}));
    let reply = client.request(json!({"type": "refresh", "payload": {"token": good}}));
    assert_eq!(reply["type"], "refreshed", "{reply}");
    // ...and refused for a bad rooms claim, an empty sub, alg none, a future nbf.
    let unsigned = {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
            URL_SAFE_NO_PAD.encode(json!({"sub": "alice"}).to_string())
        )
    };
    for bad in [
        raw_jwt(&hs256, &json!({"sub": "alice", "rooms": "a"})),
        raw_jwt(&hs256, &json!({"sub": "alice", "rooms": [1]})),
        raw_jwt(&hs256, &json!({"sub": ""})),
        raw_jwt(&hs256, &json!({"sub": "alice", "nbf": now_secs() + 3600})),
        raw_jwt(
            &json!({"alg": "HS512", "typ": "JWT"}),
            &json!({"sub": "alice"}),
        ),
        unsigned,
    ] {
        expect_error(
            &mut client,
            json!({"type": "refresh", "id": "bad", "payload": {"token": bad}}),
            "invalid_token",
        );
    }
    // The good refresh's rooms claim is still the one in force.
    expect_error(
        &mut client,
        json!({"type": "join", "id": "b", "payload": {"room": "b"}}),
        "forbidden",
    );
    assert_eq!(client.join("a")["payload"]["room"], "a");
}

#[test]
fn refresh_rooms_claim_applies_to_later_joins_and_memberships_stay() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("alice");
    alice.join("keep");
    let mut bob = server.connect("bob");
    bob.join("keep");
    assert_eq!(alice.recv()["type"], "user_joined");
    let narrower = token_with(with_rooms("alice", &["keep", "team:*"]));
    let reply =
        alice.request(json!({"type": "refresh", "id": "n", "payload": {"token": narrower}}));
    assert_eq!(reply["type"], "refreshed", "{reply}");
    expect_error(
        &mut alice,
        json!({"type": "join", "id": "o", "payload": {"room": "other"}}),
        "forbidden",
    );
    assert_eq!(alice.join("team:x")["payload"]["room"], "team:x");
    // The current membership of "keep" stays.
    publish(&mut bob, "keep", json!("still reaches alice"));
    let got = alice.recv();
    assert_eq!(got["type"], "message", "{got}");
    assert_eq!(got["payload"]["content"], "still reaches alice");
}

#[test]
fn refresh_name_applies_to_later_frames() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    let renamed = token_with(TokenClaims {
        sub: "alice".into(),
        name: Some("Alice Two".into()),
        ..Default::default()
    });
    let reply = members[0].request(json!({"type": "refresh", "payload": {"token": renamed}}));
    assert_eq!(reply["type"], "refreshed", "{reply}");
    let echo = publish(&mut members[0], "r", json!("hi"));
    assert_eq!(
        echo["payload"]["user"],
        json!({"id": "alice", "name": "Alice Two"})
    );
    let got = members[1].recv();
    assert_eq!(
        got["payload"]["user"],
        json!({"id": "alice", "name": "Alice Two"})
    );
}

// ---------------------------------------------------------------------------
// forbidden (rooms claim)
// ---------------------------------------------------------------------------

#[test]
fn rooms_claim_exact_name() {
    let server = TestServer::start(&[]);
    let (mut client, _) = connect_with(&server, with_rooms("alice", &["lobby"]));
    assert_eq!(client.join("lobby")["payload"]["room"], "lobby");
    for room in ["lobby2", "lobb", "Lobby", "x"] {
        expect_error(
            &mut client,
            json!({"type": "join", "id": room, "payload": {"room": room}}),
            "forbidden",
        );
    }
}

#[test]
fn rooms_claim_prefix_pattern() {
    let server = TestServer::start(&[]);
    let (mut client, _) = connect_with(&server, with_rooms("alice", &["team:*"]));
    assert_eq!(client.join("team:a")["payload"]["room"], "team:a");
    assert_eq!(client.join("team:")["payload"]["room"], "team:");
    assert_eq!(client.join("team:a:b")["payload"]["room"], "team:a:b");
    for room in ["teamx", "team", "xteam:a", "Team:a"] {
        expect_error(
            &mut client,
            json!({"type": "join", "id": room, "payload": {"room": room}}),
            "forbidden",
        );
    }
}

#[test]
fn rooms_claim_star_allows_all_and_empty_allows_none() {
    let server = TestServer::start(&[]);
    let (mut all, _) = connect_with(&server, with_rooms("alice", &["*"]));
    assert_eq!(all.join("anything")["payload"]["room"], "anything");
    let (mut none, _) = connect_with(&server, with_rooms("bob", &[]));
    for room in ["anything", "a", "team:a"] {
        expect_error(
            &mut none,
            json!({"type": "join", "id": 1, "payload": {"room": room}}),
            "forbidden",
        );
    }
    expect_error(
        &mut none,
        json!({"type": "presence", "id": 2, "payload": {"room": "anything"}}),
        "forbidden",
    );
}

#[test]
fn forbidden_wins_over_not_in_room() {
    let server = TestServer::start(&[]);
    let (mut client, _) = connect_with(&server, with_rooms("alice", &["a"]));
    expect_error(
        &mut client,
        json!({"type": "message", "id": "m", "payload": {"room": "b", "content": 1}}),
        "forbidden",
    );
    expect_error(
        &mut client,
        json!({"type": "leave", "id": "l", "payload": {"room": "b"}}),
        "forbidden",
    );
    expect_error(
        &mut client,
        json!({"type": "typing", "id": "t", "payload": {"room": "b", "is_typing": true}}),
        "forbidden",
    );
    // Within the claim, the same requests get not_in_room.
    expect_error(
        &mut client,
        json!({"type": "message", "id": "m2", "payload": {"room": "a", "content": 1}}),
        "not_in_room",
    );
}

#[test]
fn invalid_room_wins_over_forbidden() {
    let server = TestServer::start(&[]);
    let (mut client, _) = connect_with(&server, with_rooms("alice", &[]));
    for request in [
        json!({"type": "join", "id": 1, "payload": {"room": "bad room"}}),
        json!({"type": "message", "id": 2, "payload": {"room": "bad room", "content": 1}}),
        json!({"type": "leave", "id": 3, "payload": {"room": ""}}),
        json!({"type": "typing", "id": 4, "payload": {"room": "é", "is_typing": false}}),
        json!({"type": "presence", "id": 5, "payload": {"room": "a/b"}}),
    ] {
        expect_error(&mut client, request, "invalid_room");
    }
}

// ---------------------------------------------------------------------------
// recovery
// ---------------------------------------------------------------------------

/// Alice in `room` publishes `count` messages with content `{"i": n}`;
/// returns alice and the room's epoch.
fn room_with_messages(server: &TestServer, room: &str, count: u64) -> (Client, String) {
    let mut alice = server.connect("alice");
    let joined = alice.join(room);
    let epoch = joined["payload"]["epoch"].as_str().unwrap().to_string();
    for n in 1..=count {
        let echo = publish(&mut alice, room, json!({"i": n}));
        assert_eq!(echo["payload"]["seq"], n);
    }
    (alice, epoch)
}

#[test]
fn join_with_since_replays_missed_messages_before_live_ones() {
    let server = TestServer::start(&[]);
    let (mut alice, epoch) = room_with_messages(&server, "r", 5);
    let mut bob = server.connect("bob");
    let joined = bob.request(
        json!({"type": "join", "id": "rj", "payload": {"room": "r", "since": 2, "epoch": epoch}}),
    );
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["id"], "rj");
    assert_eq!(
        joined["payload"],
        json!({"room": "r", "count": 2, "seq": 5, "epoch": epoch, "recovered": true, "missed": 3})
    );
    for seq in 3..=5u64 {
        let replayed = bob.recv();
        assert_eq!(replayed["type"], "message", "{replayed}");
        assert_eq!(replayed["payload"]["seq"], seq);
        assert_eq!(replayed["payload"]["content"], json!({"i": seq}));
        assert_eq!(replayed["payload"]["user"], user("alice"));
        assert_eq!(replayed["payload"]["room"], "r");
    }
    assert_eq!(alice.recv()["type"], "user_joined");
    publish(&mut alice, "r", json!({"i": 6}));
    let live = bob.recv();
    assert_eq!(live["type"], "message", "{live}");
    assert_eq!(live["payload"]["seq"], 6);
    bob.assert_alive();
}

#[test]
fn join_with_since_equal_to_seq_recovers_nothing_missed() {
    let server = TestServer::start(&[]);
    let (_alice, epoch) = room_with_messages(&server, "r", 5);
    let mut bob = server.connect("bob");
    let joined = join_reply(&mut bob, json!({"room": "r", "since": 5, "epoch": epoch}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["recovered"], true);
    assert_eq!(joined["payload"]["missed"], 0);
    bob.assert_alive();
}

#[test]
fn join_with_since_beyond_seq_is_not_recovered() {
    let server = TestServer::start(&[]);
    let (_alice, epoch) = room_with_messages(&server, "r", 5);
    let mut bob = server.connect("bob");
    let joined = join_reply(&mut bob, json!({"room": "r", "since": 9, "epoch": epoch}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["recovered"], false);
    assert_eq!(joined["payload"]["missed"], 0);
    assert_eq!(joined["payload"]["seq"], 5);
    bob.assert_alive();
}

#[test]
fn join_with_since_beyond_any_seq_is_not_recovered_even_past_u64() {
    let server = TestServer::start(&[]);
    let (_alice, _epoch) = room_with_messages(&server, "r", 1);
    let mut bob = server.connect("bob");
    // A non-negative integer greater than the room's seq, just too big for a u64.
    bob.send_text(
        r#"{"type":"join","id":"big","payload":{"room":"r","since":18446744073709551616}}"#,
    );
    let joined = bob.recv();
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["recovered"], false);
    assert_eq!(joined["payload"]["missed"], 0);
}

#[test]
fn join_with_another_epoch_is_not_recovered_and_replays_nothing() {
    let server = TestServer::start(&[]);
    let (_alice, epoch) = room_with_messages(&server, "r", 5);
    let mut bob = server.connect("bob");
    let joined = join_reply(
        &mut bob,
        json!({"room": "r", "since": 2, "epoch": "0123456789abcdef-old"}),
    );
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(
        joined["payload"]["epoch"], epoch,
        "the room's epoch is reported"
    );
    assert_eq!(joined["payload"]["recovered"], false);
    assert_eq!(joined["payload"]["missed"], 0);
    bob.assert_alive();
}

#[test]
fn join_with_since_without_epoch_means_the_current_epoch() {
    let server = TestServer::start(&[]);
    let (_alice, _epoch) = room_with_messages(&server, "r", 5);
    let mut bob = server.connect("bob");
    let joined = join_reply(&mut bob, json!({"room": "r", "since": 3}));
    assert_eq!(joined["payload"]["recovered"], true, "{joined}");
    assert_eq!(joined["payload"]["missed"], 2);
    assert_eq!(bob.recv()["payload"]["seq"], 4);
    assert_eq!(bob.recv()["payload"]["seq"], 5);
    bob.assert_alive();
}

#[test]
fn join_without_since_has_no_recovery_keys_even_with_an_epoch() {
    let server = TestServer::start(&[]);
    let (_alice, epoch) = room_with_messages(&server, "r", 2);
    let mut bob = server.connect("bob");
    for payload in [
        json!({"room": "r"}),
        json!({"room": "r", "epoch": epoch}),
        json!({"room": "r", "epoch": "some-other-epoch"}),
    ] {
        let joined = join_reply(&mut bob, payload);
        assert_eq!(joined["type"], "joined", "{joined}");
        let fields = joined["payload"].as_object().unwrap();
        assert!(!fields.contains_key("recovered"), "{joined}");
        assert!(!fields.contains_key("missed"), "{joined}");
        assert_eq!(fields["seq"], 2);
        bob.assert_alive();
    }
}

#[test]
fn join_with_since_older_than_history_replays_what_is_left() {
    let server = TestServer::start(&["--history", "3"]);
    let (_alice, epoch) = room_with_messages(&server, "r", 5);
    let mut bob = server.connect("bob");
    let joined = join_reply(&mut bob, json!({"room": "r", "since": 0, "epoch": epoch}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["recovered"], false);
    assert_eq!(joined["payload"]["missed"], 3);
    for seq in 3..=5u64 {
        let replayed = bob.recv();
        assert_eq!(replayed["type"], "message", "{replayed}");
        assert_eq!(replayed["payload"]["seq"], seq);
    }
    bob.assert_alive();
    // Since 2 needs exactly seq 3..5, all still held: recovered.
    let joined = join_reply(&mut bob, json!({"room": "r", "since": 2, "epoch": epoch}));
    assert_eq!(joined["payload"]["recovered"], true, "{joined}");
    assert_eq!(joined["payload"]["missed"], 3);
}

#[test]
fn join_with_a_bad_since_or_epoch_is_invalid_message() {
    let server = TestServer::start(&[]);
    let (_alice, epoch) = room_with_messages(&server, "r", 2);
    let mut bob = server.connect("bob");
    for payload in [
        json!({"room": "r", "since": -1}),
        json!({"room": "r", "since": 1.5}),
        json!({"room": "r", "since": "2"}),
        json!({"room": "r", "since": 1, "epoch": 5}),
        json!({"room": "r", "since": 1, "epoch": {"e": epoch}}),
    ] {
        expect_error(
            &mut bob,
            json!({"type": "join", "id": "bad", "payload": payload}),
            "invalid_message",
        );
    }
    // None of them joined.
    expect_error(
        &mut bob,
        json!({"type": "message", "id": "m", "payload": {"room": "r", "content": 1}}),
        "not_in_room",
    );
}

// ---------------------------------------------------------------------------
// too_many_rooms, room names
// ---------------------------------------------------------------------------

#[test]
fn joining_more_rooms_than_allowed_is_too_many_rooms() {
    let server = TestServer::start(&["--max-rooms-per-connection", "2"]);
    let mut client = server.connect("alice");
    client.join("a");
    client.join("b");
    expect_error(
        &mut client,
        json!({"type": "join", "id": "c", "payload": {"room": "c"}}),
        "too_many_rooms",
    );
    // Re-joining a room held is not a new room.
    assert_eq!(client.join("a")["payload"]["room"], "a");
    // The limit is per connection.
    let mut other_tab = server.connect("alice");
    other_tab.join("c");
    other_tab.join("d");
    // Leaving frees a slot.
    let left = client.request(json!({"type": "leave", "payload": {"room": "b"}}));
    assert_eq!(left["type"], "left");
    assert_eq!(client.join("c")["payload"]["room"], "c");
}

#[test]
fn room_names_outside_the_allowed_set_are_invalid_room() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    let too_long = "a".repeat(65);
    for room in [
        too_long.as_str(),
        "a b",
        "",
        "é",
        "café",
        "日本",
        "room/x",
        "room?x",
        "tab\there",
        "a*",
    ] {
        expect_error(
            &mut client,
            json!({"type": "join", "id": room, "payload": {"room": room}}),
            "invalid_room",
        );
    }
    // invalid_room comes before not_in_room.
    expect_error(
        &mut client,
        json!({"type": "message", "id": 1, "payload": {"room": too_long, "content": 1}}),
        "invalid_room",
    );
    // 64 characters of the allowed set are fine.
    let longest = "Az09_-.:".repeat(8);
    assert_eq!(longest.len(), 64);
    assert_eq!(client.join(&longest)["payload"]["room"], longest.as_str());
    assert_eq!(client.join("x")["payload"]["room"], "x");
}

// ---------------------------------------------------------------------------
// Envelope errors (§3, §11)
// ---------------------------------------------------------------------------

#[test]
fn text_that_is_not_json_is_invalid_json() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    for text in [
        "not json",
        "{\"type\":",
        "",
        "{type: 'ping'}",
        "{\"type\":\"ping\"} x",
    ] {
        expect_raw_error(&mut client, text, "invalid_json", None);
    }
}

#[test]
fn json_that_is_not_an_object_is_invalid_message() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    for text in [
        r#"[{"type":"ping","id":"x"}]"#,
        "[1,2]",
        r#""ping""#,
        "42",
        "null",
        "true",
    ] {
        expect_raw_error(&mut client, text, "invalid_message", None);
    }
}

#[test]
fn missing_type_is_invalid_message() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    expect_raw_error(
        &mut client,
        r#"{"id":"no-type","payload":{}}"#,
        "invalid_message",
        Some(json!("no-type")),
    );
    expect_raw_error(&mut client, "{}", "invalid_message", None);
}

#[test]
fn type_that_is_not_a_string_is_invalid_message() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    for (text, id) in [
        (r#"{"type":5,"id":"t5"}"#, Some(json!("t5"))),
        (r#"{"type":null,"id":6}"#, Some(json!(6))),
        (r#"{"type":["ping"]}"#, None),
        (r#"{"type":{"name":"ping"}}"#, None),
    ] {
        expect_raw_error(&mut client, text, "invalid_message", id);
    }
}

#[test]
fn unknown_type_is_unknown_type_with_id() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    expect_raw_error(
        &mut client,
        r#"{"type":"nope","id":"u-1","payload":{}}"#,
        "unknown_type",
        Some(json!("u-1")),
    );
    expect_raw_error(
        &mut client,
        r#"{"type":"","id":3}"#,
        "unknown_type",
        Some(json!(3)),
    );
    expect_raw_error(&mut client, r#"{"type":"welcome"}"#, "unknown_type", None);
}

#[test]
fn type_is_case_sensitive() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    for kind in ["Join", "PING", "Message", "join "] {
        expect_error(
            &mut client,
            json!({"type": kind, "id": kind, "payload": {"room": "r"}}),
            "unknown_type",
        );
    }
    // The lower-case one works.
    assert_eq!(client.join("r")["payload"]["room"], "r");
}

#[test]
fn id_that_is_not_a_string_or_number_is_invalid_message() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    for id in [json!({"a": 1}), json!([1]), json!(true), json!(false)] {
        // invalid_message wins over unknown_type, and the bad id is not echoed.
        for kind in ["ping", "nope"] {
            let text = json!({"type": kind, "id": id}).to_string();
            expect_raw_error(&mut client, &text, "invalid_message", None);
        }
    }
}

#[test]
fn id_longer_than_256_bytes_is_invalid_message_without_id() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    for long in ["x".repeat(257), "é".repeat(129), "x".repeat(5000)] {
        let text = json!({"type": "ping", "id": long}).to_string();
        expect_raw_error(&mut client, &text, "invalid_message", None);
    }
    // 256 bytes are fine, counted in bytes (128 two-byte characters).
    for ok in ["x".repeat(256), "é".repeat(128)] {
        let pong = client.request(json!({"type": "ping", "id": ok}));
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["id"], ok.as_str());
    }
}

#[test]
fn null_id_counts_as_no_id() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    let pong = client.request(json!({"type": "ping", "id": null}));
    assert_eq!(pong["type"], "pong", "{pong}");
    assert!(pong.get("id").is_none(), "{pong}");
    expect_raw_error(
        &mut client,
        r#"{"type":"nope","id":null}"#,
        "unknown_type",
        None,
    );
    let joined = client.request(json!({"type": "join", "id": null, "payload": {"room": "r"}}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert!(joined.get("id").is_none(), "{joined}");
}

#[test]
fn payload_of_the_wrong_shape_is_invalid_message_with_id() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    client.join("r");
    for (index, (kind, payload)) in [
        ("join", json!({"room": 5})),
        ("join", json!({})),
        ("join", json!(["r"])),
        ("join", json!("r")),
        ("leave", json!({"room": null})),
        ("message", json!({"room": "r"})),
        ("message", json!({"content": 1})),
        ("direct", json!({"to": 5, "content": 1})),
        ("direct", json!({"to": "bob"})),
        ("typing", json!({"room": "r", "is_typing": "yes"})),
        ("typing", json!({"room": "r"})),
        ("presence", json!({"room": ["r"]})),
        ("refresh", json!({"token": 5})),
        ("refresh", json!({})),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("w-{index}");
        let reply = client.request(json!({"type": kind, "id": id, "payload": payload}));
        assert_error(&reply, "invalid_message", Some(json!(id)));
        client.assert_alive();
    }
    // A join without any payload at all lacks its room.
    expect_raw_error(
        &mut client,
        r#"{"type":"join","id":9}"#,
        "invalid_message",
        Some(json!(9)),
    );
}

#[test]
fn payload_may_be_omitted_where_no_fields_are_needed() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    client.send_text(r#"{"type":"ping","id":"bare"}"#);
    let pong = client.recv();
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "bare");
    assert_plausible_ms(&pong["payload"]["server_time"]);
}

#[test]
fn escaped_strings_in_the_envelope_are_decoded() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    client.send_text(r#"{"type":"p\u0069ng","id":"\u0065sc"}"#);
    let pong = client.recv();
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "esc");
    client.send_text(r#"{"type":"join","payload":{"room":"\u0072oom\u003a1"}}"#);
    let joined = client.recv();
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["room"], "room:1");
}

#[test]
fn unknown_top_level_and_payload_keys_are_ignored() {
    let server = TestServer::start(&[]);
    let mut members = room_of(&server, "r", &["alice", "bob"]);
    members[0]
        .send_text(r#"{"type":"ping","id":"k","extra":{"a":[1]},"version":2,"payload":{"x":1}}"#);
    let pong = members[0].recv();
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "k");
    members[0].send_text(
        r#"{"meta":true,"type":"message","id":"m","payload":{"room":"r","content":{"t":1},"priority":"high","seq":99}}"#,
    );
    let echo = members[0].recv();
    assert_eq!(echo["type"], "message", "{echo}");
    assert_eq!(echo["payload"]["content"], json!({"t": 1}));
    assert_eq!(
        echo["payload"]["seq"], 1,
        "a client-supplied seq is ignored"
    );
    assert!(echo["payload"].get("priority").is_none(), "{echo}");
    assert_eq!(members[0].recv()["type"], "ack");
    assert_eq!(members[1].recv()["payload"]["seq"], 1);
    let joined = members[1].request(
        json!({"type": "join", "id": 1, "trace": "t", "payload": {"room": "s", "colour": "red"}}),
    );
    assert_eq!(joined["type"], "joined", "{joined}");
}

// ---------------------------------------------------------------------------
// /ws/{room} (§11 Membership)
// ---------------------------------------------------------------------------

#[test]
fn ws_room_path_joins_right_after_welcome() {
    let server = TestServer::start(&[]);
    let mut alice = server.open(&format!("/ws/lobby?token={}", token("alice")));
    assert_eq!(alice.recv()["type"], "welcome");
    let joined = alice.recv();
    assert_eq!(joined["type"], "joined", "{joined}");
    assert!(joined.get("id").is_none());
    assert_eq!(joined["payload"]["room"], "lobby");
    assert_eq!(joined["payload"]["count"], 1);

    let mut bad = server.open(&format!("/ws/bad%20room?token={}", token("bob")));
    assert_eq!(bad.recv()["type"], "welcome");
    let error = bad.recv();
    assert_error(&error, "invalid_room", None);
    bad.assert_alive();

    let claims = token_with(with_rooms("carol", &["other"]));
    let mut refused = server.open(&format!("/ws/lobby?token={claims}"));
    assert_eq!(refused.recv()["type"], "welcome");
    assert_error(&refused.recv(), "forbidden", None);
    refused.assert_alive();
    // Neither of them joined: alice heard of nobody.
    alice.assert_alive();
}

// ---------------------------------------------------------------------------
// rate_limited (§5, §8, §11)
// ---------------------------------------------------------------------------

/// Writes several text frames back to back, then flushes once.
fn send_back_to_back(client: &mut Client, requests: &[Value]) {
    for request in requests {
        client
            .ws
            .write(Message::text(request.to_string()))
            .expect("queue");
    }
    client.ws.flush().expect("flush");
}

#[test]
fn over_the_rate_messages_get_rate_limited_and_take_no_seq() {
    // One token a second, two banked. The frames are written back to back; the
    // only assumption is that the server reads them within a second.
    let server = TestServer::start(&["--rate-limit", "1", "--rate-burst", "2"]);
    let mut bystander = server.connect("anna");
    bystander.join("calm");
    let mut eve = server.connect("eve");
    send_back_to_back(
        &mut eve,
        &[
            json!({"type": "join", "id": "j", "payload": {"room": "calm"}}),
            json!({"type": "message", "id": "ok", "payload": {"room": "calm", "content": 1}}),
            json!({"type": "message", "id": "no", "payload": {"room": "calm", "content": 2}}),
        ],
    );
    assert_eq!(eve.recv()["type"], "joined");
    let own = eve.recv();
    assert_eq!(own["type"], "message", "{own}");
    assert_eq!(own["payload"]["seq"], 1);
    assert_eq!(eve.recv()["id"], "ok");
    assert_error(&eve.recv(), "rate_limited", Some(json!("no")));
    assert_eq!(bystander.recv()["type"], "user_joined");
    let got = bystander.recv();
    assert_eq!(got["payload"]["content"], 1, "{got}");
    // The refused message reached nobody and took no seq.
    let echo = publish(&mut bystander, "calm", json!("next"));
    assert_eq!(echo["payload"]["seq"], 2);
    let got = eve.recv();
    assert_eq!(got["payload"]["seq"], 2, "{got}");
}

#[test]
fn flooding_past_twice_the_burst_closes_1008() {
    let server = TestServer::start(&["--rate-limit", "1", "--rate-burst", "2"]);
    let mut bystanders = room_of(&server, "calm", &["anna", "ben"]);
    let mut flood = server.connect("flood");
    let pings: Vec<Value> = (1..=6)
        .map(|id| json!({"type": "ping", "id": id}))
        .collect();
    send_back_to_back(&mut flood, &pings);
    for id in 1..=2 {
        let pong = flood.recv();
        assert_eq!(pong["type"], "pong", "a banked token: {pong}");
        assert_eq!(pong["id"], id);
    }
    for id in 3..=6 {
        assert_error(&flood.recv(), "rate_limited", Some(json!(id)));
    }
    // 2 × burst refusals in a row.
    let (code, _) = flood.expect_close();
    assert_eq!(code, 1008);
    assert_bystanders_chat(&mut bystanders, "calm", "after 1008");
}

// ---------------------------------------------------------------------------
// Frames (§8): closes for bad frames, other clients unaffected
// ---------------------------------------------------------------------------

/// A server with two chatting bystanders in "calm" and a fresh client "eve".
fn server_with_bystanders(flags: &[&str]) -> (TestServer, Vec<Client>, Client) {
    let server = TestServer::start(flags);
    let bystanders = room_of(&server, "calm", &["anna", "ben"]);
    let eve = server.connect("eve");
    (server, bystanders, eve)
}

/// A ping request of exactly `len` bytes.
fn ping_of_len(id: &str, len: usize) -> String {
    let bare = json!({"type": "ping", "id": id, "pad": ""}).to_string();
    let text = json!({"type": "ping", "id": id, "pad": "p".repeat(len - bare.len())}).to_string();
    assert_eq!(text.len(), len);
    text
}

#[test]
fn message_larger_than_max_message_size_closes_1009() {
    let (server, mut bystanders, mut eve) = server_with_bystanders(&["--max-message-size", "1024"]);
    // Exactly the limit is fine.
    eve.send_text(&ping_of_len("exact", 1024));
    assert_eq!(eve.recv()["id"], "exact");
    // One byte more closes with 1009.
    eve.send_text(&ping_of_len("over", 1025));
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1009);
    // So does a 2000-byte message on another connection.
    let mut mallory = server.connect("mallory");
    let big = json!({"type": "message", "payload": {"room": "calm", "content": "x".repeat(2000)}})
        .to_string();
    assert!(big.len() > 2000);
    mallory.send_text(&big);
    let (code, _) = mallory.expect_close();
    assert_eq!(code, 1009);
    assert_bystanders_chat(&mut bystanders, "calm", "after 1009");
}

#[test]
fn fragmented_text_message_is_reassembled_around_a_control_frame() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    let mut bytes = masked_frame(0x01, br#"{"type":"pi"#);
    bytes.extend(masked_frame(0x89, b"mid"));
    bytes.extend(masked_frame(0x00, br#"ng","id""#));
    bytes.extend(masked_frame(0x80, br#":"frag"}"#));
    write_raw(&mut client, &bytes);
    match client.ws.read().expect("read") {
        Message::Pong(payload) => assert_eq!(&payload[..], b"mid"),
        other => panic!("expected the pong to the interleaved ping, got {other:?}"),
    }
    let pong = client.recv();
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "frag");
    client.assert_alive();
}

#[test]
fn fragmented_message_over_the_limit_closes_1009() {
    let (_server, mut bystanders, mut eve) =
        server_with_bystanders(&["--max-message-size", "1024"]);
    eve.assert_alive();
    // Each frame is under the limit; the reassembled message is not.
    let mut bytes = masked_frame(0x01, &[b' '; 600]);
    bytes.extend(masked_frame(0x80, &[b' '; 600]));
    write_raw(&mut eve, &bytes);
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1009);
    assert_bystanders_chat(&mut bystanders, "calm", "after fragments");
}

#[test]
fn websocket_ping_gets_a_pong_and_a_client_close_gets_a_close_reply() {
    let server = TestServer::start(&[]);
    let mut client = server.connect("alice");
    client
        .ws
        .send(Message::Ping(b"are you there".to_vec().into()))
        .expect("ping");
    match client.ws.read().expect("read") {
        Message::Pong(payload) => assert_eq!(&payload[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    client.assert_alive();
    client
        .ws
        .close(Some(CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "bye".into(),
        }))
        .expect("close");
    let (code, _) = client.expect_close();
    assert_eq!(code, 1000, "the close code is echoed");
}

#[test]
fn oversized_control_frame_closes_1002() {
    let (_server, mut bystanders, mut eve) = server_with_bystanders(&[]);
    eve.assert_alive();
    // A ping may carry at most 125 bytes.
    write_raw(&mut eve, &masked_frame(0x89, &[b'x'; 126]));
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1002);
    assert_bystanders_chat(&mut bystanders, "calm", "after big ping");
}

#[test]
fn binary_frame_closes_1003() {
    let (_server, mut bystanders, mut eve) = server_with_bystanders(&[]);
    eve.join("calm");
    for bystander in bystanders.iter_mut() {
        assert_eq!(bystander.recv()["type"], "user_joined");
    }
    eve.ws
        .send(Message::binary(br#"{"type":"ping"}"#.to_vec()))
        .expect("send binary");
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1003);
    // Eve's connection is gone: the others are told she left.
    for bystander in bystanders.iter_mut() {
        let gone = bystander.recv();
        assert_eq!(gone["type"], "user_left", "{gone}");
        assert_eq!(gone["payload"]["user"], user("eve"));
    }
    assert_bystanders_chat(&mut bystanders, "calm", "after 1003");
}

#[test]
fn invalid_utf8_in_a_text_frame_closes_1007() {
    let (_server, mut bystanders, mut eve) = server_with_bystanders(&[]);
    eve.assert_alive();
    // FIN + text, payload "{"type":"ping"}" with invalid bytes inside the string.
    let mut payload = br#"{"type":"pi"#.to_vec();
    payload.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    payload.extend_from_slice(br#"ng"}"#);
    write_raw(&mut eve, &masked_frame(0x81, &payload));
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1007);
    assert_bystanders_chat(&mut bystanders, "calm", "after 1007");
}

#[test]
fn frame_with_a_reserved_bit_closes_1002() {
    let (_server, mut bystanders, mut eve) = server_with_bystanders(&[]);
    eve.assert_alive();
    // FIN + RSV1 + text: no extension was negotiated.
    write_raw(&mut eve, &masked_frame(0xC1, br#"{"type":"ping"}"#));
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1002);
    assert_bystanders_chat(&mut bystanders, "calm", "after rsv1");
}

#[test]
fn frame_with_an_unknown_opcode_closes_1002() {
    let (_server, mut bystanders, mut eve) = server_with_bystanders(&[]);
    eve.assert_alive();
    // FIN + opcode 0x3 (reserved non-control).
    write_raw(&mut eve, &masked_frame(0x83, b"hello"));
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1002);
    assert_bystanders_chat(&mut bystanders, "calm", "after opcode");
}

#[test]
fn unmasked_client_frame_closes_1002() {
    let (_server, mut bystanders, mut eve) = server_with_bystanders(&[]);
    eve.assert_alive();
    let payload = br#"{"type":"ping"}"#;
    let mut frame = vec![0x81, payload.len() as u8];
    frame.extend_from_slice(payload);
    write_raw(&mut eve, &frame);
    let (code, _) = eve.expect_close();
    assert_eq!(code, 1002);
    assert_bystanders_chat(&mut bystanders, "calm", "after unmasked");
}

// ---------------------------------------------------------------------------
// Slow consumers (§8, §11)
// ---------------------------------------------------------------------------

const FLOOD_ROOM: &str = "flood";

/// How many ~60 KB messages the flood publishes: about 12 MB, far more than
/// the kernel buffers of a connection that never reads can absorb.
const FLOOD_COUNT: u64 = 200;

/// A server with the marks of the brief, a room with a stalled member (never
/// read), a healthy member and a sender. The sender publishes `FLOOD_COUNT`
/// messages of ~60 KB, each only after the healthy member (read on its own
/// thread) has received the previous one in order. Returns the server, the
/// sender, the healthy member and the stalled member, still unread.
fn flood_with_a_stalled_member() -> (TestServer, Client, Client, Client) {
    let server = TestServer::start(&[
        "--write-buffer-soft",
        "65536",
        "--write-buffer-hard",
        "200000",
        "--max-message-size",
        "65536",
        "--rate-limit",
        "1000000",
        "--rate-burst",
        "1000000",
    ]);
    let mut stalled = server.connect("stalled");
    stalled.join(FLOOD_ROOM);
    let mut healthy = server.connect("healthy");
    healthy.join(FLOOD_ROOM);
    let mut sender = server.connect("sender");
    sender.join(FLOOD_ROOM);
    let announce = healthy.recv();
    assert_eq!(announce["type"], "user_joined", "{announce}");

    let (received, progress) = mpsc::channel();
    let reader = thread::spawn(move || {
        for expected in 1..=FLOOD_COUNT {
            let got = healthy.recv();
            assert_eq!(got["type"], "message", "healthy member got {}", got["type"]);
            assert_eq!(got["payload"]["seq"], expected, "healthy member: seq gap");
            assert_eq!(got["payload"]["content"]["i"], expected);
            received.send(expected).expect("main thread alive");
        }
        healthy
    });
    let pad = "x".repeat(60_000);
    for i in 1..=FLOOD_COUNT {
        sender.send(json!({"type": "message", "payload": {"room": FLOOD_ROOM, "content": {"i": i, "pad": pad}}}));
        let echo = sender.recv();
        assert_eq!(echo["type"], "message", "sender got {}", echo["type"]);
        assert_eq!(echo["payload"]["seq"], i);
        match progress.recv_timeout(WAIT) {
            Ok(seq) => assert_eq!(seq, i),
            Err(_) => match reader.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(_) => panic!("healthy member stopped before seq {i}"),
            },
        }
    }
    let healthy = match reader.join() {
        Ok(healthy) => healthy,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    (server, sender, healthy, stalled)
}

/// What a client that finally reads finds in its socket.
#[derive(Debug, Default)]
struct Drained {
    seqs: Vec<u64>,
    directs: Vec<Value>,
    lagged: Vec<Value>,
    close: Option<u16>,
}

/// Reads frames until a `pong` with `id`, or a close; records message seqs and `lagged`.
fn drain_until_pong(client: &mut Client, id: &str, into: &mut Drained) -> bool {
    // The send may fail if the server already closed this connection.
    let ping = json!({"type": "ping", "id": id}).to_string();
    let _ = client.ws.send(Message::text(ping));
    read_until(client, into, |frame| {
        frame["type"] == "pong" && frame["id"] == id
    })
}

/// Reads frames, recording them, until `stop` matches one (true) or a close arrives (false).
fn read_until(client: &mut Client, into: &mut Drained, stop: impl Fn(&Value) -> bool) -> bool {
    loop {
        match client.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).expect("json");
                match frame["type"].as_str() {
                    Some("message") => into.seqs.push(frame["payload"]["seq"].as_u64().unwrap()),
                    Some("lagged") => into.lagged.push(frame.clone()),
                    Some("direct") => into.directs.push(frame.clone()),
                    _ => {}
                }
                if stop(&frame) {
                    return true;
                }
            }
            Ok(Message::Close(frame)) => {
                into.close = Some(frame.map_or(1005, |CloseFrame { code, .. }| u16::from(code)));
                return false;
            }
            Ok(_) => continue,
            Err(error) => panic!("stalled client: connection ended without a close frame: {error}"),
        }
    }
}

#[test]
fn slow_consumer_loses_broadcasts_or_is_closed_while_others_get_everything() {
    let (server, mut sender, mut healthy, mut stalled) = flood_with_a_stalled_member();
    // A direct is never dropped, however full the queue.
    let ack = sender.request(
        json!({"type": "direct", "id": "dm", "payload": {"to": "stalled", "content": "urgent"}}),
    );
    assert_eq!(ack["type"], "ack", "{ack}");
    let mut drained = Drained::default();
    let answered = drain_until_pong(&mut stalled, "drain", &mut drained);
    assert!(
        drained.seqs.windows(2).all(|pair| pair[0] < pair[1]),
        "seqs out of order: {:?}",
        drained.seqs
    );
    assert!(drained.seqs.first().is_none_or(|&first| first == 1));
    if answered {
        // Not closed: the direct and the pong were kept...
        assert_eq!(drained.directs.len(), 1, "{drained:?}");
        assert_eq!(drained.directs[0]["payload"]["content"], "urgent");
        // ...but it must have lost broadcasts (the tail of the flood).
        let last = drained.seqs.last().copied().unwrap_or(0);
        assert!(
            last < FLOOD_COUNT,
            "a client that never read received all {FLOOD_COUNT} messages"
        );
        // The next live message shows the gap.
        publish(&mut sender, FLOOD_ROOM, json!({"i": FLOOD_COUNT + 1}));
        assert!(read_until(
            &mut stalled,
            &mut drained,
            |frame| frame["type"] == "message"
        ));
        assert_eq!(drained.seqs.last().copied(), Some(FLOOD_COUNT + 1));
        assert_eq!(healthy.recv()["payload"]["seq"], FLOOD_COUNT + 1);
        stalled.assert_alive();
    } else {
        assert_eq!(drained.close, Some(4000), "{drained:?}");
        let gone = healthy.recv();
        assert_eq!(gone["type"], "user_left", "{gone}");
    }
    // The server survived, and the healthy connections still work.
    healthy.assert_alive();
    sender.assert_alive();
    let mut late = server.connect("late");
    assert_eq!(late.join(FLOOD_ROOM)["type"], "joined");
}

#[test]
fn slow_consumer_gets_lagged_for_the_dropped_range_once_it_drains() {
    let (_server, mut sender, _healthy, mut stalled) = flood_with_a_stalled_member();
    let mut drained = Drained::default();
    assert!(
        drain_until_pong(&mut stalled, "drain", &mut drained),
        "closed: {drained:?}"
    );
    let last = drained.seqs.last().copied().unwrap_or(0);
    assert!(last < FLOOD_COUNT, "nothing was dropped");
    // The queue has drained; a live message follows, and `lagged` must come before it.
    publish(&mut sender, FLOOD_ROOM, json!({"i": FLOOD_COUNT + 1}));
    assert!(read_until(&mut stalled, &mut drained, |frame| {
        frame["type"] == "message" && frame["payload"]["seq"] == FLOOD_COUNT + 1
    }));
    assert_eq!(
        drained.lagged,
        vec![
            json!({"type": "lagged", "payload": {"room": FLOOD_ROOM, "from_seq": last + 1, "to_seq": FLOOD_COUNT}})
        ],
        "{:?}",
        drained.seqs
    );
}

#[test]
fn slow_consumer_that_left_the_room_gets_no_lagged_for_it() {
    let (_server, mut sender, mut healthy, mut stalled) = flood_with_a_stalled_member();
    // The leave is answered even though the queue is over the soft mark.
    stalled.send(json!({"type": "leave", "id": "bye", "payload": {"room": FLOOD_ROOM}}));
    let mut drained = Drained::default();
    assert!(read_until(
        &mut stalled,
        &mut drained,
        |frame| frame["type"] == "left" && frame["id"] == "bye"
    ));
    assert!(
        drained.seqs.last().copied().unwrap_or(0) < FLOOD_COUNT,
        "nothing was dropped"
    );
    assert!(drain_until_pong(&mut stalled, "after", &mut drained));
    for member in [&mut healthy, &mut sender] {
        let gone = member.recv();
        assert_eq!(gone["type"], "user_left", "{gone}");
    }
    publish(&mut sender, FLOOD_ROOM, json!({"i": FLOOD_COUNT + 1}));
    assert_eq!(healthy.recv()["payload"]["seq"], FLOOD_COUNT + 1);
    assert!(drain_until_pong(&mut stalled, "last", &mut drained));
    assert!(drained.lagged.is_empty(), "{:?}", drained.lagged);
    assert!(drained.seqs.last().copied().unwrap_or(0) < FLOOD_COUNT);
}

/// What a client pushed over the hard mark by directs finds when it reads.
struct Evicted {
    /// Directs sent to it and acknowledged before it went offline.
    acked: u64,
    /// Directs it received, in order (checked).
    received: u64,
    /// The close code, if a close frame arrived.
    close: Option<u16>,
    /// How the stream ended otherwise.
    ending: String,
}

/// A client in room "r" with a healthy member stops reading; another client
/// sends it ~60 KB directs (never dropped) until it is offline. Checks that
/// its room heard it leave and the others are unaffected, then reads what
/// reached the stalled client.
fn push_over_the_hard_mark() -> Evicted {
    let server = TestServer::start(&[
        "--write-buffer-soft",
        "65536",
        "--write-buffer-hard",
        "200000",
        "--max-message-size",
        "65536",
        "--rate-limit",
        "1000000",
        "--rate-burst",
        "1000000",
    ]);
    let mut stalled = server.connect("stalled");
    stalled.join("r");
    let mut healthy = server.connect("healthy");
    healthy.join("r");
    let mut sender = server.connect("sender");
    let pad = "d".repeat(60_000);
    let mut acked = 0u64;
    loop {
        let n = acked + 1;
        let reply = sender.request(json!({"type": "direct", "id": n, "payload": {"to": "stalled", "content": {"n": n, "pad": pad}}}));
        if reply["type"] == "error" {
            assert_error(&reply, "user_offline", Some(json!(n)));
            break;
        }
        assert_eq!(reply["type"], "ack", "{reply}");
        acked += 1;
        assert!(
            acked < 500,
            "500 directs of 60 KB and the client is still open"
        );
    }
    // Its room hears that it left; the server and the others carry on.
    let gone = healthy.recv();
    assert_eq!(gone["type"], "user_left", "{gone}");
    assert_eq!(
        gone["payload"],
        json!({"room": "r", "user": user("stalled"), "count": 1})
    );
    healthy.assert_alive();
    sender.assert_alive();
    // The stalled client reads at once, well within the 1 s the server waits
    // for the close frame to be written.
    let mut evicted = Evicted {
        acked,
        received: 0,
        close: None,
        ending: String::new(),
    };
    loop {
        match stalled.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).expect("json");
                if frame["type"] == "user_joined" {
                    continue;
                }
                assert_eq!(frame["type"], "direct", "{}", frame["type"]);
                evicted.received += 1;
                assert_eq!(frame["payload"]["content"]["n"], evicted.received);
            }
            Ok(Message::Close(close)) => {
                evicted.close = Some(close.map_or(1005, |CloseFrame { code, .. }| u16::from(code)));
                return evicted;
            }
            Ok(_) => continue,
            Err(error) => {
                evicted.ending = error.to_string();
                return evicted;
            }
        }
    }
}

#[test]
fn slow_consumer_over_the_hard_mark_is_evicted_and_its_queue_discarded() {
    let evicted = push_over_the_hard_mark();
    assert!(
        evicted.received < evicted.acked,
        "the queued directs were discarded: received {} of {}",
        evicted.received,
        evicted.acked
    );
    assert!(
        evicted.close.is_none_or(|code| code == 4000),
        "close {:?}",
        evicted.close
    );
}

#[test]
fn slow_consumer_over_the_hard_mark_gets_close_4000_after_the_frame_in_flight() {
    let evicted = push_over_the_hard_mark();
    assert_eq!(
        evicted.close,
        Some(4000),
        "after {} of {} directs the stream ended with: {}",
        evicted.received,
        evicted.acked,
        evicted.ending
    );
}

// ---------------------------------------------------------------------------
// Graceful stop (§8)
// ---------------------------------------------------------------------------

#[test]
fn sigterm_closes_every_client_with_1001_and_a_retry_hint_then_exits_0() {
    let server = TestServer::start(&["--drain-ms", "3000"]);
    let addr = server.addr;
    let clients = room_of(&server, "r", &["alice", "bob", "carol"]);
    let (closes, closed) = mpsc::channel();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let closes = closes.clone();
            thread::spawn(move || {
                let close = client.expect_close();
                closes.send(close).expect("main thread alive");
            })
        })
        .collect();
    let stopping = thread::spawn(move || server.terminate());
    for index in 0..3 {
        let (code, reason) = closed.recv_timeout(WAIT).expect("a close frame");
        assert_eq!(code, 1001, "reason {reason:?}");
        let hint = reason
            .split("retry_ms=")
            .nth(1)
            .unwrap_or_else(|| panic!("no retry_ms= in {reason:?}"));
        let digits: String = hint.chars().take_while(char::is_ascii_digit).collect();
        let retry_ms: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("retry_ms is not a number in {reason:?}"));
        assert!(
            retry_ms <= 3000,
            "retry_ms={retry_ms} beyond --drain-ms 3000"
        );
        if index == 0 {
            // The drain has begun: the listener is already closed.
            let refused = std::net::TcpStream::connect(addr);
            assert!(
                refused.is_err(),
                "a new connection was accepted while draining"
            );
        }
    }
    for reader in readers {
        reader.join().expect("reader");
    }
    let status = stopping.join().expect("terminate");
    assert!(status.success(), "exit status {status:?}");
}
