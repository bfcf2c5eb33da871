//! The sans-IO core: connections, users, rooms, presence, typing, seq and
//! history. It takes events (a connection arrived, a text frame, a
//! disconnect, the clock moved) with the current time as an argument, and
//! leaves what to send in each connection's outbound queue. It never touches
//! a socket or reads a clock, so it is tested with fake connections and a
//! fake clock.
//!
//! Identity is by index: connections are the slab keys the I/O shell gives
//! them, rooms are keys of the hub's own slab, and each side stores the
//! other's keys (members in the room, memberships in the session) so that
//! joining and leaving are O(1).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use bytes::Bytes;
use serde_json::value::RawValue;
use slab::Slab;

use crate::auth::{Identity, RoomAccess, Verifier};
use crate::metrics::{DropReason, Metrics};
use crate::outbound::{Marks, Offer, OutboundQueue};
use crate::protocol::{
    self, ErrorCode, FrameBuilder, Request, RequestBody, error_frame, is_valid_room_name,
};
use crate::state::RoomSnapshot;
use crate::timers::Deadlines;

/// A connection's identity in the hub: the I/O shell's slab key.
pub type ConnId = usize;

/// A room's key in the hub's slab.
type RoomId = usize;

/// Milliseconds since the Unix epoch; the hub's only notion of time.
pub type Millis = u64;

/// How long a room without members keeps its seq, epoch and history (§11).
pub const EMPTY_ROOM_TTL_MS: Millis = 5 * 60 * 1000;

/// The settings the hub needs, taken from the command line.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Messages kept per room for recovery.
    pub history: usize,
    /// Most rooms per connection.
    pub max_rooms_per_connection: usize,
    /// Typing expiry; 0 disables it.
    pub typing_timeout_ms: Millis,
    /// Interval of server pings, announced in `welcome`; 0 disables heartbeats.
    pub heartbeat_ms: Millis,
    /// Silence after a ping before the connection is closed with 1011.
    pub pong_timeout_ms: Millis,
    /// Messages per second per connection; 0 disables the limit.
    pub rate_limit: u32,
    /// Token-bucket size.
    pub rate_burst: u32,
    /// The outbound queue's high-water marks.
    pub marks: Marks,
    /// Verifies `refresh` tokens.
    pub verifier: Verifier,
}

/// A close the hub decided on; the I/O shell sends the close frame and ends the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// Which connection.
    pub conn: ConnId,
    /// WebSocket close code (§8).
    pub code: u16,
    /// Close reason.
    pub reason: &'static str,
}

/// Messages of one room a connection did not get because it was above its
/// soft mark, reported as `lagged` once it drains.
struct LaggedSpan {
    room: RoomId,
    from_seq: u64,
    to_seq: u64,
}

/// A token bucket: `rate` tokens a second, at most `burst` banked.
struct RateBucket {
    tokens: f64,
    updated: Millis,
    /// Messages refused in a row; `2 × burst` of them close the connection.
    refused_in_a_row: u32,
}

impl RateBucket {
    fn full(burst: u32, now: Millis) -> Self {
        RateBucket {
            tokens: f64::from(burst.max(1)),
            updated: now,
            refused_in_a_row: 0,
        }
    }
}

/// A server ping with an empty payload: the same two bytes for everyone.
const PING_FRAME: &[u8] = &[0x89, 0x00];

/// What a hub timer is for; each is checked against the current state when it fires.
enum Timer {
    /// A typing state may have expired.
    Typing {
        room: RoomId,
        life: u64,
        user_id: Box<str>,
    },
    /// An empty room may be forgotten.
    ForgetRoom { room: RoomId, life: u64 },
    /// Time to ping the connection.
    Heartbeat { conn: ConnId, serial: u64 },
    /// The answer to the ping sent at `sent_at` is due.
    PongDue {
        conn: ConnId,
        serial: u64,
        sent_at: Millis,
    },
    /// The token may have expired.
    TokenExpiry { conn: ConnId, serial: u64 },
    /// With `--redis`: once a second, register when due, refresh TTLs.
    ClusterTick,
}

struct Membership {
    room: RoomId,
    /// Position of this connection in the room's `members`.
    slot: usize,
    /// With `--redis`: set while the join has not taken effect for this
    /// connection yet (see `hub_cluster.rs`); `None` once room traffic flows.
    cursor: Option<Box<cluster_mode::JoinCursor>>,
}

struct Session {
    /// Unique for the hub's life: tells this connection from a later one on the same key.
    serial: u64,
    /// The public id sent in `welcome`.
    connection_id: Box<str>,
    user_id: Box<str>,
    name: Box<str>,
    /// `{"id":…,"name":…}`, encoded once and reused in every frame about this
    /// user; shared so that holding it across a broadcast costs no allocation.
    user_json: Rc<str>,
    access: RoomAccess,
    expires_at: Option<u64>,
    memberships: Vec<Membership>,
    outbound: OutboundQueue,
    /// Listed in `Hub::dirty` since the shell last drained it.
    dirty: bool,
    /// No more frames are queued; the shell is closing the socket.
    closing: bool,
    /// An `/echo` connection: no user, no rooms.
    echo: bool,
    /// When the client last sent any frame.
    last_seen: Millis,
    rate: RateBucket,
    lagged: Vec<LaggedSpan>,
    /// With `--redis`: replies in request order while some wait for Redis.
    replies: VecDeque<cluster_mode::Slot>,
}

struct Room {
    name: Box<str>,
    members: Vec<ConnId>,
    /// Connections per user in this room; `len()` is the room's `count`.
    users: HashMap<Box<str>, u32>,
    seq: u64,
    epoch: Box<str>,
    /// Encoded `message` frames with their seq, oldest first.
    history: VecDeque<(u64, Bytes)>,
    /// Users typing here, with the time their typing state expires.
    typing: HashMap<Box<str>, Millis>,
    /// Distinguishes this room from a later one reusing its slab key.
    life: u64,
    /// When the last member left.
    empty_since: Option<Millis>,
    /// With `--redis`: members whose join has not taken effect yet.
    joining: usize,
    /// With `--redis`: the request that subscribed this node to the room.
    sub_generation: u64,
    /// With `--redis`: the highest seq this node has seen of the room.
    seen_seq: u64,
}

/// The rooms server's state: everything but the sockets.
pub struct Hub {
    config: HubConfig,
    sessions: Vec<Option<Session>>,
    users: HashMap<Box<str>, Vec<ConnId>>,
    rooms: Slab<Room>,
    room_ids: HashMap<Box<str>, RoomId>,
    timers: Deadlines<Timer>,
    /// Reused buffer of due timers.
    due: Vec<Timer>,
    next_room_life: u64,
    next_connection_number: u64,
    occupied_rooms: usize,
    open_sessions: usize,
    dirty: Vec<ConnId>,
    closes: Vec<CloseRequest>,
    /// Connections pushed over the hard mark during the current event.
    evicted: Vec<ConnId>,
    metrics: Metrics,
    /// With `--redis`: the cluster side (`hub_cluster.rs`).
    cluster: Option<Box<cluster_mode::ClusterState>>,
    /// Bumped by every change `export_rooms` would show (a publish, a room
    /// created or forgotten), so `--state-file` snapshots skip quiet periods.
    room_changes: u64,
}

/// A failed request: the error frame's code and text.
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl Hub {
    /// An empty hub.
    pub fn new(config: HubConfig) -> Self {
        Hub {
            config,
            sessions: Vec::new(),
            users: HashMap::new(),
            rooms: Slab::new(),
            room_ids: HashMap::new(),
            timers: Deadlines::new(),
            due: Vec::new(),
            next_room_life: 0,
            next_connection_number: 0,
            occupied_rooms: 0,
            open_sessions: 0,
            dirty: Vec::new(),
            closes: Vec::new(),
            evicted: Vec::new(),
            metrics: Metrics::default(),
            cluster: None,
            room_changes: 0,
        }
    }

    /// Counters for logs, `/metrics` and `/api/stats`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counters the I/O shell adds to (bytes written, handshakes refused).
    pub fn metrics_mut(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    /// Open WebSocket connections.
    pub fn connection_count(&self) -> usize {
        self.open_sessions
    }

    /// Rooms with at least one member.
    pub fn occupied_room_count(&self) -> usize {
        self.occupied_rooms
    }

    /// A connection finished its upgrade: queue `welcome`, then join the
    /// room of `/ws/{room}` exactly as a `join` request would.
    pub fn connect(&mut self, conn: ConnId, identity: Identity, join: Option<&str>, now: Millis) {
        self.connect_after(conn, Bytes::new(), identity, join, now);
    }

    /// As `connect`, with `upgrade_response` (the `101`) queued ahead of `welcome`.
    pub fn connect_after(
        &mut self,
        conn: ConnId,
        upgrade_response: Bytes,
        identity: Identity,
        join: Option<&str>,
        now: Millis,
    ) {
        self.next_connection_number += 1;
        let connection_id = format!("c{:x}", self.next_connection_number).into_boxed_str();
        let user_json: Rc<str> = protocol::user_json(&identity.user_id, &identity.name).into();
        let serial = self.next_connection_number;
        let session = Session {
            serial,
            connection_id,
            user_id: identity.user_id.into_boxed_str(),
            name: identity.name.into_boxed_str(),
            user_json,
            access: identity.rooms,
            expires_at: identity.expires_at,
            memberships: Vec::new(),
            outbound: OutboundQueue::new(),
            dirty: false,
            closing: false,
            echo: false,
            last_seen: now,
            rate: RateBucket::full(self.config.rate_burst, now),
            lagged: Vec::new(),
            replies: VecDeque::new(),
        };
        if let Some(expires_at) = session.expires_at {
            self.timers.schedule(
                expires_at.saturating_mul(1000),
                Timer::TokenExpiry { conn, serial },
            );
        }
        self.schedule_heartbeat(conn, serial, now);
        let welcome = FrameBuilder::new("welcome", None)
            .string("connection_id", &session.connection_id)
            .raw("user", &session.user_json)
            .number("heartbeat_ms", self.config.heartbeat_ms)
            .number("server_time", now)
            .finish();
        let user_id = session.user_id.clone();
        self.users
            .entry(session.user_id.clone())
            .or_default()
            .push(conn);
        self.insert_session(conn, session);
        self.cluster_user_count(&user_id);
        if let Some(session) = self.session_mut(conn) {
            session.outbound.push(upgrade_response);
        }
        self.reply(conn, welcome);
        let joined = match join {
            Some(room) if self.cluster.is_some() => {
                Some(self.cluster_join(conn, None, room, None, None))
            }
            Some(room) => Some(self.join(conn, None, room, None, None, now)),
            None => None,
        };
        if let Some(Err(refusal)) = joined {
            self.reply(conn, error_frame(None, refusal.code, &refusal.message));
        }
        self.settle(now);
    }

    /// An `/echo` connection: it only needs an outbound queue.
    pub fn connect_echo(&mut self, conn: ConnId, now: Millis) {
        self.next_connection_number += 1;
        let serial = self.next_connection_number;
        self.schedule_heartbeat(conn, serial, now);
        self.insert_session(
            conn,
            Session {
                serial,
                connection_id: Box::default(),
                user_id: Box::default(),
                name: Box::default(),
                user_json: Rc::from(""),
                access: RoomAccess::Patterns(Vec::new()),
                expires_at: None,
                memberships: Vec::new(),
                outbound: OutboundQueue::new(),
                dirty: false,
                closing: false,
                echo: true,
                last_seen: now,
                rate: RateBucket::full(self.config.rate_burst, now),
                lagged: Vec::new(),
                replies: VecDeque::new(),
            },
        );
    }

    fn insert_session(&mut self, conn: ConnId, session: Session) {
        if self.sessions.len() <= conn {
            self.sessions.resize_with(conn + 1, || None);
        }
        if let Some(slot) = self.sessions.get_mut(conn) {
            if slot.is_none() {
                self.open_sessions += 1;
            }
            *slot = Some(session);
        }
    }

    /// The connection's outbound queue, for the shell to write from and for
    /// tungstenite's automatic replies to be appended to.
    pub fn outbound_mut(&mut self, conn: ConnId) -> Option<&mut OutboundQueue> {
        self.session_mut(conn).map(|session| &mut session.outbound)
    }

    /// Marks a connection as having bytes to write, after the shell queued some itself.
    pub fn mark_dirty(&mut self, conn: ConnId) {
        if let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut)
            && !session.dirty
            && !session.outbound.is_empty()
        {
            session.dirty = true;
            self.dirty.push(conn);
        }
    }

    /// Connections whose queue gained bytes since the last call; each is listed once.
    pub fn take_dirty(&mut self, into: &mut Vec<ConnId>) {
        for conn in self.dirty.drain(..) {
            // A key released and reused since it was listed appears twice: the
            // flag lets only the first entry through.
            if let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut)
                && session.dirty
            {
                session.dirty = false;
                into.push(conn);
            }
        }
    }

    /// Whether some connection's queue gained bytes since `take_dirty` (the
    /// loop must not sleep on them).
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.closes.is_empty()
    }

    /// Closes the hub decided on since the last call.
    pub fn take_closes(&mut self, into: &mut Vec<CloseRequest>) {
        into.append(&mut self.closes);
    }

    /// One text frame from a client.
    pub fn receive_text(&mut self, conn: ConnId, text: &str, now: Millis) {
        let Some(session) = self.session(conn) else {
            return;
        };
        if session.closing {
            return;
        }
        self.metrics.messages_received += 1;
        self.saw_activity(conn, now);
        if !self.take_rate_token(conn, now) {
            self.refuse_for_rate(conn, text, now);
            self.settle(now);
            return;
        }
        match protocol::parse_request(text) {
            Ok(request) => {
                let id = request.id;
                if let Err(refusal) = self.dispatch(conn, request, now) {
                    self.reply(conn, error_frame(id, refusal.code, &refusal.message));
                }
            }
            Err(error) => {
                self.reply(conn, error_frame(error.id, error.code, &error.message));
            }
        }
        self.settle(now);
    }

    fn dispatch(&mut self, conn: ConnId, request: Request<'_>, now: Millis) -> Result<(), Refusal> {
        let local = matches!(
            request.body,
            RequestBody::Ping | RequestBody::Refresh { .. }
        );
        if self.cluster.is_some() && !local {
            return self.cluster_dispatch(conn, request, now);
        }
        let id = request.id;
        match request.body {
            RequestBody::Join { room, since, epoch } => {
                self.join(conn, id, &room, since, epoch.as_deref(), now)
            }
            RequestBody::Leave { room } => {
                let room_id = self.member_room(conn, &room)?;
                self.remove_membership(conn, room_id, now);
                let frame = FrameBuilder::new("left", id).string("room", &room).finish();
                self.reply(conn, frame);
                Ok(())
            }
            RequestBody::Message { room, content } => {
                let room_id = self.member_room(conn, &room)?;
                let user_json = self.user_json_of(conn);
                let (seq, _) = self.publish(room_id, &user_json, content, now);
                if id.is_some() {
                    self.reply(
                        conn,
                        FrameBuilder::new("ack", id).number("seq", seq).finish(),
                    );
                }
                Ok(())
            }
            RequestBody::Direct { to, content } => {
                let user_json = self.user_json_of(conn);
                let delivered = self.direct(&user_json, &to, content, now);
                if delivered == 0 {
                    return Err(Refusal::new(
                        ErrorCode::UserOffline,
                        format!("{} has no open connection", truncated(&to)),
                    ));
                }
                if id.is_some() {
                    self.reply(conn, FrameBuilder::new("ack", id).finish());
                }
                Ok(())
            }
            RequestBody::Typing { room, is_typing } => {
                let room_id = self.member_room(conn, &room)?;
                self.set_typing(conn, room_id, is_typing, now);
                Ok(())
            }
            RequestBody::Presence { room } => {
                self.check_room(conn, &room)?;
                let frame = self.presence_frame(id, &room);
                self.reply(conn, frame);
                Ok(())
            }
            RequestBody::Ping => {
                let frame = FrameBuilder::new("pong", id)
                    .number("server_time", now)
                    .finish();
                self.reply(conn, frame);
                Ok(())
            }
            RequestBody::Refresh { token } => self.refresh(conn, id, &token, now),
        }
    }

    /// Validates a room name and the token's `rooms` claim, in the order of §11.
    fn check_room(&self, conn: ConnId, room: &str) -> Result<(), Refusal> {
        if !is_valid_room_name(room) {
            return Err(Refusal::new(
                ErrorCode::InvalidRoom,
                "room names are 1-64 characters of A-Z a-z 0-9 _ - . :",
            ));
        }
        let allowed = self
            .session(conn)
            .is_some_and(|session| session.access.allows(room));
        if !allowed {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room}"),
            ));
        }
        Ok(())
    }

    /// The room, when the connection may name it and is a member of it.
    fn member_room(&self, conn: ConnId, room: &str) -> Result<RoomId, Refusal> {
        self.check_room(conn, room)?;
        let member_of = self.room_ids.get(room).copied().filter(|room_id| {
            self.session(conn)
                .is_some_and(|s| s.memberships.iter().any(|m| m.room == *room_id))
        });
        member_of.ok_or_else(|| Refusal::new(ErrorCode::NotInRoom, format!("join {room} first")))
    }

    fn join(
        &mut self,
        conn: ConnId,
        id: Option<&RawValue>,
        room: &str,
        since: Option<u64>,
        epoch: Option<&str>,
        now: Millis,
    ) -> Result<(), Refusal> {
        self.check_room(conn, room)?;
        let existing = self.room_ids.get(room).copied();
        let already_member = existing.is_some_and(|room_id| {
            self.session(conn)
                .is_some_and(|s| s.memberships.iter().any(|m| m.room == room_id))
        });
        if !already_member {
            let rooms_held = self.session(conn).map_or(0, |s| s.memberships.len());
            if rooms_held >= self.config.max_rooms_per_connection {
                return Err(Refusal::new(
                    ErrorCode::TooManyRooms,
                    format!(
                        "at most {} rooms per connection",
                        self.config.max_rooms_per_connection
                    ),
                ));
            }
        }
        let room_id = match existing {
            Some(room_id) => room_id,
            None => self.create_room(room, now),
        };
        if !already_member {
            self.add_membership(conn, room_id);
        }
        let Some(room_state) = self.rooms.get(room_id) else {
            return Ok(());
        };
        let mut frame = FrameBuilder::new("joined", id)
            .string("room", &room_state.name)
            .number("count", room_state.users.len() as u64)
            .number("seq", room_state.seq)
            .string("epoch", &room_state.epoch);
        let mut replay = Vec::new();
        if let Some(since) = since {
            let same_epoch = epoch.is_none_or(|epoch| epoch == &*room_state.epoch);
            let recovered = if !same_epoch || since > room_state.seq {
                false
            } else {
                replay.extend(
                    room_state
                        .history
                        .iter()
                        .filter(|(seq, _)| *seq > since)
                        .map(|(_, frame)| frame.clone()),
                );
                since == room_state.seq
                    || room_state
                        .history
                        .front()
                        .is_some_and(|(oldest, _)| *oldest <= since + 1)
            };
            frame = frame
                .boolean("recovered", recovered)
                .number("missed", replay.len() as u64);
        }
        self.reply(conn, frame.finish());
        for frame in replay {
            self.reply(conn, frame);
        }
        Ok(())
    }

    fn create_room(&mut self, name: &str, now: Millis) -> RoomId {
        self.next_room_life += 1;
        let room = Room {
            name: name.into(),
            members: Vec::new(),
            users: HashMap::new(),
            seq: 0,
            epoch: random_epoch(),
            history: VecDeque::new(),
            typing: HashMap::new(),
            life: self.next_room_life,
            empty_since: None,
            joining: 0,
            sub_generation: 0,
            seen_seq: 0,
        };
        let room_id = self.rooms.insert(room);
        self.room_ids.insert(name.into(), room_id);
        self.room_changes += 1;
        if self.cluster.is_some() {
            self.cluster_subscribe(room_id);
        } else {
            self.schedule_forget(room_id, now);
        }
        room_id
    }

    fn schedule_forget(&mut self, room_id: RoomId, now: Millis) {
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.empty_since = Some(now);
            self.timers.schedule(
                now.saturating_add(EMPTY_ROOM_TTL_MS),
                Timer::ForgetRoom {
                    room: room_id,
                    life: room.life,
                },
            );
        }
    }

    fn add_membership(&mut self, conn: ConnId, room_id: RoomId) {
        let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if room.members.is_empty() {
            self.occupied_rooms += 1;
            room.empty_since = None;
        }
        let cursor = self.cluster.is_some().then(Box::default);
        if cursor.is_some() {
            room.joining += 1;
        }
        session.memberships.push(Membership {
            room: room_id,
            slot: room.members.len(),
            cursor,
        });
        room.members.push(conn);
        let user_count = room.users.entry(session.user_id.clone()).or_insert(0);
        *user_count += 1;
        // With --redis the join script announces the user to every node.
        if *user_count == 1 && self.cluster.is_none() {
            let frame = FrameBuilder::new("user_joined", None)
                .string("room", &room.name)
                .raw("user", &session.user_json)
                .number("count", room.users.len() as u64)
                .finish();
            self.broadcast(room_id, &frame, Except::Connection(conn));
        }
    }

    /// Removes one membership; announces `user_left` (and the end of typing)
    /// when it was the user's last connection in the room.
    fn remove_membership(&mut self, conn: ConnId, room_id: RoomId, now: Millis) {
        let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut) else {
            return;
        };
        let Some(position) = session.memberships.iter().position(|m| m.room == room_id) else {
            return;
        };
        let membership = session.memberships.swap_remove(position);
        // No `lagged` for a room the connection has left (§11).
        session.lagged.retain(|span| span.room != room_id);
        let user_id = session.user_id.clone();
        let user_json = session.user_json.clone();
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if membership.cursor.is_some() {
            room.joining = room.joining.saturating_sub(1);
        }
        if membership.slot < room.members.len() {
            room.members.swap_remove(membership.slot);
            // The member moved into the freed slot must learn its new position.
            if let Some(&moved) = room.members.get(membership.slot)
                && let Some(moved_session) = self.sessions.get_mut(moved).and_then(Option::as_mut)
                && let Some(entry) = moved_session
                    .memberships
                    .iter_mut()
                    .find(|m| m.room == room_id)
            {
                entry.slot = membership.slot;
            }
        }
        let last_of_user = match room.users.get_mut(&user_id) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                room.users.remove(&user_id);
                true
            }
        };
        let now_empty = room.members.is_empty();
        if self.cluster.is_some() {
            let local_count = room.users.get(&user_id).copied().unwrap_or(0);
            let was_typing = last_of_user && room.typing.remove(&user_id).is_some();
            self.cluster_left(room_id, &user_id, &user_json, local_count, was_typing);
            if now_empty {
                self.occupied_rooms = self.occupied_rooms.saturating_sub(1);
                self.cluster_forget_room(room_id);
            }
            return;
        }
        if last_of_user {
            let was_typing = room.typing.remove(&user_id).is_some();
            let room_name = room.name.clone();
            let count = room.users.len() as u64;
            if was_typing {
                let frame = typing_frame(&room_name, &user_json, false);
                self.broadcast(room_id, &frame, Except::User(&user_id));
            }
            let frame = FrameBuilder::new("user_left", None)
                .string("room", &room_name)
                .raw("user", &user_json)
                .number("count", count)
                .finish();
            self.broadcast(room_id, &frame, Except::Nobody);
        }
        if now_empty {
            self.occupied_rooms = self.occupied_rooms.saturating_sub(1);
            self.schedule_forget(room_id, now);
        }
    }

    /// Assigns the next seq, records the frame in history and fans it out.
    /// Returns the seq and how many connections it was queued to.
    fn publish(
        &mut self,
        room_id: RoomId,
        user_json: &str,
        content: &RawValue,
        now: Millis,
    ) -> (u64, usize) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return (0, 0);
        };
        room.seq += 1;
        let seq = room.seq;
        self.room_changes += 1;
        let content = content.get();
        let frame = FrameBuilder::with_capacity(
            "message",
            None,
            room.name.len() + user_json.len() + content.len() + 64,
        )
        .string("room", &room.name)
        .raw("user", user_json)
        .raw("content", content)
        .number("seq", seq)
        .number("ts", now)
        .finish();
        if self.config.history > 0 {
            if room.history.len() >= self.config.history {
                room.history.pop_front();
            }
            room.history.push_back((seq, frame.clone()));
        }
        let delivered = self.fan_out(room_id, &frame, Except::Nobody, Some(seq));
        (seq, delivered)
    }

    /// Queues a `direct` to every connection of user `to`; returns how many.
    fn direct(&mut self, from_json: &str, to: &str, content: &RawValue, now: Millis) -> usize {
        // Disjoint borrows: the target list is read while sessions are written.
        let Hub {
            users,
            sessions,
            config,
            dirty,
            evicted,
            metrics,
            ..
        } = self;
        let Some(targets) = users.get(to) else {
            return 0;
        };
        let content = content.get();
        let frame =
            FrameBuilder::with_capacity("direct", None, from_json.len() + content.len() + 48)
                .raw("from", from_json)
                .raw("content", content)
                .number("ts", now)
                .finish();
        let mut delivered = 0;
        for &target in targets {
            let Some(session) = sessions.get_mut(target).and_then(Option::as_mut) else {
                continue;
            };
            if deliver_to(
                target,
                session,
                frame.clone(),
                false,
                config.marks,
                dirty,
                evicted,
                metrics,
            ) {
                delivered += 1;
            }
        }
        delivered
    }

    /// `POST /api/publish` (§6): a `message` to a room or a `direct` to a user,
    /// from the user `server`. `Err` is the text of a `400`.
    pub fn api_publish(&mut self, body: &[u8], now: Millis) -> Result<String, String> {
        let request = protocol::parse_publish(body)?;
        let answer = match request.target {
            protocol::PublishTarget::Room(room) => {
                if !is_valid_room_name(&room) {
                    return Err("invalid room name".into());
                }
                let room_id = match self.room_ids.get(room.as_ref()) {
                    Some(&room_id) => room_id,
                    None => self.create_room(&room, now),
                };
                let (seq, delivered) =
                    self.publish(room_id, protocol::SERVER_USER_JSON, request.content, now);
                format!(r#"{{"delivered":{delivered},"seq":{seq}}}"#)
            }
            protocol::PublishTarget::User(user) => {
                let delivered =
                    self.direct(protocol::SERVER_USER_JSON, &user, request.content, now);
                format!(r#"{{"delivered":{delivered}}}"#)
            }
        };
        self.settle(now);
        Ok(answer)
    }

    /// `POST /api/disconnect` (§6): closes every connection of a user with 4003.
    pub fn api_disconnect(&mut self, body: &[u8], now: Millis) -> Result<String, String> {
        let user = protocol::parse_disconnect(body)?;
        let connections = self.users.get(user.as_ref()).cloned().unwrap_or_default();
        let closed = connections.len();
        for conn in connections {
            self.close(conn, 4003, "disconnected by the server", now);
        }
        self.settle(now);
        Ok(format!(r#"{{"closed":{closed}}}"#))
    }

    fn set_typing(&mut self, conn: ConnId, room_id: RoomId, is_typing: bool, now: Millis) {
        let Some(session) = self.session(conn) else {
            return;
        };
        let user_id = session.user_id.clone();
        let user_json = session.user_json.clone();
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if is_typing {
            let deadline = if self.config.typing_timeout_ms == 0 {
                Millis::MAX
            } else {
                now.saturating_add(self.config.typing_timeout_ms)
            };
            room.typing.insert(user_id.clone(), deadline);
            if deadline != Millis::MAX {
                self.timers.schedule(
                    deadline,
                    Timer::Typing {
                        room: room_id,
                        life: room.life,
                        user_id: user_id.clone(),
                    },
                );
            }
        } else {
            room.typing.remove(&user_id);
        }
        let frame = typing_frame(&room.name, &user_json, is_typing);
        self.room_broadcast(room_id, &frame, Except::User(&user_id));
    }

    fn presence_frame(&self, id: Option<&RawValue>, room: &str) -> Bytes {
        let mut users: Vec<(&str, &str, u32)> = Vec::new();
        let mut positions: HashMap<&str, usize> = HashMap::new();
        if let Some(room_state) = self.room_ids.get(room).and_then(|&r| self.rooms.get(r)) {
            for &member in &room_state.members {
                let Some(session) = self.session(member) else {
                    continue;
                };
                match positions.get(&*session.user_id) {
                    Some(&position) => {
                        if let Some(entry) = users.get_mut(position) {
                            entry.2 += 1;
                        }
                    }
                    None => {
                        positions.insert(&session.user_id, users.len());
                        users.push((&session.user_id, &session.name, 1));
                    }
                }
            }
        }
        let mut list = Vec::with_capacity(2 + users.len() * 48);
        list.push(b'[');
        for (index, (user_id, name, connections)) in users.iter().enumerate() {
            if index > 0 {
                list.push(b',');
            }
            list.extend_from_slice(b"{\"id\":");
            protocol::write_json_string(&mut list, user_id);
            list.extend_from_slice(b",\"name\":");
            protocol::write_json_string(&mut list, name);
            list.extend_from_slice(format!(",\"connections\":{connections}}}").as_bytes());
        }
        list.push(b']');
        let list = String::from_utf8(list).unwrap_or_else(|_| "[]".into());
        FrameBuilder::new("presence", id)
            .string("room", room)
            .raw("users", &list)
            .finish()
    }

    fn refresh(
        &mut self,
        conn: ConnId,
        id: Option<&RawValue>,
        token: &str,
        now: Millis,
    ) -> Result<(), Refusal> {
        let identity = self
            .config
            .verifier
            .verify(token, now / 1000)
            .map_err(|error| {
                Refusal::new(ErrorCode::InvalidToken, format!("token rejected: {error}"))
            })?;
        let Some(session) = self.session_mut(conn) else {
            return Ok(());
        };
        if *session.user_id != *identity.user_id {
            return Err(Refusal::new(
                ErrorCode::InvalidToken,
                "a refresh token must have the same `sub`",
            ));
        }
        session.user_json = protocol::user_json(&identity.user_id, &identity.name).into();
        session.name = identity.name.into_boxed_str();
        session.access = identity.rooms;
        session.expires_at = identity.expires_at;
        let serial = session.serial;
        if let Some(expires_at) = identity.expires_at {
            self.timers.schedule(
                expires_at.saturating_mul(1000),
                Timer::TokenExpiry { conn, serial },
            );
        }
        let frame = FrameBuilder::new("refreshed", id)
            .optional_number("exp", identity.expires_at)
            .finish();
        self.reply(conn, frame);
        Ok(())
    }

    /// When a connection's token expires (seconds since the epoch), if it does.
    pub fn token_expiry(&self, conn: ConnId) -> Option<u64> {
        self.session(conn).and_then(|session| session.expires_at)
    }

    /// The connection is going away (closed by either side, or failed): leave
    /// every room now so nobody else waits on it. Its queue stays until
    /// `release`, so a close frame can still be flushed. Idempotent.
    pub fn disconnect(&mut self, conn: ConnId, now: Millis) {
        self.detach(conn, now);
        self.settle(now);
    }

    fn detach(&mut self, conn: ConnId, now: Millis) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        session.closing = true;
        let rooms: Vec<RoomId> = session.memberships.iter().map(|m| m.room).collect();
        let user_id = session.user_id.clone();
        let echo = session.echo;
        for room_id in rooms {
            self.remove_membership(conn, room_id, now);
        }
        if !echo && let Some(connections) = self.users.get_mut(&user_id) {
            connections.retain(|&other| other != conn);
            if connections.is_empty() {
                self.users.remove(&user_id);
            }
            self.cluster_user_count(&user_id);
        }
    }

    /// The socket is gone: forget the connection entirely.
    pub fn release(&mut self, conn: ConnId, now: Millis) {
        self.disconnect(conn, now);
        if let Some(slot) = self.sessions.get_mut(conn)
            && slot.take().is_some()
        {
            self.open_sessions -= 1;
        }
    }

    /// Runs what is due at `now`: heartbeats, pong deadlines, token expiry,
    /// typing expiry and forgetting empty rooms.
    pub fn tick(&mut self, now: Millis) {
        let mut due = std::mem::take(&mut self.due);
        self.timers.take_due(now, &mut due);
        for timer in due.drain(..) {
            match timer {
                Timer::Typing {
                    room,
                    life,
                    user_id,
                } => self.expire_typing(room, life, &user_id, now),
                Timer::ForgetRoom { room, life } => self.forget_room(room, life, now),
                Timer::Heartbeat { conn, serial } => self.ping(conn, serial, now),
                Timer::PongDue {
                    conn,
                    serial,
                    sent_at,
                } => self.check_pong(conn, serial, sent_at, now),
                Timer::TokenExpiry { conn, serial } => self.check_token_expiry(conn, serial, now),
                Timer::ClusterTick => self.cluster_tick(now),
            }
        }
        self.due = due;
        self.settle(now);
    }

    fn expire_typing(&mut self, room_id: RoomId, life: u64, user_id: &str, now: Millis) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        // A newer `typing` moved the deadline, or the state already ended.
        let due = room
            .typing
            .get(user_id)
            .is_some_and(|&deadline| deadline <= now);
        if room.life != life || !due {
            return;
        }
        room.typing.remove(user_id);
        let user_json = self
            .users
            .get(user_id)
            .and_then(|conns| conns.first())
            .and_then(|&conn| self.session(conn))
            .map(|session| session.user_json.clone());
        if let (Some(user_json), Some(room)) = (user_json, self.rooms.get(room_id)) {
            let frame = typing_frame(&room.name, &user_json, false);
            self.room_broadcast(room_id, &frame, Except::User(user_id));
        }
    }

    fn forget_room(&mut self, room_id: RoomId, life: u64, now: Millis) {
        let forget = self.rooms.get(room_id).is_some_and(|room| {
            room.life == life
                && room.members.is_empty()
                && room
                    .empty_since
                    .is_some_and(|since| since.saturating_add(EMPTY_ROOM_TTL_MS) <= now)
        });
        if forget {
            let room = self.rooms.remove(room_id);
            self.room_ids.remove(&room.name);
            self.room_changes += 1;
        }
    }

    fn schedule_heartbeat(&mut self, conn: ConnId, serial: u64, at: Millis) {
        if self.config.heartbeat_ms > 0 {
            self.timers.schedule(
                at.saturating_add(self.config.heartbeat_ms),
                Timer::Heartbeat { conn, serial },
            );
        }
    }

    /// The live session on `conn`, if it is still the one with `serial`.
    fn live_session_mut(&mut self, conn: ConnId, serial: u64) -> Option<&mut Session> {
        self.session_mut(conn)
            .filter(|session| session.serial == serial && !session.closing)
    }

    /// Sends a ping, and schedules both its deadline and the next ping, so
    /// pings come every heartbeat whatever the pong timeout.
    fn ping(&mut self, conn: ConnId, serial: u64, now: Millis) {
        if self.live_session_mut(conn, serial).is_none() {
            return;
        }
        self.reply(conn, Bytes::from_static(PING_FRAME));
        self.timers.schedule(
            now.saturating_add(self.config.pong_timeout_ms),
            Timer::PongDue {
                conn,
                serial,
                sent_at: now,
            },
        );
        self.schedule_heartbeat(conn, serial, now);
    }

    /// Any frame since the ping counts as its answer (§11).
    fn check_pong(&mut self, conn: ConnId, serial: u64, sent_at: Millis, now: Millis) {
        let Some(session) = self.live_session_mut(conn, serial) else {
            return;
        };
        if session.last_seen < sent_at {
            self.close(conn, 1011, "no answer to ping", now);
        }
    }

    fn check_token_expiry(&mut self, conn: ConnId, serial: u64, now: Millis) {
        let Some(session) = self.live_session_mut(conn, serial) else {
            return;
        };
        // A `refresh` may have moved the expiry later; its own timer covers that.
        if session
            .expires_at
            .is_some_and(|expires_at| expires_at.saturating_mul(1000) <= now)
        {
            self.close(conn, 4001, "token expired", now);
        }
    }

    /// Decides to close a connection: it leaves its rooms now and the shell
    /// sends the close frame.
    fn close(&mut self, conn: ConnId, code: u16, reason: &'static str, now: Millis) {
        self.closes.push(CloseRequest { conn, code, reason });
        self.detach(conn, now);
    }

    /// The client sent a frame of any kind: a sign of life for the heartbeat.
    pub fn saw_activity(&mut self, conn: ConnId, now: Millis) {
        if let Some(session) = self.session_mut(conn) {
            session.last_seen = now;
        }
    }

    /// The shell wrote some of the connection's queue. Once it is back at or
    /// under the soft mark, the connection learns which messages it missed.
    pub fn drained(&mut self, conn: ConnId) {
        let soft = self.config.marks.soft;
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        if session.lagged.is_empty() || session.outbound.len() > soft || session.closing {
            return;
        }
        let spans = std::mem::take(&mut session.lagged);
        for span in spans {
            let Some(room) = self.rooms.get(span.room) else {
                continue;
            };
            let frame = FrameBuilder::new("lagged", None)
                .string("room", &room.name)
                .number("from_seq", span.from_seq)
                .number("to_seq", span.to_seq)
                .finish();
            self.reply(conn, frame);
        }
    }

    fn take_rate_token(&mut self, conn: ConnId, now: Millis) -> bool {
        let (rate, burst) = (self.config.rate_limit, self.config.rate_burst);
        let Some(session) = self.session_mut(conn) else {
            return false;
        };
        if rate == 0 {
            return true;
        }
        let bucket = &mut session.rate;
        let elapsed = now.saturating_sub(bucket.updated) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * f64::from(rate)).min(f64::from(burst.max(1)));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refused_in_a_row = 0;
            true
        } else {
            false
        }
    }

    /// Answers a message over the rate with `rate_limited` (echoing its id when
    /// readable); `2 × --rate-burst` refusals in a row close with 1008.
    fn refuse_for_rate(&mut self, conn: ConnId, text: &str, now: Millis) {
        let limit = self.config.rate_burst.max(1).saturating_mul(2);
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        session.rate.refused_in_a_row += 1;
        let flooding = session.rate.refused_in_a_row >= limit;
        let id = match protocol::parse_request(text) {
            Ok(request) => request.id,
            Err(error) => error.id,
        };
        self.reply(
            conn,
            error_frame(id, ErrorCode::RateLimited, "too many messages; slow down"),
        );
        if flooding {
            self.close(conn, 1008, "rate limit exceeded", now);
        }
    }

    /// When `tick` next has work, if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.next_due()
    }

    /// Checks that the hub's cross-references agree: memberships both ways,
    /// user counts, the occupied-room count, the user index and the hard mark.
    /// For tests and fuzzing; O(everything).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut open = 0;
        for (conn, session) in self.sessions.iter().enumerate() {
            let Some(session) = session else { continue };
            open += 1;
            if !session.closing && session.outbound.len() > self.config.marks.hard {
                return Err(format!("connection {conn} is over the hard mark"));
            }
            if session.closing && !session.memberships.is_empty() {
                return Err(format!("closing connection {conn} is still in rooms"));
            }
            for membership in &session.memberships {
                let member = self
                    .rooms
                    .get(membership.room)
                    .and_then(|room| room.members.get(membership.slot));
                if member != Some(&conn) {
                    return Err(format!(
                        "connection {conn}: membership of room {} slot {} not mirrored",
                        membership.room, membership.slot
                    ));
                }
            }
            let listed = self
                .users
                .get(&session.user_id)
                .is_some_and(|conns| conns.contains(&conn));
            if !session.echo && !session.closing && !listed {
                return Err(format!("connection {conn} missing from the user index"));
            }
        }
        if open != self.open_sessions {
            return Err(format!(
                "open_sessions {} but {open} sessions",
                self.open_sessions
            ));
        }
        for (user_id, conns) in &self.users {
            for &conn in conns {
                let matches = self
                    .session(conn)
                    .is_some_and(|s| *s.user_id == **user_id && !s.closing);
                if !matches {
                    return Err(format!("user index lists {conn} for {user_id}"));
                }
            }
        }
        let mut occupied = 0;
        for (room_id, room) in &self.rooms {
            if self.room_ids.get(&room.name) != Some(&room_id) {
                return Err(format!("room {} missing from the name index", room.name));
            }
            if !room.members.is_empty() {
                occupied += 1;
            }
            let mut per_user: HashMap<&str, u32> = HashMap::new();
            for (slot, &member) in room.members.iter().enumerate() {
                let Some(session) = self.session(member) else {
                    return Err(format!("room {} lists a freed connection", room.name));
                };
                let mirrored = session
                    .memberships
                    .iter()
                    .any(|m| m.room == room_id && m.slot == slot);
                if !mirrored {
                    return Err(format!("room {} slot {slot} not mirrored", room.name));
                }
                *per_user.entry(&session.user_id).or_default() += 1;
            }
            let counts_agree = per_user.len() == room.users.len()
                && per_user
                    .iter()
                    .all(|(user, count)| room.users.get(*user) == Some(count));
            if !counts_agree {
                return Err(format!("room {} user counts disagree", room.name));
            }
        }
        if occupied != self.occupied_rooms {
            return Err(format!(
                "occupied_rooms {} but {occupied} rooms have members",
                self.occupied_rooms
            ));
        }
        if self.room_ids.len() != self.rooms.len() {
            return Err("name index and rooms differ in size".into());
        }
        self.check_cluster_invariants()
    }

    /// Every room's epoch, seq and history, for `--state-file`.
    pub fn export_rooms(&self) -> Vec<RoomSnapshot> {
        self.rooms
            .iter()
            .map(|(_, room)| RoomSnapshot {
                name: room.name.to_string(),
                epoch: room.epoch.to_string(),
                seq: room.seq,
                history: room
                    .history
                    .iter()
                    .filter_map(|(seq, frame)| {
                        protocol::text_frame_payload(frame).map(|text| (*seq, text.to_string()))
                    })
                    .collect(),
            })
            .collect()
    }

    /// Restores rooms saved by `export_rooms`; they start empty, so each is
    /// forgotten after the usual five minutes unless someone joins.
    pub fn import_rooms(&mut self, rooms: Vec<RoomSnapshot>, now: Millis) {
        for snapshot in rooms {
            if self.room_ids.contains_key(snapshot.name.as_str()) {
                continue;
            }
            let room_id = self.create_room(&snapshot.name, now);
            if let Some(room) = self.rooms.get_mut(room_id) {
                room.epoch = snapshot.epoch.into_boxed_str();
                room.seq = snapshot.seq;
                let keep = snapshot.history.len().saturating_sub(self.config.history);
                room.history = snapshot
                    .history
                    .iter()
                    .skip(keep)
                    .map(|(seq, text)| (*seq, protocol::text_frame(text)))
                    .collect();
            }
        }
    }

    /// A count that moves whenever `export_rooms` would give something new.
    pub fn room_changes(&self) -> u64 {
        self.room_changes
    }

    /// Rooms the hub knows, members or not (for tests and metrics).
    pub fn known_room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Queues a reply to the connection's own request: never dropped above the
    /// soft mark, and (with `--redis`) behind earlier replies still waiting for Redis.
    fn reply(&mut self, conn: ConnId, frame: Bytes) {
        if let Some(session) = self.session_mut(conn)
            && !session.replies.is_empty()
        {
            session.replies.push_back(cluster_mode::Slot::Ready(frame));
            return;
        }
        self.deliver(conn, frame, false);
    }

    /// Queues a frame under the marks; true when it was queued.
    fn deliver(&mut self, conn: ConnId, frame: Bytes, droppable: bool) -> bool {
        let marks = self.config.marks;
        let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut) else {
            return false;
        };
        deliver_to(
            conn,
            session,
            frame,
            droppable,
            marks,
            &mut self.dirty,
            &mut self.evicted,
            &mut self.metrics,
        )
    }

    /// Queues the same frame bytes to every member of the room, except whom `except` names.
    fn broadcast(&mut self, room_id: RoomId, frame: &Bytes, except: Except<'_>) -> usize {
        self.fan_out(room_id, frame, except, None)
    }

    /// As `broadcast`; for a `message` with its `seq`, members that drop it
    /// remember the seq for their `lagged` notice.
    fn fan_out(
        &mut self,
        room_id: RoomId,
        frame: &Bytes,
        except: Except<'_>,
        seq: Option<u64>,
    ) -> usize {
        let marks = self.config.marks;
        let Some(room) = self.rooms.get(room_id) else {
            return 0;
        };
        let mut delivered = 0;
        for &member in &room.members {
            let Some(session) = self.sessions.get_mut(member).and_then(Option::as_mut) else {
                continue;
            };
            match except {
                Except::Connection(conn) if conn == member => continue,
                Except::User(user_id) if *session.user_id == *user_id => continue,
                _ => {}
            }
            if deliver_to(
                member,
                session,
                frame.clone(),
                true,
                marks,
                &mut self.dirty,
                &mut self.evicted,
                &mut self.metrics,
            ) {
                delivered += 1;
            } else if let Some(seq) = seq
                && !session.closing
            {
                match session.lagged.iter_mut().find(|span| span.room == room_id) {
                    Some(span) => span.to_seq = seq,
                    None => session.lagged.push(LaggedSpan {
                        room: room_id,
                        from_seq: seq,
                        to_seq: seq,
                    }),
                }
            }
        }
        delivered
    }

    /// Closes the connections pushed over the hard mark, which may announce
    /// `user_left` and so evict more; runs until nothing is left.
    fn settle(&mut self, now: Millis) {
        while let Some(conn) = self.evicted.pop() {
            self.close(conn, 4000, "slow consumer", now);
        }
    }

    /// The connection's encoded user, shared (a reference count, no copy).
    fn user_json_of(&self, conn: ConnId) -> Rc<str> {
        self.session(conn)
            .map_or_else(|| Rc::from(""), |session| Rc::clone(&session.user_json))
    }

    fn session(&self, conn: ConnId) -> Option<&Session> {
        self.sessions.get(conn).and_then(Option::as_ref)
    }

    fn session_mut(&mut self, conn: ConnId) -> Option<&mut Session> {
        self.sessions.get_mut(conn).and_then(Option::as_mut)
    }
}

/// Who a broadcast skips.
#[derive(Clone, Copy)]
enum Except<'a> {
    Nobody,
    /// The connection that caused it (`user_joined` goes to the others).
    Connection(ConnId),
    /// Every connection of a user (`typing` never echoes to the typist).
    User(&'a str),
}

#[allow(clippy::too_many_arguments)]
fn deliver_to(
    conn: ConnId,
    session: &mut Session,
    frame: Bytes,
    droppable: bool,
    marks: Marks,
    dirty: &mut Vec<ConnId>,
    evicted: &mut Vec<ConnId>,
    metrics: &mut Metrics,
) -> bool {
    if session.closing {
        return false;
    }
    match session.outbound.offer(frame, droppable, marks) {
        Offer::Dropped => {
            metrics.drop_frames(DropReason::SoftMark, 1);
            false
        }
        Offer::OverHard => {
            let discarded = session.outbound.chunk_count() as u64;
            session.outbound.clear();
            session.closing = true;
            metrics.drop_frames(DropReason::HardMark, discarded);
            metrics.slow_consumers_closed += 1;
            evicted.push(conn);
            false
        }
        Offer::Queued => {
            metrics.messages_sent += 1;
            if !session.dirty {
                session.dirty = true;
                dirty.push(conn);
            }
            true
        }
    }
}

fn typing_frame(room: &str, user_json: &str, is_typing: bool) -> Bytes {
    FrameBuilder::new("typing", None)
        .string("room", room)
        .raw("user", user_json)
        .boolean("is_typing", is_typing)
        .finish()
}

fn truncated(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

/// A fresh epoch: 128 random bits as hex, so two lives of a room never share one.
/// Also the new epoch of a room restored after an unclean stop (`state`).
pub(crate) fn random_epoch() -> Box<str> {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock and a counter, still unique per process.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_boxed_str()
}

#[path = "hub_cluster.rs"]
mod cluster_mode;

pub use cluster_mode::{ApiAnswer, ApiKind};

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
