//! Namespaces (PROTOCOL §14.1) end to end: each option, the longest prefix,
//! and a namespace's history default following `--history` (flag over file
//! over default). Runs with one loop and with several (`ROOMCAST_TEST_THREADS`).
mod common;

use serde_json::json;

use common::{Client, TestServer};

const CONFIG: &str = r#"
history = 50

[[namespace]]
prefix = "feed:"
client_publish = false

[[namespace]]
prefix = "duo:"
max_members = 2
member_events = false

[[namespace]]
prefix = "duo:short:"
history = 2
"#;

fn server(extra: &[&str]) -> TestServer {
    let path = common::scratch_file("roomcast.toml", CONFIG);
    let mut args = vec!["--config", path.to_str().unwrap(), "--api-key", "key"];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

fn message(client: &mut Client, room: &str, content: serde_json::Value) -> serde_json::Value {
    client
        .request(json!({"type": "message", "id": 1, "payload": {"room": room, "content": content}}))
}

/// How many messages a fresh joiner recovers with `since: 0`.
fn held(server: &TestServer, room: &str) -> usize {
    let mut reader = server.connect("reader");
    let joined = reader.request(json!({"type": "join", "payload": {"room": room, "since": 0}}));
    assert_eq!(joined["type"], "joined", "{joined}");
    let seq = joined["payload"]["seq"].as_u64().unwrap();
    let mut count = 0;
    if seq > 0 {
        loop {
            let frame = reader.recv();
            if frame["type"] == "message" {
                count += 1;
                if frame["payload"]["seq"].as_u64() == Some(seq) {
                    break;
                }
            }
        }
    }
    count
}

#[test]
fn a_read_only_namespace_answers_forbidden_and_the_api_still_publishes() {
    let server = server(&[]);
    let mut client = server.connect("alice");
    client.join("feed:news");
    let refused = message(&mut client, "feed:news", json!("hi"));
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "forbidden");
    let body = r#"{"room":"feed:news","content":"from the backend"}"#;
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(server.raw_status(request.as_bytes()), 200);
    let frame = client.recv_type("message");
    assert_eq!(frame["payload"]["content"], "from the backend");
    // Other rooms are open to clients.
    client.join("chat");
    assert_eq!(message(&mut client, "chat", json!(1))["type"], "message");
}

#[test]
fn max_members_refuses_a_third_user_with_room_full_and_events_stay_quiet() {
    let server = server(&[]);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    let mut carol = server.connect("carol");
    alice.join("duo:x");
    assert_eq!(bob.join("duo:x")["payload"]["count"], 2);
    let refused = carol.request(json!({"type": "join", "id": "c", "payload": {"room": "duo:x"}}));
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "room_full");
    assert_eq!(refused["id"], "c");
    // A second connection of a member is not a new user.
    let mut bob_again = server.connect("bob");
    assert_eq!(bob_again.join("duo:x")["payload"]["count"], 2);
    // member_events = false: alice's next frame is bob's message, not
    // `user_joined` (which would have come first, from the same room).
    assert_eq!(message(&mut bob, "duo:x", json!("m"))["type"], "message");
    let next = alice.recv();
    assert_eq!(next["type"], "message", "{next}");
}

#[test]
fn the_longest_prefix_wins_and_history_follows_the_flag_over_the_file() {
    // The file says history = 50; the flag says 3: rooms outside a namespace,
    // and namespaces without `history`, keep 3; `duo:short:` keeps its 2.
    let server = server(&["--history", "3"]);
    let mut writer = server.connect("writer");
    for room in ["plain", "duo:x", "duo:short:y"] {
        writer.join(room);
        for n in 0..6 {
            writer
                .send(json!({"type": "message", "id": n, "payload": {"room": room, "content": n}}));
            writer.recv_type("ack");
        }
    }
    assert_eq!(held(&server, "plain"), 3);
    assert_eq!(held(&server, "duo:x"), 3);
    assert_eq!(held(&server, "duo:short:y"), 2);
}

#[test]
fn the_api_subscribe_skips_a_user_the_room_has_no_place_for() {
    let server = server(&[]);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    let mut carol = server.connect("carol");
    alice.join("duo:full");
    bob.join("duo:full");
    let body = r#"{"user":"carol","room":"duo:full"}"#;
    let request = format!(
        "POST /api/subscribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(server.raw_status(request.as_bytes()), 200);
    // Carol did not ask: she hears nothing of it (her pong, which comes
    // after the subscription's place in her replies, is the next frame),
    // and is no member.
    let pong = carol.request(json!({"type": "ping", "id": 1}));
    assert_eq!(pong["type"], "pong", "{pong}");
    let next = carol.request(
        json!({"type": "message", "id": 2, "payload": {"room": "duo:full", "content": 1}}),
    );
    assert_eq!(next["type"], "error", "{next}");
    assert_eq!(next["payload"]["code"], "not_in_room", "{next}");
    assert_eq!(next["id"], 2);
}
