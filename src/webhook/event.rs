//! What a webhook says happened (PROTOCOL §14.2), and its JSON.

use std::io::Write;

use crate::protocol;

/// The kinds of event a webhook reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventName {
    /// A room with no member got its first.
    RoomOccupied,
    /// A room's last member left (disconnects included).
    RoomVacated,
    /// A user's first connection joined the room.
    MemberAdded,
    /// A user's last connection left the room.
    MemberRemoved,
    /// A client `message` in a room with `webhook_messages = true`.
    Message,
}

impl EventName {
    /// The event's `name` in the JSON.
    fn as_str(self) -> &'static str {
        match self {
            EventName::RoomOccupied => "room_occupied",
            EventName::RoomVacated => "room_vacated",
            EventName::MemberAdded => "member_added",
            EventName::MemberRemoved => "member_removed",
            EventName::Message => "message",
        }
    }
}

/// One event, as the hub or a backplane hands it to [`super::Webhooks::push`].
///
/// It is its JSON object, written once when the event is made: one
/// allocation on the event loop (the sender thread frees it), and the
/// batch's body is the events' texts joined. The user and the message
/// content arrive already encoded (the hub keeps them as JSON text) and go
/// in verbatim rather than being decoded and encoded again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    json: String,
}

impl Event {
    /// `room_occupied`: `room` got its first member.
    pub fn room_occupied(room: &str, time_ms: u64) -> Self {
        Self::new(EventName::RoomOccupied, room, time_ms, None, None)
    }

    /// `room_vacated`: `room`'s last member left.
    pub fn room_vacated(room: &str, time_ms: u64) -> Self {
        Self::new(EventName::RoomVacated, room, time_ms, None, None)
    }

    /// `member_added`: the user's first connection joined `room`.
    pub fn member_added(room: &str, user_json: &str, time_ms: u64) -> Self {
        Self::new(EventName::MemberAdded, room, time_ms, Some(user_json), None)
    }

    /// `member_removed`: the user's last connection left `room`.
    pub fn member_removed(room: &str, user_json: &str, time_ms: u64) -> Self {
        Self::new(
            EventName::MemberRemoved,
            room,
            time_ms,
            Some(user_json),
            None,
        )
    }

    /// `message`: a client message took `seq` in `room`; `content` is its
    /// raw JSON as the members got it.
    pub fn message(room: &str, seq: u64, user_json: &str, content: &str, time_ms: u64) -> Self {
        let message = Some((seq, content));
        Self::new(EventName::Message, room, time_ms, Some(user_json), message)
    }

    fn new(
        name: EventName,
        room: &str,
        time_ms: u64,
        user_json: Option<&str>,
        message: Option<(u64, &str)>,
    ) -> Self {
        let extra = user_json.map_or(0, str::len) + message.map_or(0, |(_, c)| c.len());
        // The fixed keys, two numbers and a little escaping: no regrowth.
        let mut json = Vec::with_capacity(room.len() + extra + 112);
        json.extend_from_slice(b"{\"name\":\"");
        json.extend_from_slice(name.as_str().as_bytes());
        json.extend_from_slice(b"\",\"room\":");
        protocol::write_json_string(&mut json, room);
        // Writing into a Vec cannot fail.
        let _ = write!(json, ",\"time_ms\":{time_ms}");
        if let Some((seq, _)) = message {
            let _ = write!(json, ",\"seq\":{seq}");
        }
        if let Some(user) = user_json {
            json.extend_from_slice(b",\"user\":");
            json.extend_from_slice(user.as_bytes());
        }
        if let Some((_, content)) = message {
            json.extend_from_slice(b",\"content\":");
            json.extend_from_slice(content.as_bytes());
        }
        json.push(b'}');
        // Only valid UTF-8 went in.
        let json = String::from_utf8(json).unwrap_or_default();
        Event { json }
    }

    /// The event's JSON object, e.g.
    /// `{"name":"member_added","room":"lobby","time_ms":1,"user":{"id":"a","name":"A"}}`.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Appends the event's JSON object.
    pub fn write_json(&self, out: &mut String) {
        out.push_str(&self.json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(event: &Event) -> serde_json::Value {
        let mut out = String::new();
        event.write_json(&mut out);
        serde_json::from_str(&out).unwrap_or_else(|error| panic!("{out}: {error}"))
    }

    #[test]
    fn every_event_has_its_fields() {
        let user = r#"{"id":"a","name":"Ann"}"#;
        assert_eq!(
            json(&Event::room_occupied("lobby", 5)),
            serde_json::json!({"name": "room_occupied", "room": "lobby", "time_ms": 5})
        );
        assert_eq!(
            json(&Event::room_vacated("lobby", 6))["name"],
            "room_vacated"
        );
        assert_eq!(
            json(&Event::member_added("lobby", user, 7)),
            serde_json::json!({"name": "member_added", "room": "lobby", "time_ms": 7,
                               "user": {"id": "a", "name": "Ann"}})
        );
        assert_eq!(
            json(&Event::member_removed("lobby", user, 8))["user"]["id"],
            "a"
        );
        assert_eq!(
            json(&Event::message("lobby", 42, user, r#"{"text":"hi"}"#, 9)),
            serde_json::json!({"name": "message", "room": "lobby", "time_ms": 9, "seq": 42,
                               "user": {"id": "a", "name": "Ann"}, "content": {"text": "hi"}})
        );
    }

    #[test]
    fn the_room_is_escaped() {
        let room = "a\"b\\c\nd\u{1}é";
        assert_eq!(json(&Event::room_occupied(room, 1))["room"], room);
    }
}
