//! SIGINT/SIGTERM: stop accepting, then drain every client over `--drain-ms`.

use std::sync::PoisonError;

use log::{error, info};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tungstenite::protocol::frame::coding::CloseCode;

use super::connection::Phase;
use super::peers::LoopMail;
use super::server::{EventLoop, ServerTimer};
use super::transport::load_tls;
use crate::hub::Millis;

/// The most a shutdown waits for clients to take their close frames.
pub(super) const SHUTDOWN_FLUSH_MS: Millis = 1500;

impl EventLoop {
    /// SIGINT/SIGTERM (taken by loop 0): every loop drains over the same
    /// window, which starts now.
    pub(super) fn on_signal(&mut self, now: Millis) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let (mut stop, mut reload) = (false, false);
        for signal in signals.pending() {
            stop |= signal == SIGINT || signal == SIGTERM;
            reload |= signal == SIGHUP;
        }
        if reload {
            self.reload_tls();
        }
        if !stop || self.shutting_down.is_some() {
            return;
        }
        let me = self.index;
        for to in (0..self.loop_count()).filter(|&to| to != me) {
            self.mail(to, LoopMail::Drain { started: now });
        }
        self.begin_drain(now, now);
    }

    /// SIGHUP: reads the certificate and key again. New connections use the
    /// new pair, open ones keep theirs; a pair that fails to load is logged
    /// and the old one kept (§13: the certificate-renewal path).
    fn reload_tls(&mut self) {
        let (Some(cert), Some(key), Some(current)) =
            (&self.args.tls_cert, &self.args.tls_key, &self.shared.tls)
        else {
            return;
        };
        match load_tls(cert, key) {
            Ok(config) => {
                *current.lock().unwrap_or_else(PoisonError::into_inner) = config;
                info!("SIGHUP: reloaded {} and {}", cert.display(), key.display());
            }
            Err(error) => error!("SIGHUP: {error}; keeping the certificate in use"),
        }
    }

    /// Stops accepting, then closes every client of this loop with 1001,
    /// one after another in random order spread evenly over the `--drain-ms`
    /// window that began at `started`, so that they do not all reconnect at
    /// once (§8, §11, §12: all loops share the window).
    pub(super) fn begin_drain(&mut self, started: Millis, now: Millis) {
        if self.shutting_down.is_some() {
            return;
        }
        // Every loop drains from the same start; the first to get here keeps it.
        let _ = self.shared.drain_started.compare_exchange(
            0,
            started,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
        info!(
            "loop {}: draining {} connection(s) over {} ms",
            self.index,
            self.hub.connection_count(),
            self.args.drain_ms
        );
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let drain_ms = self.args.drain_ms;
        self.shutting_down = Some(started + drain_ms + SHUTDOWN_FLUSH_MS);
        let mut websockets = Vec::new();
        let keys: Vec<usize> = self.connections.iter().map(|(key, _)| key).collect();
        for key in keys {
            let Some(connection) = self.connections.get(key) else {
                continue;
            };
            match connection.phase {
                Phase::WebSocket { .. } if !connection.close_when_flushed => websockets.push(key),
                // An idle keep-alive connection goes now; one with an answer
                // queued or owed (a publish that took effect) gets it first.
                Phase::Http { ref response, .. } if !connection.close_when_flushed => {
                    if response.is_empty() && connection.awaiting_api.is_none() {
                        self.schedule_free(key);
                    } else {
                        self.finish_http_after_answer(key);
                    }
                }
                _ => {}
            }
        }
        shuffle(&mut websockets);
        let count = websockets.len() as u64;
        for (index, key) in websockets.into_iter().enumerate() {
            let at = started + (index as u64).saturating_mul(drain_ms) / count.max(1);
            if at <= now {
                self.drain_close(key, now);
            } else {
                self.timers.schedule(at, ServerTimer::DrainClose(key));
            }
        }
    }

    /// A plain HTTP connection whose answer is queued or still owed closes
    /// once that answer is written, instead of being cut off by the drain.
    fn finish_http_after_answer(&mut self, key: usize) {
        if let Some(connection) = self.connections.get_mut(key) {
            if connection.awaiting_api.is_none() {
                connection.close_when_flushed = true;
            }
            self.http_dirty.push(key);
        }
    }

    pub(super) fn drain_close(&mut self, key: usize, now: Millis) {
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
}

/// Fisher–Yates with OS randomness: the drain order must not favour early connections.
fn shuffle(items: &mut [usize]) {
    for index in (1..items.len()).rev() {
        let other = random_below(index as u64 + 1) as usize;
        items.swap(index, other);
    }
}

fn random_below(bound: u64) -> u64 {
    if bound == 0 {
        return 0;
    }
    getrandom::u64().unwrap_or(0) % bound
}
