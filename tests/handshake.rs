mod common;

// Handshake and authentication against the real binary (PROTOCOL §1, §2, §9, §11).
//
// Every check talks to a running `roomcast` over real loopback sockets. Raw
// requests are written by hand so each rule of the §11 order can be hit
// exactly; refusals are read until the server's EOF, which proves the socket
// was closed after the answer.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{TestServer, WAIT, now_secs, token, token_with};
use hmac::{Hmac, Mac};
use roomcast::auth::{RoomAccess, TokenClaims, Verifier};
use serde_json::{Value, json};
use tungstenite::Message;

/// The RFC 6455 sample key: 16 bytes, base64.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

// ---------------------------------------------------------------------------
// Raw HTTP helpers
// ---------------------------------------------------------------------------

/// What the server answered on one raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
    /// The server ended the connection (EOF or reset) after answering, rather
    /// than the read timing out with the socket still open.
    closed: bool,
}

impl Answer {
    /// The value of the first header called `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<String> {
        header_in(&self.head, name)
    }
}

fn header_in(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

fn parse_answer(bytes: &[u8], closed: bool) -> Answer {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = match text.split_once("\r\n\r\n") {
        Some((head, body)) => (head.to_string(), body.to_string()),
        None => (text.clone(), String::new()),
    };
    Answer {
        status: common::status_of(&head),
        head,
        body,
        closed,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads until the server closes (or the harness timeout passes).
fn read_until_close(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (answer, true),
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                // A kept-alive answer is whole without the server closing.
                if common::complete_keep_alive_response(&answer) {
                    return (answer, false);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (answer, false);
            }
            // A reset also ends the connection.
            Err(_) => return (answer, true),
        }
    }
}

/// Sends `request` in one write and reads the whole answer until the server closes.
fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = connect(addr);
    // The server may answer (431) before reading everything; it drains the rest.
    let _ = stream.write_all(request);
    let (bytes, closed) = read_until_close(&mut stream);
    parse_answer(&bytes, closed)
}

/// Sends `request` and reads only the response head (for `101`, which stays open).
fn head_only(addr: SocketAddr, request: &[u8]) -> (Answer, TcpStream, Vec<u8>) {
    let mut stream = connect(addr);
    stream.write_all(request).expect("write request");
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = find(&buffer, b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break buffer.len(),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the response head: {e}"),
        }
    };
    let rest = buffer.split_off(end);
    (parse_answer(&buffer, false), stream, rest)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A request: the request line, the header lines, the blank line.
fn request(line: &str, headers: &[&str]) -> String {
    let mut out = format!("{line}\r\n");
    for header in headers {
        out.push_str(header);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out
}

/// A complete, valid upgrade request for `target` plus `extra` header lines.
fn upgrade(target: &str, extra: &[&str]) -> String {
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let mut headers = vec![
        "Host: localhost",
        "Upgrade: websocket",
        "Connection: Upgrade",
        key.as_str(),
        "Sec-WebSocket-Version: 13",
    ];
    headers.extend_from_slice(extra);
    request(&format!("GET {target} HTTP/1.1"), &headers)
}

/// `request` with an `X-Pad` header inserted so the whole head is exactly `total` bytes.
fn padded_to(request: &str, total: usize) -> String {
    // "X-Pad: " + n + "\r\n" is n + 9 bytes, inserted before the blank line.
    let base = request.len();
    assert!(total >= base + 9, "head too small to pad");
    let pad = format!("X-Pad: {}\r\n", "a".repeat(total - base - 9));
    let cut = request.len() - 2;
    let out = format!("{}{pad}\r\n", &request[..cut]);
    assert_eq!(out.len(), total);
    out
}

/// `/ws?token=…` for `sub`.
fn ws_path(sub: &str) -> String {
    format!("/ws?token={}", token(sub))
}

/// Asserts a refusal of a `/ws…` request: the status, `Connection: close`, and
/// that the server closed the socket after it.
#[track_caller]
fn assert_refused(addr: SocketAddr, request: &str, status: u16, what: &str) -> Answer {
    let answer = exchange(addr, request.as_bytes());
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(
        answer.header("Connection").map(|v| v.to_ascii_lowercase()),
        Some("close".to_string()),
        "{what}: every refusal carries Connection: close: {answer:?}"
    );
    assert!(answer.closed, "{what}: the server must close the socket");
    answer
}

/// Asserts the request is upgraded (`101`) and returns the open stream with
/// the bytes already read after the head (the start of the first frames).
#[track_caller]
fn assert_upgraded(addr: SocketAddr, request: &str, what: &str) -> (TcpStream, Vec<u8>) {
    let (answer, stream, rest) = head_only(addr, request.as_bytes());
    assert_eq!(answer.status, 101, "{what}: {answer:?}");
    (stream, rest)
}

// ---------------------------------------------------------------------------
// Raw WebSocket frames
// ---------------------------------------------------------------------------

/// A masked client text frame (payload under 126 bytes).
fn masked_text(payload: &str) -> Vec<u8> {
    let bytes = payload.as_bytes();
    assert!(bytes.len() < 126);
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | bytes.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(bytes.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one server frame (unmasked) from `buffer` + `stream`: (opcode, payload).
fn read_frame(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> (u8, Vec<u8>) {
    fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>, want: usize) {
        let mut chunk = [0u8; 4096];
        while buffer.len() < want {
            match stream.read(&mut chunk) {
                Ok(0) => panic!("connection closed while reading a frame"),
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading a frame: {e}"),
            }
        }
    }
    fill(stream, buffer, 2);
    let opcode = buffer[0] & 0x0f;
    assert_eq!(
        buffer[0] & 0x80,
        0x80,
        "the server sends unfragmented frames"
    );
    assert_eq!(buffer[1] & 0x80, 0, "server frames are not masked");
    let (len, start) = match buffer[1] & 0x7f {
        126 => {
            fill(stream, buffer, 4);
            (usize::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4)
        }
        127 => {
            fill(stream, buffer, 10);
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buffer[2..10]);
            (u64::from_be_bytes(raw) as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    fill(stream, buffer, start + len);
    let payload = buffer[start..start + len].to_vec();
    buffer.drain(..start + len);
    (opcode, payload)
}

/// The next text frame as JSON, skipping control frames.
fn read_json(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Value {
    loop {
        let (opcode, payload) = read_frame(stream, buffer);
        match opcode {
            0x1 => return serde_json::from_slice(&payload).expect("json frame"),
            0x9 | 0xA => continue,
            other => panic!("unexpected opcode {other:#x}: {payload:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Tokens built by hand
// ---------------------------------------------------------------------------

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// An HS256-signed JWT with any header and claims.
fn hs256(secret: &[u8], header: Value, claims: Value) -> String {
    let input = signing_input(&header, &claims);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

/// An HS512-signed JWT.
fn hs512(secret: &[u8], header: Value, claims: Value) -> String {
    let input = signing_input(&header, &claims);
    let mut mac = Hmac::<sha2::Sha512>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

fn std_header() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

/// The claims of a token, read without verifying it.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("json")
}

/// Every byte as `%XX`.
fn percent_encode_all(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

// ---------------------------------------------------------------------------
// Processes started with a chosen environment
// ---------------------------------------------------------------------------

/// The binary with exactly `args` and `env`. Callers that start a server add
/// `common::threads_args()` (a flag: every `ROOMCAST_*` variable is removed
/// here); [`run_to_exit`] does not, since its runs must exit before serving
/// and `roomcast token` takes no `--threads`.
fn roomcast_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roomcast"));
    command.args(args);
    // Only the variables this test sets may influence the run.
    for (name, _) in std::env::vars() {
        if name.starts_with("ROOMCAST_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command
}

/// A server started with environment variables; killed on drop.
struct EnvServer {
    child: Child,
    addr: SocketAddr,
}

impl EnvServer {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["--listen", "127.0.0.1:0", "--log-level", "warn"];
        all.extend_from_slice(args);
        let mut child = roomcast_command(&all, env)
            .args(common::threads_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start roomcast");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).expect("banner");
        let addr = first
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected banner line {first:?}"));
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = reader.read_to_string(&mut sink);
        });
        EnvServer { child, addr }
    }
}

impl Drop for EnvServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary expecting it to exit on its own; fails (and kills it) if it
/// starts serving instead.
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut child = roomcast_command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start roomcast");
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.contains("listening on") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("roomcast {args:?} started serving instead of exiting: {line}");
        }
        stdout.push_str(&line);
    }
    let status = child.wait().expect("wait");
    (status, stdout, errors.join().unwrap())
}

// ===========================================================================
// §2 / §11: size
// ===========================================================================

#[test]
fn head_over_8192_bytes_is_431() {
    let server = TestServer::start(&[]);
    let addr = server.addr;

    // One huge header in an otherwise valid, complete upgrade.
    let big = format!("X-Big: {}", "b".repeat(9000));
    assert_refused(
        addr,
        &upgrade(&ws_path("u"), &[&big]),
        431,
        "one huge header",
    );

    // A header line that never ends: answered without waiting for the blank line.
    let mut stream = connect(addr);
    let endless = format!("GET /ws HTTP/1.1\r\nX-Endless: {}", "e".repeat(9000));
    stream.write_all(endless.as_bytes()).unwrap();
    let (bytes, closed) = read_until_close(&mut stream);
    let answer = parse_answer(&bytes, closed);
    assert_eq!(answer.status, 431, "unterminated header: {answer:?}");
    assert!(answer.closed);

    // A complete head of 8193 bytes (one over) on /ws and on a plain endpoint.
    let over = padded_to(&upgrade(&ws_path("u"), &[]), 8193);
    assert_refused(addr, &over, 431, "complete head of 8193 bytes");
    let health_over = padded_to(&request("GET /health HTTP/1.1", &["Host: x"]), 8193);
    assert_eq!(exchange(addr, health_over.as_bytes()).status, 431);

    // Exactly 8192 bytes is within the limit.
    let exact = padded_to(&upgrade(&ws_path("exact"), &[]), 8192);
    assert_upgraded(addr, &exact, "head of exactly 8192 bytes");
    let health_exact = padded_to(&request("GET /health HTTP/1.1", &["Host: x"]), 8192);
    assert_eq!(exchange(addr, health_exact.as_bytes()).status, 200);
}

#[test]
fn head_over_8192_bytes_wins_over_malformed() {
    let server = TestServer::start(&[]);
    // Malformed header line early in a complete head of 9000+ bytes.
    let head = format!(
        "GET /ws HTTP/1.1\r\nno colon here\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    assert_refused(
        server.addr,
        &head,
        431,
        "header without colon in a huge head",
    );
    // Malformed request line, head over the limit.
    let head = format!("NOT A REQUEST LINE\r\nX-Big: {}\r\n\r\n", "b".repeat(9000));
    assert_refused(server.addr, &head, 431, "bad request line in a huge head");
}

// ===========================================================================
// §2 / §11: malformed, path, method
// ===========================================================================

#[test]
fn malformed_request_lines_are_400() {
    let server = TestServer::start(&[]);
    for (what, line) in [
        ("garbage line", "HELLO\r\n\r\n".to_string()),
        ("no version", "GET /ws\r\nHost: x\r\n\r\n".to_string()),
        (
            "unknown version",
            "GET /ws HTTP/9.9\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "extra token",
            "GET /ws HTTP/1.1 extra\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "control byte in method",
            "G\u{1}T /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "bad request line before upgrade headers",
            upgrade(&ws_path("u"), &[]).replacen("HTTP/1.1", "HTTP/1.1 junk", 1),
        ),
    ] {
        assert_refused(server.addr, &line, 400, what);
    }
}

#[test]
fn header_line_without_colon_is_400() {
    let server = TestServer::start(&[]);
    assert_refused(
        server.addr,
        &upgrade(&ws_path("u"), &["this line has no colon"]),
        400,
        "upgrade with a header without colon",
    );
    let health = request("GET /health HTTP/1.1", &["Host: x", "nocolon"]);
    assert_eq!(exchange(server.addr, health.as_bytes()).status, 400);
}

#[test]
fn unknown_paths_are_404() {
    let server = TestServer::start(&[]);
    for path in [
        "/nope",
        "/wsx",
        "/ws/a/b",
        "/metricsx",
        "/healthx",
        "/ws/a/",
    ] {
        let target = format!("{path}?token={}", token("u"));
        // With full upgrade headers and a valid token…
        assert_refused(server.addr, &upgrade(&target, &[]), 404, path);
        // …and as a plain GET.
        let plain = request(&format!("GET {path} HTTP/1.1"), &["Host: x"]);
        assert_eq!(
            exchange(server.addr, plain.as_bytes()).status,
            404,
            "{path}"
        );
    }
}

#[test]
fn known_path_wrong_method_is_405_with_allow() {
    let server = TestServer::start(&[]);
    let cases = [
        (
            "POST /ws upgrade",
            upgrade(&ws_path("u"), &[]).replacen("GET", "POST", 1),
        ),
        ("POST /ws plain", request("POST /ws HTTP/1.1", &["Host: x"])),
        (
            "PUT /ws/lobby",
            upgrade(&format!("/ws/lobby?token={}", token("u")), &[]).replacen("GET", "PUT", 1),
        ),
        (
            "HEAD /health",
            request("HEAD /health HTTP/1.1", &["Host: x"]),
        ),
        (
            "DELETE /health",
            request("DELETE /health HTTP/1.1", &["Host: x"]),
        ),
        (
            "POST /health",
            request("POST /health HTTP/1.1", &["Host: x", "Content-Length: 0"]),
        ),
    ];
    for (what, req) in cases {
        let answer = assert_refused(server.addr, &req, 405, what);
        let allow = answer
            .header("Allow")
            .unwrap_or_else(|| panic!("{what}: 405 without Allow: {answer:?}"));
        assert!(
            allow.split(',').any(|m| m.trim() == "GET"),
            "{what}: Allow: {allow}"
        );
    }
}

// ===========================================================================
// §2 / §11: upgrade headers, key, version
// ===========================================================================

#[test]
fn ws_without_upgrade_headers_is_426() {
    let server = TestServer::start(&[]);
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let target = ws_path("u");
    for (what, req) in [
        ("bare GET /ws", request("GET /ws HTTP/1.1", &["Host: x"])),
        (
            "key and version but no Upgrade/Connection",
            request(
                &format!("GET {target} HTTP/1.1"),
                &["Host: x", &key, "Sec-WebSocket-Version: 13"],
            ),
        ),
        (
            "GET /ws/lobby without upgrade headers",
            request("GET /ws/lobby HTTP/1.1", &["Host: x"]),
        ),
        (
            "Connection: close and no Upgrade",
            request("GET /ws HTTP/1.1", &["Host: x", "Connection: close"]),
        ),
        (
            "Connection: keep-alive, key and version, no Upgrade",
            request(
                &format!("GET {target} HTTP/1.1"),
                &[
                    "Host: x",
                    "Connection: keep-alive",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
    ] {
        assert_refused(server.addr, &req, 426, what);
    }
}

#[test]
fn only_one_of_upgrade_and_connection_is_400() {
    let server = TestServer::start(&[]);
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let line = format!("GET {} HTTP/1.1", ws_path("u"));
    for (what, headers) in [
        (
            "only Upgrade",
            vec!["Upgrade: websocket", &key, "Sec-WebSocket-Version: 13"],
        ),
        (
            "only Connection",
            vec!["Connection: Upgrade", &key, "Sec-WebSocket-Version: 13"],
        ),
        (
            "Upgrade with a Connection header lacking the upgrade token",
            vec![
                "Upgrade: websocket",
                "Connection: keep-alive",
                &key,
                "Sec-WebSocket-Version: 13",
            ],
        ),
    ] {
        assert_refused(server.addr, &request(&line, &headers), 400, what);
    }
}

#[test]
fn a_repeated_websocket_key_is_400() {
    let server = TestServer::start(&[]);
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let other = "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==";
    for (what, extra) in [
        ("the same key twice", vec![key.as_str()]),
        ("two different keys", vec![other]),
    ] {
        assert_refused(server.addr, &upgrade(&ws_path("u"), &extra), 400, what);
    }
    // One key still upgrades.
    assert_upgraded(server.addr, &upgrade(&ws_path("u"), &[]), "one key");
}

#[test]
fn missing_key_or_version_is_400() {
    let server = TestServer::start(&[]);
    let line = format!("GET {} HTTP/1.1", ws_path("u"));
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let no_key = request(
        &line,
        &[
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
        ],
    );
    assert_refused(server.addr, &no_key, 400, "missing Sec-WebSocket-Key");
    let no_version = request(&line, &["Upgrade: websocket", "Connection: Upgrade", &key]);
    assert_refused(
        server.addr,
        &no_version,
        400,
        "missing Sec-WebSocket-Version",
    );
}

#[test]
fn version_other_than_13_is_426_advertising_13() {
    let server = TestServer::start(&[]);
    for version in ["8", "12", "14"] {
        let req = upgrade(&ws_path("u"), &[]).replace(
            "Sec-WebSocket-Version: 13",
            &format!("Sec-WebSocket-Version: {version}"),
        );
        let answer = assert_refused(server.addr, &req, 426, &format!("version {version}"));
        assert_eq!(
            answer.header("Sec-WebSocket-Version").as_deref(),
            Some("13"),
            "{answer:?}"
        );
    }
}

#[test]
fn upgrade_header_values_are_case_insensitive_lists() {
    let server = TestServer::start(&[]);
    let key = format!("Sec-WebSocket-Key: {KEY}");
    let line = format!("GET {} HTTP/1.1", ws_path("u"));
    for (what, headers) in [
        (
            "Firefox style Connection list",
            vec![
                "Upgrade: websocket",
                "Connection: keep-alive, Upgrade",
                &key,
                "Sec-WebSocket-Version: 13",
            ],
        ),
        (
            "mixed case names and values",
            vec![
                "UPGRADE: WebSocket",
                "connection: upgrade",
                &key,
                "sec-websocket-version: 13",
            ],
        ),
    ] {
        assert_upgraded(server.addr, &request(&line, &headers), what);
    }
    // Both headers present but not asking for a WebSocket.
    let not_ws = request(
        &line,
        &[
            "Upgrade: h2c",
            "Connection: Upgrade",
            &key,
            "Sec-WebSocket-Version: 13",
        ],
    );
    assert_refused(server.addr, &not_ws, 400, "Upgrade: h2c");
}

#[test]
fn incomplete_head_is_closed_after_the_handshake_timeout() {
    let server = TestServer::start(&["--handshake-timeout-ms", "200"]);
    let mut stream = connect(server.addr);
    stream
        .write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n", ws_path("slow")).as_bytes())
        .unwrap();
    // Nothing more is sent; the server gives up and closes without a 101.
    let (bytes, closed) = read_until_close(&mut stream);
    assert!(closed, "the server must close a head that never completes");
    assert!(
        !String::from_utf8_lossy(&bytes).contains(" 101 "),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    // The server still serves others.
    server.connect("fast").assert_alive();
}

// ===========================================================================
// §2 / §11: origin, capacity
// ===========================================================================

#[test]
fn origin_allow_list() {
    let server = TestServer::start(&["--allowed-origin", "https://good.example"]);
    let target = ws_path("u");
    assert_refused(
        server.addr,
        &upgrade(&target, &["Origin: https://evil.example"]),
        403,
        "origin not in the list",
    );
    assert_refused(
        server.addr,
        &upgrade(&target, &["Origin: https://good.example.evil"]),
        403,
        "origin with the allowed one as prefix",
    );
    assert_upgraded(
        server.addr,
        &upgrade(&target, &["Origin: https://good.example"]),
        "allowed origin",
    );
    assert_upgraded(server.addr, &upgrade(&target, &[]), "no Origin header");

    // Without --allowed-origin any origin is accepted.
    let open = TestServer::start(&[]);
    assert_upgraded(
        open.addr,
        &upgrade(&target, &["Origin: https://evil.example"]),
        "any origin without the flag",
    );
}

#[test]
fn connection_limit_is_503_until_a_slot_frees() {
    let server = TestServer::start(&["--max-connections", "2"]);
    // A socket still in its handshake does not count as a connection.
    let mut pending = connect(server.addr);
    pending
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .unwrap();

    let mut first = server.connect("first");
    let mut second = server.connect("second");

    match server.try_open(&ws_path("third")) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Ok(_) => panic!("a third connection was upgraded past --max-connections 2"),
        Err(other) => panic!("expected 503, got {other}"),
    }
    assert_refused(
        server.addr,
        &upgrade(&ws_path("third"), &[]),
        503,
        "over capacity",
    );
    // Plain HTTP is not limited by --max-connections.
    let health = exchange(server.addr, request("GET /health HTTP/1.1", &[]).as_bytes());
    assert_eq!(health.status, 200);

    // Close one client properly and wait until the server has let it go.
    first.ws.close(None).unwrap();
    loop {
        match first.ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    let mut third = None;
    for _ in 0..200 {
        match server.try_open(&ws_path("third")) {
            Ok(client) => {
                third = Some(client);
                break;
            }
            Err(tungstenite::Error::Http(response)) if response.status() == 503 => continue,
            Err(other) => panic!("unexpected answer while waiting for a free slot: {other}"),
        }
    }
    let mut third = third.expect("a slot frees once a client has closed");
    assert_eq!(third.recv()["type"], "welcome");
    // Full again.
    assert_refused(
        server.addr,
        &upgrade(&ws_path("fourth"), &[]),
        503,
        "full again",
    );
    second.assert_alive();
    third.assert_alive();
    drop(pending);
}

// ===========================================================================
// §2 / §11: tokens
// ===========================================================================

#[test]
fn missing_token_is_401() {
    let server = TestServer::start(&[]);
    for (what, target) in [
        ("no query", "/ws"),
        ("other parameter", "/ws?tokens=x"),
        ("empty token", "/ws?token="),
        ("room path without token", "/ws/lobby"),
    ] {
        assert_refused(server.addr, &upgrade(target, &[]), 401, what);
    }
    assert_refused(
        server.addr,
        &upgrade("/ws", &["Cookie: other=1; session=abc"]),
        401,
        "cookie without roomcast_token",
    );
}

#[test]
fn jwt_attacks_are_401() {
    let server = TestServer::start(&[]);
    let secret = common::SECRET.as_bytes();
    let now = now_secs();
    let good_claims = json!({"sub": "mallory"});
    let cases: Vec<(&str, String)> = vec![
        (
            "bad signature (other secret)",
            hs256(b"other-secret", std_header(), good_claims.clone()),
        ),
        ("tampered claims", {
            let genuine = token("mallory");
            let parts: Vec<&str> = genuine.split('.').collect();
            let forged = b64(json!({"sub": "admin"}).to_string().as_bytes());
            format!("{}.{forged}.{}", parts[0], parts[2])
        }),
        (
            "alg none, empty signature",
            format!(
                "{}.",
                signing_input(&json!({"alg": "none", "typ": "JWT"}), &good_claims)
            ),
        ),
        (
            "alg none, HS256 signature",
            hs256(
                secret,
                json!({"alg": "none", "typ": "JWT"}),
                good_claims.clone(),
            ),
        ),
        (
            "alg HS512",
            hs512(
                secret,
                json!({"alg": "HS512", "typ": "JWT"}),
                good_claims.clone(),
            ),
        ),
        (
            "alg RS256 header, HS256 signature",
            hs256(
                secret,
                json!({"alg": "RS256", "typ": "JWT"}),
                good_claims.clone(),
            ),
        ),
        (
            "no alg",
            hs256(secret, json!({"typ": "JWT"}), good_claims.clone()),
        ),
        (
            "expired exp",
            hs256(
                secret,
                std_header(),
                json!({"sub": "mallory", "exp": now - 10}),
            ),
        ),
        (
            "exp equal to now (no leeway)",
            hs256(secret, std_header(), json!({"sub": "mallory", "exp": now})),
        ),
        (
            "nbf in the future",
            hs256(
                secret,
                std_header(),
                json!({"sub": "mallory", "nbf": now + 3600}),
            ),
        ),
        (
            "missing sub",
            hs256(secret, std_header(), json!({"name": "Mallory"})),
        ),
        ("empty sub", hs256(secret, std_header(), json!({"sub": ""}))),
        (
            "sub not a string",
            hs256(secret, std_header(), json!({"sub": 42})),
        ),
        (
            "rooms not an array",
            hs256(
                secret,
                std_header(),
                json!({"sub": "mallory", "rooms": "lobby"}),
            ),
        ),
        (
            "rooms not an array of strings",
            hs256(
                secret,
                std_header(),
                json!({"sub": "mallory", "rooms": ["lobby", 1]}),
            ),
        ),
        ("garbage", "garbage".to_string()),
        ("two parts", {
            let genuine = token("mallory");
            genuine.rsplit_once('.').unwrap().0.to_string()
        }),
        ("four parts", format!("{}.x", token("mallory"))),
        ("not base64", "!!!.???.***".to_string()),
    ];
    for (what, bad) in &cases {
        let query = format!("/ws?token={}", percent_encode_all(bad));
        assert_refused(server.addr, &upgrade(&query, &[]), 401, what);
        // The same token in the cookie is refused as well.
        let cookie = format!("Cookie: roomcast_token={bad}");
        assert_refused(server.addr, &upgrade("/ws", &[&cookie]), 401, what);
    }

    // Controls: the same shapes, done right, are accepted.
    for (what, good) in [
        ("plain", hs256(secret, std_header(), good_claims.clone())),
        (
            "exp in the future",
            hs256(
                secret,
                std_header(),
                json!({"sub": "mallory", "exp": now + 3600}),
            ),
        ),
        (
            "nbf now",
            hs256(secret, std_header(), json!({"sub": "mallory", "nbf": now})),
        ),
        (
            "unknown claims and iat ignored",
            hs256(
                secret,
                std_header(),
                json!({"sub": "mallory", "iat": now + 99999, "extra": {"x": 1}}),
            ),
        ),
    ] {
        assert_upgraded(
            server.addr,
            &upgrade(&format!("/ws?token={good}"), &[]),
            what,
        );
    }
}

#[test]
fn invalid_query_token_is_401_even_with_a_valid_cookie() {
    let server = TestServer::start(&[]);
    let cookie = format!("Cookie: roomcast_token={}", token("cookie-user"));
    let forged = hs256(b"other-secret", std_header(), json!({"sub": "x"}));
    for bad in [forged.as_str(), "garbage", ""] {
        assert_refused(
            server.addr,
            &upgrade(&format!("/ws?token={bad}"), &[&cookie]),
            401,
            &format!("query token {bad:?} with a valid cookie"),
        );
    }
    // The valid cookie alone is accepted.
    assert_upgraded(server.addr, &upgrade("/ws", &[&cookie]), "cookie alone");
}

#[test]
fn token_from_cookie_only_upgrades_as_that_user() {
    let server = TestServer::start(&[]);
    let cookie = format!(
        "Cookie: theme=dark; roomcast_token={}; x=1",
        token("cookie-user")
    );
    let (mut stream, mut buffer) =
        assert_upgraded(server.addr, &upgrade("/ws", &[&cookie]), "cookie");
    let welcome = read_json(&mut stream, &mut buffer);
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["payload"]["user"]["id"], "cookie-user");
}

#[test]
fn percent_encoded_token_in_query_works() {
    let server = TestServer::start(&[]);
    let encoded = percent_encode_all(&token("pct-user"));
    let mut client = server.open(&format!("/ws?token={encoded}"));
    let welcome = client.recv();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["payload"]["user"]["id"], "pct-user");
    // A token among other parameters, only the dots encoded.
    let dots = token("pct-user2").replace('.', "%2E");
    let mut client = server.open(&format!("/ws?a=1&token={dots}&b=2"));
    assert_eq!(client.recv()["payload"]["user"]["id"], "pct-user2");
}

// ===========================================================================
// §11: order of the checks
// ===========================================================================

#[test]
fn first_failure_answers() {
    let server = TestServer::start(&[]);
    let addr = server.addr;
    // Oversize head with an unknown path → 431.
    let big = format!("X-Big: {}", "b".repeat(9000));
    assert_refused(
        addr,
        &upgrade("/nope", &[&big]),
        431,
        "oversize + unknown path",
    );
    let plain_big = request("POST /nope HTTP/1.1", &[&big]);
    assert_refused(
        addr,
        &plain_big,
        431,
        "oversize + unknown path + wrong method",
    );
    // Unknown path + wrong method → 404.
    assert_refused(
        addr,
        &request("POST /nope HTTP/1.1", &["Host: x"]),
        404,
        "POST /nope",
    );
    assert_refused(
        addr,
        &request("DELETE /wsx HTTP/1.1", &["Host: x"]),
        404,
        "DELETE /wsx",
    );
    // /ws, wrong method, no upgrade headers → 405 (not 426).
    assert_refused(
        addr,
        &request("POST /ws HTTP/1.1", &["Host: x"]),
        405,
        "POST /ws plain",
    );
    // No upgrade headers and a bad version → 426 (the upgrade one).
    assert_refused(
        addr,
        &request("GET /ws HTTP/1.1", &["Sec-WebSocket-Version: 8"]),
        426,
        "no upgrade headers + bad version",
    );
    // Bad version + no token → 426 with the version header.
    let bad_version = upgrade("/ws", &[]).replace("Version: 13", "Version: 8");
    let answer = assert_refused(addr, &bad_version, 426, "bad version + no token");
    assert_eq!(
        answer.header("Sec-WebSocket-Version").as_deref(),
        Some("13")
    );
    // Missing key + bad version → 400.
    let line = "GET /ws HTTP/1.1";
    let no_key = request(
        line,
        &[
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 8",
        ],
    );
    assert_refused(addr, &no_key, 400, "missing key + bad version");
}

#[test]
fn first_failure_answers_origin_capacity_token() {
    let server = TestServer::start(&[
        "--allowed-origin",
        "https://good.example",
        "--max-connections",
        "1",
    ]);
    let addr = server.addr;
    let mut holder = server.connect("holder");
    // Bad origin + full capacity → 403.
    assert_refused(
        addr,
        &upgrade(&ws_path("x"), &["Origin: https://evil.example"]),
        403,
        "bad origin + full",
    );
    // Bad version + bad origin → 426.
    let req = upgrade(&ws_path("x"), &["Origin: https://evil.example"])
        .replace("Version: 13", "Version: 8");
    assert_refused(addr, &req, 426, "bad version + bad origin + full");
    // Good origin + full capacity → 503.
    assert_refused(
        addr,
        &upgrade(&ws_path("x"), &["Origin: https://good.example"]),
        503,
        "good origin + full",
    );
    // Full capacity + no token / bad token → 503.
    assert_refused(addr, &upgrade("/ws", &[]), 503, "full + no token");
    assert_refused(
        addr,
        &upgrade("/ws?token=garbage", &[]),
        503,
        "full + bad token",
    );
    holder.assert_alive();
}

// ===========================================================================
// §1: plain endpoints, echo
// ===========================================================================

#[test]
fn health_is_200_on_the_same_port() {
    let server = TestServer::start(&[]);
    let answer = exchange(
        server.addr,
        request("GET /health HTTP/1.1", &["Host: x"]).as_bytes(),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let body: Value = serde_json::from_str(&answer.body).expect("json body");
    assert_eq!(body, json!({"status": "ok"}));
    // Upgrade headers on /health are ignored.
    let answer = exchange(server.addr, upgrade("/health", &[]).as_bytes());
    assert_eq!(answer.status, 200, "{answer:?}");
    // The WebSocket endpoint still works on that same port.
    server.connect("after-health").assert_alive();
}

#[test]
fn echo_is_404_without_the_flag() {
    let server = TestServer::start(&[]);
    let target = format!("/echo?token={}", token("u"));
    assert_refused(
        server.addr,
        &upgrade(&target, &[]),
        404,
        "/echo without --echo",
    );
    match server.try_open(&target) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        Ok(_) => panic!("/echo upgraded without --echo"),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn echo_sends_text_and_binary_back() {
    let server = TestServer::start(&["--echo"]);
    let mut client = server.open(&format!("/echo?token={}", token("u")));
    client.ws.send(Message::text("hello, echo")).unwrap();
    match client.ws.read().unwrap() {
        Message::Text(text) => assert_eq!(text.as_str(), "hello, echo"),
        other => panic!("expected text, got {other:?}"),
    }
    let blob = vec![0u8, 1, 2, 254, 255];
    client.ws.send(Message::binary(blob.clone())).unwrap();
    match client.ws.read().unwrap() {
        Message::Binary(data) => assert_eq!(data.as_ref(), &blob[..]),
        other => panic!("expected binary, got {other:?}"),
    }
}

// ===========================================================================
// §1 / §11: /ws/{room}
// ===========================================================================

#[test]
fn ws_room_path_joins_after_welcome() {
    let server = TestServer::start(&[]);
    let mut client = server.open(&format!("/ws/lobby?token={}", token("u")));
    let welcome = client.recv();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let joined = client.recv();
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["room"], "lobby");
    assert_eq!(joined["payload"]["count"], 1);
    // Really a member: a message to the room comes back.
    client.send(json!({"type": "message", "payload": {"room": "lobby", "content": "hi"}}));
    let message = client.recv();
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["payload"]["room"], "lobby");
}

#[test]
fn ws_room_path_with_bad_name_errors_and_stays_open() {
    let server = TestServer::start(&[]);
    for path in ["/ws/bad%20room", &format!("/ws/{}", "r".repeat(65))] {
        let mut client = server.open(&format!("{path}?token={}", token("u")));
        assert_eq!(client.recv()["type"], "welcome");
        let error = client.recv();
        assert_eq!(error["type"], "error", "{path}: {error}");
        assert_eq!(error["payload"]["code"], "invalid_room", "{path}: {error}");
        client.assert_alive();
    }
}

#[test]
fn ws_room_path_outside_the_claim_is_forbidden_and_stays_open() {
    let server = TestServer::start(&[]);
    let limited = token_with(TokenClaims {
        sub: "limited".into(),
        rooms: Some(vec!["allowed".into(), "team:*".into()]),
        ..Default::default()
    });
    let mut client = server.open(&format!("/ws/secret?token={limited}"));
    assert_eq!(client.recv()["type"], "welcome");
    let error = client.recv();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["payload"]["code"], "forbidden", "{error}");
    client.assert_alive();
    // The claim still allows its own rooms on that connection.
    client.join("allowed");
}

#[test]
fn ws_room_path_is_percent_decoded() {
    let server = TestServer::start(&[]);
    let scoped = token_with(TokenClaims {
        sub: "teammate".into(),
        rooms: Some(vec!["team:*".into()]),
        ..Default::default()
    });
    let mut client = server.open(&format!("/ws/team%3Aa?token={scoped}"));
    assert_eq!(client.recv()["type"], "welcome");
    let joined = client.recv();
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["payload"]["room"], "team:a");
}

// ===========================================================================
// Bytes sent with the head
// ===========================================================================

#[test]
fn frame_sent_with_the_head_is_not_lost() {
    let server = TestServer::start(&[]);
    let mut bytes = upgrade(&ws_path("eager"), &[]).into_bytes();
    bytes.extend(masked_text(r#"{"type":"ping","id":"early-bird"}"#));
    let (answer, mut stream, mut rest) = head_only(server.addr, &bytes);
    assert_eq!(answer.status, 101, "{answer:?}");
    let welcome = read_json(&mut stream, &mut rest);
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["payload"]["user"]["id"], "eager");
    let pong = read_json(&mut stream, &mut rest);
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], "early-bird");
}

#[test]
fn frames_sent_with_a_room_path_head_follow_the_join() {
    let server = TestServer::start(&[]);
    let mut bytes = upgrade(&format!("/ws/lobby?token={}", token("eager")), &[]).into_bytes();
    bytes.extend(masked_text(r#"{"type":"ping","id":1}"#));
    bytes.extend(masked_text(r#"{"type":"ping","id":2}"#));
    let (answer, mut stream, mut rest) = head_only(server.addr, &bytes);
    assert_eq!(answer.status, 101, "{answer:?}");
    assert_eq!(read_json(&mut stream, &mut rest)["type"], "welcome");
    assert_eq!(read_json(&mut stream, &mut rest)["type"], "joined");
    for id in [1, 2] {
        let pong = read_json(&mut stream, &mut rest);
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["id"], id);
    }
}

// ===========================================================================
// Robustness
// ===========================================================================

#[test]
fn fifty_malformed_handshakes_then_a_normal_chat() {
    let server = TestServer::start(&[]);
    let addr = server.addr;
    for round in 0..50 {
        match round % 10 {
            0 => {
                let answer = exchange(addr, b"hello there, not http\r\n\r\n");
                assert_eq!(answer.status, 400, "round {round}: {answer:?}");
                assert!(answer.closed);
            }
            1 | 7 => {
                // Partial head, then the client hangs up: the server just closes.
                let mut stream = connect(addr);
                let partial: &[u8] = if round % 10 == 1 {
                    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: webs"
                } else {
                    b"GE"
                };
                stream.write_all(partial).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let (bytes, closed) = read_until_close(&mut stream);
                assert!(
                    closed,
                    "round {round}: the server must close a half-closed partial head"
                );
                assert!(
                    bytes.is_empty() || common::status_of(&String::from_utf8_lossy(&bytes)) >= 400
                );
            }
            2 => {
                let big = format!("X-Big: {}", "z".repeat(10_000 + round));
                assert_refused(addr, &upgrade(&ws_path("u"), &[&big]), 431, "oversize");
            }
            3 => {
                assert_refused(
                    addr,
                    &upgrade(&ws_path("u"), &["no colon"]),
                    400,
                    "no colon",
                );
            }
            4 => {
                let junk: Vec<u8> = (0..300u32)
                    .map(|i| (i.wrapping_mul(97).wrapping_add(round as u32 * 13) % 256) as u8)
                    .chain([0x16, 0x03, 0x01, 0x00, 0xff, 0x00])
                    .chain(*b"\r\n\r\n")
                    .collect();
                let answer = exchange(addr, &junk);
                assert_eq!(answer.status, 400, "round {round}: binary junk: {answer:?}");
                assert!(answer.closed);
            }
            5 => {
                // Dripped one byte per write, completed with a bad path.
                let mut stream = connect(addr);
                let req = upgrade(&format!("/bad-path?token={}", token("u")), &[]);
                for byte in req.as_bytes() {
                    stream.write_all(&[*byte]).unwrap();
                }
                let (bytes, closed) = read_until_close(&mut stream);
                let answer = parse_answer(&bytes, closed);
                assert_eq!(answer.status, 404, "round {round}: dripped: {answer:?}");
                assert!(answer.closed);
            }
            6 => {
                let req = upgrade(&ws_path("u"), &[]).replace("Version: 13", "Version: 7");
                assert_refused(addr, &req, 426, "bad version");
            }
            8 => {
                let req = request(
                    &format!("GET {} HTTP/1.1", ws_path("u")),
                    &["Upgrade: websocket", &format!("Sec-WebSocket-Key: {KEY}")],
                );
                assert_refused(addr, &req, 400, "only Upgrade");
            }
            _ => {
                assert_refused(addr, &upgrade("/ws?token=a.b.c", &[]), 401, "bad token");
            }
        }
    }
    // The server is alive and serving normally.
    let health = exchange(addr, request("GET /health HTTP/1.1", &[]).as_bytes());
    assert_eq!(health.status, 200);
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    alice.join("after-the-storm");
    bob.join("after-the-storm");
    assert_eq!(alice.recv()["type"], "user_joined");
    bob.send(
        json!({"type": "message", "payload": {"room": "after-the-storm", "content": "still here"}}),
    );
    for client in [&mut alice, &mut bob] {
        let message = client.recv_type("message");
        assert_eq!(message["payload"]["content"], "still here");
        assert_eq!(message["payload"]["user"]["id"], "bob");
    }
}

// ===========================================================================
// Demo mode
// ===========================================================================

/// A `/demo/token` answer: (status, JSON body).
fn demo_token(addr: SocketAddr, target: &str) -> (u16, Value) {
    let answer = exchange(
        addr,
        request(&format!("GET {target} HTTP/1.1"), &["Host: x"]).as_bytes(),
    );
    let body = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
    (answer.status, body)
}

fn is_guest_id(id: &str) -> bool {
    id.strip_prefix("guest-")
        .is_some_and(|hex| hex.len() == 4 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

#[test]
fn demo_banner_url_upgrades() {
    let server = TestServer::start_raw(&[]);
    let url = server
        .banner
        .iter()
        .find_map(|line| line.split_whitespace().find(|w| w.starts_with("ws://")))
        .unwrap_or_else(|| panic!("no ws:// URL in the banner {:?}", server.banner))
        .to_string();
    let rest = url.strip_prefix("ws://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').expect("URL with a path"));
    assert_eq!(
        host,
        server.addr.to_string(),
        "the banner URL points at the server"
    );
    assert!(path.starts_with("/ws?token="), "{url}");
    let banner_token = path.trim_start_matches("/ws?token=");
    let sub = claims_of(banner_token)["sub"]
        .as_str()
        .expect("sub")
        .to_string();
    let mut client = server.open(path);
    let welcome = client.recv();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["payload"]["user"]["id"], sub.as_str());
    client.assert_alive();
}

#[test]
fn demo_token_endpoint_mints_working_guest_tokens() {
    let server = TestServer::start_raw(&[]);
    let before = now_secs();
    let (status, body) = demo_token(server.addr, "/demo/token?name=Zoe");
    let after = now_secs();
    assert_eq!(status, 200, "{body}");
    let id = body["user"]["id"].as_str().expect("user id").to_string();
    assert!(id.starts_with("guest-"), "{body}");
    assert_eq!(body["user"]["name"], "Zoe");
    let minted = body["token"].as_str().expect("token");
    // §11: demo tokens expire after 24 h.
    let exp = claims_of(minted)["exp"].as_u64().expect("exp");
    let day = 24 * 3600;
    assert!(
        before + day <= exp && exp <= after + day,
        "exp {exp} is not 24 h after the request ({before}..={after})"
    );
    let mut client = server.open(&format!("/ws?token={minted}"));
    let welcome = client.recv();
    assert_eq!(welcome["payload"]["user"], json!({"id": id, "name": "Zoe"}));

    for target in ["/demo/token", "/demo/token?name="] {
        let (status, body) = demo_token(server.addr, target);
        assert_eq!(status, 200, "{target}: {body}");
        let id = body["user"]["id"].as_str().unwrap_or_default();
        assert!(is_guest_id(id), "{target}: {body}");
        assert_eq!(body["user"]["name"], id, "{target}: {body}");
        let minted = body["token"].as_str().expect("token");
        let mut client = server.open(&format!("/ws?token={minted}"));
        assert_eq!(client.recv()["payload"]["user"]["id"], id);
    }
}

#[test]
fn demo_token_is_404_with_a_secret() {
    let server = TestServer::start(&[]);
    for method in ["GET", "POST"] {
        let req = request(
            &format!("{method} /demo/token?name=Zoe HTTP/1.1"),
            &["Host: x", "Content-Length: 0"],
        );
        let answer = exchange(server.addr, req.as_bytes());
        assert_eq!(answer.status, 404, "{method}: {answer:?}");
    }
}

// ===========================================================================
// §9: `roomcast token` and configuration
// ===========================================================================

#[test]
fn token_subcommand_signs_the_given_claims() {
    let before = now_secs();
    let (status, stdout, stderr) = run_to_exit(
        &[
            "token", "--secret", "S", "--sub", "alice", "--name", "Alice", "--rooms", "a,b",
            "--ttl", "60",
        ],
        &[],
    );
    let after = now_secs();
    assert!(status.success(), "{status}: {stderr}");
    let minted = stdout.trim();
    let identity = Verifier::new(b"S")
        .verify(minted, after)
        .expect("the token verifies");
    assert_eq!(identity.user_id, "alice");
    assert_eq!(identity.name, "Alice");
    assert_eq!(
        identity.rooms,
        RoomAccess::Patterns(vec!["a".into(), "b".into()])
    );
    let exp = identity.expires_at.expect("--ttl sets exp");
    assert!(
        before + 60 <= exp && exp <= after + 60,
        "exp {exp} for ttl 60 in [{before}, {after}]"
    );
    assert!(Verifier::new(b"not-S").verify(minted, after).is_err());

    let (status, stdout, stderr) = run_to_exit(&["token", "--secret", "S", "--sub", "bob"], &[]);
    assert!(status.success(), "{status}: {stderr}");
    let minted = stdout.trim();
    let identity = Verifier::new(b"S")
        .verify(minted, now_secs())
        .expect("verifies");
    assert_eq!(identity.user_id, "bob");
    assert_eq!(identity.name, "bob");
    assert_eq!(identity.expires_at, None);
    assert_eq!(identity.rooms, RoomAccess::Every);
    assert!(
        claims_of(minted).get("exp").is_none(),
        "{}",
        claims_of(minted)
    );
}

#[test]
fn token_subcommand_output_is_accepted_by_the_server() {
    let server = TestServer::start(&[]);
    let (status, stdout, _) = run_to_exit(
        &[
            "token",
            "--secret",
            common::SECRET,
            "--sub",
            "cli-user",
            "--ttl",
            "600",
        ],
        &[],
    );
    assert!(status.success());
    let mut client = server.open(&format!("/ws?token={}", stdout.trim()));
    assert_eq!(client.recv()["payload"]["user"]["id"], "cli-user");
}

#[test]
fn bad_command_lines_exit_2() {
    for (what, args) in [
        (
            "unknown flag",
            vec!["--listen", "127.0.0.1:0", "--no-such-flag"],
        ),
        (
            "bad value",
            vec!["--listen", "127.0.0.1:0", "--history", "lots"],
        ),
        (
            "hard mark below soft mark",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--write-buffer-hard",
                "10",
                "--write-buffer-soft",
                "100",
            ],
        ),
    ] {
        let (status, _, stderr) = run_to_exit(&args, &[]);
        assert_eq!(status.code(), Some(2), "{what}: {status}, stderr {stderr}");
        assert!(!stderr.trim().is_empty(), "{what}: a message on stderr");
    }
    // The message names the problem.
    let (_, _, stderr) = run_to_exit(&["--listen", "127.0.0.1:0", "--no-such-flag"], &[]);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
    let (_, _, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--write-buffer-hard",
            "10",
            "--write-buffer-soft",
            "100",
        ],
        &[],
    );
    assert!(stderr.contains("write-buffer-hard"), "{stderr}");
    // A bad value from the environment is refused the same way.
    let (status, _, stderr) = run_to_exit(
        &["--listen", "127.0.0.1:0"],
        &[("ROOMCAST_HISTORY", "lots")],
    );
    assert_eq!(status.code(), Some(2), "env bad value: {stderr}");
}

#[test]
fn help_lists_every_flag() {
    let (status, stdout, stderr) = run_to_exit(&["--help"], &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    for flag in [
        "--listen",
        "--jwt-secret",
        "--api-key",
        "--allowed-origin",
        "--max-connections",
        "--max-message-size",
        "--max-rooms-per-connection",
        "--heartbeat-ms",
        "--pong-timeout-ms",
        "--handshake-timeout-ms",
        "--rate-limit",
        "--rate-burst",
        "--write-buffer-soft",
        "--write-buffer-hard",
        "--history",
        "--typing-timeout-ms",
        "--drain-ms",
        "--state-file",
        "--redis",
        "--echo",
        "--log-level",
    ] {
        assert!(
            stdout
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .any(|word| word == flag),
            "--help does not list {flag}:\n{stdout}"
        );
    }
}

#[test]
fn environment_variable_takes_effect_and_flag_wins() {
    let secret = ("ROOMCAST_JWT_SECRET", common::SECRET);
    // ROOMCAST_MAX_CONNECTIONS=1: the second upgrade is refused.
    let server = EnvServer::start(&[], &[secret, ("ROOMCAST_MAX_CONNECTIONS", "1")]);
    let _first = assert_upgraded(server.addr, &upgrade(&ws_path("one"), &[]), "first");
    assert_refused(
        server.addr,
        &upgrade(&ws_path("two"), &[]),
        503,
        "env limit of 1",
    );

    // The flag wins over the variable: --max-connections 2 allows two.
    let server = EnvServer::start(
        &["--max-connections", "2"],
        &[secret, ("ROOMCAST_MAX_CONNECTIONS", "1")],
    );
    let _first = assert_upgraded(server.addr, &upgrade(&ws_path("one"), &[]), "first");
    let _second = assert_upgraded(server.addr, &upgrade(&ws_path("two"), &[]), "second");
    assert_refused(
        server.addr,
        &upgrade(&ws_path("three"), &[]),
        503,
        "flag limit of 2",
    );

    // Repeatable flag from the environment: a comma-separated list.
    let server = EnvServer::start(
        &[],
        &[
            secret,
            (
                "ROOMCAST_ALLOWED_ORIGIN",
                "https://a.example,https://b.example",
            ),
        ],
    );
    for origin in ["https://a.example", "https://b.example"] {
        let header = format!("Origin: {origin}");
        assert_upgraded(server.addr, &upgrade(&ws_path("o"), &[&header]), origin);
    }
    assert_refused(
        server.addr,
        &upgrade(&ws_path("o"), &["Origin: https://c.example"]),
        403,
        "origin outside the env list",
    );
}

// ===========================================================================
// The first hour: empty secrets, the banner, --listen, /token/check
// ===========================================================================

#[test]
fn an_empty_secret_or_key_exits_2() {
    let listen = ["--listen", "127.0.0.1:0"];
    /// What is tested, the arguments, the environment, what the message names.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case<'_>; 6] = [
        (
            "empty --jwt-secret",
            vec!["--jwt-secret", ""],
            vec![],
            "--jwt-secret",
        ),
        (
            "empty --api-key",
            vec!["--jwt-secret", common::SECRET, "--api-key", ""],
            vec![],
            "--api-key",
        ),
        (
            "ROOMCAST_JWT_SECRET set but empty",
            vec![],
            vec![("ROOMCAST_JWT_SECRET", "")],
            "ROOMCAST_JWT_SECRET",
        ),
        (
            "ROOMCAST_API_KEY set but empty",
            vec![],
            vec![
                ("ROOMCAST_JWT_SECRET", common::SECRET),
                ("ROOMCAST_API_KEY", ""),
            ],
            "ROOMCAST_API_KEY",
        ),
        (
            "ROOMCAST_ALLOWED_ORIGIN set but empty (it would allow every origin)",
            vec![],
            vec![("ROOMCAST_ALLOWED_ORIGIN", "")],
            "ROOMCAST_ALLOWED_ORIGIN",
        ),
        (
            "token --secret empty",
            vec!["token", "--secret", "", "--sub", "admin"],
            vec![],
            "--secret",
        ),
    ];
    for (what, args, env, named) in cases {
        let mut all: Vec<&str> = if args.first() == Some(&"token") {
            Vec::new()
        } else {
            listen.to_vec()
        };
        all.extend(args);
        let (status, stdout, stderr) = run_to_exit(&all, &env);
        assert_eq!(status.code(), Some(2), "{what}: {status}, stderr {stderr}");
        assert!(
            stdout.is_empty(),
            "{what}: nothing minted or served: {stdout}"
        );
        assert!(stderr.contains(named), "{what}: names {named}: {stderr}");
    }
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    let (status, _, stderr) = run_to_exit(
        &["--listen", "127.0.0.1:0"],
        &[("ROOMCAST_HISTORY", "lots")],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ROOMCAST_HISTORY"), "{stderr}");
    // Typed on the command line, the flag is what the message names.
    let (status, _, stderr) = run_to_exit(&["--listen", "127.0.0.1:0", "--history", "lots"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--history") && !stderr.contains("ROOMCAST_"),
        "{stderr}"
    );
}

#[test]
fn token_ttl_must_be_positive() {
    for ttl in ["0", "-5", "soon"] {
        let (status, stdout, stderr) = run_to_exit(
            &[
                "token",
                "--secret",
                common::SECRET,
                "--sub",
                "a",
                "--ttl",
                ttl,
            ],
            &[],
        );
        assert_eq!(status.code(), Some(2), "--ttl {ttl}: {stderr}");
        assert!(stdout.is_empty(), "--ttl {ttl} minted {stdout}");
        assert!(stderr.contains("--ttl"), "{stderr}");
    }
    let (status, stdout, _) = run_to_exit(
        &[
            "token",
            "--secret",
            common::SECRET,
            "--sub",
            "a",
            "--ttl",
            "1",
        ],
        &[],
    );
    assert!(status.success());
    let exp = claims_of(stdout.trim())["exp"].as_u64().expect("exp");
    assert!(exp > now_secs() - 5 && exp <= now_secs() + 1, "exp {exp}");
}

#[test]
fn listen_resolves_a_host_name_and_a_bad_value_shows_an_example() {
    let mut child = roomcast_command(
        &["--jwt-secret", common::SECRET, "--listen", "localhost:0"],
        &[],
    )
    .args(common::threads_args())
    .stdout(Stdio::piped())
    .spawn()
    .expect("start roomcast");
    let mut first = String::new();
    let mut banner = BufReader::new(child.stdout.take().unwrap());
    banner.read_line(&mut first).expect("banner");
    // Keep reading so the server's later banner lines find a reader.
    std::thread::spawn(move || std::io::copy(&mut banner, &mut std::io::sink()));
    let addr: SocketAddr = first
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|address| address.parse().ok())
        .unwrap_or_else(|| panic!("unexpected banner line {first:?}"));
    assert!(addr.ip().is_loopback(), "{addr}");
    let upgraded = std::panic::catch_unwind(|| {
        let (mut stream, mut buffer) =
            assert_upgraded(addr, &upgrade(&ws_path("host-name"), &[]), "over localhost");
        read_json(&mut stream, &mut buffer)["type"].clone()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(upgraded.expect("upgraded over localhost"), "welcome");

    for bad in [
        "nope",
        "localhost",
        "127.0.0.1:http",
        "no-such-host.invalid:80",
    ] {
        let (status, _, stderr) = run_to_exit(&["--listen", bad], &[]);
        assert_eq!(status.code(), Some(2), "--listen {bad}: {stderr}");
        assert!(
            stderr.contains("127.0.0.1:8080") && stderr.contains("localhost:8080"),
            "--listen {bad}: the message shows accepted forms: {stderr}"
        );
    }
}

#[test]
fn the_banner_says_where_to_point_a_browser() {
    let server = TestServer::start_raw(&[]);
    let page = format!("open http://{}/", server.addr);
    assert!(
        server.banner.iter().any(|line| line.starts_with(&page)),
        "{page} in {:?}",
        server.banner
    );
    let answer = exchange(
        server.addr,
        request("GET / HTTP/1.1", &["Host: x"]).as_bytes(),
    );
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("<html") || answer.body.contains("<!doctype"));
}

#[test]
fn a_short_secret_is_warned_about_at_start() {
    let mut child = roomcast_command(
        &["--listen", "127.0.0.1:0", "--jwt-secret", "0123456789"],
        &[],
    )
    .args(common::threads_args())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start roomcast");
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut warning = None;
    for _ in 0..20 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.contains("WARN") && line.contains("--jwt-secret") {
            warning = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.expect("a warning about the 10-byte secret");
    assert!(
        warning.contains("10 bytes") && warning.contains("32"),
        "{warning}"
    );
    // A 32-byte secret starts without one (checked through the first log lines).
    let mut child = roomcast_command(
        &[
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--log-level",
            "warn",
        ],
        &[],
    )
    .args(common::threads_args())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start roomcast");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).expect("banner");
    assert!(first.contains("listening on"), "{first}");
    let _ = child.kill();
    let _ = child.wait();
    let mut errors = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut errors);
    assert!(!errors.contains("--jwt-secret"), "{errors}");
}

/// `GET /token/check` with this target and extra headers: (status, body, Cache-Control).
fn token_check(addr: SocketAddr, target: &str, headers: &[&str]) -> (u16, Value, Option<String>) {
    let mut all = vec!["Host: x"];
    all.extend_from_slice(headers);
    let answer = exchange(
        addr,
        request(&format!("GET {target} HTTP/1.1"), &all).as_bytes(),
    );
    let body = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
    (answer.status, body, answer.header("cache-control"))
}

fn unauthorized_count(addr: SocketAddr) -> u64 {
    let answer = exchange(
        addr,
        request("GET /api/stats HTTP/1.1", &["Host: x"]).as_bytes(),
    );
    let stats: Value = serde_json::from_str(&answer.body).expect("stats JSON");
    stats["handshakes_rejected_total"]["unauthorized"]
        .as_u64()
        .expect("unauthorized count")
}

#[test]
fn token_check_answers_every_code() {
    let server = TestServer::start(&[]);
    let addr = server.addr;
    let secret = common::SECRET.as_bytes();
    let now = now_secs();

    // A valid token: the user and its expiry, not cached.
    let valid = token_with(TokenClaims {
        sub: "alice".into(),
        name: Some("Alice".into()),
        expires_at: Some(now + 600),
        rooms: None,
    });
    let (status, body, cache) = token_check(addr, &format!("/token/check?token={valid}"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], json!({"id": "alice", "name": "Alice"}));
    assert_eq!(body["exp"], now + 600);
    assert_eq!(cache.as_deref(), Some("no-store"));
    // No exp: null. The cookie is read when there is no query token.
    let cookie = format!("Cookie: roomcast_token={}", token("bob"));
    let (status, body, _) = token_check(addr, "/token/check", &[&cookie]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["id"], "bob");
    assert_eq!(body["exp"], Value::Null);

    let before = unauthorized_count(addr);
    let cases = [
        ("/token/check".to_string(), "missing"),
        ("/token/check?token=".to_string(), "missing"),
        ("/token/check?token=garbage".to_string(), "malformed"),
        ("/token/check?token=a.b.c".to_string(), "malformed"),
        (
            format!(
                "/token/check?token={}",
                hs256(b"another-secret", std_header(), json!({"sub": "a"}))
            ),
            "bad_signature",
        ),
        (
            format!(
                "/token/check?token={}",
                hs512(secret, json!({"alg": "HS512"}), json!({"sub": "a"}))
            ),
            "bad_signature",
        ),
        (
            format!(
                "/token/check?token={}.",
                signing_input(&json!({"alg": "none"}), &json!({"sub": "a"}))
            ),
            "bad_signature",
        ),
        (
            format!(
                "/token/check?token={}",
                hs256(secret, std_header(), json!({"sub": "a", "exp": now - 10}))
            ),
            "expired",
        ),
        (
            format!(
                "/token/check?token={}",
                hs256(secret, std_header(), json!({"sub": "a", "nbf": now + 600}))
            ),
            "not_yet_valid",
        ),
        (
            format!(
                "/token/check?token={}",
                hs256(secret, std_header(), json!({"name": "no subject"}))
            ),
            "invalid_claims",
        ),
        (
            format!(
                "/token/check?token={}",
                hs256(secret, std_header(), json!({"sub": "a", "rooms": "lobby"}))
            ),
            "invalid_claims",
        ),
    ];
    for (target, code) in &cases {
        let (status, body, cache) = token_check(addr, target, &[]);
        assert_eq!(status, 401, "{target}: {body}");
        assert_eq!(body, json!({"error": code}), "{target}");
        assert_eq!(cache.as_deref(), Some("no-store"), "{target}");
        // The upgrade with the same token is refused too: the check predicts it.
        let upgrade_target = target.replacen("/token/check", "/ws", 1);
        assert_refused(addr, &upgrade(&upgrade_target, &[]), 401, target);
    }
    // Each refused check and each refused upgrade counts as `unauthorized`.
    assert_eq!(
        unauthorized_count(addr),
        before + 2 * cases.len() as u64,
        "refused checks count like refused upgrades"
    );

    // Only GET.
    let answer = exchange(
        addr,
        request(
            "POST /token/check HTTP/1.1",
            &["Host: x", "Content-Length: 0"],
        )
        .as_bytes(),
    );
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("allow").as_deref(), Some("GET"));
}
