//! The HTTP side of a connection, sans-IO: one request head in, one decision out.
//!
//! Everything that can refuse a client is decided here, before any `101`, so a
//! rejected request never reaches the message loop (PROTOCOL §2). The module is
//! sans-IO — it reads bytes and returns bytes, and the time comes in through
//! [`Policy`] — which keeps every rule of PROTOCOL §11 "Handshake" testable
//! without sockets, and lets the event loop call [`decide`] again after every
//! read without any parser state to carry.
//!
//! `request` parses the head and walks it through the steps, `route` is the
//! route table, `api` the server API's checks, `query` reads the query and
//! cookies, `response` renders answers; the upgrade checks of a WebSocket
//! endpoint live in [`crate::ws`]. Where the contract leaves room, the choices
//! are listed in `docs/decisions.md` ("HTTP and handshake").

mod api;
mod query;
mod request;
mod response;
mod route;

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

pub use crate::ws::{Endpoint, TokenCheck};
pub use request::{Decision, HttpRoute, MAX_HEAD_BYTES, Policy, RejectReason, decide};
pub(crate) use response::{response, response_with};

// The helpers the upgrade checks in `ws` share with the plain endpoints.
pub(crate) use query::{cookie, percent_decode, query_param};
pub(crate) use request::{first_header, header_lines, list_has_token};
pub(crate) use response::{refusal, reject, reject_with};
