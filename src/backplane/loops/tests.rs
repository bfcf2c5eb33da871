//! The rules over N loops, without sockets or threads: two hubs, each over
//! its own [`LoopsBackplane`], in one thread; the tests carry the mail
//! between them (as the shell's channels would) until none is left.

use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::auth::{Identity, RoomAccess};
use crate::hub::test_support::{config, kinds, take_frames};
use crate::hub::{ConnId, Hub, HubConfig};

const NOW: Millis = 1_700_000_000_000;

/// Two loops of one process.
struct Process {
    loops: Vec<Hub>,
}

impl Process {
    fn new(count: usize) -> Self {
        Process::with_namespaces(count, crate::hub::Namespaces::none(100))
    }

    fn with_namespaces(count: usize, namespaces: crate::hub::Namespaces) -> Self {
        let namespaces = Arc::new(namespaces);
        let homes = Arc::new(RoomHomes::default());
        let loops = (0..count)
            .map(|index| {
                let backplane = LoopsBackplane::new(
                    index,
                    count,
                    Arc::clone(&namespaces),
                    Arc::clone(&homes),
                    crate::backplane::events::RoomEvents::default(),
                );
                let config = HubConfig {
                    namespaces: Arc::clone(&namespaces),
                    max_rooms_per_connection: 10,
                    ..config()
                };
                let mut hub = Hub::with_backplane(config, Box::new(backplane));
                hub.number_connections(index as u64, count as u64);
                hub
            })
            .collect();
        Process { loops }
    }

    /// Carries every loop's mail to its destination until none is left.
    fn settle(&mut self) {
        loop {
            let mut mail = Vec::new();
            for hub in &mut self.loops {
                if let Some(loops) = hub.backplane_mut::<LoopsBackplane>() {
                    loops.take_outgoing(&mut mail);
                }
            }
            if mail.is_empty() {
                return;
            }
            for (to, message) in mail {
                let Some(hub) = self.loops.get_mut(to) else {
                    continue;
                };
                if let Some(loops) = hub.backplane_mut::<LoopsBackplane>() {
                    loops.on_message(message, NOW);
                }
                hub.backplane_changed(NOW);
            }
        }
    }

    fn connect(&mut self, on: usize, conn: ConnId, user: &str) {
        let identity = Identity {
            user_id: user.into(),
            name: user.into(),
            expires_at: None,
            rooms: RoomAccess::Every,
        };
        self.loops[on].connect(conn, identity, None, NOW);
        self.settle();
        assert_eq!(kinds(&self.drain(on, conn)), ["welcome"]);
    }

    fn send(&mut self, on: usize, conn: ConnId, frame: Value) {
        self.loops[on].receive_text(conn, &frame.to_string(), NOW);
        self.settle();
    }

    fn join(&mut self, on: usize, conn: ConnId, room: &str) -> Value {
        self.send(on, conn, json!({"type": "join", "payload": {"room": room}}));
        let frames = self.drain(on, conn);
        assert_eq!(kinds(&frames), ["joined"], "{frames:?}");
        frames[0]["payload"].clone()
    }

    fn drain(&mut self, on: usize, conn: ConnId) -> Vec<Value> {
        take_frames(&mut self.loops[on], conn)
    }
}

fn message(room: &str, content: i64, id: &str) -> Value {
    json!({"type": "message", "id": id, "payload": {"room": room, "content": content}})
}

#[test]
fn one_seq_order_for_members_on_every_loop() {
    let mut process = Process::new(2);
    process.connect(0, 1, "alice");
    process.connect(1, 1, "bob");
    assert_eq!(process.join(0, 1, "r")["count"], 1);
    // Bob's join goes to the room's home (loop 0) and comes back.
    assert_eq!(process.join(1, 1, "r")["count"], 2);
    assert_eq!(kinds(&process.drain(0, 1)), ["user_joined"]);
    // Both publish; each gets its ack and every message once, in one order.
    process.send(1, 1, message("r", 1, "b1"));
    process.send(0, 1, message("r", 2, "a1"));
    process.send(1, 1, message("r", 3, "b2"));
    let alice = process.drain(0, 1);
    let bob = process.drain(1, 1);
    let seqs = |frames: &[Value]| -> Vec<(u64, i64)> {
        frames
            .iter()
            .filter(|f| f["type"] == "message")
            .map(|f| {
                (
                    f["payload"]["seq"].as_u64().unwrap(),
                    f["payload"]["content"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(seqs(&alice), [(1, 1), (2, 2), (3, 3)]);
    assert_eq!(seqs(&alice), seqs(&bob));
    let acks: Vec<u64> = bob
        .iter()
        .filter(|f| f["type"] == "ack")
        .map(|f| f["payload"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(acks, [1, 3], "Bob's acks, from the room's home: {bob:?}");
    for hub in &process.loops {
        hub.check_invariants().unwrap();
    }
}

#[test]
fn a_user_with_tabs_on_two_loops_is_one_user() {
    let mut process = Process::new(2);
    process.connect(0, 1, "carol");
    process.join(0, 1, "r");
    process.connect(0, 2, "dave");
    process.connect(1, 2, "dave");
    assert_eq!(process.join(0, 2, "r")["count"], 2);
    assert_eq!(process.join(1, 2, "r")["count"], 2, "dave's second tab");
    // Carol was told once.
    let told = process.drain(0, 1);
    assert_eq!(kinds(&told), ["user_joined"], "{told:?}");
    // Presence from the other loop merges the tabs.
    process.send(
        1,
        2,
        json!({"type": "presence", "id": "p", "payload": {"room": "r"}}),
    );
    let presence = process.drain(1, 2);
    let dave = presence[0]["payload"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|user| user["id"] == "dave")
        .cloned()
        .unwrap();
    assert_eq!(dave["connections"], 2, "{presence:?}");
    // One tab closes: no user_left; the second: one.
    process.loops[1].disconnect(2, NOW);
    process.settle();
    assert!(process.drain(0, 1).is_empty());
    process.loops[0].disconnect(2, NOW);
    process.settle();
    let left = process.drain(0, 1);
    assert_eq!(kinds(&left), ["user_left"]);
    assert_eq!(left[0]["payload"]["count"], 1);
}

#[test]
fn a_direct_reaches_every_loop_and_counts_them() {
    let mut process = Process::new(3);
    process.connect(0, 1, "erin");
    process.connect(1, 1, "frank");
    process.connect(2, 1, "frank");
    process.send(
        0,
        1,
        json!({"type": "direct", "id": "d", "payload": {"to": "frank", "content": "hi"}}),
    );
    assert_eq!(kinds(&process.drain(0, 1)), ["ack"]);
    for on in [1, 2] {
        assert_eq!(kinds(&process.drain(on, 1)), ["direct"]);
    }
    process.send(
        0,
        1,
        json!({"type": "direct", "id": "n", "payload": {"to": "nobody", "content": 1}}),
    );
    let refused = process.drain(0, 1);
    assert_eq!(refused[0]["payload"]["code"], "user_offline");
}

#[test]
fn a_room_on_one_loop_sends_no_mail() {
    let mut process = Process::new(2);
    process.connect(1, 1, "gina");
    process.connect(1, 3, "hal");
    process.join(1, 1, "quiet");
    process.join(1, 3, "quiet");
    process.drain(1, 1);
    process.loops[1].receive_text(1, &message("quiet", 1, "m").to_string(), NOW);
    let mut mail = Vec::new();
    if let Some(loops) = process.loops[1].backplane_mut::<LoopsBackplane>() {
        loops.take_outgoing(&mut mail);
    }
    assert!(
        mail.is_empty(),
        "a room whose members share a loop: {mail:?}"
    );
    assert_eq!(kinds(&process.drain(1, 1)), ["message", "ack"]);
    assert_eq!(kinds(&process.drain(1, 3)), ["message"]);
}

#[test]
fn max_members_and_member_events_are_decided_by_the_rooms_home_loop() {
    let namespaces = crate::hub::Namespaces::new(
        crate::hub::RoomOptions::defaults(100),
        &[crate::hub::NamespaceSpec {
            prefix: "duo:".into(),
            max_members: Some(2),
            member_events: Some(false),
            ..Default::default()
        }],
    );
    let mut process = Process::with_namespaces(2, namespaces);
    process.connect(0, 0, "alice");
    process.connect(1, 1, "bob");
    process.connect(1, 2, "carol");
    process.connect(0, 3, "bob");
    process.join(0, 0, "duo:x");
    assert_eq!(process.join(1, 1, "duo:x")["count"], 2);
    // No `user_joined` on the home loop for bob.
    assert!(process.drain(0, 0).is_empty());
    process.send(
        1,
        2,
        json!({"type": "join", "id": "j", "payload": {"room": "duo:x"}}),
    );
    let frames = process.drain(1, 2);
    assert_eq!(kinds(&frames), ["error"], "{frames:?}");
    assert_eq!(frames[0]["payload"]["code"], "room_full");
    assert_eq!(frames[0]["id"], "j");
    // Bob's second connection, on the home loop, is no new user.
    assert_eq!(process.join(0, 3, "duo:x")["count"], 2);
    // Carol was never counted: once bob's connections leave, she fits.
    for (on, conn) in [(1, 1), (0, 3)] {
        process.send(
            on,
            conn,
            json!({"type": "leave", "payload": {"room": "duo:x"}}),
        );
        process.drain(on, conn);
    }
    assert_eq!(process.join(1, 2, "duo:x")["count"], 2);
}

/// The answer of a server API request on loop `on`, once the mail settled.
fn api_answer(process: &mut Process, on: usize, ticket: u64) -> crate::hub::ApiAnswer {
    process.settle();
    let mut answers = Vec::new();
    process.loops[on].take_api_answers(&mut answers);
    let (got, answer) = answers.pop().expect("an API answer");
    assert_eq!(got, ticket);
    answer
}

#[test]
fn the_rooms_of_every_loop_are_listed_by_name_and_one_room_by_its_home() {
    let mut process = Process::new(3);
    process.connect(0, 1, "ann");
    process.connect(1, 1, "bob");
    process.connect(2, 1, "ann");
    process.join(1, 1, "b");
    process.join(0, 1, "a");
    process.join(2, 1, "a");
    process.join(2, 1, "c");
    let query = RoomQuery::List {
        prefix: "".into(),
        limit: 2,
    };
    let kind = crate::hub::ApiKind::Rooms { limit: 2 };
    assert_eq!(process.loops[1].api_rooms(query, kind, NOW, 7), None);
    let crate::hub::ApiAnswer::Ok(json) = api_answer(&mut process, 1, 7) else {
        panic!("not answered");
    };
    let list: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(list["truncated"], true);
    assert_eq!(list["rooms"][0]["room"], "a");
    assert_eq!(list["rooms"][0]["count"], 1);
    assert_eq!(list["rooms"][0]["connections"], 2);
    assert_eq!(list["rooms"][1]["room"], "b");

    // "a" is homed on loop 0: loop 2 asks it.
    let query = RoomQuery::One { room: "a".into() };
    assert_eq!(
        process.loops[2].api_rooms(query, crate::hub::ApiKind::Room, NOW, 8),
        None
    );
    let crate::hub::ApiAnswer::Ok(json) = api_answer(&mut process, 2, 8) else {
        panic!("not answered");
    };
    let room: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        room["users"],
        json!([{"id": "ann", "name": "ann", "connections": 2}])
    );
}

#[test]
fn subscribe_counts_the_connections_that_joined_on_every_loop() {
    let mut process = Process::new(2);
    process.connect(0, 1, "ann");
    process.connect(1, 1, "ann");
    process.join(1, 1, "r");
    let body = br#"{"user":"ann","room":"r"}"#;
    assert_eq!(process.loops[0].api_membership(body, true, NOW, 3), None);
    // Only the connection on loop 0 joined: the other was in the room.
    assert_eq!(
        api_answer(&mut process, 0, 3),
        crate::hub::ApiAnswer::Ok(r#"{"joined":1}"#.into())
    );
    let frames = process.drain(0, 1);
    assert_eq!(kinds(&frames), ["joined"], "{frames:?}");
    assert_eq!(process.loops[1].api_membership(body, false, NOW, 4), None);
    assert_eq!(
        api_answer(&mut process, 1, 4),
        crate::hub::ApiAnswer::Ok(r#"{"left":2}"#.into())
    );
}
