//! `--state-file`: recovery survives a restart; a corrupt file is set aside;
//! after a crash no seq is given twice within one epoch (§11).
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::{Value, json};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roomcast-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn recovery_works_across_a_graceful_restart() {
    let dir = scratch("restart");
    let path = dir.join("state.json");
    let path_arg = path.to_str().unwrap();
    let server = TestServer::start(&["--state-file", path_arg, "--drain-ms", "0"]);
    let mut alice = server.connect("alice");
    let epoch = alice.join("news")["payload"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 1..=3 {
        alice.send(json!({"type": "message", "payload": {"room": "news", "content": n}}));
        assert_eq!(alice.recv_type("message")["payload"]["seq"], n);
    }
    let status = server.terminate();
    assert!(status.success());
    assert!(path.exists(), "the state was written on shutdown");

    let server = TestServer::start(&["--state-file", path_arg]);
    let mut bob = server.connect("bob");
    let joined = bob
        .request(json!({"type": "join", "payload": {"room": "news", "since": 1, "epoch": epoch}}));
    assert_eq!(joined["payload"]["epoch"], epoch.as_str());
    assert_eq!(joined["payload"]["seq"], 3);
    assert_eq!(joined["payload"]["recovered"], true);
    assert_eq!(joined["payload"]["missed"], 2);
    assert_eq!(bob.recv()["payload"]["content"], 2);
    assert_eq!(bob.recv()["payload"]["content"], 3);
    // The sequence continues where it stopped.
    bob.send(json!({"type": "message", "payload": {"room": "news", "content": 4}}));
    assert_eq!(bob.recv_type("message")["payload"]["seq"], 4);
}

#[test]
fn a_corrupt_state_file_is_set_aside_and_the_server_starts_fresh() {
    let dir = scratch("corrupt");
    let path = dir.join("state.json");
    std::fs::write(&path, b"{ this is not a state file").unwrap();
    let server = TestServer::start(&["--state-file", path.to_str().unwrap()]);
    let mut alice = server.connect("alice");
    assert_eq!(alice.join("news")["payload"]["seq"], 0);
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the bad file was moved aside");
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        b"{ this is not a state file",
        "and kept as it was"
    );
}

fn epoch_of(joined: &Value) -> String {
    joined["payload"]["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch in {joined}"))
        .to_string()
}

/// Waits until the state file holds `needle` (the periodic snapshot runs
/// every 10 s); the file is replaced by a rename, so each read is whole.
fn wait_for_file_containing(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::read_to_string(path).is_ok_and(|text| text.contains(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the state file never held {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn after_a_kill_the_rooms_start_new_epochs_and_no_seq_is_given_twice() {
    let dir = scratch("kill");
    let path = dir.join("state.json");
    let path_arg = path.to_str().unwrap();
    // A graceful stop saves seq 3.
    let server = TestServer::start(&["--state-file", path_arg, "--drain-ms", "0"]);
    let mut alice = server.connect("alice");
    let epoch = epoch_of(&alice.join("news"));
    for n in 1..=3 {
        alice.send(json!({"type": "message", "payload": {"room": "news", "content": n}}));
        assert_eq!(alice.recv_type("message")["payload"]["seq"], n);
    }
    assert!(server.terminate().success());

    // The next run keeps the epoch, publishes seq 4 and 5, and is killed.
    let mut server = TestServer::start(&["--state-file", path_arg]);
    let mut alice = server.connect("alice");
    let joined = alice.join("news");
    assert_eq!(epoch_of(&joined), epoch, "a clean stop keeps the epoch");
    assert_eq!(joined["payload"]["seq"], 3);
    for n in 4..=5 {
        alice.send(json!({"type": "message", "payload": {"room": "news", "content": n}}));
        assert_eq!(alice.recv_type("message")["payload"]["seq"], n);
    }
    server.kill();

    // The restart: a publish comes first, as in the issue (it got seq 4 again).
    let server = TestServer::start(&["--state-file", path_arg]);
    let mut carol = server.connect("carol");
    let joined = carol.join("news");
    let new_epoch = epoch_of(&joined);
    assert_ne!(new_epoch, epoch, "an unclean stop starts a new epoch");
    // The seq goes on from what the file held (3, or 5 if a snapshot ran).
    let seq = joined["payload"]["seq"].as_u64().unwrap();
    assert!((3..=5).contains(&seq), "{joined}");
    carol.send(json!({"type": "message", "payload": {"room": "news", "content": "after"}}));
    assert_eq!(carol.recv_type("message")["payload"]["seq"], seq + 1);

    // A client that saw seq 4 of the old epoch is told it cannot recover.
    let mut bob = server.connect("bob");
    let joined = bob
        .request(json!({"type": "join", "payload": {"room": "news", "since": 4, "epoch": epoch}}));
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["recovered"], false, "{joined}");
    assert_eq!(joined["payload"]["missed"], 0, "{joined}");
    assert_eq!(epoch_of(&joined), new_epoch, "{joined}");
    assert_eq!(joined["payload"]["seq"], seq + 1, "{joined}");
    bob.send(json!({"type": "message", "payload": {"room": "news", "content": "next"}}));
    assert_eq!(bob.recv_type("message")["payload"]["seq"], seq + 2);

    // Within the new epoch, recovery works as ever.
    let mut dave = server.connect("dave");
    let joined = dave.request(
        json!({"type": "join", "payload": {"room": "news", "since": seq, "epoch": new_epoch}}),
    );
    assert_eq!(joined["payload"]["recovered"], true, "{joined}");
    assert_eq!(joined["payload"]["missed"], 2, "{joined}");
    assert_eq!(dave.recv()["payload"]["content"], "after");
    assert_eq!(dave.recv()["payload"]["content"], "next");
}

#[test]
fn a_periodic_snapshot_keeps_history_published_after_the_start() {
    let dir = scratch("snapshot");
    let path = dir.join("state.json");
    let path_arg = path.to_str().unwrap();
    let mut server = TestServer::start(&["--state-file", path_arg]);
    let mut alice = server.connect("alice");
    let epoch = epoch_of(&alice.join("news"));
    alice.send(json!({"type": "message", "payload": {"room": "news", "content": "snapshot-1"}}));
    assert_eq!(alice.recv_type("message")["payload"]["seq"], 1);
    wait_for_file_containing(&path, "snapshot-1");
    server.kill();

    let server = TestServer::start(&["--state-file", path_arg]);
    let mut bob = server.connect("bob");
    let joined = bob
        .request(json!({"type": "join", "payload": {"room": "news", "since": 0, "epoch": epoch}}));
    assert_eq!(joined["payload"]["recovered"], false, "{joined}");
    assert_eq!(joined["payload"]["seq"], 1, "the snapshot's seq");
    let new_epoch = epoch_of(&joined);
    assert_ne!(new_epoch, epoch);
    // The history came through the crash, under the new epoch.
    let mut carol = server.connect("carol");
    let joined = carol.request(
        json!({"type": "join", "payload": {"room": "news", "since": 0, "epoch": new_epoch}}),
    );
    assert_eq!(joined["payload"]["recovered"], true, "{joined}");
    assert_eq!(joined["payload"]["missed"], 1, "{joined}");
    let replayed = carol.recv();
    assert_eq!(replayed["payload"]["content"], "snapshot-1");
    assert_eq!(replayed["payload"]["seq"], 1);
    carol.send(json!({"type": "message", "payload": {"room": "news", "content": "next"}}));
    assert_eq!(carol.recv_type("message")["payload"]["seq"], 2);
}
