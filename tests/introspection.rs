//! The introspection and membership API (PROTOCOL §14.3) against the real
//! binary over real sockets: `GET /api/rooms`, `/api/rooms/{room}`,
//! `/api/rooms/{room}/history`, `/api/users/{user}`, `POST /api/subscribe`
//! and `/api/unsubscribe`, their shapes and refusals. Every test runs with
//! one loop or several (`ROOMCAST_TEST_THREADS`); a user's connections
//! opened one after the other land on different loops (the listener hands
//! sockets round-robin).

mod common;

use common::{Client, TestServer, token_with};
use roomcast::auth::TokenClaims;
use serde_json::{Value, json};

/// The API key the servers of these tests are started with.
const KEY: &str = "introspection-key";

/// A server with the API key, and whatever else the test needs.
fn server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--api-key", KEY];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

/// One request with `Connection: close`: (status, body).
fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = key.map_or(String::new(), |key| {
        format!("Authorization: Bearer {key}\r\n")
    });
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = server.raw(request.as_bytes());
    let status = common::status_of(&answer);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A `GET` with the key that must answer 200: its JSON.
fn get_ok(server: &TestServer, path: &str) -> Value {
    let (status, body) = call(server, "GET", path, Some(KEY), "");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// A `POST` with the key that must answer 200: its JSON.
fn post_ok(server: &TestServer, path: &str, body: Value) -> Value {
    let (status, text) = call(server, "POST", path, Some(KEY), &body.to_string());
    assert_eq!(status, 200, "POST {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Connects as `sub` with a `rooms` claim.
fn connect_with_rooms(server: &TestServer, sub: &str, rooms: &[&str]) -> Client {
    let token = token_with(TokenClaims {
        sub: sub.into(),
        rooms: Some(rooms.iter().map(|r| r.to_string()).collect()),
        ..Default::default()
    });
    let mut client = server.open(&format!("/ws?token={token}"));
    assert_eq!(client.recv()["type"], "welcome");
    client
}

/// The handshake rejections by reason, from `/api/stats`.
fn rejected(server: &TestServer, reason: &str) -> u64 {
    let stats = get_ok(server, "/api/stats");
    stats["handshakes_rejected_total"][reason]
        .as_u64()
        .unwrap_or(0)
}

fn message(client: &mut Client, room: &str, text: &str) -> Value {
    client.send(json!({"type":"message","id":"m","payload":{"room":room,"content":{"text":text}}}));
    client.recv_type("ack")
}

#[test]
fn refusals_follow_the_api_rules_and_are_counted() {
    let no_key = TestServer::start(&[]);
    assert_eq!(call(&no_key, "GET", "/api/rooms", Some("x"), "").0, 403);
    assert_eq!(call(&no_key, "GET", "/api/users/u", None, "").0, 403);
    assert_eq!(
        call(&no_key, "POST", "/api/subscribe", Some("x"), "{}").0,
        403
    );

    let server = server(&[]);
    for path in [
        "/api/rooms",
        "/api/rooms/a",
        "/api/rooms/a/history",
        "/api/users/u",
    ] {
        assert_eq!(call(&server, "GET", path, None, "").0, 401, "{path}");
        assert_eq!(
            call(&server, "GET", path, Some("wrong"), "").0,
            401,
            "{path}"
        );
        assert_eq!(call(&server, "POST", path, Some(KEY), "").0, 405, "{path}");
    }
    for path in ["/api/subscribe", "/api/unsubscribe"] {
        assert_eq!(call(&server, "POST", path, None, "{}").0, 401, "{path}");
        assert_eq!(call(&server, "GET", path, Some(KEY), "").0, 405, "{path}");
        for body in [
            "",
            "{",
            "[]",
            r#"{"user":"u"}"#,
            r#"{"user":"u","room":"bad name"}"#,
        ] {
            assert_eq!(
                call(&server, "POST", path, Some(KEY), body).0,
                400,
                "{path} {body}"
            );
        }
    }
    for path in [
        "/api/rooms?limit=x",
        "/api/rooms?limit=-1",
        "/api/rooms?limit=",
        "/api/rooms/a/history?since=1.5",
        "/api/rooms/a/history?since=-1",
    ] {
        assert_eq!(call(&server, "GET", path, Some(KEY), "").0, 400, "{path}");
    }
    assert_eq!(call(&server, "GET", "/api/rooms/a/b", Some(KEY), "").0, 404);
    assert_eq!(call(&server, "GET", "/api/users/", Some(KEY), "").0, 404);

    let not_found = rejected(&server, "not_found");
    let (status, body) = call(&server, "GET", "/api/rooms/nobody-here", Some(KEY), "");
    assert_eq!((status, body.as_str()), (404, r#"{"error":"no_room"}"#));
    assert_eq!(rejected(&server, "not_found"), not_found + 1);
    let unauthorized = rejected(&server, "unauthorized");
    call(&server, "GET", "/api/rooms", None, "");
    assert_eq!(rejected(&server, "unauthorized"), unauthorized + 1);
    let bad = rejected(&server, "bad_request");
    call(&server, "GET", "/api/rooms?limit=no", Some(KEY), "");
    assert_eq!(rejected(&server, "bad_request"), bad + 1);
    let method = rejected(&server, "method");
    call(&server, "DELETE", "/api/rooms", Some(KEY), "");
    assert_eq!(rejected(&server, "method"), method + 1);
}

#[test]
fn rooms_are_listed_by_name_with_prefix_limit_and_truncated() {
    let server = server(&[]);
    let mut alice = server.connect("alice");
    let mut alice_tab = server.connect("alice");
    let mut bob = server.connect("bob");
    let mut carol = server.connect("carol");
    alice.join("team:b");
    alice_tab.join("team:b");
    bob.join("team:b");
    carol.join("team:a");
    bob.join("other");
    message(&mut bob, "team:b", "one");

    let all = get_ok(&server, "/api/rooms");
    assert_eq!(all["truncated"], false);
    let names: Vec<&str> = all["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|room| room["room"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other", "team:a", "team:b"]);
    let team_b = &all["rooms"][2];
    assert_eq!(team_b["count"], 2);
    assert_eq!(team_b["connections"], 3);
    assert_eq!(team_b["seq"], 1);
    assert!(team_b["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(team_b.as_object().unwrap().len(), 5, "{team_b}");

    let team = get_ok(&server, "/api/rooms?prefix=team%3A");
    assert_eq!(team["rooms"].as_array().unwrap().len(), 2);
    assert_eq!(team["truncated"], false);
    let first = get_ok(&server, "/api/rooms?prefix=team:&limit=1");
    assert_eq!(first["rooms"].as_array().unwrap().len(), 1);
    assert_eq!(first["rooms"][0]["room"], "team:a");
    assert_eq!(first["truncated"], true);
    let none = get_ok(&server, "/api/rooms?prefix=zzz&limit=0");
    assert_eq!(none, json!({"rooms": [], "truncated": false}));
    // Above the maximum: clamped, not refused.
    let clamped = get_ok(&server, "/api/rooms?limit=99999999999999999999999");
    assert_eq!(clamped["rooms"].as_array().unwrap().len(), 3);

    // A room whose members all left is not listed, but still known.
    carol.request(json!({"type":"leave","id":1,"payload":{"room":"team:a"}}));
    let all = get_ok(&server, "/api/rooms");
    assert_eq!(all["rooms"].as_array().unwrap().len(), 2);
    let team_a = get_ok(&server, "/api/rooms/team:a");
    assert_eq!(team_a["count"], 0);
    assert_eq!(team_a["users"], json!([]));
}

#[test]
fn a_room_shows_its_users_and_history_and_unknown_rooms_are_404() {
    let server = server(&[]);
    let mut bob = server.connect("bob");
    let mut alice = server.connect("alice");
    let mut alice_tab = server.connect("alice");
    bob.join("r.1");
    alice.join("r.1");
    alice_tab.join("r.1");
    message(&mut alice, "r.1", "one");
    message(&mut bob, "r.1", "two");
    message(&mut alice_tab, "r.1", "three");

    let room = get_ok(&server, "/api/rooms/r.1");
    assert_eq!(room["room"], "r.1");
    assert_eq!(room["count"], 2);
    assert_eq!(room["connections"], 3);
    assert_eq!(room["seq"], 3);
    assert_eq!(room["history"], 3);
    assert_eq!(
        room["users"],
        json!([
            {"id": "alice", "name": "alice", "connections": 2},
            {"id": "bob", "name": "bob", "connections": 1},
        ])
    );
    // Percent-encoded names are decoded.
    assert_eq!(get_ok(&server, "/api/rooms/r%2E1")["room"], "r.1");

    let history = get_ok(&server, "/api/rooms/r.1/history?since=1");
    assert_eq!(history["room"], "r.1");
    assert_eq!(history["epoch"], room["epoch"]);
    assert_eq!(history["seq"], 3);
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["seq"], 2);
    assert_eq!(messages[0]["user"], json!({"id": "bob", "name": "bob"}));
    assert_eq!(messages[0]["content"], json!({"text": "two"}));
    assert!(
        messages[0]["ts"]
            .as_u64()
            .is_some_and(|ts| ts > 1_600_000_000_000)
    );
    assert_eq!(messages[1]["seq"], 3);
    let all = get_ok(&server, "/api/rooms/r.1/history");
    assert_eq!(all["messages"].as_array().unwrap().len(), 3);
    let later = get_ok(&server, "/api/rooms/r.1/history?since=3");
    assert_eq!(later["messages"], json!([]));

    for path in [
        "/api/rooms/never-used",
        "/api/rooms/bad%20name",
        "/api/rooms/%FF",
        "/api/rooms/never-used/history",
        "/api/rooms/bad%20name/history?since=0",
    ] {
        let (status, body) = call(&server, "GET", path, Some(KEY), "");
        assert_eq!(
            (status, body.as_str()),
            (404, r#"{"error":"no_room"}"#),
            "{path}"
        );
    }
}

#[test]
fn a_user_lists_each_connection_with_its_rooms_and_figures() {
    let server = server(&[]);
    let mut first = server.connect("dana");
    let mut second = server.connect("dana");
    first.join("a");
    first.join("b");
    second.join("b");
    second.assert_alive();

    let answer = get_ok(&server, "/api/users/dana");
    assert_eq!(answer["user"], "dana");
    assert!(answer.get("node").is_none());
    let connections = answer["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 2, "{answer}");
    let mut rooms: Vec<Value> = connections.iter().map(|c| c["rooms"].clone()).collect();
    rooms.sort_by_key(|rooms| rooms.as_array().unwrap().len());
    assert_eq!(rooms, [json!(["b"]), json!(["a", "b"])]);
    for connection in connections {
        assert!(
            connection["connection_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
        let connected_at = connection["connected_at"].as_u64().unwrap();
        assert!(connected_at > 1_600_000_000_000);
        assert!(connection["last_seen"].as_u64().unwrap() >= connected_at);
        assert!(connection["queued_bytes"].is_u64());
        assert_eq!(connection["dropped"], 0);
        let remote = connection["remote"].as_str().unwrap();
        let (ip, port) = remote.rsplit_once(':').unwrap();
        assert_eq!(ip, "127.0.0.1");
        assert!(port.parse::<u16>().is_ok_and(|port| port > 0));
    }
    assert_ne!(
        connections[0]["connection_id"],
        connections[1]["connection_id"]
    );
    assert_ne!(connections[0]["remote"], connections[1]["remote"]);

    let nobody = get_ok(&server, "/api/users/no%20one");
    assert_eq!(nobody, json!({"user": "no one", "connections": []}));
}

#[test]
fn subscribe_joins_every_connection_and_lets_it_use_the_room_outside_its_claim() {
    let server = server(&[]);
    let mut member = server.connect("mia");
    member.join("secret");
    let mut first = connect_with_rooms(&server, "ugo", &["lobby"]);
    let mut second = connect_with_rooms(&server, "ugo", &["lobby"]);
    // The claim bounds what the client asks for itself.
    let refused = first.request(json!({"type":"join","id":1,"payload":{"room":"secret"}}));
    assert_eq!(refused["payload"]["code"], "forbidden");

    let answer = post_ok(
        &server,
        "/api/subscribe",
        json!({"user":"ugo","room":"secret"}),
    );
    assert_eq!(answer, json!({"joined": 2}));
    for client in [&mut first, &mut second] {
        let joined = client.recv_type("joined");
        assert_eq!(joined["payload"]["room"], "secret");
        assert!(joined.get("id").is_none(), "{joined}");
    }
    let announced = member.recv_type("user_joined");
    assert_eq!(announced["payload"]["user"]["id"], "ugo");
    assert_eq!(announced["payload"]["count"], 2);

    // Subscribed: it may use the room, whatever its claim says.
    let ack = message(&mut first, "secret", "hello");
    assert_eq!(ack["payload"]["seq"], 1);
    let got = member.recv_type("message");
    assert_eq!(got["payload"]["content"], json!({"text": "hello"}));
    second.send(json!({"type":"presence","id":2,"payload":{"room":"secret"}}));
    let presence = second.recv_type("presence");
    assert_eq!(
        presence["payload"]["users"].as_array().map(Vec::len),
        Some(2),
        "{presence}"
    );

    // Already in the room: skipped.
    let again = post_ok(
        &server,
        "/api/subscribe",
        json!({"user":"ugo","room":"secret"}),
    );
    assert_eq!(again, json!({"joined": 0}));
    let nobody = post_ok(
        &server,
        "/api/subscribe",
        json!({"user":"nobody","room":"secret"}),
    );
    assert_eq!(nobody, json!({"joined": 0}));

    let room = get_ok(&server, "/api/rooms/secret");
    assert_eq!(room["count"], 2);
    assert_eq!(room["connections"], 3);

    // Unsubscribe: each connection leaves (a `left` without id) and loses
    // the grant; the claim applies again.
    let answer = post_ok(
        &server,
        "/api/unsubscribe",
        json!({"user":"ugo","room":"secret"}),
    );
    assert_eq!(answer, json!({"left": 2}));
    for client in [&mut first, &mut second] {
        let left = client.recv_type("left");
        assert_eq!(left["payload"]["room"], "secret");
        assert!(left.get("id").is_none(), "{left}");
    }
    let gone = member.recv_type("user_left");
    assert_eq!(gone["payload"]["user"]["id"], "ugo");
    let refused =
        first.request(json!({"type":"message","id":3,"payload":{"room":"secret","content":1}}));
    assert_eq!(refused["payload"]["code"], "forbidden", "{refused}");
    let again = post_ok(
        &server,
        "/api/unsubscribe",
        json!({"user":"ugo","room":"secret"}),
    );
    assert_eq!(again, json!({"left": 0}));
}

#[test]
fn subscribe_keeps_the_rooms_per_connection_limit() {
    let server = server(&["--max-rooms-per-connection", "1"]);
    let mut full = server.connect("vic");
    let mut free = server.connect("vic");
    full.join("mine");
    let answer = post_ok(
        &server,
        "/api/subscribe",
        json!({"user":"vic","room":"extra"}),
    );
    assert_eq!(answer, json!({"joined": 1}));
    let joined = free.recv_type("joined");
    assert_eq!(joined["payload"]["room"], "extra");
    // The full one got nothing and is still only in its own room.
    full.assert_alive();
    let user = get_ok(&server, "/api/users/vic");
    let mut rooms: Vec<Value> = user["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["rooms"].clone())
        .collect();
    rooms.sort_by_key(|r| r.to_string());
    assert_eq!(rooms, [json!(["extra"]), json!(["mine"])]);
}

#[test]
fn a_stalled_connection_shows_its_queue_and_its_drops() {
    // 1000 × 8 KB to a member that never reads: more than the kernel's
    // buffers hold, so roomcast's queue passes the soft mark and drops.
    let server = server(&[
        "--write-buffer-soft",
        "20000",
        "--write-buffer-hard",
        "20000000",
        "--max-message-size",
        "16384",
        "--rate-limit",
        "0",
    ]);
    let mut stalled = server.connect_small_receive_buffer("stalled");
    stalled.join("feed");
    let mut publisher = server.connect("publisher");
    publisher.join("feed");
    let pad = "x".repeat(8000);
    for n in 0..1000 {
        publisher.send(json!({"type": "message", "id": n, "payload": {"room": "feed", "content": {"n": n, "pad": pad}}}));
        publisher.recv_type("ack");
    }
    let user = get_ok(&server, "/api/users/stalled");
    let connection = &user["connections"][0];
    assert!(connection["dropped"].as_u64().unwrap() > 0, "{user}");
    assert!(
        connection["queued_bytes"].as_u64().unwrap() >= 20000,
        "{user}"
    );
    // The publisher reads its own copies: nothing dropped there.
    let publisher = get_ok(&server, "/api/users/publisher");
    assert_eq!(publisher["connections"][0]["dropped"], 0, "{publisher}");
}
