//! N event loops in one process share rooms (`--threads N`, PROTOCOL §12).
//!
//! Each room has one authority (its epoch, seq, history and the count of its
//! users on every loop), on the loop where the room was first used: a room
//! whose members all sit on one loop (echo, a room that happens to land on
//! one loop) never crosses loops. The other loops reach it by message, and
//! it sends them the room's traffic: the same `Bytes`, framed once for the
//! process, go into the queues of members on every loop. A loop's requests
//! to another loop's rooms answer later, exactly as Redis does, so the rules
//! above handle them the same way (join markers, replies in request order).
//!
//! Still sans-IO: messages for other loops leave through
//! [`LoopsBackplane::take_outgoing`] (the shell sends them over channels,
//! with at most one wake per loop per batch) and come back through
//! [`LoopsBackplane::on_message`]. The one shared structure is the
//! [`RoomHomes`] registry, locked only when a loop opens a room it did not
//! know, never per message or per delivery.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::events::RoomEvents;
use super::local::member_frame;
use super::{
    Answer, Backplane, Effect, JoinRequest, JoinState, LocalView, PresenceEntry, Publication,
    Published, Remaining, Reply, RequestId, Retention, RoomQuery, RoomRef, RoomTraffic, RoomView,
    RoomsHere, UserItem, UserRef,
};
use crate::hub::{EMPTY_ROOM_TTL_MS, Millis, Namespaces, RoomOptions, random_epoch};
use crate::protocol::FrameBuilder;
use crate::state::RoomSnapshot;

#[cfg(test)]
mod tests;

/// How often a loop looks for rooms empty everywhere for five minutes.
const FORGET_SCAN_MS: Millis = 10_000;

/// Which loop holds each room's authority. Locked when a loop opens a room
/// it did not know, and when an authority is forgotten.
#[derive(Debug, Default)]
pub struct RoomHomes {
    homes: Mutex<HashMap<Box<str>, usize>>,
}

impl RoomHomes {
    /// The room's home, made `candidate` when it has none.
    fn home_of(&self, room: &str, candidate: usize) -> usize {
        let mut homes = self.homes.lock().unwrap_or_else(PoisonError::into_inner);
        *homes.entry(room.into()).or_insert(candidate)
    }

    /// Forgets the room's home if it is still `home`.
    fn forget(&self, room: &str, home: usize) {
        let mut homes = self.homes.lock().unwrap_or_else(PoisonError::into_inner);
        if homes.get(room) == Some(&home) {
            homes.remove(room);
        }
    }

    /// The room's home, if it has one.
    fn lookup(&self, room: &str) -> Option<usize> {
        let homes = self.homes.lock().unwrap_or_else(PoisonError::into_inner);
        homes.get(room).copied()
    }
}

/// What loops tell each other about rooms and users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoopMessage {
    /// To a room's home: a connection on loop `from` joins.
    Join {
        /// The joiner's loop.
        from: usize,
        /// Answered with this id.
        request: RequestId,
        /// The room.
        room: Box<str>,
        /// The user id.
        user_id: Box<str>,
        /// The user's JSON.
        user_json: Box<str>,
        /// Whether the connection was not a member yet.
        first: bool,
        /// The client's `since`.
        since: Option<u64>,
        /// The client's `epoch`.
        epoch: Option<Box<str>>,
    },
    /// To a room's home: publish a message.
    Publish {
        /// The publisher's loop.
        from: usize,
        /// Answered with this id.
        request: RequestId,
        /// The room.
        room: Box<str>,
        /// The sender's JSON.
        user_json: Box<str>,
        /// The content, raw JSON.
        content: Box<str>,
        /// When it was sent.
        now: Millis,
        /// Also for the webhook (see [`Publication::webhook`]).
        webhook: bool,
    },
    /// To a room's home: a frame without a seq for every member (`typing`).
    Frame {
        /// The room.
        room: Box<str>,
        /// The user whose connections skip it.
        except: Option<Box<str>>,
        /// The frame.
        frame: Bytes,
    },
    /// To a room's home: a connection on loop `from` left.
    Left {
        /// The loop.
        from: usize,
        /// The room.
        room: Box<str>,
        /// The user id.
        user_id: Box<str>,
        /// The user's JSON.
        user_json: Box<str>,
    },
    /// To a room's home: who is in the room.
    Presence {
        /// The asking loop.
        from: usize,
        /// Answered with this id.
        request: RequestId,
        /// The room.
        room: Box<str>,
    },
    /// From a room's home: traffic for the members on this loop.
    Traffic(RoomTraffic),
    /// From a room's home: a join took effect in the room's stream.
    Marked(RequestId),
    /// From a room's home, or the count of a user's connections: an answer.
    Answer {
        /// The request answered.
        request: RequestId,
        /// The answer.
        answer: Option<Answer>,
    },
    /// To every other loop: a `direct` or a kick for a user's connections.
    ToUser {
        /// The asking loop.
        from: usize,
        /// The request the counts answer.
        request: RequestId,
        /// The user id.
        user: Box<str>,
        /// What to do.
        item: UserItem,
    },
    /// The user's connections on the answering loop, for a `ToUser` (for
    /// a subscribe or unsubscribe: those that joined or left).
    Count {
        /// The request.
        request: RequestId,
        /// Connections there.
        count: u64,
    },
    /// To every loop (a list) or a room's home: the rooms homed there that
    /// answer an introspection query (§14.3).
    Inspect {
        /// The asking loop.
        from: usize,
        /// Answered with this id.
        request: RequestId,
        /// What is asked.
        query: RoomQuery,
    },
    /// The answer to an `Inspect`.
    Inspected {
        /// The request.
        request: RequestId,
        /// The rooms homed on the answering loop that match.
        rooms: Vec<RoomView>,
    },
}

/// A room's authority, on its home loop.
struct Authority {
    epoch: Box<str>,
    seq: u64,
    /// Encoded `message` frames with their seq, oldest first.
    history: VecDeque<(u64, Bytes)>,
    /// Connections of each user on every loop, and the user's JSON.
    users: HashMap<Box<str>, (u32, Box<str>)>,
    /// Member connections on each loop (index: loop); traffic goes to the
    /// loops with members.
    members: Vec<u32>,
    /// When the last member anywhere left.
    empty_since: Option<Millis>,
    /// Its namespace's options, looked up once when the authority is made.
    options: RoomOptions,
}

impl Authority {
    fn new(loops: usize, options: RoomOptions) -> Self {
        Authority {
            options,
            epoch: random_epoch(),
            seq: 0,
            history: VecDeque::new(),
            users: HashMap::new(),
            members: vec![0; loops],
            empty_since: None,
        }
    }

    fn member_connections(&self) -> u64 {
        self.members.iter().map(|&count| u64::from(count)).sum()
    }
}

/// A `direct` or kick waiting for every other loop's count.
struct Gather {
    left: usize,
    total: u64,
}

/// An introspection query waiting for other loops' rooms.
struct RoomsGather {
    left: usize,
    query: RoomQuery,
    rooms: Vec<RoomView>,
}

/// The backplane of one of N loops.
pub struct LoopsBackplane {
    me: usize,
    loops: usize,
    namespaces: Arc<Namespaces>,
    /// Where this loop's authorities report membership changes and messages.
    events: RoomEvents,
    homes: std::sync::Arc<RoomHomes>,
    /// Rooms whose home is this loop.
    authorities: HashMap<Box<str>, Authority>,
    /// The home of each room the hub has open.
    open: HashMap<Box<str>, usize>,
    /// Connections of each user on this loop (for counts asked by others).
    users_here: HashMap<Box<str>, u32>,
    gathers: HashMap<RequestId, Gather>,
    /// Introspection queries waiting for other loops.
    inspections: HashMap<RequestId, RoomsGather>,
    /// Subscribes and unsubscribes handed to the hub here, in order, whose
    /// count goes to (loop, request) once the hub applied them.
    membership_counts: VecDeque<(usize, RequestId)>,
    next_request: RequestId,
    out: Vec<(usize, LoopMessage)>,
    effects: Vec<Effect>,
    changes: u64,
    /// When the hub last asked for a tick (the empty-room scan).
    next_scan: Millis,
    now: Millis,
}

impl LoopsBackplane {
    /// Loop `me` of `loops`, sharing the room homes of the process.
    pub fn new(
        me: usize,
        loops: usize,
        namespaces: Arc<Namespaces>,
        homes: Arc<RoomHomes>,
        events: RoomEvents,
    ) -> Self {
        LoopsBackplane {
            me,
            loops,
            namespaces,
            events,
            homes,
            authorities: HashMap::new(),
            open: HashMap::new(),
            users_here: HashMap::new(),
            gathers: HashMap::new(),
            inspections: HashMap::new(),
            membership_counts: VecDeque::new(),
            next_request: 0,
            out: Vec::new(),
            effects: Vec::new(),
            changes: 0,
            next_scan: 0,
            now: 0,
        }
    }

    /// Messages for other loops, with their destination, in order.
    pub fn take_outgoing(&mut self, into: &mut Vec<(usize, LoopMessage)>) {
        into.append(&mut self.out);
    }

    /// Takes a saved room as its home (`--state-file`); it keeps its epoch,
    /// seq and history and is forgotten after five minutes without members.
    pub fn restore(&mut self, snapshot: RoomSnapshot, now: Millis) {
        let home = self.homes.home_of(&snapshot.name, self.me);
        if home != self.me {
            return;
        }
        let options = *self.namespaces.for_room(&snapshot.name);
        let mut authority = Authority::new(self.loops, options);
        authority.history = snapshot.history_frames(options.history);
        authority.epoch = snapshot.epoch.into_boxed_str();
        authority.seq = snapshot.seq;
        authority.empty_since = Some(now);
        self.authorities
            .insert(snapshot.name.into_boxed_str(), authority);
        self.changes += 1;
    }

    fn request(&mut self) -> RequestId {
        self.next_request += 1;
        self.next_request
    }

    fn home(&self, room: &str) -> usize {
        self.open.get(room).copied().unwrap_or(self.me)
    }

    /// The authority of a room homed here, made if it is missing (a first
    /// use, or a message that raced with the room being forgotten).
    fn authority(&mut self, room: &str) -> &mut Authority {
        let loops = self.loops;
        if !self.authorities.contains_key(room) {
            self.homes.home_of(room, self.me);
            self.changes += 1;
        }
        let namespaces = &self.namespaces;
        self.authorities
            .entry(room.into())
            .or_insert_with(|| Authority::new(loops, *namespaces.for_room(room)))
    }

    /// Room traffic from this loop's authority: to the hub here (as an
    /// effect, or `deliver_here` false when the caller delivers it itself),
    /// and one message to every other loop with members.
    fn send_traffic(&mut self, room: &str, traffic: RoomTraffic, deliver_here: bool) {
        let Some(authority) = self.authorities.get(room) else {
            return;
        };
        for (index, &members) in authority.members.iter().enumerate() {
            if members > 0 && index != self.me {
                self.out
                    .push((index, LoopMessage::Traffic(traffic.clone())));
            }
        }
        if deliver_here {
            self.effects.push(Effect::Traffic(traffic));
        }
    }

    /// A member joined on loop `from`: counts, and the `user_joined` frame
    /// when the user is new to the room everywhere. `Err(users)`: the room
    /// is full and the joiner was not counted.
    fn admit(
        &mut self,
        from: usize,
        room: &str,
        user_id: &str,
        user_json: &str,
        first: bool,
    ) -> Result<Option<Bytes>, u64> {
        let authority = self.authority(room);
        if !first {
            return Ok(None);
        }
        let users = authority.users.len() as u64;
        if !authority.users.contains_key(user_id) && !authority.options.admits(users) {
            return Err(users);
        }
        if let Some(count) = authority.members.get_mut(from) {
            *count += 1;
        }
        authority.empty_since = None;
        let entry = authority
            .users
            .entry(user_id.into())
            .or_insert_with(|| (0, user_json.into()));
        entry.0 += 1;
        let new_user = entry.0 == 1;
        let users = authority.users.len();
        let announce = new_user && authority.options.member_events;
        if new_user {
            self.events
                .user_joined(room, user_json, users as u64, self.now);
        }
        Ok(announce.then(|| member_frame("user_joined", room, user_json, users)))
    }

    /// The state a join answers with: `joined`'s figures and the replay.
    fn join_state(&mut self, room: &str, since: Option<u64>, epoch: Option<&str>) -> JoinState {
        let authority = self.authority(room);
        let same_epoch = epoch.is_none_or(|epoch| epoch == &*authority.epoch);
        let replay = match since {
            Some(since) if same_epoch && since <= authority.seq => authority
                .history
                .iter()
                .filter(|(seq, _)| *seq > since)
                .map(|(_, frame)| frame.clone())
                .collect(),
            _ => Vec::new(),
        };
        JoinState {
            count: authority.users.len() as u64,
            seq: authority.seq,
            epoch: authority.epoch.clone(),
            oldest_held: authority.history.front().map(|(seq, _)| *seq),
            replay,
            announce: None,
            full: false,
        }
    }

    /// Assigns the next seq, frames the message once and keeps it.
    fn take_seq(&mut self, message: &Publication<'_>) -> Published {
        let (room, user_json, content, now) = (
            message.room.name,
            message.user_json,
            message.content,
            message.now,
        );
        let authority = self.authority(room);
        let keep = authority.options.history;
        authority.seq += 1;
        let seq = authority.seq;
        let frame = FrameBuilder::with_capacity(
            "message",
            None,
            room.len() + user_json.len() + content.len() + 64,
        )
        .string("room", room)
        .raw("user", user_json)
        .raw("content", content)
        .number("seq", seq)
        .number("ts", now)
        .finish();
        if keep > 0 {
            if authority.history.len() >= keep {
                authority.history.pop_front();
            }
            authority.history.push_back((seq, frame.clone()));
        }
        if message.webhook {
            self.events.message(room, seq, user_json, content, now);
        }
        self.changes += 1;
        Published {
            seq,
            frame,
            delivered_elsewhere: 0,
        }
    }

    /// A member left on loop `from`: counts, and `user_left` when the user
    /// is gone from the room everywhere.
    fn release(
        &mut self,
        from: usize,
        room: &str,
        user_id: &str,
        user_json: &str,
        now: Millis,
    ) -> Option<Bytes> {
        let authority = self.authorities.get_mut(room)?;
        if let Some(count) = authority.members.get_mut(from) {
            *count = count.saturating_sub(1);
        }
        if authority.member_connections() == 0 {
            authority.empty_since = Some(now);
        }
        let gone = match authority.users.get_mut(user_id) {
            Some(entry) if entry.0 > 1 => {
                entry.0 -= 1;
                false
            }
            Some(_) => {
                authority.users.remove(user_id);
                true
            }
            None => false,
        };
        if gone {
            let users = authority.users.len() as u64;
            self.events.user_left(room, user_json, users, now);
        }
        let announce = gone && authority.options.member_events;
        announce.then(|| member_frame("user_left", room, user_json, authority.users.len()))
    }

    /// Something from another loop. Call [`crate::hub::Hub::backplane_changed`] after.
    pub fn on_message(&mut self, message: LoopMessage, now: Millis) {
        self.now = now;
        match message {
            LoopMessage::Join {
                from,
                request,
                room,
                user_id,
                user_json,
                first,
                since,
                epoch,
            } => {
                let announce = match self.admit(from, &room, &user_id, &user_json, first) {
                    Ok(announce) => announce,
                    Err(users) => {
                        let answer = Some(Answer::Joined(JoinState::full(users)));
                        self.out
                            .push((from, LoopMessage::Answer { request, answer }));
                        return;
                    }
                };
                if let Some(announce) = announce {
                    let traffic = RoomTraffic {
                        room: room.clone(),
                        seq: None,
                        except: Some(user_id),
                        frame: announce,
                    };
                    self.send_traffic(&room, traffic, true);
                }
                let state = self.join_state(&room, since, epoch.as_deref());
                // After every frame sent to `from` before it: the marker.
                self.out.push((from, LoopMessage::Marked(request)));
                let answer = Some(Answer::Joined(state));
                self.out
                    .push((from, LoopMessage::Answer { request, answer }));
            }
            LoopMessage::Publish {
                from,
                request,
                room,
                user_json,
                content,
                now,
                webhook,
            } => {
                let published = self.take_seq(&Publication {
                    room: RoomRef { id: 0, name: &room },
                    user_json: &user_json,
                    content: &content,
                    now,
                    webhook,
                });
                let traffic = RoomTraffic {
                    room: room.clone(),
                    seq: Some(published.seq),
                    except: None,
                    frame: published.frame,
                };
                self.send_traffic(&room, traffic, true);
                let delivered = self
                    .authorities
                    .get(&room)
                    .map_or(0, Authority::member_connections);
                let answer = Some(Answer::Published {
                    seq: published.seq,
                    delivered,
                });
                self.reply(from, request, answer);
            }
            LoopMessage::Frame {
                room,
                except,
                frame,
            } => {
                if self.authorities.contains_key(&room) {
                    let traffic = RoomTraffic {
                        room: room.clone(),
                        seq: None,
                        except,
                        frame,
                    };
                    self.send_traffic(&room, traffic, true);
                }
            }
            LoopMessage::Left {
                from,
                room,
                user_id,
                user_json,
            } => {
                if let Some(frame) = self.release(from, &room, &user_id, &user_json, now) {
                    let traffic = RoomTraffic {
                        room: room.clone(),
                        seq: None,
                        except: None,
                        frame,
                    };
                    self.send_traffic(&room, traffic, true);
                }
            }
            LoopMessage::Presence {
                from,
                request,
                room,
            } => {
                let entries = self.presence_entries(&room);
                self.reply(from, request, Some(Answer::Presence(entries)));
            }
            LoopMessage::Traffic(traffic) => self.effects.push(Effect::Traffic(traffic)),
            LoopMessage::Marked(request) => self.effects.push(Effect::JoinMarked(request)),
            LoopMessage::Answer { request, answer } => {
                self.effects.push(Effect::Answer { request, answer });
            }
            LoopMessage::ToUser {
                from,
                request,
                user,
                item,
            } => {
                let count = u64::from(self.users_here.get(&*user).copied().unwrap_or(0));
                let membership = matches!(item, UserItem::Subscribe(_) | UserItem::Unsubscribe(_));
                if count > 0 {
                    self.effects.push(Effect::User { user, item });
                }
                if membership && count > 0 {
                    // The hub says how many joined or left once it applied it.
                    self.membership_counts.push_back((from, request));
                } else {
                    let count = if membership { 0 } else { count };
                    self.out.push((from, LoopMessage::Count { request, count }));
                }
            }
            LoopMessage::Count { request, count } => self.counted(request, count),
            LoopMessage::Inspect {
                from,
                request,
                query,
            } => {
                let rooms = self.rooms_homed_here(&query);
                self.out
                    .push((from, LoopMessage::Inspected { request, rooms }));
            }
            LoopMessage::Inspected { request, rooms } => self.inspected(request, rooms),
        }
    }

    /// An answer to loop `from`: an effect when it is this loop.
    fn reply(&mut self, from: usize, request: RequestId, answer: Option<Answer>) {
        if from == self.me {
            self.effects.push(Effect::Answer { request, answer });
        } else {
            self.out
                .push((from, LoopMessage::Answer { request, answer }));
        }
    }

    fn counted(&mut self, request: RequestId, count: u64) {
        let Some(gather) = self.gathers.get_mut(&request) else {
            return;
        };
        gather.total += count;
        gather.left = gather.left.saturating_sub(1);
        if gather.left == 0 {
            let total = gather.total;
            self.gathers.remove(&request);
            let answer = Some(Answer::Sent(total));
            self.effects.push(Effect::Answer { request, answer });
        }
    }

    /// The rooms homed here that answer `query`, sorted and cut as it says.
    fn rooms_homed_here(&self, query: &RoomQuery) -> Vec<RoomView> {
        let detailed = matches!(query, RoomQuery::One { .. });
        let mut rooms: Vec<RoomView> = self
            .authorities
            .iter()
            .filter(|(name, authority)| {
                query.matches(name) && (detailed || authority.member_connections() > 0)
            })
            .map(|(name, authority)| {
                let mut users: Vec<super::MemberView> = if detailed {
                    authority
                        .users
                        .iter()
                        .map(|(id, (connections, json))| super::MemberView {
                            id: id.clone(),
                            json: json.clone(),
                            connections: u64::from(*connections),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                users.sort_by(|a, b| a.id.cmp(&b.id));
                RoomView {
                    room: name.clone(),
                    count: authority.users.len() as u64,
                    connections: authority.member_connections(),
                    seq: authority.seq,
                    epoch: authority.epoch.clone(),
                    users,
                    history: if detailed {
                        authority.history.iter().cloned().collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        query.finish(&mut rooms);
        rooms
    }

    /// Another loop's rooms for a gathered query; the answer goes to the
    /// hub once every loop asked has answered.
    fn inspected(&mut self, request: RequestId, rooms: Vec<RoomView>) {
        let Some(gather) = self.inspections.get_mut(&request) else {
            return;
        };
        gather.rooms.extend(rooms);
        gather.left = gather.left.saturating_sub(1);
        if gather.left > 0 {
            return;
        }
        let Some(mut gather) = self.inspections.remove(&request) else {
            return;
        };
        gather.query.finish(&mut gather.rooms);
        let answer = Some(Answer::Rooms(gather.rooms));
        self.effects.push(Effect::Answer { request, answer });
    }

    fn presence_entries(&self, room: &str) -> Vec<PresenceEntry> {
        let Some(authority) = self.authorities.get(room) else {
            return Vec::new();
        };
        let mut entries: Vec<PresenceEntry> = authority
            .users
            .iter()
            .map(|(user, (connections, json))| {
                (user.to_string(), u64::from(*connections), json.to_string())
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
    }

    /// Forgets authorities whose room has been empty everywhere for five
    /// minutes (a later `join` starts a new epoch, §11).
    fn forget_empty(&mut self, now: Millis) {
        let expired: Vec<Box<str>> = self
            .authorities
            .iter()
            .filter(|(_, authority)| {
                authority
                    .empty_since
                    .is_some_and(|since| since.saturating_add(EMPTY_ROOM_TTL_MS) <= now)
                    && authority.member_connections() == 0
            })
            .map(|(room, _)| room.clone())
            .collect();
        for room in expired {
            if self.open.contains_key(&room) {
                continue;
            }
            self.authorities.remove(&room);
            self.homes.forget(&room, self.me);
            self.changes += 1;
        }
    }
}

impl Backplane for LoopsBackplane {
    fn open_room(&mut self, room: RoomRef<'_>) {
        let home = self.homes.home_of(room.name, self.me);
        self.open.insert(room.name.into(), home);
        if home == self.me {
            self.authority(room.name);
        }
    }

    fn room_emptied(&mut self, _room: RoomRef<'_>) -> Retention {
        // The authority keeps the room's state for recovery; the hub's
        // view of it goes.
        Retention::ForgetNow
    }

    fn close_room(&mut self, room: RoomRef<'_>) {
        self.open.remove(room.name);
    }

    fn join(&mut self, join: &JoinRequest<'_>) -> Reply<JoinState> {
        let home = self.home(join.room.name);
        if home != self.me {
            let request = self.request();
            self.out.push((
                home,
                LoopMessage::Join {
                    from: self.me,
                    request,
                    room: join.room.name.into(),
                    user_id: join.user.id.into(),
                    user_json: join.user.json.into(),
                    first: join.first,
                    since: join.since,
                    epoch: join.epoch.map(Into::into),
                },
            ));
            return Reply::Later(request);
        }
        self.now = join.now;
        let (room, user) = (join.room.name, join.user);
        let announce = match self.admit(self.me, room, user.id, user.json, join.first) {
            Ok(announce) => announce,
            Err(users) => return Reply::Now(JoinState::full(users)),
        };
        if let Some(frame) = &announce {
            // The members here get it from the hub (without the joiner's
            // connection); the other loops' members from here.
            let traffic = RoomTraffic {
                room: room.into(),
                seq: None,
                except: Some(user.id.into()),
                frame: frame.clone(),
            };
            self.send_traffic(room, traffic, false);
        }
        let mut state = self.join_state(room, join.since, join.epoch);
        state.announce = announce;
        Reply::Now(state)
    }

    fn publish(&mut self, message: &Publication<'_>) -> Reply<Published> {
        let room = message.room.name;
        let home = self.home(room);
        if home != self.me {
            let request = self.request();
            self.out.push((
                home,
                LoopMessage::Publish {
                    from: self.me,
                    request,
                    room: room.into(),
                    user_json: message.user_json.into(),
                    content: message.content.into(),
                    now: message.now,
                    webhook: message.webhook,
                },
            ));
            return Reply::Later(request);
        }
        let mut published = self.take_seq(message);
        published.delivered_elsewhere = self.authorities.get(room).map_or(0, |authority| {
            authority.member_connections()
                - u64::from(authority.members.get(self.me).copied().unwrap_or(0))
        });
        let traffic = RoomTraffic {
            room: room.into(),
            seq: Some(published.seq),
            except: None,
            frame: published.frame.clone(),
        };
        self.send_traffic(room, traffic, false);
        Reply::Now(published)
    }

    fn room_frame(&mut self, room: RoomRef<'_>, frame: &Bytes, except: Option<&str>) -> bool {
        let home = self.home(room.name);
        if home != self.me {
            self.out.push((
                home,
                LoopMessage::Frame {
                    room: room.name.into(),
                    except: except.map(Into::into),
                    frame: frame.clone(),
                },
            ));
            return false;
        }
        let traffic = RoomTraffic {
            room: room.name.into(),
            seq: None,
            except: except.map(Into::into),
            frame: frame.clone(),
        };
        self.send_traffic(room.name, traffic, false);
        true
    }

    fn member_left(
        &mut self,
        room: RoomRef<'_>,
        user: UserRef<'_>,
        left: Remaining,
    ) -> Option<Bytes> {
        self.now = left.now;
        let home = self.home(room.name);
        if home != self.me {
            self.out.push((
                home,
                LoopMessage::Left {
                    from: self.me,
                    room: room.name.into(),
                    user_id: user.id.into(),
                    user_json: user.json.into(),
                },
            ));
            return None;
        }
        let now = self.now;
        let frame = self.release(self.me, room.name, user.id, user.json, now)?;
        let traffic = RoomTraffic {
            room: room.name.into(),
            seq: None,
            except: None,
            frame: frame.clone(),
        };
        self.send_traffic(room.name, traffic, false);
        Some(frame)
    }

    fn user_connections(&mut self, user_id: &str, connections: usize) {
        if connections == 0 {
            self.users_here.remove(user_id);
        } else {
            let count = u32::try_from(connections).unwrap_or(u32::MAX);
            self.users_here.insert(user_id.into(), count);
        }
    }

    fn presence(&mut self, room: &str, _here: Vec<PresenceEntry>) -> Reply<Vec<PresenceEntry>> {
        let home = self
            .open
            .get(room)
            .copied()
            .or_else(|| self.homes.lookup(room));
        match home {
            None => Reply::Now(Vec::new()),
            Some(home) if home == self.me => Reply::Now(self.presence_entries(room)),
            Some(home) => {
                let request = self.request();
                self.out.push((
                    home,
                    LoopMessage::Presence {
                        from: self.me,
                        request,
                        room: room.into(),
                    },
                ));
                Reply::Later(request)
            }
        }
    }

    fn send_to_user(&mut self, user_id: &str, item: &UserItem) -> Reply<()> {
        let request = self.request();
        let mut here = u64::from(self.users_here.get(user_id).copied().unwrap_or(0));
        let membership = matches!(item, UserItem::Subscribe(_) | UserItem::Unsubscribe(_));
        let mut left = self.loops.saturating_sub(1);
        if here > 0 {
            self.effects.push(Effect::User {
                user: user_id.into(),
                item: item.clone(),
            });
            if membership {
                // This loop's count comes from the hub, like the others'.
                self.membership_counts.push_back((self.me, request));
                left += 1;
                here = 0;
            }
        }
        for index in (0..self.loops).filter(|&index| index != self.me) {
            self.out.push((
                index,
                LoopMessage::ToUser {
                    from: self.me,
                    request,
                    user: user_id.into(),
                    item: item.clone(),
                },
            ));
        }
        self.gathers.insert(request, Gather { left, total: here });
        if left == 0 {
            // One loop and nobody here: no count will come.
            self.gathers.remove(&request);
            let answer = Some(Answer::Sent(here));
            self.effects.push(Effect::Answer { request, answer });
        }
        Reply::Later(request)
    }

    fn tick(&mut self, now: Millis, _view: &dyn LocalView) {
        self.now = now;
        if now >= self.next_scan {
            self.next_scan = now.saturating_add(FORGET_SCAN_MS);
            self.forget_empty(now);
        }
    }

    fn next_tick(&self) -> Option<Millis> {
        Some(self.next_scan)
    }

    fn take_effects(&mut self, into: &mut Vec<Effect>) {
        into.append(&mut self.effects);
    }

    fn export_rooms(&self) -> Vec<RoomSnapshot> {
        self.authorities
            .iter()
            .map(|(name, room)| {
                RoomSnapshot::from_frames(name, &room.epoch, room.seq, &room.history)
            })
            .collect()
    }

    fn room_changes(&self) -> u64 {
        self.changes
    }

    fn occupied_rooms(&self) -> Option<usize> {
        let occupied = self.authorities.values();
        Some(
            occupied
                .filter(|room| room.member_connections() > 0)
                .count(),
        )
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn inspect_rooms(&mut self, query: &RoomQuery, _here: &dyn RoomsHere) -> Reply<Vec<RoomView>> {
        // The loops asked: every loop for a list, the room's home for one room.
        let asked: Vec<usize> = match query {
            RoomQuery::List { .. } => (0..self.loops).filter(|&index| index != self.me).collect(),
            RoomQuery::One { room } => match self.homes.lookup(room) {
                Some(home) if home != self.me => vec![home],
                _ => Vec::new(),
            },
        };
        let rooms = self.rooms_homed_here(query);
        if asked.is_empty() {
            return Reply::Now(rooms);
        }
        let request = self.request();
        for &index in &asked {
            self.out.push((
                index,
                LoopMessage::Inspect {
                    from: self.me,
                    request,
                    query: query.clone(),
                },
            ));
        }
        self.inspections.insert(
            request,
            RoomsGather {
                left: asked.len(),
                query: query.clone(),
                rooms,
            },
        );
        Reply::Later(request)
    }

    fn user_item_applied(&mut self, changed: u64) {
        let Some((from, request)) = self.membership_counts.pop_front() else {
            return;
        };
        if from == self.me {
            self.counted(request, changed);
        } else {
            self.out.push((
                from,
                LoopMessage::Count {
                    request,
                    count: changed,
                },
            ));
        }
    }
}
