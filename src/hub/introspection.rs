//! The introspection and membership API (PROTOCOL §14.3): the rooms and
//! their history as their authority knows them, a user's connections here,
//! and subscribing a user's connections to a room (or taking them out).
//!
//! The JSON of the answers is shaped here, once for every backplane: the
//! backplane only says what it knows ([`RoomView`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use slab::Slab;

use super::session::Session;
use super::{ApiAnswer, ApiKind, ConnId, Hub, Millis, Room, RoomId};
use crate::backplane::{MemberView, RoomQuery, RoomView, RoomsHere, UserItem};
use crate::protocol::{self, is_valid_room_name, write_json_string};

/// One connection of a user, as `GET /api/users/{user}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionView {
    /// The id `welcome` gave it.
    pub connection_id: String,
    /// The rooms it is a member of, by name.
    pub rooms: Vec<String>,
    /// When it connected (Unix ms).
    pub connected_at: Millis,
    /// When it last sent a frame, or connected (Unix ms).
    pub last_seen: Millis,
    /// Bytes waiting in its outbound queue.
    pub queued_bytes: usize,
    /// Room broadcasts dropped to it at the soft mark.
    pub dropped: u64,
    /// The peer's `ip:port`; `null` when the shell did not say.
    pub remote: Option<String>,
}

/// The JSON of `GET /api/users/{user}`: the connections gathered (from one
/// loop or several) sorted by id, with the node's id under `--redis`.
pub fn user_answer(user: &str, mut connections: Vec<ConnectionView>, node: Option<&str>) -> String {
    connections.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
    let mut answer = serde_json::json!({ "user": user, "connections": connections });
    if let (Some(node), Some(object)) = (node, answer.as_object_mut()) {
        object.insert("node".into(), serde_json::Value::from(node));
    }
    answer.to_string()
}

/// The JSON of an answer about rooms, for the endpoint `kind` asked for.
pub(super) fn rooms_answer(kind: ApiKind, rooms: &[RoomView]) -> ApiAnswer {
    match kind {
        ApiKind::Rooms { limit } => ApiAnswer::Ok(list_json(rooms, limit)),
        ApiKind::Room => rooms
            .first()
            .map_or(ApiAnswer::NoRoom, |room| ApiAnswer::Ok(room_json(room))),
        ApiKind::History { since } => rooms.first().map_or(ApiAnswer::NoRoom, |room| {
            ApiAnswer::Ok(history_json(room, since))
        }),
        _ => ApiAnswer::Unavailable,
    }
}

/// Appends `"key":value` for a number, with the comma before it.
fn push_number(out: &mut Vec<u8>, key: &str, value: u64) {
    out.extend_from_slice(format!(r#","{key}":{value}"#).as_bytes());
}

/// `{"room","count","connections","seq","epoch"` without the closing brace.
fn room_head(out: &mut Vec<u8>, room: &RoomView) {
    out.extend_from_slice(br#"{"room":"#);
    write_json_string(out, &room.room);
    push_number(out, "count", room.count);
    push_number(out, "connections", room.connections);
    push_number(out, "seq", room.seq);
    out.extend_from_slice(br#","epoch":"#);
    write_json_string(out, &room.epoch);
}

/// `{"rooms":[…],"truncated":…}`: the first `limit` rooms (the backplane
/// gives one more when more matched).
fn list_json(rooms: &[RoomView], limit: usize) -> String {
    let mut out = Vec::with_capacity(64 + rooms.len() * 96);
    out.extend_from_slice(br#"{"rooms":["#);
    for (index, room) in rooms.iter().take(limit).enumerate() {
        if index > 0 {
            out.push(b',');
        }
        room_head(&mut out, room);
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"truncated":"#);
    out.extend_from_slice(if rooms.len() > limit {
        b"true}"
    } else {
        b"false}"
    });
    String::from_utf8(out).unwrap_or_default()
}

/// A user in a room: its `{"id","name"}` with `"connections"` added.
fn member_json(out: &mut Vec<u8>, member: &MemberView) {
    match member.json.strip_suffix('}') {
        Some(open) if open.starts_with('{') => out.extend_from_slice(open.as_bytes()),
        // Not an object (never made so here): rebuild it from the id.
        _ => {
            out.extend_from_slice(br#"{"id":"#);
            write_json_string(out, &member.id);
            out.extend_from_slice(br#","name":"#);
            write_json_string(out, &member.id);
        }
    }
    push_number(out, "connections", member.connections);
    out.push(b'}');
}

/// `GET /api/rooms/{room}`.
fn room_json(room: &RoomView) -> String {
    let mut out = Vec::with_capacity(128 + room.users.len() * 64);
    room_head(&mut out, room);
    push_number(&mut out, "history", room.history.len() as u64);
    out.extend_from_slice(br#","users":["#);
    for (index, member) in room.users.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        member_json(&mut out, member);
    }
    out.extend_from_slice(b"]}");
    String::from_utf8(out).unwrap_or_default()
}

/// The fields of a held `message` frame the history endpoint shows.
#[derive(Deserialize)]
struct MessageFrame<'a> {
    #[serde(borrow)]
    payload: MessagePayload<'a>,
}

#[derive(Deserialize)]
struct MessagePayload<'a> {
    seq: u64,
    ts: u64,
    #[serde(borrow)]
    user: &'a RawValue,
    #[serde(borrow)]
    content: &'a RawValue,
}

/// One held message as `{"seq","ts","user","content"}`, from its frame
/// (`user` and `content` raw, as the members got them); `None` for a frame
/// that is not a `message` (never held).
pub(super) fn history_entry(frame: &[u8]) -> Option<String> {
    let text = protocol::text_frame_payload(frame)?;
    let message: MessageFrame<'_> = serde_json::from_str(text).ok()?;
    let payload = message.payload;
    Some(format!(
        r#"{{"seq":{},"ts":{},"user":{},"content":{}}}"#,
        payload.seq,
        payload.ts,
        payload.user.get(),
        payload.content.get()
    ))
}

/// `GET /api/rooms/{room}/history?since=S`.
fn history_json(room: &RoomView, since: u64) -> String {
    let mut out = Vec::with_capacity(128 + room.history.len() * 128);
    out.extend_from_slice(br#"{"room":"#);
    write_json_string(&mut out, &room.room);
    out.extend_from_slice(br#","epoch":"#);
    write_json_string(&mut out, &room.epoch);
    push_number(&mut out, "seq", room.seq);
    out.extend_from_slice(br#","messages":["#);
    let entries = room
        .history
        .iter()
        .filter(|(seq, _)| *seq > since)
        .filter_map(|(_, frame)| history_entry(frame));
    for (index, entry) in entries.enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(entry.as_bytes());
    }
    out.extend_from_slice(b"]}");
    String::from_utf8(out).unwrap_or_default()
}

/// The hub's rooms, lent to a backplane that does not count members itself.
struct HubRooms<'a> {
    rooms: &'a Slab<Room>,
    room_ids: &'a HashMap<Box<str>, RoomId>,
    sessions: &'a [Option<Session>],
}

impl RoomsHere for HubRooms<'_> {
    fn occupied(&self, query: &RoomQuery) -> Vec<(usize, Box<str>)> {
        self.rooms
            .iter()
            .filter(|(_, room)| !room.members.is_empty() && query.matches(&room.name))
            .map(|(key, room)| (key, room.name.clone()))
            .collect()
    }

    fn key_of(&self, room: &str) -> Option<usize> {
        self.room_ids.get(room).copied()
    }

    fn members(&self, key: usize) -> (Vec<MemberView>, u64) {
        let Some(room) = self.rooms.get(key) else {
            return (Vec::new(), 0);
        };
        let mut users: Vec<MemberView> = Vec::with_capacity(room.users.len());
        // One entry per user, however many connections: a set, so a room of
        // many users costs one pass over its members.
        let mut seen: std::collections::HashSet<&str> =
            std::collections::HashSet::with_capacity(room.users.len());
        for &conn in &room.members {
            let Some(session) = self.sessions.get(conn).and_then(Option::as_ref) else {
                continue;
            };
            if !seen.insert(&session.user_id) {
                continue;
            }
            let connections = room.users.get(&session.user_id).copied().unwrap_or(1);
            users.push(MemberView {
                id: session.user_id.clone(),
                json: (*session.user_json).into(),
                connections: u64::from(connections),
            });
        }
        users.sort_by(|a, b| a.id.cmp(&b.id));
        (users, room.members.len() as u64)
    }
}

impl Hub {
    /// `GET /api/rooms…` (§14.3): `query` answered as `kind` says. A room
    /// name that is not valid is not known. `None`: the answer comes later
    /// through [`Hub::take_api_answers`] with `ticket`.
    pub fn api_rooms(
        &mut self,
        query: RoomQuery,
        kind: ApiKind,
        now: Millis,
        ticket: u64,
    ) -> Option<ApiAnswer> {
        if let RoomQuery::One { room } = &query
            && !is_valid_room_name(room)
        {
            return Some(ApiAnswer::NoRoom);
        }
        let here = HubRooms {
            rooms: &self.rooms,
            room_ids: &self.room_ids,
            sessions: &self.sessions,
        };
        let reply = self.backplane.inspect_rooms(&query, &here);
        let answer = self.api_reply(reply, ticket, kind, |_, rooms| rooms_answer(kind, &rooms));
        self.apply_effects(now);
        answer
    }

    /// The peer address of a connection, for `/api/users` (the shell knows it).
    pub fn set_remote(&mut self, conn: ConnId, remote: std::net::SocketAddr) {
        if let Some(session) = self.session_mut(conn) {
            session.remote = Some(remote.to_string().into_boxed_str());
        }
    }

    /// A user's open connections here, for `GET /api/users/{user}`.
    pub fn connections_of(&self, user: &str) -> Vec<ConnectionView> {
        let Some(connections) = self.users.get(user) else {
            return Vec::new();
        };
        connections
            .iter()
            .filter_map(|&conn| {
                let session = self.session(conn).filter(|session| !session.closing)?;
                let mut rooms: Vec<String> = session
                    .memberships
                    .iter()
                    .filter_map(|membership| self.rooms.get(membership.room))
                    .map(|room| room.name.to_string())
                    .collect();
                rooms.sort();
                Some(ConnectionView {
                    connection_id: session.connection_id.to_string(),
                    rooms,
                    connected_at: session.connected_at,
                    last_seen: session.last_seen,
                    queued_bytes: session.outbound.len(),
                    dropped: session.dropped,
                    remote: session.remote.as_deref().map(str::to_string),
                })
            })
            .collect()
    }

    /// This node's id in the cluster, where there is one (`--redis`).
    pub fn node_id(&self) -> Option<&str> {
        self.backplane.node_id()
    }

    /// `POST /api/subscribe` (`subscribe` true) or `/api/unsubscribe`
    /// (§14.3): every connection of the user, wherever it is, joins or
    /// leaves the room. `None`: the answer comes later.
    pub fn api_membership(
        &mut self,
        body: &[u8],
        subscribe: bool,
        now: Millis,
        ticket: u64,
    ) -> Option<ApiAnswer> {
        let (user, room) = match protocol::parse_membership(body) {
            Ok(parsed) => parsed,
            Err(message) => return Some(ApiAnswer::BadRequest(message)),
        };
        if !is_valid_room_name(&room) {
            return Some(ApiAnswer::BadRequest("invalid room name".into()));
        }
        let (item, kind) = if subscribe {
            (UserItem::Subscribe(room.into()), ApiKind::Subscribe)
        } else {
            (UserItem::Unsubscribe(room.into()), ApiKind::Unsubscribe)
        };
        let reply = self.backplane.send_to_user(&user, &item);
        let answer = self.api_reply(reply, ticket, kind, |hub, ()| {
            let changed = hub.apply_membership(&user, &item, now);
            let key = if subscribe { "joined" } else { "left" };
            ApiAnswer::Ok(format!(r#"{{"{key}":{changed}}}"#))
        });
        self.apply_effects(now);
        self.settle(now);
        answer
    }

    /// A subscribe or unsubscribe for the user's connections here; how many
    /// joined or left.
    pub(super) fn apply_membership(&mut self, user: &str, item: &UserItem, now: Millis) -> u64 {
        let connections = self.users.get(user).cloned().unwrap_or_default();
        let mut changed = 0;
        for conn in connections {
            let done = match item {
                UserItem::Subscribe(room) => self.subscribe_connection(conn, room, now),
                UserItem::Unsubscribe(room) => self.unsubscribe_connection(conn, room, now),
                UserItem::Direct(_) | UserItem::Kick => false,
            };
            changed += u64::from(done);
        }
        changed
    }

    /// One connection joins as if it sent `join` without `id`, its claim
    /// aside; false when it is in the room already, closing, or refused by
    /// a limit (it gets no error: it did not ask).
    fn subscribe_connection(&mut self, conn: ConnId, room: &str, now: Millis) -> bool {
        let member = self.member_room_id(conn, room).is_some();
        let Some(session) = self.session_mut(conn) else {
            return false;
        };
        if member || session.closing || session.close_after_replies.is_some() {
            return false;
        }
        let granted_before = session.granted.iter().any(|r| **r == *room);
        if !granted_before {
            session.granted.push(room.into());
        }
        let ask = super::requests::JoinAsk {
            asked: false,
            ..super::requests::JoinAsk::client(None, room, None, None)
        };
        match self.join(conn, ask, now) {
            Ok(()) => true,
            Err(_) => {
                if !granted_before && let Some(session) = self.session_mut(conn) {
                    session.granted.retain(|r| **r != *room);
                }
                false
            }
        }
    }

    /// One connection leaves the room (it gets `left` without `id`) and
    /// loses the API's grant of it; false when it was not a member.
    fn unsubscribe_connection(&mut self, conn: ConnId, room: &str, now: Millis) -> bool {
        if let Some(session) = self.session_mut(conn) {
            session.granted.retain(|r| **r != *room);
        }
        let Some(room_id) = self.member_room_id(conn, room) else {
            return false;
        };
        if self.session(conn).is_none_or(|session| session.closing) {
            return false;
        }
        self.remove_membership(conn, room_id, now);
        self.reply(conn, super::frames::left(None, room));
        true
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::FrameBuilder;

    fn room(name: &str) -> RoomView {
        RoomView {
            room: name.into(),
            count: 1,
            connections: 2,
            seq: 3,
            epoch: "e".into(),
            users: Vec::new(),
            history: Vec::new(),
        }
    }

    fn message(seq: u64) -> (u64, Bytes) {
        let frame = FrameBuilder::new("message", None)
            .string("room", "r")
            .raw("user", r#"{"id":"u","name":"U"}"#)
            .raw("content", r#"{"text":"hi"}"#)
            .number("seq", seq)
            .number("ts", 1000 + seq)
            .finish();
        (seq, frame)
    }

    #[test]
    fn a_list_says_truncated_when_the_backplane_gave_one_more() {
        let rooms = vec![room("a"), room("b")];
        let json: serde_json::Value = serde_json::from_str(&list_json(&rooms, 1)).unwrap();
        assert_eq!(json["truncated"], true);
        assert_eq!(json["rooms"].as_array().unwrap().len(), 1);
        assert_eq!(
            json["rooms"][0],
            serde_json::json!({"room":"a","count":1,"connections":2,"seq":3,"epoch":"e"})
        );
        let json: serde_json::Value = serde_json::from_str(&list_json(&rooms, 2)).unwrap();
        assert_eq!(json["truncated"], false);
    }

    #[test]
    fn a_room_lists_its_users_with_their_connections() {
        let mut view = room("a");
        view.users.push(MemberView {
            id: "u\"1".into(),
            json: protocol::user_json("u\"1", "Ann"),
            connections: 2,
        });
        view.history.push(message(3));
        let json: serde_json::Value = serde_json::from_str(&room_json(&view)).unwrap();
        assert_eq!(json["history"], 1);
        assert_eq!(
            json["users"],
            serde_json::json!([{"id":"u\"1","name":"Ann","connections":2}])
        );
    }

    #[test]
    fn history_keeps_the_messages_after_since_with_raw_user_and_content() {
        let mut view = room("a");
        view.history = vec![message(2), message(3)];
        let json: serde_json::Value = serde_json::from_str(&history_json(&view, 2)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"room":"a","epoch":"e","seq":3,"messages":[
                {"seq":3,"ts":1003,"user":{"id":"u","name":"U"},"content":{"text":"hi"}}
            ]})
        );
    }

    #[test]
    fn user_answers_sort_connections_and_name_the_node() {
        let view = |id: &str| ConnectionView {
            connection_id: id.into(),
            rooms: vec![],
            connected_at: 1,
            last_seen: 2,
            queued_bytes: 0,
            dropped: 0,
            remote: Some("127.0.0.1:1".into()),
        };
        let json: serde_json::Value =
            serde_json::from_str(&user_answer("u", vec![view("c2"), view("c1")], Some("n1")))
                .unwrap();
        assert_eq!(json["connections"][0]["connection_id"], "c1");
        assert_eq!(json["node"], "n1");
        let json: serde_json::Value =
            serde_json::from_str(&user_answer("u", Vec::new(), None)).unwrap();
        assert_eq!(json, serde_json::json!({"user":"u","connections":[]}));
    }

    #[test]
    fn a_list_query_sorts_and_keeps_one_more_than_its_limit() {
        let query = RoomQuery::List {
            prefix: "a".into(),
            limit: 1,
        };
        assert!(query.matches("ab") && !query.matches("ba"));
        let mut rooms = vec![room("c"), room("a"), room("b")];
        query.finish(&mut rooms);
        let names: Vec<&str> = rooms.iter().map(|r| &*r.room).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
