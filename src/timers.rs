//! Deadline buckets: the one timer structure of the server.
//!
//! Deadlines are rounded up to a bucket of `RESOLUTION_MS` and kept in an
//! ordered map of buckets, so the loop asks one question per iteration ("when
//! is the first bucket due?") and only touches entries that are due: the cost
//! per iteration does not grow with the number of connections. Entries are
//! never removed early; their owner checks, when one fires, whether it still
//! means anything (a generation or a stored deadline), which keeps rescheduling
//! an O(log buckets) push instead of a search.

use std::collections::BTreeMap;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Width of one bucket. Timers fire up to this late, never early; every
/// timeout of the contract is measured in seconds or hundreds of milliseconds.
pub const RESOLUTION_MS: Millis = 10;

/// Buckets of entries keyed by the time they are due.
#[derive(Debug)]
pub struct Deadlines<T> {
    buckets: BTreeMap<Millis, Vec<T>>,
    len: usize,
    /// Emptied bucket vectors kept for reuse, so steady timer churn does not allocate.
    spare: Vec<Vec<T>>,
}

impl<T> Default for Deadlines<T> {
    fn default() -> Self {
        Deadlines {
            buckets: BTreeMap::new(),
            len: 0,
            spare: Vec::new(),
        }
    }
}

impl<T> Deadlines<T> {
    /// An empty set of deadlines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries waiting, stale ones included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no entry waits.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `entry` for `deadline` (it fires at the end of its bucket).
    pub fn schedule(&mut self, deadline: Millis, entry: T) {
        let bucket = deadline
            .div_ceil(RESOLUTION_MS)
            .saturating_mul(RESOLUTION_MS);
        self.len += 1;
        match self.buckets.get_mut(&bucket) {
            Some(entries) => entries.push(entry),
            None => {
                let mut entries = self.spare.pop().unwrap_or_default();
                entries.push(entry);
                self.buckets.insert(bucket, entries);
            }
        }
    }

    /// When the first bucket is due, if any.
    pub fn next_due(&self) -> Option<Millis> {
        self.buckets.keys().next().copied()
    }

    /// Moves every entry due at `now` into `into`, oldest bucket first.
    pub fn take_due(&mut self, now: Millis, into: &mut Vec<T>) {
        while let Some(entry) = self.buckets.first_entry() {
            if *entry.key() > now {
                break;
            }
            let mut entries = entry.remove();
            self.len -= entries.len();
            into.append(&mut entries);
            if self.spare.len() < 16 {
                self.spare.push(entries);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_fire_in_bucket_order_never_early() {
        let mut deadlines = Deadlines::new();
        deadlines.schedule(105, "b");
        deadlines.schedule(101, "a");
        deadlines.schedule(250, "c");
        assert_eq!(deadlines.next_due(), Some(110));
        let mut due = Vec::new();
        deadlines.take_due(109, &mut due);
        assert!(due.is_empty(), "nothing fires before its bucket ends");
        deadlines.take_due(110, &mut due);
        due.sort();
        assert_eq!(due, vec!["a", "b"]);
        assert_eq!(deadlines.len(), 1);
        due.clear();
        deadlines.take_due(10_000, &mut due);
        assert_eq!(due, vec!["c"]);
        assert!(deadlines.is_empty());
        assert_eq!(deadlines.next_due(), None);
    }

    #[test]
    fn a_hundred_thousand_timers_cost_only_what_is_due() {
        let mut deadlines = Deadlines::new();
        for key in 0..100_000u64 {
            deadlines.schedule(30_000 + key % 10_000, key);
        }
        let mut due = Vec::new();
        deadlines.take_due(29_999, &mut due);
        assert!(due.is_empty());
        deadlines.take_due(30_010, &mut due);
        assert_eq!(due.len(), 11 * 10, "keys 0..=10 of every 10 000");
        assert_eq!(deadlines.len(), 100_000 - due.len());
    }

    #[test]
    fn a_deadline_at_the_end_of_time_does_not_overflow() {
        let mut deadlines = Deadlines::new();
        deadlines.schedule(Millis::MAX, 1);
        assert!(deadlines.next_due().is_some());
    }
}
