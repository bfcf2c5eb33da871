//! The webhook sender (PROTOCOL §14.2) against a real HTTP receiver:
//! `roomcast::webhook::Webhooks` driven directly, as the hub drives it.
mod common;

use std::time::{Duration, Instant};

use common::WAIT;
use common::webhook_receiver::{Answer, WebhookReceiver, verify_signature};
use roomcast::webhook::{Event, WebhookConfig, Webhooks};

const SECRET: &[u8] = b"webhook-test-secret";

fn start(receiver: &WebhookReceiver, queue_capacity: usize) -> Webhooks {
    Webhooks::start(WebhookConfig {
        url: receiver.url(),
        secret: SECRET.to_vec(),
        queue_capacity,
    })
    .expect("start the sender")
}

/// Event `number`, told apart by its room.
fn event(number: usize) -> Event {
    Event::member_added(
        &format!("room-{number}"),
        r#"{"id":"u","name":"U"}"#,
        number as u64,
    )
}

fn rooms(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|event| event["room"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn expected_rooms(numbers: std::ops::Range<usize>) -> Vec<String> {
    numbers.map(|number| format!("room-{number}")).collect()
}

#[test]
fn a_batch_is_signed_json_with_a_delivery_id() {
    let receiver = WebhookReceiver::start();
    let webhooks = start(&receiver, 100);
    webhooks.push(Event::room_occupied("lobby \"1\"", 1));
    webhooks.push(event(2));
    webhooks.push(Event::message(
        "lobby",
        7,
        r#"{"id":"u","name":"U"}"#,
        r#"{"text":"hi"}"#,
        3,
    ));
    let requests = receiver.wait_for_requests(1, WAIT);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/hooks/roomcast");
    assert_eq!(request.header("content-type"), Some("application/json"));
    let signature = request.header("x-roomcast-signature").unwrap_or_default();
    assert!(
        verify_signature(SECRET, &request.body, signature),
        "{signature}"
    );
    assert!(!verify_signature(
        b"another secret",
        &request.body,
        signature
    ));
    assert!(!request.delivery().is_empty());
    let events = request.events();
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0],
        serde_json::json!({"name": "room_occupied", "room": "lobby \"1\"", "time_ms": 1})
    );
    assert_eq!(events[1]["user"]["id"], "u");
    assert_eq!(events[2]["seq"], 7);
    assert_eq!(events[2]["content"]["text"], "hi");
}

#[test]
fn two_hundred_fifty_events_go_in_batches_of_at_most_a_hundred_in_order() {
    let receiver = WebhookReceiver::start();
    let webhooks = start(&receiver, 1000);
    for number in 0..250 {
        webhooks.push(event(number));
    }
    let requests = receiver.wait_for_delivered_events(250, WAIT);
    let mut ids: Vec<&str> = requests.iter().map(|request| request.delivery()).collect();
    let mut arrived = Vec::new();
    for request in &requests {
        let events = request.events();
        assert!(events.len() <= 100, "a batch of {}", events.len());
        arrived.extend(rooms(&events));
    }
    assert_eq!(arrived, expected_rooms(0..250));
    let batches = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), batches, "one delivery id per batch");
    // Nothing is left, so finish returns once the last answer is counted.
    webhooks.finish(Instant::now() + WAIT);
    let stats = webhooks.stats();
    assert_eq!((stats.delivered, stats.dropped, stats.queued), (250, 0, 0));
    assert_eq!(stats.failures, 0);
}

#[test]
fn a_failed_batch_is_retried_with_the_same_id_and_body_and_nothing_is_lost() {
    let receiver = WebhookReceiver::start();
    receiver.fail_next(3, 500);
    let webhooks = start(&receiver, 1000);
    for number in 0..5 {
        webhooks.push(event(number));
    }
    // Events pushed while the first batch fails wait for the next one.
    receiver.wait_for_requests(1, WAIT);
    for number in 5..10 {
        webhooks.push(event(number));
    }
    let requests = receiver.wait_for_delivered_events(10, WAIT);
    let first = &requests[0];
    for retry in &requests[1..4] {
        assert_eq!(retry.delivery(), first.delivery());
        assert_eq!(retry.body, first.body);
        assert!(verify_signature(
            SECRET,
            &retry.body,
            retry.header("x-roomcast-signature").unwrap_or_default()
        ));
    }
    let answers: Vec<Answer> = requests.iter().map(|request| request.answer).collect();
    assert_eq!(
        answers[..4],
        [
            Answer::Status(500),
            Answer::Status(500),
            Answer::Status(500),
            Answer::Status(200)
        ]
    );
    let mut delivered = Vec::new();
    for request in requests.iter().filter(|r| r.answer == Answer::Status(200)) {
        delivered.extend(rooms(&request.events()));
    }
    assert_eq!(delivered, expected_rooms(0..10));
    assert_ne!(requests[4].delivery(), first.delivery());
    webhooks.finish(Instant::now() + WAIT);
    let stats = webhooks.stats();
    assert_eq!((stats.delivered, stats.failures, stats.dropped), (10, 3, 0));
}

#[test]
fn a_backend_that_does_not_answer_fills_the_queue_and_the_oldest_are_dropped() {
    let receiver = WebhookReceiver::start();
    receiver.hang_next(1);
    let webhooks = start(&receiver, 10);
    webhooks.push(event(0));
    // The first batch is out and gets no answer: the queue now only fills.
    receiver.wait_for_requests(1, WAIT);
    for number in 1..=50 {
        webhooks.push(event(number));
    }
    let stats = webhooks.stats();
    assert_eq!((stats.dropped, stats.queued), (40, 10), "{stats:?}");
    // After the attempt's 5 s timeout the batch goes again, same id, and
    // is answered; then the newest ten follow, in order.
    let requests = receiver.wait_for_delivered_events(11, WAIT);
    assert_eq!(requests[1].delivery(), requests[0].delivery());
    assert_eq!(requests[1].body, requests[0].body);
    let mut delivered = Vec::new();
    for request in requests.iter().filter(|r| r.answer == Answer::Status(200)) {
        delivered.extend(rooms(&request.events()));
    }
    let mut expected = expected_rooms(0..1);
    expected.extend(expected_rooms(41..51));
    assert_eq!(delivered, expected);
    webhooks.finish(Instant::now() + WAIT);
    let stats = webhooks.stats();
    assert_eq!(
        (stats.delivered, stats.dropped, stats.failures),
        (11, 40, 1)
    );
}

#[test]
fn a_backend_that_refuses_connections_counts_failures_and_drops() {
    // A port nobody listens on: every attempt is a connection error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", closed.local_addr().expect("address"));
    drop(closed);
    let webhooks = Webhooks::start(WebhookConfig {
        url,
        secret: SECRET.to_vec(),
        queue_capacity: 10,
    })
    .expect("start the sender");
    for number in 0..50 {
        webhooks.push(event(number));
    }
    // At most one batch (at most 10 events) can have left the queue before
    // the pushes ended, so at least 30 are dropped (40 when none had).
    let stats = webhooks.stats();
    assert!(stats.dropped >= 30 && stats.queued <= 10, "{stats:?}");
    // finish stops at its deadline with the refused batch still undelivered.
    webhooks.finish(Instant::now() + Duration::from_millis(300));
    let stats = webhooks.stats();
    assert_eq!(stats.delivered, 0);
    assert!(stats.failures >= 1, "{stats:?}");
}

#[test]
fn finish_sends_what_is_queued_without_waiting_to_fill_batches() {
    let receiver = WebhookReceiver::start();
    let webhooks = start(&receiver, 1000);
    for number in 0..130 {
        webhooks.push(event(number));
    }
    webhooks.finish(Instant::now() + WAIT);
    let stats = webhooks.stats();
    assert_eq!((stats.delivered, stats.queued), (130, 0));
    let mut arrived = Vec::new();
    for request in receiver.requests() {
        arrived.extend(rooms(&request.events()));
    }
    assert_eq!(arrived, expected_rooms(0..130));
}

#[test]
fn finish_returns_by_its_deadline_even_if_the_backend_hangs() {
    let receiver = WebhookReceiver::start();
    receiver.answer_always(Answer::Hang);
    let webhooks = start(&receiver, 1000);
    webhooks.push(event(0));
    // The first batch is out and will get no answer (5 s timeout).
    receiver.wait_for_requests(1, WAIT);
    webhooks.push(event(1));
    let deadline = Instant::now() + Duration::from_millis(500);
    webhooks.finish(deadline);
    // Generous, but well short of the 5 s an unanswered attempt may take.
    assert!(
        Instant::now() < deadline + Duration::from_secs(2),
        "finish overran its deadline"
    );
    let stats = webhooks.stats();
    assert_eq!(stats.delivered, 0);
    assert_eq!(
        stats.queued, 1,
        "the event behind the hung batch stays queued"
    );
}
