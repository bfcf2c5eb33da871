//! `--state-file`: recovery survives a restart; a corrupt file is set aside.
mod common;

use common::TestServer;
use serde_json::json;

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
