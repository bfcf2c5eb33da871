//! `roomcast-bench`: a load-test harness that speaks the roomcast protocol
//! (PROTOCOL.md §1, §3–§5) over its own non-blocking WebSocket client, mints
//! its tokens from `--secret`, and runs one workload against any loopback URL.
//!
//! ```text
//! cargo run --release -p roomcast-bench -- fanout --rooms 10 --members 100 --rate 0 --server-pid PID
//! ```
//!
//! Every run prints an aligned table and then exactly one JSON line.
//!
//! `roomcast-bench webhook-sink --listen 127.0.0.1:PORT` is not a workload:
//! it is a webhook receiver (§14.2) for benchmarks with `--webhook-url`
//! (see [`webhook_sink`]).

mod common;
mod net;
mod pool;
mod report;
mod rooms;
mod run;
mod sys;
mod tls;
mod webhook_sink;

use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// The command line: a workload, or the webhook sink.
#[derive(Parser, Debug)]
#[command(
    name = "roomcast-bench",
    version,
    about = "Load-test harness for roomcast (and any server of the same protocol)",
    long_about = "Load-test harness for roomcast and its comparison peers. Speaks the protocol \
with its own mio client, mints tokens for users bench-<n> from --secret, and prints a table \
and one JSON line. Only loopback targets are accepted.\n\n\
Start the server with --rate-limit 0 (the default 50 msg/s per connection throttles publishers)."
)]
pub struct Invocation {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    #[command(flatten)]
    Workload(Workload),
    /// Not a workload: a webhook receiver (PROTOCOL.md §14.2) that answers every
    /// POST with 200 at once, counts requests and events, and prints a JSON line
    /// of totals every second and at the end. It runs until SIGTERM or SIGINT,
    /// or for --duration S when given (the one common flag it reads)
    WebhookSink(webhook_sink::SinkArgs),
}

/// One workload run: what [`run::run`] takes.
#[derive(Debug)]
pub struct Cli {
    pub workload: Workload,
    pub common: Common,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Base WebSocket URL; the harness appends /ws?token=… or /echo?token=…
    /// A comma-separated list spreads connections over several nodes (user n
    /// on node n mod count, so members of a room alternate between nodes).
    /// wss://… speaks TLS and needs --ca or --insecure-skip-verify
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// wss://: trust the certificates in this PEM file (the server's own
    /// self-signed certificate, or its CA); the certificate must hold the
    /// URL's host as a subjectAltName (IP 127.0.0.1, DNS localhost…)
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<String>,
    /// wss://: UNSAFE, accept any certificate for any name (the handshake
    /// signature is still checked). Only for benchmarks against a
    /// self-signed test certificate on loopback
    #[arg(long, global = true, conflicts_with = "ca")]
    pub insecure_skip_verify: bool,
    /// HS256 secret the server was started with (--jwt-secret)
    #[arg(long, global = true, default_value = "bench-secret")]
    pub secret: String,
    /// PID of the server process: its CPU, RSS and open files are measured
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Seconds of measured traffic
    #[arg(long, global = true, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of traffic before the measured window
    #[arg(long, global = true, default_value_t = 1.0)]
    pub warmup: f64,
    /// Client threads, one event loop each
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
    /// Spread client sockets over source addresses 127.0.0.1 … 127.0.0.N
    #[arg(long, global = true, default_value_t = 16)]
    pub sources: u32,
    /// New connections per second while connecting (all threads together; 0 = as fast as possible)
    #[arg(long, global = true, default_value_t = 5000.0)]
    pub connect_rate: f64,
    /// Connections at most between connect() and `joined` at once (all threads together)
    #[arg(long, global = true, default_value_t = 100)]
    pub max_pending: u64,
    /// Seconds a connection may take from connect() to `joined`
    #[arg(long, global = true, default_value_t = 10.0)]
    pub handshake_timeout: f64,
    /// Print only the JSON line
    #[arg(long, global = true)]
    pub json_only: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Workload {
    /// R rooms × M members, P publishers per room; deliveries/s, ratio, gaps, latency
    Fanout(FanoutArgs),
    /// C clients each in its own room (or on /echo), K in flight; round trips/s and latency
    Echo(EchoArgs),
    /// C joined connections held open; connect rate, failures, server RSS and kernel memory per connection
    Idle(IdleArgs),
    /// One room under steady load plus members that stop reading
    Slow(SlowArgs),
    /// Connects and disconnects per second with the connection count held flat
    Churn(ChurnArgs),
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// Members per room (publishers included)
    #[arg(long, default_value_t = 100)]
    pub members: u32,
    /// Publishers per room (the first P members)
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// Total messages per second over all publishers; 0 = as fast as the window allows
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Messages each publisher may have outstanding when --rate is 0
    #[arg(long, default_value_t = 8)]
    pub in_flight: u32,
    /// Content size in bytes
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// What closes a publisher's window: its own broadcast coming back, or the ack
    #[arg(long, value_enum, default_value_t = WindowArg::Echo)]
    pub window: WindowArg,
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    #[arg(long, default_value_t = 10)]
    pub clients: u32,
    /// Messages each client keeps outstanding
    #[arg(long, default_value_t = 1)]
    pub in_flight: u32,
    /// Content size in bytes
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// room: each client joins its own room and gets its broadcast back; echo: the /echo endpoint (server needs --echo)
    #[arg(long, value_enum, default_value_t = EndpointArg::Room)]
    pub endpoint: EndpointArg,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Rooms the connections join (round robin)
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// Seconds to hold the connections once all are joined
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
}

#[derive(Args, Debug, Clone)]
pub struct SlowArgs {
    /// Healthy members (publishers included)
    #[arg(long, default_value_t = 20)]
    pub members: u32,
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// Total messages per second into the room
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Content size in bytes
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Members that stop reading
    #[arg(long, default_value_t = 1)]
    pub stalled: u32,
    /// Seconds after traffic starts at which they stop reading
    #[arg(long, default_value_t = 0.5)]
    pub stall_after: f64,
}

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Connections kept open
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Replacements per second (each closes the oldest connection and opens a new one)
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// graceful: close frame and wait for the server's; abrupt: just close the socket
    #[arg(long, value_enum, default_value_t = CloseArg::Graceful)]
    pub close: CloseArg,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowArg {
    Echo,
    Ack,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointArg {
    Room,
    Echo,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseArg {
    Graceful,
    Abrupt,
}

fn main() -> ExitCode {
    let matches = Invocation::command().get_matches();
    let invocation = Invocation::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let workload = match invocation.command {
        Command::Workload(workload) => workload,
        Command::WebhookSink(args) => {
            // --duration is a common flag whose default (5 s) is a workload's:
            // the sink runs until stopped unless it is given.
            let given = matches!(
                matches.value_source("duration"),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            return webhook_sink::run(&args, given.then_some(invocation.common.duration));
        }
    };
    sys::init_clock();
    let cli = Cli {
        workload,
        common: invocation.common,
    };
    let report = run::run(&cli);
    report.print(cli.common.json_only);
    if report.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<const N: usize>(args: [&str; N]) -> Result<Cli, clap::Error> {
        let invocation = Invocation::try_parse_from(args)?;
        match invocation.command {
            Command::Workload(workload) => Ok(Cli {
                workload,
                common: invocation.common,
            }),
            Command::WebhookSink(_) => panic!("not a workload"),
        }
    }

    #[test]
    fn cli_parses_workloads_with_global_flags_anywhere() {
        let cli = parse([
            "roomcast-bench",
            "fanout",
            "--rooms",
            "2",
            "--url",
            "ws://127.0.0.1:9400",
            "--duration",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.common.url, "ws://127.0.0.1:9400");
        assert_eq!(cli.common.duration, 3.0);
        let Workload::Fanout(f) = cli.workload else {
            panic!()
        };
        assert_eq!(f.rooms, 2);
        assert!(parse(["roomcast-bench", "--threads", "2", "idle"]).is_ok());
    }

    #[test]
    fn trust_flags_exclude_each_other() {
        let cli = parse([
            "roomcast-bench",
            "echo",
            "--url",
            "wss://127.0.0.1:9400",
            "--ca",
            "cert.pem",
        ])
        .unwrap();
        assert_eq!(cli.common.ca.as_deref(), Some("cert.pem"));
        assert!(!cli.common.insecure_skip_verify);
        assert!(parse(["roomcast-bench", "idle", "--insecure-skip-verify"]).is_ok());
        assert!(
            parse([
                "roomcast-bench",
                "idle",
                "--ca",
                "x.pem",
                "--insecure-skip-verify"
            ])
            .is_err()
        );
    }

    #[test]
    fn the_webhook_sink_takes_listen_and_duration() {
        let invocation = Invocation::try_parse_from([
            "roomcast-bench",
            "webhook-sink",
            "--listen",
            "127.0.0.1:9700",
            "--duration",
            "2",
        ])
        .unwrap();
        let Command::WebhookSink(args) = invocation.command else {
            panic!()
        };
        assert_eq!(args.listen.port(), 9700);
        assert_eq!(invocation.common.duration, 2.0);
        assert!(Invocation::try_parse_from(["roomcast-bench", "webhook-sink"]).is_err());
    }
}
