//! Accepting connections, and pausing while the process is out of file
//! descriptors.
//!
//! When `accept` fails with EMFILE/ENFILE the pending connections stay in the
//! kernel's backlog; retrying at once would spin, so accepting pauses and is
//! retried every [`ACCEPT_PAUSE_MS`]. An outage is logged twice, when it
//! starts and when accepting works again (with the attempts refused
//! meanwhile), never once per retry: at the file limit a retry every 100 ms
//! would otherwise fill the log.

use std::io;
use std::net::SocketAddr;

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};

use super::connection::{Connection, Phase};
use super::peers::LoopMail;
use super::server::{EventLoop, ServerTimer};
use super::transport::Transport;
use crate::hub::Millis;
use crate::outbound::OutboundQueue;

/// Linux `EMFILE` and `ENFILE`: the process or the system is out of file descriptors.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

fn is_out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(EMFILE | ENFILE))
}

/// The kernel caps this at `net.core.somaxconn` (4096 on current Linux).
const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listener with a deep accept backlog: std and mio listen with
/// 128, which overflows (and makes clients wait for SYN retransmits) when a
/// thousand clients reconnect at once after a restart.
pub(super) fn listen(address: SocketAddr) -> io::Result<TcpListener> {
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

/// How long accepting pauses after EMFILE/ENFILE before the next attempt.
pub const ACCEPT_PAUSE_MS: Millis = 100;

/// The pause state of one listener.
#[derive(Debug, Default)]
pub struct AcceptPause {
    /// When the next attempt may run, while paused.
    paused_until: Option<Millis>,
    /// The outage under way: when it started and how many attempts failed.
    outage: Option<Outage>,
}

/// An outage that has ended, for the log line that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When the first attempt failed.
    pub since: Millis,
    /// Attempts that failed for want of descriptors, the first included.
    pub refused: u64,
}

impl AcceptPause {
    /// Whether accepting must wait at `now`.
    pub fn is_paused(&self, now: Millis) -> bool {
        self.paused_until.is_some_and(|until| now < until)
    }

    /// When the loop must wake to retry, while paused.
    pub fn resume_at(&self) -> Option<Millis> {
        self.paused_until
    }

    /// Whether a pause has run out at `now`, so the loop should retry.
    pub fn is_due(&self, now: Millis) -> bool {
        self.paused_until.is_some_and(|until| now >= until)
    }

    /// An attempt failed for want of descriptors. True when this starts an
    /// outage (the moment to log it).
    pub fn refused(&mut self, now: Millis) -> bool {
        self.paused_until = Some(now.saturating_add(ACCEPT_PAUSE_MS));
        match &mut self.outage {
            Some(outage) => {
                outage.refused += 1;
                false
            }
            None => {
                self.outage = Some(Outage {
                    since: now,
                    refused: 1,
                });
                true
            }
        }
    }

    /// An attempt got past the descriptor limit (a connection, or an empty
    /// backlog). Returns the outage this ends, if any, to log.
    pub fn worked(&mut self) -> Option<Outage> {
        self.paused_until = None;
        self.outage.take()
    }
}

impl EventLoop {
    pub(super) fn accept(&mut self, now: Millis) {
        if self.accept_pause.is_paused(now) {
            return;
        }
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => {
                    self.accepting_works(now);
                    // Round-robin over the loops: each gets every N-th
                    // connection, whatever the 4-tuples hash to.
                    let target = self.next_target % self.loop_count().max(1);
                    self.next_target = self.next_target.wrapping_add(1);
                    if target == self.index {
                        self.adopt(socket, peer, now);
                    } else {
                        self.mail(target, LoopMail::Adopt(socket, peer));
                    }
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

    /// Starts serving an accepted connection on this loop: registered for
    /// both readiness kinds, its request head due within the handshake timeout.
    pub(super) fn adopt(&mut self, mut socket: TcpStream, peer: SocketAddr, now: Millis) {
        let _ = socket.set_nodelay(true);
        let entry = self.connections.vacant_entry();
        let key = entry.key();
        if let Err(error) = self.poll.registry().register(
            &mut socket,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("cannot register connection from {peer}: {error}");
            return;
        }
        let tls = self.shared.tls_config();
        let transport = match Transport::new(socket, tls.as_ref()) {
            Ok(transport) => transport,
            Err(error) => {
                warn!("cannot start TLS for {peer}: {error}");
                return;
            }
        };
        let deadline = now.saturating_add(self.args.handshake_timeout_ms);
        self.next_serial += 1;
        entry.insert(Connection {
            serial: self.next_serial,
            awaiting_api: None,
            read_again_queued: false,
            transport,
            phase: Phase::Http {
                head: Vec::new(),
                response: OutboundQueue::new(),
            },
            close_when_flushed: false,
            deadline: Some(deadline),
            freeing: false,
            counted: false,
            user_slot: None,
            peer,
        });
        self.timers.schedule(deadline, ServerTimer::Deadline(key));
    }

    /// Logs the end of an accept outage, once.
    pub(super) fn accepting_works(&mut self, now: Millis) {
        if let Some(outage) = self.accept_pause.worked() {
            info!(
                "accepting again after {} ms out of file descriptors; {} attempt(s) refused meanwhile",
                now.saturating_sub(outage.since),
                outage.refused
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_once_at_each_end() {
        let mut pause = AcceptPause::default();
        assert!(!pause.is_paused(0));
        assert_eq!(pause.worked(), None, "no outage, nothing to report");

        assert!(pause.refused(1_000), "the first refusal starts the outage");
        assert!(pause.is_paused(1_050));
        assert!(!pause.is_due(1_050));
        assert_eq!(pause.resume_at(), Some(1_100));
        assert!(pause.is_due(1_100));
        // Retries that fail again are counted, not reported.
        for retry in 1..=30 {
            assert!(!pause.refused(1_000 + retry * 100));
        }
        assert_eq!(
            pause.worked(),
            Some(Outage {
                since: 1_000,
                refused: 31
            })
        );
        assert!(!pause.is_paused(5_000));
        assert_eq!(pause.resume_at(), None);
        assert_eq!(pause.worked(), None, "reported once");
        assert!(pause.refused(9_000), "a later outage is a new one");
    }
}
