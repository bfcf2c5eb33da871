//! The JSON envelope of PROTOCOL §3–§5: parsing client requests and encoding
//! server frames.
//!
//! Parsing borrows from the received text wherever it can, and `content` is kept
//! as raw JSON (`RawValue`): the server never parses what clients send each other
//! into a tree only to print it again. Encoding writes the JSON straight into the
//! buffer that becomes the WebSocket frame, so a broadcast is one allocation,
//! framed once, and shared by every recipient as the same `Bytes`.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// Longest string `id` a client may attach to a request (§11).
pub const MAX_ID_BYTES: usize = 256;

/// Longest room name (§4).
pub const MAX_ROOM_NAME: usize = 64;

/// Error codes of §5, each with its wire spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not JSON.
    InvalidJson,
    /// Not an object, no `type`, a bad `id` or a payload of the wrong shape.
    InvalidMessage,
    /// A `type` the server does not know.
    UnknownType,
    /// A room name outside 1–64 characters of `A-Z a-z 0-9 _ - . :`.
    InvalidRoom,
    /// The request names a room the connection is not a member of.
    NotInRoom,
    /// Joining would exceed `--max-rooms-per-connection`.
    TooManyRooms,
    /// The token's `rooms` claim does not cover the room.
    Forbidden,
    /// A `direct` to a user with no open connection.
    UserOffline,
    /// A `refresh` carried a token that does not verify or names another user.
    InvalidToken,
    /// Over the connection's message rate.
    RateLimited,
    /// The cluster backend is unreachable.
    Unavailable,
    /// The room has its namespace's `max_members` users (§14.1).
    RoomFull,
}

impl ErrorCode {
    /// The code as it appears in the `error` payload.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UserOffline => "user_offline",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RoomFull => "room_full",
        }
    }
}

/// Whether `name` is a valid room name (§4).
pub fn is_valid_room_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROOM_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// A client request, borrowing from the received text.
#[derive(Debug)]
pub struct Request<'a> {
    /// The client's `id`, as raw JSON (a string or a number), echoed verbatim on replies.
    pub id: Option<&'a RawValue>,
    /// What the client asks for.
    pub body: RequestBody<'a>,
}

/// The requests of §4 with their payloads.
#[derive(Debug)]
pub enum RequestBody<'a> {
    /// Join a room, optionally recovering messages after `since` in `epoch`.
    Join {
        /// Room name, not yet validated.
        room: Cow<'a, str>,
        /// Last seq the client saw.
        since: Option<u64>,
        /// The epoch that `since` belongs to.
        epoch: Option<Cow<'a, str>>,
    },
    /// Leave a room.
    Leave {
        /// Room name, not yet validated.
        room: Cow<'a, str>,
    },
    /// Broadcast `content` to a room.
    Message {
        /// Room name, not yet validated.
        room: Cow<'a, str>,
        /// Any JSON, carried through untouched.
        content: &'a RawValue,
    },
    /// Send `content` to every connection of a user.
    Direct {
        /// The recipient's user id.
        to: Cow<'a, str>,
        /// Any JSON, carried through untouched.
        content: &'a RawValue,
    },
    /// Tell the other members of a room whether this user is typing.
    Typing {
        /// Room name, not yet validated.
        room: Cow<'a, str>,
        /// Typing or stopped.
        is_typing: bool,
    },
    /// List the users in a room.
    Presence {
        /// Room name, not yet validated.
        room: Cow<'a, str>,
    },
    /// Application-level ping for clients that cannot send WebSocket pings.
    Ping,
    /// Replace the connection's token.
    Refresh {
        /// The new token.
        token: Cow<'a, str>,
    },
}

/// A request that could not be parsed: answer with `error` and keep the connection.
#[derive(Debug)]
pub struct RequestError<'a> {
    /// The error code.
    pub code: ErrorCode,
    /// Human text for the `message` field.
    pub message: Cow<'static, str>,
    /// The request's `id` when it was readable (§11), to echo.
    pub id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct JoinPayload<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    epoch: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RoomPayload<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
}

#[derive(Deserialize)]
struct MessagePayload<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow)]
    content: &'a RawValue,
}

#[derive(Deserialize)]
struct DirectPayload<'a> {
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    content: &'a RawValue,
}

#[derive(Deserialize)]
struct TypingPayload<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    is_typing: bool,
}

#[derive(Deserialize)]
struct RefreshPayload<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

/// `content` must be present; `"content": null` is a present JSON null, which
/// serde would fold into a missing `Option`, so it is read as raw JSON.
fn is_json_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

/// Parses one text frame into a request, checking errors in the order of §11:
/// `invalid_json`, `invalid_message`, `unknown_type`. Room names are checked by
/// the hub, which knows the rest of the order.
pub fn parse_request(text: &str) -> Result<Request<'_>, RequestError<'_>> {
    let (id, kind, payload) = parse_envelope(text)?;
    let body = parse_body(&kind, payload, id)?;
    Ok(Request { id, body })
}

/// An `invalid_message` refusal with a fixed text.
fn invalid<'a>(message: &'static str, id: Option<&'a RawValue>) -> RequestError<'a> {
    RequestError {
        code: ErrorCode::InvalidMessage,
        message: Cow::Borrowed(message),
        id,
    }
}

/// The envelope's `id`, `type` and payload text (`{}` when absent or null).
fn parse_envelope(text: &str) -> Result<(Option<&RawValue>, Cow<'_, str>, &str), RequestError<'_>> {
    // serde would also accept a JSON array for a struct (fields by position).
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\r']);
    if !trimmed.starts_with('{') {
        return Err(
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                invalid("a frame is a JSON object", None)
            } else {
                RequestError {
                    code: ErrorCode::InvalidJson,
                    message: Cow::Borrowed("the frame is not valid JSON"),
                    id: None,
                }
            },
        );
    }
    let envelope: RawEnvelope<'_> = match serde_json::from_str(text) {
        Ok(envelope) => envelope,
        Err(error) => {
            // A shape error (say, a repeated key) can stop serde before it
            // reaches a syntax error further on: invalid JSON still wins (§11).
            let syntax = error.is_syntax()
                || error.is_eof()
                || serde_json::from_str::<serde::de::IgnoredAny>(text).is_err();
            let code = if syntax {
                ErrorCode::InvalidJson
            } else {
                ErrorCode::InvalidMessage
            };
            return Err(RequestError {
                code,
                message: Cow::Owned(error.to_string()),
                id: None,
            });
        }
    };
    let id = match envelope.id {
        None => None,
        Some(raw) => Some(check_id(raw).map_err(|message| invalid(message, None))?),
    };
    let id = id.flatten();
    let Some(kind_raw) = envelope.kind else {
        return Err(invalid("`type` is required", id));
    };
    let Ok(kind) = serde_json::from_str::<Cow<'_, str>>(kind_raw.get()) else {
        return Err(invalid("`type` must be a string", id));
    };
    let payload = match envelope.payload {
        Some(raw) if raw.get() == "null" => None,
        Some(raw) if !is_json_object(raw) => {
            return Err(invalid("`payload` must be an object", id));
        }
        other => other,
    };
    Ok((id, kind, payload.map_or("{}", RawValue::get)))
}

/// The request of one `type`, from its payload.
fn parse_body<'a>(
    kind: &str,
    payload: &'a str,
    id: Option<&'a RawValue>,
) -> Result<RequestBody<'a>, RequestError<'a>> {
    let shape_error = |error: serde_json::Error| RequestError {
        code: ErrorCode::InvalidMessage,
        message: Cow::Owned(format!("payload: {error}")),
        id,
    };
    let body = match kind {
        "join" => {
            let p: JoinPayload<'_> = serde_json::from_str(payload).map_err(shape_error)?;
            let since = match p.since {
                None => None,
                Some(raw) => Some(
                    parse_since(raw.get())
                        .ok_or_else(|| invalid("`since` must be a non-negative integer", id))?,
                ),
            };
            let epoch = match p.epoch {
                None => None,
                Some(raw) => Some(
                    serde_json::from_str::<Cow<'_, str>>(raw.get())
                        .map_err(|_| invalid("`epoch` must be a string", id))?,
                ),
            };
            RequestBody::Join {
                room: p.room,
                since,
                epoch,
            }
        }
        "leave" => {
            let p: RoomPayload<'_> = serde_json::from_str(payload).map_err(shape_error)?;
            RequestBody::Leave { room: p.room }
        }
        "message" => {
            let p: MessagePayload<'_> = serde_json::from_str(payload).map_err(shape_error)?;
            RequestBody::Message {
                room: p.room,
                content: p.content,
            }
        }
        "direct" => {
            let p: DirectPayload<'_> = serde_json::from_str(payload).map_err(shape_error)?;
            RequestBody::Direct {
                to: p.to,
                content: p.content,
            }
        }
        "typing" => {
            let p: TypingPayload<'_> = serde_json::from_str(payload).map_err(shape_error)?;
            RequestBody::Typing {
                room: p.room,
                is_typing: p.is_typing,
            }
        }
        "presence" => {
            let p: RoomPayload<'_> = serde_json::from_str(payload).map_err(shape_error)?;
            RequestBody::Presence { room: p.room }
        }
        "ping" => RequestBody::Ping,
        "refresh" => {
            let p: RefreshPayload<'_> = serde_json::from_str(payload).map_err(shape_error)?;
            RequestBody::Refresh { token: p.token }
        }
        _ => {
            return Err(RequestError {
                code: ErrorCode::UnknownType,
                message: Cow::Owned(format!("unknown type {:?}", truncate(kind, 64))),
                id,
            });
        }
    };
    Ok(body)
}

/// A non-negative JSON integer; one beyond `u64` is still an integer, larger
/// than any seq, so it saturates instead of being refused.
fn parse_since(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<u64>().unwrap_or(u64::MAX))
}

/// The author of messages published through the server API (§6).
pub const SERVER_USER_JSON: &str = r#"{"id":"server","name":"server"}"#;

/// Who a `POST /api/publish` addresses.
#[derive(Debug)]
pub enum PublishTarget<'a> {
    /// A room: a `message` with the next seq.
    Room(Cow<'a, str>),
    /// A user: a `direct` to each of their connections.
    User(Cow<'a, str>),
}

/// A parsed `POST /api/publish` body.
#[derive(Debug)]
pub struct PublishRequest<'a> {
    /// Where it goes.
    pub target: PublishTarget<'a>,
    /// Any JSON, carried through untouched.
    pub content: &'a RawValue,
}

/// A JSON value that must be present but may be `null`: serde folds a
/// present `null` into a missing `Option`, so presence is tracked apart.
#[derive(Default)]
struct Present<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Present<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(deserializer).map(|raw| Present(Some(raw)))
    }
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Present<'a>,
}

#[derive(Deserialize)]
struct DisconnectBody<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
}

/// Parses a publish body: exactly one of `room` and `user`, and `content`.
/// `Err` is the message of a `400`.
pub fn parse_publish(body: &[u8]) -> Result<PublishRequest<'_>, String> {
    let text = api_object(body)?;
    let parsed: PublishBody<'_> =
        serde_json::from_str(text).map_err(|error| format!("bad body: {error}"))?;
    let Present(Some(content)) = parsed.content else {
        return Err("`content` is required".into());
    };
    let target = match (parsed.room, parsed.user) {
        (Some(room), None) => PublishTarget::Room(room),
        (None, Some(user)) => PublishTarget::User(user),
        _ => return Err(r#"the body is {"room", "content"} or {"user", "content"}"#.into()),
    };
    Ok(PublishRequest { target, content })
}

/// Parses a disconnect body `{"user": U}`; `Err` is the message of a `400`.
pub fn parse_disconnect(body: &[u8]) -> Result<Cow<'_, str>, String> {
    let text = api_object(body)?;
    let parsed: DisconnectBody<'_> =
        serde_json::from_str(text).map_err(|error| format!("bad body: {error}"))?;
    Ok(parsed.user)
}

/// `{"user": U, "room": R}` of `/api/subscribe` and `/api/unsubscribe`.
#[derive(Deserialize)]
struct MembershipBody<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow)]
    room: Cow<'a, str>,
}

/// Parses a subscribe or unsubscribe body `{"user": U, "room": R}` (§14.3)
/// into (user, room); `Err` is the message of a `400`.
pub fn parse_membership(body: &[u8]) -> Result<(Cow<'_, str>, Cow<'_, str>), String> {
    let text = api_object(body)?;
    let parsed: MembershipBody<'_> =
        serde_json::from_str(text).map_err(|error| format!("bad body: {error}"))?;
    Ok((parsed.user, parsed.room))
}

/// The body as the text of one JSON object.
fn api_object(body: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return Err("the body is not valid JSON".into());
    }
    if !text.trim_start().starts_with('{') {
        return Err("the body is a JSON object".into());
    }
    Ok(text)
}

/// `Ok(None)` for `null`; a string of at most 256 bytes or a number is kept raw.
fn check_id(raw: &RawValue) -> Result<Option<&RawValue>, &'static str> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'n') if text == "null" => Ok(None),
        Some(b'"') => match serde_json::from_str::<Cow<'_, str>>(text) {
            Ok(value) if value.len() <= MAX_ID_BYTES => Ok(Some(raw)),
            Ok(_) => Err("a string `id` is at most 256 bytes"),
            Err(_) => Err("`id` must be a string or a number"),
        },
        Some(b'-' | b'0'..=b'9') => Ok(Some(raw)),
        _ => Err("`id` must be a string or a number"),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Room of the header in front of the JSON: the longest server header is 10 bytes.
const HEADER_ROOM: usize = 10;

/// Appends `value` in decimal. Every message frame carries a seq and a
/// timestamp: through `core::fmt` they took more time in profiles than the
/// rest of the frame's assembly.
fn push_decimal(buffer: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; 20]; // u64::MAX has 20 digits
    let mut start = digits.len();
    let mut rest = value;
    while let Some(slot) = start.checked_sub(1).and_then(|at| digits.get_mut(at)) {
        *slot = b'0' + (rest % 10) as u8;
        start -= 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    buffer.extend_from_slice(digits.get(start..).unwrap_or_default());
}

/// Writes one server frame: the JSON goes into a buffer that leaves room for
/// the WebSocket header in front, so the finished frame needs no copy.
pub struct FrameBuilder {
    buffer: Vec<u8>,
    /// Whether a payload field has been written (for commas).
    fields: bool,
}

impl FrameBuilder {
    /// Starts `{"type":KIND[,"id":ID],"payload":{`.
    pub fn new(kind: &str, id: Option<&RawValue>) -> Self {
        Self::with_capacity(kind, id, 96)
    }

    /// As `new`, sized for a payload of about `capacity` bytes.
    pub fn with_capacity(kind: &str, id: Option<&RawValue>, capacity: usize) -> Self {
        let mut buffer = Vec::with_capacity(HEADER_ROOM + capacity);
        buffer.extend_from_slice(&[0; HEADER_ROOM]);
        buffer.extend_from_slice(b"{\"type\":\"");
        buffer.extend_from_slice(kind.as_bytes());
        buffer.push(b'"');
        if let Some(id) = id {
            buffer.extend_from_slice(b",\"id\":");
            buffer.extend_from_slice(id.get().as_bytes());
        }
        buffer.extend_from_slice(b",\"payload\":{");
        FrameBuilder {
            buffer,
            fields: false,
        }
    }

    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if self.fields {
            self.buffer.push(b',');
        }
        self.fields = true;
        self.buffer.push(b'"');
        self.buffer.extend_from_slice(key.as_bytes());
        self.buffer.extend_from_slice(b"\":");
        &mut self.buffer
    }

    /// A string field, escaped.
    pub fn string(mut self, key: &str, value: &str) -> Self {
        write_json_string(self.key(key), value);
        self
    }

    /// An unsigned integer field.
    pub fn number(mut self, key: &str, value: u64) -> Self {
        push_decimal(self.key(key), value);
        self
    }

    /// An integer field or `null`.
    pub fn optional_number(self, key: &str, value: Option<u64>) -> Self {
        match value {
            Some(value) => self.number(key, value),
            None => self.raw(key, "null"),
        }
    }

    /// A boolean field.
    pub fn boolean(self, key: &str, value: bool) -> Self {
        self.raw(key, if value { "true" } else { "false" })
    }

    /// A field whose value is already JSON (content, a pre-encoded user).
    pub fn raw(mut self, key: &str, json: &str) -> Self {
        self.key(key).extend_from_slice(json.as_bytes());
        self
    }

    /// Closes the JSON and puts the WebSocket text-frame header in front.
    pub fn finish(mut self) -> Bytes {
        self.buffer.extend_from_slice(b"}}");
        let payload_len = self.buffer.len() - HEADER_ROOM;
        let header = FrameHeader {
            is_final: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: OpCode::Data(Data::Text),
            mask: None,
        };
        let header_len = header.len(payload_len as u64);
        let start = HEADER_ROOM - header_len;
        let mut slot = &mut self.buffer[start..HEADER_ROOM];
        // Writing into a correctly sized slice cannot fail.
        let _ = header.format(payload_len as u64, &mut slot);
        Bytes::from(self.buffer).slice(start..)
    }
}

/// A server text frame carrying `payload` (an already encoded JSON text).
pub fn text_frame(payload: &str) -> Bytes {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::Data(Data::Text),
        mask: None,
    };
    let length = payload.len() as u64;
    let mut frame = Vec::with_capacity(header.len(length) + payload.len());
    // Writing into a Vec cannot fail.
    let _ = header.format(length, &mut frame);
    frame.extend_from_slice(payload.as_bytes());
    Bytes::from(frame)
}

/// The payload text of a server text frame made by this module.
pub fn text_frame_payload(frame: &[u8]) -> Option<&str> {
    let header_len = match frame.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    std::str::from_utf8(frame.get(header_len..)?).ok()
}

/// Appends `value` as a JSON string literal.
pub fn write_json_string(buffer: &mut Vec<u8>, value: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buffer, value);
}

/// `{"id":…,"name":…}` for a user, encoded once per connection and reused in every frame about it.
pub fn user_json(id: &str, name: &str) -> Box<str> {
    let mut buffer = Vec::with_capacity(id.len() + name.len() + 20);
    buffer.extend_from_slice(b"{\"id\":");
    write_json_string(&mut buffer, id);
    buffer.extend_from_slice(b",\"name\":");
    write_json_string(&mut buffer, name);
    buffer.push(b'}');
    // Only valid UTF-8 went in.
    String::from_utf8(buffer)
        .unwrap_or_default()
        .into_boxed_str()
}

/// An `error` reply.
pub fn error_frame(id: Option<&RawValue>, code: ErrorCode, message: &str) -> Bytes {
    FrameBuilder::new("error", id)
        .string("code", code.as_str())
        .string("message", message)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_match_the_standard_formatting() {
        for value in [0, 1, 9, 10, 99, 100, 4_294_967_296, u64::MAX - 1, u64::MAX] {
            let mut buffer = b"x".to_vec();
            push_decimal(&mut buffer, value);
            assert_eq!(buffer, format!("x{value}").into_bytes());
        }
    }

    fn payload_of(frame: &Bytes) -> serde_json::Value {
        let (header_len, len) = match frame[1] {
            126 => (4, u16::from_be_bytes([frame[2], frame[3]]) as usize),
            127 => (
                10,
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
            ),
            n => (2, n as usize),
        };
        assert_eq!(frame[0], 0x81, "final text frame");
        assert_eq!(frame.len(), header_len + len);
        serde_json::from_slice(&frame[header_len..]).unwrap()
    }

    fn error_code(text: &str) -> ErrorCode {
        parse_request(text).unwrap_err().code
    }

    #[test]
    fn parses_every_request_type() {
        let request = parse_request(
            r#"{"type":"join","id":7,"payload":{"room":"a","since":3,"epoch":"e1"}}"#,
        )
        .unwrap();
        assert_eq!(request.id.unwrap().get(), "7");
        match request.body {
            RequestBody::Join { room, since, epoch } => {
                assert_eq!(room, "a");
                assert_eq!(since, Some(3));
                assert_eq!(epoch.as_deref(), Some("e1"));
            }
            other => panic!("{other:?}"),
        }
        let request =
            parse_request(r#"{"type":"message","payload":{"room":"a","content":{"x":[1,2]}}}"#)
                .unwrap();
        match request.body {
            RequestBody::Message { content, .. } => assert_eq!(content.get(), r#"{"x":[1,2]}"#),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_request(r#"{"type":"ping"}"#).unwrap().body,
            RequestBody::Ping
        ));
        assert!(matches!(
            parse_request(r#"{"type":"typing","payload":{"room":"a","is_typing":true}}"#)
                .unwrap()
                .body,
            RequestBody::Typing {
                is_typing: true,
                ..
            }
        ));
        assert!(matches!(
            parse_request(r#"{"type":"direct","payload":{"to":"bob","content":null}}"#)
                .unwrap()
                .body,
            RequestBody::Direct { .. }
        ));
        assert!(matches!(
            parse_request(r#"{"type":"refresh","payload":{"token":"t"}}"#)
                .unwrap()
                .body,
            RequestBody::Refresh { .. }
        ));
        assert!(matches!(
            parse_request(r#"{"type":"presence","payload":{"room":"a"}}"#)
                .unwrap()
                .body,
            RequestBody::Presence { .. }
        ));
        assert!(matches!(
            parse_request(r#"{"type":"leave","payload":{"room":"a"}}"#)
                .unwrap()
                .body,
            RequestBody::Leave { .. }
        ));
    }

    #[test]
    fn errors_come_in_contract_order() {
        assert_eq!(error_code("not json"), ErrorCode::InvalidJson);
        assert_eq!(error_code("{\"type\":"), ErrorCode::InvalidJson);
        assert_eq!(error_code(""), ErrorCode::InvalidJson);
        assert_eq!(error_code("[1,2]"), ErrorCode::InvalidMessage);
        assert_eq!(
            error_code(r#"{"type":"ping","type":"ping","#),
            ErrorCode::InvalidJson
        );
        assert_eq!(
            error_code(r#"{"type":"ping","type":"ping"}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(error_code("\"join\""), ErrorCode::InvalidMessage);
        assert_eq!(error_code("{}"), ErrorCode::InvalidMessage);
        assert_eq!(error_code(r#"{"type":5}"#), ErrorCode::InvalidMessage);
        assert_eq!(
            error_code(r#"{"type":"nope","id":true}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(error_code(r#"{"type":"Join"}"#), ErrorCode::UnknownType);
        assert_eq!(
            error_code(r#"{"type":"join","payload":{"room":1}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            error_code(r#"{"type":"join","payload":["a"]}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            error_code(r#"{"type":"join","payload":{"room":"a","since":-1}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            error_code(r#"{"type":"join","payload":{"room":"a","since":1.5}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            error_code(r#"{"type":"join","payload":{"room":"a","since":1,"epoch":3}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            error_code(r#"{"type":"message","payload":{"room":"a"}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            error_code(r#"{"type":"typing","payload":{"room":"a","is_typing":"yes"}}"#),
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn ids_are_echoed_when_readable() {
        let error = parse_request(r#"{"type":"nope","id":"r1"}"#).unwrap_err();
        assert_eq!(error.id.unwrap().get(), "\"r1\"");
        let long = "x".repeat(257);
        let text = format!(r#"{{"type":"ping","id":"{long}"}}"#);
        let error = parse_request(&text).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidMessage);
        assert!(error.id.is_none());
        let text = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(256));
        assert!(parse_request(&text).is_ok());
        let request = parse_request(r#"{"type":"ping","id":null}"#).unwrap();
        assert!(request.id.is_none());
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let request =
            parse_request(r#"{"type":"leave","extra":1,"payload":{"room":"a","more":[]}}"#);
        assert!(request.is_ok());
    }

    #[test]
    fn publish_bodies() {
        let request = parse_publish(br#"{"room":"a","content":null}"#).unwrap();
        assert!(matches!(request.target, PublishTarget::Room(ref r) if r == "a"));
        assert_eq!(request.content.get(), "null");
        let request = parse_publish(br#"{"user":"bob","content":{"x":1}}"#).unwrap();
        assert!(matches!(request.target, PublishTarget::User(ref u) if u == "bob"));
        for bad in [
            &br#"{"room":"a"}"#[..],
            br#"{"room":"a","user":"b","content":1}"#,
            br#"{"content":1}"#,
            br#"[1]"#,
            b"nope",
            br#"{"room":5,"content":1}"#,
            b"\xff",
        ] {
            assert!(
                parse_publish(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse_disconnect(br#"{"user":"bob"}"#).unwrap(), "bob");
        assert!(parse_disconnect(br#"{"user":1}"#).is_err());
        assert!(parse_disconnect(b"{}").is_err());
    }

    #[test]
    fn room_names() {
        assert!(is_valid_room_name("team:a-b_c.d"));
        assert!(is_valid_room_name(&"a".repeat(64)));
        assert!(!is_valid_room_name(&"a".repeat(65)));
        assert!(!is_valid_room_name(""));
        assert!(!is_valid_room_name("a b"));
        assert!(!is_valid_room_name("é"));
    }

    #[test]
    fn frames_are_single_text_frames_of_valid_json() {
        let frame = FrameBuilder::new(
            "joined",
            RawValue::from_string("\"q\"".into()).ok().as_deref(),
        )
        .string("room", "a\"b")
        .number("seq", 3)
        .boolean("recovered", true)
        .optional_number("exp", None)
        .finish();
        let value = payload_of(&frame);
        assert_eq!(value["type"], "joined");
        assert_eq!(value["id"], "q");
        assert_eq!(value["payload"]["room"], "a\"b");
        assert_eq!(value["payload"]["seq"], 3);
        assert_eq!(value["payload"]["exp"], serde_json::Value::Null);
        let big = "x".repeat(70_000);
        let frame = FrameBuilder::new("message", None)
            .string("content", &big)
            .finish();
        assert_eq!(payload_of(&frame)["payload"]["content"], big.as_str());
        let medium = "y".repeat(300);
        let frame = FrameBuilder::new("message", None)
            .string("content", &medium)
            .finish();
        assert_eq!(payload_of(&frame)["payload"]["content"], medium.as_str());
    }

    #[test]
    fn text_frames_round_trip() {
        for size in [0, 10, 125, 126, 300, 70_000] {
            let payload = "x".repeat(size);
            let frame = text_frame(&payload);
            assert_eq!(text_frame_payload(&frame), Some(payload.as_str()));
        }
        let built = FrameBuilder::new("ping", None).finish();
        assert_eq!(
            text_frame(text_frame_payload(&built).unwrap()),
            built,
            "the same bytes as the builder"
        );
    }

    #[test]
    fn user_json_escapes() {
        let user = user_json("a\"1", "Zoë");
        let value: serde_json::Value = serde_json::from_str(&user).unwrap();
        assert_eq!(value["id"], "a\"1");
        assert_eq!(value["name"], "Zoë");
    }
}
