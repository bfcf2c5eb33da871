//! One event loop is the whole server: the rooms' authority lives here and
//! answers at once.
//!
//! Each room's epoch, seq and history sit in a vector indexed by the hub's
//! room key, so a publish is an index, a seq increment, one frame encoding
//! and a push into the history: no hop, no lookup by name, and no
//! allocation beyond the frame itself.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::events::RoomEvents;
use super::{
    Backplane, Effect, JoinRequest, JoinState, LocalView, PresenceEntry, Publication, Published,
    Remaining, Reply, Retention, RoomQuery, RoomRef, RoomView, RoomsHere, UserItem, UserRef,
};
use crate::hub::{EMPTY_ROOM_TTL_MS, Millis, Namespaces, RoomOptions, random_epoch};
use crate::protocol::FrameBuilder;
use crate::state::RoomSnapshot;

/// A room's authority: what must be one for all its members.
struct Authority {
    name: Box<str>,
    epoch: Box<str>,
    seq: u64,
    /// Encoded `message` frames with their seq, oldest first.
    history: VecDeque<(u64, Bytes)>,
    /// Its namespace's options, looked up once when the room opens.
    options: RoomOptions,
}

/// The backplane of a single event loop.
pub struct LocalBackplane {
    /// Every room's options (history kept, member events, max members).
    namespaces: Arc<Namespaces>,
    /// Where membership changes and messages go for the webhook.
    events: RoomEvents,
    /// By the hub's room key.
    rooms: Vec<Option<Authority>>,
    /// Bumped by every change `export_rooms` would show.
    changes: u64,
}

impl LocalBackplane {
    /// Rooms keep the messages their namespace says for recovery.
    pub fn new(namespaces: Arc<Namespaces>, events: RoomEvents) -> Self {
        LocalBackplane {
            namespaces,
            events,
            rooms: Vec::new(),
            changes: 0,
        }
    }

    fn authority(&self, room: RoomRef<'_>) -> Option<&Authority> {
        self.rooms.get(room.id).and_then(Option::as_ref)
    }

    fn authority_mut(&mut self, room: RoomRef<'_>) -> Option<&mut Authority> {
        self.rooms.get_mut(room.id).and_then(Option::as_mut)
    }

    /// Puts a saved room's epoch, seq and history under the room just opened.
    pub fn restore(&mut self, room: RoomRef<'_>, snapshot: RoomSnapshot) {
        let Some(authority) = self.authority_mut(room) else {
            return;
        };
        let history = snapshot.history_frames(authority.options.history);
        authority.epoch = snapshot.epoch.into_boxed_str();
        authority.seq = snapshot.seq;
        authority.history = history;
        self.changes += 1;
    }
}

/// `user_joined` or `user_left` with the room's count after the change.
pub(crate) fn member_frame(kind: &str, room: &str, user_json: &str, count: usize) -> Bytes {
    FrameBuilder::new(kind, None)
        .string("room", room)
        .raw("user", user_json)
        .number("count", count as u64)
        .finish()
}

impl Backplane for LocalBackplane {
    fn open_room(&mut self, room: RoomRef<'_>) {
        if self.rooms.len() <= room.id {
            self.rooms.resize_with(room.id + 1, || None);
        }
        if let Some(slot) = self.rooms.get_mut(room.id) {
            *slot = Some(Authority {
                name: room.name.into(),
                epoch: random_epoch(),
                seq: 0,
                history: VecDeque::new(),
                options: *self.namespaces.for_room(room.name),
            });
        }
        self.changes += 1;
    }

    fn room_emptied(&mut self, _room: RoomRef<'_>) -> Retention {
        Retention::KeepFor(EMPTY_ROOM_TTL_MS)
    }

    fn close_room(&mut self, room: RoomRef<'_>) {
        if let Some(slot) = self.rooms.get_mut(room.id) {
            *slot = None;
        }
        self.changes += 1;
    }

    fn join(&mut self, join: &JoinRequest<'_>) -> Reply<JoinState> {
        let Some(authority) = self.authority(join.room) else {
            return Reply::Unavailable;
        };
        let new_user = join.first && join.connections_here == 1;
        let users_before = join.users_here.saturating_sub(1) as u64;
        if new_user && !authority.options.admits(users_before) {
            return Reply::Now(JoinState::full(users_before));
        }
        let same_epoch = join.epoch.is_none_or(|epoch| epoch == &*authority.epoch);
        let replay = match join.since {
            Some(since) if same_epoch && since <= authority.seq => authority
                .history
                .iter()
                .filter(|(seq, _)| *seq > since)
                .map(|(_, frame)| frame.clone())
                .collect(),
            _ => Vec::new(),
        };
        if new_user {
            let users = join.users_here as u64;
            self.events
                .user_joined(join.room.name, join.user.json, users, join.now);
        }
        let announce = (new_user && authority.options.member_events).then(|| {
            member_frame(
                "user_joined",
                join.room.name,
                join.user.json,
                join.users_here,
            )
        });
        Reply::Now(JoinState {
            count: join.users_here as u64,
            seq: authority.seq,
            epoch: authority.epoch.clone(),
            oldest_held: authority.history.front().map(|(seq, _)| *seq),
            replay,
            announce,
            full: false,
        })
    }

    fn publish(&mut self, message: &Publication<'_>) -> Reply<Published> {
        let Some(authority) = self.authority_mut(message.room) else {
            return Reply::Unavailable;
        };
        let keep = authority.options.history;
        authority.seq += 1;
        let seq = authority.seq;
        let frame = FrameBuilder::with_capacity(
            "message",
            None,
            authority.name.len() + message.user_json.len() + message.content.len() + 64,
        )
        .string("room", &authority.name)
        .raw("user", message.user_json)
        .raw("content", message.content)
        .number("seq", seq)
        .number("ts", message.now)
        .finish();
        if keep > 0 {
            if authority.history.len() >= keep {
                authority.history.pop_front();
            }
            authority.history.push_back((seq, frame.clone()));
        }
        if message.webhook {
            let (user, content) = (message.user_json, message.content);
            let room = message.room.name;
            self.events.message(room, seq, user, content, message.now);
        }
        self.changes += 1;
        Reply::Now(Published {
            seq,
            frame,
            delivered_elsewhere: 0,
        })
    }

    fn room_frame(&mut self, _room: RoomRef<'_>, _frame: &Bytes, _except: Option<&str>) -> bool {
        true
    }

    fn member_left(
        &mut self,
        room: RoomRef<'_>,
        user: UserRef<'_>,
        left: Remaining,
    ) -> Option<Bytes> {
        if left.connections_here > 0 {
            return None;
        }
        let users = left.users_here;
        self.events
            .user_left(room.name, user.json, users as u64, left.now);
        let announce = self
            .authority(room)
            .is_some_and(|authority| authority.options.member_events);
        announce.then(|| member_frame("user_left", room.name, user.json, users))
    }

    fn user_connections(&mut self, _user_id: &str, _connections: usize) {}

    fn presence(&mut self, _room: &str, here: Vec<PresenceEntry>) -> Reply<Vec<PresenceEntry>> {
        Reply::Now(here)
    }

    fn send_to_user(&mut self, _user_id: &str, _item: &UserItem) -> Reply<()> {
        Reply::Now(())
    }

    fn tick(&mut self, _now: Millis, _view: &dyn LocalView) {}

    fn take_effects(&mut self, _into: &mut Vec<Effect>) {}

    fn export_rooms(&self) -> Vec<RoomSnapshot> {
        self.rooms
            .iter()
            .flatten()
            .map(|room| RoomSnapshot::from_frames(&room.name, &room.epoch, room.seq, &room.history))
            .collect()
    }

    fn room_changes(&self) -> u64 {
        self.changes
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn inspect_rooms(&mut self, query: &RoomQuery, here: &dyn RoomsHere) -> Reply<Vec<RoomView>> {
        // The hub counts the members; the authority adds seq, epoch, history.
        let keys = match query {
            RoomQuery::List { limit, .. } => {
                // Only the rooms listed (and one more) are looked at further.
                let mut keys = here.occupied(query);
                keys.sort_by(|a, b| a.1.cmp(&b.1));
                keys.truncate(limit.saturating_add(1));
                keys
            }
            RoomQuery::One { room } => here
                .key_of(room)
                .map(|key| vec![(key, room.clone())])
                .unwrap_or_default(),
        };
        let detailed = matches!(query, RoomQuery::One { .. });
        let mut rooms: Vec<RoomView> = keys
            .into_iter()
            .filter_map(|(key, name)| {
                let authority = self.rooms.get(key).and_then(Option::as_ref)?;
                let (users, connections) = here.members(key);
                Some(RoomView {
                    room: name,
                    count: users.len() as u64,
                    connections,
                    seq: authority.seq,
                    epoch: authority.epoch.clone(),
                    users: if detailed { users } else { Vec::new() },
                    history: if detailed {
                        authority.history.iter().cloned().collect()
                    } else {
                        Vec::new()
                    },
                })
            })
            .collect();
        query.finish(&mut rooms);
        Reply::Now(rooms)
    }
}
