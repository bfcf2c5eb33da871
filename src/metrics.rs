//! Counters of PROTOCOL §7, kept in one struct so that the log summary,
//! `/metrics` and `/api/stats` are all read from the same numbers.

use crate::handshake::RejectReason;

/// Monotonic counters of the server's life.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Text frames received from clients.
    pub messages_received: u64,
    /// Frames queued to clients (one per recipient).
    pub messages_sent: u64,
    /// Frames not queued: broadcasts to a connection above its soft mark, and
    /// the frame that pushed a connection over its hard mark.
    pub messages_dropped: u64,
    /// Connections closed for crossing the hard mark.
    pub slow_consumers_closed: u64,
    /// Bytes written to client sockets.
    pub bytes_sent: u64,
    /// Refused HTTP requests, by reason (index of `RejectReason::ALL`).
    pub handshakes_rejected: [u64; RejectReason::ALL.len()],
}

impl Metrics {
    /// Counts one refused request.
    pub fn reject(&mut self, reason: RejectReason) {
        if let Some(index) = RejectReason::ALL.iter().position(|r| *r == reason)
            && let Some(count) = self.handshakes_rejected.get_mut(index)
        {
            *count += 1;
        }
    }

    /// Refused requests of one reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|index| self.handshakes_rejected.get(index).copied())
            .unwrap_or(0)
    }
}
