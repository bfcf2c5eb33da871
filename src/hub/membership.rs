//! Rooms here and who is in them: joining, leaving, and forgetting rooms.

use std::collections::HashMap;

use super::session::{JoinCursor, Membership};
use super::{ConnId, Hub, Millis, Room, RoomId, Timer, frames};
use crate::backplane::{Retention, RoomRef, UserRef};

/// A membership just taken away: whose it was, and what remains of the
/// user in the room here.
struct Detached {
    user_id: Box<str>,
    user_json: std::rc::Rc<str>,
    connections_left: u32,
}

impl Hub {
    /// An entry for a room this hub did not know; the backplane opens it too.
    pub(super) fn create_room(&mut self, name: &str) -> RoomId {
        self.next_room_life += 1;
        let room = Room {
            name: name.into(),
            members: Vec::new(),
            users: HashMap::new(),
            typing: HashMap::new(),
            life: self.next_room_life,
            empty_since: None,
            joining: 0,
            options: *self.config.namespaces.for_room(name),
        };
        let room_id = self.rooms.insert(room);
        self.room_ids.insert(name.into(), room_id);
        self.backplane.open_room(RoomRef { id: room_id, name });
        room_id
    }

    /// The room has no member here: keep it for recovery, or forget it, as
    /// the backplane says.
    pub(super) fn room_without_members(&mut self, room_id: RoomId, now: Millis) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        room.empty_since = Some(now);
        let life = room.life;
        let retention = self.backplane.room_emptied(RoomRef {
            id: room_id,
            name: &room.name,
        });
        match retention {
            Retention::KeepFor(ttl) => self.timers.schedule(
                now.saturating_add(ttl),
                Timer::ForgetRoom {
                    room: room_id,
                    life,
                },
            ),
            Retention::ForgetNow => self.drop_room(room_id),
        }
    }

    /// Forgets the room if it is still the empty one the timer was set for.
    pub(super) fn forget_room(&mut self, room_id: RoomId, life: u64, now: Millis) {
        let forget = self.rooms.get(room_id).is_some_and(|room| {
            room.life == life
                && room.members.is_empty()
                && room
                    .empty_since
                    .is_some_and(|since| since.saturating_add(super::EMPTY_ROOM_TTL_MS) <= now)
        });
        if forget {
            self.drop_room(room_id);
        }
    }

    fn drop_room(&mut self, room_id: RoomId) {
        let Some(room) = self.rooms.try_remove(room_id) else {
            return;
        };
        self.room_ids.remove(&room.name);
        self.backplane.close_room(RoomRef {
            id: room_id,
            name: &room.name,
        });
    }

    /// Adds the connection to the room's members here. Announcing the user
    /// is the backplane's to decide (only it knows whether the user is new
    /// to the room everywhere).
    pub(super) fn add_membership(&mut self, conn: ConnId, room_id: RoomId) {
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
        session.memberships.push(Membership {
            room: room_id,
            slot: room.members.len(),
            cursor: None,
        });
        room.members.push(conn);
        *room.users.entry(session.user_id.clone()).or_insert(0) += 1;
    }

    /// The join answers later: until it takes effect, this member's room
    /// traffic is held back (see `deliver_traffic`).
    pub(super) fn start_cursor(&mut self, conn: ConnId, room_id: RoomId) {
        let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut) else {
            return;
        };
        let Some(membership) = session.memberships.iter_mut().find(|m| m.room == room_id) else {
            return;
        };
        if membership.cursor.is_none() {
            membership.cursor = Some(Box::<JoinCursor>::default());
            if let Some(room) = self.rooms.get_mut(room_id) {
                room.joining += 1;
            }
        }
    }

    /// Removes one membership; the end of typing and (by the backplane's
    /// decision) `user_left` go to the room when it was the user's last
    /// connection in it.
    pub(super) fn remove_membership(&mut self, conn: ConnId, room_id: RoomId, now: Millis) {
        let Some(Detached {
            user_id,
            user_json,
            connections_left,
        }) = self.take_membership(conn, room_id)
        else {
            return;
        };
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let was_typing = connections_left == 0 && room.typing.remove(&user_id).is_some();
        if was_typing {
            let frame = frames::typing(&room.name, &user_json, false);
            self.room_frame(room_id, &frame, Some(&user_id));
        }
        let Some(room) = self.rooms.get(room_id) else {
            return;
        };
        let announce = self.backplane.member_left(
            RoomRef {
                id: room_id,
                name: &room.name,
            },
            UserRef {
                id: &user_id,
                json: &user_json,
            },
            crate::backplane::Remaining {
                connections_here: connections_left,
                users_here: room.users.len(),
                now,
            },
        );
        if let Some(frame) = announce {
            self.broadcast(room_id, &frame, super::delivery::Except::Nobody);
        }
        self.left_empty(room_id, now);
    }

    /// Undoes the membership of a join the room's authority refused
    /// (`room_full`): the authority never counted it, so it hears nothing.
    pub(super) fn drop_unadmitted_membership(
        &mut self,
        conn: ConnId,
        room_id: RoomId,
        now: Millis,
    ) {
        if self.take_membership(conn, room_id).is_some() {
            self.left_empty(room_id, now);
        }
    }

    /// When the room has no member here any more: no longer occupied here.
    fn left_empty(&mut self, room_id: RoomId, now: Millis) {
        if self
            .rooms
            .get(room_id)
            .is_some_and(|room| room.members.is_empty())
        {
            self.occupied_rooms = self.occupied_rooms.saturating_sub(1);
            self.room_without_members(room_id, now);
        }
    }

    /// Takes the connection out of the room's members and the room out of
    /// its memberships: who it was, and the user's connections left in it.
    fn take_membership(&mut self, conn: ConnId, room_id: RoomId) -> Option<Detached> {
        let session = self.sessions.get_mut(conn).and_then(Option::as_mut)?;
        let position = session.memberships.iter().position(|m| m.room == room_id)?;
        let membership = session.memberships.swap_remove(position);
        // No `lagged` for a room the connection has left (§11).
        session.lagged.retain(|span| span.room != room_id);
        let user_id = session.user_id.clone();
        let user_json = session.user_json.clone();
        let room = self.rooms.get_mut(room_id)?;
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
        let connections_left = match room.users.get_mut(&user_id) {
            Some(count) if *count > 1 => {
                *count -= 1;
                *count
            }
            _ => {
                room.users.remove(&user_id);
                0
            }
        };
        Some(Detached {
            user_id,
            user_json,
            connections_left,
        })
    }

    /// The user's connections here changed: the backplane counts them for
    /// presence elsewhere.
    pub(super) fn report_user_connections(&mut self, user_id: &str) {
        let connections = self.users.get(user_id).map_or(0, Vec::len);
        self.backplane.user_connections(user_id, connections);
    }
}
