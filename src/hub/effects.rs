//! What the backplane reports back: answers that came later, room traffic
//! from elsewhere, joins taking effect, and the room-wide corrections after
//! an outage.

use serde_json::value::RawValue;

use super::delivery::{Except, lagged_frame};
use super::session::Slot;
use super::{ApiAnswer, CloseRequest, ConnId, Hub, Millis, RoomId, frames};
use crate::backplane::{Answer, Effect, RequestId, Resume, RoomTraffic, UserItem};
use crate::protocol::{FrameBuilder, error_frame};

/// A join whose answer is awaited, with what the answer is for.
pub(super) struct PendingJoin {
    pub(super) conn: ConnId,
    pub(super) serial: u64,
    pub(super) id: Option<Box<RawValue>>,
    pub(super) room: RoomId,
    pub(super) life: u64,
    pub(super) name: Box<str>,
    pub(super) since: Option<u64>,
    pub(super) epoch: Option<String>,
    pub(super) first: bool,
    /// The client asked; false when the server API subscribed it, which
    /// skips a connection a limit refuses without telling it (§14.3).
    pub(super) asked: bool,
}

/// What an answer the backplane owes is for.
pub(super) enum Waiting {
    Join(Box<PendingJoin>),
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
    /// A server API request; the shell waits for the answer by `ticket`.
    Api {
        ticket: u64,
        kind: super::ApiKind,
    },
}

impl Hub {
    /// Applies the backplane's effects, in order.
    pub(super) fn apply_effects(&mut self, now: Millis) {
        let mut effects = std::mem::take(&mut self.effects);
        self.backplane.take_effects(&mut effects);
        for effect in effects.drain(..) {
            self.apply_effect(effect, now);
        }
        self.effects = effects;
    }

    fn apply_effect(&mut self, effect: Effect, now: Millis) {
        match effect {
            Effect::Answer { request, answer } => self.on_answer(request, answer, now),
            Effect::Traffic(traffic) => self.on_traffic(traffic),
            Effect::JoinMarked(request) => {
                if let Some((conn, serial, room)) = self.joins_in_flight.remove(&request)
                    && self.serial_of(conn) == serial
                {
                    self.marker_seen(conn, room);
                }
            }
            Effect::StreamsRestarted => {
                // Whatever comes next is after every join.
                self.joins_in_flight.clear();
                self.release_cursors();
            }
            Effect::Resume(resume) => self.on_resume(resume),
            Effect::User { user, item } => match item {
                UserItem::Direct(frame) => {
                    self.deliver_to_user(&user, &frame);
                }
                UserItem::Kick => {
                    let connections = self.users.get(&*user).cloned().unwrap_or_default();
                    for conn in connections {
                        self.close(conn, 4003, "disconnected by the server", now);
                    }
                }
                UserItem::Subscribe(_) | UserItem::Unsubscribe(_) => {
                    let changed = self.apply_membership(&user, &item, now);
                    self.backplane.user_item_applied(changed);
                }
            },
        }
    }

    fn on_traffic(&mut self, traffic: RoomTraffic) {
        let Some(&room_id) = self.room_ids.get(&traffic.room) else {
            return;
        };
        let except = traffic
            .except
            .as_deref()
            .map_or(Except::Nobody, Except::User);
        self.deliver_traffic(room_id, traffic.seq, except, &traffic.frame);
    }

    /// Brings a room's members from what they saw before an outage to the
    /// live stream: `joined` when the epoch is new, `lagged` for what the
    /// history no longer holds, the messages they missed, then `lagged` for
    /// what overflowed meanwhile. Joining members are left out: their own
    /// `joined` tells them where they start.
    fn on_resume(&mut self, resume: Resume) {
        let Some(&room_id) = self.room_ids.get(&resume.room) else {
            return;
        };
        let members = self.flowing_members(room_id);
        let mut notices = Vec::new();
        if let Some(state) = &resume.new_epoch {
            let joined = FrameBuilder::new("joined", None)
                .string("room", &resume.room)
                .number("count", state.count)
                .number("seq", state.seq)
                .string("epoch", &state.epoch)
                .boolean("recovered", state.recovered)
                .number("missed", state.missed)
                .finish();
            notices.push(joined);
        }
        if let Some((from, to)) = resume.lost {
            notices.push(lagged_frame(&resume.room, from, to));
        }
        for frame in notices {
            for &member in &members {
                self.deliver(member, frame.clone(), false);
            }
        }
        for (seq, frame) in resume.messages {
            for &member in &members {
                self.deliver_room_frame(member, room_id, Some(seq), frame.clone());
            }
        }
        if let Some((from, to)) = resume.overflow {
            let frame = lagged_frame(&resume.room, from, to);
            for &member in &members {
                self.deliver(member, frame.clone(), false);
            }
        }
    }

    /// The room's members that room traffic flows to (not joining).
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

    fn on_answer(&mut self, request: RequestId, answer: Option<Answer>, now: Millis) {
        let Some(waiting) = self.waiting.remove(&request) else {
            return;
        };
        match waiting {
            Waiting::Join(join) => self.join_answered(request, *join, answer, now),
            Waiting::Message { conn, serial, id } => {
                if self.serial_of(conn) != serial {
                    return;
                }
                let frames = match (answer, id) {
                    (Some(Answer::Published { seq, .. }), Some(id)) => {
                        vec![
                            FrameBuilder::new("ack", Some(&id))
                                .number("seq", seq)
                                .finish(),
                        ]
                    }
                    (Some(Answer::Published { .. }), None) => Vec::new(),
                    (_, id) => vec![frames::unavailable(id.as_deref())],
                };
                self.fill(conn, request, Slot::Done(frames, None), now);
            }
            Waiting::Direct {
                conn,
                serial,
                id,
                to,
            } => {
                if self.serial_of(conn) != serial {
                    return;
                }
                let frames = match answer {
                    Some(Answer::Sent(0)) => {
                        let refusal = frames::user_offline(&to);
                        vec![error_frame(id.as_deref(), refusal.code, &refusal.message)]
                    }
                    Some(Answer::Sent(_)) => match id {
                        Some(id) => vec![FrameBuilder::new("ack", Some(&id)).finish()],
                        None => Vec::new(),
                    },
                    _ => vec![frames::unavailable(id.as_deref())],
                };
                self.fill(conn, request, Slot::Done(frames, None), now);
            }
            Waiting::Presence {
                conn,
                serial,
                id,
                room,
            } => {
                if self.serial_of(conn) != serial {
                    return;
                }
                let frame = match answer {
                    Some(Answer::Presence(entries)) => {
                        frames::presence(id.as_deref(), &room, entries)
                    }
                    _ => frames::unavailable(id.as_deref()),
                };
                self.fill(conn, request, Slot::Done(vec![frame], None), now);
            }
            Waiting::Api { ticket, kind } => {
                let answer = super::api::answer_of(kind, answer);
                self.api_answers.push((ticket, answer));
            }
        }
    }

    /// A join's answer: `joined` and its replay in the reply's place, or
    /// `unavailable` and the membership undone when it did not take effect.
    fn join_answered(
        &mut self,
        request: RequestId,
        join: PendingJoin,
        answer: Option<Answer>,
        now: Millis,
    ) {
        let PendingJoin {
            conn,
            serial,
            id,
            room,
            life,
            name,
            since,
            epoch,
            first,
            asked,
        } = join;
        let alive = self.serial_of(conn) == serial;
        let Some(Answer::Joined(state)) = answer else {
            // It did not take effect: no marker will come.
            self.joins_in_flight.remove(&request);
            if !alive {
                return;
            }
            // Undo a first join that did not take effect.
            let member = first
                && self.rooms.get(room).is_some_and(|r| r.life == life)
                && self.has_cursor(conn, room);
            if member {
                self.remove_membership(conn, room, now);
            }
            let frame = frames::unavailable(id.as_deref());
            self.fill(conn, request, Slot::Done(vec![frame], None), now);
            return;
        };
        if !alive {
            return;
        }
        if state.full {
            self.joins_in_flight.remove(&request);
            if first && self.rooms.get(room).is_some_and(|r| r.life == life) {
                self.drop_unadmitted_membership(conn, room, now);
            }
            let refusal = frames::room_full(&name, self.config.namespaces.for_room(&name));
            let frame = error_frame(id.as_deref(), refusal.code, &refusal.message);
            let frames = if asked { vec![frame] } else { Vec::new() };
            if !asked && let Some(session) = self.session_mut(conn) {
                // The API's grant goes with the subscription it refused.
                session.granted.retain(|granted| **granted != *name);
            }
            self.fill(conn, request, Slot::Done(frames, None), now);
            return;
        }
        let frames = frames::joined(id.as_deref(), &name, &state, since, epoch.as_deref());
        let room = (first && self.has_cursor(conn, room)).then_some(room);
        self.fill(conn, request, Slot::Done(frames, room), now);
    }

    fn has_cursor(&mut self, conn: ConnId, room: RoomId) -> bool {
        self.session_mut(conn)
            .is_some_and(|session| session.cursor_mut(room).is_some())
    }

    /// Every joining connection: its join counts as in effect.
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

    fn marker_seen(&mut self, conn: ConnId, room_id: RoomId) {
        let Some(cursor) = self.session_mut(conn).and_then(|s| s.cursor_mut(room_id)) else {
            return;
        };
        cursor.marker = true;
        if cursor.replied {
            self.cursor_done(conn, room_id);
        }
    }

    /// The connection's `joined` went into its queue.
    fn joined_queued(&mut self, conn: ConnId, room_id: RoomId) {
        let Some(cursor) = self.session_mut(conn).and_then(|s| s.cursor_mut(room_id)) else {
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

    /// Puts an answer in its place and sends what is ready in order.
    fn fill(&mut self, conn: ConnId, request: RequestId, done: Slot, now: Millis) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        if let Some(slot) = session
            .replies
            .iter_mut()
            .find(|slot| matches!(slot, Slot::Waiting(r) if *r == request))
        {
            *slot = done;
        }
        self.flush_replies(conn, now);
    }

    fn flush_replies(&mut self, conn: ConnId, now: Millis) {
        loop {
            let Some(session) = self.session_mut(conn) else {
                return;
            };
            if session.replies.is_empty()
                && let Some((code, reason)) = session.close_after_replies.take()
            {
                // The close that waited for these replies.
                self.closes.push(CloseRequest { conn, code, reason });
                self.detach(conn, now);
                return;
            }
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

    /// Server API answers decided since the last call, by the shell's ticket.
    pub fn take_api_answers(&mut self, into: &mut Vec<(u64, ApiAnswer)>) {
        into.append(&mut self.api_answers);
    }
}
