//! Test support: starts the real `roomcast` binary on a loopback port and
//! talks to it with tungstenite's blocking client.
#![allow(dead_code)]

pub mod webhook_receiver;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use roomcast::auth::{TokenClaims, sign};
use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// Upper bound on any single wait, so a broken server fails a test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(10);

/// The secret every test server is started with.
pub const SECRET: &str = "roomcast-test-secret-of-32-bytes";

/// A running server process, killed on drop.
pub struct TestServer {
    child: Child,
    pub addr: SocketAddr,
    /// Lines the server printed to stdout after the first (the demo banner).
    pub banner: Vec<String>,
}

impl TestServer {
    /// Starts the server with `--jwt-secret SECRET` and the given extra flags.
    pub fn start(extra: &[&str]) -> Self {
        let mut args = vec!["--jwt-secret", SECRET];
        args.extend_from_slice(extra);
        Self::start_raw(&args)
    }

    /// Starts the server with these flags (plus `--listen 127.0.0.1:0`, and
    /// [`threads_args`] unless they name `--threads` themselves).
    pub fn start_raw(extra: &[&str]) -> Self {
        let threads = if names_threads(extra) {
            Vec::new()
        } else {
            threads_args()
        };
        let mut args: Vec<&str> = threads.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Self::start_exact(&args)
    }

    /// Starts the server with exactly these flags (plus `--listen
    /// 127.0.0.1:0`): no `--threads` is added, so without one the server's
    /// default applies whatever `ROOMCAST_TEST_THREADS` says.
    pub fn start_exact(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start roomcast");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first).expect("banner");
        let addr =
            banner_address(&first).unwrap_or_else(|| panic!("unexpected banner line {first:?}"));
        let mut banner = Vec::new();
        // The demo banner is printed right after the first line; read what is there.
        if extra.iter().all(|a| *a != "--jwt-secret") {
            for _ in 0..4 {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                banner.push(line.trim().to_string());
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = reader.read_to_string(&mut sink);
        });
        TestServer {
            child,
            addr,
            banner,
        }
    }

    /// A token for `sub` signed with the test secret.
    pub fn token(&self, sub: &str) -> String {
        token(sub)
    }

    /// Connects to `/ws` as `sub` and returns the client after `welcome`.
    pub fn connect(&self, sub: &str) -> Client {
        let mut client = self.open(&format!("/ws?token={}", token(sub)));
        let welcome = client.recv();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }

    /// Connects to `/ws` as `sub` over a socket with a 4 KiB receive buffer,
    /// so the server's writes to it stall as soon as the client stops reading.
    pub fn connect_small_receive_buffer(&self, sub: &str) -> Client {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket.connect(&self.addr.into()).expect("tcp connect");
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let url = format!("ws://{}/ws?token={}", self.addr, token(sub));
        let ws = match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _)) => ws,
            Err(tungstenite::HandshakeError::Failure(error)) => panic!("upgrade: {error}"),
            Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
        };
        let mut client = Client { ws };
        let welcome = client.recv();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }

    /// Opens a WebSocket to `path` (path and query) without reading anything.
    pub fn open(&self, path: &str) -> Client {
        self.try_open(path)
            .unwrap_or_else(|e| panic!("upgrade {path}: {e}"))
    }

    /// Opens a WebSocket, returning the handshake error (e.g. an HTTP status) instead of panicking.
    pub fn try_open(&self, path: &str) -> Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(self.addr).expect("tcp connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let url = format!("ws://{}{}", self.addr, path);
        match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _response)) => Ok(Client { ws }),
            Err(tungstenite::HandshakeError::Failure(error)) => Err(error),
            Err(tungstenite::HandshakeError::Interrupted(_)) => {
                panic!("blocking handshake interrupted")
            }
        }
    }

    /// Sends raw bytes and returns everything the server answers until it closes.
    /// A response the server keeps the connection open after (keep-alive)
    /// is returned once complete; any other is read until the server closes.
    pub fn raw(&self, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("tcp connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(read) => answer.extend_from_slice(&chunk[..read]),
            }
            if complete_keep_alive_response(&answer) {
                break;
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The status code of the server's answer to a raw request.
    pub fn raw_status(&self, request: &[u8]) -> u16 {
        status_of(&self.raw(request))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL (no drain, no goodbye) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in the banner's first line, `roomcast listening on
/// http://ADDR` or, with `--tls-cert`/`--tls-key` (§13), `https://ADDR`.
pub fn banner_address(line: &str) -> Option<SocketAddr> {
    let line = line.trim();
    let rest = line
        .rsplit_once("https://")
        .or_else(|| line.rsplit_once("http://"))?
        .1;
    rest.parse().ok()
}

/// The variable that chooses how many event loops every test server runs.
pub const THREADS_VAR: &str = "ROOMCAST_TEST_THREADS";

/// `["--threads", N]` when `ROOMCAST_TEST_THREADS=N` is set, so the whole
/// suite runs against one loop or several (`.ci/run` runs it both ways);
/// nothing when it is unset or empty, so the server's default applies. Every
/// place that starts a server passes these; tests that choose `--threads`
/// themselves do not get a second one.
pub fn threads_args() -> Vec<String> {
    match std::env::var(THREADS_VAR) {
        Ok(value) if !value.trim().is_empty() => {
            let n: u16 = value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{THREADS_VAR}={value:?} is not a number of loops"));
            vec!["--threads".to_string(), n.to_string()]
        }
        _ => Vec::new(),
    }
}

/// Whether `args` already choose the number of loops.
pub fn names_threads(args: &[&str]) -> bool {
    args.iter()
        .any(|arg| *arg == "--threads" || arg.starts_with("--threads="))
}

/// Whether `bytes` hold a whole response (head and `Content-Length` body)
/// that says `Connection: keep-alive`.
pub fn complete_keep_alive_response(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let head = head.to_ascii_lowercase();
    if !head.contains("\r\nconnection: keep-alive") {
        return false;
    }
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= length
}

/// The status code in the first line of an HTTP response ("HTTP/1.1 404 …").
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A token for `sub`, no expiry, every room.
pub fn token(sub: &str) -> String {
    sign(
        SECRET.as_bytes(),
        &TokenClaims {
            sub: sub.into(),
            ..Default::default()
        },
    )
}

/// A token with every claim chosen by the test.
pub fn token_with(claims: TokenClaims) -> String {
    sign(SECRET.as_bytes(), &claims)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A blocking WebSocket client.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    /// Sends one JSON text frame.
    pub fn send(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .expect("send");
    }

    /// Sends a raw text frame.
    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    /// The next JSON text frame (control frames are skipped).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read") {
                Message::Text(text) => return serde_json::from_str(&text).expect("json"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads frames until one of type `kind` arrives; returns it and the skipped ones.
    pub fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let value = self.recv();
            if value["type"] == kind {
                return value;
            }
        }
    }

    /// Sends a request and returns the next frame (its direct reply on a quiet connection).
    pub fn request(&mut self, value: Value) -> Value {
        self.send(value);
        self.recv()
    }

    /// Joins a room and returns the `joined` reply.
    pub fn join(&mut self, room: &str) -> Value {
        let joined = self.request(serde_json::json!({"type": "join", "payload": {"room": room}}));
        assert_eq!(joined["type"], "joined", "{joined}");
        joined
    }

    /// Reads until the server's close frame; returns its code (and reason).
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(CloseFrame { code, reason }))) => {
                    return (u16::from(code), reason.to_string());
                }
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => continue,
                Err(error) => panic!("connection ended without a close frame: {error}"),
            }
        }
    }

    /// Proves the connection is alive and in order: a ping gets its pong.
    pub fn assert_alive(&mut self) {
        let pong = self.request(serde_json::json!({"type": "ping", "id": "alive"}));
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["id"], "alive");
    }
}

/// A finished child's status and output, for an assertion's message.
pub fn show_output(out: &std::process::Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A file of `text` in a folder of its own: tests that run at once never
/// share (and rewrite) each other's files.
pub fn scratch_file(name: &str, text: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("roomcast-test-{}-{number}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("a scratch file");
    path
}
