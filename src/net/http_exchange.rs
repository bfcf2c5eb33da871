//! Plain HTTP on a connection: reading request heads, answering each
//! (health, page, metrics, the server API, tokens) and switching to WebSocket.

use std::io::{self, Read};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use log::debug;
use tungstenite::protocol::{Role, WebSocketContext};

use super::connection::Phase;
use super::server::{DEMO_TOKEN_TTL_SECS, EventLoop, ServerTimer};
use crate::assets;
use crate::auth::{self, Identity, TokenClaims};
use crate::backplane::RoomQuery;
use crate::http::{self, Decision, Endpoint, HttpRoute, Policy, RejectReason};
use crate::hub::{ApiAnswer, ApiKind, Millis, user_answer};
use crate::outbound::OutboundQueue;

const JSON: &str = "application/json";

impl EventLoop {
    /// Reads request bytes, and answers every complete request in them: a
    /// plain HTTP connection may carry several (keep-alive), an upgrade ends it.
    pub(super) fn read_http(&mut self, key: usize, now: Millis) {
        // Answering consumes requests from the buffer; a read that stopped at
        // the cap must go on, since no new readiness edge will say so.
        while self.read_http_once(key, now) {}
    }

    /// Reads up to the buffer cap, answers the complete requests, and says
    /// whether reading stopped at the cap with room made since.
    pub(super) fn read_http_once(&mut self, key: usize, now: Millis) -> bool {
        let buffer_cap = http::MAX_HEAD_BYTES + self.args.max_message_bytes();
        let Some(connection) = self.connections.get_mut(key) else {
            return false;
        };
        let Phase::Http { head, .. } = &mut connection.phase else {
            return false;
        };
        if connection.close_when_flushed {
            // An answer is on its way out; later bytes are not read.
            return false;
        }
        let mut chunk = [0u8; 4096];
        let mut peer_closed = false;
        let mut tls_failed = false;
        let mut at_cap = false;
        loop {
            // Read at most a little past the cap: enough to know a request is too large.
            if head.len() > buffer_cap {
                at_cap = true;
                break;
            }
            let handshaking = connection.transport.handshaking();
            match connection.transport.read(&mut chunk) {
                Ok(0) => {
                    peer_closed = true;
                    break;
                }
                Ok(read) => head.extend_from_slice(chunk.get(..read).unwrap_or_default()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    debug!(
                        "connection {key} ({}): read failed: {error}",
                        connection.peer
                    );
                    // Plain HTTP or garbage on the TLS port (§13).
                    tls_failed = handshaking && error.kind() == io::ErrorKind::InvalidData;
                    peer_closed = true;
                    break;
                }
            }
        }
        if connection.transport.take_handshake_done() {
            // The request head that follows gets its own timeout (§13).
            let deadline = now.saturating_add(self.args.handshake_timeout_ms);
            connection.deadline = Some(deadline);
            self.timers.schedule(deadline, ServerTimer::Deadline(key));
        }
        if tls_failed {
            self.hub.metrics_mut().tls_handshake_failures += 1;
        }
        if connection.transport.has_pending_output() {
            // The handshake's answer: written at the end of the batch.
            self.http_dirty.push(key);
        }
        while self.answer_next_request(key, now) {}
        let waiting = self
            .connections
            .get(key)
            .and_then(|connection| match &connection.phase {
                Phase::Http { head, .. } if !connection.close_when_flushed => Some(head.len()),
                _ => None,
            });
        match waiting {
            Some(_) if peer_closed => {
                self.schedule_free(key);
                false
            }
            Some(buffered) => at_cap && buffered <= buffer_cap,
            None => false,
        }
    }

    /// Decides on the request at the front of the connection's buffer and acts
    /// on it. True when it answered one and the connection waits for another.
    pub(super) fn answer_next_request(&mut self, key: usize, now: Millis) -> bool {
        let policy = Policy {
            verifier: &self.verifier,
            allowed_origins: &self.args.allowed_origin,
            max_connections: self.args.max_connections,
            open_connections: self.shared.connections.load(Ordering::Relaxed),
            echo_enabled: self.args.echo,
            demo_mode: self.demo_secret.is_some(),
            now_secs: now / 1000,
            api_key: self.args.api_key.as_deref(),
            max_body_bytes: self.args.max_message_bytes(),
        };
        let Some(connection) = self.connections.get_mut(key) else {
            return false;
        };
        let Phase::Http { head, .. } = &mut connection.phase else {
            return false;
        };
        if head.is_empty() || connection.close_when_flushed || connection.awaiting_api.is_some() {
            return false;
        }
        match http::decide(head, &policy) {
            None => false,
            Some(Decision::Reject { reason, response }) => {
                self.hub.metrics_mut().reject(reason);
                debug!(
                    "connection {key} ({}): request refused: {} ({})",
                    connection.peer,
                    reason.status(),
                    reason.label()
                );
                self.answer_http(key, Bytes::from(response), false, 0, now);
                false
            }
            Some(Decision::Serve {
                route,
                head_len,
                body_len,
                keep_alive,
            }) => self.serve_request(key, route, head_len, body_len, keep_alive, now),
            Some(Decision::Upgrade {
                response,
                identity,
                endpoint,
                head_len,
            }) => {
                self.upgrade(key, response, identity, endpoint, head_len, now);
                false
            }
        }
    }

    /// A plain request whose head is complete: answers it once its body is
    /// in, or parks the connection while `--redis` works on an API answer.
    fn serve_request(
        &mut self,
        key: usize,
        route: HttpRoute,
        head_len: usize,
        body_len: usize,
        keep_alive: bool,
        now: Millis,
    ) -> bool {
        let Some(connection) = self.connections.get_mut(key) else {
            return false;
        };
        let Phase::Http { head, .. } = &mut connection.phase else {
            return false;
        };
        let request_len = head_len.saturating_add(body_len);
        if head.len() < request_len {
            return false;
        }
        let body = head.get(head_len..request_len).unwrap_or_default().to_vec();
        let serial = connection.serial;
        match self.serve(route, &body, keep_alive, now, serial) {
            Some((response, keep_alive)) => {
                self.answer_http(key, Bytes::from(response), keep_alive, request_len, now);
                keep_alive
            }
            None => {
                // The answer needs Redis: later requests wait behind this one.
                if let Some(connection) = self.connections.get_mut(key)
                    && let Phase::Http { head, .. } = &mut connection.phase
                {
                    head.drain(..request_len.min(head.len()));
                    connection.awaiting_api = Some(keep_alive);
                    connection.deadline = None;
                    self.api_waiting.insert(serial, key);
                }
                false
            }
        }
    }

    /// Sends the `101` and hands the connection to the hub (or to echo).
    fn upgrade(
        &mut self,
        key: usize,
        response: Vec<u8>,
        identity: Identity,
        endpoint: Endpoint,
        head_len: usize,
        now: Millis,
    ) {
        // `--max-connections` counts the process (§12): the slot is taken
        // here, so two loops upgrading at once cannot both take the last one.
        if !self.shared.reserve_connection(self.args.max_connections) {
            self.hub.metrics_mut().reject(RejectReason::Capacity);
            let refusal = http::refusal(RejectReason::Capacity);
            self.answer_http(key, Bytes::from(refusal), false, 0, now);
            return;
        }
        // §14.4: after the token check, the user's own limit on the node.
        let per_user = self.args.max_connections_per_user;
        if !self.shared.reserve_user(&identity.user_id, per_user) {
            self.shared.release_connection();
            self.hub.metrics_mut().reject(RejectReason::UserLimit);
            let refusal = http::refusal(RejectReason::UserLimit);
            self.answer_http(key, Bytes::from(refusal), false, 0, now);
            return;
        }
        let Some(connection) = self.connections.get_mut(key) else {
            self.shared.release_connection();
            if per_user > 0 {
                self.shared.release_user(&identity.user_id);
            }
            return;
        };
        connection.counted = true;
        if per_user > 0 {
            connection.user_slot = Some(identity.user_id.as_str().into());
        }
        let Phase::Http { head, .. } = &mut connection.phase else {
            return;
        };
        let leftover = head.get(head_len..).unwrap_or_default().to_vec();
        let context = WebSocketContext::from_partially_read(
            leftover,
            Role::Server,
            Some(self.websocket_config),
        );
        debug!(
            "connection {key} ({}): upgraded for user {}",
            connection.peer, identity.user_id
        );
        connection.deadline = None;
        let echo = endpoint == Endpoint::Echo;
        let websocket = Phase::WebSocket {
            context: Box::new(context),
            echo,
        };
        let pending = match std::mem::replace(&mut connection.phase, websocket) {
            Phase::Http { response, .. } => response,
            _ => OutboundQueue::new(),
        };
        let mut upgrade = Bytes::from(response);
        if !pending.is_empty() {
            // Answers to earlier requests on this connection go out first.
            let mut joined = pending.to_vec();
            joined.extend_from_slice(&upgrade);
            upgrade = Bytes::from(joined);
        }
        match endpoint {
            Endpoint::Echo => {
                self.hub.connect_echo(key, now);
                if let Some(queue) = self.hub.outbound_mut(key) {
                    queue.push(upgrade);
                }
                self.hub.mark_dirty(key);
            }
            Endpoint::Rooms { join } => {
                let peer = connection.peer;
                self.hub
                    .connect_after(key, upgrade, identity, join.as_deref(), now);
                // For `/api/users` (§14.3): the hub keeps no sockets.
                self.hub.set_remote(key, peer);
            }
        }
        // Frames that came with the head are already buffered: parse them now,
        // no further readiness edge will announce them.
        self.read_websocket(key, false, now);
    }

    /// The answer to a plain HTTP request, and whether the connection stays
    /// open after it (a refused body closes it, like every refusal). `None`:
    /// with `--redis`, an API answer that comes later (`answer_api`).
    pub(super) fn serve(
        &mut self,
        route: HttpRoute,
        body: &[u8],
        keep_alive: bool,
        now: Millis,
        serial: u64,
    ) -> Option<(Vec<u8>, bool)> {
        let respond = |status: u16, content_type: &str, body: &[u8]| {
            http::response_with(status, content_type, body, &[], keep_alive)
        };
        let response = match route {
            // With --redis, a node that cannot reach Redis is not healthy (§10).
            HttpRoute::Health if self.hub.backplane_reachable() == Some(false) => {
                respond(503, JSON, br#"{"status":"unavailable"}"#)
            }
            HttpRoute::Health => respond(200, JSON, br#"{"status":"ok"}"#),
            // The assets change with the binary: browsers revalidate instead of
            // running a previous version's client against a new server.
            HttpRoute::Page => http::response_with(
                200,
                "text/html; charset=utf-8",
                assets::INDEX_HTML,
                &[("Cache-Control", "no-cache")],
                keep_alive,
            ),
            HttpRoute::ClientScript => http::response_with(
                200,
                "text/javascript; charset=utf-8",
                assets::CLIENT_JS,
                &[("Cache-Control", "no-cache")],
                keep_alive,
            ),
            // With N loops the counters are summed over every loop first.
            HttpRoute::Metrics | HttpRoute::Stats if self.loop_count() > 1 => {
                self.gather_stats(serial, route == HttpRoute::Metrics, keep_alive);
                return None;
            }
            HttpRoute::Metrics => {
                let text = self.hub.metrics().prometheus(self.gauges());
                respond(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text.as_bytes(),
                )
            }
            HttpRoute::Stats => {
                let json = self.hub.metrics().stats_json(self.gauges());
                respond(200, JSON, json.as_bytes())
            }
            HttpRoute::Publish
            | HttpRoute::Disconnect
            | HttpRoute::Subscribe
            | HttpRoute::Unsubscribe => {
                return self.serve_api(route, body, keep_alive, now, serial);
            }
            HttpRoute::RoomList { prefix, limit } => {
                let query = RoomQuery::List {
                    prefix: prefix.into(),
                    limit,
                };
                let answer = self
                    .hub
                    .api_rooms(query, ApiKind::Rooms { limit }, now, serial)?;
                return Some(self.api_response(answer, keep_alive));
            }
            HttpRoute::Room { room } => {
                let query = RoomQuery::One { room: room.into() };
                let answer = self.hub.api_rooms(query, ApiKind::Room, now, serial)?;
                return Some(self.api_response(answer, keep_alive));
            }
            HttpRoute::RoomHistory { room, since } => {
                let query = RoomQuery::One { room: room.into() };
                let kind = ApiKind::History { since };
                let answer = self.hub.api_rooms(query, kind, now, serial)?;
                return Some(self.api_response(answer, keep_alive));
            }
            // With N loops the user's connections are gathered from every loop.
            HttpRoute::User { user } if self.loop_count() > 1 => {
                self.gather_user(serial, &user, keep_alive);
                return None;
            }
            HttpRoute::User { user } => {
                let connections = self.hub.connections_of(&user);
                let json = user_answer(&user, connections, self.hub.node_id());
                respond(200, JSON, json.as_bytes())
            }
            HttpRoute::TokenCheck(check) => {
                let (status, json) = check.answer();
                if status != 200 {
                    self.hub.metrics_mut().reject(RejectReason::Unauthorized);
                }
                http::response_with(
                    status,
                    JSON,
                    json.as_bytes(),
                    &[("Cache-Control", "no-store")],
                    keep_alive,
                )
            }
            HttpRoute::DemoToken { name } => {
                return Some(self.demo_token_answer(name, keep_alive, now));
            }
        };
        Some((response, keep_alive))
    }

    /// The server API's `POST`s (publish, disconnect, subscribe, unsubscribe);
    /// `None` while another loop or Redis works on it.
    fn serve_api(
        &mut self,
        route: HttpRoute,
        body: &[u8],
        keep_alive: bool,
        now: Millis,
        serial: u64,
    ) -> Option<(Vec<u8>, bool)> {
        let answer = match route {
            HttpRoute::Publish => self.hub.api_publish(body, now, serial)?,
            HttpRoute::Subscribe => self.hub.api_membership(body, true, now, serial)?,
            HttpRoute::Unsubscribe => self.hub.api_membership(body, false, now, serial)?,
            _ => self.hub.api_disconnect(body, now, serial)?,
        };
        Some(self.api_response(answer, keep_alive))
    }

    /// `GET /demo/token`: a guest token in demo mode, `404` otherwise.
    fn demo_token_answer(
        &mut self,
        name: Option<String>,
        keep_alive: bool,
        now: Millis,
    ) -> (Vec<u8>, bool) {
        let Some(secret) = &self.demo_secret else {
            let response =
                http::response(404, "text/plain; charset=utf-8", b"404 Not Found\n", &[]);
            return (response, false);
        };
        let user_id = format!("guest-{:04x}", getrandom::u32().unwrap_or(0) & 0xffff);
        let name = name
            .map(|name| name.trim().chars().take(64).collect::<String>())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| user_id.clone());
        let token = auth::sign(
            secret.as_bytes(),
            &TokenClaims {
                sub: user_id.clone(),
                name: Some(name.clone()),
                expires_at: Some(now / 1000 + DEMO_TOKEN_TTL_SECS),
                rooms: None,
            },
        );
        let body = serde_json::json!({
            "token": token,
            "user": {"id": user_id, "name": name},
        });
        let response = http::response_with(200, JSON, body.to_string().as_bytes(), &[], keep_alive);
        (response, keep_alive)
    }

    /// The HTTP answer to a server API request, and whether the connection
    /// stays open (a bad body closes it, like every refusal).
    pub(super) fn api_response(&mut self, answer: ApiAnswer, keep_alive: bool) -> (Vec<u8>, bool) {
        match answer {
            ApiAnswer::Ok(json) => (
                http::response_with(200, JSON, json.as_bytes(), &[], keep_alive),
                keep_alive,
            ),
            ApiAnswer::BadRequest(message) => {
                self.hub.metrics_mut().reject(RejectReason::BadRequest);
                let json = serde_json::json!({ "error": message }).to_string();
                (
                    http::response_with(400, JSON, json.as_bytes(), &[], false),
                    false,
                )
            }
            ApiAnswer::NoRoom => {
                // Counted and closed like every refusal (§14.3: `not_found`).
                self.hub.metrics_mut().reject(RejectReason::NotFound);
                (
                    http::response_with(404, JSON, br#"{"error":"no_room"}"#, &[], false),
                    false,
                )
            }
            ApiAnswer::Unavailable => (
                http::response_with(503, JSON, br#"{"error":"unavailable"}"#, &[], keep_alive),
                keep_alive,
            ),
        }
    }

    /// Sends the API answers that came back from Redis, and goes on with
    /// requests that were waiting behind them on the same connection.
    pub(super) fn answer_api(&mut self, now: Millis) {
        let mut answers = std::mem::take(&mut self.api_answers);
        self.hub.take_api_answers(&mut answers);
        for (serial, answer) in answers.drain(..) {
            let Some((key, keep_alive)) = self.take_waiting(serial) else {
                continue;
            };
            // A drain under way closes the connection after this answer.
            let keep_alive = keep_alive && self.shutting_down.is_none();
            let (response, keep_alive) = self.api_response(answer, keep_alive);
            self.answer_waiting(key, response, keep_alive, now);
        }
        self.api_answers = answers;
        for (serial, response) in std::mem::take(&mut self.plain_answers) {
            if let Some((key, keep_alive)) = self.take_waiting(serial) {
                self.answer_waiting(key, response, keep_alive, now);
            }
        }
    }

    /// The connection (slab key) still waiting for the answer to request
    /// `serial`, and whether that request asked to keep the connection alive;
    /// `None` if it has gone since.
    fn take_waiting(&mut self, serial: u64) -> Option<(usize, bool)> {
        let key = self.api_waiting.remove(&serial)?;
        let keep_alive = self
            .connections
            .get_mut(key)
            .filter(|c| c.serial == serial && !c.freeing)
            .and_then(|c| c.awaiting_api.take())?;
        Some((key, keep_alive))
    }

    /// Sends a late answer, then the requests that queued behind it.
    fn answer_waiting(&mut self, key: usize, response: Vec<u8>, keep_alive: bool, now: Millis) {
        self.answer_http(key, Bytes::from(response), keep_alive, 0, now);
        if keep_alive {
            while self.answer_next_request(key, now) {}
        }
    }

    /// Queues an HTTP answer. With `keep_alive`, the answered request's
    /// `consumed` bytes leave the buffer and the connection waits for the next
    /// one, for at most the handshake timeout; otherwise it closes once written.
    pub(super) fn answer_http(
        &mut self,
        key: usize,
        response: Bytes,
        keep_alive: bool,
        consumed: usize,
        now: Millis,
    ) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        if let Phase::Http {
            response: queue,
            head,
        } = &mut connection.phase
        {
            queue.push(response);
            self.http_dirty.push(key);
            if keep_alive {
                head.drain(..consumed.min(head.len()));
                let deadline = now.saturating_add(self.args.handshake_timeout_ms);
                connection.deadline = Some(deadline);
                self.timers.schedule(deadline, ServerTimer::Deadline(key));
            } else {
                connection.close_when_flushed = true;
            }
        }
    }
}
