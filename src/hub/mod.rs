//! The sans-IO rules: connections, users, rooms, presence, typing, acks and
//! `lagged`, written once for every backplane.
//!
//! The hub takes events (a connection arrived, a text frame, a disconnect,
//! the clock moved, the backplane answered) with the current time as an
//! argument, and leaves what to send in each connection's outbound queue. It
//! never touches a socket or reads a clock, so it is tested with fake
//! connections and a fake clock.
//!
//! What must be one for everybody who serves a room (seq, epoch, history,
//! the count of its users) lives below, in a [`Backplane`]: the local one
//! answers at once, Redis answers later. The rules handle both the same way:
//! an answer that comes later keeps its place in the connection's replies,
//! and a join's room traffic waits in a cursor until its `joined` is out.
//!
//! Identity is by index: connections are the slab keys the I/O shell gives
//! them, rooms are keys of the hub's own slab, and each side stores the
//! other's keys (members in the room, memberships in the session) so that
//! joining and leaving are O(1).

mod api;
mod delivery;
mod effects;
mod frames;
mod introspection;
mod invariants;
mod membership;
pub mod namespaces;
mod requests;
mod session;
mod upkeep;

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use slab::Slab;

pub use api::{ApiAnswer, ApiKind};
pub use introspection::{ConnectionView, user_answer};
pub use namespaces::{NamespaceSpec, Namespaces, RoomOptions};

use crate::auth::{Identity, Verifier};
use crate::backplane::Backplane;
use crate::backplane::local::LocalBackplane;
use crate::backplane::{Effect, RequestId, RoomRef};
use crate::metrics::Metrics;
use crate::outbound::{Marks, OutboundQueue};
use crate::protocol::{self, FrameBuilder, error_frame};
use crate::state::RoomSnapshot;
use crate::timers::Deadlines;
use effects::Waiting;
use session::{RateBucket, Session};

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
    /// Each room's options by namespace (history kept, client publish,
    /// member events, max members, webhook messages).
    pub namespaces: std::sync::Arc<Namespaces>,
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
    /// `--webhook-url` (§14.2): where the hub reports what happens in rooms.
    pub webhooks: Option<crate::webhook::Webhooks>,
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
    /// The backplane asked to be ticked.
    Backplane,
}

/// A room as this hub sees it: its members here, and what is per node
/// (typing). Its authority (seq, epoch, history) is the backplane's.
struct Room {
    name: Box<str>,
    members: Vec<ConnId>,
    /// Connections per user in this room here; `len()` is the count here.
    users: HashMap<Box<str>, u32>,
    /// Users typing here, with the time their typing state expires.
    typing: HashMap<Box<str>, Millis>,
    /// Distinguishes this room from a later one reusing its slab key.
    life: u64,
    /// When the last member left.
    empty_since: Option<Millis>,
    /// Members whose join has not taken effect yet (their traffic waits).
    joining: usize,
    /// Its namespace's options, looked up once when the room is made.
    options: RoomOptions,
}

/// The rooms server's state: everything but the sockets.
pub struct Hub {
    config: HubConfig,
    backplane: Box<dyn Backplane>,
    sessions: Vec<Option<Session>>,
    users: HashMap<Box<str>, Vec<ConnId>>,
    rooms: Slab<Room>,
    room_ids: HashMap<Box<str>, RoomId>,
    timers: Deadlines<Timer>,
    /// Reused buffer of due timers.
    due: Vec<Timer>,
    next_room_life: u64,
    next_connection_number: u64,
    /// What `next_connection_number` grows by (the loop count).
    connection_number_step: u64,
    occupied_rooms: usize,
    open_sessions: usize,
    dirty: Vec<ConnId>,
    closes: Vec<CloseRequest>,
    /// Connections pushed over the hard mark during the current event.
    evicted: Vec<ConnId>,
    metrics: Metrics,
    /// What each answer the backplane owes is for.
    waiting: HashMap<RequestId, Waiting>,
    /// Joins whose taking effect in the room's stream is awaited:
    /// request → (connection, serial, room).
    joins_in_flight: HashMap<RequestId, (ConnId, u64, RoomId)>,
    /// Server API answers decided since the shell last took them, by ticket.
    api_answers: Vec<(u64, ApiAnswer)>,
    /// Reused buffer of the backplane's effects.
    effects: Vec<Effect>,
    /// When the backplane tick is scheduled, if it is.
    backplane_tick: Option<Millis>,
}

/// A failed request: the error frame's code and text.
struct Refusal {
    code: protocol::ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: protocol::ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    fn unavailable() -> Self {
        Refusal::new(
            protocol::ErrorCode::Unavailable,
            "the cluster's Redis is unreachable; try again later",
        )
    }
}

impl Hub {
    /// A hub whose rooms live in this process (one event loop).
    pub fn new(config: HubConfig) -> Self {
        let events = crate::backplane::events::RoomEvents::new(config.webhooks.clone());
        let backplane = Box::new(LocalBackplane::new(
            std::sync::Arc::clone(&config.namespaces),
            events,
        ));
        Hub::with_backplane(config, backplane)
    }

    /// A hub over the given backplane.
    pub(crate) fn with_backplane(config: HubConfig, backplane: Box<dyn Backplane>) -> Self {
        let mut hub = Hub {
            config,
            backplane,
            sessions: Vec::new(),
            users: HashMap::new(),
            rooms: Slab::new(),
            room_ids: HashMap::new(),
            timers: Deadlines::new(),
            due: Vec::new(),
            next_room_life: 0,
            next_connection_number: 0,
            connection_number_step: 1,
            occupied_rooms: 0,
            open_sessions: 0,
            dirty: Vec::new(),
            closes: Vec::new(),
            evicted: Vec::new(),
            metrics: Metrics::default(),
            waiting: HashMap::new(),
            joins_in_flight: HashMap::new(),
            api_answers: Vec::new(),
            effects: Vec::new(),
            backplane_tick: None,
        };
        hub.schedule_backplane_tick();
        hub
    }

    /// The backplane, as its concrete type, for the shell's plumbing (the
    /// Redis bridge feeds it events and takes its commands). After feeding
    /// it, call [`Hub::backplane_changed`].
    pub(crate) fn backplane_mut<B: Backplane + 'static>(&mut self) -> Option<&mut B> {
        self.backplane.as_any_mut().downcast_mut::<B>()
    }

    /// Applies what the backplane reported since it was last asked.
    pub fn backplane_changed(&mut self, now: Millis) {
        self.apply_effects(now);
        self.schedule_backplane_tick();
        self.settle(now);
    }

    /// `Some(up)` when the backplane can be unreachable (Redis): `/health`
    /// answers 503 and `roomcast_redis_up` says 0 while it is.
    pub fn backplane_reachable(&self) -> Option<bool> {
        self.backplane.reachable()
    }

    /// Occupied rooms as the backplane counts them, where that differs from
    /// the rooms with members here (N loops: each room counted by its home).
    pub fn backplane_occupied_rooms(&self) -> Option<usize> {
        self.backplane.occupied_rooms()
    }

    /// A graceful stop: the backplane stops counting this node.
    pub fn shutdown_backplane(&mut self) {
        self.backplane.shutdown();
    }

    /// With N loops: this hub numbers its connections `first`, `first +
    /// step`, … so that connection ids are unique in the process.
    pub fn number_connections(&mut self, first: u64, step: u64) {
        self.next_connection_number = first;
        self.connection_number_step = step.max(1);
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

    /// Rooms the hub knows, members or not (for tests and metrics).
    pub fn known_room_count(&self) -> usize {
        self.rooms.len()
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
        self.next_connection_number += self.connection_number_step;
        let connection_id = format!("c{:x}", self.next_connection_number).into_boxed_str();
        let user_json: Rc<str> = protocol::user_json(&identity.user_id, &identity.name).into();
        let serial = self.next_connection_number;
        let mut session = Session::new(
            serial,
            identity,
            user_json,
            RateBucket::full(self.config.rate_burst, now),
            now,
        );
        session.connection_id = connection_id;
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
        session.outbound.push(upgrade_response);
        self.insert_session(conn, session);
        self.report_user_connections(&user_id);
        self.reply(conn, welcome);
        if let Some(room) = join
            && let Err(refusal) =
                self.join(conn, requests::JoinAsk::client(None, room, None, None), now)
        {
            self.reply(conn, error_frame(None, refusal.code, &refusal.message));
        }
        self.apply_effects(now);
        self.settle(now);
    }

    /// An `/echo` connection: it only needs an outbound queue.
    pub fn connect_echo(&mut self, conn: ConnId, now: Millis) {
        self.next_connection_number += self.connection_number_step;
        let serial = self.next_connection_number;
        self.schedule_heartbeat(conn, serial, now);
        let rate = RateBucket::full(self.config.rate_burst, now);
        self.insert_session(conn, Session::echo(serial, rate, now));
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

    /// When a connection's token expires (seconds since the epoch), if it does.
    pub fn token_expiry(&self, conn: ConnId) -> Option<u64> {
        self.session(conn).and_then(|session| session.expires_at)
    }

    /// The connection is going away (closed by either side, or failed): leave
    /// every room now so nobody else waits on it. Its queue stays until
    /// `release`, so a close frame can still be flushed. Idempotent.
    pub fn disconnect(&mut self, conn: ConnId, now: Millis) {
        self.detach(conn, now);
        self.apply_effects(now);
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
            self.report_user_connections(&user_id);
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

    /// When `tick` next has work, if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.next_due()
    }

    /// Every room's epoch, seq and history, for `--state-file` (empty where
    /// the backplane keeps them elsewhere).
    pub fn export_rooms(&self) -> Vec<RoomSnapshot> {
        self.backplane.export_rooms()
    }

    /// A count that moves whenever `export_rooms` would give something new.
    pub fn room_changes(&self) -> u64 {
        self.backplane.room_changes()
    }

    /// Restores rooms saved by `export_rooms` into a local backplane; they
    /// start empty, so each is forgotten after the usual five minutes unless
    /// someone joins.
    pub fn import_rooms(&mut self, rooms: Vec<RoomSnapshot>, now: Millis) {
        for snapshot in rooms {
            if self.room_ids.contains_key(snapshot.name.as_str()) {
                continue;
            }
            let room_id = self.create_room(&snapshot.name);
            let name = snapshot.name.clone();
            if let Some(local) = self.backplane_mut::<LocalBackplane>() {
                local.restore(
                    RoomRef {
                        id: room_id,
                        name: &name,
                    },
                    snapshot,
                );
            }
            self.room_without_members(room_id, now);
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

    fn serial_of(&self, conn: ConnId) -> u64 {
        self.session(conn).map_or(0, |session| session.serial)
    }
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
