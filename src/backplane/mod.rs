//! The seam under the rules: where a room's authority lives and where its
//! traffic comes from.
//!
//! The rules of [`crate::hub`] (room names, the `rooms` claim, limits, join
//! and recovery, presence, typing, acks, `lagged`, the server API) are
//! written once, above this trait. Below it, a backplane holds what must be
//! one for everybody who serves a room: its `seq`, `epoch` and history, the
//! count of its users, and the order of its traffic. Two implementations:
//!
//! - [`local::LocalBackplane`]: one event loop is the whole server. It answers
//!   at once ([`Reply::Now`]), with no hop and no allocation on the publish
//!   path, and hands room traffic straight back for local delivery.
//! - [`redis::RedisBackplane`]: rooms span every node on one Redis. It answers
//!   later ([`Reply::Later`]) through the bridge threads, and room traffic
//!   comes back from the room's channel as [`Effect`]s.
//!
//! A third one, N event loops of one process sharing rooms, answers later
//! too (from the loop that holds a room's authority) and plugs in here.
//! This is the shape of Centrifugo's `Broker` + `PresenceManager` pair, with
//! "answered now" added so that one loop pays nothing for the seam.

#[cfg(test)]
pub(crate) mod deferred;
pub mod events;
pub mod introspection;
pub mod local;
pub mod loops;
pub mod redis;

use std::any::Any;

use bytes::Bytes;

use crate::hub::Millis;
use crate::state::RoomSnapshot;
pub use introspection::{MemberView, RoomQuery, RoomView, RoomsHere};

/// A request to the backplane that is answered later, named for its answer.
pub type RequestId = u64;

/// A room as the hub and its backplane both know it: the hub's slab key (a
/// cheap index for the backplane's per-room state) and the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomRef<'a> {
    /// The hub's key for the room; reused only after [`Backplane::close_room`].
    pub id: usize,
    /// The room's name.
    pub name: &'a str,
}

/// How a backplane answers a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<T> {
    /// Here is the answer.
    Now(T),
    /// The answer comes later as [`Effect::Answer`] with this id.
    Later(RequestId),
    /// The backplane cannot serve it now (Redis unreachable): `unavailable`.
    Unavailable,
}

/// A user, as frames about them show them.
#[derive(Debug, Clone, Copy)]
pub struct UserRef<'a> {
    /// The user id (`sub`).
    pub id: &'a str,
    /// `{"id":…,"name":…}`, encoded once per connection.
    pub json: &'a str,
}

/// What a join needs from the room's authority.
#[derive(Debug, Clone, Copy)]
pub struct JoinRequest<'a> {
    /// The room.
    pub room: RoomRef<'a>,
    /// Who joins.
    pub user: UserRef<'a>,
    /// The user's connections in the room on this hub, this one included.
    pub connections_here: u32,
    /// Users in the room on this hub, the joiner included.
    pub users_here: usize,
    /// The client's `since`, if it asked to recover.
    pub since: Option<u64>,
    /// The client's `epoch`, if it gave one.
    pub epoch: Option<&'a str>,
    /// Whether this connection was not yet a member (a repeated `join`
    /// only reads the state).
    pub first: bool,
    /// When it was asked (for the webhook events it causes).
    pub now: Millis,
}

/// The room's state as a join finds it: what `joined` says and the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinState {
    /// Users in the room everywhere, the joiner counted.
    pub count: u64,
    /// The room's latest seq.
    pub seq: u64,
    /// The room's epoch.
    pub epoch: Box<str>,
    /// The seq of the oldest message the history holds, if any.
    pub oldest_held: Option<u64>,
    /// The held `message` frames after `since`, oldest first; empty without
    /// `since` or when the client's epoch is not the room's.
    pub replay: Vec<Bytes>,
    /// A frame to deliver now to the room's other members (`user_joined`
    /// when the user's first connection joined and nobody else announces it).
    pub announce: Option<Bytes>,
    /// The room already has its namespace's `max_members` users and the
    /// joiner is not one of them: nothing took effect (`room_full`).
    pub full: bool,
}

impl JoinState {
    /// The answer to a join refused for `max_members` (§14.1).
    pub fn full(count: u64) -> Self {
        JoinState {
            count,
            seq: 0,
            epoch: Box::from(""),
            oldest_held: None,
            replay: Vec::new(),
            announce: None,
            full: true,
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    /// The room.
    pub room: RoomRef<'a>,
    /// The sender as the frame shows it.
    pub user_json: &'a str,
    /// The content, raw JSON.
    pub content: &'a str,
    /// When it was sent.
    pub now: Millis,
    /// A client message in a room with `webhook_messages`: the authority
    /// also sends it to the webhook once it has its seq.
    pub webhook: bool,
}

/// A published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its seq in the room.
    pub seq: u64,
    /// The `message` frame to deliver now to the room's members here.
    pub frame: Bytes,
    /// Member connections elsewhere it goes to (other loops), for the
    /// server API's `delivered`.
    pub delivered_elsewhere: u64,
}

/// A frame for every member of a room (but the connections of `except`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomTraffic {
    /// The room's name.
    pub room: Box<str>,
    /// A `message`'s seq (dropped ones are reported with `lagged`).
    pub seq: Option<u64>,
    /// The user whose connections skip it.
    pub except: Option<Box<str>>,
    /// The frame, ready to send.
    pub frame: Bytes,
}

/// Something for one user's connections, wherever they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserItem {
    /// A `direct` frame.
    Direct(Bytes),
    /// `/api/disconnect`: close every connection with 4003.
    Kick,
    /// `/api/subscribe` (§14.3): every connection joins the room, as a
    /// `join` without `id` that the `rooms` claim does not bound.
    Subscribe(Box<str>),
    /// `/api/unsubscribe` (§14.3): every connection in the room leaves it.
    Unsubscribe(Box<str>),
}

/// What remains of a room here after a connection left it.
#[derive(Debug, Clone, Copy)]
pub struct Remaining {
    /// The leaving user's connections still in the room here.
    pub connections_here: u32,
    /// Users still in the room here.
    pub users_here: usize,
    /// When it left.
    pub now: Millis,
}

/// One user in a room for `presence`: (user id, connections, user JSON).
pub type PresenceEntry = (String, u64, String);

/// What a backplane reports back to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The answer to a request that answered [`Reply::Later`].
    Answer {
        /// Which request.
        request: RequestId,
        /// `None`: it failed (the backplane went away); the client gets
        /// `unavailable`.
        answer: Option<Answer>,
    },
    /// Room traffic for the members here.
    Traffic(RoomTraffic),
    /// A join took effect in its room's stream: traffic after this point is
    /// for the joiner (before, it is covered by `joined` and its replay).
    JoinMarked(RequestId),
    /// The room streams restarted: every pending join counts as in effect.
    StreamsRestarted,
    /// The node is back after an outage: what the room's members here did
    /// not see, to put before the live stream (§10, §11).
    Resume(Resume),
    /// A frame or a kick for a user's connections here.
    User {
        /// The user id.
        user: Box<str>,
        /// What to do.
        item: UserItem,
    },
}

/// What a room's members here missed while the backplane was away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The room's name.
    pub room: Box<str>,
    /// The room started a new epoch meanwhile (Redis came back empty): its
    /// members get `joined` without `id` with this state first.
    pub new_epoch: Option<NewEpoch>,
    /// Seqs no longer in the history: `lagged` before the messages.
    pub lost: Option<(u64, u64)>,
    /// The messages they did not see, with their seqs, in order.
    pub messages: Vec<(u64, Bytes)>,
    /// Seqs that came past the buffer's bound meanwhile: `lagged` after.
    pub overflow: Option<(u64, u64)>,
}

/// The state a `joined` without `id` announces after an epoch change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEpoch {
    /// Users in the room everywhere.
    pub count: u64,
    /// The latest seq of the new epoch.
    pub seq: u64,
    /// The new epoch.
    pub epoch: Box<str>,
    /// Whether the messages that follow start at seq 1.
    pub recovered: bool,
    /// How many messages of the new epoch follow.
    pub missed: u64,
}

/// The answer to a request that was answered later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To a join.
    Joined(JoinState),
    /// To a publish: the seq and the member connections it went to everywhere.
    Published {
        /// The message's seq.
        seq: u64,
        /// Connections of the room's members everywhere.
        delivered: u64,
    },
    /// To `presence`: one entry per user and place.
    Presence(Vec<PresenceEntry>),
    /// To a `direct` or a kick: the user's connections everywhere; to a
    /// subscribe or unsubscribe: the connections that joined or left.
    Sent(u64),
    /// To an introspection query (§14.3): the rooms, by name.
    Rooms(Vec<RoomView>),
}

/// What the hub does with a room that has no members left here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep it (with its seq, epoch and history) for this long, for recovery.
    KeepFor(Millis),
    /// Forget it now: the authority keeps its state elsewhere.
    ForgetNow,
}

/// A room's users here: (user id, connections, user JSON).
pub type UsersHere = Vec<(String, u32, String)>;

/// What the hub holds, for a backplane that must tell others (registration).
pub trait LocalView {
    /// Rooms with members here, with their users.
    fn occupied_rooms(&self) -> Vec<(String, UsersHere)>;
    /// Users connected here with their connection counts.
    fn users(&self) -> Vec<(String, u32)>;
}

/// Where a room's authority lives. See the module documentation.
pub trait Backplane {
    /// Whether requests that need the authority can be served now.
    fn is_available(&self) -> bool {
        true
    }

    /// `Some(up)` for a backplane that can be unreachable (`/health`,
    /// `roomcast_redis_up`).
    fn reachable(&self) -> Option<bool> {
        None
    }

    /// The hub made an entry for a room (a first local member, or a publish).
    fn open_room(&mut self, room: RoomRef<'_>);

    /// The room's last member here left.
    fn room_emptied(&mut self, room: RoomRef<'_>) -> Retention;

    /// The hub forgot the room; its key may be reused.
    fn close_room(&mut self, room: RoomRef<'_>);

    /// A connection joins (or joins again).
    fn join(&mut self, join: &JoinRequest<'_>) -> Reply<JoinState>;

    /// A client or the server API publishes a message.
    fn publish(&mut self, message: &Publication<'_>) -> Reply<Published>;

    /// A room-wide frame without a seq (`typing`). True: deliver it to the
    /// members here now; false: it comes back as [`Effect::Traffic`] (or was
    /// dropped during an outage).
    fn room_frame(&mut self, room: RoomRef<'_>, frame: &Bytes, except: Option<&str>) -> bool;

    /// A connection left a room at `now`: `connections_here` of the user
    /// remain, and `users_here` users. `Some`: a frame to deliver here now
    /// (`user_left`).
    fn member_left(
        &mut self,
        room: RoomRef<'_>,
        user: UserRef<'_>,
        left: Remaining,
    ) -> Option<Bytes>;

    /// The user's connections here changed to `connections`.
    fn user_connections(&mut self, user_id: &str, connections: usize);

    /// `presence` for a room, given who is here.
    fn presence(&mut self, room: &str, here: Vec<PresenceEntry>) -> Reply<Vec<PresenceEntry>>;

    /// A `direct` or a kick for a user. `Now(())`: only the connections
    /// here exist, the hub delivers and counts.
    fn send_to_user(&mut self, user_id: &str, item: &UserItem) -> Reply<()>;

    /// Time passed: heartbeats, registration, refreshes.
    fn tick(&mut self, now: Millis, view: &dyn LocalView);

    /// When `tick` next has work, if ever.
    fn next_tick(&self) -> Option<Millis> {
        None
    }

    /// What happened since the last call, in order.
    fn take_effects(&mut self, into: &mut Vec<Effect>);

    /// A graceful stop is under way.
    fn shutdown(&mut self) {}

    /// The rooms' state for `--state-file`; empty where another store holds it.
    fn export_rooms(&self) -> Vec<RoomSnapshot> {
        Vec::new()
    }

    /// A count that moves whenever `export_rooms` would give something new.
    fn room_changes(&self) -> u64 {
        0
    }

    /// Rooms occupied whose authority is here, when that differs from the
    /// rooms with members here (N loops: each room is counted by its home).
    fn occupied_rooms(&self) -> Option<usize> {
        None
    }

    /// For the I/O shell's backplane-specific plumbing (the Redis bridge).
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// Rooms as their authority knows them (`/api/rooms…`, §14.3); `here`
    /// is the hub's view, for a backplane that does not count members itself.
    fn inspect_rooms(&mut self, query: &RoomQuery, here: &dyn RoomsHere) -> Reply<Vec<RoomView>>;

    /// The hub applied a [`UserItem::Subscribe`] or [`UserItem::Unsubscribe`]
    /// that came as [`Effect::User`]: `changed` connections here joined or
    /// left (a backplane that sums the count across loops waits for it).
    fn user_item_applied(&mut self, _changed: u64) {}

    /// This node's id in the cluster, where there is one (`--redis`).
    fn node_id(&self) -> Option<&str> {
        None
    }
}
