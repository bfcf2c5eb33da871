//! WebSocket on a connection: frames in through tungstenite, messages to the
//! hub, and closes out.

use std::io;

use log::debug;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, Utf8Bytes};

use super::connection::{CLOSE_LINGER_MS, Phase, QueueStream};
use super::server::{EventLoop, ServerTimer};
use crate::hub::{CloseRequest, Millis};
use crate::ws::close::{self, ReadFailure};

impl EventLoop {
    /// `trust_short_reads`: see [`SharedInput::trust_short_reads`].
    pub(super) fn on_readable(&mut self, key: usize, trust_short_reads: bool, now: Millis) {
        let Some(connection) = self.connections.get(key) else {
            return;
        };
        if connection.freeing {
            return;
        }
        match connection.phase {
            Phase::Http { .. } => self.read_http(key, now),
            Phase::WebSocket { .. } => self.read_websocket(key, trust_short_reads, now),
            Phase::Lingering => self.read_discard(key),
        }
    }

    /// Reads frames until the socket would block, handing each message on.
    pub(super) fn read_websocket(&mut self, key: usize, trust_short_reads: bool, now: Millis) {
        self.input.reset(trust_short_reads);
        loop {
            let Some(connection) = self.connections.get_mut(key) else {
                return;
            };
            if connection.freeing || connection.close_when_flushed {
                return;
            }
            let Phase::WebSocket { context, echo } = &mut connection.phase else {
                return;
            };
            let echo = *echo;
            let Some(queue) = self.hub.outbound_mut(key) else {
                return;
            };
            let mut stream = QueueStream {
                transport: &mut connection.transport,
                input: &mut self.input,
                queue,
            };
            let result = context.read(&mut stream);
            let queued_reply = !stream.queue.is_empty();
            let message = match result {
                // Echo answers through the same context, so its frames stay in order.
                Ok(message @ (Message::Text(_) | Message::Binary(_))) if echo => {
                    let _ = context.write(&mut stream, message);
                    self.hub.mark_dirty(key);
                    self.hub.saw_activity(key, now);
                    continue;
                }
                Ok(message) => message,
                Err(error) => {
                    let failure = close::read_failure(&error);
                    if !matches!(failure, ReadFailure::WouldBlock | ReadFailure::Interrupted) {
                        debug!("connection {key}: read ended: {error}");
                    }
                    if self.on_read_failure(key, failure, queued_reply, trust_short_reads, now) {
                        continue;
                    }
                    return;
                }
            };
            if !self.on_message(key, message, queued_reply, now) {
                return;
            }
            self.hub.saw_activity(key, now);
        }
    }

    /// One message from a rooms connection (or a control frame). False when
    /// the connection is being closed for it.
    fn on_message(
        &mut self,
        key: usize,
        message: Message,
        queued_reply: bool,
        now: Millis,
    ) -> bool {
        match message {
            Message::Text(text) => self.hub.receive_text(key, text.as_str(), now),
            Message::Binary(_) => {
                let (code, reason) = close::BINARY_REFUSED;
                self.fail(key, code, reason, now);
                return false;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                if queued_reply {
                    self.hub.mark_dirty(key);
                }
            }
            Message::Close(frame) => {
                debug!(
                    "connection {key}: closed by peer ({})",
                    frame
                        .as_ref()
                        .map_or_else(|| "no code".to_string(), |f| f.to_string())
                );
                self.hub.disconnect(key, now);
                self.hub.mark_dirty(key);
                // The next read flushes tungstenite's reply and reports the end.
            }
        }
        true
    }

    /// Acts on a failed read; true when reading should go on.
    fn on_read_failure(
        &mut self,
        key: usize,
        failure: ReadFailure,
        queued_reply: bool,
        trust_short_reads: bool,
        now: Millis,
    ) -> bool {
        match failure {
            ReadFailure::Interrupted => return true,
            ReadFailure::WouldBlock => {
                if queued_reply {
                    self.hub.mark_dirty(key);
                }
                if self.input.turn_used_up {
                    self.read_later(key, trust_short_reads);
                }
            }
            ReadFailure::Closed => {
                if let Some(connection) = self.connections.get_mut(key) {
                    connection.close_when_flushed = true;
                    connection.deadline = Some(now + CLOSE_LINGER_MS);
                }
                self.timers
                    .schedule(now + CLOSE_LINGER_MS, ServerTimer::Deadline(key));
                self.hub.disconnect(key, now);
                self.hub.mark_dirty(key);
                if self.hub.outbound_mut(key).is_none_or(|q| q.is_empty()) {
                    self.finish_flushed(key, now);
                }
            }
            ReadFailure::Close(code, reason) => self.fail(key, code, reason, now),
            ReadFailure::Gone => {
                self.hub.disconnect(key, now);
                self.schedule_free(key);
            }
        }
        false
    }

    /// Closes a WebSocket connection for something its client did: leave the
    /// rooms now, queue the close frame, hang up once it is written.
    pub(super) fn fail(&mut self, key: usize, code: CloseCode, reason: &'static str, now: Millis) {
        debug!(
            "connection {key}: closing with {}: {reason}",
            u16::from(code)
        );
        self.hub.disconnect(key, now);
        self.close_websocket(key, code, reason.into(), now);
    }

    /// Queues a close frame through tungstenite (so its state machine knows)
    /// and arranges for the socket to be shut once the frame is out.
    pub(super) fn close_websocket(
        &mut self,
        key: usize,
        code: CloseCode,
        reason: Utf8Bytes,
        now: Millis,
    ) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        if let Phase::WebSocket { context, .. } = &mut connection.phase
            && let Some(queue) = self.hub.outbound_mut(key)
        {
            let mut stream = QueueStream {
                transport: &mut connection.transport,
                input: &mut self.input,
                queue,
            };
            let _ = context.close(&mut stream, Some(CloseFrame { code, reason }));
        }
        connection.close_when_flushed = true;
        let deadline = now + CLOSE_LINGER_MS;
        connection.deadline = Some(deadline);
        self.timers.schedule(deadline, ServerTimer::Deadline(key));
        self.hub.mark_dirty(key);
    }

    pub(super) fn apply_hub_closes(&mut self, closes: &mut Vec<CloseRequest>, now: Millis) {
        self.hub.take_closes(closes);
        for close in closes.drain(..) {
            debug!(
                "connection {}: closing with {}: {}",
                close.conn, close.code, close.reason
            );
            self.close_websocket(
                close.conn,
                CloseCode::from(close.code),
                close.reason.into(),
                now,
            );
        }
    }

    pub(super) fn read_discard(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        self.input.reset(false);
        loop {
            match self.input.refill(&mut connection.transport) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if self.input.turn_used_up {
                        self.read_later(key, false);
                    }
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.schedule_free(key);
    }

    /// Puts a connection whose read turn was used up on the list read at
    /// the start of the next iteration (once, however often its turn ends).
    pub(super) fn read_later(&mut self, key: usize, trust_short_reads: bool) {
        if let Some(connection) = self.connections.get_mut(key)
            && !connection.read_again_queued
        {
            connection.read_again_queued = true;
            self.read_again
                .push((key, connection.serial, trust_short_reads));
        }
    }

    /// Gives the connections whose turn ended last iteration their next
    /// turn, ahead of this iteration's events (their sockets raise none).
    pub(super) fn continue_reads(&mut self, closes: &mut Vec<CloseRequest>, now: Millis) {
        if self.read_again.is_empty() {
            return;
        }
        // The two lists trade places, so neither allocates again.
        let mut reading = std::mem::replace(
            &mut self.read_again,
            std::mem::take(&mut self.reading_again),
        );
        for &(key, serial, trust_short_reads) in &reading {
            // A freed key may have gone to a new connection since.
            match self.connections.get_mut(key) {
                Some(connection) if connection.serial == serial => {
                    connection.read_again_queued = false;
                }
                _ => continue,
            }
            self.on_readable(key, trust_short_reads, now);
            self.apply_hub_closes(closes, now);
        }
        reading.clear();
        self.reading_again = reading;
    }
}
