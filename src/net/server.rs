//! Starting the server and the event loop itself.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use super::accept::{AcceptPause, listen};
use super::connection::{Connection, SharedInput};
use super::persistence::restore_state;
use crate::auth::{self, TokenClaims, Verifier};
use crate::backplane::redis::RedisBackplane;
use crate::backplane::redis::bridge::Bridge;
use crate::backplane::redis::commands::{self, Outgoing};
use crate::config::ServerArgs;
use crate::hub::{ApiAnswer, Hub, HubConfig, Millis};
use crate::metrics::Gauges;
use crate::outbound::{Marks, Staging};
use crate::state;
use crate::timers::Deadlines;

pub(super) const LISTENER: Token = Token(usize::MAX - 1);
pub(super) const SIGNALS: Token = Token(usize::MAX - 2);
/// The Redis bridge threads' waker (`--redis`).
pub(super) const BRIDGE: Token = Token(usize::MAX - 3);

/// tungstenite's own buffer per connection. Its 128 KiB default would be
/// allocated (and zeroed) per connection; the socket is read into the loop's
/// shared buffer instead, and tungstenite copies from there in steps of this
/// size. Larger messages still arrive: the codec reserves a frame's full length.
const CODEC_BUFFER_SIZE: usize = 256;

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
}

/// Reads the wall clock once; everything in one loop iteration shares it.
pub(super) fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A bound, not yet running server.
pub struct Server {
    pub(super) poll: Poll,
    pub(super) listener: Option<TcpListener>,
    pub(super) signals: Signals,
    pub(super) connections: Slab<Connection>,
    pub(super) hub: Hub,
    pub(super) verifier: Verifier,
    /// The secret, kept only in demo mode to mint `/demo/token` answers.
    pub(super) demo_secret: Option<String>,
    pub(super) args: ServerArgs,
    pub(super) local_address: SocketAddr,
    pub(super) websocket_config: WebSocketConfig,
    /// Connection deadlines and drain closes; checked against the connection when they fire.
    pub(super) timers: Deadlines<ServerTimer>,
    pub(super) due: Vec<ServerTimer>,
    /// The socket read buffer shared by all connections.
    pub(super) input: SharedInput,
    /// The write-side counterpart: small queued frames are gathered here.
    pub(super) staging: Staging,
    /// Connections whose HTTP answer waits to be written.
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
    pub(super) bridge: Option<Bridge>,
    /// Bridge events were left for the next iteration.
    pub(super) bridge_backlog: bool,
    /// Reused buffers of what the hub sends to Redis and its API answers.
    pub(super) outgoing: Vec<Outgoing>,
    pub(super) api_answers: Vec<(u64, ApiAnswer)>,
    /// Connections with an API request waiting for Redis, by serial.
    pub(super) api_waiting: std::collections::HashMap<u64, usize>,
    pub(super) next_serial: u64,
    /// With `--state-file` (and no `--redis`): the periodic writes of the rooms.
    pub(super) snapshots: Option<state::Snapshots>,
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

impl Server {
    /// Binds the listener and prepares the loop; `run` starts serving.
    pub fn bind(args: ServerArgs) -> Result<Self, ServerError> {
        let (secret, demo_secret) = match &args.jwt_secret {
            Some(secret) => (secret.clone(), None),
            None => {
                let secret = auth::random_secret();
                (secret.clone(), Some(secret))
            }
        };
        let verifier = Verifier::new(secret.as_bytes());
        let poll = Poll::new()?;
        let mut listener = listen(args.listen).map_err(|source| ServerError::Bind {
            address: args.listen,
            source,
        })?;
        let local_address = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let max_message = args.max_message_bytes();
        let websocket_config = WebSocketConfig::default()
            .read_buffer_size(CODEC_BUFFER_SIZE)
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let config = HubConfig {
            history: args.history,
            max_rooms_per_connection: args.max_rooms_per_connection,
            typing_timeout_ms: args.typing_timeout_ms,
            heartbeat_ms: args.heartbeat_ms,
            pong_timeout_ms: args.pong_timeout_ms,
            rate_limit: args.rate_limit,
            rate_burst: args.rate_burst,
            marks: Marks {
                soft: args.write_buffer_soft,
                hard: args.write_buffer_hard,
            },
            verifier: verifier.clone(),
        };
        // The one place that picks the backplane: everything above it is the same.
        let (mut hub, bridge) = match &args.redis {
            Some(url) => {
                if args.state_file.is_some() {
                    warn!("--state-file is ignored with --redis: Redis holds the rooms");
                }
                let waker = mio::Waker::new(poll.registry(), BRIDGE)?;
                let process = commands::random_id();
                let bridge = Bridge::start(url, args.history, process.clone(), Box::new(waker))
                    .map_err(|error| ServerError::Redis(error.to_string()))?;
                let backplane = RedisBackplane::new(process, now_ms());
                (
                    Hub::with_backplane(config, Box::new(backplane)),
                    Some(bridge),
                )
            }
            None => (Hub::new(config), None),
        };
        let snapshots = match (&args.state_file, &bridge) {
            (Some(path), None) => restore_state(&mut hub, path),
            _ => None,
        };
        Ok(Server {
            poll,
            listener: Some(listener),
            signals,
            connections: Slab::new(),
            hub,
            verifier,
            demo_secret,
            args,
            local_address,
            websocket_config,
            input: SharedInput::new(),
            staging: Staging::new(),
            timers: Deadlines::new(),
            due: Vec::new(),
            accept_pause: AcceptPause::default(),
            http_dirty: Vec::new(),
            read_again: Vec::new(),
            reading_again: Vec::new(),
            to_free: Vec::new(),
            shutting_down: None,
            bridge,
            bridge_backlog: false,
            outgoing: Vec::new(),
            api_answers: Vec::new(),
            api_waiting: std::collections::HashMap::new(),
            next_serial: 0,
            snapshots,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_address
    }

    /// In demo mode, a ready token for a guest, for the start-up banner.
    pub fn demo_token(&self, name: &str) -> Option<String> {
        let secret = self.demo_secret.as_ref()?;
        Some(auth::sign(
            secret.as_bytes(),
            &TokenClaims {
                sub: name.to_string(),
                name: Some(name.to_string()),
                expires_at: Some(now_ms() / 1000 + DEMO_TOKEN_TTL_SECS),
                rooms: None,
            },
        ))
    }

    /// Serves until SIGINT or SIGTERM, then closes every client with 1001 and returns.
    pub fn run(mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let mut dirty = Vec::new();
        let mut closes = Vec::new();
        let mut next_summary = now_ms() + SUMMARY_INTERVAL_MS;
        let mut last_summary = self.hub.metrics().clone();
        if self.snapshots.is_some() {
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
                    BRIDGE => self.drain_bridge(now),
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            let peer_may_have_closed = event.is_read_closed() || event.is_error();
                            self.on_readable(key, !peer_may_have_closed, now);
                        }
                        if event.is_writable() {
                            self.flush_connection(key, now);
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
                self.save_state();
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

    pub(super) fn gauges(&self) -> Gauges {
        Gauges {
            connections: self.hub.connection_count(),
            rooms: self.hub.occupied_room_count(),
            redis_up: self.hub.backplane_reachable(),
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
