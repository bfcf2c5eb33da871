//! The harness's WebSocket client: one mio `Poll` per thread, sockets bound to
//! spread source addresses, a hand-written upgrade request, and a frame parser
//! that hands text payloads to a [`Handler`] without copying them.
//!
//! Nothing here allocates per frame on the hot path: reads go into one 64 KiB
//! scratch buffer per thread; only a frame split across two reads is copied
//! (its head is kept in the connection's `rbuf`). Client frames are masked
//! with a per-connection key, as RFC 6455 requires.
//!
//! `wss://` adds a rustls session per connection, driven sans-IO by the same
//! loop: a socket read (ciphertext) is fed to rustls and the plaintext it
//! gives goes to the same parser; queued plaintext goes into rustls and its
//! ciphertext to the socket until the socket would block, and the next
//! writable event carries on. A plain `ws://` connection has no session and
//! takes exactly the path it took before.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

const SCRATCH: usize = 64 * 1024;
/// A server head larger than this is not an HTTP answer we understand.
const MAX_HEAD: usize = 16 * 1024;

/// Why a connection ended, as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// `connect` failed (refused, timed out, unreachable…).
    ConnectFailed(io::ErrorKind),
    /// The server answered the upgrade with something other than `101`.
    HttpStatus(u16),
    /// A close frame from the server, with its code (1005 when it had none).
    CloseFrame(u16),
    /// The socket reached end of file without a close frame.
    Eof,
    /// A read or write failed (reset, broken pipe…).
    Error(io::ErrorKind),
    /// We closed it (after our close frame, or abruptly).
    ByUs,
    /// The handler gave up on it (e.g. the upgrade took too long).
    TimedOut,
    /// TLS failed: the handshake (an untrusted certificate, a name the
    /// certificate does not hold) or a bad record. rustls's message.
    Tls(String),
}

impl Closed {
    /// A short label for counting reasons in reports.
    pub fn label(&self) -> String {
        match self {
            Closed::ConnectFailed(k) => format!("connect_failed:{k:?}"),
            Closed::HttpStatus(s) => format!("http_{s}"),
            Closed::CloseFrame(c) => format!("close_{c}"),
            Closed::Eof => "eof".into(),
            Closed::Error(k) => format!("error:{k:?}"),
            Closed::ByUs => "by_us".into(),
            Closed::TimedOut => "timed_out".into(),
            Closed::Tls(e) => format!("tls:{e}"),
        }
    }
}

/// What a workload does with connection events. Handlers only record what
/// they want to send; the worker loop sends it after the event batch, which
/// both satisfies the borrow checker and coalesces writes.
pub trait Handler {
    /// The server answered `101`.
    fn on_open(&mut self, id: usize, now: u64);
    /// One complete text (or binary) message.
    fn on_text(&mut self, id: usize, payload: &[u8], now: u64);
    /// The connection is gone; `id` may be reused after this batch.
    fn on_closed(&mut self, id: usize, why: Closed, now: u64);
    /// A paused connection (one we deliberately do not read) saw its peer
    /// hang up or reset.
    fn on_hangup(&mut self, _id: usize, _now: u64) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Upgrading,
    Open,
    /// We sent a close frame and wait for the server's.
    Closing,
}

pub struct Conn {
    stream: TcpStream,
    /// `wss://`: the connection's TLS session (None for `ws://`).
    tls: Option<Box<ClientConnection>>,
    pub state: State,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    mask: [u8; 4],
    frag: Vec<u8>,
    dirty: bool,
    paused: bool,
    hangup_seen: bool,
    /// When `connect` was called (process clock, ns).
    pub started_ns: u64,
    /// When we started closing (ns), for reaping.
    pub closing_ns: u64,
}

/// Target of every connection: a loopback address and the `Host` header,
/// and further nodes of a cluster when `--url` lists several.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host_header: String,
    /// Nodes after the first (`--url a,b,…`): connections are spread over
    /// all of them by user number, so each room has members on every node.
    pub others: Vec<(SocketAddr, String)>,
    /// `wss://` (every node alike): connections speak TLS.
    pub secure: bool,
    /// The TLS server name of each node, first node first: SNI (a DNS name
    /// only; rustls sends none for an IP address) and the name the
    /// certificate must hold.
    pub server_names: Vec<ServerName<'static>>,
    /// The client configuration for `wss://`, set by the caller from the
    /// trust flags (`--ca`, `--insecure-skip-verify`).
    pub tls: Option<Arc<ClientConfig>>,
}

impl Target {
    /// How many nodes connections are spread over.
    pub fn nodes(&self) -> usize {
        1 + self.others.len()
    }

    /// Node `index` (modulo the number of nodes): its address and `Host` header.
    pub fn node(&self, index: usize) -> (SocketAddr, &str) {
        match index % self.nodes() {
            0 => (self.addr, &self.host_header),
            n => self
                .others
                .get(n - 1)
                .map_or((self.addr, self.host_header.as_str()), |(addr, host)| {
                    (*addr, host.as_str())
                }),
        }
    }

    /// Node `index`'s TLS server name (modulo the number of nodes).
    pub fn server_name(&self, index: usize) -> ServerName<'static> {
        self.server_names[index % self.server_names.len()].clone()
    }
}

/// Parses `ws://HOST:PORT[/…]` or `wss://…`, or several of them separated
/// by commas (the nodes of a cluster, all of one scheme), and refuses every
/// host that is not loopback: this harness generates load and must never
/// point it anywhere else. A `wss://` target still needs its `tls` config.
pub fn parse_target(url: &str) -> Result<Target, String> {
    let mut nodes = url.split(',').map(|one| parse_one(one.trim()));
    let mut target = nodes.next().ok_or("empty --url")??;
    for node in nodes {
        let node = node?;
        if node.addr.is_ipv4() != target.addr.is_ipv4() {
            return Err("--url nodes must all be IPv4 or all IPv6".into());
        }
        if node.secure != target.secure {
            return Err("--url nodes must all be ws:// or all wss://".into());
        }
        target.others.push((node.addr, node.host_header));
        target.server_names.extend(node.server_names);
    }
    Ok(target)
}

fn parse_one(url: &str) -> Result<Target, String> {
    let (rest, secure) = if let Some(rest) = url.strip_prefix("ws://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("wss://") {
        (rest, true)
    } else {
        return Err(format!(
            "--url must start with ws:// or wss:// (got {url:?})"
        ));
    };
    let default_port = if secure { "443" } else { "80" };
    let hostport = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let end = v6.find(']').ok_or("bad IPv6 literal in --url")?;
        let port = v6[end + 1..].strip_prefix(':').unwrap_or(default_port);
        (&v6[..end], port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => (hostport, default_port),
        }
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port in --url {url:?}"))?;
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .map_err(|_| format!("--url host {host:?} is not an IP literal or localhost"))?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "refusing --url {url}: the harness only targets loopback addresses (127.0.0.0/8, localhost, ::1)"
        ));
    }
    // SNI and the certificate's name: the host as written (`localhost`),
    // an IP address as such.
    let server_name = if host.eq_ignore_ascii_case("localhost") {
        ServerName::try_from(host.to_ascii_lowercase())
            .map_err(|e| format!("--url host {host:?}: {e}"))?
    } else {
        ServerName::IpAddress(ip.into())
    };
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        host_header: hostport.to_string(),
        others: Vec::new(),
        secure,
        server_names: vec![server_name],
        tls: None,
    })
}

/// One thread's connections and event loop.
pub struct Net {
    poll: Poll,
    events: Events,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Ids freed during the current batch: reused only after it, so a stale
    /// event cannot reach a new connection.
    freed_in_batch: Vec<usize>,
    dirty: Vec<usize>,
    scratch: Box<[u8]>,
    /// `wss://`: plaintext out of rustls (empty for `ws://`).
    plain: Box<[u8]>,
    target: Target,
    sources: Vec<Ipv4Addr>,
    next_source: usize,
    rng: u64,
    live: usize,
    batch: Vec<(usize, bool, bool, bool)>,
}

/// Source addresses 127.0.0.1 … 127.0.0.N for spreading client sockets.
pub fn source_addrs(n: u32) -> Vec<Ipv4Addr> {
    (1..=n.clamp(1, 254))
        .map(|i| Ipv4Addr::new(127, 0, 0, i as u8))
        .collect()
}

impl Net {
    pub fn new(target: Target, sources: Vec<Ipv4Addr>, seed: u64) -> io::Result<Net> {
        Ok(Net {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            conns: Vec::new(),
            free: Vec::new(),
            freed_in_batch: Vec::new(),
            dirty: Vec::new(),
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            plain: vec![0u8; if target.secure { SCRATCH } else { 0 }].into_boxed_slice(),
            target,
            sources,
            next_source: 0,
            rng: seed | 1,
            live: 0,
            batch: Vec::with_capacity(1024),
        })
    }

    /// Connections that exist (any state).
    pub fn live(&self) -> usize {
        self.live
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: good enough for masks and nonces.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Starts a connection to `path_and_query` (e.g. `/ws?token=…`) on node
    /// `node` of the target (modulo its nodes). The upgrade request goes out
    /// once the TCP connection is established.
    pub fn connect(&mut self, path_and_query: &str, node: usize, now: u64) -> io::Result<usize> {
        let (addr, host) = self.target.node(node);
        let host = host.to_string();
        // The session first: its ClientHello waits in it for the socket.
        let tls = if self.target.secure {
            let config = self
                .target
                .tls
                .as_ref()
                .ok_or_else(|| io::Error::other("wss:// target without a TLS configuration"))?;
            Some(Box::new(crate::tls::connect(
                config,
                self.target.server_name(node),
            )?))
        } else {
            None
        };
        let stream = self.open_socket(addr)?;
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        let mut stream = stream;
        self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mask = (self.random() as u32).to_ne_bytes();
        let key = base64_16(&{
            let a = self.random().to_ne_bytes();
            let b = self.random().to_ne_bytes();
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&a);
            k[8..].copy_from_slice(&b);
            k
        });
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.conns[id] = Some(Conn {
            stream,
            tls,
            state: State::Connecting,
            rbuf: Vec::new(),
            wbuf: request.into_bytes(),
            wpos: 0,
            mask,
            frag: Vec::new(),
            dirty: false,
            paused: false,
            hangup_seen: false,
            started_ns: now,
            closing_ns: 0,
        });
        self.live += 1;
        Ok(id)
    }

    fn open_socket(&mut self, addr: SocketAddr) -> io::Result<TcpStream> {
        use socket2::{Domain, Socket, Type};
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::STREAM.nonblocking(), None)?;
        socket.set_tcp_nodelay(true)?;
        if addr.is_ipv4() && !self.sources.is_empty() {
            let src = self.sources[self.next_source % self.sources.len()];
            self.next_source = self.next_source.wrapping_add(1);
            // Let connect() pick the port per 4-tuple instead of bind()
            // reserving one per address: each source then has the whole
            // ephemeral range to itself.
            let one: libc::c_int = 1;
            // SAFETY: valid fd and a pointer to a c_int of the right size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            socket.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        // SAFETY: we own the fd and hand it over exactly once.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) };
        Ok(TcpStream::from_std(std_stream))
    }

    pub fn state(&self, id: usize) -> Option<State> {
        self.conns.get(id)?.as_ref().map(|c| c.state)
    }

    pub fn conn(&self, id: usize) -> Option<&Conn> {
        self.conns.get(id)?.as_ref()
    }

    /// Bytes queued for this connection that the kernel has not taken yet.
    pub fn backlog(&self, id: usize) -> usize {
        self.conn(id).map_or(0, |c| c.wbuf.len() - c.wpos)
    }

    /// Queues one text frame (masked). Returns false when the connection is
    /// not open.
    pub fn send_text(&mut self, id: usize, payload: &[u8]) -> bool {
        self.send_frame(id, 0x1, payload)
    }

    fn send_frame(&mut self, id: usize, opcode: u8, payload: &[u8]) -> bool {
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return false;
        };
        if conn.state != State::Open {
            return false;
        }
        write_frame(&mut conn.wbuf, opcode, payload, conn.mask);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(id);
        }
        true
    }

    /// Starts a clean close: our close frame (1000), then wait for the
    /// server's. The handler hears `on_closed(ByUs)` when it is done or when
    /// [`Net::reap_closing`] gives up.
    pub fn close_graceful(&mut self, id: usize, now: u64) {
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        if conn.state != State::Open {
            return;
        }
        write_frame(&mut conn.wbuf, 0x8, &1000u16.to_be_bytes(), conn.mask);
        conn.state = State::Closing;
        conn.closing_ns = now;
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Drops a connection at once, without telling the handler.
    pub fn drop_conn(&mut self, id: usize) {
        if let Some(slot) = self.conns.get_mut(id)
            && let Some(mut conn) = slot.take()
        {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            let _ = conn.stream.shutdown(Shutdown::Both);
            self.freed_in_batch.push(id);
            self.live -= 1;
        }
    }

    /// Closing connections whose server did not answer within `timeout_ns`
    /// are dropped and reported as closed by us.
    pub fn reap_closing<H: Handler>(&mut self, handler: &mut H, now: u64, timeout_ns: u64) {
        for id in 0..self.conns.len() {
            let expired = matches!(&self.conns[id], Some(c) if c.state == State::Closing && now.saturating_sub(c.closing_ns) > timeout_ns);
            if expired {
                self.drop_conn(id);
                handler.on_closed(id, Closed::ByUs, now);
            }
        }
    }

    /// Stops reading a connection (a stalled consumer). Hang-ups still reach
    /// the handler through `on_hangup`.
    pub fn pause(&mut self, id: usize) {
        if let Some(Some(c)) = self.conns.get_mut(id) {
            c.paused = true;
        }
    }

    /// Resumes reading a paused connection and reads what is waiting.
    pub fn resume<H: Handler>(&mut self, id: usize, handler: &mut H, now: u64) {
        if let Some(Some(c)) = self.conns.get_mut(id) {
            c.paused = false;
            // No readiness event to go by: read until `WouldBlock`.
            self.service_read(id, true, handler, now);
        }
    }

    /// The raw fd of a connection, for socket statistics.
    pub fn raw_fd(&self, id: usize) -> Option<i32> {
        self.conn(id).map(|c| c.stream.as_raw_fd())
    }

    /// One round of the event loop: wait up to `timeout`, service every
    /// event, then write everything queued.
    pub fn poll<H: Handler>(
        &mut self,
        handler: &mut H,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        self.flush_dirty(handler);
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let now = crate::sys::now_ns();
        // Events are copied out first so `self` can be borrowed mutably.
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        batch.extend(self.events.iter().map(|e| {
            (
                e.token().0,
                e.is_readable() || e.is_read_closed(),
                e.is_writable(),
                e.is_error() || e.is_read_closed(),
            )
        }));
        for &(id, readable, writable, hup) in &batch {
            self.service(id, readable, writable, hup, handler, now);
        }
        self.batch = batch;
        self.flush_dirty(handler);
        self.free.append(&mut self.freed_in_batch);
        Ok(())
    }

    fn service<H: Handler>(
        &mut self,
        id: usize,
        readable: bool,
        writable: bool,
        hup: bool,
        handler: &mut H,
        now: u64,
    ) {
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        if conn.state == State::Connecting {
            if let Ok(Some(e)) | Err(e) = conn.stream.take_error() {
                self.fail(id, handler, Closed::ConnectFailed(e.kind()), now);
                return;
            }
            match conn.stream.peer_addr() {
                Ok(_) => conn.state = State::Upgrading,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    if hup {
                        self.fail(
                            id,
                            handler,
                            Closed::ConnectFailed(io::ErrorKind::ConnectionRefused),
                            now,
                        );
                    }
                    return;
                }
                Err(e) => {
                    self.fail(id, handler, Closed::ConnectFailed(e.kind()), now);
                    return;
                }
            }
            // Send the upgrade request now.
            if !self.flush_one(id, handler, now) {
                return;
            }
        } else if writable && !self.flush_one(id, handler, now) {
            return;
        }
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        if conn.paused {
            if hup && !conn.hangup_seen {
                conn.hangup_seen = true;
                handler.on_hangup(id, now);
            }
            return;
        }
        if readable {
            self.service_read(id, hup, handler, now);
        }
    }

    fn fail<H: Handler>(&mut self, id: usize, handler: &mut H, why: Closed, now: u64) {
        self.drop_conn(id);
        handler.on_closed(id, why, now);
    }

    /// Writes what is queued; false when the connection died doing so.
    fn flush_one<H: Handler>(&mut self, id: usize, handler: &mut H, now: u64) -> bool {
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return false;
        };
        conn.dirty = false;
        if conn.state == State::Connecting {
            return true;
        }
        let written = match conn.tls.as_deref_mut() {
            None => write_plain(&mut conn.stream, &conn.wbuf, &mut conn.wpos),
            Some(tls) => write_tls(tls, &mut conn.stream, &conn.wbuf, &mut conn.wpos),
        };
        if let Err(e) = written {
            let closing = conn.state == State::Closing;
            let why = if closing {
                Closed::ByUs
            } else {
                Closed::Error(e.kind())
            };
            self.fail(id, handler, why, now);
            return false;
        }
        if conn.wpos == conn.wbuf.len() {
            conn.wbuf.clear();
            conn.wpos = 0;
            if conn.wbuf.capacity() > 1 << 20 {
                conn.wbuf.shrink_to(64 * 1024);
            }
        } else if conn.wpos > 1 << 20 {
            conn.wbuf.drain(..conn.wpos);
            conn.wpos = 0;
        }
        true
    }

    fn flush_dirty<H: Handler>(&mut self, handler: &mut H) {
        if self.dirty.is_empty() {
            return;
        }
        let now = crate::sys::now_ns();
        let dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            self.flush_one(id, handler, now);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn service_read<H: Handler>(&mut self, id: usize, hup: bool, handler: &mut H, mut now: u64) {
        loop {
            let Some(Some(conn)) = self.conns.get_mut(id) else {
                return;
            };
            if conn.paused {
                return;
            }
            let secure = conn.tls.is_some();
            let n = match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    let why = if conn.state == State::Closing {
                        Closed::ByUs
                    } else {
                        Closed::Eof
                    };
                    self.fail(id, handler, why, now);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = if conn.state == State::Closing {
                        Closed::ByUs
                    } else {
                        Closed::Error(e.kind())
                    };
                    self.fail(id, handler, why, now);
                    return;
                }
            };
            now = crate::sys::now_ns();
            let outcome = if secure {
                self.consume_tls(id, n, handler, now)
            } else {
                self.consume(id, n, handler, now)
            };
            match outcome {
                Outcome::Continue => {}
                Outcome::Close(why) => {
                    // Answer a server close frame before dropping the socket.
                    if let Some(Some(conn)) = self.conns.get_mut(id)
                        && conn.state == State::Open
                        && let Closed::CloseFrame(code) = why
                    {
                        let mut frame = Vec::with_capacity(8);
                        write_frame(&mut frame, 0x8, &code.to_be_bytes(), conn.mask);
                        conn.write_now(&frame);
                    }
                    let why = match (self.state(id), why) {
                        // A TLS close_notify (Eof) after our close frame
                        // is the end we asked for, as the socket's EOF is.
                        (Some(State::Closing), Closed::CloseFrame(_) | Closed::Eof) => Closed::ByUs,
                        (_, w) => w,
                    };
                    self.fail(id, handler, why, now);
                    return;
                }
            }
            if n < self.scratch.len() && !hup {
                // A short read drained the socket; epoll (edge-triggered)
                // reports the next arrival as a new event. Not when this
                // event also said the peer hung up: no later one will.
                // (With TLS too: every byte read went into rustls.)
                return;
            }
        }
    }

    /// Processes `n` fresh bytes in the scratch buffer for connection `id`.
    fn consume<H: Handler>(&mut self, id: usize, n: usize, handler: &mut H, now: u64) -> Outcome {
        let Net {
            conns,
            scratch,
            dirty,
            ..
        } = self;
        let Some(Some(conn)) = conns.get_mut(id) else {
            return Outcome::Continue;
        };
        consume_plaintext(id, &scratch[..n], conn, dirty, handler, now)
    }

    /// `wss://`: feeds `n` fresh bytes of ciphertext in the scratch buffer
    /// to connection `id`'s TLS session and hands the plaintext it yields to
    /// the parser, record by record. rustls takes a few KiB per `read_tls`,
    /// so the bytes go in over several rounds, each followed by
    /// `process_new_packets` and reading out the plaintext (which keeps
    /// rustls's received-plaintext buffer from filling). What rustls wants
    /// to send (handshake messages, an alert, our queued request once the
    /// handshake is done) goes out with the dirty connections after the
    /// event batch.
    fn consume_tls<H: Handler>(
        &mut self,
        id: usize,
        n: usize,
        handler: &mut H,
        now: u64,
    ) -> Outcome {
        let Net {
            conns,
            scratch,
            plain,
            dirty,
            ..
        } = self;
        let Some(Some(conn)) = conns.get_mut(id) else {
            return Outcome::Continue;
        };
        // Out of the connection while the parser borrows it; put back below.
        let Some(mut tls) = conn.tls.take() else {
            return Outcome::Continue;
        };
        let mut input: &[u8] = &scratch[..n];
        let outcome = 'feed: loop {
            loop {
                match tls.reader().read(plain) {
                    // close_notify, and nothing left to read.
                    Ok(0) => break 'feed Outcome::Close(Closed::Eof),
                    Ok(m) => {
                        if let Outcome::Close(why) =
                            consume_plaintext(id, &plain[..m], conn, dirty, handler, now)
                        {
                            break 'feed Outcome::Close(why);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => break 'feed Outcome::Close(Closed::Error(e.kind())),
                }
            }
            if input.is_empty() {
                break Outcome::Continue;
            }
            match tls.read_tls(&mut input) {
                // After close_notify rustls takes nothing more.
                Ok(0) => break Outcome::Continue,
                Ok(_) => {}
                Err(e) => break Outcome::Close(Closed::Error(e.kind())),
            }
            if let Err(e) = tls.process_new_packets() {
                // Send the alert rustls prepared, best effort.
                while tls.wants_write() {
                    if !matches!(tls.write_tls(&mut conn.stream), Ok(n) if n > 0) {
                        break;
                    }
                }
                break Outcome::Close(Closed::Tls(e.to_string()));
            }
            crate::tls::note_negotiated(&tls);
        };
        if (tls.wants_write() || conn.wpos < conn.wbuf.len()) && !conn.dirty {
            conn.dirty = true;
            dirty.push(id);
        }
        conn.tls = Some(tls);
        outcome
    }
}

/// Processes fresh plaintext (the socket's bytes, or rustls's) for `conn`:
/// the upgrade answer while upgrading, then frames.
fn consume_plaintext<H: Handler>(
    id: usize,
    fresh: &[u8],
    conn: &mut Conn,
    dirty: &mut Vec<usize>,
    handler: &mut H,
    now: u64,
) -> Outcome {
    if conn.state == State::Upgrading {
        conn.rbuf.extend_from_slice(fresh);
        let Some(end) = memchr::memmem::find(&conn.rbuf, b"\r\n\r\n") else {
            if conn.rbuf.len() > MAX_HEAD {
                return Outcome::Close(Closed::HttpStatus(0));
            }
            return Outcome::Continue;
        };
        let status = parse_status(&conn.rbuf[..end]);
        if status != 101 {
            return Outcome::Close(Closed::HttpStatus(status));
        }
        conn.rbuf.drain(..end + 4);
        conn.state = State::Open;
        handler.on_open(id, now);
        let buf = std::mem::take(&mut conn.rbuf);
        let (used, out) = parse_frames(id, &buf, conn, dirty, handler, now);
        conn.rbuf = buf;
        conn.rbuf.drain(..used);
        return out;
    }
    if conn.rbuf.is_empty() {
        let (used, out) = parse_frames(id, fresh, conn, dirty, handler, now);
        if used < fresh.len() {
            conn.rbuf.extend_from_slice(&fresh[used..]);
        }
        out
    } else {
        let mut buf = std::mem::take(&mut conn.rbuf);
        buf.extend_from_slice(fresh);
        let (used, out) = parse_frames(id, &buf, conn, dirty, handler, now);
        buf.drain(..used);
        if buf.capacity() > 1 << 20 && buf.len() < 64 * 1024 {
            buf.shrink_to(128 * 1024);
        }
        conn.rbuf = buf;
        out
    }
}

enum Outcome {
    Continue,
    Close(Closed),
}

/// Writes `wbuf[wpos..]` to the socket until done or it would block.
#[inline]
fn write_plain(stream: &mut TcpStream, wbuf: &[u8], wpos: &mut usize) -> io::Result<()> {
    while *wpos < wbuf.len() {
        match stream.write(&wbuf[*wpos..]) {
            Ok(0) => break,
            Ok(n) => *wpos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `wss://`: moves `wbuf[wpos..]` into rustls as far as it takes it (64 KiB
/// of ciphertext waiting at most; before the handshake is done, as much
/// plaintext, sent once it is) and writes rustls's ciphertext (handshake
/// messages included) to the socket until done or it would block. What
/// rustls does not take stays in `wbuf`, so [`Net::backlog`] still sees it;
/// the next writable event carries on.
fn write_tls(
    tls: &mut ClientConnection,
    stream: &mut TcpStream,
    wbuf: &[u8],
    wpos: &mut usize,
) -> io::Result<()> {
    loop {
        if *wpos < wbuf.len() {
            *wpos += tls.writer().write(&wbuf[*wpos..])?;
        }
        if !tls.wants_write() {
            return Ok(());
        }
        match tls.write_tls(stream) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

impl Conn {
    /// Sends `bytes` at once, outside the queue, best effort (the answer to
    /// a server's close frame, just before the socket is dropped).
    fn write_now(&mut self, bytes: &[u8]) {
        match self.tls.as_deref_mut() {
            None => {
                let _ = self.stream.write(bytes);
            }
            Some(tls) => {
                let _ = tls.writer().write_all(bytes);
                while tls.wants_write() {
                    if !matches!(tls.write_tls(&mut self.stream), Ok(n) if n > 0) {
                        break;
                    }
                }
            }
        }
    }
}

fn parse_status(head: &[u8]) -> u16 {
    // "HTTP/1.1 101 Switching Protocols"
    let line = head.split(|&b| b == b'\r').next().unwrap_or(b"");
    let mut parts = line.split(|&b| b == b' ');
    parts.next();
    parts
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Parses every complete frame in `buf`; returns the bytes used.
fn parse_frames<H: Handler>(
    id: usize,
    buf: &[u8],
    conn: &mut Conn,
    dirty: &mut Vec<usize>,
    handler: &mut H,
    now: u64,
) -> (usize, Outcome) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        if rest.len() < 2 {
            return (pos, Outcome::Continue);
        }
        let b0 = rest[0];
        let b1 = rest[1];
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let (len, mut hdr) = match b1 & 0x7f {
            126 => {
                if rest.len() < 4 {
                    return (pos, Outcome::Continue);
                }
                (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4)
            }
            127 => {
                if rest.len() < 10 {
                    return (pos, Outcome::Continue);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        let mask_key = if masked {
            if rest.len() < hdr + 4 {
                return (pos, Outcome::Continue);
            }
            let k = [rest[hdr], rest[hdr + 1], rest[hdr + 2], rest[hdr + 3]];
            hdr += 4;
            Some(k)
        } else {
            None
        };
        if rest.len() < hdr + len {
            return (pos, Outcome::Continue);
        }
        pos += hdr + len;
        let unmasked;
        let payload: &[u8] = match mask_key {
            None => &rest[hdr..hdr + len],
            Some(k) => {
                // Servers must not mask; tolerate it anyway.
                let mut v = rest[hdr..hdr + len].to_vec();
                apply_mask(&mut v, k);
                unmasked = v;
                &unmasked
            }
        };
        match opcode {
            0x1 | 0x2 => {
                if fin {
                    handler.on_text(id, payload, now);
                } else {
                    conn.frag.clear();
                    conn.frag.extend_from_slice(payload);
                }
            }
            0x0 => {
                conn.frag.extend_from_slice(payload);
                if fin {
                    let whole = std::mem::take(&mut conn.frag);
                    handler.on_text(id, &whole, now);
                }
            }
            0x8 => {
                let code = if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                };
                return (pos, Outcome::Close(Closed::CloseFrame(code)));
            }
            0x9 if conn.state == State::Open => {
                write_frame(&mut conn.wbuf, 0xA, payload, conn.mask);
                if !conn.dirty {
                    conn.dirty = true;
                    dirty.push(id);
                }
            }
            _ => {} // pong or reserved: ignore
        }
    }
}

/// Appends one masked client frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let len = payload.len();
    out.reserve(len + 14);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// XORs `data` with the repeating 4-byte key, eight bytes at a time.
#[inline]
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m32 = u32::from_ne_bytes(mask) as u64;
    let m64 = m32 | (m32 << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let v = u64::from_ne_bytes(b) ^ m64;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn base64_16(bytes: &[u8; 16]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Fields of a server JSON frame found by substring search, without parsing
/// the whole document (the hot path sees millions of frames per second).
pub mod scan {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;

    static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\""));
    /// How the harness's own content starts: `{"t":T,"k":K,"p":"…"}`.
    static CONTENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"{\"t\":"));
    static T: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"t\""));
    static K: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"k\""));
    static CODE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"code\""));

    /// Position just after `"key"` + optional spaces + `:` + optional spaces.
    fn value_at(hay: &[u8], finder: &Finder<'_>, from: usize) -> Option<usize> {
        let mut start = from;
        loop {
            let at = start + finder.find(&hay[start..])?;
            let mut i = at + finder.needle().len();
            while i < hay.len() && hay[i] == b' ' {
                i += 1;
            }
            if i < hay.len() && hay[i] == b':' {
                i += 1;
                while i < hay.len() && hay[i] == b' ' {
                    i += 1;
                }
                return Some(i);
            }
            start = at + 1;
        }
    }

    fn string_at(hay: &[u8], i: usize) -> Option<&[u8]> {
        if hay.get(i) != Some(&b'"') {
            return None;
        }
        let end = memchr::memchr(b'"', &hay[i + 1..])?;
        Some(&hay[i + 1..i + 1 + end])
    }

    fn u64_at(hay: &[u8], i: usize) -> Option<u64> {
        let mut v: u64 = 0;
        let mut any = false;
        for &b in &hay[i..] {
            if b.is_ascii_digit() {
                v = v.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
                any = true;
            } else {
                break;
            }
        }
        any.then_some(v)
    }

    /// The value of the first `"type"` key.
    #[inline]
    pub fn msg_type(frame: &[u8]) -> &[u8] {
        // Fast path: roomcast, node and Python all put "type" first.
        if let Some(rest) = frame.strip_prefix(b"{\"type\":\"")
            && let Some(end) = memchr::memchr(b'"', rest)
        {
            return &rest[..end];
        }
        value_at(frame, &TYPE, 0)
            .and_then(|i| string_at(frame, i))
            .unwrap_or(b"")
    }

    /// The send timestamp `"t"` and publisher `"k"` the harness put into the
    /// content; `k` is searched after `t` (it follows it in the content).
    pub fn t_and_k(frame: &[u8]) -> Option<(u64, u64)> {
        // The content as the harness wrote it (servers carry it verbatim).
        if let Some(at) = CONTENT.find(frame) {
            let t_at = at + CONTENT.needle().len();
            let t_end = t_at
                + frame[t_at..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
            if let (Some(t), Some(rest)) =
                (u64_at(frame, t_at), frame[t_end..].strip_prefix(b",\"k\":"))
                && let Some(k) = u64_at(rest, 0)
            {
                return Some((t, k));
            }
        }
        // Re-serialized (spaces after colons, other key order).
        let ti = value_at(frame, &T, 0)?;
        let t = u64_at(frame, ti)?;
        let ki = value_at(frame, &K, ti)?;
        Some((t, u64_at(frame, ki)?))
    }

    /// The last `"seq"` number, found from the end: every server writes it
    /// after the content (roomcast a few bytes before the end), and the
    /// harness's content has no such key.
    fn last_seq(frame: &[u8]) -> Option<u64> {
        let mut end = frame.len();
        while let Some(q) = memchr::memrchr(b'q', &frame[..end]) {
            if q >= 3 && &frame[q - 3..q] == b"\"se" && frame.get(q + 1) == Some(&b'"') {
                let mut i = q + 2;
                while frame.get(i) == Some(&b' ') {
                    i += 1;
                }
                if frame.get(i) == Some(&b':') {
                    i += 1;
                    while frame.get(i) == Some(&b' ') {
                        i += 1;
                    }
                    return u64_at(frame, i);
                }
            }
            end = q;
        }
        None
    }

    /// The `"seq"` number and [`t_and_k`] of a `message` frame. Searching
    /// each field from the start with a general substring search made the
    /// scans half of the harness's CPU at millions of deliveries per second.
    pub fn seq_t_and_k(frame: &[u8]) -> (Option<u64>, Option<(u64, u64)>) {
        (last_seq(frame), t_and_k(frame))
    }

    /// The `"code"` string of an `error` frame.
    pub fn error_code(frame: &[u8]) -> String {
        value_at(frame, &CODE, 0)
            .and_then(|i| string_at(frame, i))
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Numeric `"from_seq"`/`"to_seq"` of a `lagged` frame: the count of
    /// messages it reports missing.
    pub fn lagged_count(frame: &[u8]) -> u64 {
        let from = Finder::new(b"\"from_seq\"");
        let to = Finder::new(b"\"to_seq\"");
        let a = value_at(frame, &from, 0).and_then(|i| u64_at(frame, i));
        let b = value_at(frame, &to, 0).and_then(|i| u64_at(frame, i));
        match (a, b) {
            (Some(a), Some(b)) if b >= a => b - a + 1,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_roundtrip() {
        let mut v: Vec<u8> = (0..37).collect();
        let orig = v.clone();
        apply_mask(&mut v, [1, 2, 3, 4]);
        for (i, (a, b)) in v.iter().zip(&orig).enumerate() {
            assert_eq!(*a, b ^ [1, 2, 3, 4][i % 4]);
        }
        apply_mask(&mut v, [1, 2, 3, 4]);
        assert_eq!(v, orig);
    }

    #[test]
    fn frame_lengths() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            write_frame(&mut out, 1, &vec![b'a'; len], [0, 0, 0, 0]);
            let hdr = if len < 126 {
                2
            } else if len <= 65535 {
                4
            } else {
                10
            };
            assert_eq!(out.len(), hdr + 4 + len);
        }
    }

    #[test]
    fn scanning() {
        let f = br#"{"type":"message","payload":{"room":"r0","user":{"id":"bench-1","name":"bench-1"},"content":{"t":12345,"k":7,"p":"xx"},"seq":42,"ts":1}}"#;
        assert_eq!(scan::msg_type(f), b"message");
        assert_eq!(scan::t_and_k(f), Some((12345, 7)));
        assert_eq!(scan::seq_t_and_k(f), (Some(42), Some((12345, 7))));
        let py = br#"{"payload": {"content": {"t": 9, "k": 1}, "seq": 3}, "type": "message"}"#;
        assert_eq!(scan::msg_type(py), b"message");
        assert_eq!(scan::t_and_k(py), Some((9, 1)));
        assert_eq!(scan::seq_t_and_k(py), (Some(3), Some((9, 1))));
        // A "seq" with no colon after it (a string value) is not the key.
        let tricky =
            br#"{"type":"message","payload":{"seq": 8,"room":"seq","content":{"t":1,"k":2}}}"#;
        assert_eq!(scan::seq_t_and_k(tricky), (Some(8), Some((1, 2))));
        // Other q's after the seq (a user's name) are passed over.
        let later = br#"{"type":"message","payload":{"content":{"t":1,"k":2,"p":"x"},"seq":5,"user":{"name":"quq\"q"}}}"#;
        assert_eq!(scan::seq_t_and_k(later), (Some(5), Some((1, 2))));
        let none = br#"{"type":"message","payload":{"content":{"t":1},"note":"q"}}"#;
        assert_eq!(scan::seq_t_and_k(none), (None, None));
        let e = br#"{"type":"error","payload":{"code":"rate_limited","message":"x"}}"#;
        assert_eq!(scan::error_code(e), "rate_limited");
        let l = br#"{"type":"lagged","payload":{"room":"r","from_seq":5,"to_seq":9}}"#;
        assert_eq!(scan::lagged_count(l), 5);
    }

    #[test]
    fn targets() {
        assert!(parse_target("ws://127.0.0.1:9400").is_ok());
        assert!(parse_target("ws://localhost:80").is_ok());
        assert!(parse_target("ws://[::1]:9400").is_ok());
        assert!(parse_target("ws://127.9.9.9:1/x").is_ok());
        assert!(parse_target("ws://10.0.0.1:9400").is_err());
        assert!(parse_target("ws://example.com:80").is_err());
        assert!(parse_target("http://127.0.0.1:80").is_err());
        let two = parse_target("ws://127.0.0.1:9400, ws://127.0.0.2:9401").unwrap();
        assert_eq!(two.nodes(), 2);
        assert_eq!(two.node(3).0.to_string(), "127.0.0.2:9401");
        assert_eq!(two.node(2).1, "127.0.0.1:9400");
        assert!(parse_target("ws://127.0.0.1:9400,ws://10.0.0.1:9400").is_err());
        assert!(parse_target("ws://127.0.0.1:9400,ws://[::1]:9400").is_err());
    }

    #[test]
    fn tls_targets() {
        let plain = parse_target("ws://127.0.0.1:9400").unwrap();
        assert!(!plain.secure);
        let ip = parse_target("wss://127.0.0.1:9400").unwrap();
        assert!(ip.secure);
        assert_eq!(ip.addr.to_string(), "127.0.0.1:9400");
        assert!(matches!(ip.server_name(0), ServerName::IpAddress(_)));
        let name = parse_target("wss://localhost").unwrap();
        assert_eq!(name.addr.port(), 443);
        assert_eq!(name.host_header, "localhost");
        assert!(matches!(name.server_name(0), ServerName::DnsName(d) if d.as_ref() == "localhost"));
        let two = parse_target("wss://127.0.0.1:9400,wss://localhost:9401").unwrap();
        assert!(matches!(two.server_name(1), ServerName::DnsName(_)));
        assert!(matches!(two.server_name(2), ServerName::IpAddress(_)));
        assert!(parse_target("wss://127.0.0.1:9400,ws://127.0.0.1:9401").is_err());
        assert!(parse_target("wss://10.0.0.1:9400").is_err());
        assert!(parse_target("https://127.0.0.1:9400").is_err());
    }

    #[test]
    fn nonce() {
        assert_eq!(base64_16(&[0u8; 16]), "AAAAAAAAAAAAAAAAAAAAAA==");
    }
}
