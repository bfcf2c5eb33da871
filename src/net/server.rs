//! One event loop: its state and the loop itself.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, info};
use mio::net::TcpListener;
use mio::{Events, Poll, Token};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use super::accept::AcceptPause;
use super::connection::{Connection, SharedInput};
use super::peers::{LoopMail, Shared, StatsGather};
use crate::auth::Verifier;
use crate::backplane::redis::bridge::BridgeLink;
use crate::backplane::redis::commands::Outgoing;
use crate::config::ServerArgs;
use crate::hub::{ApiAnswer, Hub, Millis};
use crate::metrics::Gauges;
use crate::outbound::Staging;
use crate::state;
use crate::timers::Deadlines;
use crate::webhook::Webhooks;

pub(super) const LISTENER: Token = Token(usize::MAX - 1);
pub(super) const SIGNALS: Token = Token(usize::MAX - 2);
/// Mail from the other loops, and the Redis bridge's events (`--redis`).
pub(super) const INBOX: Token = Token(usize::MAX - 3);

/// tungstenite's own buffer per connection. Its 128 KiB default would be
/// allocated (and zeroed) per connection; the socket is read into the loop's
/// shared buffer instead, and tungstenite copies from there in steps of this
/// size. Larger messages still arrive: the codec reserves a frame's full length.
pub(super) const CODEC_BUFFER_SIZE: usize = 256;

/// How often the loop logs a one-line summary.
const SUMMARY_INTERVAL_MS: Millis = 60_000;

/// Demo tokens live a day (§11).
pub(super) const DEMO_TOKEN_TTL_SECS: u64 = 24 * 60 * 60;

/// Why the server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listening socket failed.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The poller or signal handling failed.
    #[error("event loop: {0}")]
    Poll(#[from] io::Error),
    /// The Redis bridge could not start (`--redis`).
    #[error("redis: {0}")]
    Redis(String),
    /// The webhook sender thread could not start (`--webhook-url`).
    #[error("webhook: {0}")]
    Webhook(io::Error),
    /// `--tls-cert` / `--tls-key` cannot be used (exit 2: a configuration error).
    #[error("{0}")]
    Tls(#[from] super::transport::TlsError),
}

/// Reads the wall clock once; everything in one loop iteration shares it.
pub(super) fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// One event loop: its poll, its sockets and the hub of their sessions.
/// Loop 0 also accepts (handing connections round-robin to every loop) and
/// takes the signals.
pub struct EventLoop {
    /// This loop's index among the process's loops.
    pub(super) index: usize,
    pub(super) poll: Poll,
    pub(super) listener: Option<TcpListener>,
    pub(super) signals: Option<Signals>,
    /// What the loops share: the connection count, the room homes, the
    /// other loops' mailboxes, the state file's keeper.
    pub(super) shared: Arc<Shared>,
    /// Mail from the other loops.
    pub(super) inbox: Receiver<Vec<LoopMail>>,
    /// Mail for the other loops, sent at the end of each iteration with one
    /// wake per loop (index: the destination).
    pub(super) outbox: Vec<Vec<LoopMail>>,
    /// The loop the next accepted connection goes to.
    pub(super) next_target: usize,
    /// `/metrics` and `/api/stats` waiting for the other loops' figures.
    pub(super) stats_gathers: std::collections::HashMap<u64, StatsGather>,
    /// `/api/users/{user}` waiting for the other loops' connections, by ticket.
    pub(super) user_gathers: std::collections::HashMap<u64, super::peers::UserGather>,
    /// Plain answers that came later (gathered stats), by the connection's serial.
    pub(super) plain_answers: Vec<(u64, Vec<u8>)>,
    pub(super) connections: Slab<Connection>,
    pub(super) hub: Hub,
    pub(super) verifier: Verifier,
    /// The secret, kept only in demo mode to mint `/demo/token` answers.
    pub(super) demo_secret: Option<String>,
    pub(super) args: ServerArgs,
    pub(super) websocket_config: WebSocketConfig,
    /// Connection deadlines and drain closes; checked against the connection when they fire.
    pub(super) timers: Deadlines<ServerTimer>,
    pub(super) due: Vec<ServerTimer>,
    /// The socket read buffer shared by all connections.
    pub(super) input: SharedInput,
    /// The write-side counterpart: small queued frames are gathered here.
    pub(super) staging: Staging,
    /// Connections to write at the end of the batch: an HTTP answer waits,
    /// or the socket became writable.
    pub(super) http_dirty: Vec<usize>,
    /// Connections to read again at the next iteration, their turn having
    /// ended before their socket ran dry: key, serial, `trust_short_reads`.
    pub(super) read_again: Vec<(usize, u64, bool)>,
    /// The list being worked through, kept for its allocation.
    pub(super) reading_again: Vec<(usize, u64, bool)>,
    pub(super) to_free: Vec<usize>,
    /// When the process exits, once a signal asked it to stop.
    pub(super) shutting_down: Option<Millis>,
    /// Accepting is paused until then after the process ran out of file descriptors.
    pub(super) accept_pause: AcceptPause,
    /// With `--redis`: the helper threads that talk to Redis.
    pub(super) bridge: Option<BridgeLink>,
    /// Bridge events were left for the next iteration.
    pub(super) bridge_backlog: bool,
    /// Reused buffers of what the hub sends to Redis and its API answers.
    pub(super) outgoing: Vec<Outgoing>,
    /// The rooms' mail for other loops, taken from the backplane each
    /// iteration (`--threads`); kept for its capacity.
    pub(super) room_mail: Vec<(usize, crate::backplane::loops::LoopMessage)>,
    pub(super) api_answers: Vec<(u64, ApiAnswer)>,
    /// Connections with an API request waiting for Redis, by serial.
    pub(super) api_waiting: std::collections::HashMap<u64, usize>,
    pub(super) next_serial: u64,
    /// The hub's `room_changes` when this loop last gave the state keeper its rooms.
    pub(super) deposited_changes: Option<u64>,
}

/// What a server timer is for.
#[derive(Debug, Clone, Copy)]
pub(super) enum ServerTimer {
    /// The connection's `deadline` may have passed (handshake, close linger).
    Deadline(usize),
    /// This connection's turn to be closed during the drain.
    DrainClose(usize),
    /// Time to hand the rooms to the `--state-file` writer, if they changed.
    StateSnapshot,
}

impl EventLoop {
    /// Serves until SIGINT or SIGTERM (or loop 0's word that one came), then
    /// closes every client with 1001 and returns.
    pub(super) fn run(mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let mut dirty = Vec::new();
        let mut closes = Vec::new();
        let mut next_summary = now_ms() + SUMMARY_INTERVAL_MS;
        let mut last_summary = self.hub.metrics().clone();
        if self.shared.keeper.is_some() {
            self.timers.schedule(
                now_ms() + state::SNAPSHOT_INTERVAL_MS,
                ServerTimer::StateSnapshot,
            );
        }
        loop {
            let now = now_ms();
            let timeout = self.poll_timeout(now, next_summary);
            if let Err(error) = self.poll.poll(&mut events, Some(timeout)) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error.into());
            }
            let iteration_started = Instant::now();
            let now = now_ms();
            self.continue_reads(&mut closes, now);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    SIGNALS => self.on_signal(now),
                    // The bridge and the other loops share the poll's one waker.
                    INBOX => {
                        self.drain_inbox(now);
                        self.drain_bridge(now);
                    }
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            let peer_may_have_closed = event.is_read_closed() || event.is_error();
                            self.on_readable(key, !peer_may_have_closed, now);
                        }
                        if event.is_writable() {
                            // Written at the end of the batch, after the mail
                            // to other loops: a reply must not overtake what
                            // its request told them (a leave before its close).
                            self.http_dirty.push(key);
                        }
                    }
                }
                self.apply_hub_closes(&mut closes, now);
            }
            if self.accept_pause.is_due(now) {
                self.accept(now);
            }
            if self.bridge_backlog {
                self.drain_bridge(now);
            }
            self.hub.tick(now);
            self.run_deadlines(now);
            self.apply_hub_closes(&mut closes, now);
            self.answer_api(now);
            self.apply_hub_closes(&mut closes, now);
            self.send_to_bridge();
            self.send_to_loops();
            self.flush_dirty(&mut dirty, now);
            self.free_finished(now);
            let iteration = iteration_started.elapsed().as_nanos();
            self.hub
                .metrics_mut()
                .loop_iterations
                .record(u64::try_from(iteration).unwrap_or(u64::MAX));
            if now >= next_summary {
                self.log_summary(&last_summary);
                last_summary = self.hub.metrics().clone();
                next_summary = now + SUMMARY_INTERVAL_MS;
            }
            if let Some(deadline) = self.shutting_down
                && (self.connections.is_empty() || now >= deadline)
            {
                info!(
                    "shut down; {} connection(s) still open were dropped",
                    self.connections.len()
                );
                self.deposit_state();
                self.stop_bridge();
                return Ok(());
            }
        }
    }

    pub(super) fn poll_timeout(&self, now: Millis, next_summary: Millis) -> Duration {
        if self.hub.has_dirty() || !self.http_dirty.is_empty() || !self.read_again.is_empty() {
            // Frames queued while flushing (a `lagged` notice) go out now,
            // and sockets whose turn ended are read on.
            return Duration::ZERO;
        }
        let mut wake = next_summary;
        if let Some(deadline) = self.hub.next_deadline() {
            wake = wake.min(deadline);
        }
        if let Some(deadline) = self.timers.next_due() {
            wake = wake.min(deadline);
        }
        if let Some(until) = self.accept_pause.resume_at() {
            wake = wake.min(until);
        }
        if let Some(deadline) = self.shutting_down {
            wake = wake.min(deadline);
        }
        if self.bridge_backlog {
            wake = now;
        }
        Duration::from_millis(wake.saturating_sub(now))
    }

    /// This loop's figures for `/metrics`: process-wide connections, and the
    /// rooms this loop knows to be occupied (with N loops, those whose
    /// authority it holds; summed over the loops when answering).
    pub(super) fn gauges(&self) -> Gauges {
        let rooms = self
            .hub
            .backplane_occupied_rooms()
            .unwrap_or_else(|| self.hub.occupied_room_count());
        Gauges {
            connections: self.shared.connections.load(Ordering::Relaxed),
            rooms,
            redis_up: self.hub.backplane_reachable(),
            threads: self.shared.peers.len(),
            webhooks: self.shared.webhooks.as_ref().map(Webhooks::stats),
        }
    }

    pub(super) fn log_summary(&self, previous: &crate::metrics::Metrics) {
        let metrics = self.hub.metrics();
        info!(
            "{} connection(s), {} room(s); last minute: {} received, {} sent, {} dropped, {} bytes out",
            self.hub.connection_count(),
            self.hub.occupied_room_count(),
            metrics.messages_received - previous.messages_received,
            metrics.messages_sent - previous.messages_sent,
            metrics.messages_dropped - previous.messages_dropped,
            metrics.bytes_sent - previous.bytes_sent,
        );
    }
}

/// Logs a fatal error the way the binary reports it.
pub fn report(error: &ServerError) {
    error!("{error}");
}
