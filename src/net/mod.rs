//! The I/O shell: the only code that touches sockets, the clock and signals.
//!
//! One `mio::Poll` per event loop drives everything on that loop. Sockets
//! are registered once, edge-triggered, for both readiness kinds; reads go
//! until `WouldBlock` or a short read (the receive queue was empty: new data
//! raises a new edge), or until the connection's turn is used up (it is read
//! on next iteration); a connection with queued bytes is written once at the
//! end of each event batch, as much as the socket takes. The decisions are
//! made elsewhere: [`crate::http`] answers request heads, tungstenite parses
//! frames, [`crate::ws::close`] maps a bad frame to its close code, and the
//! [`crate::hub::Hub`] decides what every connection is sent.
//!
//! One file per part of the work: `process` (one listener, N loops on N
//! threads), [`server`] (one loop's state and the loop itself), `peers`
//! (the mail between loops), `accept`, `connection` (what the loop keeps per
//! socket and the shared read buffer), `http_exchange` (request heads and
//! plain answers), `websocket` (frames in, closes out), `flushing`,
//! `lifecycle` (deadlines and freeing), `shutdown` (signals and the drain),
//! `persistence` (`--state-file`) and `bridge_link` (the Redis threads).

mod accept;
mod bridge_link;
mod connection;
mod flushing;
mod http_exchange;
mod lifecycle;
mod peers;
mod persistence;
mod process;
pub mod server;
mod shutdown;
mod transport;
mod websocket;

pub use accept::{ACCEPT_PAUSE_MS, AcceptPause, Outage};
pub use process::Server;
pub use server::{ServerError, report};
pub use transport::{TlsError, load_tls};
