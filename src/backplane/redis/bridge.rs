//! The Redis side of `--redis`: two helper threads with blocking connections
//! of the `redis` crate, so that no Redis call ever runs on an event loop,
//! one pair per process whatever its loop count. Each loop is a node of the
//! cluster of its own (its own node id, liveness key and counts); answers
//! go back to the loop that asked, a room's traffic to the loops subscribed
//! to it (framed once), everything else to every loop.
//!
//! - The **command thread** owns the command connection. It takes
//!   [`Command`]s from an `mpsc` channel in the order the loop sent them,
//!   sends each batch it finds waiting as one pipeline, and answers every
//!   request with an [`Event::Reply`]. It also refreshes the node's liveness
//!   key every second.
//! - The **subscriber thread** owns the pub/sub connection. It blocks reading
//!   messages with a short timeout, applies subscribe and unsubscribe requests
//!   between reads, and turns each message into an [`Event`] with its
//!   WebSocket frame already encoded.
//!
//! Both talk to the loop only through one `mpsc` channel of events and a
//! waker the loop gives it (one wake per burst, not per event). Both reconnect with
//! capped, jittered exponential backoff; the subscriber resubscribes every
//! channel it was asked for.
//!
//! A `join` must not run before its room's subscription is in force, or a
//! message published in between would be missed: the command thread waits for
//! it, after publishing on the node's wake channel so the subscriber leaves its
//! blocking read at once and applies the request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::backplane::events::RoomEvents;
use crate::hub::Namespaces;
use log::{debug, info, warn};
use redis::{Client, Connection, Pipeline, RedisError, Value};

use crate::backplane::{MemberView, RoomView};

use super::commands::{
    self, Command, Event, KEY_TTL_MS, NODE_TTL_MS, RegisteredRoom, Reply, ReqId, RoomItem,
    RoomMembers, RoomState, Script, Subscription, USERS_CHANNEL,
};

/// Connecting gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A command or pipeline that gets no answer in this long counts as a lost connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// The subscriber's blocking read returns this often to look at its requests.
const SUBSCRIBER_POLL: Duration = Duration::from_millis(250);
/// How long a join waits for its room's subscription.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most commands sent as one pipeline.
const MAX_BATCH: usize = 512;

/// How the bridge wakes the event loop; the loop gives its own (a
/// `mio::Waker`), so this module needs nothing of the loop's I/O.
pub trait Wake: Send + Sync {
    /// Makes the loop's next poll return.
    fn wake(&self);
}

/// Wakes the loop once per burst of events.
pub struct Notifier {
    waker: Box<dyn Wake>,
    pending: AtomicBool,
}

impl Notifier {
    /// Wraps the loop's waker.
    pub fn new(waker: Box<dyn Wake>) -> Self {
        Notifier {
            waker,
            pending: AtomicBool::new(false),
        }
    }

    fn notify(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Called by the loop before it drains the events: the next event wakes it again.
    pub fn rearm(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

/// Sends events to the loop and wakes it.
#[derive(Clone)]
struct ToLoop {
    events: Sender<Event>,
    notifier: Arc<Notifier>,
}

impl ToLoop {
    fn send(&self, event: Event) {
        if self.events.send(event).is_ok() {
            self.notifier.notify();
        }
    }
}

/// Every event loop of the process, by index: answers go to the loop that
/// asked, room traffic to the loops subscribed to the room, the rest to all.
#[derive(Clone)]
struct ToLoops {
    loops: Vec<ToLoop>,
}

impl ToLoops {
    fn send(&self, to: usize, event: Event) {
        if let Some(target) = self.loops.get(to) {
            target.send(event);
        }
    }

    fn broadcast(&self, event: &Event) {
        for target in &self.loops {
            target.send(event.clone());
        }
    }
}

/// Which room channels are subscribed for which loop, and by which of its
/// requests (the loop's generation).
#[derive(Default)]
struct Subscribed {
    rooms: Mutex<HashMap<(usize, String), u64>>,
    changed: Condvar,
}

/// The process's end of the bridge: one command connection and one
/// subscriber for every loop, so a channel message is framed once.
pub struct Bridge {
    stop: Arc<AtomicBool>,
}

/// One loop's ends of the bridge.
pub struct BridgeLink {
    index: usize,
    commands: Sender<(usize, Command)>,
    subscriptions: Sender<(usize, Subscription)>,
    /// Events for this loop from both threads.
    pub events: Receiver<Event>,
    /// Re-armed by the loop before draining `events`.
    pub notifier: Arc<Notifier>,
}

impl Bridge {
    /// Starts both threads for the loops of `processes` (one process id, and
    /// one waker, per loop); they connect in the background (Redis may be
    /// down). Returns each loop's link, by index.
    pub fn start(
        url: &str,
        namespaces: Arc<Namespaces>,
        events: RoomEvents,
        processes: Vec<String>,
        wakers: Vec<Box<dyn Wake>>,
    ) -> Result<(Bridge, Vec<BridgeLink>), RedisError> {
        let client = Client::open(url)?;
        let (commands, command_rx) = mpsc::channel();
        let (subscriptions, subscription_rx) = mpsc::channel();
        let mut targets = Vec::new();
        let mut links = Vec::new();
        for (index, waker) in wakers.into_iter().enumerate() {
            let notifier = Arc::new(Notifier::new(waker));
            let (event_tx, events) = mpsc::channel();
            targets.push(ToLoop {
                events: event_tx,
                notifier: notifier.clone(),
            });
            links.push(BridgeLink {
                index,
                commands: mpsc::Sender::clone(&commands),
                subscriptions: mpsc::Sender::clone(&subscriptions),
                events,
                notifier,
            });
        }
        let to_loops = ToLoops { loops: targets };
        let subscribed = Arc::new(Subscribed::default());
        let stop = Arc::new(AtomicBool::new(false));
        let wake = commands::wake_channel(processes.first().map_or("", String::as_str));
        {
            let client = client.clone();
            let to_loops = to_loops.clone();
            let subscribed = subscribed.clone();
            let wake = wake.clone();
            let loops = processes.len();
            thread::Builder::new()
                .name("redis-commands".into())
                .spawn(move || {
                    CommandThread {
                        client,
                        to_loops,
                        subscribed,
                        wake,
                        namespaces,
                        events,
                        scripts: Vec::new(),
                        connection: None,
                        nodes: vec![None; loops],
                        backoff: Backoff::new(),
                        next_heartbeat: Instant::now(),
                    }
                    .run(command_rx)
                })
                .map_err(io_error)?;
        }
        {
            let stop = stop.clone();
            thread::Builder::new()
                .name("redis-subscriber".into())
                .spawn(move || {
                    SubscriberThread {
                        client,
                        to_loops,
                        subscribed,
                        wake,
                        processes,
                        desired: HashMap::new(),
                        stop,
                    }
                    .run(subscription_rx)
                })
                .map_err(io_error)?;
        }
        Ok((Bridge { stop }, links))
    }

    /// Tells the subscriber to end (the command thread ends once every loop
    /// sent its `Shutdown`).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl BridgeLink {
    /// Hands a command to the command thread.
    pub fn command(&self, command: Command) {
        let _ = self.commands.send((self.index, command));
    }

    /// Hands a subscription change to the subscriber thread.
    pub fn subscription(&self, change: Subscription) {
        let _ = self.subscriptions.send((self.index, change));
    }
}

fn io_error(error: std::io::Error) -> RedisError {
    RedisError::from(error)
}

/// Capped exponential backoff with jitter.
struct Backoff {
    next: Duration,
    until: Option<Instant>,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            until: None,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
        self.until = None;
    }

    /// Schedules the next attempt and returns the delay.
    fn failed(&mut self) -> Duration {
        let base = self.next.as_millis() as u64;
        // Full range between half and all of the step.
        let jitter = getrandom::u64().unwrap_or(0) % (base / 2 + 1);
        let delay = Duration::from_millis(base / 2 + jitter);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        self.until = Some(Instant::now() + delay);
        delay
    }

    fn ready(&self) -> bool {
        self.until.is_none_or(|until| Instant::now() >= until)
    }

    fn remaining(&self) -> Duration {
        self.until.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        })
    }
}

fn connect(client: &Client, read_timeout: Duration) -> Result<Connection, RedisError> {
    let connection = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    connection.set_read_timeout(Some(read_timeout))?;
    connection.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(connection)
}

struct CommandThread {
    client: Client,
    to_loops: ToLoops,
    subscribed: Arc<Subscribed>,
    wake: String,
    /// Each room's options: history kept, member events, max members.
    namespaces: Arc<Namespaces>,
    /// The webhook events the scripts' answers reveal (this node saw the
    /// change, so this node reports it: once for the cluster).
    events: RoomEvents,
    /// SHA of each script of `Script::ALL`, loaded on this connection.
    scripts: Vec<String>,
    connection: Option<Connection>,
    /// Each loop's node id, once it registered on this connection: every
    /// loop is a node of the cluster (its own presence and counts).
    nodes: Vec<Option<String>>,
    backoff: Backoff,
    next_heartbeat: Instant,
}

/// How one command's answer is read from the pipeline.
enum Expect {
    /// Fire and forget.
    Nothing,
    Joined(ReqId),
    Published(ReqId),
    Presence(ReqId),
    Sent(ReqId),
    /// The occupied rooms, or one room in detail (`Room`).
    Rooms(ReqId),
    Room(ReqId, String),
}

impl CommandThread {
    fn run(mut self, commands: Receiver<(usize, Command)>) {
        let mut batch = Vec::new();
        let mut live = self.nodes.len();
        loop {
            let registered = self.nodes.iter().any(Option::is_some);
            let wait = if self.connection.is_none() {
                self.backoff.remaining().max(Duration::from_millis(10))
            } else if registered {
                self.next_heartbeat
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            } else {
                Duration::from_secs(1)
            };
            match commands.recv_timeout(wait) {
                Ok(command) => batch.push(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if self.connection.is_none() && self.backoff.ready() {
                self.connect();
            }
            let stopping: Vec<usize> = batch
                .iter()
                .filter(|(_, command)| matches!(command, Command::Shutdown))
                .map(|(index, _)| *index)
                .collect();
            self.execute(&mut batch);
            for index in stopping {
                self.to_loops.send(index, Event::Stopped);
                live = live.saturating_sub(1);
            }
            if live == 0 {
                return;
            }
            if self.nodes.iter().any(Option::is_some) && Instant::now() >= self.next_heartbeat {
                self.heartbeat();
            }
        }
    }

    fn connect(&mut self) {
        let attempt = connect(&self.client, COMMAND_TIMEOUT).and_then(|mut connection| {
            let mut shas = Vec::new();
            for script in Script::ALL {
                let sha: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(script.source())
                    .query(&mut connection)?;
                shas.push(sha);
            }
            Ok((connection, shas))
        });
        match attempt {
            Ok((connection, shas)) => {
                info!("redis: command connection up");
                self.connection = Some(connection);
                self.scripts = shas;
                self.nodes.iter_mut().for_each(|node| *node = None);
                self.backoff.reset();
                self.to_loops.broadcast(&Event::CommandLink(true));
            }
            Err(error) => {
                let delay = self.backoff.failed();
                debug!("redis: cannot connect ({error}); retrying in {delay:?}");
            }
        }
    }

    fn lost(&mut self, error: &RedisError) {
        if self.connection.take().is_some() {
            warn!("redis: command connection lost: {error}");
            self.to_loops.broadcast(&Event::CommandLink(false));
        }
        self.nodes.iter_mut().for_each(|node| *node = None);
        self.backoff.failed();
    }

    fn fail(&self, index: usize, command: &Command) {
        let req = match command {
            Command::Join { req, .. }
            | Command::Publish { req, .. }
            | Command::Presence { req, .. }
            | Command::SendUser { req, .. }
            | Command::Rooms { req, .. }
            | Command::Room { req, .. }
            | Command::Membership { req, .. }
            | Command::Register { req, .. } => *req,
            _ => return,
        };
        self.to_loops.send(
            index,
            Event::Reply {
                req,
                result: Err(()),
            },
        );
    }

    /// Runs a batch in order: plain commands as pipelines, a registration on its own.
    fn execute(&mut self, batch: &mut Vec<(usize, Command)>) {
        let mut run: Vec<(usize, Command)> = Vec::new();
        for (index, command) in batch.drain(..) {
            match command {
                Command::Register { .. } | Command::Shutdown => {
                    let pending = std::mem::take(&mut run);
                    self.execute_plain(pending);
                    self.execute_special(index, command);
                }
                other => run.push((index, other)),
            }
        }
        self.execute_plain(run);
    }

    fn execute_special(&mut self, index: usize, command: Command) {
        match command {
            Command::Register { req, rooms, users } => {
                if self.connection.is_none() {
                    let refused = Command::Register {
                        req,
                        rooms: Vec::new(),
                        users: Vec::new(),
                    };
                    self.fail(index, &refused);
                    return;
                }
                let result = self.register(index, &rooms, &users);
                let result = match result {
                    Ok(rooms) => Ok(Reply::Registered { rooms }),
                    Err(error) => {
                        self.lost(&error);
                        Err(())
                    }
                };
                self.to_loops.send(index, Event::Reply { req, result });
            }
            Command::Shutdown => {
                let node = self.nodes.get_mut(index).and_then(Option::take);
                if let (Some(connection), Some(node)) = (self.connection.as_mut(), node) {
                    let _: Result<(), _> = redis::cmd("DEL")
                        .arg(commands::node_key(&node))
                        .query(connection);
                }
            }
            _ => {}
        }
    }

    /// A new node id, the liveness key, and every room and user of this node.
    fn register(
        &mut self,
        index: usize,
        rooms: &[RoomMembers],
        users: &[(String, u32)],
    ) -> Result<Vec<RegisteredRoom>, RedisError> {
        let node = commands::random_id();
        let ttl = KEY_TTL_MS.to_string();
        let mut pipe = redis::pipe();
        if let Some(old) = self.nodes.get(index).and_then(Option::as_ref) {
            pipe.cmd("DEL").arg(commands::node_key(old)).ignore();
        }
        pipe.cmd("SET")
            .arg(commands::node_key(&node))
            .arg(1)
            .arg("PX")
            .arg(NODE_TTL_MS)
            .ignore();
        for room in rooms {
            let keys = commands::room_keys(&room.room);
            let command = pipe
                .cmd("EVALSHA")
                .arg(self.sha(Script::RegisterRoom))
                .arg(5)
                .arg(&keys[..])
                .arg(crate::hub::random_epoch().as_ref())
                .arg(&node)
                .arg(&ttl)
                .arg(&room.epoch)
                .arg(room.since);
            for (user, count, user_json) in &room.users {
                command.arg(user).arg(*count).arg(user_json);
            }
        }
        for (user, count) in users {
            let key = commands::user_key(user);
            pipe.cmd("HSET").arg(&key).arg(&node).arg(*count).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(KEY_TTL_MS).ignore();
        }
        let connection = self
            .connection
            .as_mut()
            .ok_or_else(|| RedisError::from(std::io::Error::other("not connected")))?;
        let values: Vec<Value> = pipe.query(connection)?;
        let mut states = Vec::with_capacity(rooms.len());
        for value in values {
            states.push(registered_room(&value).ok_or_else(|| unexpected(&value))?);
        }
        info!(
            "redis: registered as node {node} ({} room(s), {} user(s))",
            rooms.len(),
            users.len()
        );
        if let Some(slot) = self.nodes.get_mut(index) {
            *slot = Some(node);
        }
        self.next_heartbeat = Instant::now() + Duration::from_millis(commands::HEARTBEAT_MS);
        Ok(states)
    }

    /// Every loop's liveness key, in one pipeline.
    fn heartbeat(&mut self) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let mut pipe = redis::pipe();
        for node in self.nodes.iter().flatten() {
            pipe.cmd("SET")
                .arg(commands::node_key(node))
                .arg(1)
                .arg("PX")
                .arg(NODE_TTL_MS)
                .ignore();
        }
        let result: Result<(), RedisError> = pipe.query(connection);
        self.next_heartbeat = Instant::now() + Duration::from_millis(commands::HEARTBEAT_MS);
        if let Err(error) = result {
            self.lost(&error);
        }
    }

    fn sha(&self, script: Script) -> &str {
        self.scripts.get(script.index()).map_or("", String::as_str)
    }

    /// Waits until every (loop, room) in `rooms` (with the loop's generation
    /// it needs) is subscribed; returns those that are not after the wait.
    fn await_subscriptions(&mut self, rooms: &[((usize, String), u64)]) -> Vec<(usize, String)> {
        let ready = |subscribed: &HashMap<(usize, String), u64>| {
            rooms
                .iter()
                .all(|(key, generation)| subscribed.get(key).is_some_and(|g| g >= generation))
        };
        let Ok(guard) = self.subscribed.rooms.lock() else {
            return rooms.iter().map(|(key, _)| key.clone()).collect();
        };
        if ready(&guard) {
            return Vec::new();
        }
        drop(guard);
        // Wake the subscriber out of its blocking read: it applies its requests at once.
        if let Some(connection) = self.connection.as_mut() {
            let _: Result<(), _> = redis::cmd("PUBLISH")
                .arg(&self.wake)
                .arg("")
                .query(connection);
        }
        let Ok(guard) = self.subscribed.rooms.lock() else {
            return Vec::new();
        };
        let result =
            self.subscribed
                .changed
                .wait_timeout_while(guard, SUBSCRIBE_WAIT, |subscribed| !ready(subscribed));
        match result {
            Ok((subscribed, _)) => rooms
                .iter()
                .filter(|(key, generation)| subscribed.get(key).is_none_or(|g| g < generation))
                .map(|(key, _)| key.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Sends commands as one pipeline and answers each to the loop that sent it.
    fn execute_plain(&mut self, mut commands: Vec<(usize, Command)>) {
        if commands.is_empty() {
            return;
        }
        // Not connected, or the sending loop not yet registered on this
        // connection: what was asked before the link came back is refused,
        // not replayed.
        let connected = self.connection.is_some();
        commands.retain(|(index, command)| {
            let registered = self.nodes.get(*index).is_some_and(Option::is_some);
            if !connected || !registered {
                self.fail(*index, command);
            }
            connected && registered
        });
        let joins: Vec<((usize, String), u64)> = commands
            .iter()
            .filter_map(|(index, command)| match command {
                Command::Join {
                    room,
                    sub_generation,
                    ..
                } => Some(((*index, room.clone()), *sub_generation)),
                _ => None,
            })
            .collect();
        if !joins.is_empty() {
            let missing = self.await_subscriptions(&joins);
            if !missing.is_empty() {
                warn!("redis: no subscription for {missing:?}; refusing the join(s)");
                commands.retain(|(index, command)| match command {
                    Command::Join { room, .. } if missing.contains(&(*index, room.clone())) => {
                        self.fail(*index, command);
                        false
                    }
                    _ => true,
                });
            }
        }
        if commands.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut expects = Vec::with_capacity(commands.len());
        for (index, command) in &commands {
            expects.push((*index, self.add(&mut pipe, *index, command)));
        }
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let results: Result<Vec<Result<Value, RedisError>>, RedisError> = pipe.query(connection);
        let results = match results {
            Ok(results) => results,
            Err(error) => {
                self.lost(&error);
                for (index, command) in &commands {
                    self.fail(*index, command);
                }
                return;
            }
        };
        let mut noscript = None;
        // Each command's first reply is its answer; the rest are ignored in the pipeline.
        let answered = expects.into_iter().zip(results).zip(&commands);
        for (((index, expect), result), (_, command)) in answered {
            if let Ok(value) = &result {
                self.report_events(command, value);
            }
            let (req, parsed) = match result {
                Ok(value) => match expect {
                    Expect::Nothing => continue,
                    Expect::Joined(req) => (req, joined(&value)),
                    Expect::Published(req) => (req, published(&value)),
                    Expect::Presence(req) => (req, presence(&value)),
                    Expect::Sent(req) => (
                        req,
                        int(&value).map(|connections| Reply::Sent { connections }),
                    ),
                    Expect::Rooms(req) => (req, room_list(&value)),
                    Expect::Room(req, room) => (req, room_detail(&room, &value)),
                },
                Err(error) => {
                    if error.code() == Some("NOSCRIPT") {
                        noscript = Some(error);
                    } else {
                        warn!("redis: command refused: {error}");
                    }
                    match expect {
                        Expect::Nothing => continue,
                        Expect::Joined(req)
                        | Expect::Published(req)
                        | Expect::Presence(req)
                        | Expect::Rooms(req)
                        | Expect::Room(req, _)
                        | Expect::Sent(req) => (req, None),
                    }
                }
            };
            let result = parsed.ok_or(());
            self.to_loops.send(index, Event::Reply { req, result });
        }
        if let Some(error) = noscript {
            // Someone flushed the scripts: reconnect, which loads them again.
            self.lost(&error);
        }
    }

    /// The webhook events a script's answer reveals (§14.2): a user new to
    /// a room or gone from it on every node, and a message's seq.
    fn report_events(&self, command: &Command, value: &Value) {
        if !self.events.is_on() {
            return;
        }
        let now = unix_millis();
        match command {
            Command::Join {
                room, user_json, ..
            } => {
                // {epoch, seq, count, history length, connections before, ...}
                let items = array(value).unwrap_or_default();
                let before = items.get(4).and_then(int);
                if let (Some(0), Some(count)) = (before, items.get(2).and_then(int)) {
                    self.events.user_joined(room, user_json, count, now);
                }
            }
            Command::Member {
                room, user_json, ..
            } => {
                // {gone, users left}
                let items = array(value).unwrap_or_default();
                let gone = items.first().and_then(int);
                if let (Some(1), Some(count)) = (gone, items.get(1).and_then(int)) {
                    self.events.user_left(room, user_json, count, now);
                }
            }
            Command::Publish {
                room,
                webhook: Some(message),
                ..
            } => {
                if let Some(seq) = array(value).and_then(|items| items.first().and_then(int)) {
                    let (user, content) = (&message.user_json, &message.content);
                    self.events.message(room, seq, user, content, now);
                }
            }
            _ => {}
        }
    }

    /// Adds a command to the pipeline; every command but the first of each is ignored.
    fn add(&self, pipe: &mut Pipeline, index: usize, command: &Command) -> Expect {
        let node = self
            .nodes
            .get(index)
            .and_then(Option::as_deref)
            .unwrap_or("");
        let ttl = KEY_TTL_MS.to_string();
        match command {
            Command::Join { .. } => self.add_join(pipe, command, node, &ttl),
            Command::Publish {
                req,
                room,
                head,
                tail,
                ..
            } => {
                self.add_publish(pipe, room, head, tail, &ttl);
                Expect::Published(*req)
            }
            Command::Presence { req, room } => {
                let keys = commands::room_keys(room);
                pipe.cmd("EVALSHA")
                    .arg(self.sha(Script::Presence))
                    .arg(3)
                    .arg(&keys[2..]);
                Expect::Presence(*req)
            }
            Command::SendUser {
                req,
                user_id,
                envelope,
            } => {
                pipe.cmd("EVALSHA")
                    .arg(self.sha(Script::SendUser))
                    .arg(1)
                    .arg(commands::user_key(user_id))
                    .arg(USERS_CHANNEL)
                    .arg(envelope);
                Expect::Sent(*req)
            }
            Command::Member {
                room,
                user_id,
                user_json,
                local_count,
            } => {
                let keys = commands::room_keys(room);
                let options = self.namespaces.for_room(room);
                pipe.cmd("EVALSHA")
                    .arg(self.sha(Script::Member))
                    .arg(3)
                    .arg(&keys[2..])
                    .arg(node)
                    .arg(user_id)
                    .arg(*local_count)
                    .arg(user_json)
                    .arg(&ttl)
                    .arg(commands::room_channel(room))
                    .arg(json_string(room))
                    .arg(flag(options.member_events));
                Expect::Nothing
            }
            Command::RoomEvent { room, envelope } => {
                pipe.cmd("PUBLISH")
                    .arg(commands::room_channel(room))
                    .arg(envelope);
                Expect::Nothing
            }
            Command::UserCount { .. } | Command::Refresh { .. } => {
                add_upkeep(pipe, command, node);
                Expect::Nothing
            }
            Command::Register { .. } | Command::Shutdown => {
                pipe.cmd("PING");
                Expect::Nothing
            }
            Command::Rooms { req, prefix, want } => {
                pipe.cmd("EVALSHA")
                    .arg(self.sha(Script::Rooms))
                    .arg(0)
                    .arg(prefix)
                    .arg(*want);
                Expect::Rooms(*req)
            }
            Command::Membership {
                req,
                user_id,
                room,
                subscribe,
                envelope,
            } => {
                pipe.cmd("EVALSHA")
                    .arg(self.sha(Script::Membership))
                    .arg(2)
                    .arg(commands::user_key(user_id))
                    .arg(&commands::room_keys(room)[2])
                    .arg(USERS_CHANNEL)
                    .arg(envelope)
                    .arg(user_id)
                    .arg(if *subscribe { "1" } else { "0" });
                Expect::Sent(*req)
            }
            Command::Room { req, room } => {
                pipe.cmd("EVALSHA")
                    .arg(self.sha(Script::Room))
                    .arg(5)
                    .arg(&commands::room_keys(room)[..]);
                Expect::Room(*req, room.clone())
            }
        }
    }

    /// The join script: membership, presence, marker and the history after `since`.
    fn add_join(&self, pipe: &mut Pipeline, command: &Command, node: &str, ttl: &str) -> Expect {
        let Command::Join {
            req,
            room,
            user_id,
            user_json,
            local_count,
            since,
            epoch,
            marker,
            ..
        } = command
        else {
            return Expect::Nothing;
        };
        let options = self.namespaces.for_room(room);
        pipe.cmd("EVALSHA")
            .arg(self.sha(Script::Join))
            .arg(5)
            .arg(&commands::room_keys(room)[..])
            .arg(crate::hub::random_epoch().as_ref())
            .arg(node)
            .arg(user_id)
            .arg(*local_count)
            .arg(user_json)
            .arg(ttl)
            .arg(commands::room_channel(room))
            .arg(json_string(room))
            .arg(marker)
            .arg(since.map(|s| s.to_string()).unwrap_or_default())
            .arg(epoch.as_deref().unwrap_or(""))
            .arg(options.max_members)
            .arg(flag(options.member_events));
        Expect::Joined(*req)
    }

    /// The publish script: the seq, the history and the channel, in one step.
    fn add_publish(&self, pipe: &mut Pipeline, room: &str, head: &str, tail: &str, ttl: &str) {
        let keys = commands::room_keys(room);
        pipe.cmd("EVALSHA")
            .arg(self.sha(Script::Publish))
            .arg(3)
            .arg(&keys[0])
            .arg(&keys[1])
            .arg(&keys[4])
            .arg(crate::hub::random_epoch().as_ref())
            .arg(self.namespaces.for_room(room).history)
            .arg(ttl)
            .arg(commands::room_channel(room))
            .arg(head)
            .arg(tail);
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

fn unexpected(value: &Value) -> RedisError {
    RedisError::from(std::io::Error::other(format!(
        "unexpected reply from Redis: {value:?}"
    )))
}

fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// The wall clock in Unix milliseconds, for the webhook events' `time_ms`.
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn array(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

fn room_state(value: &Value) -> Option<RoomState> {
    let items = array(value)?;
    Some(RoomState {
        epoch: text(items.first()?)?,
        seq: int(items.get(1)?)?,
        count: int(items.get(2)?)?,
    })
}

/// A script argument for a yes or no.
fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

fn joined(value: &Value) -> Option<Reply> {
    let items = array(value)?;
    if items.first().and_then(text).as_deref() == Some("!full") {
        let count = int(items.get(1)?)?;
        return Some(Reply::RoomFull { count });
    }
    let state = room_state(value)?;
    let history_len = int(items.get(3)?)?;
    let frames = items
        .get(5..)
        .unwrap_or_default()
        .iter()
        .map(text)
        .collect::<Option<Vec<_>>>()?;
    Some(Reply::Joined {
        state,
        history_len,
        frames,
    })
}

fn registered_room(value: &Value) -> Option<RegisteredRoom> {
    let items = array(value)?;
    let state = room_state(value)?;
    let frames = items
        .get(3..)
        .unwrap_or_default()
        .iter()
        .map(text)
        .collect::<Option<Vec<_>>>()?;
    Some(RegisteredRoom { state, frames })
}

fn published(value: &Value) -> Option<Reply> {
    let items = array(value)?;
    Some(Reply::Published {
        seq: int(items.first()?)?,
        delivered: int(items.get(1)?)?,
    })
}

fn presence(value: &Value) -> Option<Reply> {
    let items = array(value)?;
    let mut entries = Vec::with_capacity(items.len() / 2);
    for pair in items.chunks(2) {
        let [field, entry] = pair else { continue };
        let (field, entry) = (text(field)?, text(entry)?);
        let (_, user) = field.split_once('|')?;
        let (count, user_json) = entry.split_once('|')?;
        entries.push((user.to_string(), count.parse().ok()?, user_json.to_string()));
    }
    Some(Reply::Presence { entries })
}

/// The answer of the rooms script: five items per room.
fn room_list(value: &Value) -> Option<Reply> {
    let items = array(value)?;
    let mut rooms = Vec::with_capacity(items.len() / 5);
    for room in items.chunks(5) {
        let [name, count, connections, epoch, seq] = room else {
            return None;
        };
        rooms.push(RoomView {
            room: text(name)?.into_boxed_str(),
            count: int(count)?,
            connections: int(connections)?,
            seq: int(seq)?,
            epoch: text(epoch)?.into_boxed_str(),
            users: Vec::new(),
            history: Vec::new(),
        });
    }
    Some(Reply::Rooms { rooms })
}

/// The answer of the room script: no room, or its state, users and history.
fn room_detail(room: &str, value: &Value) -> Option<Reply> {
    let items = array(value)?;
    if items.is_empty() {
        return Some(Reply::Rooms { rooms: Vec::new() });
    }
    let epoch = text(items.first()?)?;
    let seq = int(items.get(1)?)?;
    let connections = int(items.get(2)?)?;
    let user_count = usize::try_from(int(items.get(3)?)?).ok()?;
    let users_end = user_count.checked_mul(3)?.checked_add(4)?;
    let mut users = Vec::with_capacity(user_count);
    for user in items.get(4..users_end)?.chunks(3) {
        let [id, connections, json] = user else {
            return None;
        };
        users.push(MemberView {
            id: text(id)?.into_boxed_str(),
            json: text(json)?.into_boxed_str(),
            connections: int(connections)?,
        });
    }
    users.sort_by(|a, b| a.id.cmp(&b.id));
    // The history is contiguous and ends at `seq`.
    let held = items.get(users_end..).unwrap_or_default();
    let first_seq = seq.saturating_add(1).saturating_sub(held.len() as u64);
    let history = held
        .iter()
        .zip(first_seq..)
        .map(|(frame, seq)| Some((seq, crate::protocol::text_frame(&text(frame)?))))
        .collect::<Option<Vec<_>>>()?;
    Some(Reply::Rooms {
        rooms: vec![RoomView {
            room: room.into(),
            count: user_count as u64,
            connections,
            seq,
            epoch: epoch.into_boxed_str(),
            users,
            history,
        }],
    })
}

struct SubscriberThread {
    client: Client,
    to_loops: ToLoops,
    subscribed: Arc<Subscribed>,
    wake: String,
    /// Each loop's process id: its join markers.
    processes: Vec<String>,
    /// Room channels asked for: the loops that asked, with the generation
    /// of each loop's request. A channel is subscribed while any loop wants it.
    desired: HashMap<String, HashMap<usize, u64>>,
    stop: Arc<AtomicBool>,
}

impl SubscriberThread {
    fn run(mut self, requests: Receiver<(usize, Subscription)>) {
        let mut backoff = Backoff::new();
        while !self.stop.load(Ordering::Acquire) {
            match self.session(&requests, &mut backoff) {
                Ok(()) => return,
                Err(error) => {
                    if let Ok(mut rooms) = self.subscribed.rooms.lock() {
                        rooms.clear();
                    }
                    let delay = backoff.failed();
                    debug!("redis: subscriber down ({error}); retrying in {delay:?}");
                    // Keep up with the loop's requests while waiting.
                    let until = Instant::now() + delay;
                    while Instant::now() < until && !self.stop.load(Ordering::Acquire) {
                        match requests.recv_timeout(until.saturating_duration_since(Instant::now()))
                        {
                            Ok((index, change)) => {
                                self.note(index, &change);
                            }
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
            }
        }
    }

    /// Records a loop's request; returns whether the room's channel must be
    /// subscribed (its first loop) or unsubscribed (its last).
    fn note(&mut self, index: usize, change: &Subscription) -> bool {
        match change {
            Subscription::Subscribe { room, generation } => {
                let loops = self.desired.entry(room.clone()).or_default();
                loops.insert(index, *generation);
                loops.len() == 1
            }
            Subscription::Unsubscribe { room } => {
                let Some(loops) = self.desired.get_mut(room) else {
                    return false;
                };
                loops.remove(&index);
                let last = loops.is_empty();
                if last {
                    self.desired.remove(room);
                }
                last
            }
        }
    }

    /// One connection's life; `Ok` only when asked to stop.
    fn session(
        &mut self,
        requests: &Receiver<(usize, Subscription)>,
        backoff: &mut Backoff,
    ) -> Result<(), RedisError> {
        let mut connection = connect(&self.client, SUBSCRIBER_POLL)?;
        let mut pubsub = connection.as_pubsub();
        pubsub.subscribe(USERS_CHANNEL)?;
        pubsub.subscribe(self.wake.as_str())?;
        // Requests that came while connecting are part of the first subscription.
        loop {
            match requests.try_recv() {
                Ok((index, change)) => {
                    self.note(index, &change);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
        let mut confirmed = Vec::new();
        for (room, loops) in &self.desired {
            pubsub.subscribe(commands::room_channel(room))?;
            for (index, generation) in loops {
                confirmed.push(((*index, room.clone()), *generation));
            }
        }
        self.confirm(&confirmed);
        backoff.reset();
        info!(
            "redis: subscriber up ({} room channel(s))",
            self.desired.len()
        );
        self.to_loops.broadcast(&Event::SubscriberLink(true));
        let result = self.listen(&mut pubsub, requests);
        self.to_loops.broadcast(&Event::SubscriberLink(false));
        if let Err(error) = &result {
            warn!("redis: subscriber connection lost: {error}");
        }
        result
    }

    fn confirm(&self, rooms: &[((usize, String), u64)]) {
        if let Ok(mut subscribed) = self.subscribed.rooms.lock() {
            for (key, generation) in rooms {
                subscribed.insert(key.clone(), *generation);
            }
        }
        self.subscribed.changed.notify_all();
    }

    fn listen(
        &mut self,
        pubsub: &mut redis::PubSub<'_>,
        requests: &Receiver<(usize, Subscription)>,
    ) -> Result<(), RedisError> {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.apply(pubsub, requests)?;
            match pubsub.get_message() {
                Ok(message) => self.deliver(&message),
                Err(error) if error.is_timeout() => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Applies waiting requests in order. One channel per SUBSCRIBE: the
    /// crate returns after the first confirmation, so a command for several
    /// channels would leave confirmations behind that the next one would take
    /// for its own.
    fn apply(
        &mut self,
        pubsub: &mut redis::PubSub<'_>,
        requests: &Receiver<(usize, Subscription)>,
    ) -> Result<(), RedisError> {
        loop {
            let (index, change) = match requests.try_recv() {
                Ok(request) => request,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    self.stop.store(true, Ordering::Release);
                    return Ok(());
                }
            };
            let first_or_last = self.note(index, &change);
            match change {
                Subscription::Subscribe { room, generation } => {
                    if first_or_last {
                        pubsub.subscribe(commands::room_channel(&room))?;
                    }
                    self.confirm(&[((index, room), generation)]);
                }
                Subscription::Unsubscribe { room } => {
                    if let Ok(mut subscribed) = self.subscribed.rooms.lock() {
                        subscribed.remove(&(index, room.clone()));
                    }
                    if first_or_last {
                        pubsub.unsubscribe(commands::room_channel(&room))?;
                    }
                }
            }
        }
    }

    /// A message, framed once here, to the loops it is for: a join marker to
    /// the loop whose process made it, room traffic to every loop subscribed
    /// to the room, user items to every loop.
    fn deliver(&self, message: &redis::Msg) {
        let channel = message.get_channel_name();
        let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) else {
            return;
        };
        if let Some(room) = channel.strip_prefix(commands::ROOM_CHANNEL_PREFIX) {
            let Some((owner, item)) = self.parse_room_item(payload) else {
                return;
            };
            if let Some(owner) = owner {
                self.to_loops.send(
                    owner,
                    Event::Room {
                        room: room.to_string(),
                        item,
                    },
                );
                return;
            }
            let Some(loops) = self.desired.get(room) else {
                return;
            };
            let event = Event::Room {
                room: room.to_string(),
                item,
            };
            for &index in loops.keys() {
                self.to_loops.send(index, event.clone());
            }
        } else if channel == USERS_CHANNEL
            && let Some((user_id, item)) = commands::parse_user_item(payload)
        {
            self.to_loops.broadcast(&Event::User { user_id, item });
        }
    }

    /// A room item, and for a join marker the loop that owns it (`None`
    /// for traffic, which is for every subscribed loop).
    fn parse_room_item(&self, payload: &str) -> Option<(Option<usize>, RoomItem)> {
        for (index, process) in self.processes.iter().enumerate() {
            match commands::parse_room_item(payload, process) {
                Some(RoomItem::Marker { req }) => {
                    return Some((Some(index), RoomItem::Marker { req }));
                }
                Some(item) => return Some((None, item)),
                // A marker of another loop's process (or a malformed item).
                None => continue,
            }
        }
        None
    }
}

/// A user's connection count here, or the minute's TTL refresh.
fn add_upkeep(pipe: &mut Pipeline, command: &Command, node: &str) {
    match command {
        Command::UserCount { user_id, count } => {
            let key = commands::user_key(user_id);
            if *count > 0 {
                pipe.cmd("HSET").arg(&key).arg(node).arg(*count);
                pipe.cmd("PEXPIRE").arg(&key).arg(KEY_TTL_MS).ignore();
            } else {
                pipe.cmd("HDEL").arg(&key).arg(node);
            }
        }
        Command::Refresh { rooms, users } => {
            pipe.cmd("PING");
            for room in rooms {
                for key in commands::room_keys(room) {
                    pipe.cmd("PEXPIRE").arg(key).arg(KEY_TTL_MS).ignore();
                }
            }
            for user in users {
                pipe.cmd("PEXPIRE")
                    .arg(commands::user_key(user))
                    .arg(KEY_TTL_MS)
                    .ignore();
            }
        }
        _ => {}
    }
}
