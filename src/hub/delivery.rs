//! Queueing frames: replies, room traffic (encoded once, the same bytes to
//! every member), the soft and hard marks, and `lagged`.

use bytes::Bytes;

use super::session::{Buffered, MAX_BUFFERED, Session, Slot};
use super::{ConnId, Hub, Millis, RoomId};
use crate::backplane::RoomRef;
use crate::metrics::{DropReason, Metrics};
use crate::outbound::{Marks, Offer};
use crate::protocol::FrameBuilder;

/// Who a broadcast skips.
#[derive(Clone, Copy)]
pub(super) enum Except<'a> {
    Nobody,
    /// The connection that caused it (`user_joined` goes to the others).
    Connection(ConnId),
    /// Every connection of a user (`typing` never echoes to the typist).
    User(&'a str),
}

impl Hub {
    /// Queues a reply to the connection's own request: never dropped above the
    /// soft mark, and behind earlier replies still waiting for the backplane.
    pub(super) fn reply(&mut self, conn: ConnId, frame: Bytes) {
        if let Some(session) = self.session_mut(conn)
            && !session.replies.is_empty()
        {
            session.replies.push_back(Slot::Ready(frame));
            return;
        }
        self.deliver(conn, frame, false);
    }

    /// Queues a frame under the marks; true when it was queued.
    pub(super) fn deliver(&mut self, conn: ConnId, frame: Bytes, droppable: bool) -> bool {
        let marks = self.config.marks;
        let Some(session) = self.sessions.get_mut(conn).and_then(Option::as_mut) else {
            return false;
        };
        let mut sinks = Sinks {
            dirty: &mut self.dirty,
            evicted: &mut self.evicted,
            metrics: &mut self.metrics,
        };
        deliver_to(conn, session, frame, droppable, marks, &mut sinks)
    }

    /// Queues the same frame bytes to every member of the room here, except
    /// whom `except` names (a frame the hub decides itself, without a seq).
    pub(super) fn broadcast(
        &mut self,
        room_id: RoomId,
        frame: &Bytes,
        except: Except<'_>,
    ) -> usize {
        self.deliver_traffic(room_id, None, except, frame)
    }

    /// A room-wide frame without a seq (`typing`): to the members here now,
    /// or through the backplane, which brings it back as traffic.
    pub(super) fn room_frame(&mut self, room_id: RoomId, frame: &Bytes, except_user: Option<&str>) {
        let Some(room) = self.rooms.get(room_id) else {
            return;
        };
        let room = RoomRef {
            id: room_id,
            name: &room.name,
        };
        if self.backplane.room_frame(room, frame, except_user) {
            let except = except_user.map_or(Except::Nobody, Except::User);
            self.deliver_traffic(room_id, None, except, frame);
        }
    }

    /// The encode-once fan-out: room traffic (a `message` with its `seq`, or
    /// another room-wide frame), the same bytes to every member here; returns
    /// how many it was queued to. A member whose join has not taken effect
    /// yet skips what came before it and holds what came after it until its
    /// `joined` is out (only when the backplane answers later).
    pub(super) fn deliver_traffic(
        &mut self,
        room_id: RoomId,
        seq: Option<u64>,
        except: Except<'_>,
        frame: &Bytes,
    ) -> usize {
        let marks = self.config.marks;
        let Some(room) = self.rooms.get(room_id) else {
            return 0;
        };
        let joining = room.joining > 0;
        let mut sinks = Sinks {
            dirty: &mut self.dirty,
            evicted: &mut self.evicted,
            metrics: &mut self.metrics,
        };
        let mut delivered = 0;
        for &member in &room.members {
            let Some(session) = self.sessions.get_mut(member).and_then(Option::as_mut) else {
                continue;
            };
            if skips(except, member, session) {
                continue;
            }
            if joining && let Some(cursor) = session.cursor_mut(room_id) {
                // Before the marker: from before this join. After it: wait for `joined`.
                if cursor.marker && cursor.buffer.len() < MAX_BUFFERED {
                    cursor.buffer.push(Buffered {
                        seq,
                        frame: frame.clone(),
                    });
                }
                continue;
            }
            if deliver_room(
                member,
                session,
                room_id,
                seq,
                frame.clone(),
                marks,
                &mut sinks,
            ) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Queues one room frame to one member (droppable, `lagged` on a drop).
    pub(super) fn deliver_room_frame(
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
        let mut sinks = Sinks {
            dirty: &mut self.dirty,
            evicted: &mut self.evicted,
            metrics: &mut self.metrics,
        };
        deliver_room(conn, session, room_id, seq, frame, marks, &mut sinks);
    }

    /// Queues a frame to every connection of a user here; returns how many.
    pub(super) fn deliver_to_user(&mut self, user_id: &str, frame: &Bytes) -> usize {
        let Hub {
            users,
            sessions,
            config,
            dirty,
            evicted,
            metrics,
            ..
        } = self;
        let Some(targets) = users.get(user_id) else {
            return 0;
        };
        let mut sinks = Sinks {
            dirty,
            evicted,
            metrics,
        };
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
                &mut sinks,
            ) {
                delivered += 1;
            }
        }
        delivered
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
            let frame = lagged_frame(&room.name, span.from_seq, span.to_seq);
            self.reply(conn, frame);
        }
    }

    /// Closes the connections pushed over the hard mark, which may announce
    /// `user_left` and so evict more; runs until nothing is left.
    pub(super) fn settle(&mut self, now: Millis) {
        while let Some(conn) = self.evicted.pop() {
            self.close(conn, 4000, "slow consumer", now);
        }
    }
}

/// `lagged` for a room's seqs `from..=to`.
pub(super) fn lagged_frame(room: &str, from: u64, to: u64) -> Bytes {
    FrameBuilder::new("lagged", None)
        .string("room", room)
        .number("from_seq", from)
        .number("to_seq", to)
        .finish()
}

fn skips(except: Except<'_>, member: ConnId, session: &Session) -> bool {
    match except {
        Except::Nobody => false,
        Except::Connection(conn) => conn == member,
        Except::User(user_id) => *session.user_id == *user_id,
    }
}

/// Where delivery records what it did: dirty connections, evictions, counters.
pub(super) struct Sinks<'a> {
    pub(super) dirty: &'a mut Vec<ConnId>,
    pub(super) evicted: &'a mut Vec<ConnId>,
    pub(super) metrics: &'a mut Metrics,
}

/// Queues one room frame to a member (droppable above the soft mark); a
/// dropped message is remembered for `lagged`.
fn deliver_room(
    conn: ConnId,
    session: &mut Session,
    room_id: RoomId,
    seq: Option<u64>,
    frame: Bytes,
    marks: Marks,
    sinks: &mut Sinks<'_>,
) -> bool {
    let queued = deliver_to(conn, session, frame, true, marks, sinks);
    if !queued && let Some(seq) = seq {
        session.missed(room_id, seq);
    }
    queued
}

/// Offers a frame to a connection's queue under the marks.
pub(super) fn deliver_to(
    conn: ConnId,
    session: &mut Session,
    frame: Bytes,
    droppable: bool,
    marks: Marks,
    sinks: &mut Sinks<'_>,
) -> bool {
    if session.closing {
        return false;
    }
    match session.outbound.offer(frame, droppable, marks) {
        Offer::Dropped => {
            session.dropped += 1;
            sinks.metrics.drop_frames(DropReason::SoftMark, 1);
            false
        }
        Offer::OverHard => {
            let discarded = session.outbound.chunk_count() as u64;
            session.outbound.clear();
            session.closing = true;
            sinks.metrics.drop_frames(DropReason::HardMark, discarded);
            sinks.metrics.slow_consumers_closed += 1;
            sinks.evicted.push(conn);
            false
        }
        Offer::Queued => {
            sinks.metrics.messages_sent += 1;
            if !session.dirty {
                session.dirty = true;
                sinks.dirty.push(conn);
            }
            true
        }
    }
}
