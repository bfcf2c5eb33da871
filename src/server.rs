//! The I/O shell: the only module that touches sockets, the clock and signals.
//!
//! One `mio::Poll` drives everything. Sockets are registered once,
//! edge-triggered, for both readiness kinds; reads go until `WouldBlock` or a
//! short read (the receive queue was empty: new data raises a new edge), or
//! until the connection's turn is used up (it is read on next iteration); a
//! connection with queued bytes is written once at the end of each event
//! batch, as much as the socket takes. The decisions are made elsewhere:
//! [`handshake`] answers request heads, tungstenite parses
//! frames, the [`Hub`] decides what every connection is sent.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Message, Utf8Bytes};

use crate::accept_pause::{ACCEPT_PAUSE_MS, AcceptPause};
use crate::assets;
use crate::auth::{self, TokenClaims, Verifier};
use crate::bridge::Bridge;
use crate::cluster::{self, Outgoing};
use crate::config::ServerArgs;
use crate::handshake::{self, Decision, Endpoint, HttpRoute, Policy, RejectReason};
use crate::hub::{ApiAnswer, ApiKind, CloseRequest, ConnId, Hub, HubConfig, Millis};
use crate::metrics::Gauges;
use crate::outbound::{Marks, OutboundQueue, Staging};
use crate::state;
use crate::timers::Deadlines;

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// The Redis bridge threads' waker (`--redis`).
const BRIDGE: Token = Token(usize::MAX - 3);

/// Most bridge events handled in one loop iteration; the rest wait for the next.
const MAX_BRIDGE_EVENTS: usize = 8192;

/// How long a shutdown waits for the bridge to take the node out of presence.
const BRIDGE_STOP_WAIT: Duration = Duration::from_millis(400);

/// tungstenite's own buffer per connection. Its 128 KiB default would be
/// allocated (and zeroed) per connection; the socket is read into the loop's
/// shared buffer instead, and tungstenite copies from there in steps of this
/// size. Larger messages still arrive: the codec reserves a frame's full length.
const CODEC_BUFFER_SIZE: usize = 256;

/// The loop's one socket read buffer, shared by every connection in turn.
const SHARED_INPUT_SIZE: usize = 64 * 1024;

/// Full socket reads one connection gets per loop iteration (256 KiB). A
/// client that sends faster than the loop parses never lets its socket run
/// dry, and reading it until it did kept the loop on it alone (a flood on
/// loopback with `--rate-limit 0` held one turn for 72 MB); the rest waits
/// for the next iteration, after everyone else's events.
const READS_PER_TURN: u32 = 4;

/// How long a closing connection may take to flush its close frame and hang up.
const CLOSE_LINGER_MS: Millis = 1000;

/// How often the loop logs a one-line summary.
const SUMMARY_INTERVAL_MS: Millis = 60_000;

/// The most a shutdown waits for clients to take their close frames.
const SHUTDOWN_FLUSH_MS: Millis = 1500;

/// Linux `EMFILE` and `ENFILE`: the process or the system is out of file descriptors.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

fn is_out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(EMFILE | ENFILE))
}

/// Demo tokens live a day (§11).
const DEMO_TOKEN_TTL_SECS: u64 = 24 * 60 * 60;

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

/// Where a connection is in its life.
enum Phase {
    /// Reading a request head; `response` holds an answer being written.
    Http {
        head: Vec<u8>,
        response: OutboundQueue,
    },
    /// Speaking WebSocket; the outbound queue lives in the hub.
    WebSocket {
        context: Box<WebSocketContext>,
        echo: bool,
    },
    /// Everything was written and our side shut: read and discard until the
    /// peer hangs up, so unread bytes do not turn our close into a reset.
    Lingering,
}

struct Connection {
    socket: TcpStream,
    phase: Phase,
    /// Shut the write side once the queue is empty.
    close_when_flushed: bool,
    /// When the connection is given up on, if a deadline is set.
    deadline: Option<Millis>,
    /// Already scheduled to be freed at the end of the event batch.
    freeing: bool,
    peer: SocketAddr,
    /// Unique for the server's life: a server API answer finds its connection by it.
    serial: u64,
    /// An API request waits for Redis (`Some(keep_alive)`); later requests wait behind it.
    awaiting_api: Option<bool>,
    /// Its read turn was used up and it waits in `Server::read_again`.
    read_again_queued: bool,
}

/// Bytes read from one socket and not yet taken by its codec. One buffer
/// serves every connection in turn: a connection's read loop runs until the
/// socket would block, which happens only once this buffer is empty.
struct SharedInput {
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last `read` came back short: the socket's receive queue was
    /// empty then, and anything arriving later raises a new readiness edge,
    /// so asking again would only cost a syscall that says `WouldBlock`.
    socket_drained: bool,
    /// Whether a short read may be trusted that way. Not when the event also
    /// said the peer hung up: no later edge would report the end of stream.
    trust_short_reads: bool,
    /// Socket reads left in this connection's turn.
    reads_left: u32,
    /// The turn ended with bytes possibly still in the socket: no readiness
    /// edge will come for them, so the loop must come back by itself.
    turn_used_up: bool,
}

impl SharedInput {
    fn new() -> Self {
        SharedInput {
            buffer: vec![0; SHARED_INPUT_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            socket_drained: false,
            trust_short_reads: false,
            reads_left: READS_PER_TURN,
            turn_used_up: false,
        }
    }

    /// Starts on another connection's socket; forgets what a previous one
    /// left (it was closing).
    fn reset(&mut self, trust_short_reads: bool) {
        self.start = 0;
        self.end = 0;
        self.socket_drained = false;
        self.trust_short_reads = trust_short_reads;
        self.reads_left = READS_PER_TURN;
        self.turn_used_up = false;
    }

    /// Refills the buffer with one `read` from `socket`, within the turn's
    /// allowance. `WouldBlock` once the allowance is spent (`turn_used_up`
    /// says so) or a trusted short read said the socket is empty.
    fn refill(&mut self, socket: &mut TcpStream) -> io::Result<usize> {
        if self.socket_drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.reads_left == 0 {
            self.turn_used_up = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.reads_left -= 1;
        self.start = 0;
        self.end = 0;
        let read = socket.read(&mut self.buffer)?;
        self.end = read;
        // The same rule as nginx's `ready = 0` and tokio's readiness
        // clearing after a short read: one syscall fewer per message.
        self.socket_drained = self.trust_short_reads && read > 0 && read < self.buffer.len();
        Ok(read)
    }
}

/// Reads from the socket, writes into the connection's outbound queue: tungstenite
/// parses frames from the first and its automatic replies land in the second, in
/// order with everything else, so only the loop ever writes to the socket.
struct QueueStream<'a> {
    socket: &'a mut TcpStream,
    input: &'a mut SharedInput,
    queue: &'a mut OutboundQueue,
}

impl Read for QueueStream<'_> {
    /// One `read` syscall fills the shared buffer; the codec's small reads
    /// are then copies from it.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let input = &mut *self.input;
        if input.start >= input.end {
            input.refill(self.socket)?;
        }
        let available = input.buffer.get(input.start..input.end).unwrap_or_default();
        let count = available.len().min(buf.len());
        if let (Some(target), Some(source)) = (buf.get_mut(..count), available.get(..count)) {
            target.copy_from_slice(source);
        }
        input.start += count;
        Ok(count)
    }
}

impl Write for QueueStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.queue.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The kernel caps this at `net.core.somaxconn` (4096 on current Linux).
const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listener with a deep accept backlog: std and mio listen with
/// 128, which overflows (and makes clients wait for SYN retransmits) when a
/// thousand clients reconnect at once after a restart.
fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Reads the wall clock once; everything in one loop iteration shares it.
fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A bound, not yet running server.
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    signals: Signals,
    connections: Slab<Connection>,
    hub: Hub,
    verifier: Verifier,
    /// The secret, kept only in demo mode to mint `/demo/token` answers.
    demo_secret: Option<String>,
    args: ServerArgs,
    local_address: SocketAddr,
    websocket_config: WebSocketConfig,
    /// Connection deadlines and drain closes; checked against the connection when they fire.
    timers: Deadlines<ServerTimer>,
    due: Vec<ServerTimer>,
    /// The socket read buffer shared by all connections.
    input: SharedInput,
    /// The write-side counterpart: small queued frames are gathered here.
    staging: Staging,
    /// Connections whose HTTP answer waits to be written.
    http_dirty: Vec<usize>,
    /// Connections to read again at the next iteration, their turn having
    /// ended before their socket ran dry: key, serial, `trust_short_reads`.
    read_again: Vec<(usize, u64, bool)>,
    /// The list being worked through, kept for its allocation.
    reading_again: Vec<(usize, u64, bool)>,
    to_free: Vec<usize>,
    /// When the process exits, once a signal asked it to stop.
    shutting_down: Option<Millis>,
    /// Accepting is paused until then after the process ran out of file descriptors.
    accept_pause: AcceptPause,
    /// With `--redis`: the helper threads that talk to Redis.
    bridge: Option<Bridge>,
    /// Bridge events were left for the next iteration.
    bridge_backlog: bool,
    /// Reused buffers of what the hub sends to Redis and its API answers.
    outgoing: Vec<Outgoing>,
    api_answers: Vec<(u64, ApiAnswer)>,
    /// Connections with an API request waiting for Redis, by serial.
    api_waiting: std::collections::HashMap<u64, usize>,
    next_serial: u64,
    /// With `--state-file` (and no `--redis`): the periodic writes of the rooms.
    snapshots: Option<state::Snapshots>,
}

/// What a server timer is for.
#[derive(Debug, Clone, Copy)]
enum ServerTimer {
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
        let mut hub = Hub::new(HubConfig {
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
        });
        let bridge = match &args.redis {
            Some(url) => {
                if args.state_file.is_some() {
                    warn!("--state-file is ignored with --redis: Redis holds the rooms");
                }
                let waker = mio::Waker::new(poll.registry(), BRIDGE)?;
                let process = cluster::random_id();
                let bridge = Bridge::start(url, args.history, process.clone(), waker)
                    .map_err(|error| ServerError::Redis(error.to_string()))?;
                hub.enable_cluster(process, now_ms());
                Some(bridge)
            }
            None => None,
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

    fn poll_timeout(&self, now: Millis, next_summary: Millis) -> Duration {
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

    fn accept(&mut self, now: Millis) {
        if self.accept_pause.is_paused(now) {
            return;
        }
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((mut socket, peer)) => {
                    self.accepting_works(now);
                    let _ = socket.set_nodelay(true);
                    let entry = self.connections.vacant_entry();
                    let key = entry.key();
                    if let Err(error) = self.poll.registry().register(
                        &mut socket,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!("cannot register connection from {peer}: {error}");
                        continue;
                    }
                    let deadline = now.saturating_add(self.args.handshake_timeout_ms);
                    self.next_serial += 1;
                    entry.insert(Connection {
                        serial: self.next_serial,
                        awaiting_api: None,
                        read_again_queued: false,
                        socket,
                        phase: Phase::Http {
                            head: Vec::new(),
                            response: OutboundQueue::new(),
                        },
                        close_when_flushed: false,
                        deadline: Some(deadline),
                        freeing: false,
                        peer,
                    });
                    self.timers.schedule(deadline, ServerTimer::Deadline(key));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.accepting_works(now);
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if is_out_of_descriptors(&error) => {
                    // The pending connections stay in the backlog; retrying now would
                    // spin. Pause, and let the poll timeout bring us back.
                    if self.accept_pause.refused(now) {
                        warn!(
                            "accept failed: {error}; retrying every {ACCEPT_PAUSE_MS} ms until descriptors free up ({} connections open)",
                            self.connections.len()
                        );
                    }
                    return;
                }
                Err(error) => {
                    // ECONNABORTED and friends concern one peer; the listener lives on.
                    debug!("accept failed: {error}");
                    continue;
                }
            }
        }
    }

    /// Logs the end of an accept outage, once.
    fn accepting_works(&mut self, now: Millis) {
        if let Some(outage) = self.accept_pause.worked() {
            info!(
                "accepting again after {} ms out of file descriptors; {} attempt(s) refused meanwhile",
                now.saturating_sub(outage.since),
                outage.refused
            );
        }
    }

    /// `trust_short_reads`: see [`SharedInput::trust_short_reads`].
    fn on_readable(&mut self, key: usize, trust_short_reads: bool, now: Millis) {
        let Some(connection) = self.connections.get(key) else {
            return;
        };
        if connection.freeing {
            return;
        }
        match connection.phase {
            Phase::Http { .. } => self.read_http(key, now),
            Phase::WebSocket { .. } => self.read_websocket(key, trust_short_reads, now),
            Phase::Lingering => self.read_discard(key),
        }
    }

    /// Reads request bytes, and answers every complete request in them: a
    /// plain HTTP connection may carry several (keep-alive), an upgrade ends it.
    fn read_http(&mut self, key: usize, now: Millis) {
        // Answering consumes requests from the buffer; a read that stopped at
        // the cap must go on, since no new readiness edge will say so.
        while self.read_http_once(key, now) {}
    }

    /// Reads up to the buffer cap, answers the complete requests, and says
    /// whether reading stopped at the cap with room made since.
    fn read_http_once(&mut self, key: usize, now: Millis) -> bool {
        let buffer_cap = handshake::MAX_HEAD_BYTES + self.args.max_message_bytes();
        let Some(connection) = self.connections.get_mut(key) else {
            return false;
        };
        let Phase::Http { head, .. } = &mut connection.phase else {
            return false;
        };
        if connection.close_when_flushed {
            // An answer is on its way out; later bytes are not read.
            return false;
        }
        let mut chunk = [0u8; 4096];
        let mut peer_closed = false;
        let mut at_cap = false;
        loop {
            // Read at most a little past the cap: enough to know a request is too large.
            if head.len() > buffer_cap {
                at_cap = true;
                break;
            }
            match connection.socket.read(&mut chunk) {
                Ok(0) => {
                    peer_closed = true;
                    break;
                }
                Ok(read) => head.extend_from_slice(chunk.get(..read).unwrap_or_default()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    debug!(
                        "connection {key} ({}): read failed: {error}",
                        connection.peer
                    );
                    peer_closed = true;
                    break;
                }
            }
        }
        while self.answer_next_request(key, now) {}
        let waiting = self
            .connections
            .get(key)
            .and_then(|connection| match &connection.phase {
                Phase::Http { head, .. } if !connection.close_when_flushed => Some(head.len()),
                _ => None,
            });
        match waiting {
            Some(_) if peer_closed => {
                self.schedule_free(key);
                false
            }
            Some(buffered) => at_cap && buffered <= buffer_cap,
            None => false,
        }
    }

    /// Decides on the request at the front of the connection's buffer and acts
    /// on it. True when it answered one and the connection waits for another.
    fn answer_next_request(&mut self, key: usize, now: Millis) -> bool {
        let Some(connection) = self.connections.get_mut(key) else {
            return false;
        };
        let Phase::Http { head, .. } = &mut connection.phase else {
            return false;
        };
        if head.is_empty() || connection.close_when_flushed || connection.awaiting_api.is_some() {
            return false;
        }
        let policy = Policy {
            verifier: &self.verifier,
            allowed_origins: &self.args.allowed_origin,
            max_connections: self.args.max_connections,
            open_connections: self.hub.connection_count(),
            echo_enabled: self.args.echo,
            demo_mode: self.demo_secret.is_some(),
            now_secs: now / 1000,
            api_key: self.args.api_key.as_deref(),
            max_body_bytes: self.args.max_message_bytes(),
        };
        let decision = handshake::decide(head, &policy);
        match decision {
            None => false,
            Some(Decision::Reject { reason, response }) => {
                self.hub.metrics_mut().reject(reason);
                debug!(
                    "connection {key} ({}): request refused: {} ({})",
                    connection.peer,
                    reason.status(),
                    reason.label()
                );
                self.answer_http(key, Bytes::from(response), false, 0, now);
                false
            }
            Some(Decision::Serve {
                route,
                head_len,
                body_len,
                keep_alive,
            }) => {
                let request_len = head_len.saturating_add(body_len);
                if head.len() < request_len {
                    return false;
                }
                let body = head.get(head_len..request_len).unwrap_or_default().to_vec();
                let serial = connection.serial;
                match self.serve(route, &body, keep_alive, now, serial) {
                    Some((response, keep_alive)) => {
                        self.answer_http(key, Bytes::from(response), keep_alive, request_len, now);
                        keep_alive
                    }
                    None => {
                        // The answer needs Redis: later requests wait behind this one.
                        if let Some(connection) = self.connections.get_mut(key)
                            && let Phase::Http { head, .. } = &mut connection.phase
                        {
                            head.drain(..request_len.min(head.len()));
                            connection.awaiting_api = Some(keep_alive);
                            connection.deadline = None;
                            self.api_waiting.insert(serial, key);
                        }
                        false
                    }
                }
            }
            Some(Decision::Upgrade {
                response,
                identity,
                endpoint,
                head_len,
            }) => {
                let leftover = head.get(head_len..).unwrap_or_default().to_vec();
                let context = WebSocketContext::from_partially_read(
                    leftover,
                    Role::Server,
                    Some(self.websocket_config),
                );
                debug!(
                    "connection {key} ({}): upgraded for user {}",
                    connection.peer, identity.user_id
                );
                connection.deadline = None;
                let echo = endpoint == Endpoint::Echo;
                let pending = match std::mem::replace(
                    &mut connection.phase,
                    Phase::WebSocket {
                        context: Box::new(context),
                        echo,
                    },
                ) {
                    Phase::Http { response, .. } => response,
                    _ => OutboundQueue::new(),
                };
                let mut upgrade = Bytes::from(response);
                if !pending.is_empty() {
                    // Answers to earlier requests on this connection go out first.
                    let mut joined = pending.to_vec();
                    joined.extend_from_slice(&upgrade);
                    upgrade = Bytes::from(joined);
                }
                match endpoint {
                    Endpoint::Echo => {
                        self.hub.connect_echo(key, now);
                        if let Some(queue) = self.hub.outbound_mut(key) {
                            queue.push(upgrade);
                        }
                        self.hub.mark_dirty(key);
                    }
                    Endpoint::Rooms { join } => {
                        self.hub
                            .connect_after(key, upgrade, identity, join.as_deref(), now);
                    }
                }
                // Frames that came with the head are already buffered: parse them now,
                // no further readiness edge will announce them.
                self.read_websocket(key, false, now);
                false
            }
        }
    }

    /// The answer to a plain HTTP request, and whether the connection stays
    /// open after it (a refused body closes it, like every refusal). `None`:
    /// with `--redis`, an API answer that comes later (`answer_api`).
    fn serve(
        &mut self,
        route: HttpRoute,
        body: &[u8],
        keep_alive: bool,
        now: Millis,
        serial: u64,
    ) -> Option<(Vec<u8>, bool)> {
        const JSON: &str = "application/json";
        let respond = |status: u16, content_type: &str, body: &[u8]| {
            handshake::response_with(status, content_type, body, &[], keep_alive)
        };
        let mut keep = keep_alive;
        let response = match route {
            // With --redis, a node that cannot reach Redis is not healthy (§10).
            HttpRoute::Health if self.hub.cluster_up() == Some(false) => {
                respond(503, JSON, br#"{"status":"unavailable"}"#)
            }
            HttpRoute::Health => respond(200, JSON, br#"{"status":"ok"}"#),
            // The assets change with the binary: browsers revalidate instead of
            // running a previous version's client against a new server.
            HttpRoute::Page => handshake::response_with(
                200,
                "text/html; charset=utf-8",
                assets::INDEX_HTML,
                &[("Cache-Control", "no-cache")],
                keep_alive,
            ),
            HttpRoute::ClientScript => handshake::response_with(
                200,
                "text/javascript; charset=utf-8",
                assets::CLIENT_JS,
                &[("Cache-Control", "no-cache")],
                keep_alive,
            ),
            HttpRoute::Metrics => {
                let text = self.hub.metrics().prometheus(self.gauges());
                respond(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text.as_bytes(),
                )
            }
            HttpRoute::Stats => {
                let json = self.hub.metrics().stats_json(self.gauges());
                respond(200, JSON, json.as_bytes())
            }
            HttpRoute::Publish | HttpRoute::Disconnect if self.hub.is_cluster() => {
                let kind = if route == HttpRoute::Publish {
                    ApiKind::Publish
                } else {
                    ApiKind::Disconnect
                };
                let answer = self.hub.cluster_api(kind, body, now, serial)?;
                let (response, keep_alive) = self.api_response(answer, keep_alive);
                keep = keep_alive;
                response
            }
            HttpRoute::Publish | HttpRoute::Disconnect => {
                let answer = if route == HttpRoute::Publish {
                    self.hub.api_publish(body, now)
                } else {
                    self.hub.api_disconnect(body, now)
                };
                match answer {
                    Ok(json) => respond(200, JSON, json.as_bytes()),
                    Err(message) => {
                        self.hub.metrics_mut().reject(RejectReason::BadRequest);
                        let json = serde_json::json!({ "error": message }).to_string();
                        keep = false;
                        handshake::response_with(400, JSON, json.as_bytes(), &[], false)
                    }
                }
            }
            HttpRoute::TokenCheck(check) => {
                let (status, json) = check.answer();
                if status != 200 {
                    self.hub.metrics_mut().reject(RejectReason::Unauthorized);
                }
                handshake::response_with(
                    status,
                    JSON,
                    json.as_bytes(),
                    &[("Cache-Control", "no-store")],
                    keep_alive,
                )
            }
            HttpRoute::DemoToken { name } => {
                let Some(secret) = &self.demo_secret else {
                    return Some((
                        handshake::response(
                            404,
                            "text/plain; charset=utf-8",
                            b"404 Not Found\n",
                            &[],
                        ),
                        false,
                    ));
                };
                let user_id = format!("guest-{:04x}", getrandom::u32().unwrap_or(0) & 0xffff);
                let name = name
                    .map(|name| name.trim().chars().take(64).collect::<String>())
                    .filter(|name| !name.is_empty())
                    .unwrap_or_else(|| user_id.clone());
                let token = auth::sign(
                    secret.as_bytes(),
                    &TokenClaims {
                        sub: user_id.clone(),
                        name: Some(name.clone()),
                        expires_at: Some(now / 1000 + DEMO_TOKEN_TTL_SECS),
                        rooms: None,
                    },
                );
                let body = serde_json::json!({
                    "token": token,
                    "user": {"id": user_id, "name": name},
                });
                respond(200, JSON, body.to_string().as_bytes())
            }
        };
        Some((response, keep))
    }

    /// The HTTP answer to a server API request with `--redis`, and whether
    /// the connection stays open (a bad body closes it, like every refusal).
    fn api_response(&mut self, answer: ApiAnswer, keep_alive: bool) -> (Vec<u8>, bool) {
        const JSON: &str = "application/json";
        match answer {
            ApiAnswer::Ok(json) => (
                handshake::response_with(200, JSON, json.as_bytes(), &[], keep_alive),
                keep_alive,
            ),
            ApiAnswer::BadRequest(message) => {
                self.hub.metrics_mut().reject(RejectReason::BadRequest);
                let json = serde_json::json!({ "error": message }).to_string();
                (
                    handshake::response_with(400, JSON, json.as_bytes(), &[], false),
                    false,
                )
            }
            ApiAnswer::Unavailable => (
                handshake::response_with(503, JSON, br#"{"error":"unavailable"}"#, &[], keep_alive),
                keep_alive,
            ),
        }
    }

    /// Sends the API answers that came back from Redis, and goes on with
    /// requests that were waiting behind them on the same connection.
    fn answer_api(&mut self, now: Millis) {
        let mut answers = std::mem::take(&mut self.api_answers);
        self.hub.take_api_answers(&mut answers);
        for (serial, answer) in answers.drain(..) {
            let Some(key) = self.api_waiting.remove(&serial) else {
                continue;
            };
            let Some(keep_alive) = self
                .connections
                .get_mut(key)
                .filter(|c| c.serial == serial && !c.freeing)
                .and_then(|c| c.awaiting_api.take())
            else {
                continue;
            };
            let (response, keep_alive) = self.api_response(answer, keep_alive);
            self.answer_http(key, Bytes::from(response), keep_alive, 0, now);
            if keep_alive {
                while self.answer_next_request(key, now) {}
            }
        }
        self.api_answers = answers;
    }

    /// Handles what the bridge threads reported.
    fn drain_bridge(&mut self, now: Millis) {
        let Some(bridge) = &self.bridge else {
            return;
        };
        bridge.notifier.rearm();
        self.bridge_backlog = false;
        for _ in 0..MAX_BRIDGE_EVENTS {
            let Some(bridge) = &self.bridge else {
                return;
            };
            match bridge.events.try_recv() {
                Ok(event) => self.hub.cluster_event(event, now),
                Err(_) => return,
            }
        }
        self.bridge_backlog = true;
    }

    /// Hands what the hub decided to send to Redis to the bridge threads.
    fn send_to_bridge(&mut self) {
        let Some(bridge) = &self.bridge else {
            return;
        };
        self.hub.take_cluster_out(&mut self.outgoing);
        for outgoing in self.outgoing.drain(..) {
            match outgoing {
                Outgoing::Command(command) => bridge.command(command),
                Outgoing::Subscription(change) => bridge.subscription(change),
            }
        }
    }

    /// At exit: take the node out of presence (bounded wait), stop the threads.
    fn stop_bridge(&mut self) {
        if self.bridge.is_none() {
            return;
        }
        self.hub.cluster_shutdown();
        self.send_to_bridge();
        let Some(bridge) = &self.bridge else {
            return;
        };
        let until = Instant::now() + BRIDGE_STOP_WAIT;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match bridge.events.recv_timeout(left) {
                Ok(cluster::Event::Stopped) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        bridge.stop();
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            connections: self.hub.connection_count(),
            rooms: self.hub.occupied_room_count(),
            redis_up: self.hub.cluster_up(),
        }
    }

    /// Queues an HTTP answer. With `keep_alive`, the answered request's
    /// `consumed` bytes leave the buffer and the connection waits for the next
    /// one, for at most the handshake timeout; otherwise it closes once written.
    fn answer_http(
        &mut self,
        key: usize,
        response: Bytes,
        keep_alive: bool,
        consumed: usize,
        now: Millis,
    ) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        if let Phase::Http {
            response: queue,
            head,
        } = &mut connection.phase
        {
            queue.push(response);
            self.http_dirty.push(key);
            if keep_alive {
                head.drain(..consumed.min(head.len()));
                let deadline = now.saturating_add(self.args.handshake_timeout_ms);
                connection.deadline = Some(deadline);
                self.timers.schedule(deadline, ServerTimer::Deadline(key));
            } else {
                connection.close_when_flushed = true;
            }
        }
    }

    /// Reads frames until the socket would block, handing each message on.
    fn read_websocket(&mut self, key: usize, trust_short_reads: bool, now: Millis) {
        self.input.reset(trust_short_reads);
        loop {
            let Some(connection) = self.connections.get_mut(key) else {
                return;
            };
            if connection.freeing || connection.close_when_flushed {
                return;
            }
            let Phase::WebSocket { context, echo } = &mut connection.phase else {
                return;
            };
            let echo = *echo;
            let Some(queue) = self.hub.outbound_mut(key) else {
                return;
            };
            let mut stream = QueueStream {
                socket: &mut connection.socket,
                input: &mut self.input,
                queue,
            };
            let result = context.read(&mut stream);
            let queued_reply = !stream.queue.is_empty();
            let alive = result.is_ok();
            match result {
                Ok(Message::Text(text)) if echo => {
                    let _ = context.write(&mut stream, Message::Text(text));
                    self.hub.mark_dirty(key);
                }
                Ok(Message::Binary(data)) if echo => {
                    let _ = context.write(&mut stream, Message::Binary(data));
                    self.hub.mark_dirty(key);
                }
                Ok(Message::Text(text)) => {
                    self.hub.receive_text(key, text.as_str(), now);
                }
                Ok(Message::Binary(_)) => {
                    self.fail(
                        key,
                        CloseCode::Unsupported,
                        "binary frames are not accepted",
                        now,
                    );
                    return;
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                    if queued_reply {
                        self.hub.mark_dirty(key);
                    }
                }
                Ok(Message::Close(frame)) => {
                    debug!(
                        "connection {key}: closed by peer ({})",
                        frame
                            .as_ref()
                            .map_or_else(|| "no code".to_string(), |f| f.to_string())
                    );
                    self.hub.disconnect(key, now);
                    self.hub.mark_dirty(key);
                    // The next read flushes tungstenite's reply and reports the end.
                }
                Err(tungstenite::Error::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                    if queued_reply {
                        self.hub.mark_dirty(key);
                    }
                    if self.input.turn_used_up {
                        self.read_later(key, trust_short_reads);
                    }
                    return;
                }
                Err(tungstenite::Error::Io(error))
                    if error.kind() == io::ErrorKind::Interrupted => {}
                Err(tungstenite::Error::ConnectionClosed) => {
                    connection.close_when_flushed = true;
                    connection.deadline = Some(now + CLOSE_LINGER_MS);
                    self.timers
                        .schedule(now + CLOSE_LINGER_MS, ServerTimer::Deadline(key));
                    self.hub.disconnect(key, now);
                    self.hub.mark_dirty(key);
                    if self.hub.outbound_mut(key).is_none_or(|q| q.is_empty()) {
                        self.finish_flushed(key);
                    }
                    return;
                }
                Err(tungstenite::Error::Capacity(_)) => {
                    self.fail(key, CloseCode::Size, "message too big", now);
                    return;
                }
                Err(tungstenite::Error::Utf8(_)) => {
                    self.fail(key, CloseCode::Invalid, "invalid UTF-8", now);
                    return;
                }
                Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                )) => {
                    debug!("connection {key}: peer went away without a close");
                    self.hub.disconnect(key, now);
                    self.schedule_free(key);
                    return;
                }
                Err(tungstenite::Error::Protocol(violation)) => {
                    debug!("connection {key}: protocol violation: {violation}");
                    self.fail(key, CloseCode::Protocol, "protocol error", now);
                    return;
                }
                Err(error) => {
                    debug!("connection {key}: read failed: {error}");
                    self.hub.disconnect(key, now);
                    self.schedule_free(key);
                    return;
                }
            }
            if alive {
                self.hub.saw_activity(key, now);
            }
        }
    }

    /// Closes a WebSocket connection for something its client did: leave the
    /// rooms now, queue the close frame, hang up once it is written.
    fn fail(&mut self, key: usize, code: CloseCode, reason: &'static str, now: Millis) {
        debug!(
            "connection {key}: closing with {}: {reason}",
            u16::from(code)
        );
        self.hub.disconnect(key, now);
        self.close_websocket(key, code, reason.into(), now);
    }

    /// Queues a close frame through tungstenite (so its state machine knows)
    /// and arranges for the socket to be shut once the frame is out.
    fn close_websocket(&mut self, key: usize, code: CloseCode, reason: Utf8Bytes, now: Millis) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        if let Phase::WebSocket { context, .. } = &mut connection.phase
            && let Some(queue) = self.hub.outbound_mut(key)
        {
            let mut stream = QueueStream {
                socket: &mut connection.socket,
                input: &mut self.input,
                queue,
            };
            let _ = context.close(&mut stream, Some(CloseFrame { code, reason }));
        }
        connection.close_when_flushed = true;
        let deadline = now + CLOSE_LINGER_MS;
        connection.deadline = Some(deadline);
        self.timers.schedule(deadline, ServerTimer::Deadline(key));
        self.hub.mark_dirty(key);
    }

    fn apply_hub_closes(&mut self, closes: &mut Vec<CloseRequest>, now: Millis) {
        self.hub.take_closes(closes);
        for close in closes.drain(..) {
            debug!(
                "connection {}: closing with {}: {}",
                close.conn, close.code, close.reason
            );
            self.close_websocket(
                close.conn,
                CloseCode::from(close.code),
                close.reason.into(),
                now,
            );
        }
    }

    /// Writes every connection that has queued bytes, once each.
    fn flush_dirty(&mut self, dirty: &mut Vec<ConnId>, now: Millis) {
        self.hub.take_dirty(dirty);
        dirty.append(&mut self.http_dirty);
        for key in dirty.drain(..) {
            self.flush_connection(key, now);
        }
    }

    /// Drains the connection's queue into its socket as far as the socket takes.
    fn flush_connection(&mut self, key: usize, now: Millis) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        if connection.freeing {
            return;
        }
        let queue = match &mut connection.phase {
            Phase::Http { response, .. } => Some(response),
            Phase::WebSocket { .. } => self.hub.outbound_mut(key),
            Phase::Lingering => None,
        };
        let Some(queue) = queue else {
            return;
        };
        if queue.is_empty() && !connection.close_when_flushed {
            return;
        }
        match queue.write_to(&mut connection.socket, &mut self.staging) {
            Ok(written) => {
                self.hub.metrics_mut().bytes_sent += written as u64;
                if written > 0 {
                    self.hub.drained(key);
                }
            }
            Err(error) => {
                debug!(
                    "connection {key} ({}): write failed: {error}",
                    connection.peer
                );
                self.hub.disconnect(key, now);
                self.schedule_free(key);
                return;
            }
        }
        let flushed = match &connection.phase {
            Phase::Http { response, .. } => response.is_empty(),
            _ => self.hub.outbound_mut(key).is_none_or(|q| q.is_empty()),
        };
        if flushed && connection.close_when_flushed {
            self.finish_flushed(key);
        }
    }

    /// Everything is written on a closing connection: shut our side and wait
    /// briefly for the peer to hang up.
    fn finish_flushed(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        let _ = connection.socket.shutdown(Shutdown::Write);
        connection.phase = Phase::Lingering;
        if connection.deadline.is_none() {
            let deadline = now_ms() + CLOSE_LINGER_MS;
            connection.deadline = Some(deadline);
            self.timers.schedule(deadline, ServerTimer::Deadline(key));
        }
        // The hub's part ended with the close; its queue is no longer needed.
        self.hub.release(key, now_ms());
        self.read_discard(key);
    }

    fn read_discard(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        self.input.reset(false);
        loop {
            match self.input.refill(&mut connection.socket) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if self.input.turn_used_up {
                        self.read_later(key, false);
                    }
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.schedule_free(key);
    }

    /// Puts a connection whose read turn was used up on the list read at
    /// the start of the next iteration (once, however often its turn ends).
    fn read_later(&mut self, key: usize, trust_short_reads: bool) {
        if let Some(connection) = self.connections.get_mut(key)
            && !connection.read_again_queued
        {
            connection.read_again_queued = true;
            self.read_again
                .push((key, connection.serial, trust_short_reads));
        }
    }

    /// Gives the connections whose turn ended last iteration their next
    /// turn, ahead of this iteration's events (their sockets raise none).
    fn continue_reads(&mut self, closes: &mut Vec<CloseRequest>, now: Millis) {
        if self.read_again.is_empty() {
            return;
        }
        // The two lists trade places, so neither allocates again.
        let mut reading = std::mem::replace(
            &mut self.read_again,
            std::mem::take(&mut self.reading_again),
        );
        for &(key, serial, trust_short_reads) in &reading {
            // A freed key may have gone to a new connection since.
            match self.connections.get_mut(key) {
                Some(connection) if connection.serial == serial => {
                    connection.read_again_queued = false;
                }
                _ => continue,
            }
            self.on_readable(key, trust_short_reads, now);
            self.apply_hub_closes(closes, now);
        }
        reading.clear();
        self.reading_again = reading;
    }

    fn run_deadlines(&mut self, now: Millis) {
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

    fn deadline_passed(&mut self, key: usize, now: Millis) {
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

    fn schedule_free(&mut self, key: usize) {
        if let Some(connection) = self.connections.get_mut(key)
            && !connection.freeing
        {
            connection.freeing = true;
            self.to_free.push(key);
        }
    }

    /// Frees connections at the end of the batch, so that no key is reused
    /// while events for its previous owner may still be pending in the batch.
    fn free_finished(&mut self, now: Millis) {
        for key in self.to_free.drain(..) {
            if let Some(mut connection) = self.connections.try_remove(key) {
                let _ = self.poll.registry().deregister(&mut connection.socket);
                self.hub.release(key, now);
                debug!("connection {key} ({}): freed", connection.peer);
            }
        }
    }

    /// SIGINT/SIGTERM: stop accepting, then close every client with 1001,
    /// one after another in random order spread evenly over `--drain-ms`, so
    /// that they do not all reconnect at once (§8, §11).
    fn on_signal(&mut self, now: Millis) {
        let mut stop = false;
        for signal in self.signals.pending() {
            stop |= signal == SIGINT || signal == SIGTERM;
        }
        if !stop || self.shutting_down.is_some() {
            return;
        }
        info!(
            "signal received: draining {} connection(s) over {} ms",
            self.hub.connection_count(),
            self.args.drain_ms
        );
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let drain_ms = self.args.drain_ms;
        self.shutting_down = Some(now + drain_ms + SHUTDOWN_FLUSH_MS);
        let mut websockets = Vec::new();
        let keys: Vec<usize> = self.connections.iter().map(|(key, _)| key).collect();
        for key in keys {
            let Some(connection) = self.connections.get(key) else {
                continue;
            };
            match connection.phase {
                Phase::WebSocket { .. } if !connection.close_when_flushed => websockets.push(key),
                Phase::Http { .. } if !connection.close_when_flushed => self.schedule_free(key),
                _ => {}
            }
        }
        shuffle(&mut websockets);
        let count = websockets.len() as u64;
        for (index, key) in websockets.into_iter().enumerate() {
            let at = now + (index as u64).saturating_mul(drain_ms) / count.max(1);
            if at <= now {
                self.drain_close(key, now);
            } else {
                self.timers.schedule(at, ServerTimer::DrainClose(key));
            }
        }
    }

    fn drain_close(&mut self, key: usize, now: Millis) {
        let open = self.connections.get(key).is_some_and(|connection| {
            matches!(connection.phase, Phase::WebSocket { .. })
                && !connection.close_when_flushed
                && !connection.freeing
        });
        if !open {
            return;
        }
        let retry_ms = random_below(self.args.drain_ms.saturating_add(1));
        let reason = format!("server shutting down; retry_ms={retry_ms}");
        self.hub.disconnect(key, now);
        self.close_websocket(key, CloseCode::Away, reason.into(), now);
    }

    /// Hands the rooms to the `--state-file` writer thread if they changed
    /// since the last snapshot, so a crash loses at most one interval of
    /// history; the loop only collects them, the thread writes.
    fn snapshot_state(&mut self, now: Millis) {
        let Some(snapshots) = &mut self.snapshots else {
            return;
        };
        let hub = &self.hub;
        snapshots.offer(hub.room_changes(), || hub.export_rooms());
        self.timers.schedule(
            now + state::SNAPSHOT_INTERVAL_MS,
            ServerTimer::StateSnapshot,
        );
    }

    /// Writes `--state-file`, if given, after the drain, marked clean: the
    /// next start keeps the rooms' epochs.
    fn save_state(&mut self) {
        let Some(path) = &self.args.state_file else {
            return;
        };
        if self.bridge.is_some() {
            return;
        }
        // A periodic write still running must land first, or its older,
        // unclean snapshot would replace this one.
        if let Some(snapshots) = self.snapshots.take() {
            snapshots.finish();
        }
        let rooms = self.hub.export_rooms();
        match state::save(path, &rooms, state::Mark::CleanShutdown) {
            Ok(()) => info!("saved {} room(s) to {}", rooms.len(), path.display()),
            Err(error) => error!("cannot save state to {}: {error}", path.display()),
        }
    }

    fn log_summary(&self, previous: &crate::metrics::Metrics) {
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

/// Fisher–Yates with OS randomness: the drain order must not favour early connections.
fn shuffle(items: &mut [usize]) {
    for index in (1..items.len()).rev() {
        let other = random_below(index as u64 + 1) as usize;
        items.swap(index, other);
    }
}

/// Loads `--state-file` into the hub (a bad file is set aside and the server
/// starts fresh), marks the file unclean for as long as the run lasts, and
/// starts the periodic writes. Never fails the start.
fn restore_state(hub: &mut Hub, path: &std::path::Path) -> Option<state::Snapshots> {
    let now = now_ms();
    let new_epoch = || crate::hub::random_epoch().into_string();
    let (loaded, marked) = state::open_for_run(path, now / 1000, new_epoch);
    match loaded {
        state::Loaded::Fresh => info!("no state file at {}; starting fresh", path.display()),
        state::Loaded::Rooms { rooms, clean } => {
            info!("loaded {} room(s) from {}", rooms.len(), path.display());
            if !clean {
                warn!(
                    "state file {} was not saved by a clean shutdown: {} rooms start new epochs",
                    path.display(),
                    rooms.len()
                );
            }
            hub.import_rooms(rooms, now);
        }
        state::Loaded::SetAside { error, moved_to } => match moved_to {
            Some(aside) => warn!(
                "{error}; moved it to {} and starting fresh",
                aside.display()
            ),
            None => warn!("{error}; could not move it aside, starting fresh"),
        },
    }
    if let Err(error) = marked {
        error!(
            "cannot mark state file {} as in use: {error}; a crash would go unnoticed at the next start",
            path.display()
        );
    }
    match state::Snapshots::start(path.to_path_buf(), hub.room_changes()) {
        Ok(snapshots) => Some(snapshots),
        Err(error) => {
            error!(
                "cannot start the state snapshot thread: {error}; the rooms are saved only on shutdown"
            );
            None
        }
    }
}

fn random_below(bound: u64) -> u64 {
    if bound == 0 {
        return 0;
    }
    getrandom::u64().unwrap_or(0) % bound
}

/// Logs a fatal error the way the binary reports it.
pub fn report(error: &ServerError) {
    error!("{error}");
}
