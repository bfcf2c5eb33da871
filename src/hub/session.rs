//! What the hub keeps per connection: identity, memberships, the outbound
//! queue, the rate bucket, and replies that wait for the backplane.

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;

use super::{Millis, RoomId};
use crate::auth::{Identity, RoomAccess};
use crate::backplane::RequestId;
use crate::outbound::OutboundQueue;

/// Frames kept for one joining connection while its `joined` waits.
pub(super) const MAX_BUFFERED: usize = 4096;

/// Messages of one room a connection did not get because it was above its
/// soft mark, reported as `lagged` once it drains.
pub(super) struct LaggedSpan {
    pub(super) room: RoomId,
    pub(super) from_seq: u64,
    pub(super) to_seq: u64,
}

/// A token bucket: `rate` tokens a second, at most `burst` banked.
pub(super) struct RateBucket {
    pub(super) tokens: f64,
    pub(super) updated: Millis,
    /// Messages refused in a row; `2 × burst` of them close the connection.
    pub(super) refused_in_a_row: u32,
}

impl RateBucket {
    pub(super) fn full(burst: u32, now: Millis) -> Self {
        RateBucket {
            tokens: f64::from(burst.max(1)),
            updated: now,
            refused_in_a_row: 0,
        }
    }
}

/// A reply in a connection's queue of replies, kept in request order while
/// some wait for the backplane.
pub(super) enum Slot {
    /// Ready to go once everything before it went.
    Ready(Bytes),
    /// Waits for the answer to this request.
    Waiting(RequestId),
    /// The answer's frames; for a first `joined`, the room whose traffic may
    /// start after it.
    Done(Vec<Bytes>, Option<RoomId>),
}

/// Where a joining connection is in its room's stream, while its join
/// waits for the backplane.
#[derive(Default)]
pub(super) struct JoinCursor {
    /// The join took effect in the stream: later traffic is for this connection.
    pub(super) marker: bool,
    /// Its `joined` (and replay) is queued.
    pub(super) replied: bool,
    /// Traffic after the marker, before `joined`.
    pub(super) buffer: Vec<Buffered>,
}

/// Room traffic held in a cursor.
pub(super) struct Buffered {
    pub(super) seq: Option<u64>,
    pub(super) frame: Bytes,
}

pub(super) struct Membership {
    pub(super) room: RoomId,
    /// Position of this connection in the room's `members`.
    pub(super) slot: usize,
    /// Set while the join has not taken effect for this connection (the
    /// backplane answers later); `None` once room traffic flows.
    pub(super) cursor: Option<Box<JoinCursor>>,
}

pub(super) struct Session {
    /// Unique for the hub's life: tells this connection from a later one on the same key.
    pub(super) serial: u64,
    /// The public id sent in `welcome`.
    pub(super) connection_id: Box<str>,
    pub(super) user_id: Box<str>,
    /// `{"id":…,"name":…}`, encoded once and reused in every frame about this
    /// user; shared so that holding it across a broadcast costs no allocation.
    pub(super) user_json: Rc<str>,
    pub(super) access: RoomAccess,
    pub(super) expires_at: Option<u64>,
    pub(super) memberships: Vec<Membership>,
    pub(super) outbound: OutboundQueue,
    /// Listed in `Hub::dirty` since the shell last drained it.
    pub(super) dirty: bool,
    /// No more frames are queued; the shell is closing the socket.
    pub(super) closing: bool,
    /// An `/echo` connection: no user, no rooms.
    pub(super) echo: bool,
    /// When the client last sent any frame.
    pub(super) last_seen: Millis,
    pub(super) rate: RateBucket,
    pub(super) lagged: Vec<LaggedSpan>,
    /// Replies in request order while some wait for the backplane.
    pub(super) replies: VecDeque<Slot>,
    /// A close decided while replies still waited: it happens once they are out.
    pub(super) close_after_replies: Option<(u16, &'static str)>,
    /// When the connection was handed to the hub (`/api/users`, §14.3).
    pub(super) connected_at: Millis,
    /// Room broadcasts dropped to it at the soft mark (`/api/users`).
    pub(super) dropped: u64,
    /// The peer's `ip:port`, as the shell reported it.
    pub(super) remote: Option<Box<str>>,
    /// Rooms `/api/subscribe` put it in: usable outside its `rooms` claim
    /// (§14.3), until `/api/unsubscribe` takes them back.
    pub(super) granted: Vec<Box<str>>,
}

impl Session {
    pub(super) fn new(
        serial: u64,
        identity: Identity,
        user_json: Rc<str>,
        rate: RateBucket,
        now: Millis,
    ) -> Self {
        Session {
            serial,
            connection_id: Box::default(),
            user_id: identity.user_id.into_boxed_str(),
            user_json,
            access: identity.rooms,
            expires_at: identity.expires_at,
            memberships: Vec::new(),
            outbound: OutboundQueue::new(),
            dirty: false,
            closing: false,
            echo: false,
            last_seen: now,
            rate,
            lagged: Vec::new(),
            replies: VecDeque::new(),
            close_after_replies: None,
            connected_at: now,
            dropped: 0,
            remote: None,
            granted: Vec::new(),
        }
    }

    /// An `/echo` connection: no user, no rooms.
    pub(super) fn echo(serial: u64, rate: RateBucket, now: Millis) -> Self {
        Session {
            echo: true,
            access: RoomAccess::Patterns(Vec::new()),
            ..Session::new(
                serial,
                Identity {
                    user_id: String::new(),
                    name: String::new(),
                    expires_at: None,
                    rooms: RoomAccess::Patterns(Vec::new()),
                },
                Rc::from(""),
                rate,
                now,
            )
        }
    }

    /// Remembers a dropped `message` of a room for the `lagged` notice.
    pub(super) fn missed(&mut self, room: RoomId, seq: u64) {
        if self.closing {
            return;
        }
        match self.lagged.iter_mut().find(|span| span.room == room) {
            Some(span) => span.to_seq = seq,
            None => self.lagged.push(LaggedSpan {
                room,
                from_seq: seq,
                to_seq: seq,
            }),
        }
    }

    /// The connection's join cursor for a room, while it has one.
    pub(super) fn cursor_mut(&mut self, room: RoomId) -> Option<&mut JoinCursor> {
        self.memberships
            .iter_mut()
            .find(|m| m.room == room)?
            .cursor
            .as_deref_mut()
    }
}
