//! The main thread: plans a workload, starts the client threads, drives the
//! schedule (connect → warm-up → measured window → drain), watches the
//! server's and its own CPU and memory, and turns it all into a [`Report`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::common::{Shared, Tally, tally_merge};
use crate::net::{Target, parse_target, source_addrs};
use crate::report::{self, Report, bytes, int, rate, round};
use crate::rooms::{self, MemberSpec, WindowBy};
use crate::sys::{self, CpuSnap, CpuWindow, now_ns};
use crate::{Cli, CloseArg, Common, EndpointArg, WindowArg, Workload, pool};

/// File descriptors kept free for the harness itself (epoll, stdio, /proc reads).
const FD_RESERVE: u64 = 32;

pub fn run(cli: &Cli) -> Report {
    let name = match &cli.workload {
        Workload::Fanout(_) => "fanout",
        Workload::Echo(_) => "echo",
        Workload::Idle(_) => "idle",
        Workload::Slow(_) => "slow",
        Workload::Churn(_) => "churn",
    };
    let mut r = Report::new(name, &cli.common.url);
    let mut target = match parse_target(&cli.common.url) {
        Ok(t) => t,
        Err(e) => {
            r.error = Some(e);
            return r;
        }
    };
    if let Err(e) = setup_tls(&cli.common, &mut target, &mut r) {
        r.error = Some(e);
        return r;
    }
    if let Some(pid) = cli.common.server_pid
        && !sys::process_alive(pid)
    {
        r.error = Some(format!("--server-pid {pid}: no such process"));
        return r;
    }
    if cli.common.threads == 0 {
        r.error = Some("--threads must be at least 1".into());
        return r;
    }
    let result = match &cli.workload {
        Workload::Fanout(a) => {
            r.params.put("rooms", a.rooms);
            r.params.put("members", a.members);
            r.params.put("publishers", a.publishers);
            r.params.put("rate", a.rate);
            r.params.put("in_flight", a.in_flight);
            r.params.put("size", a.size as u64);
            r.params.put(
                "window",
                if a.window == WindowArg::Ack {
                    "ack"
                } else {
                    "echo"
                },
            );
            let spec = RoomsSpec::fanout(a.rooms, a.members, a.publishers.min(a.members));
            run_rooms(
                &cli.common,
                &target,
                &mut r,
                spec,
                RoomsKnobs {
                    size: a.size,
                    rate: a.rate,
                    in_flight: a.in_flight,
                    window_by: if a.window == WindowArg::Ack {
                        WindowBy::Ack
                    } else {
                        WindowBy::Echo
                    },
                    echo_endpoint: false,
                    stall_after: 0.0,
                },
            )
        }
        Workload::Echo(a) => {
            r.params.put("clients", a.clients);
            r.params.put("in_flight", a.in_flight);
            r.params.put("size", a.size as u64);
            r.params.put(
                "endpoint",
                if a.endpoint == EndpointArg::Echo {
                    "echo"
                } else {
                    "room"
                },
            );
            let spec = RoomsSpec::echo(a.clients);
            run_rooms(
                &cli.common,
                &target,
                &mut r,
                spec,
                RoomsKnobs {
                    size: a.size,
                    rate: 0.0,
                    in_flight: a.in_flight,
                    window_by: WindowBy::Echo,
                    echo_endpoint: a.endpoint == EndpointArg::Echo,
                    stall_after: 0.0,
                },
            )
        }
        Workload::Slow(a) => {
            r.params.put("members", a.members);
            r.params.put("publishers", a.publishers);
            r.params.put("rate", a.rate);
            r.params.put("size", a.size as u64);
            r.params.put("stalled", a.stalled);
            r.params.put("stall_after", a.stall_after);
            let spec = RoomsSpec::slow(a.members, a.publishers.min(a.members), a.stalled);
            run_rooms(
                &cli.common,
                &target,
                &mut r,
                spec,
                RoomsKnobs {
                    size: a.size,
                    rate: a.rate.max(1.0),
                    in_flight: 0,
                    window_by: WindowBy::Echo,
                    echo_endpoint: false,
                    stall_after: a.stall_after,
                },
            )
        }
        Workload::Idle(a) => {
            r.params.put("connections", a.connections);
            r.params.put("rooms", a.rooms);
            r.params.put("hold", a.hold);
            run_pool(
                &cli.common,
                &target,
                &mut r,
                a.connections,
                a.rooms,
                None,
                a.hold,
            )
        }
        Workload::Churn(a) => {
            r.params.put("connections", a.connections);
            r.params.put("rate", a.rate);
            r.params.put("rooms", a.rooms);
            r.params.put(
                "close",
                if a.close == CloseArg::Abrupt {
                    "abrupt"
                } else {
                    "graceful"
                },
            );
            run_pool(
                &cli.common,
                &target,
                &mut r,
                a.connections,
                a.rooms,
                Some((a.rate, a.close == CloseArg::Abrupt)),
                0.0,
            )
        }
    };
    let c = &cli.common;
    r.params.put("threads", c.threads as u64);
    r.params.put("sources", c.sources);
    if !matches!(cli.workload, Workload::Idle(_)) {
        r.params.put("duration", c.duration);
        r.params.put("warmup", c.warmup);
    }
    if let Some(pid) = c.server_pid {
        r.params.put("server_pid", pid);
    } else {
        r.warn("no --server-pid: the server's CPU and memory were not measured");
    }
    if target.secure {
        r.section("tls");
        let negotiated = crate::tls::negotiated().unwrap_or("no handshake finished");
        r.fig(
            "tls_negotiated",
            "negotiated (first handshake)",
            negotiated,
            negotiated.to_string(),
        );
    }
    if let Err(e) = result {
        r.error = Some(e);
    }
    r
}

/// `wss://`: the client configuration from the trust flags, and the run's
/// params (`tls`, `tls_verify`). `ws://` with a trust flag only warns.
fn setup_tls(c: &Common, target: &mut Target, r: &mut Report) -> Result<(), String> {
    let trust = match (&c.ca, c.insecure_skip_verify) {
        (Some(path), _) => Some(crate::tls::Trust::Ca(path.clone())),
        (None, true) => Some(crate::tls::Trust::InsecureSkipVerify),
        (None, false) => None,
    };
    r.params.put("tls", target.secure);
    if !target.secure {
        if trust.is_some() {
            r.warn("--ca / --insecure-skip-verify are unused: --url is ws://, not wss://");
        }
        return Ok(());
    }
    let trust = trust.ok_or(
        "wss:// needs --ca FILE (the server's certificate or its CA, PEM) or --insecure-skip-verify",
    )?;
    r.params.put("tls_verify", trust.label());
    if matches!(trust, crate::tls::Trust::InsecureSkipVerify) {
        r.warn("--insecure-skip-verify: the server's certificate was not verified (benchmarks against a test certificate only)");
    }
    target.tls = Some(crate::tls::client_config(&trust)?);
    Ok(())
}

/// Hints for connections that failed in TLS.
fn tls_hints(r: &mut Report, fails: &Tally) {
    if !fails.keys().any(|k| k.starts_with("tls:")) {
        return;
    }
    if fails
        .keys()
        .any(|k| k.contains("NotValidForName") || k.contains("CaUsedAsEndEntity"))
    {
        r.warn(
            "TLS: the certificate does not fit --ca verification; a self-signed one needs \
             subjectAltName with the URL's host (IP:127.0.0.1, DNS:localhost) and basicConstraints \
             CA:FALSE (openssl req -x509 … -addext subjectAltName=… -addext basicConstraints=critical,CA:FALSE)",
        );
    } else {
        r.warn("TLS handshakes failed: is --ca the server's certificate (or its CA)?");
    }
}

// ---------------------------------------------------------------------------
// Shared pieces

fn progress_bar(json_only: bool, len: u64, what: &str) -> ProgressBar {
    let bar = if json_only {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Server memory over time plus its extremes.
#[derive(Default)]
struct RssLog {
    samples: Vec<(f64, u64)>,
    max: u64,
}

impl RssLog {
    fn sample(&mut self, pid: Option<u32>, t0: u64) {
        if let Some(rss) = pid.and_then(sys::rss_bytes) {
            self.max = self.max.max(rss);
            self.samples
                .push(((now_ns().saturating_sub(t0)) as f64 / 1e9, rss));
        }
    }

    fn last(&self) -> Option<u64> {
        self.samples.last().map(|s| s.1)
    }

    /// About `n` evenly spaced samples as `[[secs, MiB], …]`.
    fn series(&self, n: usize) -> Value {
        let step = (self.samples.len() / n.max(1)).max(1);
        Value::Array(
            self.samples
                .iter()
                .step_by(step)
                .map(|(t, rss)| json!([round(*t, 2), round(*rss as f64 / 1048576.0, 2)]))
                .collect(),
        )
    }
}

/// The server's open files over time: changes only.
#[derive(Default)]
struct FdLog {
    changes: Vec<(f64, u64)>,
}

impl FdLog {
    fn sample(&mut self, pid: Option<u32>, t0: u64) {
        if let Some(n) = pid.and_then(sys::open_fds)
            && self.changes.last().is_none_or(|&(_, last)| last != n)
        {
            self.changes
                .push((round(now_ns().saturating_sub(t0) as f64 / 1e9, 2), n));
        }
    }
}

/// CPU figures and the saturation warnings common to every workload.
/// Where the CPU per delivery goes: the kernel's share on both sides, and
/// the harness's own cost. On loopback the sender's syscall also runs the
/// receiver's TCP work, so the two kernel figures together are what the
/// machine spends per delivery whatever the server's code does.
fn per_delivery_split(r: &mut Report, w: &CpuWindow, delivered: u64, echo: bool) {
    if delivered == 0 {
        return;
    }
    let per = |us: u64| us as f64 / delivered as f64;
    let unit = if echo { "round trip" } else { "delivery" };
    if let Some(kernel) = w.server_kernel_us {
        let value = per(kernel);
        r.fig(
            "server_kernel_us_per_delivery",
            "  of which in the kernel",
            round(value, 4),
            format!("{value:.3}µs"),
        );
    }
    let client = per(w.client_us);
    r.fig(
        "client_cpu_us_per_delivery",
        &format!("harness CPU µs per {unit}"),
        round(client, 4),
        format!("{client:.3}µs"),
    );
    let client_kernel = per(w.client_kernel_us);
    r.fig(
        "client_kernel_us_per_delivery",
        "  of which in the kernel",
        round(client_kernel, 4),
        format!("{client_kernel:.3}µs"),
    );
}

/// The server's CPU per thread (`server.thread_cpu_pct`: name → % of a
/// core, threads that used any) and per event loop (`server.loop_cpu_pct`,
/// `loop_balance` = least busy loop ÷ busiest).
fn server_thread_figures(r: &mut Report, w: &CpuWindow) {
    if w.server_threads_pct.is_empty() {
        return;
    }
    let pct = |p: f64| {
        if p >= 10.0 {
            format!("{p:.0}%")
        } else {
            format!("{p:.1}%")
        }
    };
    const SHOWN: usize = 8;
    let mut busiest = w.server_threads_pct.clone();
    busiest.sort_by(|x, y| y.1.total_cmp(&x.1));
    let mut shown: Vec<String> = busiest
        .iter()
        .take(SHOWN)
        .map(|(name, p)| format!("{name} {}", pct(*p)))
        .collect();
    if busiest.len() > SHOWN {
        let rest: f64 = busiest[SHOWN..].iter().map(|t| t.1).sum();
        shown.push(format!("{} more {}", busiest.len() - SHOWN, pct(rest)));
    }
    r.row("  server threads (busiest first)", shown.join("  "));
    r.server.put(
        "thread_cpu_pct",
        Value::Object(
            w.server_threads_pct
                .iter()
                .map(|(name, p)| (name.clone(), Value::from(round(*p, 1))))
                .collect(),
        ),
    );
    if w.loops_pct.is_empty() {
        return;
    }
    r.server.put("loops", w.loops_pct.len() as u64);
    r.server.put(
        "loop_cpu_pct",
        Value::from(
            w.loops_pct
                .iter()
                .map(|l| round(l.1, 1))
                .collect::<Vec<_>>(),
        ),
    );
    if let Some(balance) = w.loop_balance() {
        r.fig(
            "loop_balance",
            "  event-loop balance (least ÷ most busy)",
            round(balance, 3),
            format!(
                "{balance:.2}  ({} loop{}: {})",
                w.loops_pct.len(),
                if w.loops_pct.len() == 1 { "" } else { "s" },
                w.loops_pct
                    .iter()
                    .map(|l| pct(l.1))
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
        );
        r.server.put("loop_balance", round(balance, 3));
    }
}

fn cpu_figures(r: &mut Report, w: &CpuWindow, threads: usize, section: &str) {
    r.section(section);
    if let (Some(pct), Some(us)) = (w.server_pct, w.server_us) {
        r.fig(
            "server_cpu_pct",
            "server CPU (% of one core)",
            round(pct, 1),
            format!("{:.1}%", pct),
        );
        r.server.put("cpu_pct", round(pct, 1));
        r.server.put("cpu_us", us);
        server_thread_figures(r, w);
    }
    r.fig(
        "client_cpu_pct",
        "harness CPU (% of one core)",
        round(w.client_pct, 1),
        format!(
            "{:.1}%  (threads: {})",
            w.client_pct,
            w.threads_pct
                .iter()
                .map(|p| format!("{p:.0}%"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    r.client.put("cpu_pct", round(w.client_pct, 1));
    r.client.put("threads", threads as u64);
    r.client.put(
        "thread_cpu_pct",
        Value::from(
            w.threads_pct
                .iter()
                .map(|p| round(*p, 1))
                .collect::<Vec<_>>(),
        ),
    );
    let busiest = w.threads_pct.iter().cloned().fold(0.0, f64::max);
    let saturated = busiest >= 90.0 || w.client_pct >= 90.0 * threads as f64;
    r.client.put("saturated", saturated);
    if saturated {
        r.warn(format!(
            "client-saturated: a harness thread used {busiest:.0}% of a core, so these figures are the harness's limit, not the server's (try --threads {})",
            threads + 1
        ));
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let others = (w.machine_pct - w.client_pct - w.server_pct.unwrap_or(0.0)).max(0.0);
    r.fig(
        "machine_cpu_pct",
        "whole machine CPU (% of one core)",
        round(w.machine_pct, 1),
        format!(
            "{:.1}% of {:.0}00%  (other processes ≈ {:.0}%)",
            w.machine_pct, cores, others
        ),
    );
    r.client.put("machine_cpu_pct", round(w.machine_pct, 1));
    if w.server_pct.is_some() {
        r.client.put("other_cpu_pct", round(others, 1));
        if others >= 25.0 {
            r.warn(format!(
                "other processes used ≈{others:.0}% of a core during the window: figures are perturbed"
            ));
        }
    }
    let bottleneck = if saturated {
        "client (harness thread at ≥90% of a core)"
    } else if w.machine_pct >= 90.0 * cores {
        "machine CPU (server, harness and others share the cores)"
    } else if w.server_pct.is_some_and(|p| p >= 90.0) {
        "server (≥90% of one core)"
    } else if w.server_pct.is_some() {
        "none saturated: bound by latency × in-flight window or the requested rate"
    } else {
        "unknown (no --server-pid)"
    };
    r.fig(
        "bottleneck",
        "bottleneck",
        bottleneck,
        bottleneck.to_string(),
    );
    if w.machine_pct >= 90.0 * cores {
        r.warn(format!(
            "machine saturated: {:.0}% of {cores:.0} cores busy (server {:.0}%, harness {:.0}%); server and harness compete for CPU",
            w.machine_pct,
            w.server_pct.unwrap_or(0.0),
            w.client_pct
        ));
    }
}

fn join_all<T>(handles: Vec<JoinHandle<Result<T, String>>>) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    let mut err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => err = Some(e),
            Err(_) => err = Some("a client thread panicked".into()),
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn tally_json(t: &Tally) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect(),
    )
}

fn tally_text(t: &Tally) -> String {
    if t.is_empty() {
        return "none".into();
    }
    t.iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sleep_until(ns: u64) {
    let now = now_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

fn server_gone(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| !sys::process_alive(p))
}

// ---------------------------------------------------------------------------
// fanout / echo / slow

struct RoomsSpec {
    rooms: Vec<String>,
    members: Vec<MemberSpec>,
    /// Members per room that should receive each message (healthy ones).
    receivers_per_room: u64,
    publishers: u64,
}

impl RoomsSpec {
    fn fanout(rooms: u32, members: u32, publishers: u32) -> RoomsSpec {
        let mut specs = Vec::new();
        for r in 0..rooms {
            for j in 0..members {
                specs.push(MemberSpec {
                    user: u64::from(r) * u64::from(members) + u64::from(j),
                    room: r,
                    publisher: (j < publishers).then_some(r * publishers + j),
                    stalled: false,
                });
            }
        }
        RoomsSpec {
            rooms: (0..rooms).map(|r| format!("bench-{r}")).collect(),
            members: specs,
            receivers_per_room: u64::from(members),
            publishers: u64::from(rooms) * u64::from(publishers),
        }
    }

    fn echo(clients: u32) -> RoomsSpec {
        let mut s = RoomsSpec::fanout(clients, 1, 1);
        s.rooms = (0..clients).map(|c| format!("echo-{c}")).collect();
        s
    }

    fn slow(members: u32, publishers: u32, stalled: u32) -> RoomsSpec {
        let mut s = RoomsSpec::fanout(1, members, publishers);
        s.rooms = vec!["slow-0".into()];
        for i in 0..stalled {
            s.members.push(MemberSpec {
                user: u64::from(members + i),
                room: 0,
                publisher: None,
                stalled: true,
            });
        }
        s
    }
}

struct RoomsKnobs {
    size: usize,
    rate: f64,
    in_flight: u32,
    window_by: WindowBy,
    echo_endpoint: bool,
    stall_after: f64,
}

fn run_rooms(
    c: &Common,
    target: &Target,
    r: &mut Report,
    spec: RoomsSpec,
    k: RoomsKnobs,
) -> Result<(), String> {
    let workload = r.workload.clone();
    let total = spec.members.len() as u64;
    if total == 0 {
        return Err("nothing to do: zero connections".into());
    }
    if spec.publishers == 0 {
        return Err("at least one publisher is needed".into());
    }
    let limit = sys::raise_nofile_limit();
    if total + FD_RESERVE > limit {
        return Err(format!(
            "{total} connections need more than this process's {limit} open-files limit (client at the {limit} open-files cap)"
        ));
    }
    let threads = c.threads.min(spec.members.len());
    let shared = Arc::new(Shared::new(threads));
    let rooms = Arc::new(spec.rooms.clone());
    let rate_per_publisher = if k.rate > 0.0 {
        k.rate / spec.publishers as f64
    } else {
        0.0
    };
    let mut handles = Vec::new();
    for t in 0..threads {
        let members: Vec<MemberSpec> = spec
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| i % threads == t)
            .map(|(_, m)| *m)
            .collect();
        let plan = rooms::Plan {
            target: target.clone(),
            sources: if target.addr.is_ipv4() {
                source_addrs(c.sources)
            } else {
                vec![]
            },
            secret: c.secret.as_bytes().to_vec(),
            echo_endpoint: k.echo_endpoint,
            rooms: rooms.clone(),
            size: k.size,
            rate_per_publisher,
            total_publishers: spec.publishers,
            in_flight: k.in_flight.max(1),
            window_by: k.window_by,
            connect_rate: c.connect_rate / threads as f64,
            max_pending: (c.max_pending / threads as u64).max(1),
            handshake_timeout_ns: (c.handshake_timeout * 1e9) as u64,
            stall_after_ns: (k.stall_after * 1e9) as u64,
            members,
        };
        let shared = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("client-{t}"))
                .spawn(move || rooms::run(plan, shared, t))
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    let pid = c.server_pid;
    let t0 = now_ns();
    let mut rss = RssLog::default();
    let rss_before = pid.and_then(sys::rss_bytes);

    // Connect and join everyone.
    let bar = progress_bar(c.json_only, total, "connect");
    let setup_error = loop {
        std::thread::sleep(Duration::from_millis(50));
        let ready = shared.sum(|p| &p.ready);
        let failed = shared.sum(|p| &p.failed);
        bar.set_position(ready);
        if failed > 0 {
            break Some(format!(
                "{failed} of {total} connections failed before joining"
            ));
        }
        if ready >= total {
            break None;
        }
        if server_gone(pid) {
            break Some("the server process exited".into());
        }
        if handles.iter().any(|h| h.is_finished()) {
            break Some("a client thread stopped".into());
        }
    };
    bar.finish_and_clear();
    let connect_secs = (now_ns() - t0) as f64 / 1e9;
    if let Some(e) = setup_error {
        shared.stop.store(true, Ordering::Release);
        let stats = join_all(handles)?;
        let mut fails = Tally::new();
        for s in &stats {
            tally_merge(&mut fails, &s.failed_connects);
        }
        r.section("connections");
        r.fig(
            "connect_failures",
            "connect failures",
            tally_json(&fails),
            tally_text(&fails),
        );
        if fails.keys().any(|k| k.starts_with("http_401")) {
            r.warn("401 from the server: is --secret the server's --jwt-secret?");
        }
        tls_hints(r, &fails);
        if fails.keys().any(|k| k.starts_with("http_404")) && k.echo_endpoint {
            r.warn("404 on /echo: start the server with --echo");
        }
        return Err(e);
    }

    // Schedule: traffic starts now, the window after the warm-up.
    let go = now_ns() + 10_000_000;
    let ms = go + (c.warmup.max(0.0) * 1e9) as u64;
    let me = ms + (c.duration.max(0.1) * 1e9) as u64;
    shared.go_ns.store(go, Ordering::Release);
    shared.measure_start.store(ms, Ordering::Release);
    shared.measure_end.store(me, Ordering::Release);
    shared.go.store(true, Ordering::Release);

    let total_ms = (me - go) / 1_000_000;
    let bar = progress_bar(c.json_only, total_ms, &workload);
    let mut snap_a: Option<CpuSnap> = None;
    let mut last_rss = 0u64;
    let mut last_del = (now_ns(), 0u64);
    let tids = shared.tids();
    let mut rss_at_start = None;
    // slow: the server's open files over time show when it lets a socket go.
    let slow = spec.members.iter().any(|m| m.stalled);
    let mut fd_log = FdLog::default();
    fd_log.sample(pid, go);
    loop {
        let now = now_ns();
        if now >= me {
            break;
        }
        if snap_a.is_none() && now >= ms {
            snap_a = Some(sys::cpu_snap(pid, &tids));
            rss_at_start = pid.and_then(sys::rss_bytes);
        }
        if now - last_rss >= 250_000_000 {
            last_rss = now;
            rss.sample(pid, go);
            if slow {
                fd_log.sample(pid, go);
            }
        }
        let del = shared.sum(|p| &p.delivered);
        if now - last_del.0 >= 500_000_000 {
            let per_s = (del - last_del.1) as f64 / ((now - last_del.0) as f64 / 1e9);
            bar.set_message(format!(
                "{} delivered/s{}",
                int(per_s as u64),
                if now < ms { " (warm-up)" } else { "" }
            ));
            last_del = (now, del);
        }
        bar.set_position(now.saturating_sub(go) / 1_000_000);
        if server_gone(pid) {
            break;
        }
        let next = if snap_a.is_none() {
            ms.min(now + 100_000_000)
        } else {
            (now + 100_000_000).min(me)
        };
        sleep_until(next);
    }
    let snap_a = snap_a.unwrap_or_else(|| sys::cpu_snap(pid, &tids));
    let snap_b = sys::cpu_snap(pid, &tids);
    let rss_end = pid.and_then(sys::rss_bytes);
    bar.finish_and_clear();

    // Drain: wait for messages still in flight.
    let drain_start = now_ns();
    let mut last = shared.sum(|p| &p.delivered);
    let mut stable_since = now_ns();
    while now_ns() - drain_start < 5_000_000_000 {
        std::thread::sleep(Duration::from_millis(50));
        let d = shared.sum(|p| &p.delivered);
        if d != last {
            last = d;
            stable_since = now_ns();
        } else if now_ns() - stable_since > 300_000_000 {
            break;
        }
    }
    if slow {
        rss.sample(pid, go);
        fd_log.sample(pid, go);
        shared.resume_stalled.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(1500));
        rss.sample(pid, go);
        fd_log.sample(pid, go);
    }
    let server_alive = !server_gone(pid);
    shared.stop.store(true, Ordering::Release);
    let stats = join_all(handles)?;
    if !server_alive {
        r.warn("the server process exited during the run");
    }

    // Merge.
    let mut hist = crate::common::histogram();
    let mut spread = crate::common::histogram();
    let (mut published, mut delivered, mut gaps, mut dups) = (0u64, 0u64, 0u64, 0u64);
    let (mut lagged_frames, mut lagged_msgs, mut window_timeouts, mut blocked) = (0, 0, 0, 0);
    let mut behind = 0u64;
    let (mut errors, mut closes) = (Tally::new(), Tally::new());
    let mut stalled = Vec::new();
    for s in stats {
        hist.add(&s.hist).map_err(|e| format!("histogram: {e}"))?;
        spread
            .add(&s.spread)
            .map_err(|e| format!("histogram: {e}"))?;
        published += s.published;
        delivered += s.delivered;
        gaps += s.gaps;
        dups += s.dups;
        lagged_frames += s.lagged_frames;
        lagged_msgs += s.lagged_msgs;
        window_timeouts += s.window_timeouts;
        blocked += s.send_blocked;
        behind = behind.max(s.behind_max_ns);
        tally_merge(&mut errors, &s.errors);
        tally_merge(&mut closes, &s.closes);
        stalled.extend(s.stalled);
    }
    let cpu = sys::cpu_window(&snap_a, &snap_b);
    let secs = cpu.secs.max(1e-9);
    let expected = published * spec.receivers_per_room;
    let ratio = if expected > 0 {
        delivered as f64 / expected as f64
    } else {
        0.0
    };

    r.section("setup");
    r.fig("connections", "connections", total, int(total));
    r.fig(
        "connect_secs",
        "connect + join time",
        round(connect_secs, 2),
        format!("{connect_secs:.2}s"),
    );
    r.fig(
        "window_secs",
        "measured window",
        round(secs, 2),
        format!("{secs:.2}s"),
    );

    r.section("traffic");
    let echo = workload == "echo";
    let published_per_s = published as f64 / secs;
    let deliveries_per_s = delivered as f64 / secs;
    r.fig(
        "published",
        "published (in window)",
        published,
        int(published),
    );
    if echo {
        r.key_fig(
            "round_trips_per_s",
            "round trips/s",
            round(deliveries_per_s, 1),
            rate(deliveries_per_s),
        );
        r.fig(
            "published_per_s",
            "sent/s",
            round(published_per_s, 1),
            rate(published_per_s),
        );
    } else {
        r.key_fig(
            "published_per_s",
            "published/s",
            round(published_per_s, 1),
            rate(published_per_s),
        );
        r.key_fig(
            "deliveries_per_s",
            "deliveries/s",
            round(deliveries_per_s, 1),
            rate(deliveries_per_s),
        );
    }
    r.fig(
        "delivered",
        "delivered (in window)",
        delivered,
        int(delivered),
    );
    r.key_fig(
        "delivery_ratio",
        if workload == "slow" {
            "delivery ratio (healthy members)"
        } else {
            "delivery ratio"
        },
        round(ratio, 6),
        format!(
            "{ratio:.6}  (delivered ÷ published × {})",
            spec.receivers_per_room
        ),
    );
    r.fig("seq_gaps", "seq gaps (messages missed)", gaps, int(gaps));
    r.fig("seq_dups", "seq duplicates / out of order", dups, int(dups));
    r.fig(
        "lagged_msgs",
        "lagged (reported missed)",
        lagged_msgs,
        format!("{} in {} lagged frames", int(lagged_msgs), lagged_frames),
    );
    r.fig(
        "server_errors",
        "error frames",
        tally_json(&errors),
        tally_text(&errors),
    );
    r.fig(
        "unexpected_closes",
        "closes",
        tally_json(&closes),
        tally_text(&closes),
    );
    if k.rate > 0.0 {
        let achieved = published_per_s / k.rate;
        r.fig(
            "rate_achieved",
            "publish rate achieved",
            round(achieved, 4),
            format!("{:.1}% of {}", achieved * 100.0, rate(k.rate)),
        );
        if achieved < 0.95 {
            r.warn(format!(
                "publishers reached only {:.1}% of --rate {} (harness fell behind by up to {}, or its write buffers filled {} times)",
                achieved * 100.0,
                k.rate,
                report::us(behind / 1000),
                blocked
            ));
        }
    }
    if window_timeouts > 0 {
        r.fig(
            "window_timeouts",
            "publisher windows lost",
            window_timeouts,
            int(window_timeouts),
        );
        r.warn(format!(
            "{window_timeouts} publisher windows stalled for 1 s (their own broadcasts never came back: dropped by the server?) and were reopened"
        ));
    }
    if ratio < 0.999 && expected > 0 {
        r.warn(format!(
            "delivery ratio {ratio:.4} < 1: {} deliveries missing ({} seq gaps, {} reported in lagged)",
            expected.saturating_sub(delivered),
            gaps,
            lagged_msgs
        ));
    }
    if errors.contains_key("rate_limited") {
        r.warn(format!(
            "the server answered rate_limited {} times: start it with --rate-limit 0 for benchmarks",
            errors["rate_limited"]
        ));
    }
    if published == 0 {
        r.warn("nothing was published in the measured window");
    }

    r.section("latency");
    r.latency(
        "latency",
        if workload == "slow" {
            "healthy members (send → receive)"
        } else {
            "send → receive"
        },
        &hist,
        true,
    );
    if !spread.is_empty() {
        // How long one message takes to reach all of a room: the server's
        // sends to the members one after the other, and the harness's reads.
        r.latency(
            "spread",
            "spread (first → last member, per message)",
            &spread,
            false,
        );
    }

    cpu_figures(r, &cpu, threads, "cpu (measured window)");
    if let Some(us) = cpu.server_us {
        let per = if delivered > 0 {
            us as f64 / delivered as f64
        } else {
            0.0
        };
        r.key_fig(
            "server_cpu_us_per_delivery",
            if echo {
                "server CPU µs per round trip"
            } else {
                "server CPU µs per delivery"
            },
            round(per, 4),
            format!("{per:.3}µs"),
        );
    }
    per_delivery_split(r, &cpu, delivered, echo);
    server_memory(r, rss_before, rss_at_start, rss_end, &rss);

    if slow {
        slow_figures(r, &stalled, go, &rss, &fd_log);
    }
    Ok(())
}

fn server_memory(
    r: &mut Report,
    before: Option<u64>,
    start: Option<u64>,
    end: Option<u64>,
    log: &RssLog,
) {
    let Some(before) = before else { return };
    r.section("server memory");
    r.fig(
        "server_rss_before",
        "RSS before connecting",
        before,
        bytes(before),
    );
    r.server.put("rss_before", before);
    if let Some(s) = start {
        r.fig(
            "server_rss_window_start",
            "RSS at window start",
            s,
            bytes(s),
        );
        r.server.put("rss_window_start", s);
    }
    if let Some(e) = end {
        r.fig("server_rss_window_end", "RSS at window end", e, bytes(e));
        r.server.put("rss_window_end", e);
    }
    r.fig(
        "server_rss_max",
        "RSS max (sampled)",
        log.max,
        bytes(log.max),
    );
    r.server.put("rss_max", log.max);
}

fn slow_figures(
    r: &mut Report,
    stalled: &[rooms::StalledReport],
    go: u64,
    rss: &RssLog,
    fds: &FdLog,
) {
    r.section("stalled members");
    let rel = |ns: u64| round((ns.saturating_sub(go)) as f64 / 1e9, 3);
    let mut list = Vec::new();
    for s in stalled {
        // State changes of its socket while it was not reading.
        let mut timeline = Vec::new();
        let mut prev: Option<(u8, bool)> = None;
        for smp in &s.samples {
            let key = (smp.tcp_state, smp.unread > 0);
            if prev != Some(key) {
                timeline.push(json!([
                    rel(smp.at_ns),
                    rooms::tcp_state_name(smp.tcp_state),
                    smp.unread
                ]));
                prev = Some(key);
            }
        }
        let what = match (&s.closed, s.closed_at_ns, s.resumed_at_ns) {
            (Some(why), Some(at), Some(resumed)) if at >= resumed => format!(
                "its close ({why}) was found when it read again at +{:.2}s (see the server's open files for when the server let go)",
                rel(at)
            ),
            (Some(why), Some(at), _) => format!("closed ({why}) at +{:.2}s", rel(at)),
            _ => "still open at the end".into(),
        };
        r.row(
            &format!("bench-{}", s.user),
            format!(
                "stopped reading at +{:.2}s; {}; hang-up seen: {}; {} KiB unread at most",
                rel(s.paused_at_ns),
                what,
                s.hangup_at_ns
                    .map_or("no".into(), |h| format!("+{:.2}s", rel(h))),
                s.max_unread / 1024
            ),
        );
        r.row(
            "  after it read again",
            format!(
                "{} messages, {} missed by seq, lagged frames {} ({} msgs)",
                s.msgs_after_resume, s.gap_msgs, s.lagged_frames, s.lagged_msgs
            ),
        );
        list.push(json!({
            "user": format!("bench-{}", s.user),
            "paused_at_s": rel(s.paused_at_ns),
            "hangup_at_s": s.hangup_at_ns.map(rel),
            "closed_at_s": s.closed_at_ns.map(rel),
            "closed": s.closed,
            "resumed_at_s": s.resumed_at_ns.map(rel),
            "max_unread_bytes": s.max_unread,
            "msgs_after_resume": s.msgs_after_resume,
            "gap_msgs": s.gap_msgs,
            "lagged_frames": s.lagged_frames,
            "lagged_msgs": s.lagged_msgs,
            "socket_timeline": timeline,
        }));
    }
    r.figures.put("stalled", Value::Array(list));
    if !rss.samples.is_empty() {
        let series = rss.series(40);
        let shown: Vec<String> = series
            .as_array()
            .map(|a| {
                a.iter()
                    .step_by((a.len() / 8).max(1))
                    .map(|p| format!("{}s:{}MiB", p[0], p[1]))
                    .collect()
            })
            .unwrap_or_default();
        r.fig(
            "server_rss_series",
            "server RSS over time",
            series,
            shown.join(" "),
        );
    }
    if !fds.changes.is_empty() {
        let shown: Vec<String> = fds
            .changes
            .iter()
            .map(|(t, n)| format!("{t}s:{n}"))
            .collect();
        r.fig(
            "server_fds_timeline",
            "server open files (changes; +s since traffic start)",
            Value::from(
                fds.changes
                    .iter()
                    .map(|(t, n)| json!([t, n]))
                    .collect::<Vec<_>>(),
            ),
            shown.join(" "),
        );
    }
}

// ---------------------------------------------------------------------------
// idle / churn

#[allow(clippy::too_many_arguments)]
fn run_pool(
    c: &Common,
    target: &Target,
    r: &mut Report,
    connections: u64,
    rooms_n: u32,
    churn: Option<(f64, bool)>,
    hold: f64,
) -> Result<(), String> {
    let workload = r.workload.clone();
    if connections == 0 {
        return Err("nothing to do: --connections 0".into());
    }
    let limit = sys::raise_nofile_limit();
    let threads = c.threads.max(1).min(connections as usize);
    // Files already open, one epoll per thread, and a reserve for /proc.
    let open_now = sys::open_fds(std::process::id()).unwrap_or(8);
    let socket_budget = limit.saturating_sub(open_now + threads as u64 + FD_RESERVE);
    let pid = c.server_pid;
    let server_fd_limit = pid.and_then(sys::fd_limit_of);
    let sock_before = sys::sockstat();
    let rss_before = pid.and_then(sys::rss_bytes);
    let fds_before = pid.and_then(sys::open_fds);
    // The harness's own memory per connection (its side of TLS, with wss://).
    let client_rss_before = sys::rss_bytes(std::process::id());
    let shared = Arc::new(Shared::new(threads));
    let rooms = Arc::new(
        (0..rooms_n.max(1))
            .map(|i| format!("bench-{i}"))
            .collect::<Vec<_>>(),
    );
    let mut handles = Vec::new();
    for t in 0..threads {
        let share =
            connections / threads as u64 + u64::from((t as u64) < connections % threads as u64);
        let max_sockets = socket_budget / threads as u64;
        let plan = pool::Plan {
            target: target.clone(),
            sources: if target.addr.is_ipv4() {
                source_addrs(c.sources)
            } else {
                vec![]
            },
            secret: c.secret.as_bytes().to_vec(),
            rooms: rooms.clone(),
            initial: share,
            first_user: t as u64,
            user_stride: threads as u64,
            connect_rate: c.connect_rate / threads as f64,
            max_pending: (c.max_pending / threads as u64).max(1),
            max_sockets,
            handshake_timeout_ns: (c.handshake_timeout * 1e9) as u64,
            churn_rate: churn.map_or(0.0, |(rate, _)| rate / threads as f64),
            abrupt: churn.is_some_and(|(_, a)| a),
        };
        let shared = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("client-{t}"))
                .spawn(move || pool::run(plan, shared, t))
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    let t0 = now_ns();
    let tids = shared.tids();
    let snap_connect = sys::cpu_snap(pid, &tids);

    // Connect phase, watching for the open-files cap on either side.
    let bar = progress_bar(c.json_only, connections, "connect");
    let mut cap: Option<String> = None;
    let mut last_ready = 0u64;
    let mut last_progress = now_ns();
    let mut cap_seen_at: Option<u64> = None;
    let mut last_fd_check = 0u64;
    let mut server_exited = false;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = now_ns();
        let ready = shared.sum(|p| &p.ready);
        let failed = shared.sum(|p| &p.failed);
        let live = shared.sum(|p| &p.live);
        bar.set_position(ready);
        bar.set_message(format!("failed {failed}"));
        if ready != last_ready {
            last_ready = ready;
            last_progress = now;
        }
        if ready + failed >= connections || (cap.is_some() && live <= ready) {
            break;
        }
        if server_gone(pid) {
            server_exited = true;
            break;
        }
        if cap.is_none() && now - last_fd_check >= 500_000_000 {
            last_fd_check = now;
            let client_cap = shared
                .progress
                .iter()
                .any(|p| p.emfile.load(Ordering::Relaxed));
            let server_fds = pid.and_then(sys::open_fds);
            let server_cap = match (server_fds, server_fd_limit) {
                (Some(n), Some(l)) => n + 2 >= l,
                _ => false,
            };
            if client_cap || server_cap {
                let who = match (client_cap, server_cap) {
                    (true, true) => "server/client",
                    (true, false) => "client",
                    _ => "server",
                };
                let lim = if server_cap {
                    server_fd_limit.unwrap_or(limit)
                } else {
                    limit
                };
                let note = if server_cap {
                    ""
                } else {
                    " (the harness keeps a few files for itself)"
                };
                cap = Some(format!("{who} at the {} open-files cap{note}", int(lim)));
                cap_seen_at = Some(now);
                shared.stop_connecting.store(true, Ordering::Release);
            } else if now - last_progress > 5_000_000_000 && live > ready {
                // Nothing joined for 5 s while connections wait: a server
                // that stopped accepting. Say why if we can.
                let why = match (server_fds, server_fd_limit) {
                    (Some(n), Some(l)) if n + 16 >= l => {
                        format!("server at the {} open-files cap", int(l))
                    }
                    _ => "server stopped accepting (no connection joined for 5 s)".to_string(),
                };
                cap = Some(why);
                cap_seen_at = Some(now);
                shared.stop_connecting.store(true, Ordering::Release);
            }
        }
        // After a cap, give waiting handshakes a moment, then go on.
        if let Some(at) = cap_seen_at
            && now - at > 2_000_000_000
        {
            break;
        }
    }
    bar.finish_and_clear();
    shared
        .stop_connecting
        .store(cap.is_some(), Ordering::Release);
    std::thread::sleep(Duration::from_millis(300));
    let snap_joined = sys::cpu_snap(pid, &tids);
    let ready = shared.sum(|p| &p.ready);
    let setup_secs = (now_ns() - t0) as f64 / 1e9;
    let rss_after = pid.and_then(sys::rss_bytes);
    let client_rss_after = sys::rss_bytes(std::process::id());
    let sock_after = sys::sockstat();
    let fds_after = pid.and_then(sys::open_fds);
    let mut rss = RssLog::default();

    let mut churn_cpu = None;
    let mut churn_samples: Vec<(u64, u64, u64, u64)> = Vec::new(); // (ready, live, server fds, tw)
    let mut window = (0u64, 0u64);
    if !server_exited {
        if let Some((_, _)) = churn {
            let go = now_ns() + 10_000_000;
            let ms = go + (c.warmup.max(0.0) * 1e9) as u64;
            let me = ms + (c.duration.max(0.1) * 1e9) as u64;
            window = (ms, me);
            shared.go_ns.store(go, Ordering::Release);
            shared.measure_start.store(ms, Ordering::Release);
            shared.measure_end.store(me, Ordering::Release);
            shared.go.store(true, Ordering::Release);
            let bar = progress_bar(c.json_only, (me - go) / 1_000_000, &workload);
            let mut snap_a = None;
            let mut last_sample = 0;
            loop {
                let now = now_ns();
                if now >= me || server_gone(pid) {
                    break;
                }
                if snap_a.is_none() && now >= ms {
                    snap_a = Some(sys::cpu_snap(pid, &tids));
                }
                if now - last_sample >= 250_000_000 {
                    last_sample = now;
                    rss.sample(pid, go);
                    if now >= ms {
                        churn_samples.push((
                            shared.sum(|p| &p.ready),
                            shared.sum(|p| &p.live),
                            pid.and_then(sys::open_fds).unwrap_or(0),
                            sys::sockstat().tw,
                        ));
                    }
                    bar.set_message(format!(
                        "open {}  connects {}",
                        int(shared.sum(|p| &p.ready)),
                        int(shared.sum(|p| &p.connects))
                    ));
                }
                bar.set_position(now.saturating_sub(go) / 1_000_000);
                std::thread::sleep(Duration::from_millis(50).min(Duration::from_nanos(me - now)));
            }
            bar.finish_and_clear();
            let a = snap_a.unwrap_or_else(|| sys::cpu_snap(pid, &tids));
            churn_cpu = Some(sys::cpu_window(&a, &sys::cpu_snap(pid, &tids)));
            // Let closes in flight finish.
            std::thread::sleep(Duration::from_millis(500));
        } else {
            let bar = progress_bar(c.json_only, (hold * 1000.0) as u64, "hold");
            let end = now_ns() + (hold.max(0.0) * 1e9) as u64;
            while now_ns() < end && !server_gone(pid) {
                rss.sample(pid, t0);
                bar.set_position(
                    (hold * 1000.0) as u64 - (end.saturating_sub(now_ns())) / 1_000_000,
                );
                std::thread::sleep(
                    Duration::from_millis(250)
                        .min(Duration::from_nanos(end.saturating_sub(now_ns()).max(1))),
                );
            }
            bar.finish_and_clear();
        }
    }
    let rss_end = pid.and_then(sys::rss_bytes).or(rss.last());
    let still_ready = shared.sum(|p| &p.ready);
    let snap_end = sys::cpu_snap(pid, &tids);
    shared.stop.store(true, Ordering::Release);
    let stats = join_all(handles)?;
    if server_exited || server_gone(pid) {
        r.warn("the server process exited during the run");
    }

    let mut hist = crate::common::histogram();
    let (mut failed, mut unexpected, mut errors) = (Tally::new(), Tally::new(), Tally::new());
    let (mut connects, mut disconnects, mut cfail, mut ops, mut behind) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut setup_done = 0u64;
    for s in &stats {
        hist.add(&s.connect_hist)
            .map_err(|e| format!("histogram: {e}"))?;
        tally_merge(&mut failed, &s.failed);
        tally_merge(&mut unexpected, &s.unexpected_closes);
        tally_merge(&mut errors, &s.errors);
        connects += s.connects;
        disconnects += s.disconnects;
        cfail += s.connect_failures;
        ops += s.ops_started;
        behind = behind.max(s.ops_behind_max);
        setup_done = setup_done.max(s.setup_done_ns);
    }
    let failed_n: u64 = failed.values().sum();

    r.section("connections");
    r.fig(
        "requested",
        "connections requested",
        connections,
        int(connections),
    );
    if workload == "idle" {
        r.key_fig(
            "connections_joined",
            "connected and joined",
            ready,
            int(ready),
        );
    } else {
        r.fig(
            "connections_joined",
            "connected and joined",
            ready,
            int(ready),
        );
    }
    r.fig(
        "connect_failures",
        "failed",
        tally_json(&failed),
        format!("{} ({})", failed_n, tally_text(&failed)),
    );
    tls_hints(r, &failed);
    let connect_window = if setup_done > t0 {
        (setup_done - t0) as f64 / 1e9
    } else {
        setup_secs
    };
    let connect_rate = ready as f64 / connect_window.max(1e-9);
    if workload == "idle" {
        r.key_fig(
            "connect_rate_per_s",
            "connect rate (connect → joined)",
            round(connect_rate, 1),
            format!(
                "{}  (--connect-rate {})",
                rate(connect_rate),
                c.connect_rate
            ),
        );
        r.latency("connect_latency", "connect → joined", &hist, true);
    }
    if let Some(cap) = &cap {
        let msg = format!(
            "{cap} after {} connections; figures are over those {}",
            int(ready),
            int(ready)
        );
        r.fig("cap", "CAP", msg.clone(), msg.clone());
        r.warn(msg);
    } else if ready < connections && workload == "idle" {
        r.warn(format!(
            "only {} of {} connections joined",
            int(ready),
            int(connections)
        ));
    }
    r.fig(
        "fd_limit_client",
        "harness open-files limit",
        limit,
        int(limit),
    );
    if let Some(l) = server_fd_limit {
        r.fig("fd_limit_server", "server open-files limit", l, int(l));
    }
    if errors.contains_key("rate_limited") {
        r.warn("the server answered rate_limited: start it with --rate-limit 0 for benchmarks");
    }

    if workload == "idle" {
        r.section("memory per connection");
        if let (Some(b), Some(a)) = (rss_before, rss_after) {
            let per = if ready > 0 {
                (a as f64 - b as f64) / ready as f64
            } else {
                0.0
            };
            r.fig("server_rss_before", "server RSS before", b, bytes(b));
            r.fig(
                "server_rss_after",
                "server RSS after all joined",
                a,
                bytes(a),
            );
            r.key_fig(
                "server_rss_per_conn_bytes",
                "server RSS per connection",
                round(per, 1),
                format!("{per:.0} B"),
            );
            if ready >= 100 && per < 100.0 {
                r.warn(
                    "server RSS barely grew: a server that held connections before reuses their memory; start it fresh for this figure",
                );
            }
            r.server.put("rss_before", b);
            r.server.put("rss_after", a);
            if let Some(e) = rss_end {
                r.fig("server_rss_end", "server RSS after hold", e, bytes(e));
                r.server.put("rss_end", e);
            }
        }
        if let (Some(b), Some(a)) = (client_rss_before, client_rss_after)
            && ready > 0
        {
            let per = (a as f64 - b as f64) / ready as f64;
            r.fig(
                "client_rss_per_conn_bytes",
                "harness RSS per connection",
                round(per, 1),
                format!("{per:.0} B"),
            );
            r.client.put("rss_before", b);
            r.client.put("rss_after", a);
        }
        let kb = sock_before.mem_bytes;
        let ka = sock_after.mem_bytes;
        // sockstat `mem` counts pages holding queued data: idle sockets hold
        // about none, so this is ≈0 unless buffers are in use.
        let kper = if ready > 0 {
            ((ka as f64 - kb as f64) / ready as f64).max(0.0)
        } else {
            0.0
        };
        r.fig(
            "kernel_tcp_mem_before",
            "kernel TCP memory before (sockstat)",
            kb,
            bytes(kb),
        );
        r.fig(
            "kernel_tcp_mem_after",
            "kernel TCP memory after",
            ka,
            bytes(ka),
        );
        r.fig(
            "kernel_tcp_mem_per_conn_bytes",
            "kernel TCP memory per connection (both ends)",
            round(kper, 1),
            format!("{kper:.0} B"),
        );
        r.fig(
            "tcp_sockets_inuse",
            "TCP sockets in use before → after",
            json!([sock_before.inuse, sock_after.inuse]),
            format!("{} → {}", int(sock_before.inuse), int(sock_after.inuse)),
        );
        if let (Some(fb), Some(fa)) = (fds_before, fds_after) {
            r.fig(
                "server_fds",
                "server open files before → after",
                json!([fb, fa]),
                format!("{} → {}", int(fb), int(fa)),
            );
        }
        r.section("hold");
        r.fig("held_secs", "held for", hold, format!("{hold:.1}s"));
        r.fig(
            "still_open",
            "still joined at the end",
            still_ready,
            int(still_ready),
        );
        r.fig(
            "closes_during_hold",
            "closed by the server",
            tally_json(&unexpected),
            tally_text(&unexpected),
        );
        if still_ready < ready {
            r.warn(format!(
                "{} connections were closed while idle ({})",
                ready - still_ready,
                tally_text(&unexpected)
            ));
        }
        let setup_cpu = sys::cpu_window(&snap_connect, &snap_joined);
        cpu_figures(r, &setup_cpu, threads, "cpu while connecting");
        if let Some(us) = setup_cpu.server_us {
            let per = if ready > 0 {
                us as f64 / ready as f64
            } else {
                0.0
            };
            r.fig(
                "server_cpu_us_per_connect",
                "server CPU µs per connect",
                round(per, 2),
                format!("{per:.1}µs"),
            );
        }
        let hold_cpu = sys::cpu_window(&snap_joined, &snap_end);
        if let Some(p) = hold_cpu.server_pct {
            r.section("cpu while idle");
            r.fig(
                "server_idle_cpu_pct",
                "server CPU while holding",
                round(p, 2),
                format!("{p:.2}%"),
            );
        }
    } else {
        let cpu = churn_cpu.unwrap_or_default();
        let secs = (window.1 - window.0) as f64 / 1e9;
        let (cps, dps) = (connects as f64 / secs, disconnects as f64 / secs);
        let requested = churn.map_or(0.0, |c| c.0);
        r.section("churn (measured window)");
        r.key_fig(
            "connects_per_s",
            "connects/s (→ joined)",
            round(cps, 1),
            format!("{}  (requested {})", rate(cps), rate(requested)),
        );
        r.key_fig(
            "disconnects_per_s",
            "disconnects/s",
            round(dps, 1),
            rate(dps),
        );
        r.fig(
            "connect_failures_window",
            "failed connects in window",
            cfail,
            int(cfail),
        );
        r.fig(
            "closes_unasked",
            "closes we did not ask for",
            tally_json(&unexpected),
            tally_text(&unexpected),
        );
        r.latency("connect_latency", "connect → joined", &hist, true);
        r.fig(
            "ops_started",
            "replacements started (warm-up included)",
            ops,
            int(ops),
        );
        let min_max = |f: fn(&(u64, u64, u64, u64)) -> u64| {
            let v: Vec<u64> = churn_samples.iter().map(f).collect();
            (
                v.iter().copied().min().unwrap_or(0),
                v.iter().copied().max().unwrap_or(0),
            )
        };
        let (rmin, rmax) = min_max(|s| s.0);
        let (lmin, lmax) = min_max(|s| s.1);
        r.fig(
            "open_joined_min_max",
            "joined connections min / max",
            json!([rmin, rmax]),
            format!("{} / {}", int(rmin), int(rmax)),
        );
        r.fig(
            "open_sockets_min_max",
            "client sockets min / max",
            json!([lmin, lmax]),
            format!("{} / {}", int(lmin), int(lmax)),
        );
        if pid.is_some() {
            let (fmin, fmax) = min_max(|s| s.2);
            r.fig(
                "server_fds_min_max",
                "server open files min / max",
                json!([fmin, fmax]),
                format!("{} / {}", int(fmin), int(fmax)),
            );
        }
        let (_, twmax) = min_max(|s| s.3);
        r.fig(
            "time_wait_max",
            "sockets in TIME_WAIT (max)",
            twmax,
            int(twmax),
        );
        if rmax > 0 && (rmin as f64) < connections as f64 * 0.95 {
            r.warn(format!(
                "the joined connection count dipped to {} of {}",
                int(rmin),
                int(connections)
            ));
        }
        if cps < requested * 0.95 {
            r.warn(format!(
                "churn reached {:.0}/s of the requested {:.0}/s (up to {behind} replacements were due at once)",
                cps, requested
            ));
        }
        if let (Some(a), Some(e)) = (rss_after, rss_end) {
            r.section("server memory");
            r.fig("server_rss_start", "RSS at start of churn", a, bytes(a));
            r.fig("server_rss_end", "RSS at end", e, bytes(e));
            let growth = e as i64 - a as i64;
            r.fig(
                "server_rss_growth",
                "growth during churn",
                growth,
                format!("{growth:+} B"),
            );
            r.server.put("rss_start", a);
            r.server.put("rss_end", e);
        }
        cpu_figures(r, &cpu, threads, "cpu (measured window)");
        if let Some(us) = cpu.server_us {
            let per = if connects > 0 {
                us as f64 / connects as f64
            } else {
                0.0
            };
            r.key_fig(
                "server_cpu_us_per_connect",
                "server CPU µs per connect+disconnect",
                round(per, 2),
                format!("{per:.1}µs"),
            );
        }
    }
    Ok(())
}
