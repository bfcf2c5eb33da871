//! The example backend (`examples/backend/`, docs/backend.md) against the real
//! binary started with the example's `roomcast.toml` (PROTOCOL §14): chat
//! messages reach the backend's SQLite store through signed webhooks and come
//! back from its "load older messages" endpoint in seq order, and a client in
//! a read-only feed gets `forbidden` while `backend.py publish` reaches it.
//! The backend's own Python tests run here too, so CI runs them.
//!
//! Needs `python3` (standard library only; `.ci/run` installs it).
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, WAIT, show_output, status_of};
use serde_json::{Value, json};

const API_KEY: &str = "example-backend-test-api-key";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn backend_script() -> PathBuf {
    root().join("examples").join("backend").join("backend.py")
}

/// `python3`, none of the example's variables inherited, no `__pycache__` left behind.
fn python3() -> Command {
    let works = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        works,
        "tests/example_backend.rs needs python3 (standard library only): \
         install it with `apt-get update && apt-get install -y python3`"
    );
    let mut command = Command::new("python3");
    for (name, _) in std::env::vars() {
        if name.starts_with("ROOMCAST_") || name.starts_with("BACKEND_") {
            command.env_remove(name);
        }
    }
    command.env("PYTHONDONTWRITEBYTECODE", "1");
    command
}

/// `python3 examples/backend/backend.py ARGS`.
fn python(args: &[&str]) -> Command {
    let mut command = python3();
    command.arg(backend_script()).args(args);
    command
}

/// The example backend on a free loopback port, killed on drop.
struct Backend {
    child: Child,
    /// `http://127.0.0.1:PORT`, from its readiness line.
    base: String,
    dir: PathBuf,
}

impl Backend {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "roomcast-example-backend-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("backend.sqlite3");
        let mut child = python(&[
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            API_KEY,
            "--db",
            db.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3 examples/backend/backend.py");
        // Ready once it prints the address it bound: "backend listening on http://ADDR".
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("backend readiness line");
        let Some((_, address)) = line.trim().rsplit_once("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("backend.py did not start: {line:?}");
        };
        Backend {
            base: address.to_string(),
            child,
            dir,
        }
    }

    /// GET `path` on the backend: (status, JSON body).
    fn get(&self, path: &str) -> (u16, Value) {
        let address = self.base.trim_start_matches("http://");
        let mut stream = TcpStream::connect(address).expect("connect to the backend");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("backend answer");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        let value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("backend answered {answer:?}: {e}"));
        (status_of(&answer), value)
    }

    /// The backend's stored messages of `room` (`query` such as `?limit=50`).
    fn messages(&self, room: &str, query: &str) -> Vec<Value> {
        let (status, answer) = self.get(&format!("/rooms/{room}/messages{query}"));
        assert_eq!(status, 200, "{answer}");
        answer["messages"].as_array().expect("messages").clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// roomcast with the example's config file, its API key, and its webhooks
/// sent to `backend` (the flag wins over the file's `webhook_url`).
fn roomcast_for(backend: &Backend) -> TestServer {
    let config = root()
        .join("examples")
        .join("backend")
        .join("roomcast.toml");
    let webhook = format!("{}/webhook", backend.base);
    TestServer::start(&[
        "--config",
        config.to_str().unwrap(),
        "--api-key",
        API_KEY,
        "--webhook-url",
        &webhook,
    ])
}

/// The backend's own tests (`examples/backend/test_backend.py`: signatures,
/// redelivery, paging, the feed against a stub), which need no roomcast.
#[test]
fn the_backend_passes_its_own_tests() {
    let out = python3()
        .args(["-m", "unittest", "-q"])
        .current_dir(backend_script().parent().unwrap())
        .output()
        .expect("run python3 -m unittest");
    assert!(
        out.status.success(),
        "examples/backend/test_backend.py failed:\n{}",
        show_output(&out)
    );
}

#[test]
fn chat_messages_reach_the_backend_store_in_seq_order() {
    let backend = Backend::start("chat");
    let server = roomcast_for(&backend);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    alice.join("chat:lobby");
    bob.join("chat:lobby");

    // (sender, content): objects and a plain string, the content kept as sent.
    let plan = [
        ("alice", json!({"text": "hello 0", "n": 0})),
        ("bob", json!({"text": "hello 1", "n": 1})),
        ("alice", json!({"text": "hello 2", "n": 2})),
        ("bob", json!("a plain string")),
        (
            "alice",
            json!({"text": "hello 4", "nested": {"list": [1, 2, 3]}}),
        ),
    ];
    let mut sent = Vec::new(); // (seq from the ack, sender, content)
    for (i, (who, content)) in plan.into_iter().enumerate() {
        let client = if who == "alice" { &mut alice } else { &mut bob };
        client.send(json!({"type": "message", "id": i, "payload": {"room": "chat:lobby", "content": content}}));
        let ack = client.recv_type("ack");
        assert_eq!(ack["id"], i, "{ack}");
        sent.push((
            ack["payload"]["seq"].as_u64().expect("ack seq"),
            who,
            content,
        ));
    }
    sent.sort_by_key(|(seq, _, _)| *seq);

    // Webhooks leave within 50 ms of an event (§14.2); wait for all of them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let stored = loop {
        let stored = backend.messages("chat:lobby", "?limit=50");
        if stored.len() >= sent.len() {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "the backend holds {} of the {} messages after 15 s (webhooks of `chat:` rooms, \
             signed with the API key, should bring them): {stored:?}",
            stored.len(),
            sent.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(stored.len(), sent.len(), "{stored:?}");
    for (message, (seq, who, content)) in stored.iter().zip(&sent) {
        assert_eq!(message["seq"], *seq, "{stored:?}");
        assert_eq!(message["user"]["id"], *who, "{message}");
        assert_eq!(message["content"], *content, "{message}");
    }
    let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // "Load older" from the page's oldest held seq: the two before it, oldest first.
    let last = sent.last().unwrap().0;
    let older = backend.messages("chat:lobby", &format!("?before={last}&limit=2"));
    let older_seqs: Vec<u64> = older.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        older_seqs,
        seqs[seqs.len() - 3..seqs.len() - 1].to_vec(),
        "{older:?}"
    );
}

#[test]
fn a_feed_is_read_only_for_clients_and_fed_by_the_backend() {
    let backend = Backend::start("feed");
    let server = roomcast_for(&backend);
    let mut reader = server.connect("reader");
    let joined = reader.join("feed:news");
    assert_eq!(joined["payload"]["room"], "feed:news", "{joined}");

    let refused = reader.request(
        json!({"type": "message", "id": "try", "payload": {"room": "feed:news", "content": "hi"}}),
    );
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "forbidden", "{refused}");
    assert_eq!(refused["id"], "try", "{refused}");

    let roomcast = format!("http://{}", server.addr);
    let out = python(&[
        "--roomcast",
        &roomcast,
        "--api-key",
        API_KEY,
        "publish",
        "feed:news",
        "breaking news",
    ])
    .output()
    .expect("run backend.py publish");
    assert!(
        out.status.success(),
        "backend.py publish failed:\n{}",
        show_output(&out)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("publish answer");
    assert_eq!(answer["delivered"], 1, "{answer}");

    let message = reader.recv_type("message");
    assert_eq!(message["payload"]["room"], "feed:news", "{message}");
    assert_eq!(message["payload"]["user"]["id"], "server", "{message}");
    assert_eq!(
        message["payload"]["content"],
        json!({"text": "breaking news"})
    );
    assert_eq!(message["payload"]["seq"], answer["seq"], "{message}");
}
