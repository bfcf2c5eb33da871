//! Deadlines (handshake, close linger) and freeing connections at the end
//! of an event batch.

use log::debug;

use super::connection::Phase;
use super::server::{EventLoop, ServerTimer};
use crate::http::RejectReason;
use crate::hub::Millis;

impl EventLoop {
    pub(super) fn run_deadlines(&mut self, now: Millis) {
        let mut due = std::mem::take(&mut self.due);
        self.timers.take_due(now, &mut due);
        for timer in due.drain(..) {
            match timer {
                ServerTimer::Deadline(key) => self.deadline_passed(key, now),
                ServerTimer::DrainClose(key) => self.drain_close(key, now),
                ServerTimer::StateSnapshot => self.snapshot_state(now),
            }
        }
        self.due = due;
    }

    pub(super) fn deadline_passed(&mut self, key: usize, now: Millis) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        let passed = connection.deadline.is_some_and(|deadline| deadline <= now);
        if !passed || connection.freeing {
            return;
        }
        if let Phase::Http { .. } = connection.phase {
            if !connection.close_when_flushed {
                self.hub.metrics_mut().reject(RejectReason::Timeout);
                debug!(
                    "connection {key} ({}): handshake timed out",
                    connection.peer
                );
            }
        } else {
            debug!("connection {key}: close did not complete in time");
        }
        self.hub.disconnect(key, now);
        self.schedule_free(key);
    }

    pub(super) fn schedule_free(&mut self, key: usize) {
        if let Some(connection) = self.connections.get_mut(key)
            && !connection.freeing
        {
            connection.freeing = true;
            self.to_free.push(key);
        }
    }

    /// Frees connections at the end of the batch, so that no key is reused
    /// while events for its previous owner may still be pending in the batch.
    pub(super) fn free_finished(&mut self, now: Millis) {
        for key in self.to_free.drain(..) {
            if let Some(mut connection) = self.connections.try_remove(key) {
                let _ = self
                    .poll
                    .registry()
                    .deregister(connection.transport.socket_mut());
                connection.release_slots(&self.shared);
                self.hub.release(key, now);
                debug!("connection {key} ({}): freed", connection.peer);
            }
        }
    }
}
