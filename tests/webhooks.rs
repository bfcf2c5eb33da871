//! Webhooks end to end (PROTOCOL §14.2): the real server, its rooms' events,
//! and a real receiver on a loopback port. Runs with one loop and with
//! several (`ROOMCAST_TEST_THREADS`); one test asks for four loops itself.
mod common;

use std::collections::HashSet;

use serde_json::{Value, json};

use common::webhook_receiver::{Answer, WebhookReceiver, delivered, verify_signature};
use common::{Client, TestServer, WAIT};

const WEBHOOK_SECRET: &str = "webhook-secret";

/// Rooms under `chat:` send their client messages to the webhook; rooms
/// under `quiet:` tell their members nothing of joins and leaves.
fn config_file() -> std::path::PathBuf {
    common::scratch_file(
        "roomcast.toml",
        "[[namespace]]\nprefix = \"chat:\"\nwebhook_messages = true\n\
         [[namespace]]\nprefix = \"quiet:\"\nmember_events = false\n",
    )
}

fn server(receiver: &WebhookReceiver, extra: &[&str]) -> TestServer {
    let config = config_file();
    let url = receiver.url();
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--webhook-url",
        &url,
        "--webhook-secret",
        WEBHOOK_SECRET,
    ];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

/// Waits until an accepted batch held an event `name` for `room`.
fn wait_for_event(receiver: &WebhookReceiver, name: &str, room: &str) -> Vec<Value> {
    let requests = receiver.wait_until(WAIT, |requests| {
        delivered(requests)
            .iter()
            .any(|event| event["name"] == name && event["room"] == room)
    });
    delivered(&requests)
}

/// `name` and the user id (or seq) of each event of `room`.
fn story(events: &[Value], room: &str) -> Vec<String> {
    events
        .iter()
        .filter(|event| event["room"] == room)
        .map(|event| {
            let name = event["name"].as_str().unwrap_or("?");
            match (&event["user"]["id"], &event["seq"]) {
                (_, Value::Number(seq)) => format!("{name} {seq}"),
                (Value::String(user), _) => format!("{name} {user}"),
                _ => name.to_string(),
            }
        })
        .collect()
}

fn send_message(client: &mut Client, room: &str, content: Value) {
    client.send(json!({"type": "message", "id": 1, "payload": {"room": room, "content": content}}));
    client.recv_type("ack");
}

fn leave(client: &mut Client, room: &str) {
    client.send(json!({"type": "leave", "payload": {"room": room}}));
    client.recv_type("left");
}

fn metric(server: &TestServer, line_start: &str) -> u64 {
    let text = server.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}"))
}

#[test]
fn a_rooms_life_reaches_the_backend_signed_and_in_order() {
    let receiver = WebhookReceiver::start();
    let server = server(&receiver, &[]);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    alice.join("chat:a");
    bob.join("chat:a");
    send_message(&mut alice, "chat:a", json!({"text": "hi"}));
    leave(&mut bob, "chat:a");
    drop(bob);
    leave(&mut alice, "chat:a");
    // Messages of rooms without webhook_messages stay between the members.
    alice.join("plain");
    send_message(&mut alice, "plain", json!(1));
    leave(&mut alice, "plain");
    let events = wait_for_event(&receiver, "room_vacated", "plain");
    assert_eq!(
        story(&events, "chat:a"),
        [
            "room_occupied",
            "member_added alice",
            "member_added bob",
            "message 1",
            "member_removed bob",
            "member_removed alice",
            "room_vacated",
        ]
    );
    assert_eq!(
        story(&events, "plain"),
        [
            "room_occupied",
            "member_added alice",
            "member_removed alice",
            "room_vacated"
        ]
    );
    let message = events
        .iter()
        .find(|event| event["name"] == "message")
        .unwrap();
    assert_eq!(message["content"], json!({"text": "hi"}));
    assert_eq!(message["user"], json!({"id": "alice", "name": "alice"}));
    assert!(message["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let requests = receiver.requests();
    let mut ids = HashSet::new();
    for request in &requests {
        assert_eq!(request.method, "POST");
        assert_eq!(request.header("content-type"), Some("application/json"));
        let signature = request.header("x-roomcast-signature").unwrap_or_default();
        assert!(
            verify_signature(WEBHOOK_SECRET.as_bytes(), &request.body, signature),
            "the signature verifies"
        );
        assert!(request.events().len() <= 100);
        assert!(ids.insert(request.delivery().to_string()), "ids are unique");
    }
}

#[test]
fn with_four_loops_each_event_is_sent_once() {
    let receiver = WebhookReceiver::start();
    let server = server(&receiver, &["--threads", "4"]);
    // Connections are handed to the loops in turn: these span all four.
    let mut clients: Vec<Client> = (0..8)
        .map(|n| server.connect(&format!("user{n}")))
        .collect();
    for client in &mut clients {
        client.join("chat:big");
    }
    for (n, client) in clients.iter_mut().enumerate() {
        send_message(client, "chat:big", json!(n));
    }
    for client in &mut clients {
        leave(client, "chat:big");
    }
    let events = wait_for_event(&receiver, "room_vacated", "chat:big");
    let story = story(&events, "chat:big");
    let count = |prefix: &str| story.iter().filter(|line| line.starts_with(prefix)).count();
    assert_eq!(count("room_occupied"), 1, "{story:?}");
    assert_eq!(count("member_added"), 8, "{story:?}");
    assert_eq!(count("message"), 8, "{story:?}");
    assert_eq!(count("member_removed"), 8, "{story:?}");
    assert_eq!(count("room_vacated"), 1, "{story:?}");
    assert_eq!(story.first().map(String::as_str), Some("room_occupied"));
    assert_eq!(story.last().map(String::as_str), Some("room_vacated"));
    let seqs: HashSet<&String> = story.iter().filter(|l| l.starts_with("message")).collect();
    assert_eq!(seqs.len(), 8, "one event per seq");
}

#[test]
fn a_failing_receiver_gets_the_same_delivery_again_and_loses_nothing() {
    let receiver = WebhookReceiver::start();
    receiver.fail_next(3, 500);
    let server = server(&receiver, &[]);
    let mut alice = server.connect("alice");
    alice.join("chat:r");
    send_message(&mut alice, "chat:r", json!("kept"));
    leave(&mut alice, "chat:r");
    let events = wait_for_event(&receiver, "room_vacated", "chat:r");
    assert_eq!(
        story(&events, "chat:r"),
        [
            "room_occupied",
            "member_added alice",
            "message 1",
            "member_removed alice",
            "room_vacated"
        ]
    );
    let requests = receiver.requests();
    let first = &requests[0];
    for retry in &requests[1..4] {
        assert_eq!(retry.delivery(), first.delivery(), "a retry keeps its id");
        assert_eq!(retry.body, first.body, "and its body");
    }
    assert_eq!(requests[3].answer, Answer::Status(200));
    assert_eq!(metric(&server, "roomcast_webhook_failures_total"), 3);
    // The sender counts a batch once it has read the answer, just after the
    // receiver recorded it.
    let deadline = std::time::Instant::now() + WAIT;
    while metric(
        &server,
        "roomcast_webhook_events_total{result=\"delivered\"}",
    ) < 5
    {
        assert!(
            std::time::Instant::now() < deadline,
            "5 events counted delivered"
        );
        std::thread::yield_now();
    }
}

#[test]
fn with_the_receiver_down_the_queue_keeps_the_newest_and_counts_the_dropped() {
    let receiver = WebhookReceiver::start();
    receiver.answer_always(Answer::Hang);
    let server = server(&receiver, &["--webhook-queue", "5"]);
    let mut alice = server.connect("alice");
    // A first batch goes out and hangs; what comes next waits in the queue.
    alice.join("r0");
    receiver.wait_for_requests(1, WAIT);
    for n in 1..=20 {
        let room = format!("r{n}");
        alice.join(&room);
        leave(&mut alice, &room);
    }
    // 20 rooms × 4 events into a queue of 5.
    assert_eq!(
        metric(&server, "roomcast_webhook_events_total{result=\"dropped\"}"),
        75
    );
    assert_eq!(metric(&server, "roomcast_webhook_queue_events"), 5);
}

#[test]
fn events_queued_at_sigterm_go_out_before_the_process_ends() {
    let receiver = WebhookReceiver::start();
    let server = server(&receiver, &["--drain-ms", "200"]);
    let mut alice = server.connect("alice");
    alice.join("chat:last");
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    // The drain closed alice: her leaving was sent before the exit.
    let events = delivered(&receiver.requests());
    assert_eq!(
        story(&events, "chat:last"),
        [
            "room_occupied",
            "member_added alice",
            "member_removed alice",
            "room_vacated"
        ]
    );
}

#[test]
fn the_backend_hears_of_members_whatever_member_events_says() {
    let receiver = WebhookReceiver::start();
    let server = server(&receiver, &[]);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    alice.join("quiet:q");
    bob.join("quiet:q");
    leave(&mut bob, "quiet:q");
    leave(&mut alice, "quiet:q");
    let events = wait_for_event(&receiver, "room_vacated", "quiet:q");
    assert_eq!(
        story(&events, "quiet:q"),
        [
            "room_occupied",
            "member_added alice",
            "member_added bob",
            "member_removed bob",
            "member_removed alice",
            "room_vacated",
        ]
    );
}
