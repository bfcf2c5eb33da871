//! Writing queued bytes: each connection with something queued is written
//! once per loop iteration, as much as its socket takes.

use log::debug;

use super::connection::{CLOSE_LINGER_MS, Phase};
use super::server::{EventLoop, ServerTimer};
use crate::hub::{ConnId, Millis};

impl EventLoop {
    /// Writes every connection that has queued bytes, once each.
    pub(super) fn flush_dirty(&mut self, dirty: &mut Vec<ConnId>, now: Millis) {
        self.hub.take_dirty(dirty);
        dirty.append(&mut self.http_dirty);
        for key in dirty.drain(..) {
            self.flush_connection(key, now);
        }
    }

    /// Drains the connection's queue into its socket as far as the socket takes.
    pub(super) fn flush_connection(&mut self, key: usize, now: Millis) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        if connection.freeing {
            return;
        }
        let queue = match &mut connection.phase {
            Phase::Http { response, .. } => Some(response),
            Phase::WebSocket { .. } => self.hub.outbound_mut(key),
            Phase::Lingering => None,
        };
        let Some(queue) = queue else {
            return;
        };
        // With TLS the queue may be empty while ciphertext still waits in
        // rustls for the socket (the last batch, a handshake reply).
        if queue.is_empty()
            && !connection.close_when_flushed
            && !connection.transport.has_pending_output()
        {
            return;
        }
        match connection.transport.write_queue(queue, &mut self.staging) {
            Ok(written) => {
                self.hub.metrics_mut().bytes_sent += written as u64;
                if written > 0 {
                    self.hub.drained(key);
                }
            }
            Err(error) => {
                debug!(
                    "connection {key} ({}): write failed: {error}",
                    connection.peer
                );
                self.hub.disconnect(key, now);
                self.schedule_free(key);
                return;
            }
        }
        let flushed = !connection.transport.has_pending_output()
            && match &connection.phase {
                Phase::Http { response, .. } => response.is_empty(),
                _ => self.hub.outbound_mut(key).is_none_or(|q| q.is_empty()),
            };
        if flushed && connection.close_when_flushed {
            self.finish_flushed(key, now);
        }
    }

    /// Everything is written on a closing connection: shut our side and wait
    /// briefly for the peer to hang up.
    pub(super) fn finish_flushed(&mut self, key: usize, now: Millis) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        connection.transport.shutdown_write();
        connection.phase = Phase::Lingering;
        // The session is over: its `--max-connections` slot is free again.
        connection.release_slots(&self.shared);
        if connection.deadline.is_none() {
            let deadline = now + CLOSE_LINGER_MS;
            connection.deadline = Some(deadline);
            self.timers.schedule(deadline, ServerTimer::Deadline(key));
        }
        // The hub's part ended with the close; its queue is no longer needed.
        self.hub.release(key, now);
        self.read_discard(key);
    }
}
