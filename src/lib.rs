//! roomcast: a single-binary WebSocket rooms server on a hand-rolled `mio` event loop.
//!
//! The crate is a sans-IO core with a thin I/O shell: [`handshake`], [`auth`],
//! [`protocol`], [`hub`] and [`outbound`] take bytes or events and return bytes
//! or decisions; [`server`] is the only module that touches sockets.

#![warn(missing_docs)]

pub mod accept_pause;
pub mod assets;
pub mod auth;
pub mod bridge;
pub mod cluster;
pub mod config;
pub mod handshake;
pub mod hub;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod server;
pub mod state;
pub mod timers;
