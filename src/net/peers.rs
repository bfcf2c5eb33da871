//! The loops of one process and what they send each other: room traffic
//! and requests (for [`LoopsBackplane`]), accepted sockets, the drain, and
//! the figures behind `/metrics`.
//!
//! Mail for a loop is gathered during an iteration and sent at its end as
//! one batch per destination, with at most one wake per destination: a fan
//! out to members on three loops costs three channel sends and three wakes
//! per iteration, however many messages it carried. Nothing here takes a
//! lock per delivery.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use log::debug;
use mio::net::TcpStream;

use super::persistence::Keeper;
use super::server::EventLoop;
use crate::backplane::loops::{LoopMessage, LoopsBackplane, RoomHomes};
use crate::http;
use crate::hub::{ConnectionView, Millis, user_answer};
use crate::metrics::Metrics;
use crate::webhook::Webhooks;

/// What the loops of a process share.
pub struct Shared {
    /// Upgraded WebSocket connections in the process (`--max-connections`
    /// counts the whole process, §12).
    pub connections: AtomicUsize,
    /// Which loop holds each room's authority.
    pub homes: Arc<RoomHomes>,
    /// Every loop's mailbox, by index.
    pub peers: Vec<Peer>,
    /// `--state-file`: every loop's rooms and the writer thread.
    pub keeper: Option<Mutex<Keeper>>,
    /// Open connections of each user on the node (`--max-connections-per-user`,
    /// §14.4): taken at the upgrade, given back at the close.
    pub per_user: Mutex<std::collections::HashMap<Box<str>, usize>>,
    /// `--tls-cert`/`--tls-key`: the configuration new connections use,
    /// replaced when SIGHUP reloads the files.
    pub tls: Option<Mutex<Arc<rustls::ServerConfig>>>,
    /// Every room's options by namespace (§14.1), for every loop and the bridge.
    pub namespaces: Arc<crate::hub::Namespaces>,
    /// `--webhook-url` (§14.2): the process's one webhook sender.
    pub webhooks: Option<Webhooks>,
    /// When the drain began (Unix ms; 0 before any): the webhook sender's
    /// deadline at exit is counted from it.
    pub drain_started: AtomicU64,
}

impl Shared {
    /// The TLS configuration for a new connection, when TLS is on.
    pub fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let tls = self.tls.as_ref()?;
        Some(Arc::clone(
            &tls.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    /// Takes one of `--max-connections` slots; false when none is left.
    pub fn reserve_connection(&self, max: usize) -> bool {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .is_ok()
    }

    /// Takes one of the user's `max` slots (0: no limit); false when the
    /// user has `max` connections open already.
    pub fn reserve_user(&self, user: &str, max: usize) -> bool {
        if max == 0 {
            return true;
        }
        let mut per_user = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        let open = per_user.entry(user.into()).or_insert(0);
        if *open >= max {
            return false;
        }
        *open += 1;
        true
    }

    /// Gives one of the user's slots back.
    pub fn release_user(&self, user: &str) {
        let mut per_user = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = per_user.get_mut(user) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                per_user.remove(user);
            }
        }
    }

    /// Gives a slot back.
    pub fn release_connection(&self) {
        let _ = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                Some(open.saturating_sub(1))
            });
    }
}

/// A loop's mailbox, as the other loops see it.
pub struct Peer {
    /// Batches of mail.
    pub sender: Sender<Vec<LoopMail>>,
    /// Wakes the loop's poll.
    pub waker: Arc<mio::Waker>,
    /// Set while a wake is pending: the loop has not drained its inbox
    /// since, so another wake would be wasted.
    pub woken: Arc<AtomicBool>,
}

/// What one loop sends another.
#[derive(Debug)]
pub enum LoopMail {
    /// For the rooms backplane.
    Rooms(LoopMessage),
    /// An accepted connection for this loop to serve.
    Adopt(TcpStream, SocketAddr),
    /// A signal came: drain over the window that started then.
    Drain {
        /// When loop 0 got the signal.
        started: Millis,
    },
    /// Send your counters to loop `from` for its answer `ticket`.
    StatsAsk {
        /// The asking loop.
        from: usize,
        /// The asking loop's ticket.
        ticket: u64,
    },
    /// Send the user's connections to loop `from` for its answer `ticket`
    /// (`/api/users/{user}`, §14.3).
    UserAsk {
        /// The asking loop.
        from: usize,
        /// The asking loop's ticket.
        ticket: u64,
        /// The user id.
        user: Box<str>,
    },
    /// A loop's connections of the user, for a gathered answer.
    UserReply {
        /// The ticket asked with.
        ticket: u64,
        /// The user's connections on that loop.
        connections: Vec<ConnectionView>,
    },
    /// A loop's counters for a gathered answer.
    StatsReply {
        /// The ticket asked with.
        ticket: u64,
        /// The loop's counters.
        metrics: Box<Metrics>,
        /// Rooms the loop counts as occupied.
        rooms: usize,
    },
}

/// `/metrics` or `/api/stats` waiting for the other loops' counters.
pub struct StatsGather {
    /// Loops yet to answer.
    pub left: usize,
    /// The sum so far.
    pub metrics: Metrics,
    /// Occupied rooms so far.
    pub rooms: usize,
    /// Prometheus text (true) or JSON.
    pub prometheus: bool,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
}

/// `/api/users/{user}` waiting for the other loops' connections.
pub struct UserGather {
    /// Loops yet to answer.
    pub left: usize,
    /// The user id.
    pub user: Box<str>,
    /// The connections so far.
    pub connections: Vec<ConnectionView>,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
}

impl EventLoop {
    /// The loop count of the process.
    pub(super) fn loop_count(&self) -> usize {
        self.shared.peers.len()
    }

    /// Queues mail for loop `to`; sent at the end of the iteration.
    pub(super) fn mail(&mut self, to: usize, mail: LoopMail) {
        if let Some(box_) = self.outbox.get_mut(to) {
            box_.push(mail);
        }
    }

    /// Sends the iteration's mail: one batch and at most one wake per loop.
    pub(super) fn send_to_loops(&mut self) {
        // A buffer kept across iterations: no allocation per batch of mail.
        let mut outgoing = std::mem::take(&mut self.room_mail);
        if let Some(loops) = self.hub.backplane_mut::<LoopsBackplane>() {
            loops.take_outgoing(&mut outgoing);
        }
        for (to, message) in outgoing.drain(..) {
            self.mail(to, LoopMail::Rooms(message));
        }
        self.room_mail = outgoing;
        for (to, batch) in self.outbox.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let Some(peer) = self.shared.peers.get(to) else {
                batch.clear();
                continue;
            };
            // A loop that has already stopped takes no more mail.
            if peer.sender.send(std::mem::take(batch)).is_ok()
                && !peer.woken.swap(true, Ordering::AcqRel)
            {
                let _ = peer.waker.wake();
            }
        }
    }

    /// Reads the mail the other loops sent.
    pub(super) fn drain_inbox(&mut self, now: Millis) {
        if let Some(me) = self.shared.peers.get(self.index) {
            // Mail sent from now on wakes the loop again.
            me.woken.store(false, Ordering::Release);
        }
        let mut rooms = false;
        while let Ok(batch) = self.inbox.try_recv() {
            for mail in batch {
                rooms |= self.on_mail(mail, now);
            }
        }
        if rooms {
            self.hub.backplane_changed(now);
        }
    }

    /// One piece of mail; true when the rooms backplane took it.
    fn on_mail(&mut self, mail: LoopMail, now: Millis) -> bool {
        match mail {
            LoopMail::Rooms(message) => {
                if let Some(loops) = self.hub.backplane_mut::<LoopsBackplane>() {
                    loops.on_message(message, now);
                }
                return true;
            }
            LoopMail::Adopt(socket, peer) => self.adopt(socket, peer, now),
            LoopMail::Drain { started } => self.begin_drain(started, now),
            LoopMail::StatsAsk { from, ticket } => {
                let metrics = Box::new(self.hub.metrics().clone());
                let rooms = self.gauges().rooms;
                self.mail(
                    from,
                    LoopMail::StatsReply {
                        ticket,
                        metrics,
                        rooms,
                    },
                );
            }
            LoopMail::StatsReply {
                ticket,
                metrics,
                rooms,
            } => self.stats_replied(ticket, &metrics, rooms),
            LoopMail::UserAsk { from, ticket, user } => {
                let connections = self.hub.connections_of(&user);
                self.mail(
                    from,
                    LoopMail::UserReply {
                        ticket,
                        connections,
                    },
                );
            }
            LoopMail::UserReply {
                ticket,
                connections,
            } => self.user_replied(ticket, connections),
        }
        false
    }

    /// `/metrics` or `/api/stats` with N loops: asks every other loop for
    /// its counters; the answer goes out when all have answered.
    pub(super) fn gather_stats(&mut self, serial: u64, prometheus: bool, keep_alive: bool) {
        let gauges = self.gauges();
        let gather = StatsGather {
            left: self.loop_count().saturating_sub(1),
            metrics: self.hub.metrics().clone(),
            rooms: gauges.rooms,
            prometheus,
            keep_alive,
        };
        self.stats_gathers.insert(serial, gather);
        let me = self.index;
        for to in (0..self.loop_count()).filter(|&to| to != me) {
            let from = self.index;
            self.mail(
                to,
                LoopMail::StatsAsk {
                    from,
                    ticket: serial,
                },
            );
        }
    }

    /// `/api/users/{user}` with N loops: asks every other loop for the
    /// user's connections; the answer goes out when all have answered.
    pub(super) fn gather_user(&mut self, serial: u64, user: &str, keep_alive: bool) {
        let gather = UserGather {
            left: self.loop_count().saturating_sub(1),
            user: user.into(),
            connections: self.hub.connections_of(user),
            keep_alive,
        };
        self.user_gathers.insert(serial, gather);
        let me = self.index;
        for to in (0..self.loop_count()).filter(|&to| to != me) {
            self.mail(
                to,
                LoopMail::UserAsk {
                    from: me,
                    ticket: serial,
                    user: user.into(),
                },
            );
        }
    }

    fn user_replied(&mut self, ticket: u64, connections: Vec<ConnectionView>) {
        let Some(gather) = self.user_gathers.get_mut(&ticket) else {
            return;
        };
        gather.connections.extend(connections);
        gather.left = gather.left.saturating_sub(1);
        if gather.left > 0 {
            return;
        }
        let Some(gather) = self.user_gathers.remove(&ticket) else {
            return;
        };
        let json = user_answer(&gather.user, gather.connections, self.hub.node_id());
        let response = http::response_with(
            200,
            "application/json",
            json.as_bytes(),
            &[],
            gather.keep_alive,
        );
        self.plain_answers.push((ticket, response));
    }

    fn stats_replied(&mut self, ticket: u64, metrics: &Metrics, rooms: usize) {
        let Some(gather) = self.stats_gathers.get_mut(&ticket) else {
            return;
        };
        gather.metrics.merge(metrics);
        gather.rooms += rooms;
        gather.left = gather.left.saturating_sub(1);
        if gather.left > 0 {
            return;
        }
        let Some(gather) = self.stats_gathers.remove(&ticket) else {
            return;
        };
        let mut gauges = self.gauges();
        gauges.rooms = gather.rooms;
        let response = if gather.prometheus {
            let text = gather.metrics.prometheus(gauges);
            http::response_with(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                text.as_bytes(),
                &[],
                gather.keep_alive,
            )
        } else {
            let json = gather.metrics.stats_json(gauges);
            http::response_with(
                200,
                "application/json",
                json.as_bytes(),
                &[],
                gather.keep_alive,
            )
        };
        debug!("loop {}: stats gathered for request {ticket}", self.index);
        self.plain_answers.push((ticket, response));
    }
}
