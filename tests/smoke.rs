mod common;

use common::TestServer;
use serde_json::json;

#[test]
fn two_clients_chat_in_a_room() {
    let server = TestServer::start(&[]);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    alice.join("lobby");
    bob.join("lobby");
    let joined = alice.recv();
    assert_eq!(joined["type"], "user_joined");
    let ack = alice.request(json!({"type": "message", "id": 1, "payload": {"room": "lobby", "content": {"text": "hi"}}}));
    // The broadcast to the sender comes first, then the ack.
    assert_eq!(ack["type"], "message");
    assert_eq!(alice.recv()["type"], "ack");
    let message = bob.recv();
    assert_eq!(message["payload"]["content"]["text"], "hi");
    assert_eq!(message["payload"]["seq"], 1);
}
