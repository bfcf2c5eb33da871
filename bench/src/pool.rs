//! Connection pools: the client thread behind `idle` (open C joined
//! connections and hold them) and `churn` (keep N open while closing the
//! oldest and opening a new one R times a second).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::common::{self, Progress, Shared, Tally, is_emfile, tally_add};
use crate::net::{Closed, Handler, Net, State, Target, scan};
use crate::sys::now_ns;

#[derive(Clone)]
pub struct Plan {
    pub target: Target,
    pub sources: Vec<std::net::Ipv4Addr>,
    pub secret: Vec<u8>,
    pub rooms: Arc<Vec<String>>,
    /// Connections this thread opens first.
    pub initial: u64,
    /// First user number of this thread; users are `bench-<first + n>`.
    pub first_user: u64,
    /// Users of later connections (churn) are spaced by this many threads.
    pub user_stride: u64,
    pub connect_rate: f64,
    pub max_pending: u64,
    /// Sockets this thread may hold: the process keeps some files for itself
    /// (reading /proc at the end), so it stops here rather than at EMFILE.
    pub max_sockets: u64,
    pub handshake_timeout_ns: u64,
    /// churn: replacements per second for this thread (0 = idle).
    pub churn_rate: f64,
    /// churn: drop sockets without a close frame.
    pub abrupt: bool,
}

pub struct Stats {
    /// Connect → `joined`, µs (idle: every connection; churn: in the window).
    pub connect_hist: Histogram<u64>,
    pub ready: u64,
    pub failed: Tally,
    /// Closes of ready connections we did not ask for.
    pub unexpected_closes: Tally,
    pub emfile: bool,
    /// churn, in the measured window.
    pub connects: u64,
    pub disconnects: u64,
    pub connect_failures: u64,
    pub ops_started: u64,
    pub ops_behind_max: u64,
    pub errors: Tally,
    /// Time the last initial connection became ready (ns).
    pub setup_done_ns: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    generation: u64,
    ready: bool,
    closing: bool,
    started_ns: u64,
    user: u64,
}

struct Worker {
    slots: Vec<Option<Slot>>,
    ready_order: VecDeque<(usize, u64)>,
    joins: Vec<usize>,
    rooms: Arc<Vec<String>>,
    window: (u64, u64),
    started: bool,
    stats: Stats,
    ready_now: u64,
    failed_count: u64,
    connects_total: u64,
    disconnects_total: u64,
    initial_ready: u64,
    initial: u64,
    /// churn records connect latency only in the measured window.
    churn: bool,
}

impl Worker {
    fn in_window(&self, t: u64) -> bool {
        t >= self.window.0 && t < self.window.1
    }
}

impl Handler for Worker {
    fn on_open(&mut self, id: usize, _now: u64) {
        self.joins.push(id);
    }

    fn on_text(&mut self, id: usize, p: &[u8], now: u64) {
        match scan::msg_type(p) {
            b"joined" => {
                let in_window = self.in_window(now);
                let started = self.started;
                let Some(Some(slot)) = self.slots.get_mut(id) else {
                    return;
                };
                if slot.ready {
                    return;
                }
                slot.ready = true;
                let generation = slot.generation;
                let latency = now.saturating_sub(slot.started_ns) / 1000;
                self.ready_order.push_back((id, generation));
                self.ready_now += 1;
                self.connects_total += 1;
                if !started {
                    self.initial_ready += 1;
                    if !self.churn {
                        self.stats.connect_hist.saturating_record(latency);
                    }
                    if self.initial_ready >= self.initial {
                        self.stats.setup_done_ns = now;
                    }
                } else if in_window {
                    self.stats.connects += 1;
                    self.stats.connect_hist.saturating_record(latency);
                }
            }
            b"error" => tally_add(&mut self.stats.errors, scan::error_code(p), 1),
            _ => {}
        }
    }

    fn on_closed(&mut self, id: usize, why: Closed, now: u64) {
        let Some(slot) = self.slots.get_mut(id).and_then(Option::take) else {
            return;
        };
        if slot.ready {
            self.ready_now -= 1;
        }
        if slot.closing {
            self.disconnects_total += 1;
            if self.in_window(now) {
                self.stats.disconnects += 1;
            }
        } else if slot.ready {
            tally_add(&mut self.stats.unexpected_closes, why.label(), 1);
        } else {
            self.failed_count += 1;
            if self.started && self.in_window(now) {
                self.stats.connect_failures += 1;
            }
            tally_add(&mut self.stats.failed, why.label(), 1);
        }
    }
}

pub fn run(plan: Plan, shared: Arc<Shared>, index: usize) -> Result<Stats, String> {
    let progress: &Progress = &shared.progress[index];
    progress.tid.store(crate::sys::gettid(), Ordering::Relaxed);
    let seed = now_ns() ^ ((index as u64 + 7) << 40);
    let mut net = Net::new(plan.target.clone(), plan.sources.clone(), seed)
        .map_err(|e| format!("poll: {e}"))?;
    let mut w = Worker {
        slots: Vec::new(),
        ready_order: VecDeque::new(),
        joins: Vec::new(),
        rooms: plan.rooms.clone(),
        window: (u64::MAX, u64::MAX),
        started: false,
        stats: Stats {
            connect_hist: common::histogram(),
            ready: 0,
            failed: Tally::new(),
            unexpected_closes: Tally::new(),
            emfile: false,
            connects: 0,
            disconnects: 0,
            connect_failures: 0,
            ops_started: 0,
            ops_behind_max: 0,
            errors: Tally::new(),
            setup_done_ns: 0,
        },
        ready_now: 0,
        failed_count: 0,
        connects_total: 0,
        disconnects_total: 0,
        initial_ready: 0,
        initial: plan.initial,
        churn: plan.churn_rate > 0.0,
    };
    let mut pacer = common::Pacer::new(plan.connect_rate, now_ns());
    let mut opened = 0u64;
    let mut next_user = 0u64;
    let mut generation = 0u64;
    let mut churn_pacer: Option<common::Pacer> = None;
    let mut last_timeout_scan = 0u64;

    let mut open_one = |w: &mut Worker, net: &mut Net, now: u64| -> bool {
        if net.live() as u64 >= plan.max_sockets {
            w.stats.emfile = true;
            progress.emfile.store(true, Ordering::Relaxed);
            return false;
        }
        let user = plan.first_user + next_user * plan.user_stride;
        next_user += 1;
        let path = format!("/ws?token={}", common::token(&plan.secret, user));
        match net.connect(&path, user as usize, now) {
            Ok(id) => {
                if w.slots.len() <= id {
                    w.slots.resize(id + 1, None);
                }
                generation += 1;
                w.slots[id] = Some(Slot {
                    generation,
                    ready: false,
                    closing: false,
                    started_ns: now,
                    user,
                });
                true
            }
            Err(e) => {
                if is_emfile(&e) {
                    w.stats.emfile = true;
                    progress.emfile.store(true, Ordering::Relaxed);
                }
                w.failed_count += 1;
                tally_add(&mut w.stats.failed, common::error_label(&e), 1);
                false
            }
        }
    };

    loop {
        let now = now_ns();
        let connecting_allowed = !shared.stop_connecting.load(Ordering::Relaxed) && !w.stats.emfile;
        // Initial connections at the paced rate.
        if opened < plan.initial && connecting_allowed {
            let pending = net.live() as u64 - w.ready_now;
            let due = pacer.due(now, plan.max_pending.saturating_sub(pending));
            for _ in 0..due.min(plan.initial - opened) {
                open_one(&mut w, &mut net, now);
                opened += 1;
                pacer.mark(1);
                if w.stats.emfile {
                    break;
                }
            }
        }
        // Joins for connections that just upgraded.
        for id in std::mem::take(&mut w.joins) {
            let Some(Some(slot)) = w.slots.get(id) else {
                continue;
            };
            let room = &w.rooms[(slot.user % w.rooms.len() as u64) as usize];
            let join = format!("{{\"type\":\"join\",\"payload\":{{\"room\":\"{room}\"}}}}");
            net.send_text(id, join.as_bytes());
        }
        // Upgrades that take too long.
        if now - last_timeout_scan > 100_000_000 {
            last_timeout_scan = now;
            for id in 0..w.slots.len() {
                if let Some(slot) = w.slots[id]
                    && !slot.ready
                    && !slot.closing
                    && now.saturating_sub(slot.started_ns) > plan.handshake_timeout_ns
                {
                    net.drop_conn(id);
                    w.on_closed(id, Closed::TimedOut, now);
                }
            }
            net.reap_closing(&mut w, now, 2_000_000_000);
        }

        if !w.started && shared.go.load(Ordering::Acquire) {
            w.started = true;
            w.window = shared.window();
            let go_ns = shared.go_ns.load(Ordering::Acquire);
            if plan.churn_rate > 0.0 {
                churn_pacer = Some(common::Pacer::new(plan.churn_rate, go_ns));
            }
        }
        // Churn: close the oldest, open a new one.
        if let Some(cp) = churn_pacer.as_mut()
            && now < w.window.1
            && connecting_allowed
        {
            let due = cp.due(now, 10_000);
            w.stats.ops_behind_max = w.stats.ops_behind_max.max(due);
            for _ in 0..due {
                // Oldest connection that is still ours and ready.
                let victim = loop {
                    match w.ready_order.pop_front() {
                        Some((id, g)) => {
                            if matches!(w.slots.get(id), Some(Some(s)) if s.generation == g && s.ready && !s.closing)
                            {
                                break Some(id);
                            }
                        }
                        None => break None,
                    }
                };
                if let Some(id) = victim {
                    if plan.abrupt {
                        net.drop_conn(id);
                        if let Some(Some(slot)) = w.slots.get_mut(id) {
                            slot.closing = true;
                        }
                        w.on_closed(id, Closed::ByUs, now);
                    } else if net.state(id) == Some(State::Open) {
                        if let Some(Some(slot)) = w.slots.get_mut(id) {
                            slot.closing = true;
                        }
                        net.close_graceful(id, now);
                    }
                }
                open_one(&mut w, &mut net, now);
                w.stats.ops_started += 1;
                cp.mark(1);
            }
        }

        common::set(&progress.ready, w.ready_now);
        common::set(&progress.failed, w.failed_count);
        common::set(&progress.live, net.live() as u64);
        common::set(&progress.connects, w.connects_total);
        common::set(&progress.disconnects, w.disconnects_total);

        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let timeout = if churn_pacer.is_some() || opened < plan.initial {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(50)
        };
        net.poll(&mut w, Some(timeout))
            .map_err(|e| format!("poll: {e}"))?;
    }
    w.stats.ready = w.ready_now;
    Ok(w.stats)
}
