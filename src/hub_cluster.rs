//! The hub with `--redis`: rooms span every node on one Redis.
//!
//! Still sans-IO: what the hub needs from Redis leaves as [`Outgoing`]
//! values (taken by the loop and handed to the bridge threads), and what
//! Redis answers or publishes comes back as [`Event`]s. The local half stays
//! as without Redis (sessions, local members, outbound queues, typing timers);
//! what is cluster-wide (seq, epoch, history, presence, counts, `direct`,
//! kicks) is decided by the scripts of [`crate::cluster`].
//!
//! Four rules keep every node's view exact:
//!
//! - **One order per room.** Every frame for a room's members (messages with
//!   their seq, `typing`, `user_joined`, `user_left`) is published on the
//!   room's channel, and every node delivers from there, the sender's own
//!   node included. Nothing room-wide is delivered locally first.
//! - **Join markers.** A join's script publishes a marker on the room's
//!   channel right after it took effect. Until the connection's marker comes
//!   by, room traffic is from before its join (covered by `joined`: count,
//!   seq, replay) and is not delivered to it; after the marker and before its
//!   `joined` is queued, traffic waits in the cursor. So a joiner gets every
//!   message once, in seq order, after its `joined` and replay.
//! - **Replies in request order.** A connection's replies are queued in the
//!   order of its requests, whether they waited for Redis (`joined`, `ack`,
//!   `presence`) or not (`left`, `pong`, errors).
//! - **Resume after an outage.** The node registers again, and the answer
//!   brings each room's epoch, seq and the history its members did not see
//!   (all of a new epoch when Redis came back empty, however late this node
//!   came back; `lagged` for what the history no longer holds). Messages that
//!   arrive while the answer is awaited wait for it; those the replay already
//!   gave are not given again.

use std::collections::HashMap;

use bytes::Bytes;
use log::{info, warn};
use serde_json::value::RawValue;

use super::{ConnId, Except, Hub, Millis, Refusal, RoomId, Timer, deliver_to};
use crate::cluster::{
    self, Command, Event, Outgoing, REFRESH_EVERY_TICKS, RegisteredRoom, Reply, ReqId, RoomItem,
    RoomMembers, RoomState, Subscription, UserItem,
};
use crate::protocol::{
    self, ErrorCode, FrameBuilder, Request, RequestBody, error_frame, is_valid_room_name,
};

/// Frames kept for one joining connection while its `joined` waits, and
/// messages kept for one room while a registration waits for its answer.
const MAX_BUFFERED: usize = 4096;

/// The answer to a server API request (§6, §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAnswer {
    /// `200` with this JSON.
    Ok(String),
    /// `400` with this message.
    BadRequest(String),
    /// `503` `{"error":"unavailable"}`.
    Unavailable,
}

/// Which server API endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `POST /api/publish`: a `message` to a room or a `direct` to a user.
    Publish,
    /// `POST /api/disconnect`: close every connection of a user with 4003.
    Disconnect,
}

/// A reply in a connection's queue of replies.
pub(super) enum Slot {
    /// Ready to go once everything before it went.
    Ready(Bytes),
    /// Waits for the answer to this request.
    Waiting(ReqId),
    /// The answer's frames; for a `joined`, the room whose traffic may start after it.
    Done(Vec<Bytes>, Option<RoomId>),
}

/// Where a joining connection is in its room's stream.
#[derive(Default)]
pub(super) struct JoinCursor {
    /// The join's marker came by: later traffic is for this connection.
    marker: bool,
    /// Its `joined` (and replay) is queued.
    replied: bool,
    /// Traffic after the marker, before `joined`.
    buffer: Vec<Buffered>,
}

struct Buffered {
    seq: Option<u64>,
    frame: Bytes,
}

/// A room as a registration's snapshot named it, with what the node had
/// seen of it: the answer carries the history after that.
struct Snapshot {
    room: RoomId,
    life: u64,
    /// The epoch the node knew; empty when it never learnt one.
    epoch: Box<str>,
    /// The last seq of `epoch` the node saw.
    since: u64,
}

/// A room's messages that came while a registration waited for its answer.
/// Those up to the answer's seq are in its history already; the others came
/// after its snapshot and go out after the replay.
#[derive(Default)]
struct Held {
    messages: Vec<(u64, Bytes)>,
    /// Seqs that came once `messages` was full (contiguous: the stream is in
    /// seq order): reported as `lagged`.
    overflow: Option<(u64, u64)>,
}

/// What an answer from Redis is for.
enum Pending {
    Join {
        conn: ConnId,
        serial: u64,
        id: Option<Box<RawValue>>,
        room: RoomId,
        life: u64,
        name: Box<str>,
        since: Option<u64>,
        epoch: Option<String>,
        first: bool,
    },
    Message {
        conn: ConnId,
        serial: u64,
        id: Option<Box<RawValue>>,
    },
    Direct {
        conn: ConnId,
        serial: u64,
        id: Option<Box<RawValue>>,
        to: Box<str>,
    },
    Presence {
        conn: ConnId,
        serial: u64,
        id: Option<Box<RawValue>>,
        room: Box<str>,
    },
    Api {
        ticket: u64,
        kind: ApiReply,
    },
    Register {
        rooms: Vec<Snapshot>,
    },
}

#[derive(Clone, Copy)]
enum ApiReply {
    Room,
    User,
    Disconnect,
}

/// The hub's cluster state.
pub(super) struct ClusterState {
    /// This process's id: its join markers and wake channel.
    process: String,
    command_link: bool,
    subscriber_link: bool,
    /// Registered on the current links: client requests may go to Redis.
    registered: bool,
    /// A registration is on its way.
    registering: Option<ReqId>,
    next_req: ReqId,
    next_generation: u64,
    pending: HashMap<ReqId, Pending>,
    /// Join markers awaited: request → (connection, serial, room).
    markers: HashMap<ReqId, (ConnId, u64, RoomId)>,
    /// While a registration waits for its answer: room messages that came meanwhile.
    held: HashMap<RoomId, Held>,
    /// After a registration: the seq each room's replay ended at. The stream
    /// may still bring messages up to it (published before the snapshot,
    /// read after the answer); they went out with the replay already.
    replayed: HashMap<RoomId, u64>,
    out: Vec<Outgoing>,
    api_answers: Vec<(u64, ApiAnswer)>,
    ticks: u64,
}

fn owned_id(id: Option<&RawValue>) -> Option<Box<RawValue>> {
    id.map(|raw| raw.to_owned())
}

fn unavailable() -> Refusal {
    Refusal::new(
        ErrorCode::Unavailable,
        "the cluster's Redis is unreachable; try again later",
    )
}

/// `{"type":"message","payload":{"room":R,"user":U,"content":C,"seq":` and
/// `,"ts":T}}`: the script puts the seq between them.
fn message_parts(room: &str, user_json: &str, content: &str, now: Millis) -> (String, String) {
    let mut head = Vec::with_capacity(room.len() + user_json.len() + content.len() + 64);
    head.extend_from_slice(br#"{"type":"message","payload":{"room":"#);
    protocol::write_json_string(&mut head, room);
    head.extend_from_slice(br#","user":"#);
    head.extend_from_slice(user_json.as_bytes());
    head.extend_from_slice(br#","content":"#);
    head.extend_from_slice(content.as_bytes());
    head.extend_from_slice(br#","seq":"#);
    let head = String::from_utf8(head).unwrap_or_default();
    (head, format!(r#","ts":{now}}}}}"#))
}

fn direct_text(from_json: &str, content: &str, now: Millis) -> String {
    format!(
        r#"{{"type":"direct","payload":{{"from":{from_json},"content":{content},"ts":{now}}}}}"#
    )
}

impl Hub {
    /// Turns on cluster mode (before any connection): requests that need the
    /// cluster go to Redis through `take_cluster_out`, answers come back
    /// through `cluster_event`.
    pub fn enable_cluster(&mut self, process: String, now: Millis) {
        self.cluster = Some(Box::new(ClusterState {
            process,
            command_link: false,
            subscriber_link: false,
            registered: false,
            registering: None,
            next_req: 0,
            next_generation: 0,
            pending: HashMap::new(),
            markers: HashMap::new(),
            held: HashMap::new(),
            replayed: HashMap::new(),
            out: Vec::new(),
            api_answers: Vec::new(),
            ticks: 0,
        }));
        self.timers.schedule(
            now.saturating_add(cluster::HEARTBEAT_MS),
            Timer::ClusterTick,
        );
    }

    /// Whether the hub runs with `--redis`.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// With `--redis`: whether Redis is reachable and this node registered.
    pub fn cluster_up(&self) -> Option<bool> {
        self.cluster.as_ref().map(|c| c.is_up())
    }

    /// What to send to Redis, in order.
    pub fn take_cluster_out(&mut self, into: &mut Vec<Outgoing>) {
        if let Some(cluster) = self.cluster.as_mut() {
            into.append(&mut cluster.out);
        }
    }

    /// Server API answers decided since the last call, by the shell's ticket.
    pub fn take_api_answers(&mut self, into: &mut Vec<(u64, ApiAnswer)>) {
        if let Some(cluster) = self.cluster.as_mut() {
            into.append(&mut cluster.api_answers);
        }
    }

    /// Graceful shutdown: the node stops counting in presence.
    pub fn cluster_shutdown(&mut self) {
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.out.push(Outgoing::Command(Command::Shutdown));
        }
    }

    /// `POST /api/publish` or `/api/disconnect` with `--redis`. `None`: the
    /// answer comes later through `take_api_answers` with `ticket`.
    pub fn cluster_api(
        &mut self,
        kind: ApiKind,
        body: &[u8],
        now: Millis,
        ticket: u64,
    ) -> Option<ApiAnswer> {
        let up = self.cluster.as_ref().is_some_and(|c| c.is_up());
        let (command, reply) = match kind {
            ApiKind::Publish => {
                let request = match protocol::parse_publish(body) {
                    Ok(request) => request,
                    Err(message) => return Some(ApiAnswer::BadRequest(message)),
                };
                let content = request.content.get();
                match request.target {
                    protocol::PublishTarget::Room(room) => {
                        if !is_valid_room_name(&room) {
                            return Some(ApiAnswer::BadRequest("invalid room name".into()));
                        }
                        if !up {
                            return Some(ApiAnswer::Unavailable);
                        }
                        let (head, tail) =
                            message_parts(&room, protocol::SERVER_USER_JSON, content, now);
                        let command = |req| Command::Publish {
                            req,
                            room: room.to_string(),
                            head,
                            tail,
                        };
                        (self.cluster_request(command), ApiReply::Room)
                    }
                    protocol::PublishTarget::User(user) => {
                        if !up {
                            return Some(ApiAnswer::Unavailable);
                        }
                        let text = direct_text(protocol::SERVER_USER_JSON, content, now);
                        let envelope = cluster::direct_envelope(&user, &text);
                        let command = |req| Command::SendUser {
                            req,
                            user_id: user.to_string(),
                            envelope,
                        };
                        (self.cluster_request(command), ApiReply::User)
                    }
                }
            }
            ApiKind::Disconnect => {
                let user = match protocol::parse_disconnect(body) {
                    Ok(user) => user,
                    Err(message) => return Some(ApiAnswer::BadRequest(message)),
                };
                if !up {
                    return Some(ApiAnswer::Unavailable);
                }
                let envelope = cluster::kick_envelope(&user);
                let command = |req| Command::SendUser {
                    req,
                    user_id: user.to_string(),
                    envelope,
                };
                (self.cluster_request(command), ApiReply::Disconnect)
            }
        };
        let req = command?;
        self.pending_insert(
            req,
            Pending::Api {
                ticket,
                kind: reply,
            },
        );
        None
    }

    /// Queues a command with a fresh request id; `None` without cluster mode.
    fn cluster_request(&mut self, command: impl FnOnce(ReqId) -> Command) -> Option<ReqId> {
        let cluster = self.cluster.as_mut()?;
        cluster.next_req += 1;
        let req = cluster.next_req;
        cluster.out.push(Outgoing::Command(command(req)));
        Some(req)
    }

    fn pending_insert(&mut self, req: ReqId, pending: Pending) {
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.pending.insert(req, pending);
        }
    }

    /// A fire-and-forget state update, sent while the node is (being) registered.
    fn cluster_update(&mut self, command: Command) {
        if let Some(cluster) = self.cluster.as_mut()
            && cluster.can_update()
        {
            cluster.out.push(Outgoing::Command(command));
        }
    }

    fn require_up(&self) -> Result<(), Refusal> {
        match &self.cluster {
            Some(cluster) if cluster.is_up() => Ok(()),
            _ => Err(unavailable()),
        }
    }

    fn serial_of(&self, conn: ConnId) -> u64 {
        self.session(conn).map_or(0, |s| s.serial)
    }

    /// A request from a client, with `--redis`.
    pub(super) fn cluster_dispatch(
        &mut self,
        conn: ConnId,
        request: Request<'_>,
        now: Millis,
    ) -> Result<(), Refusal> {
        let id = request.id;
        match request.body {
            RequestBody::Join { room, since, epoch } => {
                self.cluster_join(conn, id, &room, since, epoch.as_deref())
            }
            RequestBody::Leave { room } => {
                let room_id = self.member_room(conn, &room)?;
                self.remove_membership(conn, room_id, now);
                let frame = FrameBuilder::new("left", id).string("room", &room).finish();
                self.reply(conn, frame);
                Ok(())
            }
            RequestBody::Message { room, content } => {
                self.member_room(conn, &room)?;
                self.require_up()?;
                let user_json = self.user_json_of(conn);
                let (head, tail) = message_parts(&room, &user_json, content.get(), now);
                let req = self.cluster_request(|req| Command::Publish {
                    req,
                    room: room.to_string(),
                    head,
                    tail,
                });
                self.await_reply(conn, req, |serial| Pending::Message {
                    conn,
                    serial,
                    id: owned_id(id),
                });
                Ok(())
            }
            RequestBody::Direct { to, content } => {
                self.require_up()?;
                let user_json = self.user_json_of(conn);
                let text = direct_text(&user_json, content.get(), now);
                let envelope = cluster::direct_envelope(&to, &text);
                let req = self.cluster_request(|req| Command::SendUser {
                    req,
                    user_id: to.to_string(),
                    envelope,
                });
                self.await_reply(conn, req, |serial| Pending::Direct {
                    conn,
                    serial,
                    id: owned_id(id),
                    to: to.as_ref().into(),
                });
                Ok(())
            }
            RequestBody::Typing { room, is_typing } => {
                let room_id = self.member_room(conn, &room)?;
                // During an outage typing is dropped.
                if self.cluster.as_ref().is_some_and(|c| c.is_up()) {
                    self.set_typing(conn, room_id, is_typing, now);
                }
                Ok(())
            }
            RequestBody::Presence { room } => {
                self.check_room(conn, &room)?;
                self.require_up()?;
                let req = self.cluster_request(|req| Command::Presence {
                    req,
                    room: room.to_string(),
                });
                self.await_reply(conn, req, |serial| Pending::Presence {
                    conn,
                    serial,
                    id: owned_id(id),
                    room: room.as_ref().into(),
                });
                Ok(())
            }
            // Ping and refresh stay in `dispatch`; their replies still keep their place in line.
            RequestBody::Ping | RequestBody::Refresh { .. } => Ok(()),
        }
    }

    /// Records what an answer is for, and keeps its place in the connection's replies.
    fn await_reply(
        &mut self,
        conn: ConnId,
        req: Option<ReqId>,
        pending: impl FnOnce(u64) -> Pending,
    ) {
        let Some(req) = req else { return };
        let serial = self.serial_of(conn);
        self.pending_insert(req, pending(serial));
        if let Some(session) = self.session_mut(conn) {
            session.replies.push_back(Slot::Waiting(req));
        }
    }

    /// `join` with `--redis`: local membership now (its traffic waits in a
    /// cursor), room state and presence from the join script.
    pub(super) fn cluster_join(
        &mut self,
        conn: ConnId,
        id: Option<&RawValue>,
        room: &str,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<(), Refusal> {
        self.check_room(conn, room)?;
        self.require_up()?;
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
            None => self.create_room(room, 0),
        };
        if !already_member {
            self.add_membership(conn, room_id);
        }
        let Some(session) = self.session(conn) else {
            return Ok(());
        };
        let (serial, user_id, user_json) = (
            session.serial,
            session.user_id.to_string(),
            session.user_json.to_string(),
        );
        let Some(room_state) = self.rooms.get(room_id) else {
            return Ok(());
        };
        let local_count = room_state.users.get(user_id.as_str()).copied().unwrap_or(1);
        let (life, sub_generation) = (room_state.life, room_state.sub_generation);
        let process = self
            .cluster
            .as_ref()
            .map(|c| c.process.clone())
            .unwrap_or_default();
        let req = self.cluster_request(|req| Command::Join {
            req,
            room: room.to_string(),
            sub_generation,
            user_id,
            user_json,
            local_count,
            since,
            epoch: epoch.map(str::to_string),
            marker: cluster::marker_envelope(&process, req),
        });
        if let (Some(req), false) = (req, already_member)
            && let Some(cluster) = self.cluster.as_mut()
        {
            cluster.markers.insert(req, (conn, serial, room_id));
        }
        self.await_reply(conn, req, |serial| Pending::Join {
            conn,
            serial,
            id: owned_id(id),
            room: room_id,
            life,
            name: room.into(),
            since,
            epoch: epoch.map(str::to_string),
            first: !already_member,
        });
        Ok(())
    }

    /// A new room: subscribe to its channel (the join waits for that).
    pub(super) fn cluster_subscribe(&mut self, room_id: RoomId) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        cluster.next_generation += 1;
        room.sub_generation = cluster.next_generation;
        // Unknown until Redis answers the first join.
        room.epoch = Box::default();
        cluster
            .out
            .push(Outgoing::Subscription(Subscription::Subscribe {
                room: room.name.to_string(),
                generation: cluster.next_generation,
            }));
    }

    /// The last local member left: the room's state lives on in Redis only.
    pub(super) fn cluster_forget_room(&mut self, room_id: RoomId) {
        let Some(room) = self.rooms.try_remove(room_id) else {
            return;
        };
        self.room_ids.remove(&room.name);
        if let Some(cluster) = self.cluster.as_mut() {
            // The slab key may name another room next.
            cluster.held.remove(&room_id);
            cluster.replayed.remove(&room_id);
            cluster
                .out
                .push(Outgoing::Subscription(Subscription::Unsubscribe {
                    room: room.name.to_string(),
                }));
        }
    }

    /// A membership ended here: the end of typing, and this node's count for
    /// the user in the room (the script announces `user_left` when the user
    /// is gone from every node).
    pub(super) fn cluster_left(
        &mut self,
        room_id: RoomId,
        user_id: &str,
        user_json: &str,
        local_count: u32,
        was_typing: bool,
    ) {
        let Some(room) = self.rooms.get(room_id) else {
            return;
        };
        let name = room.name.to_string();
        if was_typing {
            let frame = super::typing_frame(&name, user_json, false);
            self.room_broadcast(room_id, &frame, Except::User(user_id));
        }
        self.cluster_update(Command::Member {
            room: name,
            user_id: user_id.to_string(),
            user_json: user_json.to_string(),
            local_count,
        });
    }

    /// This node's connection count for a user changed.
    pub(super) fn cluster_user_count(&mut self, user_id: &str) {
        if self.cluster.is_none() {
            return;
        }
        let count = self.users.get(user_id).map_or(0, |conns| conns.len());
        self.cluster_update(Command::UserCount {
            user_id: user_id.to_string(),
            count: u32::try_from(count).unwrap_or(u32::MAX),
        });
    }

    /// A room-wide frame: through Redis with `--redis`, else straight to the members.
    pub(super) fn room_broadcast(&mut self, room_id: RoomId, frame: &Bytes, except: Except<'_>) {
        if self.cluster.is_none() {
            self.broadcast(room_id, frame, except);
            return;
        }
        let (Some(room), Some(text)) =
            (self.rooms.get(room_id), protocol::text_frame_payload(frame))
        else {
            return;
        };
        let except = match except {
            Except::User(user) => Some(user),
            Except::Nobody | Except::Connection(_) => None,
        };
        let command = Command::RoomEvent {
            room: room.name.to_string(),
            envelope: cluster::event_envelope(except, text),
        };
        if let Some(cluster) = self.cluster.as_mut()
            && cluster.is_up()
        {
            cluster.out.push(Outgoing::Command(command));
        }
    }

    /// Once a second: register when the links are up, refresh TTLs every minute.
    pub(super) fn cluster_tick(&mut self, now: Millis) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        cluster.ticks += 1;
        let refresh = cluster.ticks.is_multiple_of(REFRESH_EVERY_TICKS) && cluster.is_up();
        self.timers.schedule(
            now.saturating_add(cluster::HEARTBEAT_MS),
            Timer::ClusterTick,
        );
        self.maybe_register();
        if refresh {
            let rooms = self
                .rooms
                .iter()
                .filter(|(_, room)| !room.members.is_empty())
                .map(|(_, room)| room.name.to_string())
                .collect();
            let users = self.users.keys().map(|user| user.to_string()).collect();
            self.cluster_update(Command::Refresh { rooms, users });
        }
    }

    /// With both links up and no registration: register everything this node holds.
    fn maybe_register(&mut self) {
        let due = self.cluster.as_ref().is_some_and(|c| {
            c.command_link && c.subscriber_link && !c.registered && c.registering.is_none()
        });
        if !due {
            return;
        }
        let mut rooms = Vec::new();
        let mut ids = Vec::new();
        for (room_id, room) in &self.rooms {
            if room.members.is_empty() {
                continue;
            }
            let users = room
                .users
                .iter()
                .filter_map(|(user_id, &count)| {
                    let user_json = self
                        .users
                        .get(user_id)
                        .and_then(|conns| conns.first())
                        .and_then(|&conn| self.session(conn))
                        .map(|session| session.user_json.to_string())?;
                    Some((user_id.to_string(), count, user_json))
                })
                .collect();
            rooms.push(RoomMembers {
                room: room.name.to_string(),
                users,
                epoch: room.epoch.to_string(),
                since: room.seen_seq,
            });
            ids.push(Snapshot {
                room: room_id,
                life: room.life,
                epoch: room.epoch.clone(),
                since: room.seen_seq,
            });
        }
        let users = self
            .users
            .iter()
            .map(|(user_id, conns)| {
                (
                    user_id.to_string(),
                    u32::try_from(conns.len()).unwrap_or(u32::MAX),
                )
            })
            .collect();
        let req = self.cluster_request(|req| Command::Register { req, rooms, users });
        if let Some(req) = req {
            self.pending_insert(req, Pending::Register { rooms: ids });
            if let Some(cluster) = self.cluster.as_mut() {
                cluster.registering = Some(req);
                cluster.held.clear();
            }
        }
    }

    /// Something from the bridge threads.
    pub fn cluster_event(&mut self, event: Event, now: Millis) {
        if self.cluster.is_none() {
            return;
        }
        match event {
            Event::CommandLink(up) => self.link_changed(Some(up), None),
            Event::SubscriberLink(up) => self.link_changed(None, Some(up)),
            Event::Reply { req, result } => self.on_reply(req, result),
            Event::Room { room, item } => self.on_room_item(&room, item),
            Event::User { user_id, item } => self.on_user_item(&user_id, item, now),
            Event::Stopped => {}
        }
        self.settle(now);
    }

    fn link_changed(&mut self, command: Option<bool>, subscriber: Option<bool>) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let was_up = cluster.is_up();
        if let Some(up) = command {
            cluster.command_link = up;
        }
        if let Some(up) = subscriber {
            cluster.subscriber_link = up;
        }
        if command == Some(false) || subscriber == Some(false) {
            cluster.registered = false;
            // A registration under way is void without its command link, and
            // without the subscriber too: what the channels carried in the gap
            // would be in neither its answer nor the stream. The next one,
            // once both are up, covers it.
            cluster.registering = None;
            cluster.held.clear();
            cluster.replayed.clear();
        }
        if was_up && !cluster.is_up() {
            warn!("redis unavailable: refusing cluster requests until it is back");
        }
        if subscriber == Some(false) {
            // The room streams restart: whatever comes next is after every join.
            cluster.markers.clear();
            self.release_cursors();
        }
        self.maybe_register();
    }

    /// Every joining connection: its marker counts as seen.
    fn release_cursors(&mut self) {
        let joining: Vec<(ConnId, RoomId)> = self
            .rooms
            .iter()
            .filter(|(_, room)| room.joining > 0)
            .flat_map(|(room_id, room)| room.members.iter().map(move |&conn| (conn, room_id)))
            .collect();
        for (conn, room_id) in joining {
            self.marker_seen(conn, room_id);
        }
    }

    fn cursor_mut(&mut self, conn: ConnId, room_id: RoomId) -> Option<&mut JoinCursor> {
        self.session_mut(conn)?
            .memberships
            .iter_mut()
            .find(|m| m.room == room_id)?
            .cursor
            .as_deref_mut()
    }

    fn marker_seen(&mut self, conn: ConnId, room_id: RoomId) {
        let Some(cursor) = self.cursor_mut(conn, room_id) else {
            return;
        };
        cursor.marker = true;
        if cursor.replied {
            self.cursor_done(conn, room_id);
        }
    }

    /// The connection's `joined` went into its queue.
    fn joined_queued(&mut self, conn: ConnId, room_id: RoomId) {
        let Some(cursor) = self.cursor_mut(conn, room_id) else {
            return;
        };
        cursor.replied = true;
        if cursor.marker {
            self.cursor_done(conn, room_id);
        }
    }

    /// Room traffic flows to the connection from now on, starting with what waited.
    fn cursor_done(&mut self, conn: ConnId, room_id: RoomId) {
        let Some(membership) = self
            .session_mut(conn)
            .and_then(|s| s.memberships.iter_mut().find(|m| m.room == room_id))
        else {
            return;
        };
        let Some(cursor) = membership.cursor.take() else {
            return;
        };
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.joining = room.joining.saturating_sub(1);
        }
        for item in cursor.buffer {
            self.deliver_room_frame(conn, room_id, item.seq, item.frame);
        }
    }

    /// Queues one room frame to a member, remembering a dropped message for `lagged`.
    fn deliver_room_frame(
        &mut self,
        conn: ConnId,
        room_id: RoomId,
        seq: Option<u64>,
        frame: Bytes,
    ) {
        let marks = self.config.marks;
        let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut) else {
            return;
        };
        let mut sinks = (&mut self.dirty, &mut self.evicted, &mut self.metrics);
        deliver_room(conn, session, room_id, seq, frame, marks, &mut sinks);
    }

    fn on_room_item(&mut self, name: &str, item: RoomItem) {
        let Some(&room_id) = self.room_ids.get(name) else {
            return;
        };
        let (seq, except, frame) = match item {
            RoomItem::Marker { req } => {
                let target = self.cluster.as_mut().and_then(|c| c.markers.remove(&req));
                if let Some((conn, serial, marked_room)) = target
                    && marked_room == room_id
                    && self.serial_of(conn) == serial
                {
                    self.marker_seen(conn, room_id);
                }
                return;
            }
            RoomItem::Message { seq, frame } => (Some(seq), None, frame),
            RoomItem::Event { except, frame } => (None, except, frame),
        };
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if !cluster.registered {
            // Until this node is registered again after an outage, room
            // traffic is not delivered: messages from before the
            // registration's snapshot come with its answer, from the history;
            // those after it wait here for that answer.
            if let (Some(seq), Some(_)) = (seq, cluster.registering) {
                cluster.hold(room_id, seq, frame);
            }
            return;
        }
        if let Some(seq) = seq
            && let Some(&replayed) = cluster.replayed.get(&room_id)
        {
            if seq <= replayed {
                return;
            }
            // The stream is in seq order: nothing replayed comes after this.
            cluster.replayed.remove(&room_id);
        }
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if let Some(seq) = seq {
            room.seen_seq = room.seen_seq.max(seq);
        }
        let room = &*room;
        let joining = room.joining > 0;
        let marks = self.config.marks;
        let mut sinks = (&mut self.dirty, &mut self.evicted, &mut self.metrics);
        for &member in &room.members {
            let Some(session) = self.sessions.get_mut(member).and_then(Option::as_mut) else {
                continue;
            };
            if except
                .as_deref()
                .is_some_and(|user| *session.user_id == *user)
            {
                continue;
            }
            if joining
                && let Some(cursor) = session
                    .memberships
                    .iter_mut()
                    .find(|m| m.room == room_id)
                    .and_then(|m| m.cursor.as_deref_mut())
            {
                // Before the marker: from before this join. After it: wait for `joined`.
                if cursor.marker && cursor.buffer.len() < MAX_BUFFERED {
                    cursor.buffer.push(Buffered {
                        seq,
                        frame: frame.clone(),
                    });
                }
                continue;
            }
            deliver_room(
                member,
                session,
                room_id,
                seq,
                frame.clone(),
                marks,
                &mut sinks,
            );
        }
    }

    fn on_user_item(&mut self, user_id: &str, item: UserItem, now: Millis) {
        let Some(conns) = self.users.get(user_id).cloned() else {
            return;
        };
        match item {
            UserItem::Direct(frame) => {
                for conn in conns {
                    self.deliver(conn, frame.clone(), false);
                }
            }
            UserItem::Kick => {
                for conn in conns {
                    self.close(conn, 4003, "disconnected by the server", now);
                }
            }
        }
    }

    fn on_reply(&mut self, req: ReqId, result: Result<Reply, ()>) {
        let Some(pending) = self.cluster.as_mut().and_then(|c| c.pending.remove(&req)) else {
            return;
        };
        match pending {
            Pending::Join {
                conn,
                serial,
                id,
                room,
                life,
                name,
                since,
                epoch,
                first,
            } => {
                let alive = self.serial_of(conn) == serial;
                match result {
                    Ok(Reply::Joined {
                        state,
                        history_len,
                        frames,
                    }) => {
                        if let Some(room_state) = self.rooms.get_mut(room)
                            && room_state.life == life
                        {
                            room_state.epoch = state.epoch.as_str().into();
                            room_state.seen_seq = room_state.seen_seq.max(state.seq);
                        }
                        if alive {
                            let joined = joined_frames(
                                id.as_deref(),
                                &name,
                                &state,
                                history_len,
                                frames,
                                since,
                                epoch.as_deref(),
                            );
                            let room =
                                (first && self.cursor_mut(conn, room).is_some()).then_some(room);
                            self.fill(conn, req, Slot::Done(joined, room));
                        }
                    }
                    _ => {
                        // The script did not run: no marker will come.
                        if let Some(cluster) = self.cluster.as_mut() {
                            cluster.markers.remove(&req);
                        }
                        if !alive {
                            return;
                        }
                        // Undo a first join that did not take effect.
                        let member = first
                            && self.rooms.get(room).is_some_and(|r| r.life == life)
                            && self.cursor_mut(conn, room).is_some();
                        if member {
                            self.remove_membership(conn, room, 0);
                        }
                        let frame = error_frame(
                            id.as_deref(),
                            ErrorCode::Unavailable,
                            &unavailable().message,
                        );
                        self.fill(conn, req, Slot::Done(vec![frame], None));
                    }
                }
            }
            Pending::Message { conn, serial, id } => {
                if self.serial_of(conn) != serial {
                    return;
                }
                let frames = match result {
                    Ok(Reply::Published { seq, .. }) => match id {
                        Some(id) => vec![
                            FrameBuilder::new("ack", Some(&id))
                                .number("seq", seq)
                                .finish(),
                        ],
                        None => Vec::new(),
                    },
                    _ => vec![unavailable_frame(id.as_deref())],
                };
                self.fill(conn, req, Slot::Done(frames, None));
            }
            Pending::Direct {
                conn,
                serial,
                id,
                to,
            } => {
                if self.serial_of(conn) != serial {
                    return;
                }
                let frames = match result {
                    Ok(Reply::Sent { connections: 0 }) => vec![error_frame(
                        id.as_deref(),
                        ErrorCode::UserOffline,
                        &format!("{} has no open connection", super::truncated(&to)),
                    )],
                    Ok(Reply::Sent { .. }) => match id {
                        Some(id) => vec![FrameBuilder::new("ack", Some(&id)).finish()],
                        None => Vec::new(),
                    },
                    _ => vec![unavailable_frame(id.as_deref())],
                };
                self.fill(conn, req, Slot::Done(frames, None));
            }
            Pending::Presence {
                conn,
                serial,
                id,
                room,
            } => {
                if self.serial_of(conn) != serial {
                    return;
                }
                let frame = match result {
                    Ok(Reply::Presence { entries }) => {
                        presence_frame(id.as_deref(), &room, entries)
                    }
                    _ => unavailable_frame(id.as_deref()),
                };
                self.fill(conn, req, Slot::Done(vec![frame], None));
            }
            Pending::Api { ticket, kind } => {
                let answer = match (kind, result) {
                    (ApiReply::Room, Ok(Reply::Published { seq, delivered })) => {
                        ApiAnswer::Ok(format!(r#"{{"delivered":{delivered},"seq":{seq}}}"#))
                    }
                    (ApiReply::User, Ok(Reply::Sent { connections })) => {
                        ApiAnswer::Ok(format!(r#"{{"delivered":{connections}}}"#))
                    }
                    (ApiReply::Disconnect, Ok(Reply::Sent { connections })) => {
                        ApiAnswer::Ok(format!(r#"{{"closed":{connections}}}"#))
                    }
                    _ => ApiAnswer::Unavailable,
                };
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.api_answers.push((ticket, answer));
                }
            }
            Pending::Register { rooms } => self.on_registered(req, &rooms, result),
        }
    }

    fn on_registered(&mut self, req: ReqId, rooms: &[Snapshot], result: Result<Reply, ()>) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster.registering != Some(req) {
            return;
        }
        cluster.registering = None;
        let mut held = std::mem::take(&mut cluster.held);
        let Ok(Reply::Registered { rooms: answers }) = result else {
            return;
        };
        cluster.registered = cluster.command_link && cluster.subscriber_link;
        if !cluster.registered {
            // A link dropped meanwhile: the next registration starts from what
            // the members saw, which this one leaves as it was.
            return;
        }
        info!("redis available: this node is registered");
        for (snapshot, answer) in rooms.iter().zip(answers) {
            let held = held.remove(&snapshot.room).unwrap_or_default();
            self.room_registered(snapshot, answer, held);
        }
    }

    /// Brings a room's members from what they saw before the outage to the
    /// live stream: a `joined` when the epoch is new, the messages they did
    /// not see (from the history, `lagged` for what it no longer holds),
    /// then those that came while the registration waited.
    fn room_registered(&mut self, snapshot: &Snapshot, answer: RegisteredRoom, held: Held) {
        let RegisteredRoom { state, frames } = answer;
        let Some(room) = self.rooms.get_mut(snapshot.room) else {
            return;
        };
        if room.life != snapshot.life {
            return;
        }
        let room_id = snapshot.room;
        let known = !snapshot.epoch.is_empty();
        let changed = known && *snapshot.epoch != *state.epoch;
        room.epoch = state.epoch.as_str().into();
        let last = held
            .messages
            .last()
            .map(|&(seq, _)| seq)
            .into_iter()
            .chain(held.overflow.map(|(_, to)| to))
            .fold(state.seq, u64::max);
        room.seen_seq = last;
        let name = room.name.clone();
        let members = self.flowing_members(room_id);
        // Everything of a new epoch; after what they saw of the same one.
        let from = if changed {
            1
        } else {
            snapshot.since.saturating_add(1)
        };
        // The history ends at `state.seq`: the replay is its part from `from`
        // on, or less when the oldest of those fell out of it.
        let wanted = state.seq.saturating_sub(from.saturating_sub(1));
        let wanted = usize::try_from(wanted).unwrap_or(usize::MAX);
        let replay = frames
            .get(frames.len().saturating_sub(wanted)..)
            .unwrap_or_default();
        let first = state
            .seq
            .saturating_add(1)
            .saturating_sub(replay.len() as u64);
        if changed {
            // Redis came back without the room: its members learn the new
            // epoch before any of its messages, the way a `join` with
            // `since: 0` would tell them, so that `seq - missed` is where the
            // messages that follow start (0: every one of the new epoch).
            let frame = FrameBuilder::new("joined", None)
                .string("room", &name)
                .number("count", state.count)
                .number("seq", state.seq)
                .string("epoch", &state.epoch)
                .boolean("recovered", first == from)
                .number("missed", replay.len() as u64)
                .finish();
            for &member in &members {
                self.deliver(member, frame.clone(), false);
            }
        }
        // A node that never learnt the room's epoch has only joining members,
        // whose own `joined` tells them where they start.
        if known {
            if from < first {
                // Published while this node was cut off and gone from the
                // history: its members learn the range as a slow consumer would.
                let frame = lagged_frame(&name, from, first - 1);
                for &member in &members {
                    self.deliver(member, frame.clone(), false);
                }
            }
            for (seq, text) in (first..).zip(replay) {
                let frame = protocol::text_frame(text);
                for &member in &members {
                    self.deliver_room_frame(member, room_id, Some(seq), frame.clone());
                }
            }
        }
        // Came after the snapshot: after the replay, each once.
        for (seq, frame) in held.messages {
            if seq <= state.seq {
                continue;
            }
            for &member in &members {
                self.deliver_room_frame(member, room_id, Some(seq), frame.clone());
            }
        }
        if let Some((from, to)) = held.overflow {
            let from = from.max(state.seq.saturating_add(1));
            if from <= to {
                let frame = lagged_frame(&name, from, to);
                for &member in &members {
                    self.deliver(member, frame.clone(), false);
                }
            }
        }
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.replayed.insert(room_id, last);
        }
    }

    /// The room's members that room traffic flows to: a joining one gets
    /// the room's state from its own `joined`.
    fn flowing_members(&self, room_id: RoomId) -> Vec<ConnId> {
        let Some(room) = self.rooms.get(room_id) else {
            return Vec::new();
        };
        room.members
            .iter()
            .copied()
            .filter(|&conn| {
                self.session(conn).is_some_and(|s| {
                    s.memberships
                        .iter()
                        .any(|m| m.room == room_id && m.cursor.is_none())
                })
            })
            .collect()
    }

    /// Puts an answer in its place and sends what is ready in order.
    fn fill(&mut self, conn: ConnId, req: ReqId, done: Slot) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        if let Some(slot) = session
            .replies
            .iter_mut()
            .find(|slot| matches!(slot, Slot::Waiting(r) if *r == req))
        {
            *slot = done;
        }
        self.flush_replies(conn);
    }

    fn flush_replies(&mut self, conn: ConnId) {
        loop {
            let Some(session) = self.session_mut(conn) else {
                return;
            };
            if matches!(session.replies.front(), None | Some(Slot::Waiting(_))) {
                return;
            }
            match session.replies.pop_front() {
                Some(Slot::Ready(frame)) => {
                    self.deliver(conn, frame, false);
                }
                Some(Slot::Done(frames, room)) => {
                    for frame in frames {
                        self.deliver(conn, frame, false);
                    }
                    if let Some(room_id) = room {
                        self.joined_queued(conn, room_id);
                    }
                }
                Some(Slot::Waiting(_)) | None => return,
            }
        }
    }

    /// With `--redis`: that every joining membership is counted in its room.
    pub(super) fn check_cluster_invariants(&self) -> Result<(), String> {
        for (room_id, room) in &self.rooms {
            let joining = room
                .members
                .iter()
                .filter(|&&conn| {
                    self.session(conn).is_some_and(|s| {
                        s.memberships
                            .iter()
                            .any(|m| m.room == room_id && m.cursor.is_some())
                    })
                })
                .count();
            if joining != room.joining {
                return Err(format!(
                    "room {}: {} joining members counted, {joining} found",
                    room.name, room.joining
                ));
            }
        }
        Ok(())
    }
}

impl ClusterState {
    /// Keeps a room message for the registration's answer; past the bound,
    /// only its seq, for a `lagged`.
    fn hold(&mut self, room_id: RoomId, seq: u64, frame: Bytes) {
        let held = self.held.entry(room_id).or_default();
        if held.overflow.is_none() && held.messages.len() < MAX_BUFFERED {
            held.messages.push((seq, frame));
        } else {
            let from = held.overflow.map_or(seq, |(from, _)| from);
            held.overflow = Some((from, seq));
        }
    }

    fn is_up(&self) -> bool {
        self.command_link && self.subscriber_link && self.registered
    }

    /// State updates go out while the node is registered or registering
    /// (the registration snapshot covers what happened before).
    fn can_update(&self) -> bool {
        self.command_link && (self.registered || self.registering.is_some())
    }
}

/// Where delivery records what it did: dirty connections, evictions, counters.
type Sinks<'a> = (
    &'a mut Vec<ConnId>,
    &'a mut Vec<ConnId>,
    &'a mut crate::metrics::Metrics,
);

/// Queues one room frame to a member (droppable above the soft mark); a
/// dropped message is remembered for `lagged`.
fn deliver_room(
    conn: ConnId,
    session: &mut super::Session,
    room_id: RoomId,
    seq: Option<u64>,
    frame: Bytes,
    marks: crate::outbound::Marks,
    sinks: &mut Sinks<'_>,
) {
    let queued = deliver_to(conn, session, frame, true, marks, sinks.0, sinks.1, sinks.2);
    if !queued
        && let Some(seq) = seq
        && !session.closing
    {
        match session.lagged.iter_mut().find(|span| span.room == room_id) {
            Some(span) => span.to_seq = seq,
            None => session.lagged.push(super::LaggedSpan {
                room: room_id,
                from_seq: seq,
                to_seq: seq,
            }),
        }
    }
}

fn lagged_frame(room: &str, from_seq: u64, to_seq: u64) -> Bytes {
    FrameBuilder::new("lagged", None)
        .string("room", room)
        .number("from_seq", from_seq)
        .number("to_seq", to_seq)
        .finish()
}

fn unavailable_frame(id: Option<&RawValue>) -> Bytes {
    error_frame(id, ErrorCode::Unavailable, &unavailable().message)
}

/// `joined` and the replay, as for a local join (§5 recovery rules).
fn joined_frames(
    id: Option<&RawValue>,
    room: &str,
    state: &RoomState,
    history_len: u64,
    history: Vec<String>,
    since: Option<u64>,
    client_epoch: Option<&str>,
) -> Vec<Bytes> {
    let mut frame = FrameBuilder::new("joined", id)
        .string("room", room)
        .number("count", state.count)
        .number("seq", state.seq)
        .string("epoch", &state.epoch);
    let mut replay = Vec::new();
    if let Some(since) = since {
        let same_epoch = client_epoch.is_none_or(|epoch| epoch == state.epoch);
        let recovered = if !same_epoch || since > state.seq {
            false
        } else {
            replay = history;
            // The history is contiguous and ends at `seq`.
            let oldest = state.seq + 1 - history_len.min(state.seq);
            since == state.seq || (history_len > 0 && oldest <= since.saturating_add(1))
        };
        frame = frame
            .boolean("recovered", recovered)
            .number("missed", replay.len() as u64);
    }
    let mut frames = Vec::with_capacity(1 + replay.len());
    frames.push(frame.finish());
    frames.extend(replay.iter().map(|text| protocol::text_frame(text)));
    frames
}

/// `presence` from the entries of every live node, one per user.
fn presence_frame(id: Option<&RawValue>, room: &str, entries: Vec<(String, u64, String)>) -> Bytes {
    let mut users: Vec<(String, u64, String)> = Vec::new();
    let mut positions: HashMap<String, usize> = HashMap::new();
    for (user_id, connections, user_json) in entries {
        match positions.get(&user_id) {
            Some(&position) => {
                if let Some(entry) = users.get_mut(position) {
                    entry.1 += connections;
                }
            }
            None => {
                positions.insert(user_id.clone(), users.len());
                users.push((user_id, connections, user_json));
            }
        }
    }
    let mut list = String::from("[");
    for (index, (_, connections, user_json)) in users.iter().enumerate() {
        if index > 0 {
            list.push(',');
        }
        // `{"id":…,"name":…}` with the count added before the closing brace.
        let open = user_json.strip_suffix('}').unwrap_or(user_json);
        list.push_str(open);
        list.push_str(&format!(r#","connections":{connections}}}"#));
    }
    list.push(']');
    FrameBuilder::new("presence", id)
        .string("room", room)
        .raw("users", &list)
        .finish()
}

#[cfg(test)]
#[path = "hub_cluster_tests.rs"]
mod tests;
