//! roomcast: a single-binary WebSocket rooms server on a hand-rolled `mio` event loop.
//!
//! The crate is a sans-IO core with a thin I/O shell: [`http`], [`auth`],
//! [`protocol`], [`hub`] and [`outbound`] take bytes or events and return bytes
//! or decisions; [`net`] is the only module that touches sockets.

#![warn(missing_docs)]

pub(crate) mod assets;
pub mod auth;
pub mod backplane;
pub mod config;
pub mod config_file;
pub mod http;
pub mod hub;
pub(crate) mod metrics;
pub mod net;
pub mod outbound;
pub mod protocol;
pub mod state;
pub(crate) mod timers;
pub mod webhook;
pub mod ws;
