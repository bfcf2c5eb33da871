//! What a webhook says happened (PROTOCOL §14.2), and its JSON.

use std::fmt::Write;

/// The kinds of event a webhook reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventName {
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
    pub fn as_str(self) -> &'static str {
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
/// The user and the message content arrive already encoded: the hub keeps
/// them as JSON text, and the webhook inserts them verbatim rather than
/// decoding and encoding them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub name: EventName,
    /// The room it happened in.
    pub room: Box<str>,
    /// When, in Unix milliseconds.
    pub time_ms: u64,
    /// The user `{"id":…,"name":…}` as raw JSON, inserted verbatim as `user`.
    pub user_json: Option<Box<str>>,
    /// The message's seq (`message` only).
    pub seq: Option<u64>,
    /// The message's content as raw JSON, inserted verbatim as `content`
    /// (`message` only).
    pub content: Option<Box<str>>,
}

impl Event {
    /// `room_occupied`: `room` got its first member.
    pub fn room_occupied(room: impl Into<Box<str>>, time_ms: u64) -> Self {
        Self::plain(EventName::RoomOccupied, room.into(), time_ms, None)
    }

    /// `room_vacated`: `room`'s last member left.
    pub fn room_vacated(room: impl Into<Box<str>>, time_ms: u64) -> Self {
        Self::plain(EventName::RoomVacated, room.into(), time_ms, None)
    }

    /// `member_added`: the user's first connection joined `room`.
    pub fn member_added(
        room: impl Into<Box<str>>,
        user_json: impl Into<Box<str>>,
        time_ms: u64,
    ) -> Self {
        Self::plain(
            EventName::MemberAdded,
            room.into(),
            time_ms,
            Some(user_json.into()),
        )
    }

    /// `member_removed`: the user's last connection left `room`.
    pub fn member_removed(
        room: impl Into<Box<str>>,
        user_json: impl Into<Box<str>>,
        time_ms: u64,
    ) -> Self {
        Self::plain(
            EventName::MemberRemoved,
            room.into(),
            time_ms,
            Some(user_json.into()),
        )
    }

    /// `message`: a client message took `seq` in `room`; `content` is its
    /// raw JSON as the members got it.
    pub fn message(
        room: impl Into<Box<str>>,
        seq: u64,
        user_json: impl Into<Box<str>>,
        content: impl Into<Box<str>>,
        time_ms: u64,
    ) -> Self {
        Event {
            name: EventName::Message,
            room: room.into(),
            time_ms,
            user_json: Some(user_json.into()),
            seq: Some(seq),
            content: Some(content.into()),
        }
    }

    fn plain(name: EventName, room: Box<str>, time_ms: u64, user_json: Option<Box<str>>) -> Self {
        Event {
            name,
            room,
            time_ms,
            user_json,
            seq: None,
            content: None,
        }
    }

    /// Appends the event's JSON object, e.g.
    /// `{"name":"member_added","room":"lobby","time_ms":1,"user":{"id":"a","name":"A"}}`.
    pub fn write_json(&self, out: &mut String) {
        out.push_str("{\"name\":\"");
        out.push_str(self.name.as_str());
        out.push_str("\",\"room\":");
        write_json_string(out, &self.room);
        // Writing into a String cannot fail.
        let _ = write!(out, ",\"time_ms\":{}", self.time_ms);
        if let Some(seq) = self.seq {
            let _ = write!(out, ",\"seq\":{seq}");
        }
        if let Some(user) = &self.user_json {
            out.push_str(",\"user\":");
            out.push_str(user);
        }
        if let Some(content) = &self.content {
            out.push_str(",\"content\":");
            out.push_str(content);
        }
        out.push('}');
    }
}

/// Appends `value` as a JSON string literal.
fn write_json_string(out: &mut String, value: &str) {
    out.push('"');
    for character in value.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            control if u32::from(control) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(control));
            }
            other => out.push(other),
        }
    }
    out.push('"');
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
