//! A backplane that answers later, for testing the rules without Redis.
//!
//! It keeps the rooms' authority as the local backplane does, but answers
//! every room request with [`Reply::Later`] and delivers room traffic only
//! as effects, released when the test calls [`DeferredBackplane::release`].
//! That is the shape of Redis (and of a room whose authority sits on another
//! event loop): the rules must give the same frames in the same order.

use std::any::Any;

use bytes::Bytes;

use super::local::LocalBackplane;
use super::{
    Answer, Backplane, Effect, JoinRequest, JoinState, LocalView, PresenceEntry, Publication,
    Published, Remaining, Reply, RequestId, Retention, RoomRef, RoomTraffic, UserItem, UserRef,
};
use crate::hub::Millis;
use crate::state::RoomSnapshot;

/// The local authority, answering later.
pub struct DeferredBackplane {
    inner: LocalBackplane,
    next_request: RequestId,
    /// Effects not released yet, in order.
    queued: Vec<Effect>,
    /// Effects released, for the hub to take.
    released: Vec<Effect>,
}

impl DeferredBackplane {
    /// Rooms keep the messages their namespace says.
    pub fn new(namespaces: std::sync::Arc<crate::hub::Namespaces>) -> Self {
        DeferredBackplane {
            inner: LocalBackplane::new(namespaces, super::events::RoomEvents::default()),
            next_request: 0,
            queued: Vec::new(),
            released: Vec::new(),
        }
    }

    /// Lets everything decided so far arrive; true when there was something.
    pub fn release(&mut self) -> bool {
        let any = !self.queued.is_empty();
        self.released.append(&mut self.queued);
        any
    }

    fn request(&mut self) -> RequestId {
        self.next_request += 1;
        self.next_request
    }

    fn traffic(&mut self, room: &str, seq: Option<u64>, except: Option<&str>, frame: Bytes) {
        self.queued.push(Effect::Traffic(RoomTraffic {
            room: room.into(),
            seq,
            except: except.map(Into::into),
            frame,
        }));
    }
}

impl Backplane for DeferredBackplane {
    fn open_room(&mut self, room: RoomRef<'_>) {
        self.inner.open_room(room);
    }

    fn room_emptied(&mut self, room: RoomRef<'_>) -> Retention {
        self.inner.room_emptied(room)
    }

    fn close_room(&mut self, room: RoomRef<'_>) {
        self.inner.close_room(room);
    }

    fn join(&mut self, join: &JoinRequest<'_>) -> Reply<JoinState> {
        let Reply::Now(mut state) = self.inner.join(join) else {
            return Reply::Unavailable;
        };
        let request = self.request();
        // As a join script would: the announcement and the join's marker go
        // into the room's stream, then the answer comes.
        if let Some(announce) = state.announce.take() {
            self.traffic(join.room.name, None, Some(join.user.id), announce);
        }
        self.queued.push(Effect::JoinMarked(request));
        self.queued.push(Effect::Answer {
            request,
            answer: Some(Answer::Joined(state)),
        });
        Reply::Later(request)
    }

    fn publish(&mut self, message: &Publication<'_>) -> Reply<Published> {
        let Reply::Now(published) = self.inner.publish(message) else {
            return Reply::Unavailable;
        };
        let request = self.request();
        self.traffic(
            message.room.name,
            Some(published.seq),
            None,
            published.frame,
        );
        self.queued.push(Effect::Answer {
            request,
            answer: Some(Answer::Published {
                seq: published.seq,
                delivered: 0,
            }),
        });
        Reply::Later(request)
    }

    fn room_frame(&mut self, room: RoomRef<'_>, frame: &Bytes, except: Option<&str>) -> bool {
        self.traffic(room.name, None, except, frame.clone());
        false
    }

    fn member_left(
        &mut self,
        room: RoomRef<'_>,
        user: UserRef<'_>,
        left: Remaining,
    ) -> Option<Bytes> {
        if let Some(frame) = self.inner.member_left(room, user, left) {
            self.traffic(room.name, None, None, frame);
        }
        None
    }

    fn user_connections(&mut self, _user_id: &str, _connections: usize) {}

    fn presence(&mut self, room: &str, here: Vec<PresenceEntry>) -> Reply<Vec<PresenceEntry>> {
        let Reply::Now(entries) = self.inner.presence(room, here) else {
            return Reply::Unavailable;
        };
        let request = self.request();
        self.queued.push(Effect::Answer {
            request,
            answer: Some(Answer::Presence(entries)),
        });
        Reply::Later(request)
    }

    fn send_to_user(&mut self, user_id: &str, item: &UserItem) -> Reply<()> {
        // Only the connections here exist: the hub delivers and counts.
        self.inner.send_to_user(user_id, item)
    }

    fn tick(&mut self, _now: Millis, _view: &dyn LocalView) {}

    fn take_effects(&mut self, into: &mut Vec<Effect>) {
        into.append(&mut self.released);
    }

    fn export_rooms(&self) -> Vec<RoomSnapshot> {
        self.inner.export_rooms()
    }

    fn room_changes(&self) -> u64 {
        self.inner.room_changes()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn inspect_rooms(
        &mut self,
        query: &super::RoomQuery,
        here: &dyn super::RoomsHere,
    ) -> Reply<Vec<super::RoomView>> {
        self.inner.inspect_rooms(query, here)
    }
}
