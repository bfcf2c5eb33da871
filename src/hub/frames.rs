//! The frames whose content is a rule: `joined` with its recovery verdict,
//! `presence`, `typing`, `direct`, and the refusals shared by every path.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{Refusal, RoomOptions};
use crate::backplane::{JoinState, PresenceEntry};
use crate::protocol::{ErrorCode, FrameBuilder, error_frame};

/// `joined` and the replay (§5, §11 "Rooms and recovery"): recovered when
/// the client's epoch is the room's, its `since` is not ahead of the room,
/// and the history still holds everything after `since`.
pub(super) fn joined(
    id: Option<&RawValue>,
    room: &str,
    state: &JoinState,
    since: Option<u64>,
    client_epoch: Option<&str>,
) -> Vec<Bytes> {
    let mut frame = FrameBuilder::new("joined", id)
        .string("room", room)
        .number("count", state.count)
        .number("seq", state.seq)
        .string("epoch", &state.epoch);
    let mut replay: &[Bytes] = &[];
    if let Some(since) = since {
        let same_epoch = client_epoch.is_none_or(|epoch| epoch == &*state.epoch);
        let recovered = if !same_epoch || since > state.seq {
            false
        } else {
            replay = &state.replay;
            since == state.seq
                || state
                    .oldest_held
                    .is_some_and(|oldest| oldest <= since.saturating_add(1))
        };
        frame = frame
            .boolean("recovered", recovered)
            .number("missed", replay.len() as u64);
    }
    let mut frames = Vec::with_capacity(1 + replay.len());
    frames.push(frame.finish());
    frames.extend(replay.iter().cloned());
    frames
}

/// `presence`, one entry per user: entries of one user from several places
/// are merged, in the order the users first appear.
pub(super) fn presence(id: Option<&RawValue>, room: &str, entries: Vec<PresenceEntry>) -> Bytes {
    let mut users: Vec<PresenceEntry> = Vec::new();
    let mut positions: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
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
        list.push_str(&format!(",\"connections\":{connections}}}"));
    }
    list.push(']');
    FrameBuilder::new("presence", id)
        .string("room", room)
        .raw("users", &list)
        .finish()
}

/// `typing` of a user in a room.
pub(super) fn typing(room: &str, user_json: &str, is_typing: bool) -> Bytes {
    FrameBuilder::new("typing", None)
        .string("room", room)
        .raw("user", user_json)
        .boolean("is_typing", is_typing)
        .finish()
}

/// `direct` from a user (or the server) with raw JSON content.
pub(super) fn direct(from_json: &str, content: &str, now: u64) -> Bytes {
    FrameBuilder::with_capacity("direct", None, from_json.len() + content.len() + 48)
        .raw("from", from_json)
        .raw("content", content)
        .number("ts", now)
        .finish()
}

/// `user_offline` for a `direct` to nobody.
pub(super) fn user_offline(to: &str) -> Refusal {
    Refusal::new(
        ErrorCode::UserOffline,
        format!("{} has no open connection", truncated(to)),
    )
}

/// `not_in_room` for a request about a room the connection has not joined.
pub(super) fn not_in_room(room: &str) -> Refusal {
    Refusal::new(ErrorCode::NotInRoom, format!("join {room} first"))
}

/// `left`, the answer to a `leave` (or an unsubscribe, without `id`).
pub(super) fn left(id: Option<&RawValue>, room: &str) -> Bytes {
    FrameBuilder::new("left", id).string("room", room).finish()
}

/// `room_full` for a join over the namespace's `max_members` (§14.1).
pub(super) fn room_full(room: &str, options: &RoomOptions) -> Refusal {
    Refusal::new(
        ErrorCode::RoomFull,
        format!("{room} has its {} members", options.max_members),
    )
}

/// `unavailable` for a request the backplane cannot serve now.
pub(super) fn unavailable(id: Option<&RawValue>) -> Bytes {
    let refusal = Refusal::unavailable();
    error_frame(id, refusal.code, &refusal.message)
}

/// At most 64 bytes of a client-given name, cut on a character boundary.
fn truncated(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}
