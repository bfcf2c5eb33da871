//! Webhooks (PROTOCOL §14.2): what happens in rooms, POSTed to the
//! application's backend in signed batches, at least once and in order.
//!
//! The event loops call [`Webhooks::push`], which takes a short lock and
//! never touches the network; one sender thread per process batches,
//! signs, sends and retries. The rules live in the sans-IO [`queue`]; the
//! thread in `sender` only does the waiting and the HTTP.

mod event;
pub mod queue;
mod sender;

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use log::{error, warn};

pub use event::Event;
pub use sender::{ATTEMPT_TIMEOUT, AttemptError, signature};

use queue::Outbox;
use sender::{Core, Sender, State};

/// How to reach the backend.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where batches are POSTed (`http://` or `https://`).
    pub url: String,
    /// The HMAC-SHA256 key of `X-Roomcast-Signature`.
    pub secret: Vec<u8>,
    /// Most events waiting (`--webhook-queue`); the oldest are dropped beyond.
    pub queue_capacity: usize,
}

/// The figures behind the webhook metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookStats {
    /// Events in batches the backend answered with a 2xx.
    pub delivered: u64,
    /// Events dropped from a full queue.
    pub dropped: u64,
    /// Events waiting (the batch in flight not counted).
    pub queued: usize,
    /// Failed attempts (a status other than 2xx, a timeout, a connection error).
    pub failures: u64,
}

/// The process's webhook: a handle to the queue and its sender thread.
/// Cheap to clone, and shared by every event loop; the thread stops when
/// the last handle is dropped, or at [`Webhooks::finish`].
#[derive(Clone)]
pub struct Webhooks {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Webhooks")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What the clones of [`Webhooks`] share.
struct Handle {
    core: Arc<Core>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The thread holds the core, not the handle: tell it nobody is left.
        self.core.lock().stop = true;
        self.core.changed.notify_all();
    }
}

impl Webhooks {
    /// Starts the sender thread for `config`.
    pub fn start(config: WebhookConfig) -> std::io::Result<Webhooks> {
        let outbox = Outbox::new(config.queue_capacity, delivery_prefix());
        let core = Arc::new(Core {
            state: Mutex::new(State {
                outbox,
                finish_by: None,
                stop: false,
                done: false,
            }),
            changed: Condvar::new(),
            ended: Condvar::new(),
        });
        let sender = Sender {
            core: Arc::clone(&core),
            agent: sender::agent(),
            url: config.url,
            secret: config.secret,
            prepared: None,
            failing: false,
            dropped_before: 0,
        };
        let thread = std::thread::Builder::new()
            .name("roomcast-webhook".into())
            .spawn(move || sender.run())?;
        Ok(Webhooks {
            handle: Arc::new(Handle {
                core,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Queues `event` (dropping the oldest waiting one when the queue is
    /// full) and wakes the sender when that makes a batch due sooner. Never
    /// waits on the network: the lock is held for a queue push.
    pub fn push(&self, event: Event) {
        let core = &self.handle.core;
        let wake = core.lock().outbox.push(event, Instant::now());
        if wake {
            core.changed.notify_one();
        }
    }

    /// Delivered, dropped, waiting and failed figures, for `/metrics`.
    pub fn stats(&self) -> WebhookStats {
        self.handle.core.lock().outbox.stats()
    }

    /// Shutdown: keeps sending what is queued, without waiting to fill
    /// batches, until the queue is empty or `deadline` has come, then stops
    /// the thread and returns, by the deadline. An attempt still out then
    /// (it cannot be cancelled from here) is left to end on its own
    /// timeout, and nothing is sent after it. Events pushed after `finish`
    /// are not sent.
    pub fn finish(&self, deadline: Instant) {
        let core = &self.handle.core;
        let mut state = core.lock();
        state.finish_by = Some(state.finish_by.map_or(deadline, |by| by.min(deadline)));
        state.outbox.flush();
        core.changed.notify_all();
        while !state.done {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = core
                .ended
                .wait_timeout(state, deadline - now)
                .map(|(state, _)| state)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        let done = state.done;
        if !done {
            state.stop = true;
            let left = state.outbox.stats().queued + state.outbox.flight_events();
            warn!(
                "webhook: an attempt is still out at the shutdown deadline; \
                 {left} event(s) (that batch's included) may not have been delivered"
            );
        }
        drop(state);
        if !done {
            return;
        }
        let thread = self
            .handle
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            error!("webhook: the sender thread panicked");
        }
    }
}

/// A prefix that makes this process's delivery ids its own: random, so ids
/// do not repeat after a restart or on another node.
fn delivery_prefix() -> String {
    let random = getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the time and process id still differ per start.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        nanos ^ u64::from(std::process::id()).rotate_left(32)
    });
    format!("{random:016x}")
}
