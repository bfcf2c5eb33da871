//! What the rules' unit tests share, whichever backplane they run over
//! (the hub's own suite, the fake loops, the Redis backplane): a
//! configuration and the frames a connection was sent.

use std::sync::Arc;

use serde_json::Value;

use super::{ConnId, Hub, HubConfig, Namespaces};
use crate::auth::Verifier;
use crate::outbound::Marks;

/// The token secret of [`config`].
pub(crate) const SECRET: &[u8] = b"secret";

/// The flags' defaults, but three rooms per connection, no heartbeats (the
/// tests move the clock by minutes; heartbeats have their own tests) and no
/// rate limit.
pub(crate) fn config() -> HubConfig {
    HubConfig {
        namespaces: Arc::new(Namespaces::none(100)),
        max_rooms_per_connection: 3,
        typing_timeout_ms: 6000,
        heartbeat_ms: 0,
        pong_timeout_ms: 10_000,
        rate_limit: 0,
        rate_burst: 100,
        marks: Marks {
            soft: 256 * 1024,
            hard: 4 * 1024 * 1024,
        },
        verifier: Verifier::new(SECRET),
        webhooks: None,
    }
}

/// Splits server bytes into text frames (unmasked, final, 7-bit / 16-bit /
/// 64-bit lengths) and returns each payload as text; heartbeat pings are
/// skipped.
pub(crate) fn split_frames(mut bytes: &[u8]) -> Vec<String> {
    let mut payloads = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 2, "truncated frame header");
        if bytes[0] == 0x89 {
            // A heartbeat ping: not an application frame.
            assert_eq!(bytes[1], 0, "pings carry no payload");
            bytes = &bytes[2..];
            continue;
        }
        assert_eq!(bytes[0], 0x81, "a final, unfragmented text frame");
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (header, len) = match bytes[1] {
            126 => (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
            127 => {
                let len = u64::from_be_bytes(bytes[2..10].try_into().unwrap());
                (10, usize::try_from(len).unwrap())
            }
            n => (2, usize::from(n)),
        };
        assert!(bytes.len() >= header + len, "truncated frame payload");
        let payload = std::str::from_utf8(&bytes[header..header + len]).expect("UTF-8 text");
        payloads.push(payload.to_owned());
        bytes = &bytes[header + len..];
    }
    payloads
}

/// Everything queued to `conn`, parsed, and the queue cleared (as if
/// written); nothing for a connection that is gone.
pub(crate) fn take_frames(hub: &mut Hub, conn: ConnId) -> Vec<Value> {
    let Some(queue) = hub.outbound_mut(conn) else {
        return Vec::new();
    };
    let bytes = queue.to_vec();
    queue.clear();
    split_frames(&bytes)
        .iter()
        .map(|text| serde_json::from_str(text).expect("a frame holds one JSON value"))
        .collect()
}

/// Each frame's `type` (`?` for a frame without one).
pub(crate) fn kinds(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|frame| frame["type"].as_str().unwrap_or("?").to_string())
        .collect()
}
