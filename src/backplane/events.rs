//! The webhook events a room's authority sees (PROTOCOL §14.2), written once
//! for the local loop, the home loop of N loops and the Redis bridge.
//!
//! Only the authority knows when a user is new to a room everywhere or gone
//! from it everywhere, so the events are raised where it decides, in the
//! order it decides: `room_occupied` before the `member_added` that caused
//! it, `member_removed` before the `room_vacated` it caused. Without
//! `--webhook-url` every call is one branch and builds nothing.

use crate::hub::Millis;
use crate::webhook::{Event, Webhooks};

/// Where a room's authority reports what the backend hears of.
#[derive(Clone, Default)]
pub struct RoomEvents {
    webhooks: Option<Webhooks>,
}

impl RoomEvents {
    /// Events go to `webhooks`, or nowhere.
    pub fn new(webhooks: Option<Webhooks>) -> Self {
        RoomEvents { webhooks }
    }

    /// Whether anyone listens (a `message` event is worth preparing).
    pub fn is_on(&self) -> bool {
        self.webhooks.is_some()
    }

    /// A user's first connection joined `room`, which now has `users` users.
    pub fn user_joined(&self, room: &str, user_json: &str, users: u64, now: Millis) {
        let Some(webhooks) = &self.webhooks else {
            return;
        };
        if users == 1 {
            webhooks.push(Event::room_occupied(room, now));
        }
        webhooks.push(Event::member_added(room, user_json, now));
    }

    /// A user's last connection left `room`, which now has `users` users.
    pub fn user_left(&self, room: &str, user_json: &str, users: u64, now: Millis) {
        let Some(webhooks) = &self.webhooks else {
            return;
        };
        webhooks.push(Event::member_removed(room, user_json, now));
        if users == 0 {
            webhooks.push(Event::room_vacated(room, now));
        }
    }

    /// A client message took `seq` in a room with `webhook_messages`.
    pub fn message(&self, room: &str, seq: u64, user_json: &str, content: &str, now: Millis) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.push(Event::message(room, seq, user_json, content, now));
        }
    }
}
