//! Accepting while the process is out of file descriptors.
//!
//! When `accept` fails with EMFILE/ENFILE the pending connections stay in the
//! kernel's backlog; retrying at once would spin, so accepting pauses and is
//! retried every [`ACCEPT_PAUSE_MS`]. An outage is logged twice, when it
//! starts and when accepting works again (with the attempts refused
//! meanwhile), never once per retry: at the file limit a retry every 100 ms
//! would otherwise fill the log.

use crate::timers::Millis;

/// How long accepting pauses after EMFILE/ENFILE before the next attempt.
pub const ACCEPT_PAUSE_MS: Millis = 100;

/// The pause state of one listener.
#[derive(Debug, Default)]
pub struct AcceptPause {
    /// When the next attempt may run, while paused.
    paused_until: Option<Millis>,
    /// The outage under way: when it started and how many attempts failed.
    outage: Option<Outage>,
}

/// An outage that has ended, for the log line that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When the first attempt failed.
    pub since: Millis,
    /// Attempts that failed for want of descriptors, the first included.
    pub refused: u64,
}

impl AcceptPause {
    /// Whether accepting must wait at `now`.
    pub fn is_paused(&self, now: Millis) -> bool {
        self.paused_until.is_some_and(|until| now < until)
    }

    /// When the loop must wake to retry, while paused.
    pub fn resume_at(&self) -> Option<Millis> {
        self.paused_until
    }

    /// Whether a pause has run out at `now`, so the loop should retry.
    pub fn is_due(&self, now: Millis) -> bool {
        self.paused_until.is_some_and(|until| now >= until)
    }

    /// An attempt failed for want of descriptors. True when this starts an
    /// outage (the moment to log it).
    pub fn refused(&mut self, now: Millis) -> bool {
        self.paused_until = Some(now.saturating_add(ACCEPT_PAUSE_MS));
        match &mut self.outage {
            Some(outage) => {
                outage.refused += 1;
                false
            }
            None => {
                self.outage = Some(Outage {
                    since: now,
                    refused: 1,
                });
                true
            }
        }
    }

    /// An attempt got past the descriptor limit (a connection, or an empty
    /// backlog). Returns the outage this ends, if any, to log.
    pub fn worked(&mut self) -> Option<Outage> {
        self.paused_until = None;
        self.outage.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_once_at_each_end() {
        let mut pause = AcceptPause::default();
        assert!(!pause.is_paused(0));
        assert_eq!(pause.worked(), None, "no outage, nothing to report");

        assert!(pause.refused(1_000), "the first refusal starts the outage");
        assert!(pause.is_paused(1_050));
        assert!(!pause.is_due(1_050));
        assert_eq!(pause.resume_at(), Some(1_100));
        assert!(pause.is_due(1_100));
        // Retries that fail again are counted, not reported.
        for retry in 1..=30 {
            assert!(!pause.refused(1_000 + retry * 100));
        }
        assert_eq!(
            pause.worked(),
            Some(Outage {
                since: 1_000,
                refused: 31
            })
        );
        assert!(!pause.is_paused(5_000));
        assert_eq!(pause.resume_at(), None);
        assert_eq!(pause.worked(), None, "reported once");
        assert!(pause.refused(9_000), "a later outage is a new one");
    }
}
