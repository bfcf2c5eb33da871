//! The process: one listener, N event loops on N threads (`--threads`,
//! PROTOCOL §12), and what they share.
//!
//! Loop 0 accepts and hands every connection, round-robin, to a loop, which
//! serves it for its whole life; loop 0 also takes the signals and tells the
//! others to drain. One loop (`--threads 1`) runs exactly as the server
//! always has: the local backplane, no mail. Several loops share rooms
//! through the loops backplane; with `--redis`, each loop is a node of the
//! cluster of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{error, warn};
use mio::{Interest, Poll};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use super::accept::{AcceptPause, listen};
use super::connection::SharedInput;
use super::peers::{LoopMail, Peer, Shared};
use super::persistence::{Keeper, load_state};
use super::server::{
    CODEC_BUFFER_SIZE, DEMO_TOKEN_TTL_SECS, EventLoop, INBOX, LISTENER, SIGNALS, ServerError,
    now_ms,
};
use super::transport::load_tls;
use crate::auth::{self, TokenClaims, Verifier};
use crate::backplane::Backplane;
use crate::backplane::events::RoomEvents;
use crate::backplane::local::LocalBackplane;
use crate::backplane::loops::{LoopsBackplane, RoomHomes};
use crate::backplane::redis::RedisBackplane;
use crate::backplane::redis::bridge::{Bridge, BridgeLink, Wake};
use crate::backplane::redis::commands;
use crate::config::ServerArgs;
use crate::hub::{Hub, HubConfig};
use crate::outbound::{Marks, Staging};
use crate::state::RoomSnapshot;
use crate::timers::Deadlines;
use crate::webhook::{WebhookConfig, Webhooks};

/// What queued webhook events get beyond the drain window to go out (§14.2).
const WEBHOOK_GRACE: Duration = Duration::from_secs(1);

/// A bound, not yet running server.
pub struct Server {
    seeds: Vec<Seed>,
    /// With `--redis`: the process's one bridge (command and subscriber threads).
    bridge: Option<Bridge>,
    shared: Arc<Shared>,
    args: ServerArgs,
    verifier: Verifier,
    local_address: SocketAddr,
    demo_secret: Option<String>,
}

/// What a loop starts from: made on the main thread, the loop itself is
/// built on its own thread (its sessions are not `Send`, and need not be).
struct Seed {
    index: usize,
    poll: Poll,
    inbox: Receiver<Vec<LoopMail>>,
    listener: Option<mio::net::TcpListener>,
    signals: Option<Signals>,
    /// `--state-file` rooms whose authority this loop takes.
    rooms: Vec<RoomSnapshot>,
    /// With `--redis`: this loop's process id (a node of the cluster) and
    /// its link to the process's one bridge.
    redis: Option<(String, BridgeLink)>,
}

impl Server {
    /// Binds the listener and prepares every loop; `run` starts serving.
    pub fn bind(args: ServerArgs) -> Result<Self, ServerError> {
        let (secret, demo_secret) = match &args.jwt_secret {
            Some(secret) => (secret.clone(), None),
            None => {
                let secret = auth::random_secret();
                (secret.clone(), Some(secret))
            }
        };
        let verifier = Verifier::new(secret.as_bytes());
        let count = args.loops().max(1);
        let mut mailboxes = Vec::with_capacity(count);
        let mut peers = Vec::with_capacity(count);
        for _ in 0..count {
            let poll = Poll::new()?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), INBOX)?);
            let (sender, inbox) = mpsc::channel();
            peers.push(Peer {
                sender,
                waker,
                woken: Arc::new(AtomicBool::new(false)),
            });
            mailboxes.push((poll, inbox));
        }
        let local_rooms = args.redis.is_none();
        let keeper = match (&args.state_file, local_rooms) {
            (Some(path), true) => Some(Mutex::new(Keeper::start(path, count))),
            (Some(_), false) => {
                warn!("--state-file is ignored with --redis: Redis holds the rooms");
                None
            }
            _ => None,
        };
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(Mutex::new(load_tls(cert, key)?)),
            _ => None,
        };
        let webhooks = match (&args.webhook_url, args.webhook_signing_key()) {
            (Some(url), Some(secret)) => Some(
                Webhooks::start(WebhookConfig {
                    url: url.clone(),
                    secret: secret.as_bytes().to_vec(),
                    queue_capacity: args.webhook_queue,
                })
                .map_err(ServerError::Webhook)?,
            ),
            // `validate` refused a URL without a key before we got here.
            _ => None,
        };
        let shared = Arc::new(Shared {
            connections: AtomicUsize::new(0),
            homes: Arc::new(RoomHomes::default()),
            peers,
            keeper,
            per_user: Mutex::new(std::collections::HashMap::new()),
            tls,
            namespaces: Arc::new(args.namespaces()),
            webhooks,
            drain_started: AtomicU64::new(0),
        });
        let listener = listen(args.listen).map_err(|source| ServerError::Bind {
            address: args.listen,
            source,
        })?;
        let local_address = listener.local_addr()?;
        let mut rooms = match (&args.state_file, &shared.keeper) {
            (Some(path), Some(_)) => spread(load_state(path), count),
            _ => vec![Vec::new(); count],
        };
        let (bridge, mut links) = match &args.redis {
            Some(url) => {
                // One waker per poll (mio's rule): the bridge shares each loop's inbox waker.
                let processes: Vec<String> = (0..count).map(|_| commands::random_id()).collect();
                let wakers = shared
                    .peers
                    .iter()
                    .map(|peer| Box::new(Arc::clone(&peer.waker)) as Box<dyn Wake>)
                    .collect();
                let (bridge, links) = Bridge::start(
                    url,
                    Arc::clone(&shared.namespaces),
                    RoomEvents::new(shared.webhooks.clone()),
                    processes.clone(),
                    wakers,
                )
                .map_err(|error| ServerError::Redis(error.to_string()))?;
                let links = processes.into_iter().zip(links).map(Some).collect();
                (Some(bridge), links)
            }
            None => (None, Vec::new()),
        };
        let mut listener = Some(listener);
        let mut seeds = Vec::with_capacity(count);
        for (index, (poll, inbox)) in mailboxes.into_iter().enumerate() {
            // Loop 0 accepts and takes the signals.
            let (listener, signals) = match listener.take() {
                Some(mut listener) => {
                    let registry = poll.registry();
                    registry.register(&mut listener, LISTENER, Interest::READABLE)?;
                    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
                    registry.register(&mut signals, SIGNALS, Interest::READABLE)?;
                    (Some(listener), Some(signals))
                }
                None => (None, None),
            };
            seeds.push(Seed {
                index,
                poll,
                inbox,
                listener,
                signals,
                rooms: rooms.get_mut(index).map(std::mem::take).unwrap_or_default(),
                redis: links.get_mut(index).and_then(Option::take),
            });
        }
        Ok(Server {
            seeds,
            bridge,
            shared,
            args,
            verifier,
            local_address,
            demo_secret,
        })
    }

    /// Whether the port speaks TLS (`--tls-cert`/`--tls-key`).
    pub fn uses_tls(&self) -> bool {
        self.shared.tls.is_some()
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

    /// Serves until SIGINT or SIGTERM, then drains every loop's clients over
    /// one window, saves `--state-file` and returns.
    pub fn run(self) -> Result<(), ServerError> {
        let mut threads = Vec::with_capacity(self.seeds.len());
        for seed in self.seeds {
            let name = format!("roomcast-loop-{}", seed.index);
            let shared = Arc::clone(&self.shared);
            let args = self.args.clone();
            let verifier = self.verifier.clone();
            let demo_secret = self.demo_secret.clone();
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let peers = Arc::clone(&shared);
                    let start = LoopStart {
                        shared,
                        args: &args,
                        verifier: &verifier,
                        demo_secret,
                    };
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        EventLoop::start(seed, start)?.run()
                    }));
                    match served {
                        Ok(outcome) => outcome,
                        Err(_) => {
                            // A loop that died takes the process down cleanly
                            // (the others drain, the exit code says so, a
                            // supervisor restarts it) rather than leaving its
                            // share of connections dead while the rest serve.
                            drain_everyone(&peers);
                            Err(ServerError::Poll(std::io::Error::other(
                                "an event loop panicked",
                            )))
                        }
                    }
                })
                .map_err(ServerError::Poll)?;
            threads.push(thread);
        }
        let mut outcome = Ok(());
        for thread in threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(failure)) => {
                    error!("{failure}");
                    outcome = Err(failure);
                }
                Err(_) => {
                    error!("an event loop panicked");
                    outcome = Err(ServerError::Poll(std::io::Error::other(
                        "an event loop panicked",
                    )));
                }
            }
        }
        if let Some(bridge) = &self.bridge {
            bridge.stop();
        }
        let webhooks = self.shared.webhooks.clone();
        let webhook_deadline = webhook_deadline(&self.shared, self.args.drain_ms);
        if let Some(keeper) = Arc::try_unwrap(self.shared)
            .ok()
            .and_then(|shared| shared.keeper)
        {
            keeper
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .save_clean();
        }
        if let Some(webhooks) = webhooks {
            webhooks.finish(webhook_deadline);
        }
        outcome
    }
}

/// Until when queued webhook events may still go out at exit: the drain
/// window plus [`WEBHOOK_GRACE`], from the drain's start (§14.2); from now
/// when the loops ended without a drain.
fn webhook_deadline(shared: &Shared, drain_ms: u64) -> Instant {
    let now = Instant::now();
    let started = shared.drain_started.load(Ordering::Acquire);
    if started == 0 {
        return now + WEBHOOK_GRACE;
    }
    let end_ms = started.saturating_add(drain_ms);
    now + Duration::from_millis(end_ms.saturating_sub(now_ms())) + WEBHOOK_GRACE
}

/// Tells every loop to drain now (a loop died).
fn drain_everyone(shared: &Shared) {
    let started = now_ms();
    for peer in &shared.peers {
        if peer.sender.send(vec![LoopMail::Drain { started }]).is_ok() {
            let _ = mio::Waker::wake(&peer.waker);
        }
    }
}

/// Spreads saved rooms over the loops, round-robin: each loop holds the
/// authority of its share.
fn spread(rooms: Vec<RoomSnapshot>, count: usize) -> Vec<Vec<RoomSnapshot>> {
    let mut shares: Vec<Vec<RoomSnapshot>> = vec![Vec::new(); count];
    for (position, room) in rooms.into_iter().enumerate() {
        if let Some(share) = shares.get_mut(position % count) {
            share.push(room);
        }
    }
    shares
}

/// What every loop is built with.
struct LoopStart<'a> {
    shared: Arc<Shared>,
    args: &'a ServerArgs,
    verifier: &'a Verifier,
    demo_secret: Option<String>,
}

impl EventLoop {
    /// Builds loop `seed.index` on its own thread: its hub over the
    /// backplane the configuration picks (the one place that picks it), and
    /// the saved rooms it holds.
    fn start(seed: Seed, start: LoopStart<'_>) -> Result<Self, ServerError> {
        let LoopStart {
            shared,
            args,
            verifier,
            demo_secret,
        } = start;
        let Seed {
            index,
            poll,
            inbox,
            listener,
            signals,
            rooms,
            redis,
        } = seed;
        let count = shared.peers.len();
        let namespaces = &shared.namespaces;
        let max_message = args.max_message_bytes();
        let websocket_config = WebSocketConfig::default()
            .read_buffer_size(CODEC_BUFFER_SIZE)
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let config = HubConfig {
            namespaces: Arc::clone(namespaces),
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
            webhooks: shared.webhooks.clone(),
        };
        let (backplane, bridge): (Box<dyn Backplane>, Option<BridgeLink>) = match redis {
            Some((process, link)) => (Box::new(RedisBackplane::new(process, now_ms())), Some(link)),
            None if count > 1 => {
                let homes = Arc::clone(&shared.homes);
                (
                    Box::new(LoopsBackplane::new(
                        index,
                        count,
                        Arc::clone(namespaces),
                        homes,
                        RoomEvents::new(config.webhooks.clone()),
                    )),
                    None,
                )
            }
            None => (
                Box::new(LocalBackplane::new(
                    Arc::clone(namespaces),
                    RoomEvents::new(config.webhooks.clone()),
                )),
                None,
            ),
        };
        let mut event_loop = EventLoop {
            index,
            poll,
            listener,
            signals,
            shared,
            inbox,
            outbox: (0..count).map(|_| Vec::new()).collect(),
            next_target: 0,
            stats_gathers: std::collections::HashMap::new(),
            user_gathers: std::collections::HashMap::new(),
            plain_answers: Vec::new(),
            connections: Slab::new(),
            hub: Hub::with_backplane(config, backplane),
            verifier: verifier.clone(),
            demo_secret,
            args: args.clone(),
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
            room_mail: Vec::new(),
            api_answers: Vec::new(),
            api_waiting: std::collections::HashMap::new(),
            next_serial: 0,
            deposited_changes: None,
        };
        event_loop
            .hub
            .number_connections(index as u64, count as u64);
        event_loop.restore(rooms);
        Ok(event_loop)
    }

    /// Takes the saved rooms of this loop's share; the keeper holds them
    /// from the start, so a snapshot written before this loop changes
    /// anything still has them.
    fn restore(&mut self, rooms: Vec<RoomSnapshot>) {
        if self.shared.keeper.is_none() {
            return;
        }
        let now = now_ms();
        if self.loop_count() == 1 {
            self.hub.import_rooms(rooms, now);
        } else if let Some(loops) = self.hub.backplane_mut::<LoopsBackplane>() {
            for room in rooms {
                loops.restore(room, now);
            }
        }
        self.deposit_state();
    }
}
