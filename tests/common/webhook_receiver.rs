//! A webhook backend for tests: a std `TcpListener` on 127.0.0.1 that
//! parses POSTs (HTTP/1.1, `Content-Length` bodies, keep-alive), records
//! every request, and answers as the test says: 200 by default, another
//! status, or no answer at all, for the next K requests or until told
//! otherwise. Tests await requests with a timeout instead of sleeping.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The events of every batch that was accepted (answered 200), in order,
/// each batch once however many times it was sent.
pub fn delivered(requests: &[Request]) -> Vec<serde_json::Value> {
    let mut seen = std::collections::HashSet::new();
    requests
        .iter()
        .filter(|request| request.answer == Answer::Status(200))
        .filter(|request| seen.insert(request.delivery().to_string()))
        .flat_map(Request::events)
        .collect()
}

/// How the receiver answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// This status, with an empty body.
    Status(u16),
    /// No answer: the connection is held open until the client gives up.
    Hang,
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// `POST`, normally.
    pub method: String,
    /// The request target.
    pub path: String,
    /// Headers in arrival order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The exact body.
    pub body: Vec<u8>,
    /// How the receiver answered it.
    pub answer: Answer,
}

impl Request {
    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// `X-Roomcast-Delivery`.
    pub fn delivery(&self) -> &str {
        self.header("x-roomcast-delivery").unwrap_or_default()
    }

    /// The body's `events` array.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).expect("a JSON body");
        body["events"].as_array().cloned().expect("an events array")
    }
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    arrived: Condvar,
}

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    /// Answers for the next requests, in order.
    scripted: VecDeque<Answer>,
    /// The answer once `scripted` is used up; `None` means 200.
    otherwise: Option<Answer>,
    closed: bool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running receiver; it stops accepting when dropped.
pub struct WebhookReceiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl WebhookReceiver {
    /// Listens on a free loopback port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        let inner = Arc::new(Inner::default());
        let accepting = Arc::clone(&inner);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accepting.lock().closed {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let serving = Arc::clone(&accepting);
                std::thread::spawn(move || serve(stream, &serving));
            }
        });
        WebhookReceiver { addr, inner }
    }

    /// The URL to give the sender.
    pub fn url(&self) -> String {
        format!("http://{}/hooks/roomcast", self.addr)
    }

    /// The next `count` requests get `status`.
    pub fn fail_next(&self, count: usize, status: u16) {
        let mut state = self.inner.lock();
        state
            .scripted
            .extend((0..count).map(|_| Answer::Status(status)));
    }

    /// The next `count` requests get no answer.
    pub fn hang_next(&self, count: usize) {
        let mut state = self.inner.lock();
        state.scripted.extend((0..count).map(|_| Answer::Hang));
    }

    /// Every request after the scripted ones gets `answer`, until told
    /// otherwise.
    pub fn answer_always(&self, answer: Answer) {
        self.inner.lock().otherwise = Some(answer);
    }

    /// Every request recorded so far.
    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().requests.clone()
    }

    /// Waits (at most `timeout`) until `done` holds for the requests
    /// recorded, and returns them; panics on the timeout.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Request]) -> bool,
    ) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        let mut state = self.inner.lock();
        loop {
            if done(&state.requests) {
                return state.requests.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting; {} request(s) arrived",
                state.requests.len()
            );
            state = self
                .inner
                .arrived
                .wait_timeout(state, deadline - now)
                .map(|(state, _)| state)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    /// Waits until at least `count` requests arrived.
    pub fn wait_for_requests(&self, count: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(timeout, |requests| requests.len() >= count)
    }

    /// Waits until the answered-200 requests carry `count` events in all.
    pub fn wait_for_delivered_events(&self, count: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(timeout, |requests| {
            requests
                .iter()
                .filter(|request| request.answer == Answer::Status(200))
                .map(|request| request.events().len())
                .sum::<usize>()
                >= count
        })
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        // Wake the accepting thread so it sees `closed`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Serves one connection: requests until the client closes or asks to.
fn serve(stream: TcpStream, inner: &Inner) {
    // A client that vanishes without closing must not keep a thread forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while let Some((mut request, close)) = read_request(&mut reader) {
        let answer = {
            let mut state = inner.lock();
            let answer = state
                .scripted
                .pop_front()
                .or(state.otherwise)
                .unwrap_or(Answer::Status(200));
            request.answer = answer;
            state.requests.push(request);
            answer
        };
        inner.arrived.notify_all();
        let Answer::Status(status) = answer else {
            // Hold the connection, unanswered, until the client gives up.
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
            return;
        };
        let connection = if close { "close" } else { "keep-alive" };
        let head = format!(
            "HTTP/1.1 {status} Test\r\nContent-Length: 0\r\nConnection: {connection}\r\n\r\n"
        );
        if writer.write_all(head.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// One request head and its `Content-Length` body; `None` at the end of
/// the stream or on anything malformed. The flag: the client asked to close.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(Request, bool)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let version = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
    };
    let length: usize = header("content-length").map_or(Some(0), |value| value.parse().ok())?;
    let close = match header("connection") {
        Some(value) => value.eq_ignore_ascii_case("close"),
        None => version == "HTTP/1.0",
    };
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let request = Request {
        method,
        path,
        headers,
        body,
        answer: Answer::Status(0),
    };
    Some((request, close))
}

/// Whether `header` (`sha256=HEX`) is the HMAC-SHA256 of `body` with `secret`.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    expected == hex
}
