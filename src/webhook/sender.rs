//! The sender thread: the I/O shell around [`Outbox`]. It waits on a
//! condition variable for the event loops' pushes or the next deadline the
//! outbox names, and POSTs each batch with a blocking `ureq` agent, so no
//! network call ever runs on an event loop (the shape of the Redis bridge's
//! threads).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use log::{debug, info, warn};
use sha2::Sha256;

use super::queue::{Batch, Next, Outbox};

/// An attempt without an answer in this long has failed (§14.2).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most of an answer's body read (and thrown away) so the connection can
/// be used again; the backend's answer means nothing beyond its status.
const ANSWER_BODY_LIMIT: u64 = 64 * 1024;

/// What the event loops and the sender thread share.
pub(super) struct Core {
    pub(super) state: Mutex<State>,
    /// Signalled when a push makes a batch due sooner, or at finish and stop.
    pub(super) changed: Condvar,
    /// Signalled when the thread has ended (for `finish`).
    pub(super) ended: Condvar,
}

/// The outbox and the thread's orders, under one lock.
pub(super) struct State {
    pub(super) outbox: Outbox,
    /// `finish`: send until then, and stop once nothing is waiting.
    pub(super) finish_by: Option<Instant>,
    /// Every handle is gone: stop now.
    pub(super) stop: bool,
    /// The thread has returned.
    pub(super) done: bool,
}

impl Core {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock; a panic elsewhere
        // must not stop the webhook.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The backend answered with a status other than 2xx.
    #[error("answered {0}")]
    Status(u16),
    /// No answer: a connection error, a TLS error or the timeout.
    #[error("{0}")]
    Request(#[from] ureq::Error),
}

/// The sender thread's own state.
pub(super) struct Sender {
    pub(super) core: Arc<Core>,
    pub(super) agent: ureq::Agent,
    pub(super) url: String,
    pub(super) secret: Vec<u8>,
    /// The batch whose body and signature are made, kept for its retries.
    pub(super) prepared: Option<Prepared>,
    /// Whether the last attempt failed: a failure is logged when delivery
    /// starts failing and a recovery when it works again, not every retry.
    pub(super) failing: bool,
    /// Events dropped when the failure began, to report how many were lost.
    pub(super) dropped_before: u64,
}

/// A batch's body and signature, made once for all its attempts.
pub(super) struct Prepared {
    batch: Arc<Batch>,
    body: String,
    signature: String,
}

/// The agent every attempt uses: statuses are answers, not errors; no
/// redirect is followed (a 3xx is "another status", §14.2); the time limit
/// covers the whole exchange.
pub(super) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(ATTEMPT_TIMEOUT))
        .user_agent(concat!("roomcast/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The `X-Roomcast-Signature` value: `sha256=` and the lowercase hex
/// HMAC-SHA256 of `body` with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    use std::fmt::Write;
    // HMAC takes a key of any length; this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut header = String::with_capacity(7 + digest.len() * 2);
    header.push_str("sha256=");
    for byte in digest {
        let _ = write!(header, "{byte:02x}");
    }
    header
}

impl Sender {
    /// Runs until stopped, or until `finish`'s deadline or an empty outbox
    /// after `finish`, then says so to whoever waits in `finish`.
    pub(super) fn run(self) {
        // Said on the way out whether the thread returns or panics, so
        // `finish` never waits for a thread that is gone.
        struct Done(Arc<Core>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.lock().done = true;
                self.0.ended.notify_all();
            }
        }
        let _done = Done(Arc::clone(&self.core));
        self.send_until_done();
    }

    fn send_until_done(mut self) {
        while let Some((batch, finish_by)) = self.next_batch() {
            let now = Instant::now();
            let timeout = match finish_by {
                Some(deadline) => ATTEMPT_TIMEOUT
                    .min(deadline.saturating_duration_since(now))
                    .max(Duration::from_millis(1)),
                None => ATTEMPT_TIMEOUT,
            };
            let outcome = self.attempt(&batch, timeout);
            self.report(&batch, outcome);
        }
    }

    /// Waits for the next batch to send; `None` when the thread must end.
    fn next_batch(&self) -> Option<(Arc<Batch>, Option<Instant>)> {
        let mut state = self.core.lock();
        loop {
            if state.stop {
                return None;
            }
            let now = Instant::now();
            let finish_by = state.finish_by;
            if let Some(deadline) = finish_by
                && now >= deadline
            {
                let left = state.outbox.stats().queued + state.outbox.flight_events();
                if left > 0 {
                    warn!(
                        "webhook: stopping at the shutdown deadline with {left} event(s) undelivered"
                    );
                }
                return None;
            }
            let until = match state.outbox.next(now) {
                Next::Send(batch) => return Some((batch, finish_by)),
                Next::WaitUntil(at) => Some(finish_by.map_or(at, |deadline| at.min(deadline))),
                Next::Idle if finish_by.is_some() => return None,
                Next::Idle => finish_by,
                // Only this thread sends and it reports every attempt before
                // asking again; should that change, look again shortly.
                Next::Sending => Some(now + super::queue::BATCH_DELAY),
            };
            state = match until {
                Some(until) => {
                    let wait = until.saturating_duration_since(now);
                    self.core
                        .changed
                        .wait_timeout(state, wait)
                        .map(|(state, _)| state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0)
                }
                None => self
                    .core
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// One POST of `batch`; Ok on a 2xx answer.
    fn attempt(&mut self, batch: &Arc<Batch>, timeout: Duration) -> Result<(), AttemptError> {
        let prepared = match self.prepared.take() {
            Some(prepared) if Arc::ptr_eq(&prepared.batch, batch) => prepared,
            _ => {
                let body = batch.body();
                let signature = signature(&self.secret, body.as_bytes());
                Prepared {
                    batch: Arc::clone(batch),
                    body,
                    signature,
                }
            }
        };
        let sent = self
            .agent
            .post(&self.url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json")
            .header("X-Roomcast-Signature", &prepared.signature)
            .header("X-Roomcast-Delivery", batch.delivery())
            .send(prepared.body.as_bytes());
        self.prepared = Some(prepared);
        let mut response = sent?;
        // Read the answer's body so the connection can serve the next
        // batch; whatever it says, only the status counts.
        let _ = std::io::copy(
            &mut std::io::Read::take(response.body_mut().as_reader(), ANSWER_BODY_LIMIT),
            &mut std::io::sink(),
        );
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(AttemptError::Status(status.as_u16()))
        }
    }

    /// Tells the outbox how the attempt went, and logs a change of state.
    fn report(&mut self, batch: &Batch, outcome: Result<(), AttemptError>) {
        let mut state = self.core.lock();
        let delivery = batch.delivery();
        match outcome {
            Ok(()) => {
                let failures = state.outbox.flight_failures();
                state.outbox.delivered();
                self.prepared = None;
                if self.failing {
                    self.failing = false;
                    let dropped = state.outbox.stats().dropped - self.dropped_before;
                    info!(
                        "webhook: delivery {delivery} delivered after {failures} failed attempt(s); \
                         the backend answers again ({dropped} event(s) dropped meanwhile)"
                    );
                }
            }
            Err(error) => {
                // Without OS randomness a fixed draw still stays within the cap.
                let random = getrandom::u64().unwrap_or(u64::MAX);
                let delay = state.outbox.failed(Instant::now(), random);
                if self.failing {
                    debug!(
                        "webhook: delivery {delivery} failed again ({error}); retrying in {delay:?}"
                    );
                } else {
                    self.failing = true;
                    self.dropped_before = state.outbox.stats().dropped;
                    warn!(
                        "webhook: delivery {delivery} failed ({error}); retrying with backoff \
                         until the backend answers 2xx"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_lowercase_hex_hmac_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
