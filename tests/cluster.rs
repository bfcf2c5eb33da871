//! `--redis`: several nodes on one Redis behave as one server (PROTOCOL §10,
//! §11 "Cluster details"). Each test starts its own `redis-server` on a free
//! loopback port and two or three nodes (the real binary) against it.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Client, TestServer};
use serde_json::{Value, json};

const API_KEY: &str = "cluster-key";

/// A `redis-server` of our own, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> Redis {
        let child = Command::new(redis_server())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Redis {
            child: Some(child),
            port,
        };
        // Up once it answers PING (bounded: 200 tries × 25 ms).
        for _ in 0..200 {
            if redis.ping() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {port} did not come up");
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis vanishes with everything it held (no persistence).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_server() -> String {
    for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    "redis-server".to_string()
}

/// A node on `redis`, once it reports itself healthy (registered).
fn node(redis: &Redis, extra: &[&str]) -> TestServer {
    node_at(&redis.url(), extra)
}

/// A node on the Redis at `url`, once it reports itself healthy.
fn node_at(url: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--redis", url, "--api-key", API_KEY];
    args.extend_from_slice(extra);
    let server = TestServer::start(&args);
    eventually(&format!("node {} healthy", server.addr), || {
        http(server.addr, "GET", "/health", "").0 == 200
    });
    server
}

/// Retries a condition (bounded: 500 tries, 20 ms apart) for things that
/// happen "eventually": Redis noticed gone or back, a node's TTL expiring.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

/// One HTTP request on its own connection: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(common::WAIT));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (common::status_of(&answer), body)
}

fn publish(addr: SocketAddr, body: Value) -> (u16, Value) {
    let (status, body) = http(addr, "POST", "/api/publish", &body.to_string());
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn send(client: &mut Client, room: &str, content: Value, id: Option<&str>) {
    let mut frame = json!({"type": "message", "payload": {"room": room, "content": content}});
    if let Some(id) = id {
        frame["id"] = json!(id);
    }
    client.send(frame);
}

/// The next frame of one of `kinds`, skipping the others.
fn recv_kinds(client: &mut Client, kinds: &[&str]) -> Value {
    loop {
        let frame = client.recv();
        if kinds.iter().any(|kind| frame["type"] == *kind) {
            return frame;
        }
    }
}

/// The `ack` of one's own message and the message itself, in either order:
/// (ack seq, message seq).
fn ack_and_echo(client: &mut Client) -> (u64, u64) {
    let (mut ack, mut echo) = (None, None);
    while ack.is_none() || echo.is_none() {
        let frame = recv_kinds(client, &["ack", "message", "error"]);
        let seq = frame["payload"]["seq"].as_u64();
        match frame["type"].as_str() {
            Some("ack") => ack = seq,
            Some("message") => echo = seq,
            _ => panic!("{frame}"),
        }
    }
    (ack.unwrap_or(0), echo.unwrap_or(0))
}

fn join_with(client: &mut Client, payload: Value) -> Value {
    client.send(json!({"type": "join", "id": "j", "payload": payload}));
    let joined = recv_kinds(client, &["joined", "error"]);
    assert_eq!(joined["type"], "joined", "{joined}");
    joined
}

#[test]
fn messages_fan_out_across_nodes_once_and_in_seq_order() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let mut alice = a.connect("alice");
    let mut bob = b.connect("bob");
    let mut carol = b.connect("carol");
    alice.join("lobby");
    bob.join("lobby");
    carol.join("lobby");

    // Both publish at once, from two nodes; everyone sees one sequence.
    const EACH: u64 = 40;
    for n in 0..EACH {
        send(
            &mut alice,
            "lobby",
            json!({"from": "alice", "n": n}),
            Some("a"),
        );
        send(&mut bob, "lobby", json!({"from": "bob", "n": n}), None);
    }
    let mut orders = Vec::new();
    let mut acks = Vec::new();
    for client in [&mut alice, &mut bob, &mut carol] {
        let mut seen = Vec::new();
        let mut next_from = std::collections::HashMap::new();
        while seen.len() < (2 * EACH) as usize {
            let message = recv_kinds(client, &["message", "ack"]);
            if message["type"] == "ack" {
                acks.push(message["payload"]["seq"].as_u64().unwrap());
                continue;
            }
            let payload = &message["payload"];
            let from = payload["content"]["from"].as_str().unwrap().to_string();
            let n = payload["content"]["n"].as_u64().unwrap();
            // Each sender's messages in the order sent, none twice.
            let expected = next_from.entry(from.clone()).or_insert(0);
            assert_eq!(n, *expected, "{from}'s messages in order");
            *expected += 1;
            assert_eq!(payload["user"]["id"], from.as_str());
            seen.push((payload["seq"].as_u64().unwrap(), from, n));
        }
        let seqs: Vec<u64> = seen.iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=2 * EACH).collect::<Vec<_>>(),
            "seq 1.. without gaps"
        );
        orders.push(seen);
    }
    assert_eq!(orders[0], orders[1], "every node delivers the same order");
    assert_eq!(orders[1], orders[2]);
    // Alice's acks (which may come after her messages) carry their seqs, in order.
    while acks.len() < EACH as usize {
        acks.push(
            recv_kinds(&mut alice, &["ack"])["payload"]["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    let alices: Vec<u64> = orders[0]
        .iter()
        .filter(|(_, from, _)| from == "alice")
        .map(|(seq, _, _)| *seq)
        .collect();
    assert_eq!(acks, alices);
    alice.assert_alive();
}

#[test]
fn seq_and_recovery_continue_on_another_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let mut alice = a.connect("alice");
    let joined = alice.join("news");
    assert_eq!(joined["payload"]["seq"], 0);
    let epoch = joined["payload"]["epoch"].as_str().unwrap().to_string();
    for n in 1..=5 {
        send(&mut alice, "news", json!(n), Some("m"));
        assert_eq!(ack_and_echo(&mut alice), (n, n));
    }

    // Recovery on the other node: the messages after `since`, then live ones.
    let mut bob = b.connect("bob");
    let joined = join_with(
        &mut bob,
        json!({"room": "news", "since": 2, "epoch": epoch}),
    );
    assert_eq!(joined["payload"]["epoch"], epoch.as_str());
    assert_eq!(joined["payload"]["seq"], 5);
    assert_eq!(joined["payload"]["recovered"], true);
    assert_eq!(joined["payload"]["missed"], 3);
    for seq in 3..=5 {
        let message = bob.recv();
        assert_eq!(message["type"], "message");
        assert_eq!(message["payload"]["seq"], seq);
        assert_eq!(message["payload"]["content"], seq);
    }
    // The sequence goes on from the other node.
    send(&mut bob, "news", json!(6), Some("m"));
    assert_eq!(ack_and_echo(&mut bob), (6, 6));
    assert_eq!(recv_kinds(&mut alice, &["message"])["payload"]["seq"], 6);

    // A stale epoch recovers nothing; a third node sees the same room.
    let c = node(&redis, &[]);
    let mut carol = c.connect("carol");
    let joined = join_with(
        &mut carol,
        json!({"room": "news", "since": 1, "epoch": "not-the-epoch"}),
    );
    assert_eq!(joined["payload"]["recovered"], false);
    assert_eq!(joined["payload"]["missed"], 0);
    assert_eq!(joined["payload"]["seq"], 6);
    assert_eq!(joined["payload"]["count"], 3);
    carol.assert_alive();
}

#[test]
fn presence_typing_and_direct_see_every_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let mut alice = a.connect("alice");
    assert_eq!(alice.join("team")["payload"]["count"], 1);
    let mut bob = b.connect("bob");
    assert_eq!(bob.join("team")["payload"]["count"], 2);
    let joined = recv_kinds(&mut alice, &["user_joined"]);
    assert_eq!(joined["payload"]["user"]["id"], "bob");
    assert_eq!(joined["payload"]["count"], 2);

    // A second connection of bob's, on the other node: no second user_joined.
    let mut bob2 = a.connect("bob");
    assert_eq!(bob2.join("team")["payload"]["count"], 2);
    let presence =
        alice.request(json!({"type": "presence", "id": "p", "payload": {"room": "team"}}));
    assert_eq!(presence["type"], "presence", "{presence}");
    let mut users: Vec<(String, u64)> = presence["payload"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["id"].as_str().unwrap().to_string(),
                u["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    users.sort();
    assert_eq!(users, vec![("alice".into(), 1), ("bob".into(), 2)]);

    // Typing crosses nodes and skips the typist's own connections.
    bob.send(json!({"type": "typing", "payload": {"room": "team", "is_typing": true}}));
    let typing = recv_kinds(&mut alice, &["typing"]);
    assert_eq!(typing["payload"]["user"]["id"], "bob");
    assert_eq!(typing["payload"]["is_typing"], true);

    // Direct reaches both of bob's connections, on two nodes.
    alice.send(json!({"type": "direct", "id": "d", "payload": {"to": "bob", "content": "hi"}}));
    assert_eq!(recv_kinds(&mut alice, &["ack", "error"])["type"], "ack");
    for client in [&mut bob, &mut bob2] {
        let direct = recv_kinds(client, &["direct"]);
        assert_eq!(direct["payload"]["from"]["id"], "alice");
        assert_eq!(direct["payload"]["content"], "hi");
    }
    alice.send(json!({"type": "direct", "id": "d2", "payload": {"to": "nobody", "content": 1}}));
    let offline = recv_kinds(&mut alice, &["ack", "error"]);
    assert_eq!(offline["payload"]["code"], "user_offline", "{offline}");

    // One of bob's connections leaving is not bob leaving; the last one is.
    bob2.send(json!({"type": "leave", "payload": {"room": "team"}}));
    assert_eq!(recv_kinds(&mut bob2, &["left"])["payload"]["room"], "team");
    bob.send(json!({"type": "leave", "payload": {"room": "team"}}));
    assert_eq!(recv_kinds(&mut bob, &["left"])["payload"]["room"], "team");
    // bob was typing: the end of it comes first, then user_left (once).
    let stopped = recv_kinds(&mut alice, &["typing", "user_left"]);
    assert_eq!(stopped["type"], "typing", "{stopped}");
    assert_eq!(stopped["payload"]["is_typing"], false);
    let left = recv_kinds(&mut alice, &["user_left", "user_joined"]);
    assert_eq!(left["type"], "user_left");
    assert_eq!(left["payload"]["user"]["id"], "bob");
    assert_eq!(left["payload"]["count"], 1);
}

#[test]
fn the_api_reaches_the_whole_cluster() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let mut alice = a.connect("alice");
    let mut bob = b.connect("bob");
    let mut bob2 = b.connect("bob");
    alice.join("ops");
    bob.join("ops");
    bob2.join("ops");

    let (status, answer) = publish(a.addr, json!({"room": "ops", "content": "deploy"}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"delivered": 3, "seq": 1}));
    for client in [&mut alice, &mut bob, &mut bob2] {
        let message = recv_kinds(client, &["message"]);
        assert_eq!(message["payload"]["user"]["id"], "server");
        assert_eq!(message["payload"]["seq"], 1);
    }
    // A room without members anywhere still takes a seq.
    let (_, answer) = publish(b.addr, json!({"room": "empty", "content": 1}));
    assert_eq!(answer, json!({"delivered": 0, "seq": 1}));

    let (_, answer) = publish(a.addr, json!({"user": "bob", "content": "hi"}));
    assert_eq!(answer, json!({"delivered": 2}));
    assert_eq!(
        recv_kinds(&mut bob, &["direct"])["payload"]["from"]["id"],
        "server"
    );

    // Disconnect on node A closes bob's connections on node B.
    let (status, body) = http(a.addr, "POST", "/api/disconnect", r#"{"user":"bob"}"#);
    assert_eq!((status, body.as_str()), (200, r#"{"closed":2}"#));
    assert_eq!(bob.expect_close().0, 4003);
    assert_eq!(bob2.expect_close().0, 4003);
    let left = recv_kinds(&mut alice, &["user_left"]);
    assert_eq!(left["payload"]["count"], 1);

    // Bad bodies are still 400 without asking Redis.
    let (status, _) = http(
        a.addr,
        "POST",
        "/api/publish",
        r#"{"room":"bad room!","content":1}"#,
    );
    assert_eq!(status, 400);
    let (status, body) = http(a.addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(body.contains("roomcast_redis_up 1"), "{body}");
}

#[test]
fn a_killed_node_leaves_presence_within_seconds() {
    let redis = Redis::start();
    let a = node(&redis, &[]);
    let mut b = node(&redis, &[]);
    let mut alice = a.connect("alice");
    alice.join("room");
    let mut bob = b.connect("bob");
    bob.join("room");
    recv_kinds(&mut alice, &["user_joined"]);

    b.kill();
    // Bob's node no longer refreshes its liveness key: within its TTL (3 s)
    // bob stops counting, and nobody is told he left.
    let mut last = Value::Null;
    eventually("bob gone from presence", || {
        last = alice.request(json!({"type": "presence", "payload": {"room": "room"}}));
        assert_eq!(last["type"], "presence", "{last}");
        last["payload"]["users"].as_array().unwrap().len() == 1
    });
    assert_eq!(last["payload"]["users"][0]["id"], "alice");
    let mut carol = a.connect("carol");
    assert_eq!(carol.join("room")["payload"]["count"], 2);
    let (_, answer) = publish(a.addr, json!({"room": "room", "content": 1}));
    assert_eq!(answer["delivered"], 2);
    alice.send(json!({"type": "direct", "id": "d", "payload": {"to": "bob", "content": 1}}));
    assert_eq!(
        recv_kinds(&mut alice, &["ack", "error"])["payload"]["code"],
        "user_offline"
    );
}

#[test]
fn a_node_shut_down_gracefully_says_goodbye() {
    let redis = Redis::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &["--drain-ms", "0"]);
    let mut alice = a.connect("alice");
    alice.join("room");
    let mut bob = b.connect("bob");
    bob.join("room");
    recv_kinds(&mut alice, &["user_joined"]);

    assert!(b.terminate().success());
    assert_eq!(bob.expect_close().0, 1001);
    // Its clients were closed: the others are told they left, and the node
    // took itself out of presence at once.
    let left = recv_kinds(&mut alice, &["user_left"]);
    assert_eq!(left["payload"]["user"]["id"], "bob");
    assert_eq!(left["payload"]["count"], 1);
    let presence = alice.request(json!({"type": "presence", "payload": {"room": "room"}}));
    assert_eq!(presence["payload"]["users"].as_array().unwrap().len(), 1);
}

/// The ids of Redis's pub/sub clients (`CLIENT LIST TYPE pubsub`).
fn subscriber_ids(admin: &mut redis::Connection) -> Vec<u64> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(admin)
        .expect("CLIENT LIST");
    list.lines()
        .filter_map(|line| line.strip_prefix("id="))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

/// Only the nodes' pub/sub connections drop (`CLIENT KILL TYPE pubsub`):
/// each node notices, reconnects, subscribes every room it has members in
/// again, and room traffic crosses nodes in one seq order as before.
#[test]
fn a_dropped_pub_sub_connection_is_resubscribed() {
    let redis = Redis::start();
    // One subscriber connection per node, however many loops it runs.
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let mut alice = a.connect("alice");
    let mut bob = b.connect("bob");
    alice.join("lobby");
    bob.join("lobby");
    send(&mut alice, "lobby", json!("before"), Some("m1"));
    assert_eq!(ack_and_echo(&mut alice), (1, 1));
    assert_eq!(
        recv_kinds(&mut bob, &["message"])["payload"]["content"],
        "before"
    );

    let mut admin = redis::Client::open(redis.url())
        .and_then(|client| client.get_connection())
        .expect("an admin connection to Redis");
    let before = subscriber_ids(&mut admin);
    assert_eq!(before.len(), 2, "one subscriber connection per node");
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut admin)
        .expect("CLIENT KILL");
    assert_eq!(killed, 2);

    eventually("both nodes reconnect their subscribers", || {
        let now = subscriber_ids(&mut admin);
        now.len() == 2 && now.iter().all(|id| !before.contains(id))
    });
    eventually("both nodes subscribe to the room again", || {
        let counts: (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("rc:ch:lobby")
            .query(&mut admin)
            .expect("PUBSUB NUMSUB");
        counts.1 == 2
    });
    for server in [&a, &b] {
        eventually("/health 200 again", || {
            http(server.addr, "GET", "/health", "").0 == 200
        });
    }

    send(&mut alice, "lobby", json!("after"), Some("m2"));
    assert_eq!(ack_and_echo(&mut alice), (2, 2));
    let message = recv_kinds(&mut bob, &["message"]);
    assert_eq!(message["payload"]["content"], "after");
    assert_eq!(message["payload"]["seq"], 2);
    send(&mut bob, "lobby", json!("back"), None);
    let message = recv_kinds(&mut alice, &["message"]);
    assert_eq!(message["payload"]["content"], "back");
    assert_eq!(message["payload"]["seq"], 3);
}

#[test]
fn a_redis_outage_is_survived_without_restarting_nodes() {
    let mut redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let mut alice = a.connect("alice");
    let mut bob = b.connect("bob");
    let old_epoch = alice.join("live")["payload"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    bob.join("live");
    send(&mut alice, "live", json!("before"), Some("m1"));
    assert_eq!(ack_and_echo(&mut alice), (1, 1));
    assert_eq!(
        recv_kinds(&mut bob, &["message"])["payload"]["content"],
        "before"
    );

    // Traffic through the API on both nodes for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, refused) = (stop.clone(), ok.clone(), refused.clone());
        let addrs = [a.addr, b.addr];
        std::thread::spawn(move || {
            for n in 0..20_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let addr = addrs[(n % 2) as usize];
                match publish(addr, json!({"room": "traffic", "content": n})).0 {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    503 => refused.fetch_add(1, Ordering::Relaxed),
                    other => panic!("unexpected status {other}"),
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    eventually("some traffic", || ok.load(Ordering::Relaxed) > 5);

    redis.kill();
    for server in [&a, &b] {
        eventually("/health 503", || {
            http(server.addr, "GET", "/health", "").0 == 503
        });
        let (_, metrics) = http(server.addr, "GET", "/metrics", "");
        assert!(metrics.contains("roomcast_redis_up 0"), "{metrics}");
        let (_, stats) = http(server.addr, "GET", "/api/stats", "");
        let stats: Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(stats["redis_up"], 0);
    }
    // Open connections stay; cluster requests are refused, local ones work.
    send(&mut alice, "live", json!("during"), Some("m2"));
    let refused_message = recv_kinds(&mut alice, &["ack", "error"]);
    assert_eq!(refused_message["payload"]["code"], "unavailable");
    assert_eq!(refused_message["id"], "m2");
    for request in [
        json!({"type": "join", "id": 1, "payload": {"room": "other"}}),
        json!({"type": "presence", "id": 2, "payload": {"room": "live"}}),
        json!({"type": "direct", "id": 3, "payload": {"to": "bob", "content": 1}}),
    ] {
        let answer = alice.request(request.clone());
        assert_eq!(
            answer["payload"]["code"], "unavailable",
            "{request} → {answer}"
        );
    }
    bob.send(json!({"type": "typing", "payload": {"room": "live", "is_typing": true}}));
    bob.assert_alive();
    let (status, body) = http(
        a.addr,
        "POST",
        "/api/publish",
        r#"{"room":"live","content":1}"#,
    );
    assert_eq!((status, body.as_str()), (503, r#"{"error":"unavailable"}"#));
    let (status, body) = http(b.addr, "POST", "/api/disconnect", r#"{"user":"alice"}"#);
    assert_eq!((status, body.as_str()), (503, r#"{"error":"unavailable"}"#));
    let mut dave = a.connect("dave");
    dave.assert_alive();
    assert_eq!(
        dave.request(json!({"type": "join", "payload": {"room": "live"}}))["payload"]["code"],
        "unavailable"
    );
    drop(dave);

    // Redis comes back empty: the nodes reconnect and resubscribe by themselves.
    let _redis = Redis::start_on(port);
    for server in [&a, &b] {
        eventually("/health 200 again", || {
            http(server.addr, "GET", "/health", "").0 == 200
        });
    }
    // The room starts a new epoch; its members are told so with a `joined`.
    for client in [&mut alice, &mut bob] {
        let rejoined = recv_kinds(client, &["joined"]);
        assert_eq!(rejoined["payload"]["room"], "live");
        assert_ne!(rejoined["payload"]["epoch"], old_epoch.as_str());
        assert_eq!(rejoined["payload"]["seq"], 0);
        // The count is the one the node saw when it registered again.
        assert!(rejoined["payload"]["count"].as_u64().unwrap() >= 1);
    }
    send(&mut alice, "live", json!("after"), Some("m3"));
    assert_eq!(ack_and_echo(&mut alice), (1, 1));
    let message = recv_kinds(&mut bob, &["message"]);
    assert_eq!(message["payload"]["content"], "after");
    assert_eq!(message["payload"]["seq"], 1);
    let presence = bob.request(json!({"type": "presence", "payload": {"room": "live"}}));
    assert_eq!(
        presence["payload"]["users"].as_array().unwrap().len(),
        2,
        "{presence}"
    );

    let before = ok.load(Ordering::Relaxed);
    eventually("traffic flows again", || {
        ok.load(Ordering::Relaxed) > before + 5
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "publishes were refused during the outage"
    );
}

#[test]
fn a_node_starts_without_redis_and_joins_when_it_appears() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = TestServer::start(&["--redis", &url, "--api-key", API_KEY]);
    assert_eq!(http(server.addr, "GET", "/health", "").0, 503);
    let mut alice = server.connect("alice");
    let refused = alice.request(json!({"type": "join", "payload": {"room": "r"}}));
    assert_eq!(refused["payload"]["code"], "unavailable");
    let _redis = Redis::start_on(port);
    eventually("/health 200", || {
        http(server.addr, "GET", "/health", "").0 == 200
    });
    assert_eq!(alice.join("r")["payload"]["count"], 1);
}

/// A Redis user for node B, so the test decides when B gets back in: a
/// Redis that lacks the user refuses B's connections, and B retries with its
/// backoff until the user exists again.
const NODE_B_USER: &str = "node-b";
const NODE_B_PASSWORD: &str = "node-b-password";

fn admin(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url())
        .and_then(|client| client.get_connection())
        .expect("an admin connection to Redis")
}

fn let_node_b_in(admin: &mut redis::Connection) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(NODE_B_USER)
        .arg("on")
        .arg(format!(">{NODE_B_PASSWORD}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query(admin)
        .expect("ACL SETUSER");
}

fn node_b_url(redis: &Redis) -> String {
    format!(
        "redis://{NODE_B_USER}:{NODE_B_PASSWORD}@127.0.0.1:{}",
        redis.port
    )
}

/// Reads frames into `log` until one satisfies `done` (bounded by `deadline`).
fn read_until(
    client: &mut Client,
    log: &mut Vec<Value>,
    deadline: std::time::Instant,
    what: &str,
    mut done: impl FnMut(&Value) -> bool,
) {
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        let frame = client.recv();
        let stop = done(&frame);
        log.push(frame);
        if stop {
            return;
        }
    }
}

/// A member's frames since Redis went away, against §11: a `joined` without
/// `id` carrying the new epoch before any message, then every seq of the new
/// epoch once and in order up to `last`, a gap only where a `lagged` covers it.
/// Returns the seq the `joined` carried.
fn check_new_epoch(who: &str, frames: &[Value], old_epoch: &str, last: u64) -> u64 {
    for frame in frames {
        assert_ne!(frame["type"], "error", "{who}: {frame}");
    }
    let start = frames
        .iter()
        .position(|f| f["type"] == "joined")
        .unwrap_or_else(|| panic!("{who}: no joined of the new epoch in {frames:?}"));
    let joined = &frames[start];
    assert!(joined.get("id").is_none(), "{who}: {joined}");
    assert_eq!(joined["payload"]["room"], "mixed", "{who}: {joined}");
    let epoch = joined["payload"]["epoch"].as_str().unwrap_or_default();
    assert!(!epoch.is_empty() && epoch != old_epoch, "{who}: {joined}");
    assert!(
        frames[..start].iter().all(|f| f["type"] != "message"),
        "{who}: a message before the joined of the new epoch: {frames:?}"
    );
    let mut seqs = Vec::new();
    let mut lagged = Vec::new();
    for frame in &frames[start + 1..] {
        let payload = &frame["payload"];
        match frame["type"].as_str() {
            Some("message") => seqs.push(payload["seq"].as_u64().unwrap()),
            Some("lagged") => lagged.push((
                payload["from_seq"].as_u64().unwrap(),
                payload["to_seq"].as_u64().unwrap(),
            )),
            Some("joined") => panic!("{who}: a second joined: {frame}"),
            _ => {}
        }
    }
    assert!(
        seqs.windows(2).all(|pair| pair[0] < pair[1]),
        "{who}: seqs not strictly increasing (a duplicate or out of order): {seqs:?}"
    );
    for seq in 1..=last {
        assert!(
            seqs.binary_search(&seq).is_ok()
                || lagged.iter().any(|&(from, to)| from <= seq && seq <= to),
            "{who}: seq {seq} neither delivered nor reported lagged: {seqs:?}, lagged {lagged:?}"
        );
    }
    assert_eq!(seqs.last().copied(), Some(last), "{who}: {seqs:?}");
    // The history holds the whole run and nobody reads slowly: what the late
    // node missed comes from the history, not as a `lagged`.
    assert!(lagged.is_empty(), "{who}: lagged {lagged:?}");
    // Announced as a `join` with `since: 0` would: `seq - missed` (0) is
    // where the messages that follow start.
    assert_eq!(
        joined["payload"]["missed"], joined["payload"]["seq"],
        "{who}"
    );
    assert_eq!(joined["payload"]["recovered"], true, "{who}");
    joined["payload"]["seq"].as_u64().unwrap()
}

/// Redis restarts empty and node B gets back in well after node A, while a
/// client of A publishes all along: B's members get the new epoch's `joined`
/// first, then every message of the new epoch once and in order, those
/// published before B re-registered included (§11 "Cluster details").
#[test]
fn a_node_re_registering_late_after_an_empty_restart_misses_nothing() {
    let mut redis = Redis::start();
    let port = redis.port;
    let_node_b_in(&mut admin(&redis));
    // Alice publishes as fast as her echoes come back, and the others read
    // only at the end: no rate limit, a history and outbound queues that hold
    // the whole run (a few thousand messages at most).
    let flags = [
        "--rate-limit",
        "0",
        "--history",
        "100000",
        "--write-buffer-soft",
        "67108864",
        "--write-buffer-hard",
        "134217728",
    ];
    let a = node(&redis, &flags);
    let b = node_at(&node_b_url(&redis), &flags);

    let mut alice = a.connect("alice");
    let mut carol = a.connect("carol");
    let mut bob = b.connect("bob");
    let mut dave = b.connect("dave");
    let old_epoch = alice.join("mixed")["payload"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for client in [&mut carol, &mut bob, &mut dave] {
        assert_eq!(client.join("mixed")["payload"]["epoch"], old_epoch.as_str());
    }
    send(&mut alice, "mixed", json!("before"), Some("m"));
    assert_eq!(ack_and_echo(&mut alice), (1, 1));
    for client in [&mut carol, &mut bob, &mut dave] {
        assert_eq!(recv_kinds(client, &["message"])["payload"]["seq"], 1);
    }

    redis.kill();
    for server in [&a, &b] {
        eventually("/health 503", || {
            http(server.addr, "GET", "/health", "").0 == 503
        });
    }
    // Empty, and without node B's user: only node A gets back in for now.
    let redis = Redis::start_on(port);
    eventually("node A back", || {
        http(a.addr, "GET", "/health", "").0 == 200
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut alice_log = Vec::new();
    read_until(
        &mut alice,
        &mut alice_log,
        deadline,
        "alice's joined",
        |f| f["type"] == "joined",
    );

    // Alice publishes all along, each message once the one before came back.
    let stop = Arc::new(AtomicBool::new(false));
    let (echoes, echoed) = std::sync::mpsc::channel::<u64>();
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                send(&mut alice, "mixed", json!(n), None);
                read_until(&mut alice, &mut alice_log, deadline, "alice's echo", |f| {
                    f["type"] == "message" && f["payload"]["content"] == n
                });
                let _ = echoes.send(n);
                n += 1;
            }
            (alice, alice_log)
        })
    };
    // Twenty of them while node B is still out.
    while echoed
        .recv_timeout(common::WAIT)
        .expect("alice's messages go on")
        < 19
    {}
    assert_eq!(http(b.addr, "GET", "/health", "").0, 503, "B is still out");

    // Node B gets back in (at its next reconnect attempt) while alice goes on.
    let_node_b_in(&mut admin(&redis));
    let mut bob_log = Vec::new();
    read_until(&mut bob, &mut bob_log, deadline, "bob's joined", |f| {
        f["type"] == "joined"
    });
    let late_seq = bob_log.last().unwrap()["payload"]["seq"].as_u64().unwrap();
    assert!(late_seq >= 20, "B re-registered after alice's messages");
    // Then some more, live across both nodes.
    read_until(
        &mut bob,
        &mut bob_log,
        deadline,
        "live messages on B",
        |f| f["type"] == "message" && f["payload"]["seq"].as_u64() > Some(late_seq + 20),
    );
    stop.store(true, Ordering::Relaxed);
    let (mut alice, mut alice_log) = publisher.join().expect("the publisher");

    // One last message, from node B, closes everyone's sequence.
    send(&mut bob, "mixed", json!("end"), Some("end"));
    let is_end = |f: &Value| f["type"] == "message" && f["payload"]["content"] == "end";
    let mut carol_log = Vec::new();
    let mut dave_log = Vec::new();
    read_until(&mut bob, &mut bob_log, deadline, "the end", is_end);
    let last = bob_log.last().unwrap()["payload"]["seq"].as_u64().unwrap();
    for (client, log) in [
        (&mut alice, &mut alice_log),
        (&mut carol, &mut carol_log),
        (&mut dave, &mut dave_log),
    ] {
        read_until(client, log, deadline, "the end", is_end);
    }
    for (who, log) in [("alice", &alice_log), ("carol", &carol_log)] {
        check_new_epoch(who, log, &old_epoch, last);
    }
    for (who, log) in [("bob", &bob_log), ("dave", &dave_log)] {
        let seq = check_new_epoch(who, log, &old_epoch, last);
        assert!(seq >= 20, "{who}: joined at seq {seq}");
    }
}

#[test]
fn nodes_of_two_loops_each_behave_as_one_server() {
    // §12: with --redis, every node runs its N loops and §10 holds between
    // nodes. Four single-tab users per node, and one user with two tabs on
    // each node, so every loop of both nodes likely holds a member.
    let redis = Redis::start();
    let flags = ["--threads", "2", "--rate-limit", "0"];
    let (a, b) = (node(&redis, &flags), node(&redis, &flags));
    let mut members: Vec<(String, Client)> = Vec::new();
    for (node, prefix) in [(&a, "a"), (&b, "b")] {
        for i in 0..4 {
            let sub = format!("{prefix}{i}");
            let mut client = node.connect(&sub);
            client.join("mesh");
            members.push((sub, client));
        }
    }
    let mut tabs = Vec::new();
    for node in [&a, &b, &a, &b] {
        let mut tab = node.connect("both");
        let joined = join_with(&mut tab, json!({"room": "mesh"}));
        assert_eq!(
            joined["payload"]["count"], 9,
            "eight users and `both`, however many tabs and nodes: {joined}"
        );
        tabs.push(tab);
    }
    // Asked by a tab of `both`, which has no other frame pending.
    let presence =
        tabs[0].request(json!({"type": "presence", "id": "p", "payload": {"room": "mesh"}}));
    assert_eq!(presence["type"], "presence", "{presence}");
    let mut users: Vec<(String, u64)> = presence["payload"]["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| {
            (
                u["id"].as_str().unwrap().to_string(),
                u["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    users.sort();
    let mut expected: Vec<(String, u64)> =
        members.iter().map(|(sub, _)| (sub.clone(), 1)).collect();
    expected.push(("both".to_string(), 4));
    expected.sort();
    assert_eq!(users, expected, "presence merges both nodes' loops");

    // Messages from both nodes at once: one seq order for everyone.
    const EACH: u64 = 30;
    for n in 0..EACH {
        send(
            &mut members[0].1,
            "mesh",
            json!({"from": "a0", "n": n}),
            None,
        );
        send(
            &mut members[4].1,
            "mesh",
            json!({"from": "b0", "n": n}),
            None,
        );
    }
    let mut orders = Vec::new();
    let receivers = members
        .iter_mut()
        .map(|(sub, client)| (sub.clone(), client))
        .chain(tabs.iter_mut().map(|tab| ("both".to_string(), tab)));
    for (who, client) in receivers {
        let mut seen = Vec::new();
        let mut joins_of_both = 0;
        while seen.len() < (2 * EACH) as usize {
            let frame = recv_kinds(client, &["message", "user_joined"]);
            if frame["type"] == "user_joined" {
                if frame["payload"]["user"]["id"] == "both" {
                    joins_of_both += 1;
                    assert_eq!(frame["payload"]["count"], 9, "{who}: {frame}");
                }
                continue;
            }
            let payload = &frame["payload"];
            seen.push((
                payload["seq"].as_u64().unwrap(),
                payload["content"]["from"].as_str().unwrap().to_string(),
                payload["content"]["n"].as_u64().unwrap(),
            ));
        }
        if who != "both" {
            assert_eq!(
                joins_of_both, 1,
                "{who}: one user_joined for `both`'s four tabs on two nodes"
            );
        }
        let seqs: Vec<u64> = seen.iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=2 * EACH).collect::<Vec<_>>(),
            "{who}: seq 1.. without gaps or duplicates"
        );
        for from in ["a0", "b0"] {
            let ns: Vec<u64> = seen
                .iter()
                .filter(|(_, sender, _)| sender == from)
                .map(|(_, _, n)| *n)
                .collect();
            assert_eq!(
                ns,
                (0..EACH).collect::<Vec<_>>(),
                "{who}: {from}'s in order"
            );
        }
        orders.push((who, seen));
    }
    for (who, seen) in &orders[1..] {
        assert_eq!(
            seen, &orders[0].1,
            "{who} and {} saw different orders",
            orders[0].0
        );
    }

    // `both` leaves tab by tab: one user_left, after the last only.
    let mut last = tabs.pop().unwrap();
    for tab in &mut tabs {
        tab.send(json!({"type": "leave", "id": "l", "payload": {"room": "mesh"}}));
        assert_eq!(recv_kinds(tab, &["left"])["payload"]["room"], "mesh");
    }
    let presence = members[5]
        .1
        .request(json!({"type": "presence", "id": "p", "payload": {"room": "mesh"}}));
    assert_eq!(presence["type"], "presence", "no user_left yet: {presence}");
    assert!(
        presence["payload"]["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["id"] == "both"),
        "one tab of `both` is still in: {presence}"
    );
    last.send(json!({"type": "leave", "id": "l", "payload": {"room": "mesh"}}));
    assert_eq!(recv_kinds(&mut last, &["left"])["payload"]["room"], "mesh");
    for (who, client) in members.iter_mut() {
        let left = recv_kinds(client, &["user_left"]);
        assert_eq!(left["payload"]["user"]["id"], "both", "{who}: {left}");
        assert_eq!(left["payload"]["count"], 8, "{who}: {left}");
        client.send(json!({"type": "ping", "id": "end"}));
        let next = recv_kinds(client, &["pong", "user_left"]);
        assert_eq!(next["type"], "pong", "{who}: a second user_left: {next}");
    }
}

/// A config file of namespaces, for nodes started with `--config`.
fn namespace_file(text: &str) -> std::path::PathBuf {
    common::scratch_file("namespaces.toml", text)
}

#[test]
fn namespaces_hold_across_nodes() {
    let file = namespace_file(
        "[[namespace]]\nprefix = \"duo:\"\nmax_members = 2\nmember_events = false\nhistory = 2\n\
         [[namespace]]\nprefix = \"feed:\"\nclient_publish = false\n",
    );
    let redis = Redis::start();
    let config = ["--config", file.to_str().unwrap()];
    let (a, b) = (node(&redis, &config), node(&redis, &config));
    let mut alice = a.connect("alice");
    let mut bob = b.connect("bob");
    let mut carol = a.connect("carol");
    alice.join("duo:x");
    bob.join("duo:x");
    // max_members counts users on every node.
    carol.send(json!({"type": "join", "id": "c", "payload": {"room": "duo:x"}}));
    let refused = recv_kinds(&mut carol, &["joined", "error"]);
    assert_eq!(refused["payload"]["code"], "room_full", "{refused}");
    // member_events = false: no `user_joined` for bob before his message.
    for n in 1..=3 {
        bob.send(json!({"type": "message", "id": n, "payload": {"room": "duo:x", "content": n}}));
        recv_kinds(&mut bob, &["ack"]);
    }
    let first = alice.recv();
    assert_eq!(first["type"], "message", "{first}");
    // The namespace's history (2) bounds the Redis list.
    let mut late = b.connect("bob");
    let joined = join_with(&mut late, json!({"room": "duo:x", "since": 0}));
    assert_eq!(joined["payload"]["seq"], 3);
    let replayed = recv_kinds(&mut late, &["message"]);
    assert_eq!(replayed["payload"]["seq"], 2, "{replayed}");
    // A read-only namespace on any node.
    carol.join("feed:news");
    carol.send(json!({"type": "message", "id": 9, "payload": {"room": "feed:news", "content": 1}}));
    let refused = recv_kinds(&mut carol, &["ack", "error"]);
    assert_eq!(refused["payload"]["code"], "forbidden", "{refused}");
}

#[test]
fn each_webhook_event_is_sent_once_for_the_cluster() {
    use common::webhook_receiver::WebhookReceiver;
    let receiver = WebhookReceiver::start();
    let file = namespace_file("[[namespace]]\nprefix = \"chat:\"\nwebhook_messages = true\n");
    let redis = Redis::start();
    let url = receiver.url();
    let args = [
        "--config",
        file.to_str().unwrap(),
        "--webhook-url",
        url.as_str(),
    ];
    let (a, b) = (node(&redis, &args), node(&redis, &args));
    let mut alice = a.connect("alice");
    let mut bob = b.connect("bob");
    let mut bob_on_a = a.connect("bob");
    alice.join("chat:x");
    bob.join("chat:x");
    bob_on_a.join("chat:x");
    for (client, n) in [(&mut alice, 1), (&mut bob, 2)] {
        client
            .send(json!({"type": "message", "id": n, "payload": {"room": "chat:x", "content": n}}));
        recv_kinds(client, &["ack"]);
    }
    for client in [&mut bob, &mut bob_on_a, &mut alice] {
        client.send(json!({"type": "leave", "payload": {"room": "chat:x"}}));
        recv_kinds(client, &["left"]);
    }
    let delivered = |requests: &[common::webhook_receiver::Request]| -> Vec<Value> {
        let mut events = common::webhook_receiver::delivered(requests);
        events.retain(|event| event["room"] == "chat:x");
        events
    };
    // Each node sends its own events: wait for both nodes' eight.
    let requests = receiver.wait_until(common::WAIT, |requests| delivered(requests).len() >= 8);
    let events = delivered(&requests);
    // No --webhook-secret: the batches are signed with the --api-key (§14.2).
    for request in &requests {
        let signature = request.header("x-roomcast-signature").unwrap_or_default();
        assert!(
            common::webhook_receiver::verify_signature(
                API_KEY.as_bytes(),
                &request.body,
                signature
            ),
            "signed with the API key"
        );
    }
    let names: Vec<&str> = events
        .iter()
        .map(|event| event["name"].as_str().unwrap_or("?"))
        .collect();
    let count = |name: &str| names.iter().filter(|n| **n == name).count();
    assert_eq!(count("room_occupied"), 1, "{names:?}");
    assert_eq!(
        count("member_added"),
        2,
        "bob's second connection is no new member: {names:?}"
    );
    assert_eq!(count("message"), 2, "{names:?}");
    assert_eq!(count("member_removed"), 2, "{names:?}");
    assert_eq!(count("room_vacated"), 1, "{names:?}");
    let mut seqs: Vec<u64> = events
        .iter()
        .filter_map(|event| event["seq"].as_u64())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2]);
}

/// The JSON of a `GET` that must answer 200.
fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, "");
    assert_eq!(status, 200, "GET {path} on {addr}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// §14.3 with `--redis`: `/api/rooms…` answer for the cluster from either
/// node, subscribe and unsubscribe reach a user connected to the other
/// node, and `/api/users/{user}` lists the answering node's connections
/// with its id.
#[test]
fn the_introspection_api_answers_for_the_cluster() {
    let redis = Redis::start();
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut ann = a.connect("ann");
    let mut bob = b.connect("bob");
    ann.join("lab:1");
    bob.join("lab:1");
    bob.join("lab:2");
    send(&mut ann, "lab:1", json!({"text": "hi"}), Some("m1"));
    recv_kinds(&mut ann, &["ack"]);

    for addr in [a.addr, b.addr] {
        let rooms = get_json(addr, "/api/rooms");
        assert_eq!(rooms["truncated"], false, "{rooms}");
        let list = rooms["rooms"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{rooms}");
        assert_eq!(list[0]["room"], "lab:1");
        assert_eq!(list[0]["count"], 2);
        assert_eq!(list[0]["connections"], 2);
        assert_eq!(list[0]["seq"], 1);
        assert_eq!(list[1]["room"], "lab:2");
        assert_eq!(list[1]["count"], 1);
        let first = get_json(addr, "/api/rooms?prefix=lab%3A&limit=1");
        assert_eq!(first["rooms"].as_array().map(Vec::len), Some(1));
        assert_eq!(first["truncated"], true);

        let room = get_json(addr, "/api/rooms/lab:1");
        assert_eq!(room["epoch"], list[0]["epoch"]);
        assert_eq!(room["history"], 1);
        assert_eq!(
            room["users"],
            json!([
                {"id": "ann", "name": "ann", "connections": 1},
                {"id": "bob", "name": "bob", "connections": 1},
            ])
        );
        let history = get_json(addr, "/api/rooms/lab:1/history?since=0");
        assert_eq!(history["seq"], 1);
        assert_eq!(history["messages"][0]["user"]["id"], "ann");
        assert_eq!(history["messages"][0]["content"], json!({"text": "hi"}));
        let (status, body) = http(addr, "GET", "/api/rooms/lab:9", "");
        assert_eq!((status, body.as_str()), (404, r#"{"error":"no_room"}"#));
    }

    // Carol's claim allows no room; the API subscribes her from the other node.
    let token = common::token_with(roomcast::auth::TokenClaims {
        sub: "carol".into(),
        rooms: Some(Vec::new()),
        ..Default::default()
    });
    let mut carol = b.open(&format!("/ws?token={token}"));
    assert_eq!(carol.recv()["type"], "welcome");
    let (status, body) = http(
        a.addr,
        "POST",
        "/api/subscribe",
        &json!({"user": "carol", "room": "lab:1"}).to_string(),
    );
    assert_eq!((status, body.as_str()), (200, r#"{"joined":1}"#));
    let joined = recv_kinds(&mut carol, &["joined"]);
    assert_eq!(joined["payload"]["room"], "lab:1");
    assert!(joined.get("id").is_none(), "{joined}");
    let announced = recv_kinds(&mut ann, &["user_joined"]);
    assert_eq!(announced["payload"]["user"]["id"], "carol");
    send(&mut carol, "lab:1", json!("from carol"), Some("c1"));
    recv_kinds(&mut carol, &["ack"]);
    let got = recv_kinds(&mut ann, &["message"]);
    assert_eq!(got["payload"]["content"], "from carol");

    let here = get_json(b.addr, "/api/users/carol");
    let connections = here["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 1, "{here}");
    assert_eq!(connections[0]["rooms"], json!(["lab:1"]));
    let node_b = here["node"].as_str().unwrap().to_string();
    let there = get_json(a.addr, "/api/users/carol");
    assert_eq!(there["connections"], json!([]));
    assert!(there["node"].as_str().is_some_and(|node| node != node_b));

    let (status, body) = http(
        a.addr,
        "POST",
        "/api/unsubscribe",
        &json!({"user": "carol", "room": "lab:1"}).to_string(),
    );
    assert_eq!((status, body.as_str()), (200, r#"{"left":1}"#));
    let left = recv_kinds(&mut carol, &["left"]);
    assert!(left.get("id").is_none(), "{left}");

    // Ann is in lab:1 on node A; her second connection, on node B, is not:
    // only that one joins, and the count says so.
    let mut ann_tab = b.connect("ann");
    let (status, body) = http(
        b.addr,
        "POST",
        "/api/subscribe",
        &json!({"user": "ann", "room": "lab:1"}).to_string(),
    );
    assert_eq!((status, body.as_str()), (200, r#"{"joined":1}"#));
    let joined = recv_kinds(&mut ann_tab, &["joined"]);
    assert_eq!(joined["payload"]["room"], "lab:1");

    // A room whose last member left is no longer listed.
    bob.request(json!({"type": "leave", "id": 1, "payload": {"room": "lab:2"}}));
    eventually("lab:2 unlisted", || {
        get_json(a.addr, "/api/rooms")["rooms"]
            .as_array()
            .is_some_and(|rooms| rooms.len() == 1)
    });
}
