//! The Redis side of `--redis`: two helper threads with blocking connections
//! of the `redis` crate, so that no Redis call ever runs on the event loop.
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

use log::{debug, info, warn};
use redis::{Client, Connection, Pipeline, RedisError, Value};

use super::commands::{
    self, Command, Event, KEY_TTL_MS, NODE_TTL_MS, RegisteredRoom, Reply, ReqId, RoomMembers,
    RoomState, Script, Subscription, USERS_CHANNEL,
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

/// Which room channels are subscribed, and by which request (its generation).
#[derive(Default)]
struct Subscribed {
    rooms: Mutex<HashMap<String, u64>>,
    changed: Condvar,
}

/// The loop's ends of the bridge.
pub struct Bridge {
    commands: Sender<Command>,
    subscriptions: Sender<Subscription>,
    /// Events from both threads.
    pub events: Receiver<Event>,
    /// Re-armed by the loop before draining `events`.
    pub notifier: Arc<Notifier>,
    stop: Arc<AtomicBool>,
}

impl Bridge {
    /// Starts both threads; they connect in the background (Redis may be down).
    pub fn start(
        url: &str,
        history: usize,
        process: String,
        waker: Box<dyn Wake>,
    ) -> Result<Bridge, RedisError> {
        let client = Client::open(url)?;
        let notifier = Arc::new(Notifier::new(waker));
        let (event_tx, events) = mpsc::channel();
        let to_loop = ToLoop {
            events: event_tx,
            notifier: notifier.clone(),
        };
        let (commands, command_rx) = mpsc::channel();
        let (subscriptions, subscription_rx) = mpsc::channel();
        let subscribed = Arc::new(Subscribed::default());
        let stop = Arc::new(AtomicBool::new(false));
        let wake = commands::wake_channel(&process);
        {
            let client = client.clone();
            let to_loop = to_loop.clone();
            let subscribed = subscribed.clone();
            let wake = wake.clone();
            thread::Builder::new()
                .name("redis-commands".into())
                .spawn(move || {
                    CommandThread {
                        client,
                        to_loop,
                        subscribed,
                        wake,
                        history,
                        scripts: Vec::new(),
                        connection: None,
                        node: None,
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
                        to_loop,
                        subscribed,
                        wake,
                        process,
                        desired: HashMap::new(),
                        stop,
                    }
                    .run(subscription_rx)
                })
                .map_err(io_error)?;
        }
        Ok(Bridge {
            commands,
            subscriptions,
            events,
            notifier,
            stop,
        })
    }

    /// Hands a command to the command thread.
    pub fn command(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// Hands a subscription change to the subscriber thread.
    pub fn subscription(&self, change: Subscription) {
        let _ = self.subscriptions.send(change);
    }

    /// Tells the subscriber to end (the command thread ends after `Shutdown`).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
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
    to_loop: ToLoop,
    subscribed: Arc<Subscribed>,
    wake: String,
    history: usize,
    /// SHA of each script of `Script::ALL`, loaded on this connection.
    scripts: Vec<String>,
    connection: Option<Connection>,
    /// The node id, once registered on this connection.
    node: Option<String>,
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
}

impl CommandThread {
    fn run(mut self, commands: Receiver<Command>) {
        let mut batch = Vec::new();
        loop {
            let wait = if self.connection.is_none() {
                self.backoff.remaining().max(Duration::from_millis(10))
            } else if self.node.is_some() {
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
            let shutdown = batch.iter().any(|c| matches!(c, Command::Shutdown));
            self.execute(&mut batch);
            if shutdown {
                self.to_loop.send(Event::Stopped);
                return;
            }
            if self.node.is_some() && Instant::now() >= self.next_heartbeat {
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
                self.node = None;
                self.backoff.reset();
                self.to_loop.send(Event::CommandLink(true));
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
            self.to_loop.send(Event::CommandLink(false));
        }
        self.node = None;
        self.backoff.failed();
    }

    fn fail(&self, command: &Command) {
        let req = match command {
            Command::Join { req, .. }
            | Command::Publish { req, .. }
            | Command::Presence { req, .. }
            | Command::SendUser { req, .. }
            | Command::Register { req, .. } => *req,
            _ => return,
        };
        self.to_loop.send(Event::Reply {
            req,
            result: Err(()),
        });
    }

    /// Runs a batch in order: plain commands as pipelines, a registration on its own.
    fn execute(&mut self, batch: &mut Vec<Command>) {
        let mut run: Vec<Command> = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Register { .. } | Command::Shutdown => {
                    let pending = std::mem::take(&mut run);
                    self.execute_plain(pending);
                    self.execute_special(command);
                }
                other => run.push(other),
            }
        }
        self.execute_plain(run);
    }

    fn execute_special(&mut self, command: Command) {
        match command {
            Command::Register { req, rooms, users } => {
                if self.connection.is_none() {
                    self.fail(&Command::Register {
                        req,
                        rooms: Vec::new(),
                        users: Vec::new(),
                    });
                    return;
                }
                let result = self.register(&rooms, &users);
                let result = match result {
                    Ok(rooms) => Ok(Reply::Registered { rooms }),
                    Err(error) => {
                        self.lost(&error);
                        Err(())
                    }
                };
                self.to_loop.send(Event::Reply { req, result });
            }
            Command::Shutdown => {
                if let (Some(connection), Some(node)) = (self.connection.as_mut(), &self.node) {
                    let _: Result<(), _> = redis::cmd("DEL")
                        .arg(commands::node_key(node))
                        .query(connection);
                }
            }
            _ => {}
        }
    }

    /// A new node id, the liveness key, and every room and user of this node.
    fn register(
        &mut self,
        rooms: &[RoomMembers],
        users: &[(String, u32)],
    ) -> Result<Vec<RegisteredRoom>, RedisError> {
        let node = commands::random_id();
        let ttl = KEY_TTL_MS.to_string();
        let mut pipe = redis::pipe();
        if let Some(old) = &self.node {
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
        self.node = Some(node);
        self.next_heartbeat = Instant::now() + Duration::from_millis(commands::HEARTBEAT_MS);
        Ok(states)
    }

    fn heartbeat(&mut self) {
        let (Some(connection), Some(node)) = (self.connection.as_mut(), &self.node) else {
            return;
        };
        let result: Result<(), RedisError> = redis::cmd("SET")
            .arg(commands::node_key(node))
            .arg(1)
            .arg("PX")
            .arg(NODE_TTL_MS)
            .query(connection);
        self.next_heartbeat = Instant::now() + Duration::from_millis(commands::HEARTBEAT_MS);
        if let Err(error) = result {
            self.lost(&error);
        }
    }

    fn sha(&self, script: Script) -> &str {
        self.scripts.get(script.index()).map_or("", String::as_str)
    }

    /// Waits until every room in `rooms` (with the generation it needs) is
    /// subscribed; returns those that are not after the wait.
    fn await_subscriptions(&mut self, rooms: &[(String, u64)]) -> Vec<String> {
        let ready = |subscribed: &HashMap<String, u64>| {
            rooms
                .iter()
                .all(|(room, generation)| subscribed.get(room).is_some_and(|g| g >= generation))
        };
        let Ok(guard) = self.subscribed.rooms.lock() else {
            return rooms.iter().map(|(room, _)| room.clone()).collect();
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
                .filter(|(room, generation)| subscribed.get(room).is_none_or(|g| g < generation))
                .map(|(room, _)| room.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Sends commands as one pipeline and answers each.
    fn execute_plain(&mut self, mut commands: Vec<Command>) {
        if commands.is_empty() {
            return;
        }
        if self.connection.is_none() || self.node.is_none() {
            // Not connected, or not yet registered on this connection: what
            // was asked before the link came back is refused, not replayed.
            for command in &commands {
                self.fail(command);
            }
            return;
        }
        let joins: Vec<(String, u64)> = commands
            .iter()
            .filter_map(|command| match command {
                Command::Join {
                    room,
                    sub_generation,
                    ..
                } => Some((room.clone(), *sub_generation)),
                _ => None,
            })
            .collect();
        if !joins.is_empty() {
            let missing = self.await_subscriptions(&joins);
            if !missing.is_empty() {
                warn!("redis: no subscription for {missing:?}; refusing the join(s)");
                commands.retain(|command| match command {
                    Command::Join { room, .. } if missing.contains(room) => {
                        self.fail(command);
                        false
                    }
                    _ => true,
                });
            }
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut expects = Vec::with_capacity(commands.len());
        for command in &commands {
            expects.push(self.add(&mut pipe, command));
        }
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let results: Result<Vec<Result<Value, RedisError>>, RedisError> = pipe.query(connection);
        let results = match results {
            Ok(results) => results,
            Err(error) => {
                self.lost(&error);
                for command in &commands {
                    self.fail(command);
                }
                return;
            }
        };
        let mut noscript = None;
        // Each command's first reply is its answer; the rest are ignored in the pipeline.
        for (expect, result) in expects.into_iter().zip(results) {
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
                        | Expect::Sent(req) => (req, None),
                    }
                }
            };
            self.to_loop.send(Event::Reply {
                req,
                result: parsed.ok_or(()),
            });
        }
        if let Some(error) = noscript {
            // Someone flushed the scripts: reconnect, which loads them again.
            self.lost(&error);
        }
    }

    /// Adds a command to the pipeline; every command but the first of each is ignored.
    fn add(&self, pipe: &mut Pipeline, command: &Command) -> Expect {
        let node = self.node.as_deref().unwrap_or("");
        let ttl = KEY_TTL_MS.to_string();
        match command {
            Command::Join { .. } => self.add_join(pipe, command, node, &ttl),
            Command::Publish {
                req,
                room,
                head,
                tail,
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
                    .arg(json_string(room));
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
            .arg(epoch.as_deref().unwrap_or(""));
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
            .arg(self.history)
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

fn joined(value: &Value) -> Option<Reply> {
    let items = array(value)?;
    let state = room_state(value)?;
    let history_len = int(items.get(3)?)?;
    let frames = items
        .get(4..)
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

struct SubscriberThread {
    client: Client,
    to_loop: ToLoop,
    subscribed: Arc<Subscribed>,
    wake: String,
    process: String,
    /// Room channels asked for, with the generation of the request.
    desired: HashMap<String, u64>,
    stop: Arc<AtomicBool>,
}

impl SubscriberThread {
    fn run(mut self, requests: Receiver<Subscription>) {
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
                            Ok(change) => self.note(&change),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
            }
        }
    }

    fn note(&mut self, change: &Subscription) {
        match change {
            Subscription::Subscribe { room, generation } => {
                self.desired.insert(room.clone(), *generation);
            }
            Subscription::Unsubscribe { room } => {
                self.desired.remove(room);
            }
        }
    }

    /// One connection's life; `Ok` only when asked to stop.
    fn session(
        &mut self,
        requests: &Receiver<Subscription>,
        backoff: &mut Backoff,
    ) -> Result<(), RedisError> {
        let mut connection = connect(&self.client, SUBSCRIBER_POLL)?;
        let mut pubsub = connection.as_pubsub();
        pubsub.subscribe(USERS_CHANNEL)?;
        pubsub.subscribe(self.wake.as_str())?;
        // Requests that came while connecting are part of the first subscription.
        loop {
            match requests.try_recv() {
                Ok(change) => self.note(&change),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
        let rooms: Vec<(String, u64)> = self
            .desired
            .iter()
            .map(|(room, generation)| (room.clone(), *generation))
            .collect();
        for (room, _) in &rooms {
            pubsub.subscribe(commands::room_channel(room))?;
        }
        self.confirm(&rooms);
        backoff.reset();
        info!("redis: subscriber up ({} room channel(s))", rooms.len());
        self.to_loop.send(Event::SubscriberLink(true));
        let result = self.listen(&mut pubsub, requests);
        self.to_loop.send(Event::SubscriberLink(false));
        if let Err(error) = &result {
            warn!("redis: subscriber connection lost: {error}");
        }
        result
    }

    fn confirm(&self, rooms: &[(String, u64)]) {
        if let Ok(mut subscribed) = self.subscribed.rooms.lock() {
            for (room, generation) in rooms {
                subscribed.insert(room.clone(), *generation);
            }
        }
        self.subscribed.changed.notify_all();
    }

    fn listen(
        &mut self,
        pubsub: &mut redis::PubSub<'_>,
        requests: &Receiver<Subscription>,
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
        requests: &Receiver<Subscription>,
    ) -> Result<(), RedisError> {
        loop {
            let change = match requests.try_recv() {
                Ok(change) => change,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    self.stop.store(true, Ordering::Release);
                    return Ok(());
                }
            };
            self.note(&change);
            match change {
                Subscription::Subscribe { room, generation } => {
                    pubsub.subscribe(commands::room_channel(&room))?;
                    self.confirm(&[(room, generation)]);
                }
                Subscription::Unsubscribe { room } => {
                    if let Ok(mut subscribed) = self.subscribed.rooms.lock() {
                        subscribed.remove(&room);
                    }
                    pubsub.unsubscribe(commands::room_channel(&room))?;
                }
            }
        }
    }

    fn deliver(&self, message: &redis::Msg) {
        let channel = message.get_channel_name();
        let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) else {
            return;
        };
        if let Some(room) = channel.strip_prefix(commands::ROOM_CHANNEL_PREFIX) {
            if let Some(item) = commands::parse_room_item(payload, &self.process) {
                self.to_loop.send(Event::Room {
                    room: room.to_string(),
                    item,
                });
            }
        } else if channel == USERS_CHANNEL
            && let Some((user_id, item)) = commands::parse_user_item(payload)
        {
            self.to_loop.send(Event::User { user_id, item });
        }
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
