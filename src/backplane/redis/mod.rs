//! Rooms span every node on one Redis (`--redis`, PROTOCOL §10).
//!
//! Still sans-IO: what the node needs from Redis leaves as [`Outgoing`]
//! values (taken by the loop and handed to the [`bridge`] threads), and what
//! Redis answers or publishes comes back as [`Event`]s, which this turns
//! into the hub's [`Effect`]s. What is cluster-wide (seq, epoch, history,
//! presence, counts, `direct`, kicks) is decided by the Lua scripts of
//! [`commands`], run atomically in Redis.
//!
//! Four rules keep every node's view exact:
//!
//! - **One order per room.** Every frame for a room's members (messages with
//!   their seq, `typing`, `user_joined`, `user_left`) is published on the
//!   room's channel, and every node delivers from there, the sender's own
//!   node included. Nothing room-wide is delivered locally first.
//! - **Join markers.** A join's script publishes a marker on the room's
//!   channel right after it took effect ([`Effect::JoinMarked`]). Until
//!   the connection's marker comes by, room traffic is from before its join;
//!   after it and before its `joined`, traffic waits in the hub's cursor.
//! - **Replies in request order.** Answers come later ([`Reply::Later`]);
//!   the hub keeps each in its place among the connection's replies.
//! - **Resume after an outage.** The node registers again, and the answer
//!   brings each room's epoch, seq and the history its members did not see
//!   (all of a new epoch when Redis came back empty, however late this node
//!   came back; `lagged` for what the history no longer holds). Messages that
//!   arrive while the answer is awaited wait for it; those the replay already
//!   gave are not given again.

pub mod bridge;
pub mod commands;

#[cfg(test)]
mod tests;

use std::any::Any;
use std::collections::HashMap;

use bytes::Bytes;
use log::{info, warn};

use self::commands::{
    Command, Event, HEARTBEAT_MS, Outgoing, REFRESH_EVERY_TICKS, RegisteredRoom, Reply as Answered,
    RoomItem, RoomMembers, Subscription,
};
use super::{
    Answer, Backplane, Effect, JoinRequest, JoinState, LocalView, NewEpoch, PresenceEntry,
    Publication, Published, Remaining, Reply, RequestId, Resume, Retention, RoomRef, RoomTraffic,
    UserItem, UserRef,
};
use crate::hub::Millis;
use crate::protocol;

/// Messages kept for one room while a registration waits for its answer.
const MAX_HELD: usize = 4096;

/// What this node knows of a room it serves.
struct RoomHere {
    /// Tells this life of the room from a later one under the same name.
    life: u64,
    /// The request that subscribed this node to the room's channel (0: not
    /// subscribed); a join waits until that subscription is in place.
    subscription: u64,
    /// The epoch the node knows; empty until a join or registration told it.
    epoch: Box<str>,
    /// The highest seq of `epoch` this node has seen.
    seen_seq: u64,
    /// While a registration waits for its answer: messages that came meanwhile.
    held: Held,
    /// After a registration: the seq its replay ended at. The stream may still
    /// bring messages up to it (published before the snapshot, read after the
    /// answer); they went out with the replay already.
    replayed: Option<u64>,
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

/// A room as a registration's snapshot named it, with what the node had
/// seen of it: the answer carries the history after that.
struct Snapshot {
    room: Box<str>,
    life: u64,
    /// The epoch the node knew; empty when it never learnt one.
    epoch: Box<str>,
    /// The last seq of `epoch` the node saw.
    since: u64,
}

/// What a command's answer is for.
enum Pending {
    Join {
        room: Box<str>,
        life: u64,
    },
    Publish,
    Presence,
    Send,
    Register {
        rooms: Vec<Snapshot>,
    },
    /// `/api/rooms…` (§14.3).
    Inspect,
}

/// The Redis backplane of one node.
pub struct RedisBackplane {
    /// This process's id: its join markers and wake channel.
    process: String,
    command_link: bool,
    subscriber_link: bool,
    /// Registered on the current links: client requests may go to Redis.
    registered: bool,
    /// A registration is on its way.
    registering: Option<RequestId>,
    /// The links came up: register at the next tick.
    register_due: bool,
    next_request: RequestId,
    next_generation: u64,
    next_life: u64,
    pending: HashMap<RequestId, Pending>,
    rooms: HashMap<Box<str>, RoomHere>,
    out: Vec<Outgoing>,
    effects: Vec<Effect>,
    ticks: u64,
    /// When the next once-a-second tick is due.
    next_heartbeat: Millis,
    /// When a registration became due (the links came up).
    register_at: Millis,
}

impl RedisBackplane {
    /// A node with process id `process`, not yet connected.
    pub fn new(process: String, now: Millis) -> Self {
        RedisBackplane {
            process,
            command_link: false,
            subscriber_link: false,
            registered: false,
            registering: None,
            register_due: false,
            next_request: 0,
            next_generation: 0,
            next_life: 0,
            pending: HashMap::new(),
            rooms: HashMap::new(),
            out: Vec::new(),
            effects: Vec::new(),
            ticks: 0,
            next_heartbeat: now.saturating_add(HEARTBEAT_MS),
            register_at: now,
        }
    }

    /// What to send to Redis, in order.
    pub fn take_outgoing(&mut self, into: &mut Vec<Outgoing>) {
        into.append(&mut self.out);
    }

    /// Something from the bridge threads. Call [`crate::hub::Hub::backplane_changed`] after.
    pub fn on_event(&mut self, event: Event, now: Millis) {
        match event {
            Event::CommandLink(up) => self.link_changed(Some(up), None, now),
            Event::SubscriberLink(up) => self.link_changed(None, Some(up), now),
            Event::Reply { req, result } => self.on_reply(req, result),
            Event::Room { room, item } => self.on_room_item(&room, item),
            Event::User { user_id, item } => self.effects.push(Effect::User {
                user: user_id.into_boxed_str(),
                item,
            }),
            Event::Stopped => {}
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

    /// Queues a command with a fresh request id.
    fn request(
        &mut self,
        command: impl FnOnce(RequestId) -> Command,
        pending: Pending,
    ) -> RequestId {
        self.next_request += 1;
        let request = self.next_request;
        self.out.push(Outgoing::Command(command(request)));
        self.pending.insert(request, pending);
        request
    }

    /// A fire-and-forget state update.
    fn update(&mut self, command: Command) {
        if self.can_update() {
            self.out.push(Outgoing::Command(command));
        }
    }

    fn link_changed(&mut self, command: Option<bool>, subscriber: Option<bool>, now: Millis) {
        let was_up = self.is_up();
        if let Some(up) = command {
            self.command_link = up;
        }
        if let Some(up) = subscriber {
            self.subscriber_link = up;
        }
        if command == Some(false) || subscriber == Some(false) {
            self.registered = false;
            // A registration under way is void without its command link, and
            // without the subscriber too: what the channels carried in the gap
            // would be in neither its answer nor the stream. The next one,
            // once both are up, covers it.
            self.registering = None;
            for room in self.rooms.values_mut() {
                room.held = Held::default();
                room.replayed = None;
            }
        }
        if was_up && !self.is_up() {
            warn!("redis unavailable: refusing cluster requests until it is back");
        }
        if subscriber == Some(false) {
            // The room streams restart: whatever comes next is after every join.
            self.effects.push(Effect::StreamsRestarted);
        }
        if self.command_link && self.subscriber_link && !self.registered {
            // Registering needs the hub's rooms: at the next tick, right away.
            self.register_due = true;
            self.register_at = now;
        }
    }

    /// With both links up and no registration: register everything this node holds.
    fn maybe_register(&mut self, view: &dyn LocalView) {
        let due = self.command_link
            && self.subscriber_link
            && !self.registered
            && self.registering.is_none();
        if !due {
            return;
        }
        let mut members = Vec::new();
        let mut snapshots = Vec::new();
        for (name, users) in view.occupied_rooms() {
            let Some(room) = self.rooms.get(name.as_str()) else {
                continue;
            };
            members.push(RoomMembers {
                room: name.clone(),
                users,
                epoch: room.epoch.to_string(),
                since: room.seen_seq,
            });
            snapshots.push(Snapshot {
                room: name.into_boxed_str(),
                life: room.life,
                epoch: room.epoch.clone(),
                since: room.seen_seq,
            });
        }
        let users = view.users();
        for room in self.rooms.values_mut() {
            room.held = Held::default();
        }
        let request = self.request(
            |req| Command::Register {
                req,
                rooms: members,
                users,
            },
            Pending::Register { rooms: snapshots },
        );
        self.registering = Some(request);
    }

    fn on_room_item(&mut self, name: &str, item: RoomItem) {
        let (seq, except, frame) = match item {
            RoomItem::Marker { req } => {
                self.effects.push(Effect::JoinMarked(req));
                return;
            }
            RoomItem::Message { seq, frame } => (Some(seq), None, frame),
            RoomItem::Event { except, frame } => (None, except, frame),
        };
        let (registered, registering) = (self.registered, self.registering.is_some());
        let Some(room) = self.rooms.get_mut(name) else {
            return;
        };
        if !registered {
            // Until this node is registered again after an outage, room
            // traffic is not delivered: messages from before the
            // registration's snapshot come with its answer, from the history;
            // those after it wait here for that answer.
            if let (Some(seq), true) = (seq, registering) {
                room.held.hold(seq, frame);
            }
            return;
        }
        if let Some(seq) = seq {
            if let Some(replayed) = room.replayed {
                if seq <= replayed {
                    return;
                }
                // The stream is in seq order: nothing replayed comes after this.
                room.replayed = None;
            }
            room.seen_seq = room.seen_seq.max(seq);
        }
        self.effects.push(Effect::Traffic(RoomTraffic {
            room: name.into(),
            seq,
            except: except.map(String::into_boxed_str),
            frame,
        }));
    }

    fn on_reply(&mut self, request: RequestId, result: Result<Answered, ()>) {
        let Some(pending) = self.pending.remove(&request) else {
            return;
        };
        let answer = match (pending, result) {
            (Pending::Register { rooms }, result) => {
                self.on_registered(request, &rooms, result);
                return;
            }
            (
                Pending::Join { room, life },
                Ok(Answered::Joined {
                    state,
                    history_len,
                    frames,
                }),
            ) => {
                if let Some(here) = self.rooms.get_mut(&room)
                    && here.life == life
                {
                    here.epoch = state.epoch.as_str().into();
                    here.seen_seq = here.seen_seq.max(state.seq);
                }
                // The history is contiguous and ends at `seq`.
                let oldest_held =
                    (history_len > 0).then(|| state.seq + 1 - history_len.min(state.seq));
                Some(Answer::Joined(JoinState {
                    count: state.count,
                    seq: state.seq,
                    epoch: state.epoch.into_boxed_str(),
                    oldest_held,
                    replay: frames
                        .iter()
                        .map(|text| protocol::text_frame(text))
                        .collect(),
                    announce: None,
                    full: false,
                }))
            }
            (Pending::Join { .. }, Ok(Answered::RoomFull { count })) => {
                Some(Answer::Joined(JoinState::full(count)))
            }
            (Pending::Publish, Ok(Answered::Published { seq, delivered })) => {
                Some(Answer::Published { seq, delivered })
            }
            (Pending::Presence, Ok(Answered::Presence { entries })) => {
                Some(Answer::Presence(entries))
            }
            (Pending::Send, Ok(Answered::Sent { connections })) => Some(Answer::Sent(connections)),
            (Pending::Inspect, Ok(Answered::Rooms { rooms })) => Some(Answer::Rooms(rooms)),
            _ => None,
        };
        self.effects.push(Effect::Answer { request, answer });
    }

    fn on_registered(
        &mut self,
        request: RequestId,
        rooms: &[Snapshot],
        result: Result<Answered, ()>,
    ) {
        if self.registering != Some(request) {
            return;
        }
        self.registering = None;
        let mut held: HashMap<Box<str>, Held> = self
            .rooms
            .iter_mut()
            .map(|(name, room)| (name.clone(), std::mem::take(&mut room.held)))
            .collect();
        let Ok(Answered::Registered { rooms: answers }) = result else {
            return;
        };
        self.registered = self.command_link && self.subscriber_link;
        if !self.registered {
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
    /// live stream: a new epoch, the messages they did not see (from the
    /// history, `lagged` for what it no longer holds), then those that came
    /// while the registration waited.
    fn room_registered(&mut self, snapshot: &Snapshot, answer: RegisteredRoom, held: Held) {
        let RegisteredRoom { state, frames } = answer;
        let Some(room) = self.rooms.get_mut(&snapshot.room) else {
            return;
        };
        if room.life != snapshot.life {
            return;
        }
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
        room.replayed = Some(last);
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
        // Redis came back without the room: its members learn the new epoch
        // before any of its messages, the way a `join` with `since: 0` would
        // tell them, so that `seq - missed` is where the messages that follow
        // start (0: every one of the new epoch).
        let new_epoch = changed.then(|| NewEpoch {
            count: state.count,
            seq: state.seq,
            epoch: state.epoch.as_str().into(),
            recovered: first == from,
            missed: replay.len() as u64,
        });
        // A node that never learnt the room's epoch has only joining members,
        // whose own `joined` tells them where they start.
        let (lost, mut messages) = if known {
            let lost = (from < first).then(|| (from, first - 1));
            let messages = (first..)
                .zip(replay)
                .map(|(seq, text)| (seq, protocol::text_frame(text)))
                .collect();
            (lost, messages)
        } else {
            (None, Vec::new())
        };
        // Came after the snapshot: after the replay, each once.
        messages.extend(
            held.messages
                .into_iter()
                .filter(|(seq, _)| *seq > state.seq),
        );
        let overflow = held
            .overflow
            .map(|(from, to)| (from.max(state.seq.saturating_add(1)), to))
            .filter(|(from, to)| from <= to);
        self.effects.push(Effect::Resume(Resume {
            room: snapshot.room.clone(),
            new_epoch,
            lost,
            messages,
            overflow,
        }));
    }
}

impl Held {
    /// Keeps a room message for the registration's answer; past the bound,
    /// only its seq, for a `lagged`.
    fn hold(&mut self, seq: u64, frame: Bytes) {
        if self.overflow.is_none() && self.messages.len() < MAX_HELD {
            self.messages.push((seq, frame));
        } else {
            let from = self.overflow.map_or(seq, |(from, _)| from);
            self.overflow = Some((from, seq));
        }
    }
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

impl Backplane for RedisBackplane {
    fn is_available(&self) -> bool {
        self.is_up()
    }

    fn reachable(&self) -> Option<bool> {
        Some(self.is_up())
    }

    fn open_room(&mut self, room: RoomRef<'_>) {
        self.next_life += 1;
        self.rooms.insert(
            room.name.into(),
            RoomHere {
                life: self.next_life,
                subscription: 0,
                epoch: Box::default(),
                seen_seq: 0,
                held: Held::default(),
                replayed: None,
            },
        );
    }

    fn room_emptied(&mut self, _room: RoomRef<'_>) -> Retention {
        // The room's state lives on in Redis.
        Retention::ForgetNow
    }

    fn close_room(&mut self, room: RoomRef<'_>) {
        let Some(here) = self.rooms.remove(room.name) else {
            return;
        };
        if here.subscription > 0 {
            self.out
                .push(Outgoing::Subscription(Subscription::Unsubscribe {
                    room: room.name.to_string(),
                }));
        }
    }

    fn join(&mut self, join: &JoinRequest<'_>) -> Reply<JoinState> {
        if !self.is_up() {
            return Reply::Unavailable;
        }
        let Some(here) = self.rooms.get_mut(join.room.name) else {
            return Reply::Unavailable;
        };
        if here.subscription == 0 {
            self.next_generation += 1;
            here.subscription = self.next_generation;
            // Unknown until Redis answers the first join.
            here.epoch = Box::default();
            self.out
                .push(Outgoing::Subscription(Subscription::Subscribe {
                    room: join.room.name.to_string(),
                    generation: self.next_generation,
                }));
        }
        let (life, sub_generation) = (here.life, here.subscription);
        let process = self.process.clone();
        let request = self.request(
            |req| Command::Join {
                req,
                room: join.room.name.to_string(),
                sub_generation,
                user_id: join.user.id.to_string(),
                user_json: join.user.json.to_string(),
                local_count: join.connections_here,
                since: join.since,
                epoch: join.epoch.map(str::to_string),
                marker: commands::marker_envelope(&process, req),
            },
            Pending::Join {
                room: join.room.name.into(),
                life,
            },
        );
        Reply::Later(request)
    }

    fn publish(&mut self, message: &Publication<'_>) -> Reply<Published> {
        if !self.is_up() {
            return Reply::Unavailable;
        }
        let (head, tail) = message_parts(
            message.room.name,
            message.user_json,
            message.content,
            message.now,
        );
        let room = message.room.name.to_string();
        let webhook = message.webhook.then(|| {
            Box::new(commands::WebhookMessage {
                user_json: message.user_json.to_string(),
                content: message.content.to_string(),
            })
        });
        let request = self.request(
            |req| Command::Publish {
                req,
                room,
                head,
                tail,
                webhook,
            },
            Pending::Publish,
        );
        Reply::Later(request)
    }

    fn room_frame(&mut self, room: RoomRef<'_>, frame: &Bytes, except: Option<&str>) -> bool {
        if let Some(text) = protocol::text_frame_payload(frame)
            && self.is_up()
        {
            self.out.push(Outgoing::Command(Command::RoomEvent {
                room: room.name.to_string(),
                envelope: commands::event_envelope(except, text),
            }));
        }
        false
    }

    fn member_left(
        &mut self,
        room: RoomRef<'_>,
        user: UserRef<'_>,
        left: Remaining,
    ) -> Option<Bytes> {
        // The script announces `user_left` once the user is gone from every node.
        self.update(Command::Member {
            room: room.name.to_string(),
            user_id: user.id.to_string(),
            user_json: user.json.to_string(),
            local_count: left.connections_here,
        });
        None
    }

    fn user_connections(&mut self, user_id: &str, connections: usize) {
        self.update(Command::UserCount {
            user_id: user_id.to_string(),
            count: u32::try_from(connections).unwrap_or(u32::MAX),
        });
    }

    fn presence(&mut self, room: &str, _here: Vec<PresenceEntry>) -> Reply<Vec<PresenceEntry>> {
        if !self.is_up() {
            return Reply::Unavailable;
        }
        let room = room.to_string();
        Reply::Later(self.request(|req| Command::Presence { req, room }, Pending::Presence))
    }

    fn send_to_user(&mut self, user_id: &str, item: &UserItem) -> Reply<()> {
        if !self.is_up() {
            return Reply::Unavailable;
        }
        if let UserItem::Subscribe(room) | UserItem::Unsubscribe(room) = item {
            // Answered with the connections it changes, not all of them.
            let subscribe = matches!(item, UserItem::Subscribe(_));
            let command = |req| Command::Membership {
                req,
                user_id: user_id.to_string(),
                room: room.to_string(),
                subscribe,
                envelope: commands::membership_envelope(user_id, room, subscribe),
            };
            return Reply::Later(self.request(command, Pending::Send));
        }
        let envelope = match item {
            UserItem::Direct(frame) => {
                let text = protocol::text_frame_payload(frame).unwrap_or_default();
                commands::direct_envelope(user_id, text)
            }
            UserItem::Kick => commands::kick_envelope(user_id),
            // Sent above with their own command.
            UserItem::Subscribe(_) | UserItem::Unsubscribe(_) => return Reply::Unavailable,
        };
        let user_id = user_id.to_string();
        Reply::Later(self.request(
            |req| Command::SendUser {
                req,
                user_id,
                envelope,
            },
            Pending::Send,
        ))
    }

    /// Once a second: register when the links are up, refresh TTLs every
    /// minute. A registration due since the links came up runs at once.
    fn tick(&mut self, now: Millis, view: &dyn LocalView) {
        if now >= self.next_heartbeat {
            self.ticks += 1;
            self.next_heartbeat = now.saturating_add(HEARTBEAT_MS);
            if self.ticks.is_multiple_of(REFRESH_EVERY_TICKS) && self.is_up() {
                let rooms = view
                    .occupied_rooms()
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect();
                let users = view.users().into_iter().map(|(user, _)| user).collect();
                self.update(Command::Refresh { rooms, users });
            }
            self.register_due = true;
        }
        if std::mem::take(&mut self.register_due) {
            self.maybe_register(view);
        }
    }

    fn next_tick(&self) -> Option<Millis> {
        Some(if self.register_due {
            self.register_at
        } else {
            self.next_heartbeat
        })
    }

    fn take_effects(&mut self, into: &mut Vec<Effect>) {
        into.append(&mut self.effects);
    }

    fn shutdown(&mut self) {
        self.out.push(Outgoing::Command(Command::Shutdown));
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    /// The cluster's rooms, from Redis (§14.3: `/api/rooms…` answer for
    /// the cluster).
    fn inspect_rooms(
        &mut self,
        query: &super::RoomQuery,
        _here: &dyn super::RoomsHere,
    ) -> Reply<Vec<super::RoomView>> {
        if !self.is_up() {
            return Reply::Unavailable;
        }
        let query = query.clone();
        Reply::Later(self.request(
            |req| match query {
                super::RoomQuery::List { prefix, limit } => Command::Rooms {
                    req,
                    prefix: prefix.into(),
                    // One more than listed tells `truncated`.
                    want: limit.saturating_add(1),
                },
                super::RoomQuery::One { room } => Command::Room {
                    req,
                    room: room.into(),
                },
            },
            Pending::Inspect,
        ))
    }

    fn node_id(&self) -> Option<&str> {
        Some(&self.process)
    }
}
