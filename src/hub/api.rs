//! The server API (§6): `POST /api/publish` and `/api/disconnect`, with one
//! answer type whichever backplane answers.

use super::delivery::Except;
use super::effects::Waiting;
use super::{Hub, Millis, frames};
use crate::backplane::{Answer, Publication, Reply, RoomRef, UserItem};
use crate::protocol::{self, PublishTarget, is_valid_room_name};

/// The answer to a server API request (§6, §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAnswer {
    /// `200` with this JSON.
    Ok(String),
    /// `400` with this message.
    BadRequest(String),
    /// `503` `{"error":"unavailable"}`.
    Unavailable,
    /// `404` `{"error":"no_room"}`: a room not known, or a name not valid (§14.3).
    NoRoom,
}

/// Which server API endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `POST /api/publish` to a room: a `message` from the user `server`.
    Publish,
    /// `POST /api/publish` to a user: a `direct` from the user `server`.
    PublishDirect,
    /// `POST /api/disconnect`: close every connection of a user with 4003.
    Disconnect,
    /// `GET /api/rooms`: rooms with members, at most this many.
    Rooms {
        /// How many the answer lists.
        limit: usize,
    },
    /// `GET /api/rooms/{room}`.
    Room,
    /// `GET /api/rooms/{room}/history`: the held messages after `since`.
    History {
        /// Messages with a greater seq are listed.
        since: u64,
    },
    /// `POST /api/subscribe`.
    Subscribe,
    /// `POST /api/unsubscribe`.
    Unsubscribe,
}

/// The JSON of an answer that came later.
pub(super) fn answer_of(kind: ApiKind, answer: Option<Answer>) -> ApiAnswer {
    match (kind, answer) {
        (ApiKind::Publish, Some(Answer::Published { seq, delivered })) => {
            ApiAnswer::Ok(format!(r#"{{"delivered":{delivered},"seq":{seq}}}"#))
        }
        (ApiKind::PublishDirect, Some(Answer::Sent(connections))) => {
            ApiAnswer::Ok(format!(r#"{{"delivered":{connections}}}"#))
        }
        (ApiKind::Disconnect, Some(Answer::Sent(connections))) => {
            ApiAnswer::Ok(format!(r#"{{"closed":{connections}}}"#))
        }
        (ApiKind::Subscribe, Some(Answer::Sent(joined))) => {
            ApiAnswer::Ok(format!(r#"{{"joined":{joined}}}"#))
        }
        (ApiKind::Unsubscribe, Some(Answer::Sent(left))) => {
            ApiAnswer::Ok(format!(r#"{{"left":{left}}}"#))
        }
        (kind, Some(Answer::Rooms(rooms))) => super::introspection::rooms_answer(kind, &rooms),
        _ => ApiAnswer::Unavailable,
    }
}

impl Hub {
    /// A server API request as the backplane answers it: at once (`now`
    /// makes the answer), later (awaited by `ticket`, then answered by
    /// [`answer_of`]), or not at all while it is away.
    pub(super) fn api_reply<T>(
        &mut self,
        reply: Reply<T>,
        ticket: u64,
        kind: ApiKind,
        now: impl FnOnce(&mut Self, T) -> ApiAnswer,
    ) -> Option<ApiAnswer> {
        match reply {
            Reply::Now(value) => Some(now(self, value)),
            Reply::Later(request) => {
                self.waiting.insert(request, Waiting::Api { ticket, kind });
                None
            }
            Reply::Unavailable => Some(ApiAnswer::Unavailable),
        }
    }

    /// `POST /api/publish` (§6): a `message` to a room or a `direct` to a
    /// user, from the user `server`. `None`: the answer comes later through
    /// [`Hub::take_api_answers`] with `ticket`.
    pub fn api_publish(&mut self, body: &[u8], now: Millis, ticket: u64) -> Option<ApiAnswer> {
        let request = match protocol::parse_publish(body) {
            Ok(request) => request,
            Err(message) => return Some(ApiAnswer::BadRequest(message)),
        };
        let content = request.content.get();
        let answer = match request.target {
            PublishTarget::Room(room) => {
                if !is_valid_room_name(&room) {
                    return Some(ApiAnswer::BadRequest("invalid room name".into()));
                }
                self.api_publish_room(&room, content, now, ticket)
            }
            PublishTarget::User(user) => {
                let frame = frames::direct(protocol::SERVER_USER_JSON, content, now);
                match self
                    .backplane
                    .send_to_user(&user, &UserItem::Direct(frame.clone()))
                {
                    Reply::Now(()) => {
                        let delivered = self.deliver_to_user(&user, &frame);
                        Some(ApiAnswer::Ok(format!(r#"{{"delivered":{delivered}}}"#)))
                    }
                    Reply::Later(request) => {
                        self.waiting.insert(
                            request,
                            Waiting::Api {
                                ticket,
                                kind: ApiKind::PublishDirect,
                            },
                        );
                        None
                    }
                    Reply::Unavailable => Some(ApiAnswer::Unavailable),
                }
            }
        };
        self.apply_effects(now);
        self.settle(now);
        answer
    }

    fn api_publish_room(
        &mut self,
        room: &str,
        content: &str,
        now: Millis,
        ticket: u64,
    ) -> Option<ApiAnswer> {
        if !self.backplane.is_available() {
            return Some(ApiAnswer::Unavailable);
        }
        let room_id = match self.room_ids.get(room) {
            Some(&room_id) => room_id,
            None => self.create_room(room),
        };
        let Some(room_ref) = self.rooms.get(room_id).map(|room| RoomRef {
            id: room_id,
            name: &room.name,
        }) else {
            return Some(ApiAnswer::Unavailable);
        };
        let publication = Publication {
            webhook: false,
            room: room_ref,
            user_json: protocol::SERVER_USER_JSON,
            content,
            now,
        };
        let reply = self.backplane.publish(&publication);
        let answer = self.api_reply(reply, ticket, ApiKind::Publish, |hub, published| {
            let here = hub.deliver_traffic(
                room_id,
                Some(published.seq),
                Except::Nobody,
                &published.frame,
            );
            let delivered = here as u64 + published.delivered_elsewhere;
            let seq = published.seq;
            ApiAnswer::Ok(format!(r#"{{"delivered":{delivered},"seq":{seq}}}"#))
        });
        // A publish to a room without members here (§11) leaves it as any
        // empty room: kept for recovery, or forgotten, as the backplane says.
        if self
            .rooms
            .get(room_id)
            .is_some_and(|room| room.members.is_empty() && room.empty_since.is_none())
        {
            self.room_without_members(room_id, now);
        }
        answer
    }

    /// `POST /api/disconnect` (§6): closes every connection of a user with
    /// 4003, wherever they are. `None`: the answer comes later.
    pub fn api_disconnect(&mut self, body: &[u8], now: Millis, ticket: u64) -> Option<ApiAnswer> {
        let user = match protocol::parse_disconnect(body) {
            Ok(user) => user,
            Err(message) => return Some(ApiAnswer::BadRequest(message)),
        };
        let reply = self.backplane.send_to_user(&user, &UserItem::Kick);
        let answer = self.api_reply(reply, ticket, ApiKind::Disconnect, |hub, ()| {
            let connections = hub.users.get(user.as_ref()).cloned().unwrap_or_default();
            let closed = connections.len();
            for conn in connections {
                hub.close(conn, 4003, "disconnected by the server", now);
            }
            ApiAnswer::Ok(format!(r#"{{"closed":{closed}}}"#))
        });
        self.apply_effects(now);
        self.settle(now);
        answer
    }
}
