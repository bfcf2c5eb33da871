//! What the introspection API (PROTOCOL §14.3) asks of a room's authority,
//! and the shape of its answers, whichever backplane holds the rooms.

use bytes::Bytes;

/// The most rooms `GET /api/rooms` lists in one answer (§14.3).
pub const MAX_ROOM_LIST: usize = 10_000;

/// What the API wants to know about rooms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomQuery {
    /// Rooms with members whose name starts with `prefix`: the first
    /// `limit + 1` by name (one more than listed tells `truncated`), without
    /// users or history.
    List {
        /// The name prefix; empty for every room.
        prefix: Box<str>,
        /// How many the answer lists.
        limit: usize,
    },
    /// One room, members or not, with its users and history; none when the
    /// room is not known (never used, or forgotten).
    One {
        /// The room's name.
        room: Box<str>,
    },
}

impl RoomQuery {
    /// Whether a room of this name belongs in the answer.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            RoomQuery::List { prefix, .. } => name.starts_with(&**prefix),
            RoomQuery::One { room } => **room == *name,
        }
    }

    /// Sorts rooms by name and keeps what a list answer needs (`limit + 1`
    /// rooms, so the caller can tell it was truncated): used by every
    /// backplane and by the merge of several loops' answers.
    pub fn finish(&self, rooms: &mut Vec<RoomView>) {
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        rooms.dedup_by(|a, b| a.room == b.room);
        if let RoomQuery::List { limit, .. } = self {
            rooms.truncate(limit.saturating_add(1));
        }
    }
}

/// A user in a room, for `GET /api/rooms/{room}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// The user id.
    pub id: Box<str>,
    /// `{"id":…,"name":…}` as frames show the user.
    pub json: Box<str>,
    /// The user's connections in the room.
    pub connections: u64,
}

/// A room as its authority knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    /// The room's name.
    pub room: Box<str>,
    /// Users in the room.
    pub count: u64,
    /// Member connections.
    pub connections: u64,
    /// The latest seq.
    pub seq: u64,
    /// The room's epoch.
    pub epoch: Box<str>,
    /// The users, sorted by id (empty in a list).
    pub users: Vec<MemberView>,
    /// The held `message` frames with their seq, oldest first (empty in a
    /// list).
    pub history: Vec<(u64, Bytes)>,
}

/// The hub's rooms here, for a backplane that does not count members
/// itself (one loop: the hub is the only place that knows them).
pub trait RoomsHere {
    /// Rooms with members here matching `query`, as (hub key, name).
    fn occupied(&self, query: &RoomQuery) -> Vec<(usize, Box<str>)>;
    /// The hub's key of a room it knows, members or not.
    fn key_of(&self, room: &str) -> Option<usize>;
    /// A room's users here (sorted by id) and its member connections.
    fn members(&self, key: usize) -> (Vec<MemberView>, u64);
}
