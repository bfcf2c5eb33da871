//! Client requests (§4): validation, the `rooms` claim, limits, and each
//! request's rule, whichever backplane answers.

use serde_json::value::RawValue;

use super::delivery::Except;
use super::effects::{PendingJoin, Waiting};
use super::session::Slot;
use super::{ConnId, Hub, Millis, Refusal, RoomId, Timer, frames};
use crate::backplane::{JoinRequest, Publication, Reply, RoomRef, UserItem, UserRef};
use crate::protocol::{self, ErrorCode, FrameBuilder, Request, RequestBody, error_frame};

/// What a join asks for.
pub(super) struct JoinAsk<'a> {
    /// The request's `id`, echoed in the answer.
    pub(super) id: Option<&'a RawValue>,
    /// The room.
    pub(super) room: &'a str,
    /// The last seq the client saw, to recover from.
    pub(super) since: Option<u64>,
    /// The epoch `since` belongs to.
    pub(super) epoch: Option<&'a str>,
    /// The client asked; false when the server API subscribed it, which
    /// skips a connection a limit refuses without telling it (§14.3).
    pub(super) asked: bool,
}

impl<'a> JoinAsk<'a> {
    /// A client's `join` (or the room of `/ws/{room}`).
    pub(super) fn client(
        id: Option<&'a RawValue>,
        room: &'a str,
        since: Option<u64>,
        epoch: Option<&'a str>,
    ) -> Self {
        JoinAsk {
            id,
            room,
            since,
            epoch,
            asked: true,
        }
    }
}

impl Hub {
    /// One text frame from a client.
    pub fn receive_text(&mut self, conn: ConnId, text: &str, now: Millis) {
        let Some(session) = self.session(conn) else {
            return;
        };
        if session.closing || session.close_after_replies.is_some() {
            return;
        }
        self.metrics.messages_received += 1;
        self.saw_activity(conn, now);
        if !self.take_rate_token(conn, now) {
            self.refuse_for_rate(conn, text, now);
            self.settle(now);
            return;
        }
        match protocol::parse_request(text) {
            Ok(request) => {
                let id = request.id;
                if let Err(refusal) = self.dispatch(conn, request, now) {
                    self.reply(conn, error_frame(id, refusal.code, &refusal.message));
                }
            }
            Err(error) => {
                self.reply(conn, error_frame(error.id, error.code, &error.message));
            }
        }
        // What the backplane decided for this request (a local delivery it
        // reports as an effect) lands before the next event.
        self.apply_effects(now);
        self.settle(now);
    }

    fn dispatch(&mut self, conn: ConnId, request: Request<'_>, now: Millis) -> Result<(), Refusal> {
        let id = request.id;
        match request.body {
            RequestBody::Join { room, since, epoch } => {
                let ask = JoinAsk::client(id, &room, since, epoch.as_deref());
                self.join(conn, ask, now)
            }
            RequestBody::Leave { room } => {
                let room_id = self.member_room(conn, &room)?;
                self.remove_membership(conn, room_id, now);
                let frame = frames::left(id, &room);
                self.reply(conn, frame);
                Ok(())
            }
            RequestBody::Message { room, content } => {
                let room_id = self.publishable_room(conn, &room)?;
                self.require_available()?;
                self.send_message(conn, id, room_id, content.get(), now)
            }
            RequestBody::Direct { to, content } => {
                self.require_available()?;
                self.send_direct(conn, id, &to, content.get(), now)
            }
            RequestBody::Typing { room, is_typing } => {
                let room_id = self.member_room(conn, &room)?;
                // During an outage typing is dropped.
                if self.backplane.is_available() {
                    self.set_typing(conn, room_id, is_typing, now);
                }
                Ok(())
            }
            RequestBody::Presence { room } => {
                self.check_room(conn, &room)?;
                self.require_available()?;
                self.presence(conn, id, &room);
                Ok(())
            }
            RequestBody::Ping => {
                let frame = FrameBuilder::new("pong", id)
                    .number("server_time", now)
                    .finish();
                self.reply(conn, frame);
                Ok(())
            }
            RequestBody::Refresh { token } => self.refresh(conn, id, &token, now),
        }
    }

    fn require_available(&self) -> Result<(), Refusal> {
        if self.backplane.is_available() {
            Ok(())
        } else {
            Err(Refusal::unavailable())
        }
    }

    /// Validates a room name and the token's `rooms` claim, in the order of §11.
    fn check_room(&self, conn: ConnId, room: &str) -> Result<(), Refusal> {
        if !protocol::is_valid_room_name(room) {
            return Err(Refusal::new(
                ErrorCode::InvalidRoom,
                "room names are 1-64 characters of A-Z a-z 0-9 _ - . :",
            ));
        }
        // A room the server API subscribed it to passes too (§14.3).
        let allowed = self.session(conn).is_some_and(|session| {
            session.access.allows(room) || session.granted.iter().any(|r| **r == *room)
        });
        if !allowed {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room}"),
            ));
        }
        Ok(())
    }

    /// The room, when the connection may name it and is a member of it.
    fn member_room(&self, conn: ConnId, room: &str) -> Result<RoomId, Refusal> {
        self.check_room(conn, room)?;
        self.membership_of(conn, room)
    }

    /// The room of a client `message`: as [`Hub::member_room`], with the
    /// namespace's `client_publish` between the claim and the membership
    /// (the order of §11: what the client may never do before what it has
    /// not done yet).
    fn publishable_room(&self, conn: ConnId, room: &str) -> Result<RoomId, Refusal> {
        self.check_room(conn, room)?;
        let known = self.room_ids.get(room).copied();
        let options = known
            .and_then(|room_id| self.rooms.get(room_id))
            .map_or_else(
                || self.config.namespaces.for_room(room),
                |known| &known.options,
            );
        if !options.client_publish {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("clients may not publish in {room}; the server publishes there"),
            ));
        }
        known
            .filter(|&room_id| self.is_member(conn, room_id))
            .ok_or_else(|| frames::not_in_room(room))
    }

    fn membership_of(&self, conn: ConnId, room: &str) -> Result<RoomId, Refusal> {
        self.member_room_id(conn, room)
            .ok_or_else(|| frames::not_in_room(room))
    }

    /// The room's key, when the connection is one of its members here.
    pub(super) fn member_room_id(&self, conn: ConnId, room: &str) -> Option<RoomId> {
        self.room_ids
            .get(room)
            .copied()
            .filter(|&room_id| self.is_member(conn, room_id))
    }

    pub(super) fn is_member(&self, conn: ConnId, room_id: RoomId) -> bool {
        self.session(conn)
            .is_some_and(|s| s.memberships.iter().any(|m| m.room == room_id))
    }

    /// `join` (and `/ws/{room}`, and `/api/subscribe`): the checks,
    /// membership here, then the room's state from the backplane for
    /// `joined` and its replay.
    pub(super) fn join(
        &mut self,
        conn: ConnId,
        ask: JoinAsk<'_>,
        now: Millis,
    ) -> Result<(), Refusal> {
        let JoinAsk {
            id,
            room,
            since,
            epoch,
            asked,
        } = ask;
        self.check_room(conn, room)?;
        self.require_available()?;
        let existing = self.room_ids.get(room).copied();
        let first = !existing.is_some_and(|room_id| self.is_member(conn, room_id));
        if first {
            let rooms_held = self.session(conn).map_or(0, |s| s.memberships.len());
            if rooms_held >= self.config.max_rooms_per_connection {
                return Err(Refusal::new(
                    ErrorCode::TooManyRooms,
                    format!(
                        "at most {} rooms per connection",
                        self.config.max_rooms_per_connection
                    ),
                ));
            }
        }
        let room_id = match existing {
            Some(room_id) => room_id,
            None => self.create_room(room),
        };
        if first {
            self.add_membership(conn, room_id);
        }
        let (Some(session), Some(room_state)) = (
            self.sessions.get(conn).and_then(Option::as_ref),
            self.rooms.get(room_id),
        ) else {
            return Ok(());
        };
        let request = JoinRequest {
            room: RoomRef {
                id: room_id,
                name: &room_state.name,
            },
            user: UserRef {
                id: &session.user_id,
                json: &session.user_json,
            },
            connections_here: room_state.users.get(&session.user_id).copied().unwrap_or(1),
            users_here: room_state.users.len(),
            since,
            epoch,
            first,
            now,
        };
        let serial = session.serial;
        let life = room_state.life;
        match self.backplane.join(&request) {
            Reply::Now(state) if state.full => {
                if first {
                    self.drop_unadmitted_membership(conn, room_id, now);
                }
                return Err(frames::room_full(
                    room,
                    self.config.namespaces.for_room(room),
                ));
            }
            Reply::Now(state) => {
                if let Some(announce) = &state.announce {
                    self.broadcast(room_id, announce, super::delivery::Except::Connection(conn));
                }
                let frames = frames::joined(id, room, &state, since, epoch);
                for frame in frames {
                    self.reply(conn, frame);
                }
            }
            Reply::Later(request) => {
                if first {
                    self.start_cursor(conn, room_id);
                    self.joins_in_flight
                        .insert(request, (conn, serial, room_id));
                }
                self.await_answer(
                    conn,
                    request,
                    Waiting::Join(Box::new(PendingJoin {
                        conn,
                        serial,
                        id: id.map(ToOwned::to_owned),
                        room: room_id,
                        life,
                        name: room.into(),
                        since,
                        epoch: epoch.map(str::to_string),
                        first,
                        asked,
                    })),
                );
            }
            Reply::Unavailable => {
                if first {
                    self.remove_membership(conn, room_id, now);
                }
                return Err(Refusal::unavailable());
            }
        }
        Ok(())
    }

    /// A client `message`: a seq from the backplane, the frame to every
    /// member, and an `ack` when the request had an `id`.
    fn send_message(
        &mut self,
        conn: ConnId,
        id: Option<&RawValue>,
        room_id: RoomId,
        content: &str,
        now: Millis,
    ) -> Result<(), Refusal> {
        let user_json = self.user_json_of(conn);
        let Some(known) = self.rooms.get(room_id) else {
            return Ok(());
        };
        let webhook = self.config.webhooks.is_some() && known.options.webhook_messages;
        let room = RoomRef {
            id: room_id,
            name: &known.name,
        };
        let publication = Publication {
            room,
            user_json: &user_json,
            content,
            now,
            webhook,
        };
        match self.backplane.publish(&publication) {
            Reply::Now(published) => {
                self.deliver_traffic(
                    room_id,
                    Some(published.seq),
                    Except::Nobody,
                    &published.frame,
                );
                if id.is_some() {
                    let ack = FrameBuilder::new("ack", id)
                        .number("seq", published.seq)
                        .finish();
                    self.reply(conn, ack);
                }
                Ok(())
            }
            Reply::Later(request) => {
                let serial = self.serial_of(conn);
                let id = id.map(ToOwned::to_owned);
                self.await_answer(conn, request, Waiting::Message { conn, serial, id });
                Ok(())
            }
            Reply::Unavailable => Err(Refusal::unavailable()),
        }
    }

    /// A `direct` to every connection of a user, wherever it is.
    fn send_direct(
        &mut self,
        conn: ConnId,
        id: Option<&RawValue>,
        to: &str,
        content: &str,
        now: Millis,
    ) -> Result<(), Refusal> {
        let user_json = self.user_json_of(conn);
        let frame = frames::direct(&user_json, content, now);
        match self
            .backplane
            .send_to_user(to, &UserItem::Direct(frame.clone()))
        {
            Reply::Now(()) => {
                if self.deliver_to_user(to, &frame) == 0 {
                    return Err(frames::user_offline(to));
                }
                if id.is_some() {
                    self.reply(conn, FrameBuilder::new("ack", id).finish());
                }
                Ok(())
            }
            Reply::Later(request) => {
                let waiting = Waiting::Direct {
                    conn,
                    serial: self.serial_of(conn),
                    id: id.map(ToOwned::to_owned),
                    to: to.into(),
                };
                self.await_answer(conn, request, waiting);
                Ok(())
            }
            Reply::Unavailable => Err(Refusal::unavailable()),
        }
    }

    /// `presence`: who is here, merged by the backplane with who is elsewhere.
    fn presence(&mut self, conn: ConnId, id: Option<&RawValue>, room: &str) {
        let here = self.presence_here(room);
        match self.backplane.presence(room, here) {
            Reply::Now(entries) => {
                let frame = frames::presence(id, room, entries);
                self.reply(conn, frame);
            }
            Reply::Later(request) => {
                let waiting = Waiting::Presence {
                    conn,
                    serial: self.serial_of(conn),
                    id: id.map(ToOwned::to_owned),
                    room: room.into(),
                };
                self.await_answer(conn, request, waiting);
            }
            Reply::Unavailable => {
                self.reply(conn, frames::unavailable(id));
            }
        }
    }

    /// The users of a room here with their connections, in the order they
    /// first appear among the members.
    fn presence_here(&self, room: &str) -> Vec<crate::backplane::PresenceEntry> {
        let mut entries: Vec<crate::backplane::PresenceEntry> = Vec::new();
        let Some(room_state) = self.room_ids.get(room).and_then(|&r| self.rooms.get(r)) else {
            return entries;
        };
        let mut positions: std::collections::HashMap<&str, usize> =
            std::collections::HashMap::new();
        for &member in &room_state.members {
            let Some(session) = self.session(member) else {
                continue;
            };
            match positions.get(&*session.user_id) {
                Some(&position) => {
                    if let Some(entry) = entries.get_mut(position) {
                        entry.1 += 1;
                    }
                }
                None => {
                    positions.insert(&session.user_id, entries.len());
                    entries.push((
                        session.user_id.to_string(),
                        1,
                        session.user_json.to_string(),
                    ));
                }
            }
        }
        entries
    }

    fn set_typing(&mut self, conn: ConnId, room_id: RoomId, is_typing: bool, now: Millis) {
        let Some(session) = self.session(conn) else {
            return;
        };
        let user_id = session.user_id.clone();
        let user_json = session.user_json.clone();
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if is_typing {
            let deadline = if self.config.typing_timeout_ms == 0 {
                Millis::MAX
            } else {
                now.saturating_add(self.config.typing_timeout_ms)
            };
            room.typing.insert(user_id.clone(), deadline);
            if deadline != Millis::MAX {
                self.timers.schedule(
                    deadline,
                    Timer::Typing {
                        room: room_id,
                        life: room.life,
                        user_id: user_id.clone(),
                    },
                );
            }
        } else {
            room.typing.remove(&user_id);
        }
        let frame = frames::typing(&room.name, &user_json, is_typing);
        self.room_frame(room_id, &frame, Some(&user_id));
    }

    fn refresh(
        &mut self,
        conn: ConnId,
        id: Option<&RawValue>,
        token: &str,
        now: Millis,
    ) -> Result<(), Refusal> {
        let identity = self
            .config
            .verifier
            .verify(token, now / 1000)
            .map_err(|error| {
                Refusal::new(ErrorCode::InvalidToken, format!("token rejected: {error}"))
            })?;
        let Some(session) = self.session_mut(conn) else {
            return Ok(());
        };
        if *session.user_id != *identity.user_id {
            return Err(Refusal::new(
                ErrorCode::InvalidToken,
                "a refresh token must have the same `sub`",
            ));
        }
        session.user_json = protocol::user_json(&identity.user_id, &identity.name).into();
        session.access = identity.rooms;
        session.expires_at = identity.expires_at;
        let serial = session.serial;
        if let Some(expires_at) = identity.expires_at {
            self.timers.schedule(
                expires_at.saturating_mul(1000),
                Timer::TokenExpiry { conn, serial },
            );
        }
        let frame = FrameBuilder::new("refreshed", id)
            .optional_number("exp", identity.expires_at)
            .finish();
        self.reply(conn, frame);
        Ok(())
    }

    fn take_rate_token(&mut self, conn: ConnId, now: Millis) -> bool {
        let (rate, burst) = (self.config.rate_limit, self.config.rate_burst);
        let Some(session) = self.session_mut(conn) else {
            return false;
        };
        if rate == 0 {
            return true;
        }
        let bucket = &mut session.rate;
        let elapsed = now.saturating_sub(bucket.updated) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * f64::from(rate)).min(f64::from(burst.max(1)));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refused_in_a_row = 0;
            true
        } else {
            false
        }
    }

    /// Answers a message over the rate with `rate_limited` (echoing its id when
    /// readable); `2 × --rate-burst` refusals in a row close with 1008.
    fn refuse_for_rate(&mut self, conn: ConnId, text: &str, now: Millis) {
        let limit = self.config.rate_burst.max(1).saturating_mul(2);
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        session.rate.refused_in_a_row += 1;
        let flooding = session.rate.refused_in_a_row >= limit;
        let id = match protocol::parse_request(text) {
            Ok(request) => request.id,
            Err(error) => error.id,
        };
        self.reply(
            conn,
            error_frame(id, ErrorCode::RateLimited, "too many messages; slow down"),
        );
        if flooding {
            self.close(conn, 1008, "rate limit exceeded", now);
        }
    }

    /// Records what an answer is for, and keeps its place in the connection's replies.
    pub(super) fn await_answer(
        &mut self,
        conn: ConnId,
        request: crate::backplane::RequestId,
        waiting: Waiting,
    ) {
        self.waiting.insert(request, waiting);
        if let Some(session) = self.session_mut(conn) {
            session.replies.push_back(Slot::Waiting(request));
        }
    }
}
