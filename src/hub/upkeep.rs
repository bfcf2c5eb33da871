//! What time does: heartbeats and pong deadlines, token expiry, typing
//! expiry, forgetting empty rooms, and the backplane's own tick.

use std::collections::HashMap;

use bytes::Bytes;
use slab::Slab;

use super::session::{Session, Slot};
use super::{CloseRequest, ConnId, Hub, Millis, PING_FRAME, Room, RoomId, Timer, frames};
use crate::backplane::{LocalView, UsersHere};

impl Hub {
    /// Runs what is due at `now`: heartbeats, pong deadlines, token expiry,
    /// typing expiry, forgetting empty rooms, and the backplane's tick.
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
                Timer::Backplane => {
                    self.backplane_tick = None;
                    let view = HubView {
                        rooms: &self.rooms,
                        users: &self.users,
                        sessions: &self.sessions,
                    };
                    self.backplane.tick(now, &view);
                    self.apply_effects(now);
                    self.schedule_backplane_tick();
                }
            }
        }
        self.due = due;
        self.settle(now);
    }

    /// Keeps one timer for the backplane's next tick, if it wants one.
    pub(super) fn schedule_backplane_tick(&mut self) {
        let Some(at) = self.backplane.next_tick() else {
            return;
        };
        if self.backplane_tick.is_none_or(|scheduled| at < scheduled) {
            self.backplane_tick = Some(at);
            self.timers.schedule(at, Timer::Backplane);
        }
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
            let frame = frames::typing(&room.name, &user_json, false);
            self.room_frame(room_id, &frame, Some(user_id));
        }
    }

    pub(super) fn schedule_heartbeat(&mut self, conn: ConnId, serial: u64, at: Millis) {
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
    pub(super) fn close(&mut self, conn: ConnId, code: u16, reason: &'static str, now: Millis) {
        // Answers the backplane still owes (acks of messages it accepted)
        // go out before the close: the close waits for them, taking no more
        // requests meanwhile. Only a live session waits; one over its hard
        // mark is gone already.
        if let Some(session) = self.session_mut(conn)
            && !session.closing
            && session
                .replies
                .iter()
                .any(|slot| matches!(slot, Slot::Waiting(_)))
        {
            session.close_after_replies = Some((code, reason));
            return;
        }
        self.closes.push(CloseRequest { conn, code, reason });
        self.detach(conn, now);
    }

    /// The client sent a frame of any kind: a sign of life for the heartbeat.
    pub fn saw_activity(&mut self, conn: ConnId, now: Millis) {
        if let Some(session) = self.session_mut(conn) {
            session.last_seen = now;
        }
    }
}

/// The hub's rooms and users, computed only when a backplane asks (when it
/// registers this node elsewhere).
struct HubView<'a> {
    rooms: &'a Slab<Room>,
    users: &'a HashMap<Box<str>, Vec<ConnId>>,
    sessions: &'a [Option<Session>],
}

impl HubView<'_> {
    fn user_json(&self, user_id: &str) -> Option<String> {
        let conn = *self.users.get(user_id)?.first()?;
        let session = self.sessions.get(conn)?.as_ref()?;
        Some(session.user_json.to_string())
    }
}

impl LocalView for HubView<'_> {
    fn occupied_rooms(&self) -> Vec<(String, UsersHere)> {
        self.rooms
            .iter()
            .filter(|(_, room)| !room.members.is_empty())
            .map(|(_, room)| {
                let users = room
                    .users
                    .iter()
                    .filter_map(|(user_id, &count)| {
                        let user_json = self.user_json(user_id)?;
                        Some((user_id.to_string(), count, user_json))
                    })
                    .collect();
                (room.name.to_string(), users)
            })
            .collect()
    }

    fn users(&self) -> Vec<(String, u32)> {
        self.users
            .iter()
            .map(|(user_id, conns)| {
                (
                    user_id.to_string(),
                    u32::try_from(conns.len()).unwrap_or(u32::MAX),
                )
            })
            .collect()
    }
}
