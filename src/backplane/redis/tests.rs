//! The rules over the Redis backplane, without Redis: the hub's commands
//! are read from the backplane's outgoing queue, and Redis's answers and
//! publications are played back as `Event`s in the orders the real bridge
//! can produce them.

use serde_json::{Value, json};

use super::commands::{
    Command, Event, Outgoing, RegisteredRoom, Reply, ReqId, RoomItem, RoomMembers, RoomState,
    Subscription,
};
use super::*;
use crate::auth::{Identity, RoomAccess};
use crate::hub::test_support::{config, kinds, take_frames};
use crate::hub::{ApiAnswer, ConnId, Hub};

/// The shell's side of the Redis backplane, as the tests drive it.
trait RedisShell {
    /// An event from the bridge, applied as the loop applies it: handed to
    /// the backplane, its effects applied, the hub ticked.
    fn cluster_event(&mut self, event: Event, now: Millis);
    /// What the node sends to Redis, in order.
    fn take_cluster_out(&mut self, into: &mut Vec<Outgoing>);
    /// Whether Redis is reachable and the node registered.
    fn cluster_up(&self) -> Option<bool>;
}

impl RedisShell for Hub {
    fn cluster_event(&mut self, event: Event, now: Millis) {
        if let Some(redis) = self.backplane_mut::<RedisBackplane>() {
            redis.on_event(event, now);
        }
        self.backplane_changed(now);
        self.tick(now);
    }

    fn take_cluster_out(&mut self, into: &mut Vec<Outgoing>) {
        if let Some(redis) = self.backplane_mut::<RedisBackplane>() {
            redis.take_outgoing(into);
        }
    }

    fn cluster_up(&self) -> Option<bool> {
        self.backplane_reachable()
    }
}

const NOW: Millis = 1_700_000_000_000;

fn hub() -> Hub {
    let backplane = Box::new(RedisBackplane::new("proc".into(), NOW));
    Hub::with_backplane(config(), backplane)
}

/// Both links up and the registration answered: the node is up.
fn up(hub: &mut Hub) {
    hub.cluster_event(Event::CommandLink(true), NOW);
    hub.cluster_event(Event::SubscriberLink(true), NOW);
    let register = out(hub)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Command(Command::Register { req, .. }) => Some(req),
            _ => None,
        })
        .expect("a registration");
    reply(hub, register, Reply::Registered { rooms: Vec::new() });
    assert_eq!(hub.cluster_up(), Some(true));
}

fn out(hub: &mut Hub) -> Vec<Outgoing> {
    let mut out = Vec::new();
    hub.take_cluster_out(&mut out);
    out
}

fn reply(hub: &mut Hub, req: ReqId, reply: Reply) {
    hub.cluster_event(
        Event::Reply {
            req,
            result: Ok(reply),
        },
        NOW,
    );
}

fn identity(user: &str) -> Identity {
    Identity {
        user_id: user.into(),
        name: user.into(),
        expires_at: None,
        rooms: RoomAccess::Every,
    }
}

fn connect(hub: &mut Hub, conn: ConnId, user: &str) {
    hub.connect(conn, identity(user), None, NOW);
    assert_eq!(kinds(&drain(hub, conn)), ["welcome"]);
}

fn send(hub: &mut Hub, conn: ConnId, frame: Value) {
    hub.receive_text(conn, &frame.to_string(), NOW);
}

/// Everything queued to a connection, as JSON.
fn drain(hub: &mut Hub, conn: ConnId) -> Vec<Value> {
    take_frames(hub, conn)
}

fn message_text(seq: u64) -> String {
    format!(r#"{{"type":"message","payload":{{"room":"r","seq":{seq}}}}}"#)
}

fn room_message(seq: u64) -> Event {
    Event::Room {
        room: "r".into(),
        item: RoomItem::Message {
            seq,
            frame: protocol::text_frame(&message_text(seq)),
        },
    }
}

/// A registration's answer for room "r": its state and the history frames.
fn registered(epoch: &str, seq: u64, history: impl IntoIterator<Item = u64>) -> Reply {
    Reply::Registered {
        rooms: vec![RegisteredRoom {
            state: RoomState {
                epoch: epoch.into(),
                seq,
                count: 1,
            },
            frames: history.into_iter().map(message_text).collect(),
        }],
    }
}

/// Both links drop and come back (Redis restarted): the registration sent
/// then, and the rooms it names.
fn outage(hub: &mut Hub) -> (ReqId, Vec<RoomMembers>) {
    hub.cluster_event(Event::CommandLink(false), NOW);
    hub.cluster_event(Event::SubscriberLink(false), NOW);
    hub.cluster_event(Event::CommandLink(true), NOW);
    hub.cluster_event(Event::SubscriberLink(true), NOW);
    out(hub)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Command(Command::Register { req, rooms, .. }) => Some((req, rooms)),
            _ => None,
        })
        .expect("registered again")
}

/// Alice (connection 1) in room "r" of epoch "e1", having seen up to `seq`.
fn alice_in_r(hub: &mut Hub, seq: u64) {
    up(hub);
    connect(hub, 1, "alice");
    let req = start_join(hub, 1, "j");
    hub.cluster_event(marker(req), NOW);
    reply(hub, req, joined(seq));
    drain(hub, 1);
}

fn marker(req: ReqId) -> Event {
    Event::Room {
        room: "r".into(),
        item: RoomItem::Marker { req },
    }
}

/// Sends `join r` and returns the join's request id (after the subscription).
fn start_join(hub: &mut Hub, conn: ConnId, id: &str) -> ReqId {
    send(
        hub,
        conn,
        json!({"type": "join", "id": id, "payload": {"room": "r"}}),
    );
    out(hub)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Command(Command::Join { req, .. }) => Some(req),
            _ => None,
        })
        .expect("a join command")
}

fn joined(seq: u64) -> Reply {
    Reply::Joined {
        state: RoomState {
            epoch: "e1".into(),
            seq,
            count: 1,
        },
        history_len: seq,
        frames: Vec::new(),
    }
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["payload"]["seq"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_join_subscribes_first_and_names_its_subscription() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    assert!(matches!(
        &out(&mut hub)[..],
        [Outgoing::Command(Command::UserCount { count: 1, .. })]
    ));
    send(
        &mut hub,
        1,
        json!({"type": "join", "payload": {"room": "r"}}),
    );
    let sent = out(&mut hub);
    let [
        Outgoing::Subscription(Subscription::Subscribe { room, generation }),
        Outgoing::Command(Command::Join { sub_generation, .. }),
    ] = &sent[..]
    else {
        panic!("subscribe, then join: {sent:?}");
    };
    assert_eq!(room, "r");
    assert_eq!(generation, sub_generation);
    hub.check_invariants().unwrap();
}

#[test]
fn traffic_before_the_marker_is_dropped_and_after_it_waits_for_joined() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    let req = start_join(&mut hub, 1, "j");
    // From before the join took effect: covered by `joined`.
    hub.cluster_event(room_message(5), NOW);
    hub.cluster_event(marker(req), NOW);
    // After it: held until `joined` is queued.
    hub.cluster_event(room_message(6), NOW);
    assert!(drain(&mut hub, 1).is_empty());
    reply(&mut hub, req, joined(5));
    hub.cluster_event(room_message(7), NOW);
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames), ["joined", "message", "message"]);
    assert_eq!(frames[0]["id"], "j");
    assert_eq!(seqs(&frames), [6, 7]);
    hub.check_invariants().unwrap();
}

#[test]
fn a_marker_after_the_reply_still_drops_earlier_traffic() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    let req = start_join(&mut hub, 1, "j");
    reply(&mut hub, req, joined(3));
    // seq 3 was published before the join's script ran: in `joined` already.
    hub.cluster_event(room_message(3), NOW);
    hub.cluster_event(marker(req), NOW);
    hub.cluster_event(room_message(4), NOW);
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames), ["joined", "message"]);
    assert_eq!(seqs(&frames), [4]);
    hub.check_invariants().unwrap();
}

#[test]
fn replies_keep_request_order_behind_an_answer_from_redis() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    let req = start_join(&mut hub, 1, "j");
    send(&mut hub, 1, json!({"type": "ping", "id": "p"}));
    send(
        &mut hub,
        1,
        json!({"type": "leave", "id": "l", "payload": {"room": "r"}}),
    );
    assert!(drain(&mut hub, 1).is_empty(), "nothing overtakes `joined`");
    reply(&mut hub, req, joined(0));
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames), ["joined", "pong", "left"]);
    // The leave told Redis this node has no more of alice in the room.
    let sent = out(&mut hub);
    assert!(
        sent.iter()
            .any(|o| matches!(o, Outgoing::Command(Command::Member { local_count: 0, .. }))),
        "{sent:?}"
    );
    assert!(
        sent.iter()
            .any(|o| matches!(o, Outgoing::Subscription(Subscription::Unsubscribe { .. }))),
        "{sent:?}"
    );
    hub.check_invariants().unwrap();
}

#[test]
fn a_failed_join_is_undone_and_answered_unavailable() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    let req = start_join(&mut hub, 1, "j");
    hub.cluster_event(
        Event::Reply {
            req,
            result: Err(()),
        },
        NOW,
    );
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames), ["error"]);
    assert_eq!(frames[0]["payload"]["code"], "unavailable");
    assert_eq!(frames[0]["id"], "j");
    assert_eq!(hub.occupied_room_count(), 0);
    hub.check_invariants().unwrap();
}

#[test]
fn during_an_outage_cluster_requests_are_refused_and_leave_stays_local() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    let req = start_join(&mut hub, 1, "j");
    reply(&mut hub, req, joined(0));
    drain(&mut hub, 1);
    hub.cluster_event(Event::SubscriberLink(false), NOW);
    assert_eq!(hub.cluster_up(), Some(false));
    for request in [
        json!({"type": "message", "id": 1, "payload": {"room": "r", "content": 1}}),
        json!({"type": "join", "id": 2, "payload": {"room": "s"}}),
        json!({"type": "presence", "id": 3, "payload": {"room": "r"}}),
        json!({"type": "direct", "id": 4, "payload": {"to": "bob", "content": 1}}),
    ] {
        send(&mut hub, 1, request);
        let frames = drain(&mut hub, 1);
        assert_eq!(frames[0]["payload"]["code"], "unavailable", "{frames:?}");
    }
    send(
        &mut hub,
        1,
        json!({"type": "typing", "payload": {"room": "r", "is_typing": true}}),
    );
    send(
        &mut hub,
        1,
        json!({"type": "leave", "payload": {"room": "r"}}),
    );
    assert_eq!(kinds(&drain(&mut hub, 1)), ["left"]);
    // Nothing went to Redis but the unsubscription.
    let sent = out(&mut hub);
    assert!(
        sent.iter().all(|o| matches!(o, Outgoing::Subscription(_))),
        "{sent:?}"
    );
    assert_eq!(
        hub.api_publish(br#"{"room":"r","content":1}"#, NOW, 7),
        Some(ApiAnswer::Unavailable)
    );
    hub.check_invariants().unwrap();
}

#[test]
fn a_room_whose_epoch_changed_tells_its_members() {
    let mut hub = hub();
    alice_in_r(&mut hub, 9);
    // Redis restarted empty: both links drop and come back.
    let (register, rooms) = outage(&mut hub);
    assert_eq!(rooms.len(), 1);
    assert_eq!(
        rooms[0].users,
        [("alice".into(), 1, r#"{"id":"alice","name":"alice"}"#.into())]
    );
    // What the node saw, for the history it missed.
    assert_eq!((rooms[0].epoch.as_str(), rooms[0].since), ("e1", 9));
    reply(&mut hub, register, registered("e2", 0, []));
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames), ["joined"]);
    assert_eq!(frames[0]["payload"]["epoch"], "e2");
    assert_eq!(frames[0]["payload"]["seq"], 0);
    assert_eq!(frames[0]["payload"]["recovered"], true);
    assert_eq!(frames[0]["payload"]["missed"], 0);
    assert!(frames[0].get("id").is_none());
    hub.cluster_event(room_message(1), NOW);
    assert_eq!(seqs(&drain(&mut hub, 1)), [1]);
}

#[test]
fn messages_missed_while_cut_off_are_reported_as_lagged() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    let req = start_join(&mut hub, 1, "j");
    hub.cluster_event(marker(req), NOW);
    reply(&mut hub, req, joined(2));
    hub.cluster_event(room_message(3), NOW);
    assert_eq!(seqs(&drain(&mut hub, 1)), [3]);
    // The subscriber's connection drops and comes back; Redis kept the room,
    // whose seq moved on meanwhile.
    hub.cluster_event(Event::SubscriberLink(false), NOW);
    hub.cluster_event(Event::SubscriberLink(true), NOW);
    let register = out(&mut hub)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Command(Command::Register { req, .. }) => Some(req),
            _ => None,
        })
        .expect("registered again");
    // The history no longer holds what was published meanwhile.
    reply(&mut hub, register, registered("e1", 7, []));
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames), ["lagged"]);
    assert_eq!(
        frames[0]["payload"],
        json!({"room": "r", "from_seq": 4, "to_seq": 7})
    );
    hub.cluster_event(room_message(8), NOW);
    assert_eq!(seqs(&drain(&mut hub, 1)), [8]);
}

#[test]
fn messages_missed_while_cut_off_come_from_the_history() {
    let mut hub = hub();
    alice_in_r(&mut hub, 3);
    let (register, rooms) = outage(&mut hub);
    assert_eq!((rooms[0].epoch.as_str(), rooms[0].since), ("e1", 3));
    // Redis kept the room; 4..=6 were published meanwhile, 5 and 6 are still
    // in the history.
    reply(&mut hub, register, registered("e1", 6, [5, 6]));
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames), ["lagged", "message", "message"]);
    assert_eq!(
        frames[0]["payload"],
        json!({"room": "r", "from_seq": 4, "to_seq": 4})
    );
    assert_eq!(seqs(&frames), [5, 6]);
    hub.check_invariants().unwrap();
}

/// The late node of the issue: Redis came back empty, another node registered
/// first and its clients published 1..=3 before this node's snapshot, 4 and 5
/// after it but before its answer. Alice gets the new epoch's `joined`, then
/// every message once, in seq order.
#[test]
fn a_late_registration_replays_the_new_epoch_then_what_waited() {
    let mut hub = hub();
    alice_in_r(&mut hub, 9);
    let (register, _) = outage(&mut hub);
    // While the answer is awaited: 2 and 3 (the subscriber came back after
    // 1 went by), then 4 and 5.
    for seq in 2..=5 {
        hub.cluster_event(room_message(seq), NOW);
    }
    assert!(drain(&mut hub, 1).is_empty(), "nothing before `joined`");
    reply(&mut hub, register, registered("e2", 3, 1..=3));
    hub.cluster_event(room_message(6), NOW);
    let frames = drain(&mut hub, 1);
    assert_eq!(kinds(&frames)[0], "joined");
    assert!(frames[0].get("id").is_none());
    assert_eq!(frames[0]["payload"]["epoch"], "e2");
    // As a `join` with `since: 0` would say it: seq - missed = 0 is where
    // the messages that follow start.
    assert_eq!(frames[0]["payload"]["seq"], 3);
    assert_eq!(frames[0]["payload"]["recovered"], true);
    assert_eq!(frames[0]["payload"]["missed"], 3);
    assert_eq!(seqs(&frames), [1, 2, 3, 4, 5, 6]);
    assert_eq!(frames.len(), 7, "{frames:?}");
    hub.check_invariants().unwrap();
}

/// The answer may overtake messages published before the snapshot (they come
/// by another connection): those went out with the replay and are dropped.
#[test]
fn messages_the_replay_gave_are_not_given_twice() {
    let mut hub = hub();
    alice_in_r(&mut hub, 9);
    let (register, _) = outage(&mut hub);
    // The history of the new epoch lost its first message already.
    reply(&mut hub, register, registered("e2", 3, 2..=3));
    for seq in 2..=4 {
        hub.cluster_event(room_message(seq), NOW);
    }
    let frames = drain(&mut hub, 1);
    assert_eq!(
        kinds(&frames),
        ["joined", "lagged", "message", "message", "message"]
    );
    assert_eq!(frames[0]["payload"]["recovered"], false);
    assert_eq!(frames[0]["payload"]["missed"], 2);
    assert_eq!(
        frames[1]["payload"],
        json!({"room": "r", "from_seq": 1, "to_seq": 1})
    );
    assert_eq!(seqs(&frames), [2, 3, 4]);
}

#[test]
fn messages_past_the_bound_while_registering_are_reported_as_lagged() {
    let mut hub = hub();
    alice_in_r(&mut hub, 0);
    let (register, _) = outage(&mut hub);
    let last = MAX_HELD as u64 + 5;
    for seq in 1..=last {
        hub.cluster_event(room_message(seq), NOW);
    }
    reply(&mut hub, register, registered("e2", 0, []));
    let frames = drain(&mut hub, 1);
    assert_eq!(frames.len(), 2 + MAX_HELD, "joined, held, lagged");
    assert_eq!(frames[0]["type"], "joined");
    assert_eq!(seqs(&frames), (1..=MAX_HELD as u64).collect::<Vec<_>>());
    assert_eq!(
        frames[frames.len() - 1]["payload"],
        json!({"room": "r", "from_seq": MAX_HELD + 1, "to_seq": last})
    );
}

/// A subscriber that drops while the registration is under way loses what
/// its channels carried meanwhile: that registration is void, the next one
/// (once the subscriber is back) starts from what alice saw.
#[test]
fn a_registration_is_redone_when_the_subscriber_drops_meanwhile() {
    let mut hub = hub();
    alice_in_r(&mut hub, 2);
    let (first, _) = outage(&mut hub);
    hub.cluster_event(room_message(3), NOW);
    hub.cluster_event(Event::SubscriberLink(false), NOW);
    reply(&mut hub, first, registered("e1", 3, [3]));
    assert_eq!(hub.cluster_up(), Some(false));
    assert!(drain(&mut hub, 1).is_empty());
    hub.cluster_event(Event::SubscriberLink(true), NOW);
    let (second, rooms) = out(&mut hub)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Command(Command::Register { req, rooms, .. }) => Some((req, rooms)),
            _ => None,
        })
        .expect("registered again");
    assert_eq!(rooms[0].since, 2);
    reply(&mut hub, second, registered("e1", 4, [3, 4]));
    assert_eq!(hub.cluster_up(), Some(true));
    assert_eq!(seqs(&drain(&mut hub, 1)), [3, 4]);
}

#[test]
fn presence_merges_the_nodes_of_each_user() {
    let mut hub = hub();
    up(&mut hub);
    connect(&mut hub, 1, "alice");
    send(
        &mut hub,
        1,
        json!({"type": "presence", "id": "p", "payload": {"room": "r"}}),
    );
    let req = out(&mut hub)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Command(Command::Presence { req, .. }) => Some(req),
            _ => None,
        })
        .unwrap();
    let entries = vec![
        ("bob".into(), 2, r#"{"id":"bob","name":"Bob"}"#.into()),
        ("alice".into(), 1, r#"{"id":"alice","name":"alice"}"#.into()),
        ("bob".into(), 1, r#"{"id":"bob","name":"Bob"}"#.into()),
    ];
    reply(&mut hub, req, Reply::Presence { entries });
    let frames = drain(&mut hub, 1);
    assert_eq!(
        frames[0]["payload"]["users"],
        json!([
            {"id": "bob", "name": "Bob", "connections": 3},
            {"id": "alice", "name": "alice", "connections": 1},
        ])
    );
}
