//! `webhook-sink`: a receiver for roomcast's webhooks (PROTOCOL.md §14.2)
//! that answers every POST at once and counts what it got, so a benchmark
//! can run the server with `--webhook-url http://127.0.0.1:PORT/hook`.
//!
//! A std `TcpListener`, one thread per connection, HTTP/1.1 keep-alive: each
//! request's head and body (`Content-Length`, or chunked) are read, the
//! events counted, and `200 OK` with an empty body written straight away.
//! Events are counted as the occurrences of `{"name":` in the body: every
//! event object starts so (the server writes `name` first), and nothing else
//! in a body does (a user is `{"id":…,"name":…}`, and a content with that text
//! inside would be a JSON string, its quote escaped). It is a substring
//! search (`memchr::memmem`): 1.3 µs for a batch of 100 message events
//! (25 KB), against 120 µs to parse it into a `serde_json::Value`, which at
//! 100,000 events/s would take 12 % of a core from the machine being measured.
//!
//! Every second, and once more at the end, it prints one JSON line of totals
//! to stdout; a script reads the last line. It ends after `--duration`
//! seconds, on SIGTERM or SIGINT (printing a final line with `"final":true`),
//! or when killed (the last line is then at most a second old).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;

/// `roomcast-bench webhook-sink --listen ADDR [--duration S]`.
#[derive(Args, Debug, Clone)]
pub struct SinkArgs {
    /// Address to listen on (loopback only), e.g. 127.0.0.1:9700
    #[arg(long)]
    pub listen: SocketAddr,
}

/// The marker every event object of a batch starts with.
const EVENT_MARK: &[u8] = b"{\"name\":";
/// The answer to every request.
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
/// A request head larger than this is refused (the connection closed).
const HEAD_LIMIT: usize = 64 * 1024;

/// What every connection thread adds to.
#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    events: AtomicU64,
    body_bytes: AtomicU64,
    connections: AtomicU64,
    /// Microseconds since the start of the first and of the last request
    /// (0: none yet), for the average rate.
    first_us: AtomicU64,
    last_us: AtomicU64,
}

/// Set by the SIGTERM and SIGINT handler.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Runs the sink until `duration` (seconds, if any) or a signal; the exit
/// status is 1 if it could not listen.
pub fn run(args: &SinkArgs, duration: Option<f64>) -> std::process::ExitCode {
    if !args.listen.ip().is_loopback() {
        eprintln!("webhook-sink: --listen must be a loopback address");
        return std::process::ExitCode::FAILURE;
    }
    let listener = match TcpListener::bind(args.listen) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("webhook-sink: cannot listen on {}: {error}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
    let start = Instant::now();
    let totals = Arc::new(Totals::default());
    let accepting = Arc::clone(&totals);
    std::thread::spawn(move || accept_loop(&listener, &accepting, start));

    let end = duration.map(|secs| start + Duration::from_secs_f64(secs.max(0.0)));
    let mut next_line = start + Duration::from_secs(1);
    let mut previous = (start, 0u64);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        let done = STOP.load(Ordering::Relaxed) || end.is_some_and(|end| now >= end);
        if done || now >= next_line {
            let events = totals.events.load(Ordering::Relaxed);
            let interval = now.duration_since(previous.0).as_secs_f64();
            let interval_rate = (events - previous.1) as f64 / interval.max(1e-9);
            println!("{}", line(&totals, start, now, interval_rate, done));
            let _ = io::stdout().flush();
            previous = (now, events);
            next_line += Duration::from_secs(1);
        }
        if done {
            // The connection threads end with the process.
            return std::process::ExitCode::SUCCESS;
        }
    }
}

/// One status line: totals, the average events/s from the first request to
/// the last, and the events/s since the previous line.
fn line(totals: &Totals, start: Instant, now: Instant, interval_rate: f64, done: bool) -> String {
    let events = totals.events.load(Ordering::Relaxed);
    let first = totals.first_us.load(Ordering::Relaxed);
    let last = totals.last_us.load(Ordering::Relaxed);
    let span = (last.saturating_sub(first)) as f64 / 1e6;
    let average = if span > 0.0 {
        events as f64 / span
    } else {
        0.0
    };
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64);
    serde_json::json!({
        "sink": "webhook",
        "final": done,
        "unix_ms": unix_ms,
        "elapsed_s": (now.duration_since(start).as_secs_f64() * 1000.0).round() / 1000.0,
        "connections": totals.connections.load(Ordering::Relaxed),
        "requests": totals.requests.load(Ordering::Relaxed),
        "events": events,
        "body_bytes": totals.body_bytes.load(Ordering::Relaxed),
        "events_per_s": average.round(),
        "interval_events_per_s": interval_rate.round(),
    })
    .to_string()
}

fn accept_loop(listener: &TcpListener, totals: &Arc<Totals>, start: Instant) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        totals.connections.fetch_add(1, Ordering::Relaxed);
        let totals = Arc::clone(totals);
        std::thread::spawn(move || {
            // A connection error ends this connection only.
            let _ = serve(stream, &totals, start);
        });
    }
}

/// Answers the requests of one connection until the client closes it.
fn serve(stream: TcpStream, totals: &Totals, start: Instant) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut head = Vec::with_capacity(1024);
    let mut body = Vec::with_capacity(64 * 1024);
    loop {
        head.clear();
        if !read_head(&mut reader, &mut head)? {
            return Ok(());
        }
        let micros = start.elapsed().as_micros() as u64;
        let _ = totals.first_us.compare_exchange(
            0,
            micros.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        let head = String::from_utf8_lossy(&head);
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_ascii_lowercase())
            })
        };
        if header("expect").as_deref() == Some("100-continue") {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        body.clear();
        if header("transfer-encoding").is_some_and(|value| value.contains("chunked")) {
            read_chunked(&mut reader, &mut body)?;
        } else {
            let length = header("content-length").map_or(Ok(0), |value| {
                value
                    .parse::<usize>()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))
            })?;
            body.resize(length, 0);
            reader.read_exact(&mut body)?;
        }
        totals.requests.fetch_add(1, Ordering::Relaxed);
        totals
            .events
            .fetch_add(count_events(&body), Ordering::Relaxed);
        totals
            .body_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        totals.last_us.fetch_max(micros, Ordering::Relaxed);
        writer.write_all(ANSWER)?;
        if header("connection").as_deref() == Some("close") {
            return Ok(());
        }
    }
}

/// Reads a request head up to its blank line into `head`; false at a clean
/// end of the connection before a request.
fn read_head(reader: &mut impl BufRead, head: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        let before = head.len();
        if reader.read_until(b'\n', head)? == 0 {
            return if head.is_empty() {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                // A stray blank line between requests.
                head.clear();
                continue;
            }
            return Ok(true);
        }
        if head.len() > HEAD_LIMIT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
    }
}

/// Reads a chunked body (RFC 9112 §7.1) into `body`; trailers are skipped.
fn read_chunked(reader: &mut impl BufRead, body: &mut Vec<u8>) -> io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the blank line.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        let at = body.len();
        body.resize(at + size, 0);
        reader.read_exact(&mut body[at..])?;
        line.clear();
        reader.read_line(&mut line)?; // the CRLF after the chunk
    }
}

/// The events in one batch body: the occurrences of `{"name":`.
fn count_events(body: &[u8]) -> u64 {
    memchr::memmem::find_iter(body, EVENT_MARK).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(events: usize) -> String {
        let event = r#"{"name":"message","room":"r-1","time_ms":1,"seq":7,"user":{"id":"bench-1","name":"bench-1"},"content":{"t":1,"k":0,"p":"{\"name\":x"}}"#;
        format!("{{\"events\":[{}]}}", vec![event; events].join(","))
    }

    #[test]
    fn events_are_counted_by_their_opening_and_agree_with_serde_json() {
        for n in [0, 1, 100] {
            let body = batch(n);
            let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(parsed["events"].as_array().unwrap().len(), n);
            assert_eq!(count_events(body.as_bytes()), n as u64);
        }
    }

    #[test]
    fn keep_alive_requests_with_length_and_chunked_bodies_are_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let totals = Arc::new(Totals::default());
        let serving = Arc::clone(&totals);
        let start = Instant::now();
        std::thread::spawn(move || accept_loop(&listener, &serving, start));

        let mut client = TcpStream::connect(address).unwrap();
        let body = batch(3);
        let chunked = batch(2);
        let requests = format!(
            "POST /hook HTTP/1.1\r\nHost: x\r\ncontent-length: {}\r\n\r\n{body}\
             POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunked}\r\n0\r\n\r\n",
            body.len(),
            chunked.len(),
        );
        client.write_all(requests.as_bytes()).unwrap();
        let mut answers = vec![0; ANSWER.len() * 2];
        client.read_exact(&mut answers).unwrap();
        assert_eq!(answers, [ANSWER, ANSWER].concat());
        assert_eq!(totals.requests.load(Ordering::Relaxed), 2);
        assert_eq!(totals.events.load(Ordering::Relaxed), 5);
        assert_eq!(totals.connections.load(Ordering::Relaxed), 1);
    }
}
