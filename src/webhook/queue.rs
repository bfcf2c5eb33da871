//! The rules of webhook delivery (PROTOCOL §14.2), sans-IO: events and time
//! go in, "send this batch now" or "wait until then" comes out. No socket,
//! no clock and no randomness of its own, so every rule is tested exactly;
//! the sender thread (`sender`) is a thin shell around it.
//!
//! - A batch holds up to [`BATCH_MAX`] events and leaves at most
//!   [`BATCH_DELAY`] after its first event was queued (at once when a full
//!   batch is waiting).
//! - One batch is in flight at a time; a failed one is sent again, with the
//!   same delivery id and body, after a delay with full jitter that doubles
//!   from [`BACKOFF_START`] up to [`BACKOFF_MAX`], for as long as it takes.
//! - At most `capacity` events wait (the batch in flight not counted); when
//!   full, the oldest are dropped and counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::WebhookStats;
use super::event::Event;

/// Most events in one batch.
pub const BATCH_MAX: usize = 100;
/// Longest an event waits for more to share its batch.
pub const BATCH_DELAY: Duration = Duration::from_millis(50);
/// Cap of the delay after a batch's first failed attempt.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Largest cap of the delay between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One POST's worth of events, with the delivery id the backend
/// deduplicates on. It does not change once made, so a retry sends the
/// same body under the same id.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    delivery: Box<str>,
    events: Vec<Event>,
}

impl Batch {
    /// The `X-Roomcast-Delivery` id, the same on every attempt.
    pub fn delivery(&self) -> &str {
        &self.delivery
    }

    /// The events, oldest first.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The request body `{"events":[…]}`.
    pub fn body(&self) -> String {
        let mut out = String::with_capacity(64 + self.events.len() * 160);
        out.push_str("{\"events\":[");
        for (index, event) in self.events.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            event.write_json(&mut out);
        }
        out.push_str("]}");
        out
    }
}

/// What the sender should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// POST this batch now, then report [`Outbox::delivered`] or
    /// [`Outbox::failed`].
    Send(Arc<Batch>),
    /// Nothing to send before this time (the batching delay or a retry's
    /// backoff), unless an event wakes the sender.
    WaitUntil(Instant),
    /// A batch is out and not yet reported: nothing else may go.
    Sending,
    /// No event is waiting.
    Idle,
}

/// The batch in flight.
#[derive(Debug)]
struct Flight {
    batch: Arc<Batch>,
    /// Failed attempts of this batch so far.
    failures: u32,
    /// When a failed batch goes again; `None` while an attempt is out.
    retry_at: Option<Instant>,
}

/// The queue of events waiting for the webhook and the batch in flight.
#[derive(Debug)]
pub struct Outbox {
    capacity: usize,
    /// Waiting events with the time each was queued, oldest first.
    waiting: VecDeque<(Event, Instant)>,
    flight: Option<Flight>,
    /// Unique to the process, so delivery ids do not repeat across restarts.
    delivery_prefix: Box<str>,
    next_delivery: u64,
    /// Shutting down: a batch leaves without waiting for more events.
    flushing: bool,
    delivered: u64,
    dropped: u64,
    failures: u64,
}

impl Outbox {
    /// An empty outbox holding at most `capacity` waiting events, whose
    /// delivery ids are `{delivery_prefix}-{counter}`.
    pub fn new(capacity: usize, delivery_prefix: impl Into<Box<str>>) -> Self {
        Outbox {
            capacity,
            waiting: VecDeque::new(),
            flight: None,
            delivery_prefix: delivery_prefix.into(),
            next_delivery: 0,
            flushing: false,
            delivered: 0,
            dropped: 0,
            failures: 0,
        }
    }

    /// Queues `event`, dropping the oldest waiting one when full. True when
    /// the sender must look again: the push made a batch due sooner than
    /// it would have been (the first event starts the batching delay, a
    /// full batch leaves at once); any other push can wait for the sender's
    /// next look, which saves a wake per event.
    pub fn push(&mut self, event: Event, now: Instant) -> bool {
        self.waiting.push_back((event, now));
        while self.waiting.len() > self.capacity {
            self.waiting.pop_front();
            self.dropped += 1;
        }
        let waiting = self.waiting.len();
        self.flight.is_none() && (waiting == 1 || waiting == BATCH_MAX)
    }

    /// What to do at `now`.
    pub fn next(&mut self, now: Instant) -> Next {
        if let Some(flight) = &mut self.flight {
            return match flight.retry_at {
                None => Next::Sending,
                Some(at) if now >= at => {
                    flight.retry_at = None;
                    Next::Send(Arc::clone(&flight.batch))
                }
                Some(at) => Next::WaitUntil(at),
            };
        }
        let Some((_, first_queued)) = self.waiting.front() else {
            return Next::Idle;
        };
        let due = *first_queued + BATCH_DELAY;
        if now < due && self.waiting.len() < BATCH_MAX && !self.flushing {
            return Next::WaitUntil(due);
        }
        let count = self.waiting.len().min(BATCH_MAX);
        let events = self
            .waiting
            .drain(..count)
            .map(|(event, _)| event)
            .collect();
        let batch = Arc::new(Batch {
            delivery: format!("{}-{}", self.delivery_prefix, self.next_delivery).into(),
            events,
        });
        self.next_delivery += 1;
        self.flight = Some(Flight {
            batch: Arc::clone(&batch),
            failures: 0,
            retry_at: None,
        });
        Next::Send(batch)
    }

    /// The batch in flight was answered with a 2xx.
    pub fn delivered(&mut self) {
        if let Some(flight) = self.flight.take() {
            self.delivered += flight.batch.events.len() as u64;
        }
    }

    /// The attempt in flight failed at `now`; it goes again after the
    /// returned delay, drawn from `random` (any `u64`, uniformly random).
    pub fn failed(&mut self, now: Instant, random: u64) -> Duration {
        let Some(flight) = &mut self.flight else {
            return Duration::ZERO;
        };
        self.failures += 1;
        let delay = full_jitter(backoff_cap(flight.failures), random);
        flight.failures = flight.failures.saturating_add(1);
        flight.retry_at = Some(now + delay);
        delay
    }

    /// From now on a batch leaves as soon as it has an event: at shutdown
    /// the remaining time is better spent sending than waiting for more.
    pub fn flush(&mut self) {
        self.flushing = true;
    }

    /// Events in the batch in flight (0 when none is).
    pub fn flight_events(&self) -> usize {
        self.flight
            .as_ref()
            .map_or(0, |flight| flight.batch.events.len())
    }

    /// Failed attempts of the batch in flight (0 when none is).
    pub fn flight_failures(&self) -> u32 {
        self.flight.as_ref().map_or(0, |flight| flight.failures)
    }

    /// The counters and the number of waiting events.
    pub fn stats(&self) -> WebhookStats {
        WebhookStats {
            delivered: self.delivered,
            dropped: self.dropped,
            queued: self.waiting.len(),
            failures: self.failures,
        }
    }
}

/// The longest delay after a batch's `attempt`-th failure (0-based):
/// 100 ms doubled per earlier failure, at most 10 s.
pub fn backoff_cap(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    BACKOFF_START.saturating_mul(factor).min(BACKOFF_MAX)
}

/// Full jitter: a delay uniform in `[0, cap]` (millisecond steps), so that
/// many senders failing together do not retry together.
pub fn full_jitter(cap: Duration, random: u64) -> Duration {
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(random % cap_ms.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(number: u64) -> Event {
        Event::room_occupied(&format!("room-{number}"), number)
    }

    fn rooms(batch: &Batch) -> Vec<String> {
        batch
            .events()
            .iter()
            .map(|event| {
                let json: serde_json::Value =
                    serde_json::from_str(event.json()).unwrap_or_default();
                json["room"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }

    fn send(next: Next) -> Arc<Batch> {
        match next {
            Next::Send(batch) => batch,
            other => panic!("expected a batch to send, got {other:?}"),
        }
    }

    #[test]
    fn nothing_waiting_is_idle() {
        let mut outbox = Outbox::new(10, "p");
        assert_eq!(outbox.next(Instant::now()), Next::Idle);
    }

    #[test]
    fn a_batch_leaves_fifty_milliseconds_after_its_first_event() {
        let start = Instant::now();
        let mut outbox = Outbox::new(1000, "p");
        assert!(
            outbox.push(event(0), start),
            "the first event wakes the sender"
        );
        let later = start + Duration::from_millis(30);
        assert!(!outbox.push(event(1), later), "the second need not");
        assert_eq!(outbox.next(start), Next::WaitUntil(start + BATCH_DELAY));
        assert_eq!(outbox.next(later), Next::WaitUntil(start + BATCH_DELAY));
        let batch = send(outbox.next(start + BATCH_DELAY));
        assert_eq!(rooms(&batch), ["room-0", "room-1"]);
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_holds_at_most_a_hundred() {
        let now = Instant::now();
        let mut outbox = Outbox::new(1000, "p");
        for number in 0..250 {
            let wake = outbox.push(event(number), now);
            assert_eq!(wake, number == 0 || number == 99, "event {number}");
        }
        let first = send(outbox.next(now));
        assert_eq!(first.events().len(), BATCH_MAX);
        outbox.delivered();
        let second = send(outbox.next(now));
        assert_eq!(second.events().len(), BATCH_MAX);
        outbox.delivered();
        // The last 50 are not a full batch: they wait for the delay.
        assert_eq!(outbox.next(now), Next::WaitUntil(now + BATCH_DELAY));
        let third = send(outbox.next(now + BATCH_DELAY));
        assert_eq!(third.events().len(), 50);
        outbox.delivered();
        assert_eq!(outbox.stats().delivered, 250);
        assert_eq!(outbox.stats().queued, 0);
    }

    #[test]
    fn one_batch_in_flight_at_a_time() {
        let now = Instant::now();
        let mut outbox = Outbox::new(1000, "p");
        for number in 0..150 {
            outbox.push(event(number), now);
        }
        let first = send(outbox.next(now));
        assert_eq!(outbox.next(now), Next::Sending);
        assert_eq!(outbox.flight_events(), BATCH_MAX);
        assert!(
            !outbox.push(event(150), now),
            "no wake while a batch is out"
        );
        assert_eq!(
            outbox.stats().queued,
            51,
            "the batch in flight is not counted"
        );
        outbox.delivered();
        let second = send(outbox.next(now + BATCH_DELAY));
        assert_ne!(first.delivery(), second.delivery());
        assert_eq!(second.events().len(), 51);
    }

    #[test]
    fn a_retry_keeps_the_delivery_id_and_the_body() {
        let now = Instant::now();
        let mut outbox = Outbox::new(1000, "prefix");
        outbox.push(event(0), now);
        let first = send(outbox.next(now + BATCH_DELAY));
        assert_eq!(first.delivery(), "prefix-0");
        let body = first.body();
        let delay = outbox.failed(now, u64::MAX);
        // Events queued meanwhile do not join the batch being retried.
        outbox.push(event(1), now);
        assert_eq!(outbox.next(now), Next::WaitUntil(now + delay));
        let retry = send(outbox.next(now + delay));
        assert_eq!(retry.delivery(), "prefix-0");
        assert_eq!(retry.body(), body);
        assert_eq!(outbox.stats().failures, 1);
        assert_eq!(outbox.flight_failures(), 1);
        outbox.delivered();
        let next = send(outbox.next(now + BATCH_DELAY));
        assert_eq!(next.delivery(), "prefix-1");
        assert_eq!(rooms(&next), ["room-1"]);
    }

    #[test]
    fn backoff_doubles_from_a_hundred_milliseconds_to_ten_seconds() {
        let caps: Vec<u64> = (0..10)
            .map(|attempt| backoff_cap(attempt).as_millis() as u64)
            .collect();
        assert_eq!(
            caps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(backoff_cap(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_cap() {
        let cap = Duration::from_millis(400);
        assert_eq!(full_jitter(cap, 0), Duration::ZERO);
        assert_eq!(full_jitter(cap, 400), cap);
        assert_eq!(full_jitter(cap, 401), Duration::ZERO);
        for random in [1, 7, 12_345, u64::MAX / 3, u64::MAX - 1, u64::MAX] {
            assert!(full_jitter(cap, random) <= cap, "{random}");
        }
        // Through the outbox: the n-th failure's delay reaches exactly its
        // cap with the largest draw, and never more.
        let now = Instant::now();
        let mut outbox = Outbox::new(10, "p");
        outbox.push(event(0), now);
        send(outbox.next(now + BATCH_DELAY));
        for attempt in 0..12 {
            let cap = backoff_cap(attempt);
            let delay = outbox.failed(now, cap.as_millis() as u64);
            assert_eq!(delay, cap, "attempt {attempt}");
            send(outbox.next(now + delay));
        }
        let delay = outbox.failed(now, u64::MAX);
        assert!(delay <= BACKOFF_MAX);
    }

    #[test]
    fn when_full_the_oldest_are_dropped_and_counted() {
        let now = Instant::now();
        let mut outbox = Outbox::new(10, "p");
        for number in 0..50 {
            outbox.push(event(number), now);
        }
        let stats = outbox.stats();
        assert_eq!((stats.queued, stats.dropped), (10, 40));
        let batch = send(outbox.next(now + BATCH_DELAY));
        let expected: Vec<String> = (40..50).map(|number| format!("room-{number}")).collect();
        assert_eq!(rooms(&batch), expected, "the newest ten, in order");
        // The batch in flight does not count against the capacity.
        for number in 50..60 {
            outbox.push(event(number), now);
        }
        assert_eq!(outbox.stats().dropped, 40);
    }

    #[test]
    fn events_go_out_in_push_order_across_batches_and_retries() {
        let now = Instant::now();
        let mut outbox = Outbox::new(100_000, "p");
        let mut sent = Vec::new();
        let mut number = 0;
        for round in 0..20u64 {
            for _ in 0..37 {
                outbox.push(event(number), now);
                number += 1;
            }
            let batch = send(outbox.next(now + BATCH_DELAY));
            if round % 3 == 0 {
                let delay = outbox.failed(now, round);
                let retry = send(outbox.next(now + delay));
                assert!(Arc::ptr_eq(&batch, &retry));
            }
            outbox.delivered();
            sent.extend(rooms(&batch));
        }
        while let Next::Send(batch) = outbox.next(now + BATCH_DELAY) {
            sent.extend(rooms(&batch));
            outbox.delivered();
        }
        let expected: Vec<String> = (0..number).map(|n| format!("room-{n}")).collect();
        assert_eq!(sent, expected);
    }

    #[test]
    fn flushing_sends_a_partial_batch_at_once() {
        let now = Instant::now();
        let mut outbox = Outbox::new(10, "p");
        outbox.push(event(0), now);
        outbox.flush();
        assert_eq!(send(outbox.next(now)).events().len(), 1);
    }

    #[test]
    fn the_body_is_the_events_in_an_object() {
        let batch = Batch {
            delivery: "d".into(),
            events: vec![event(1), event(2)],
        };
        let body: serde_json::Value = serde_json::from_str(&batch.body()).unwrap();
        assert_eq!(body["events"][0]["room"], "room-1");
        assert_eq!(body["events"][1]["time_ms"], 2);
        assert_eq!(body["events"].as_array().map(Vec::len), Some(2));
    }
}
