//! Room traffic: the client thread behind `fanout`, `echo` and `slow`.
//!
//! Every connection is a member of one room; some members also publish. A
//! published content is `{"t":SEND_NS,"k":PUBLISHER,"p":"xxx…"}`; receivers
//! find `"t"`, `"k"` and `"seq"` by substring search. Deliveries and
//! publishes count when their *send* time falls in the measured window, so
//! messages in flight across the window's edges are neither lost nor counted
//! twice (the run drains after the window).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::common::{self, Progress, Shared, Tally, is_emfile, tally_add};
use crate::net::{Closed, Handler, Net, Target, scan};
use crate::sys::now_ns;

/// How a publisher limits what it has outstanding when there is no fixed rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowBy {
    /// Its own broadcast coming back to it (it is a member of the room).
    Echo,
    /// The server's `ack` (messages carry an `id`).
    Ack,
}

/// What one client thread runs.
#[derive(Clone)]
pub struct Plan {
    pub target: Target,
    pub sources: Vec<std::net::Ipv4Addr>,
    pub secret: Vec<u8>,
    /// `/echo` instead of `/ws` + `join`.
    pub echo_endpoint: bool,
    pub rooms: Arc<Vec<String>>,
    /// Content size in bytes.
    pub size: usize,
    /// Messages per second per publisher; 0 = window mode.
    pub rate_per_publisher: f64,
    pub total_publishers: u64,
    pub in_flight: u32,
    pub window_by: WindowBy,
    pub connect_rate: f64,
    pub max_pending: u64,
    pub handshake_timeout_ns: u64,
    /// slow: seconds after `go` at which stalled members stop reading.
    pub stall_after_ns: u64,
    pub members: Vec<MemberSpec>,
}

#[derive(Clone, Copy, Debug)]
pub struct MemberSpec {
    pub user: u64,
    pub room: u32,
    /// Global publisher index (the `k` it writes), when it publishes.
    pub publisher: Option<u32>,
    pub stalled: bool,
}

/// One sample of the stalled member's socket.
#[derive(Debug, Clone, Copy)]
pub struct StallSample {
    pub at_ns: u64,
    pub tcp_state: u8,
    /// Bytes waiting unread in our receive queue.
    pub unread: u64,
}

/// What a thread measured; merged by the main thread.
pub struct Stats {
    pub hist: Histogram<u64>,
    /// Fixed-rate runs: per message, first member's receipt to the last's
    /// (members served by this thread), µs.
    pub spread: Histogram<u64>,
    pub published: u64,
    pub delivered: u64,
    /// healthy members' deliveries of in-window messages, by seq gaps
    pub gaps: u64,
    pub dups: u64,
    pub lagged_frames: u64,
    pub lagged_msgs: u64,
    pub errors: Tally,
    pub closes: Tally,
    pub failed_connects: Tally,
    pub window_timeouts: u64,
    pub behind_max_ns: u64,
    pub send_blocked: u64,
    pub stalled: Vec<StalledReport>,
}

#[derive(Debug, Clone, Default)]
pub struct StalledReport {
    pub user: u64,
    pub paused_at_ns: u64,
    /// When it started reading again (after the measured window).
    pub resumed_at_ns: Option<u64>,
    pub hangup_at_ns: Option<u64>,
    pub closed_at_ns: Option<u64>,
    pub closed: Option<String>,
    pub samples: Vec<StallSample>,
    /// While paused: no reads. After resume: what was waiting.
    pub msgs_after_resume: u64,
    pub last_seq: u64,
    pub lagged_frames: u64,
    pub lagged_msgs: u64,
    pub gap_msgs: u64,
    pub max_unread: u64,
}

struct Member {
    spec: MemberSpec,
    id: Option<usize>,
    ready: bool,
    last_seq: u64,
    in_flight: u32,
    next_due_ns: u64,
    last_progress_ns: u64,
    next_id: u64,
    stall: Option<StalledReport>,
}

struct Worker {
    plan: Plan,
    members: Vec<Member>,
    by_id: Vec<u32>,
    /// Publisher members whose window opened up this batch.
    refill: Vec<u32>,
    ready: u64,
    failed: u64,
    live_sent: u64,
    live_delivered: u64,
    window: (u64, u64),
    stats: Stats,
    msg: Vec<u8>,
    /// Fixed-rate runs: healthy members of this thread that receive publisher
    /// `k`'s messages, by `k` (empty otherwise: the spread is not tracked).
    receivers_of: HashMap<u64, u32>,
    /// Messages some but not all of those members have received:
    /// (k, t) → (first receipt, receipts so far).
    spreading: HashMap<(u64, u64), (u64, u32)>,
}

/// Messages whose spread is still open; past this many (deliveries are being
/// lost), the open ones are forgotten rather than kept without bound.
const MAX_SPREADING: usize = 100_000;

const NONE: u32 = u32::MAX;

impl Worker {
    fn member_of(&self, id: usize) -> Option<usize> {
        match self.by_id.get(id) {
            Some(&m) if m != NONE => Some(m as usize),
            _ => None,
        }
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window.0 && t < self.window.1
    }
}

impl Handler for Worker {
    fn on_open(&mut self, id: usize, _now: u64) {
        let Some(m) = self.member_of(id) else { return };
        if self.plan.echo_endpoint {
            self.members[m].ready = true;
            self.ready += 1;
        } else {
            // The join goes out after this batch (see `join_pending`).
            self.refill.push(m as u32 | JOIN_BIT);
        }
    }

    fn on_text(&mut self, id: usize, p: &[u8], now: u64) {
        let Some(m) = self.member_of(id) else { return };
        let ty = if self.plan.echo_endpoint {
            &b"message"[..]
        } else {
            scan::msg_type(p)
        };
        match ty {
            b"message" => {
                let (seq, tk) = if self.plan.echo_endpoint {
                    (None, scan::t_and_k(p))
                } else {
                    scan::seq_t_and_k(p)
                };
                let window = self.window;
                let member = &mut self.members[m];
                if member.spec.stalled && member.stall.is_none() {
                    // Before it stalls: not counted with the healthy members.
                    if let Some(seq) = seq {
                        member.last_seq = seq;
                    }
                    return;
                }
                if let Some(stall) = member.stall.as_mut() {
                    stall.msgs_after_resume += 1;
                    if let Some(seq) = seq {
                        if stall.last_seq != 0 && seq > stall.last_seq + 1 {
                            stall.gap_msgs += seq - stall.last_seq - 1;
                        }
                        stall.last_seq = seq;
                    }
                    return;
                }
                let counted = matches!(tk, Some((t, _)) if t >= window.0 && t < window.1);
                if let Some(seq) = seq {
                    if member.last_seq != 0 {
                        if seq > member.last_seq + 1 {
                            if counted {
                                self.stats.gaps += seq - member.last_seq - 1;
                            }
                        } else if seq <= member.last_seq && counted {
                            self.stats.dups += 1;
                        }
                    }
                    member.last_seq = member.last_seq.max(seq);
                }
                self.live_delivered += 1;
                if let Some((t, k)) = tk {
                    if counted {
                        self.stats.delivered += 1;
                        self.stats
                            .hist
                            .saturating_record(now.saturating_sub(t) / 1000);
                        if let Some(&expected) = self.receivers_of.get(&k) {
                            if self.spreading.len() >= MAX_SPREADING {
                                self.spreading.clear();
                            }
                            let open = self.spreading.entry((k, t)).or_insert((now, 0));
                            open.1 += 1;
                            if open.1 >= expected {
                                let first = open.0;
                                self.spreading.remove(&(k, t));
                                self.stats
                                    .spread
                                    .saturating_record(now.saturating_sub(first) / 1000);
                            }
                        }
                    }
                    if self.plan.window_by == WindowBy::Echo
                        && self.plan.rate_per_publisher <= 0.0
                        && member.spec.publisher == Some(k as u32)
                    {
                        member.in_flight = member.in_flight.saturating_sub(1);
                        member.last_progress_ns = now;
                        self.refill.push(m as u32);
                    }
                }
            }
            b"joined" => {
                let member = &mut self.members[m];
                if !member.ready {
                    member.ready = true;
                    self.ready += 1;
                }
            }
            b"ack" => {
                let member = &mut self.members[m];
                if self.plan.window_by == WindowBy::Ack && self.plan.rate_per_publisher <= 0.0 {
                    member.in_flight = member.in_flight.saturating_sub(1);
                    member.last_progress_ns = now;
                    self.refill.push(m as u32);
                }
            }
            b"error" => {
                let code = scan::error_code(p);
                tally_add(&mut self.stats.errors, code, 1);
            }
            b"lagged" => {
                let n = scan::lagged_count(p);
                if let Some(stall) = self.members[m].stall.as_mut() {
                    stall.lagged_frames += 1;
                    stall.lagged_msgs += n;
                } else {
                    self.stats.lagged_frames += 1;
                    self.stats.lagged_msgs += n;
                }
            }
            _ => {} // welcome, user_joined, user_left, pong…
        }
    }

    fn on_closed(&mut self, id: usize, why: Closed, now: u64) {
        let Some(m) = self.member_of(id) else { return };
        self.by_id[id] = NONE;
        let member = &mut self.members[m];
        member.id = None;
        if let Some(stall) = member.stall.as_mut() {
            stall.closed_at_ns = Some(now);
            stall.closed = Some(why.label());
            return;
        }
        if member.ready {
            tally_add(&mut self.stats.closes, why.label(), 1);
        } else {
            self.failed += 1;
            tally_add(&mut self.stats.failed_connects, why.label(), 1);
        }
    }

    fn on_hangup(&mut self, id: usize, now: u64) {
        let Some(m) = self.member_of(id) else { return };
        if let Some(stall) = self.members[m].stall.as_mut()
            && stall.hangup_at_ns.is_none()
        {
            stall.hangup_at_ns = Some(now);
        }
    }
}

const JOIN_BIT: u32 = 1 << 31;

/// Writes the `message` request (or, on `/echo`, the bare content).
fn build_message(out: &mut Vec<u8>, plan: &Plan, room: &str, k: u32, t: u64, id: Option<u64>) {
    use std::io::Write as _;
    out.clear();
    if !plan.echo_endpoint {
        out.extend_from_slice(b"{\"type\":\"message\",");
        if let Some(id) = id {
            let _ = write!(out, "\"id\":{id},");
        }
        let _ = write!(out, "\"payload\":{{\"room\":\"{room}\",\"content\":");
    }
    let start = out.len();
    let _ = write!(out, "{{\"t\":{t},\"k\":{k},\"p\":\"");
    let used = out.len() - start + 2;
    out.resize(out.len() + plan.size.saturating_sub(used), b'x');
    out.extend_from_slice(b"\"}");
    if !plan.echo_endpoint {
        out.extend_from_slice(b"}}");
    }
}

/// For each publisher `k`, how many healthy members of its room this thread
/// holds; publishers whose room has fewer than two are left out (no spread).
fn receivers_by_publisher(members: &[MemberSpec]) -> HashMap<u64, u32> {
    let mut per_room: HashMap<u32, u32> = HashMap::new();
    for member in members.iter().filter(|m| !m.stalled) {
        *per_room.entry(member.room).or_default() += 1;
    }
    members
        .iter()
        .filter_map(|m| {
            let count = per_room.get(&m.room).copied().unwrap_or(0);
            m.publisher
                .filter(|_| count >= 2)
                .map(|k| (u64::from(k), count))
        })
        .collect()
}

/// Bytes we let pile up in our own write buffer before a publisher waits.
const MAX_BACKLOG: usize = 4 << 20;

/// Runs one client thread until `shared.stop`.
pub fn run(plan: Plan, shared: Arc<Shared>, index: usize) -> Result<Stats, String> {
    let progress: &Progress = &shared.progress[index];
    progress.tid.store(crate::sys::gettid(), Ordering::Relaxed);
    let seed = now_ns() ^ ((index as u64 + 1) << 32);
    let mut net = Net::new(plan.target.clone(), plan.sources.clone(), seed)
        .map_err(|e| format!("poll: {e}"))?;
    let members: Vec<Member> = plan
        .members
        .iter()
        .map(|&spec| Member {
            spec,
            id: None,
            ready: false,
            last_seq: 0,
            in_flight: 0,
            next_due_ns: 0,
            last_progress_ns: 0,
            next_id: 1,
            stall: None,
        })
        .collect();
    let mut w = Worker {
        plan,
        members,
        by_id: Vec::new(),
        refill: Vec::new(),
        ready: 0,
        failed: 0,
        live_sent: 0,
        live_delivered: 0,
        window: (u64::MAX, u64::MAX),
        stats: Stats {
            hist: common::histogram(),
            spread: common::histogram(),
            published: 0,
            delivered: 0,
            gaps: 0,
            dups: 0,
            lagged_frames: 0,
            lagged_msgs: 0,
            errors: Tally::new(),
            closes: Tally::new(),
            failed_connects: Tally::new(),
            window_timeouts: 0,
            behind_max_ns: 0,
            send_blocked: 0,
            stalled: Vec::new(),
        },
        msg: Vec::with_capacity(1024),
        receivers_of: HashMap::new(),
        spreading: HashMap::new(),
    };
    if w.plan.rate_per_publisher > 0.0 {
        w.receivers_of = receivers_by_publisher(&w.plan.members);
    }
    // Members with a per-turn duty, so the loop never walks every member.
    let publishers: Vec<usize> = (0..w.members.len())
        .filter(|&m| w.members[m].spec.publisher.is_some())
        .collect();
    let stalled: Vec<usize> = (0..w.members.len())
        .filter(|&m| w.members[m].spec.stalled)
        .collect();
    let mut last_timeout_scan = 0u64;
    let mut pacer = common::Pacer::new(w.plan.connect_rate, now_ns());
    let mut next_connect = 0usize;
    let mut started = false;
    let mut go_ns = 0u64;
    let mut last_sample = 0u64;
    let mut resumed = false;
    let paths: Vec<String> = w
        .members
        .iter()
        .map(|m| {
            let tok = common::token(&w.plan.secret, m.spec.user);
            if w.plan.echo_endpoint {
                format!("/echo?token={tok}")
            } else {
                format!("/ws?token={tok}")
            }
        })
        .collect();

    loop {
        let now = now_ns();
        // Connect phase: open members at the paced rate.
        if next_connect < w.members.len() {
            let pending = next_connect as u64 - w.ready - w.failed;
            let due = pacer.due(now, w.plan.max_pending.saturating_sub(pending));
            for _ in 0..due {
                if next_connect >= w.members.len() {
                    break;
                }
                // Members of a room alternate between the nodes of a cluster.
                let node = w.members[next_connect].spec.user as usize;
                match net.connect(&paths[next_connect], node, now) {
                    Ok(id) => {
                        if w.by_id.len() <= id {
                            w.by_id.resize(id + 1, NONE);
                        }
                        w.by_id[id] = next_connect as u32;
                        w.members[next_connect].id = Some(id);
                    }
                    Err(e) => {
                        if is_emfile(&e) {
                            progress.emfile.store(true, Ordering::Relaxed);
                        }
                        w.failed += 1;
                        tally_add(&mut w.stats.failed_connects, common::error_label(&e), 1);
                    }
                }
                next_connect += 1;
                pacer.mark(1);
            }
        }
        // Upgrades that take too long count as failures.
        if !started
            && w.ready + w.failed < w.members.len() as u64
            && now - last_timeout_scan > 100_000_000
        {
            last_timeout_scan = now;
            for m in 0..w.members.len() {
                let member = &w.members[m];
                if member.ready {
                    continue;
                }
                if let Some(id) = member.id
                    && let Some(c) = net.conn(id)
                    && now.saturating_sub(c.started_ns) > w.plan.handshake_timeout_ns
                {
                    net.drop_conn(id);
                    w.on_closed(id, Closed::TimedOut, now);
                }
            }
        }

        if !started && shared.go.load(Ordering::Acquire) {
            started = true;
            go_ns = shared.go_ns.load(Ordering::Acquire);
            w.window = shared.window();
            let interval = if w.plan.rate_per_publisher > 0.0 {
                1e9 / w.plan.rate_per_publisher
            } else {
                0.0
            };
            let total = w.plan.total_publishers.max(1) as f64;
            for m in 0..w.members.len() {
                let member = &mut w.members[m];
                if let Some(k) = member.spec.publisher {
                    member.next_due_ns = go_ns + (interval * f64::from(k) / total) as u64;
                    member.last_progress_ns = go_ns;
                    if w.plan.rate_per_publisher <= 0.0 {
                        w.refill.push(m as u32);
                    }
                }
            }
        }

        // Joins requested by on_open.
        let mut refill = std::mem::take(&mut w.refill);
        refill.retain(|&m| {
            if m & JOIN_BIT == 0 {
                return true;
            }
            let member = &w.members[(m & !JOIN_BIT) as usize];
            if let Some(id) = member.id {
                let room = &w.plan.rooms[member.spec.room as usize];
                let join = format!("{{\"type\":\"join\",\"payload\":{{\"room\":\"{room}\"}}}}");
                net.send_text(id, join.as_bytes());
            }
            false
        });

        if started {
            let publishing = now < w.window.1;
            if w.plan.rate_per_publisher > 0.0 {
                // Fixed rate: every publisher sends what is due.
                let interval = (1e9 / w.plan.rate_per_publisher) as u64;
                for &m in &publishers {
                    let Some(k) = w.members[m].spec.publisher else {
                        continue;
                    };
                    let Some(id) = w.members[m].id else { continue };
                    let mut sent = 0;
                    while publishing && w.members[m].next_due_ns <= now && sent < 10_000 {
                        if net.backlog(id) > MAX_BACKLOG {
                            w.stats.send_blocked += 1;
                            break;
                        }
                        let behind = now - w.members[m].next_due_ns;
                        w.stats.behind_max_ns = w.stats.behind_max_ns.max(behind);
                        send_one(&mut w, &mut net, m, k, id);
                        w.members[m].next_due_ns += interval;
                        sent += 1;
                    }
                }
            } else if publishing {
                // Window: top every publisher whose window opened up back to K.
                for &m in &refill {
                    let m = m as usize;
                    let Some(k) = w.members[m].spec.publisher else {
                        continue;
                    };
                    let Some(id) = w.members[m].id else { continue };
                    while w.members[m].in_flight < w.plan.in_flight {
                        if net.backlog(id) > MAX_BACKLOG {
                            w.stats.send_blocked += 1;
                            break;
                        }
                        send_one(&mut w, &mut net, m, k, id);
                        w.members[m].in_flight += 1;
                    }
                }
            }
            refill.clear();
            // A window that saw nothing for a second lost its messages (a
            // dropped broadcast): reopen it, and count it.
            if publishing && w.plan.rate_per_publisher <= 0.0 && now - last_sample > 100_000_000 {
                for &m in &publishers {
                    let member = &mut w.members[m];
                    if member.spec.publisher.is_some()
                        && member.in_flight > 0
                        && now.saturating_sub(member.last_progress_ns) > 1_000_000_000
                    {
                        member.in_flight = 0;
                        member.last_progress_ns = now;
                        w.stats.window_timeouts += 1;
                        w.refill.push(m as u32);
                    }
                }
            }
            // Stalled members stop reading after `stall_after`.
            if now >= go_ns + w.plan.stall_after_ns {
                for &m in &stalled {
                    let member = &mut w.members[m];
                    if member.spec.stalled
                        && member.stall.is_none()
                        && let Some(id) = member.id
                    {
                        net.pause(id);
                        member.stall = Some(StalledReport {
                            user: member.spec.user,
                            paused_at_ns: now,
                            last_seq: member.last_seq,
                            ..StalledReport::default()
                        });
                    }
                }
            }
        }
        w.refill.append(&mut refill);

        // Sample stalled sockets every 100 ms.
        if now - last_sample > 100_000_000 {
            last_sample = now;
            for &m in &stalled {
                let member = &mut w.members[m];
                if let Some(stall) = member.stall.as_mut()
                    && !resumed
                {
                    let sample = match member.id.and_then(|id| net.raw_fd(id)) {
                        Some(fd) => {
                            let (state, unread) = socket_state(fd);
                            StallSample {
                                at_ns: now,
                                tcp_state: state,
                                unread,
                            }
                        }
                        None => StallSample {
                            at_ns: now,
                            tcp_state: 0,
                            unread: 0,
                        },
                    };
                    stall.max_unread = stall.max_unread.max(sample.unread);
                    stall.samples.push(sample);
                }
            }
        }
        if !resumed && shared.resume_stalled.load(Ordering::Acquire) {
            resumed = true;
            for &m in &stalled {
                if let Some(stall) = w.members[m].stall.as_mut() {
                    stall.resumed_at_ns = Some(now_ns());
                }
                if w.members[m].stall.is_some()
                    && let Some(id) = w.members[m].id
                {
                    net.resume(id, &mut w, now_ns());
                }
            }
        }

        common::set(&progress.ready, w.ready);
        common::set(&progress.failed, w.failed);
        common::set(&progress.live, net.live() as u64);
        common::set(&progress.sent, w.live_sent);
        common::set(&progress.delivered, w.live_delivered);

        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let timeout = if started && w.plan.rate_per_publisher > 0.0 && now < w.window.1 {
            Duration::from_micros(500)
        } else if next_connect < w.members.len() {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(20)
        };
        let timeout = if w.refill.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        net.poll(&mut w, Some(timeout))
            .map_err(|e| format!("poll: {e}"))?;
    }
    for member in &mut w.members {
        if let Some(stall) = member.stall.take() {
            w.stats.stalled.push(stall);
        }
    }
    Ok(w.stats)
}

fn send_one(w: &mut Worker, net: &mut Net, m: usize, k: u32, id: usize) {
    let t = now_ns();
    let room = &w.plan.rooms[w.members[m].spec.room as usize];
    let msg_id =
        (w.plan.window_by == WindowBy::Ack && w.plan.rate_per_publisher <= 0.0).then(|| {
            let n = w.members[m].next_id;
            w.members[m].next_id += 1;
            n
        });
    build_message(&mut w.msg, &w.plan, room, k, t, msg_id);
    if net.send_text(id, &w.msg) {
        w.live_sent += 1;
        if w.in_window(t) {
            w.stats.published += 1;
        }
    }
}

/// TCP state (`tcpi_state`) and unread bytes of a socket.
fn socket_state(fd: i32) -> (u8, u64) {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: fd is an open socket; info/len describe a writable buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let state = if rc == 0 { info.tcpi_state } else { 0 };
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
    (state, unread.max(0) as u64)
}

/// Name of a `tcpi_state` value.
pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "gone",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_counts_the_healthy_members_of_each_publishers_room() {
        let member = |user, room, publisher, stalled| MemberSpec {
            user,
            room,
            publisher,
            stalled,
        };
        let members = [
            member(0, 0, Some(0), false),
            member(1, 0, None, false),
            member(2, 0, None, false),
            member(3, 0, None, true),
            // A publisher alone in its room: no spread to measure.
            member(4, 1, Some(1), false),
        ];
        let receivers = receivers_by_publisher(&members);
        assert_eq!(receivers.get(&0), Some(&3));
        assert_eq!(receivers.get(&1), None);
    }

    fn plan(echo: bool, size: usize) -> Plan {
        Plan {
            target: crate::net::parse_target("ws://127.0.0.1:1").unwrap(),
            sources: vec![],
            secret: b"s".to_vec(),
            echo_endpoint: echo,
            rooms: Arc::new(vec!["r0".into()]),
            size,
            rate_per_publisher: 0.0,
            total_publishers: 1,
            in_flight: 1,
            window_by: WindowBy::Echo,
            connect_rate: 0.0,
            max_pending: 1,
            handshake_timeout_ns: 0,
            stall_after_ns: 0,
            members: vec![],
        }
    }

    #[test]
    fn message_has_requested_content_size() {
        let mut out = Vec::new();
        build_message(&mut out, &plan(true, 128), "r0", 3, 123_456_789, None);
        assert_eq!(out.len(), 128);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["t"], 123_456_789);
        assert_eq!(v["k"], 3);
        build_message(&mut out, &plan(false, 64), "r0", 3, 5, Some(9));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["id"], 9);
        assert_eq!(v["payload"]["content"].to_string().len(), 64);
        assert_eq!(scan::t_and_k(&out), Some((5, 3)));
    }
}
