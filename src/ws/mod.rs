//! The WebSocket side of a connection, sans-IO.
//!
//! [`crate::http`] parses and routes a request head and hands a WebSocket
//! endpoint to `upgrade`: the upgrade checks and the `101`. [`close`] maps a
//! failed read to the contract's close code. Framing helpers belong here too.

pub mod close;
mod upgrade;

#[cfg(test)]
mod tests;

pub use upgrade::{Endpoint, TokenCheck};
pub(crate) use upgrade::{check_token, decide_upgrade};
