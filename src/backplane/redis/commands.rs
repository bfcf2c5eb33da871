//! Several nodes on one Redis (PROTOCOL §10, `--redis URL`): the sans-IO part.
//!
//! This module says what a node asks of Redis and what comes back, as plain
//! values: [`Command`]s for the command connection, [`Subscription`] changes
//! for the pub/sub connection, and the [`Event`]s both report to the loop. The
//! [`Hub`](crate::hub::Hub) produces the first two and consumes the third; the
//! threads of [`bridge`](super::bridge) carry them to and from Redis.
//!
//! What lives in Redis (every key under `rc:`):
//!
//! - `rc:node:{node}`: the node is alive; set every second with a 3 s TTL.
//!   `node` is a random id per registration (a new one after every outage), so
//!   whatever an earlier life left behind is stale at once.
//! - `rc:room/{R}` (hash `epoch`, `seq`) and `rc:room/{R}/h` (list of the
//!   room's last `--history` `message` texts, oldest first, contiguous, the
//!   last one with seq `seq`).
//! - `rc:room/{R}/p` (hash `{node}|{user}` → `{n}|{user json}`: the user's
//!   connections in R on that node), `rc:room/{R}/u` (hash user → connections
//!   on every live node: `HLEN` is the room's `count`) and `rc:room/{R}/c`
//!   (hash node → its connections in R: the sum over live nodes is what a
//!   publish was `delivered` to). Entries of dead nodes are removed by the
//!   scripts that read them.
//! - `rc:user:{U}`: hash node → the user's open connections there (`direct`,
//!   `/api/disconnect`, `/api/subscribe`).
//! - `rc:rooms`: sorted set (all scores 0, so by name) of the rooms with
//!   users, for `GET /api/rooms` (§14.3): added to and removed from where a
//!   room's `u` hash changes; a room whose users sat on dead nodes is taken
//!   out by the script that lists rooms.
//!
//! Room keys expire 5 minutes after the last write; every node refreshes the
//! keys of its rooms with members and of its users every minute (§11: a room
//! without members is forgotten after 5 minutes).
//!
//! Pub/sub: `rc:ch:{R}` per room with local members (subscribed while the room
//! has members here, never per connection), `rc:users` for `direct` and
//! kicks, and `rc:wake:{process}` that only wakes this node's subscriber.
//! A `message` takes its seq, enters the history and is published in one Lua
//! script, so a room's channel carries its messages in seq order; every node,
//! the sender's included, delivers them from there.

use bytes::Bytes;

pub use crate::backplane::UserItem;
use crate::protocol;

/// Identifies a request whose answer the hub waits for.
pub type ReqId = u64;

/// A node's liveness key lives this long without a refresh.
pub const NODE_TTL_MS: u64 = 3000;

/// How often a node refreshes its liveness key.
pub const HEARTBEAT_MS: u64 = 1000;

/// Room and user keys live this long after their last write or refresh (§11).
pub const KEY_TTL_MS: u64 = 5 * 60 * 1000;

/// Seconds between refreshes of the TTLs of this node's rooms and users.
pub const REFRESH_EVERY_TICKS: u64 = 60;

/// The channel of `direct` frames and kicks.
pub const USERS_CHANNEL: &str = "rc:users";

/// Prefix of the room channels.
pub const ROOM_CHANNEL_PREFIX: &str = "rc:ch:";

/// A room's pub/sub channel.
pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL_PREFIX}{room}")
}

/// The channel that wakes a node's subscriber thread out of its blocking read.
pub fn wake_channel(process: &str) -> String {
    format!("rc:wake:{process}")
}

/// The liveness key of a node.
pub fn node_key(node: &str) -> String {
    format!("rc:node:{node}")
}

/// A user's connection counts per node.
pub fn user_key(user: &str) -> String {
    format!("rc:user:{user}")
}

/// A room's keys: state, history, presence, users, per-node connections.
/// `/` cannot occur in a room name (`:` can), so no room's keys are another's.
pub fn room_keys(room: &str) -> [String; 5] {
    [
        format!("rc:room/{room}"),
        format!("rc:room/{room}/h"),
        format!("rc:room/{room}/p"),
        format!("rc:room/{room}/u"),
        format!("rc:room/{room}/c"),
    ]
}

/// What a `message` webhook event needs beyond its room and seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookMessage {
    /// The sender as JSON.
    pub user_json: String,
    /// The content, raw JSON.
    pub content: String,
}

/// What the loop asks of the command connection, in order. Those with a
/// `req` are answered with an [`Event::Reply`] (also when Redis is away);
/// the others are fire and forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A `join`: this node's count for the user in the room, the room's state,
    /// `user_joined` when the user is new to the room, the join marker, and the
    /// history after `since`.
    Join {
        /// Comes back in the [`Event::Reply`] that answers this join.
        req: ReqId,
        /// The name of the room being joined.
        room: String,
        /// The subscription the join needs (it waits until it is in force).
        sub_generation: u64,
        /// The joining user's id.
        user_id: String,
        /// The user as JSON, as `user_joined` and `presence` show it.
        user_json: String,
        /// The user's connections in the room on this node, this one included.
        local_count: u32,
        /// The client's `since`: the last seq it saw. `None`: no replay asked for.
        since: Option<u64>,
        /// The epoch the client's `since` belongs to; when it is not the
        /// room's, nothing is replayed. `None`: the client sent none.
        epoch: Option<String>,
        /// Published on the room's channel right after the join took effect.
        marker: String,
    },
    /// A `message` (from a client or `/api/publish`): the frame is
    /// `head` + seq + `tail`.
    Publish {
        /// Comes back in the [`Event::Reply`] that answers this publish.
        req: ReqId,
        /// The name of the room the message goes to.
        room: String,
        /// The frame's JSON up to the value of `seq`, which the script fills in.
        head: String,
        /// The frame's JSON after the value of `seq` (the timestamp and the
        /// closing braces).
        tail: String,
        /// A client message of a room with `webhook_messages`: the sender
        /// and content for the webhook's `message` event, once it has its seq.
        webhook: Option<Box<WebhookMessage>>,
    },
    /// The users of a room on every live node.
    Presence {
        /// Comes back in the [`Event::Reply`] that answers this request.
        req: ReqId,
        /// The name of the room whose users are asked for.
        room: String,
    },
    /// A `direct` or a kick: published on the users channel when the user has
    /// a connection on a live node; answered with how many.
    SendUser {
        /// Comes back in the [`Event::Reply`] that answers this request.
        req: ReqId,
        /// The id of the user whose connections it is for.
        user_id: String,
        /// What is published: a [`direct_envelope`] or a [`kick_envelope`].
        envelope: String,
    },
    /// This node's count for a user in a room changed (leave, disconnect);
    /// `user_left` goes out when the user is then gone from every node.
    Member {
        /// The name of the room.
        room: String,
        /// The id of the user whose count changed.
        user_id: String,
        /// The user as JSON: kept for `presence` and shown in `user_left`.
        user_json: String,
        /// The user's connections in the room on this node now; 0 when none
        /// are left.
        local_count: u32,
    },
    /// A `typing` frame for the room's members on every node.
    RoomEvent {
        /// The name of the room whose channel it is published on.
        room: String,
        /// What is published: an [`event_envelope`].
        envelope: String,
    },
    /// This node's open connections of a user.
    UserCount {
        /// The user's id.
        user_id: String,
        /// The user's open connections on this node; 0 removes this node from
        /// the user's key.
        count: u32,
    },
    /// (Re)register under a new node id with everything this node holds.
    Register {
        /// Comes back in the [`Event::Reply`] that answers the registration.
        req: ReqId,
        /// Every room with members on this node, with those members.
        rooms: Vec<RoomMembers>,
        /// Every user connected to this node: (user id, open connections here).
        users: Vec<(String, u32)>,
    },
    /// Keep the keys of these rooms and users from expiring.
    Refresh {
        /// Names of the rooms with members on this node.
        rooms: Vec<String>,
        /// Ids of the users connected to this node.
        users: Vec<String>,
    },
    /// Graceful shutdown: stop counting in presence now.
    Shutdown,
    /// `GET /api/rooms` (§14.3): rooms with users on live nodes whose name
    /// starts with `prefix`, by name, at most `want`.
    Rooms {
        /// Comes back in the [`Event::Reply`] that answers this request.
        req: ReqId,
        /// The name prefix; empty for every room.
        prefix: String,
        /// How many rooms at most.
        want: usize,
    },
    /// `/api/subscribe` or `/api/unsubscribe` (§14.3): published on the
    /// users channel when the user has a connection on a live node;
    /// answered with how many of them it changes.
    Membership {
        /// Comes back in the [`Event::Reply`] that answers this request.
        req: ReqId,
        /// The user's id.
        user_id: String,
        /// The room.
        room: String,
        /// Subscribe (true) or unsubscribe.
        subscribe: bool,
        /// What is published: a [`membership_envelope`].
        envelope: String,
    },
    /// `GET /api/rooms/{room}…` (§14.3): one room with its users and history.
    Room {
        /// Comes back in the [`Event::Reply`] that answers this request.
        req: ReqId,
        /// The room's name.
        room: String,
    },
}

/// A room's local members, for registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMembers {
    /// The room's name.
    pub room: String,
    /// (user id, connections here, user JSON).
    pub users: Vec<(String, u32, String)>,
    /// The epoch this node knew the room by; empty when it never learnt one.
    pub epoch: String,
    /// The last seq of `epoch` this node saw: the history after it comes back.
    pub since: u64,
}

/// Changes to the pub/sub connection's channels, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// Subscribe to a room's channel; `generation` grows with every request.
    Subscribe {
        /// The room's name.
        room: String,
        /// Larger than that of every earlier request: a join waits until its
        /// room is subscribed with the generation it was given, or a later one.
        generation: u64,
    },
    /// Unsubscribe from a room's channel.
    Unsubscribe {
        /// The room's name.
        room: String,
    },
}

/// What the hub sends out, in the order it decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// For the command thread.
    Command(Command),
    /// For the pub/sub (subscriber) thread.
    Subscription(Subscription),
}

/// A room's state as a script read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    /// Names this life of the room in Redis: a new one when its keys had
    /// expired or never existed, so seqs of different epochs do not compare.
    pub epoch: String,
    /// The seq of the room's latest message; 0 before the first one.
    pub seq: u64,
    /// How many different users are in the room, on every live node.
    pub count: u64,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `Join`: the room's state, how many messages the history holds, and the
    /// history after `since` (texts, oldest first) when it applies.
    Joined {
        /// The room's state, with the joining user counted.
        state: RoomState,
        /// How many messages the history holds; the last one has seq `state.seq`.
        history_len: u64,
        /// The `message` frames after `since`, as text, oldest first; empty
        /// without `since` or when the client's epoch is not the room's.
        frames: Vec<String>,
    },
    /// `Join` refused: the room has its namespace's `max_members` users.
    RoomFull {
        /// The users in the room.
        count: u64,
    },
    /// `Publish`.
    Published {
        /// The seq the message was given.
        seq: u64,
        /// The connections of the room's members on every live node: how many
        /// the message goes to.
        delivered: u64,
    },
    /// `Presence`: (user id, connections, user JSON), one entry per user and node.
    Presence {
        /// (user id, the user's connections on one node, user JSON); a user on
        /// several nodes has one entry for each.
        entries: Vec<(String, u64, String)>,
    },
    /// `SendUser`: the user's connections on live nodes.
    Sent {
        /// The user's open connections on live nodes; 0 means nothing was published.
        connections: u64,
    },
    /// `Rooms` or `Room`: the rooms found, by name (none: the room is not known).
    Rooms {
        /// The rooms, with users and history for `Room`.
        rooms: Vec<crate::backplane::RoomView>,
    },
    /// `Register`: each room's state, in the order given.
    Registered {
        /// One for each room of the `Register` command, in the same order.
        rooms: Vec<RegisteredRoom>,
    },
}

/// A room as a registration found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredRoom {
    /// The room's state, with this node's members counted.
    pub state: RoomState,
    /// The `message` frames this node did not see, as text, oldest first: the
    /// history after `since` when the epoch is the one the node knew, all of
    /// it when the epoch is new (Redis came back without the room), none when
    /// the node knew no epoch. The last one has seq `state.seq`; fewer than
    /// asked for when the history no longer holds the oldest.
    pub frames: Vec<String>,
}

/// An item on a room's channel, already framed for WebSocket where it is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomItem {
    /// A `message` with its seq.
    Message {
        /// The message's seq in the room.
        seq: u64,
        /// The `message` frame, ready to send.
        frame: Bytes,
    },
    /// `typing`, `user_joined`, `user_left`: to every member but those of `except`.
    Event {
        /// The user whose connections skip it (the one typing or joining);
        /// `None`: every member gets it.
        except: Option<String>,
        /// The frame, ready to send.
        frame: Bytes,
    },
    /// One of this node's joins took effect here in the room's stream.
    Marker {
        /// The join request whose marker this is.
        req: ReqId,
    },
}

/// What the bridge threads report to the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The command connection is up (scripts loaded) or lost.
    CommandLink(bool),
    /// The pub/sub connection is up (every channel subscribed) or lost.
    SubscriberLink(bool),
    /// The answer to a request; `Err` when Redis could not be reached or refused it.
    Reply {
        /// The `req` of the command this answers.
        req: ReqId,
        /// The answer, or `Err` when there is none.
        result: Result<Reply, ()>,
    },
    /// Something published on a room's channel.
    Room {
        /// The room's name, taken from the channel's.
        room: String,
        /// What was published.
        item: RoomItem,
    },
    /// Something published on the users channel for one user.
    User {
        /// The id of the user whose connections on this node it is for.
        user_id: String,
        /// What was published.
        item: UserItem,
    },
    /// The command thread did its shutdown work.
    Stopped,
}

/// Appends `{len}:{text}`: a length-prefixed string, safe for any content.
fn push_counted(out: &mut String, text: &str) {
    out.push_str(&text.len().to_string());
    out.push(':');
    out.push_str(text);
}

/// Splits `{len}:{text}{rest}` into `text` and `rest`.
fn split_counted(input: &str) -> Option<(&str, &str)> {
    let (len, rest) = input.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if !rest.is_char_boundary(len.min(rest.len())) || rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// A room event for every member but the user `except` (if any).
pub fn event_envelope(except: Option<&str>, frame_text: &str) -> String {
    let mut out = String::with_capacity(frame_text.len() + 16);
    out.push('e');
    push_counted(&mut out, except.unwrap_or(""));
    out.push_str(frame_text);
    out
}

/// The join marker of request `req` of process `process`.
pub fn marker_envelope(process: &str, req: ReqId) -> String {
    let mut out = String::from("j");
    push_counted(&mut out, process);
    out.push_str(&req.to_string());
    out
}

/// A `direct` frame for every connection of `user`.
pub fn direct_envelope(user: &str, frame_text: &str) -> String {
    let mut out = String::with_capacity(frame_text.len() + user.len() + 8);
    out.push('d');
    push_counted(&mut out, user);
    out.push_str(frame_text);
    out
}

/// Close every connection of `user` with 4003.
pub fn kick_envelope(user: &str) -> String {
    let mut out = String::from("k");
    push_counted(&mut out, user);
    out
}

/// Subscribe (`subscribe` true) or unsubscribe every connection of `user`
/// to or from `room` (§14.3).
pub fn membership_envelope(user: &str, room: &str, subscribe: bool) -> String {
    let mut out = String::from(if subscribe { "s" } else { "u" });
    push_counted(&mut out, user);
    out.push_str(room);
    out
}

/// Reads an item of a room channel; `None` for a marker of another process
/// or anything malformed.
pub fn parse_room_item(payload: &str, process: &str) -> Option<RoomItem> {
    let rest = payload.get(1..)?;
    match payload.as_bytes().first()? {
        b'm' => {
            let (seq, frame) = rest.split_once(':')?;
            Some(RoomItem::Message {
                seq: seq.parse().ok()?,
                frame: protocol::text_frame(frame),
            })
        }
        b'e' => {
            let (except, frame) = split_counted(rest)?;
            Some(RoomItem::Event {
                except: (!except.is_empty()).then(|| except.to_string()),
                frame: protocol::text_frame(frame),
            })
        }
        b'j' => {
            let (owner, req) = split_counted(rest)?;
            (owner == process).then_some(())?;
            Some(RoomItem::Marker {
                req: req.parse().ok()?,
            })
        }
        _ => None,
    }
}

/// Reads an item of the users channel.
pub fn parse_user_item(payload: &str) -> Option<(String, UserItem)> {
    let rest = payload.get(1..)?;
    match payload.as_bytes().first()? {
        b'd' => {
            let (user, frame) = split_counted(rest)?;
            Some((
                user.to_string(),
                UserItem::Direct(protocol::text_frame(frame)),
            ))
        }
        b'k' => {
            let (user, _) = split_counted(rest)?;
            Some((user.to_string(), UserItem::Kick))
        }
        b's' => {
            let (user, room) = split_counted(rest)?;
            Some((user.to_string(), UserItem::Subscribe(room.into())))
        }
        b'u' => {
            let (user, room) = split_counted(rest)?;
            Some((user.to_string(), UserItem::Unsubscribe(room.into())))
        }
        _ => None,
    }
}

/// 64 random bits as hex: node and process ids.
pub fn random_id() -> String {
    let value = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    format!("{value:016x}")
}

/// Helpers shared by the scripts.
const PRELUDE: &str = include_str!("scripts/prelude.lua");

/// KEYS: room, history, p, u, c. ARGV: fresh epoch, node, user, local count,
/// user JSON, TTL ms, channel, room as JSON, marker, since or '', epoch or ''.
/// Returns {epoch, seq, count, history length, frames after since...}.
const JOIN_BODY: &str = include_str!("scripts/join.lua");

/// KEYS: room, history, c. ARGV: fresh epoch, --history, TTL ms, channel,
/// frame head, frame tail. Returns {seq, connections of members on live nodes}.
const PUBLISH_BODY: &str = include_str!("scripts/publish.lua");

/// KEYS: p, u, c. ARGV: node, user, local count, user JSON, TTL ms, channel,
/// room as JSON. Publishes `user_left` when the user was in the room and is
/// now on no live node.
const MEMBER_BODY: &str = include_str!("scripts/member.lua");

/// KEYS: p, u, c. Returns the live entries of p as a flat list.
const PRESENCE_BODY: &str = include_str!("scripts/presence.lua");

/// KEYS: user. ARGV: channel, envelope. Publishes when the user has a
/// connection on a live node; returns how many.
const SEND_USER_BODY: &str = include_str!("scripts/send_user.lua");

/// KEYS: room, history, p, u, c. ARGV: fresh epoch, node, TTL ms, the epoch
/// the node knew or '', the last seq of it the node saw, then (user, local
/// count, user JSON) triples. Returns {epoch, seq, count, frames the node did
/// not see...}: after `since` in the epoch it knew, the whole history of
/// another one (what a Redis that came back empty took since then).
const REGISTER_ROOM_BODY: &str = include_str!("scripts/register_room.lua");

/// ARGV: prefix, how many. Returns {name, count, connections, epoch, seq}
/// for each room with users on live nodes, by name (§14.3).
const ROOMS_BODY: &str = include_str!("scripts/rooms.lua");

/// KEYS: room, history, p, u, c. Returns {epoch, seq, connections, users,
/// (user, connections, user JSON)..., held messages...}, or {} when the room
/// is not known (§14.3).
const ROOM_BODY: &str = include_str!("scripts/room.lua");

/// KEYS: user, the room's p. ARGV: channel, envelope, user, '1' to
/// subscribe or '0'. Publishes when the user has a connection on a live
/// node; returns the connections not in the room (subscribe) or in it.
const MEMBERSHIP_BODY: &str = include_str!("scripts/membership.lua");

/// The Lua scripts, loaded once per connection and called by their SHA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// For [`Command::Join`]: counts the user in, announces `user_joined`,
    /// publishes the marker and reads the history to replay.
    Join,
    /// For [`Command::Publish`]: gives the message its seq, keeps it in the
    /// history and publishes it.
    Publish,
    /// For [`Command::Member`]: sets this node's count for a user in a room
    /// and announces `user_left` when the user is gone from every node.
    Member,
    /// For [`Command::Presence`]: the room's users on live nodes.
    Presence,
    /// For [`Command::SendUser`]: publishes to a user who is connected to a
    /// live node.
    SendUser,
    /// For [`Command::Register`], once per room: counts this node's members
    /// of the room in under the new node id and reads the history it missed.
    RegisterRoom,
    /// For [`Command::Rooms`]: the occupied rooms by name.
    Rooms,
    /// For [`Command::Room`]: one room's state, users and history.
    Room,
    /// For [`Command::Membership`]: publishes to a connected user and
    /// counts the connections it changes.
    Membership,
}

impl Script {
    /// Every script, in a fixed order (the index of each SHA).
    pub const ALL: [Script; 9] = [
        Script::Join,
        Script::Publish,
        Script::Member,
        Script::Presence,
        Script::SendUser,
        Script::RegisterRoom,
        Script::Rooms,
        Script::Room,
        Script::Membership,
    ];

    /// The full source: the shared helpers and the script's body.
    pub fn source(self) -> String {
        let body = match self {
            Script::Join => JOIN_BODY,
            Script::Publish => PUBLISH_BODY,
            Script::Member => MEMBER_BODY,
            Script::Presence => PRESENCE_BODY,
            Script::SendUser => SEND_USER_BODY,
            Script::RegisterRoom => REGISTER_ROOM_BODY,
            Script::Rooms => ROOMS_BODY,
            Script::Room => ROOM_BODY,
            Script::Membership => MEMBERSHIP_BODY,
        };
        format!("{PRELUDE}{body}")
    }

    /// Position in `ALL`.
    pub fn index(self) -> usize {
        Script::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> &str {
        protocol::text_frame_payload(frame).unwrap()
    }

    #[test]
    fn room_items_round_trip() {
        let item = parse_room_item(r#"m42:{"type":"message"}"#, "p").unwrap();
        let RoomItem::Message { seq, frame } = item else {
            panic!("a message")
        };
        assert_eq!(seq, 42);
        assert_eq!(payload(&frame), r#"{"type":"message"}"#);

        let envelope = event_envelope(Some("a:b 9\n"), r#"{"type":"typing"}"#);
        let RoomItem::Event { except, frame } = parse_room_item(&envelope, "p").unwrap() else {
            panic!("an event")
        };
        assert_eq!(except.as_deref(), Some("a:b 9\n"));
        assert_eq!(payload(&frame), r#"{"type":"typing"}"#);

        let envelope = event_envelope(None, "{}");
        assert!(matches!(
            parse_room_item(&envelope, "p"),
            Some(RoomItem::Event { except: None, .. })
        ));
    }

    #[test]
    fn markers_of_other_processes_are_ignored() {
        let marker = marker_envelope("abc", 17);
        assert_eq!(
            parse_room_item(&marker, "abc"),
            Some(RoomItem::Marker { req: 17 })
        );
        assert_eq!(parse_room_item(&marker, "abd"), None);
    }

    #[test]
    fn user_items_round_trip() {
        let (user, item) = parse_user_item(&direct_envelope("bob", "{}")).unwrap();
        assert_eq!(user, "bob");
        assert!(matches!(item, UserItem::Direct(_)));
        assert_eq!(
            parse_user_item(&kick_envelope("é:x")),
            Some(("é:x".to_string(), UserItem::Kick))
        );
        assert_eq!(
            parse_user_item(&membership_envelope("u:1", "team:a", true)),
            Some(("u:1".to_string(), UserItem::Subscribe("team:a".into())))
        );
        assert_eq!(
            parse_user_item(&membership_envelope("u", "r", false)),
            Some(("u".to_string(), UserItem::Unsubscribe("r".into())))
        );
    }

    #[test]
    fn malformed_items_are_refused() {
        for bad in ["", "x", "m", "mx:{}", "e9:ab", "e1x:{}", "j3:ab"] {
            assert_eq!(parse_room_item(bad, "ab"), None, "{bad:?}");
        }
        for bad in ["", "d", "d5:ab", "q1:a"] {
            assert_eq!(parse_user_item(bad), None, "{bad:?}");
        }
        // A length that would cut a character in two.
        assert_eq!(parse_user_item("d1:é{}"), None);
    }

    #[test]
    fn rooms_never_share_keys() {
        // `:` is allowed in room names: "a:p" must not be room "a"'s presence.
        let a = room_keys("a");
        let b = room_keys("a:p");
        assert!(a.iter().all(|key| !b.contains(key)));
        assert_ne!(room_channel("a:p"), USERS_CHANNEL);
    }

    #[test]
    fn script_sources_include_the_helpers() {
        for script in Script::ALL {
            let source = script.source();
            assert!(source.contains("local function purge"));
            assert_eq!(Script::ALL[script.index()], script);
        }
    }
}
