//! What the main thread and the client threads share: start/stop flags, the
//! measured window, live counters for the progress bar, and token minting.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use hdrhistogram::Histogram;
use roomcast::auth::{TokenClaims, sign};

/// Flags and the schedule, written by the main thread, read by workers.
#[derive(Default)]
pub struct Shared {
    /// Connecting is over; traffic may start (the schedule below is set).
    pub go: AtomicBool,
    /// Leave the event loop and return the statistics.
    pub stop: AtomicBool,
    /// Stop opening new connections (idle: a cap was hit).
    pub stop_connecting: AtomicBool,
    /// slow: read the stalled member again.
    pub resume_stalled: AtomicBool,
    /// Process-clock ns: traffic starts (warm-up begins).
    pub go_ns: AtomicU64,
    /// Process-clock ns: the measured window [start, end).
    pub measure_start: AtomicU64,
    pub measure_end: AtomicU64,
    pub progress: Vec<Progress>,
}

impl Shared {
    pub fn new(threads: usize) -> Shared {
        Shared {
            progress: (0..threads).map(|_| Progress::default()).collect(),
            ..Shared::default()
        }
    }

    pub fn sum(&self, f: impl Fn(&Progress) -> &AtomicU64) -> u64 {
        self.progress
            .iter()
            .map(|p| f(p).load(Ordering::Relaxed))
            .sum()
    }

    /// Kernel thread ids of the client threads (waits up to 1 s for them
    /// to start).
    pub fn tids(&self) -> Vec<i32> {
        for _ in 0..100 {
            if self
                .progress
                .iter()
                .all(|p| p.tid.load(Ordering::Relaxed) != 0)
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.progress
            .iter()
            .map(|p| p.tid.load(Ordering::Relaxed))
            .collect()
    }

    pub fn window(&self) -> (u64, u64) {
        (
            self.measure_start.load(Ordering::Acquire),
            self.measure_end.load(Ordering::Acquire),
        )
    }
}

/// Live counters of one client thread (published once per loop turn).
#[derive(Default)]
pub struct Progress {
    pub tid: AtomicI32,
    /// Connections upgraded and joined.
    pub ready: AtomicU64,
    /// Connections that failed before being ready.
    pub failed: AtomicU64,
    /// Connections currently open (any state).
    pub live: AtomicU64,
    /// Messages sent / delivered (all phases), for progress and drain.
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    /// idle/churn: connects and disconnects completed.
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// The client hit its open-files limit.
    pub emfile: AtomicBool,
}

pub fn set(a: &AtomicU64, v: u64) {
    a.store(v, Ordering::Relaxed);
}

/// Mints an HS256 token for `bench-<n>` the way the server's own `token`
/// subcommand does.
pub fn token(secret: &[u8], user: u64) -> String {
    let sub = format!("bench-{user}");
    sign(
        secret,
        &TokenClaims {
            sub: sub.clone(),
            name: Some(sub),
            expires_at: None,
            rooms: None,
        },
    )
}

/// A latency histogram in microseconds, 1 µs to 10 minutes.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Counts keyed by a short label (error codes, close reasons).
pub type Tally = BTreeMap<String, u64>;

pub fn tally_add(t: &mut Tally, key: impl Into<String>, n: u64) {
    *t.entry(key.into()).or_insert(0) += n;
}

pub fn tally_merge(into: &mut Tally, from: &Tally) {
    for (k, v) in from {
        tally_add(into, k.clone(), *v);
    }
}

/// Whether an I/O error means "out of file descriptors".
pub fn is_emfile(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// A short label for a socket error: the errno name where it matters.
pub fn error_label(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "socket:EMFILE".into(),
        Some(libc::ENFILE) => "socket:ENFILE".into(),
        Some(libc::EADDRNOTAVAIL) => "socket:EADDRNOTAVAIL".into(),
        Some(libc::ECONNREFUSED) => "socket:ECONNREFUSED".into(),
        _ => format!("socket:{:?}", e.kind()),
    }
}

/// Paces connection attempts at `rate` per second.
pub struct Pacer {
    rate: f64,
    start_ns: u64,
    done: u64,
}

impl Pacer {
    pub fn new(rate: f64, start_ns: u64) -> Pacer {
        Pacer {
            rate,
            start_ns,
            done: 0,
        }
    }

    /// How many more may start now (never more than `cap`).
    pub fn due(&self, now: u64, cap: u64) -> u64 {
        if self.rate <= 0.0 {
            return cap;
        }
        let allowed = ((now.saturating_sub(self.start_ns)) as f64 / 1e9 * self.rate) as u64 + 1;
        allowed.saturating_sub(self.done).min(cap)
    }

    pub fn mark(&mut self, n: u64) {
        self.done += n;
    }
}
