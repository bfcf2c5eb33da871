//! With `--redis`: handing the hub's commands to the bridge threads and
//! their events back to the hub.

use std::time::{Duration, Instant};

use super::server::EventLoop;
use crate::backplane::redis::RedisBackplane;
use crate::backplane::redis::bridge::Wake;
use crate::backplane::redis::commands::{Event, Outgoing};
use crate::hub::Millis;

/// The bridge threads wake the loop through its poll's one waker, the one
/// the other loops' mail uses too.
impl Wake for std::sync::Arc<mio::Waker> {
    fn wake(&self) {
        // A failed wake leaves the events for the next poll, at most a
        // poll timeout later: nothing is lost.
        let _ = mio::Waker::wake(self);
    }
}

/// Most bridge events handled in one loop iteration; the rest wait for the next.
const MAX_BRIDGE_EVENTS: usize = 8192;

/// How long a shutdown waits for the bridge to take the node out of presence.
const BRIDGE_STOP_WAIT: Duration = Duration::from_millis(400);

impl EventLoop {
    /// Handles what the bridge threads reported.
    pub(super) fn drain_bridge(&mut self, now: Millis) {
        let Some(bridge) = &self.bridge else {
            return;
        };
        bridge.notifier.rearm();
        self.bridge_backlog = false;
        for _ in 0..MAX_BRIDGE_EVENTS {
            let Some(bridge) = &self.bridge else {
                return;
            };
            let Ok(event) = bridge.events.try_recv() else {
                self.hub.backplane_changed(now);
                return;
            };
            if let Some(redis) = self.hub.backplane_mut::<RedisBackplane>() {
                redis.on_event(event, now);
            }
        }
        self.hub.backplane_changed(now);
        self.bridge_backlog = true;
    }

    /// Hands what the hub decided to send to Redis to the bridge threads.
    pub(super) fn send_to_bridge(&mut self) {
        let Some(bridge) = &self.bridge else {
            return;
        };
        if let Some(redis) = self.hub.backplane_mut::<RedisBackplane>() {
            redis.take_outgoing(&mut self.outgoing);
        }
        for outgoing in self.outgoing.drain(..) {
            match outgoing {
                Outgoing::Command(command) => bridge.command(command),
                Outgoing::Subscription(change) => bridge.subscription(change),
            }
        }
    }

    /// At exit: take the node out of presence (bounded wait), stop the threads.
    pub(super) fn stop_bridge(&mut self) {
        if self.bridge.is_none() {
            return;
        }
        self.hub.shutdown_backplane();
        self.send_to_bridge();
        let Some(bridge) = &self.bridge else {
            return;
        };
        let until = Instant::now() + BRIDGE_STOP_WAIT;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match bridge.events.recv_timeout(left) {
                Ok(Event::Stopped) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        // The process stops the bridge's threads once every loop is done.
    }
}
