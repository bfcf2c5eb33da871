//! What the loop keeps per socket, and the read buffer every connection shares.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use tungstenite::protocol::WebSocketContext;

use super::peers::Shared;
use super::transport::Transport;
use crate::hub::Millis;
use crate::outbound::OutboundQueue;

/// How long a closing connection may take to flush its close frame and hang up.
pub(super) const CLOSE_LINGER_MS: Millis = 1000;

/// The loop's one socket read buffer, shared by every connection in turn.
const SHARED_INPUT_SIZE: usize = 64 * 1024;

/// Full socket reads one connection gets per loop iteration (256 KiB). A
/// client that sends faster than the loop parses never lets its socket run
/// dry, and reading it until it did kept the loop on it alone (a flood on
/// loopback with `--rate-limit 0` held one turn for 72 MB); the rest waits
/// for the next iteration, after everyone else's events.
const READS_PER_TURN: u32 = 4;

/// Where a connection is in its life.
pub(super) enum Phase {
    /// Reading a request head; `response` holds an answer being written.
    Http {
        head: Vec<u8>,
        response: OutboundQueue,
    },
    /// Speaking WebSocket; the outbound queue lives in the hub.
    WebSocket {
        context: Box<WebSocketContext>,
        echo: bool,
    },
    /// Everything was written and our side shut: read and discard until the
    /// peer hangs up, so unread bytes do not turn our close into a reset.
    Lingering,
}

pub(super) struct Connection {
    /// The socket, with TLS over it when the server has a certificate.
    pub(super) transport: Transport,
    pub(super) phase: Phase,
    /// Shut the write side once the queue is empty.
    pub(super) close_when_flushed: bool,
    /// When the connection is given up on, if a deadline is set.
    pub(super) deadline: Option<Millis>,
    /// Already scheduled to be freed at the end of the event batch.
    pub(super) freeing: bool,
    pub(super) peer: SocketAddr,
    /// Unique for the server's life: a server API answer finds its connection by it.
    pub(super) serial: u64,
    /// An API request waits for Redis (`Some(keep_alive)`); later requests wait behind it.
    pub(super) awaiting_api: Option<bool>,
    /// It holds one of `--max-connections` slots (an upgraded WebSocket).
    pub(super) counted: bool,
    /// The user whose `--max-connections-per-user` slot it holds.
    pub(super) user_slot: Option<Box<str>>,
    /// Its read turn was used up and it waits in `EventLoop::read_again`.
    pub(super) read_again_queued: bool,
}

impl Connection {
    /// Gives back the process-wide slots the session held (`--max-connections`,
    /// `--max-connections-per-user`); a second call gives back nothing.
    pub(super) fn release_slots(&mut self, shared: &Shared) {
        if std::mem::take(&mut self.counted) {
            shared.release_connection();
        }
        if let Some(user) = self.user_slot.take() {
            shared.release_user(&user);
        }
    }
}

/// Bytes read from one socket and not yet taken by its codec. One buffer
/// serves every connection in turn: a connection's read loop runs until the
/// socket would block, which happens only once this buffer is empty.
pub(super) struct SharedInput {
    pub(super) buffer: Box<[u8]>,
    pub(super) start: usize,
    pub(super) end: usize,
    /// The last `read` came back short: the socket's receive queue was
    /// empty then, and anything arriving later raises a new readiness edge,
    /// so asking again would only cost a syscall that says `WouldBlock`.
    pub(super) socket_drained: bool,
    /// Whether a short read may be trusted that way. Not when the event also
    /// said the peer hung up: no later edge would report the end of stream.
    pub(super) trust_short_reads: bool,
    /// Socket reads left in this connection's turn.
    pub(super) reads_left: u32,
    /// The turn ended with bytes possibly still in the socket: no readiness
    /// edge will come for them, so the loop must come back by itself.
    pub(super) turn_used_up: bool,
}

impl SharedInput {
    pub(super) fn new() -> Self {
        SharedInput {
            buffer: vec![0; SHARED_INPUT_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            socket_drained: false,
            trust_short_reads: false,
            reads_left: READS_PER_TURN,
            turn_used_up: false,
        }
    }

    /// Starts on another connection's socket; forgets what a previous one
    /// left (it was closing).
    pub(super) fn reset(&mut self, trust_short_reads: bool) {
        self.start = 0;
        self.end = 0;
        self.socket_drained = false;
        self.trust_short_reads = trust_short_reads;
        self.reads_left = READS_PER_TURN;
        self.turn_used_up = false;
    }

    /// Refills the buffer with one `read` from `socket`, within the turn's
    /// allowance. `WouldBlock` once the allowance is spent (`turn_used_up`
    /// says so) or a trusted short read said the socket is empty.
    pub(super) fn refill(&mut self, transport: &mut Transport) -> io::Result<usize> {
        if self.socket_drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.reads_left == 0 {
            self.turn_used_up = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.reads_left -= 1;
        self.start = 0;
        self.end = 0;
        let read = transport.read(&mut self.buffer)?;
        self.end = read;
        // The same rule as nginx's `ready = 0` and tokio's readiness
        // clearing after a short read: one syscall fewer per message.
        self.socket_drained = self.trust_short_reads
            && transport.trusts_short_reads()
            && read > 0
            && read < self.buffer.len();
        Ok(read)
    }
}

/// Reads from the socket, writes into the connection's outbound queue: tungstenite
/// parses frames from the first and its automatic replies land in the second, in
/// order with everything else, so only the loop ever writes to the socket.
pub(super) struct QueueStream<'a> {
    pub(super) transport: &'a mut Transport,
    pub(super) input: &'a mut SharedInput,
    pub(super) queue: &'a mut OutboundQueue,
}

impl Read for QueueStream<'_> {
    /// One `read` syscall fills the shared buffer; the codec's small reads
    /// are then copies from it.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let input = &mut *self.input;
        if input.start >= input.end {
            input.refill(self.transport)?;
        }
        let available = input.buffer.get(input.start..input.end).unwrap_or_default();
        let count = available.len().min(buf.len());
        if let (Some(target), Some(source)) = (buf.get_mut(..count), available.get(..count)) {
            target.copy_from_slice(source);
        }
        input.start += count;
        Ok(count)
    }
}

impl Write for QueueStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.queue.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
