//! Counters of PROTOCOL §7, kept in one struct so that the log summary,
//! `/metrics` and `/api/stats` are all read from the same numbers and can
//! never disagree: both renderings walk the same list of families.

use std::fmt::Write;

use crate::http::RejectReason;

/// Upper bounds of the loop-iteration histogram, in seconds.
pub const LOOP_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// Why a frame was not queued to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A room broadcast to a connection above its soft mark.
    SoftMark,
    /// Everything queued for a connection that crossed its hard mark.
    HardMark,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 2] = [DropReason::SoftMark, DropReason::HardMark];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::SoftMark => "soft_mark",
            DropReason::HardMark => "hard_mark",
        }
    }
}

/// How long loop iterations took: a Prometheus histogram.
#[derive(Debug, Default, Clone)]
pub struct LoopHistogram {
    /// Iterations at or under each bound of `LOOP_BUCKETS` (not cumulative).
    buckets: [u64; LOOP_BUCKETS.len()],
    /// Iterations over the last bound.
    over: u64,
    /// Sum of all iteration times, in seconds.
    sum_seconds: f64,
}

impl LoopHistogram {
    /// Records one iteration of `nanos` nanoseconds.
    pub fn record(&mut self, nanos: u64) {
        let seconds = nanos as f64 / 1e9;
        self.sum_seconds += seconds;
        match LOOP_BUCKETS.iter().position(|bound| seconds <= *bound) {
            Some(index) => {
                if let Some(bucket) = self.buckets.get_mut(index) {
                    *bucket += 1;
                }
            }
            None => self.over += 1,
        }
    }

    /// Iterations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum::<u64>() + self.over
    }
}

/// Monotonic counters of the server's life.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Text frames received from clients.
    pub messages_received: u64,
    /// Frames queued to clients (one per recipient).
    pub messages_sent: u64,
    /// Frames not queued: broadcasts to a connection above its soft mark, and
    /// the frame that pushed a connection over its hard mark.
    pub messages_dropped: u64,
    /// `messages_dropped`, by reason (index of `DropReason::ALL`).
    pub drops: [u64; DropReason::ALL.len()],
    /// Connections closed for crossing the hard mark.
    pub slow_consumers_closed: u64,
    /// Bytes written to client sockets.
    pub bytes_sent: u64,
    /// TLS handshakes that failed (plain HTTP or garbage on the TLS port).
    pub tls_handshake_failures: u64,
    /// Refused HTTP requests, by reason (index of `RejectReason::ALL`).
    pub handshakes_rejected: [u64; RejectReason::ALL.len()],
    /// Loop iteration times.
    pub loop_iterations: LoopHistogram,
}

/// Gauges that are read from live state when rendering, not counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Open WebSocket connections.
    pub connections: usize,
    /// Rooms with at least one member.
    pub rooms: usize,
    /// With `--redis`: whether Redis is reachable.
    pub redis_up: Option<bool>,
    /// Event loops in the process (`--threads`).
    pub threads: usize,
    /// With `--webhook-url`: the process's webhook figures.
    pub webhooks: Option<crate::webhook::WebhookStats>,
}

impl Metrics {
    /// Counts one refused request.
    pub fn reject(&mut self, reason: RejectReason) {
        if let Some(index) = RejectReason::ALL.iter().position(|r| *r == reason)
            && let Some(count) = self.handshakes_rejected.get_mut(index)
        {
            *count += 1;
        }
    }

    /// Refused requests of one reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|index| self.handshakes_rejected.get(index).copied())
            .unwrap_or(0)
    }

    /// Counts `count` frames not queued, for `reason`.
    pub fn drop_frames(&mut self, reason: DropReason, count: u64) {
        self.messages_dropped += count;
        if let Some(index) = DropReason::ALL.iter().position(|r| *r == reason)
            && let Some(total) = self.drops.get_mut(index)
        {
            *total += count;
        }
    }

    /// Adds another loop's counters: the process totals (§12).
    pub fn merge(&mut self, other: &Metrics) {
        self.messages_received += other.messages_received;
        self.messages_sent += other.messages_sent;
        self.messages_dropped += other.messages_dropped;
        for (total, count) in self.drops.iter_mut().zip(other.drops) {
            *total += count;
        }
        self.slow_consumers_closed += other.slow_consumers_closed;
        self.bytes_sent += other.bytes_sent;
        self.tls_handshake_failures += other.tls_handshake_failures;
        for (total, count) in self
            .handshakes_rejected
            .iter_mut()
            .zip(other.handshakes_rejected)
        {
            *total += count;
        }
        let (mine, theirs) = (&mut self.loop_iterations, &other.loop_iterations);
        for (total, count) in mine.buckets.iter_mut().zip(theirs.buckets) {
            *total += count;
        }
        mine.over += theirs.over;
        mine.sum_seconds += theirs.sum_seconds;
    }

    /// The families of §7 and the extras, as (name, help, kind, value).
    fn families(&self, gauges: Gauges) -> Vec<Family> {
        let mut families = vec![
            Family::plain(
                "threads",
                "Event loops in the process (--threads).",
                "gauge",
                gauges.threads as u64,
            ),
            Family::plain(
                "connections",
                "Open WebSocket connections.",
                "gauge",
                gauges.connections as u64,
            ),
            Family::plain(
                "rooms",
                "Rooms with at least one member.",
                "gauge",
                gauges.rooms as u64,
            ),
            Family::plain(
                "messages_received_total",
                "Text frames received from clients.",
                "counter",
                self.messages_received,
            ),
            Family::plain(
                "messages_sent_total",
                "Frames queued to clients, one per recipient.",
                "counter",
                self.messages_sent,
            ),
            Family::plain(
                "messages_dropped_total",
                "Frames not queued to slow consumers.",
                "counter",
                self.messages_dropped,
            ),
            Family::labelled(
                "drops_total",
                "Frames not queued to slow consumers, by reason.",
                DropReason::ALL
                    .iter()
                    .zip(self.drops)
                    .map(|(reason, count)| (reason.label(), count))
                    .collect(),
            ),
            Family::plain(
                "slow_consumers_closed_total",
                "Connections closed above --write-buffer-hard.",
                "counter",
                self.slow_consumers_closed,
            ),
            Family::labelled(
                "handshakes_rejected_total",
                "HTTP requests refused, by reason.",
                RejectReason::ALL
                    .iter()
                    .zip(self.handshakes_rejected)
                    .map(|(reason, count)| (reason.label(), count))
                    .collect(),
            ),
            Family::plain(
                "bytes_sent_total",
                "Bytes written to client sockets.",
                "counter",
                self.bytes_sent,
            ),
            Family::plain(
                "tls_handshake_failures_total",
                "TLS handshakes that failed (plain HTTP or garbage on the TLS port).",
                "counter",
                self.tls_handshake_failures,
            ),
        ];
        if let Some(up) = gauges.redis_up {
            families.push(Family::plain(
                "redis_up",
                "1 while this node reaches its Redis (--redis only).",
                "gauge",
                u64::from(up),
            ));
        }
        // Only with --webhook-url, like redis_up: zeros would read as a
        // webhook that is configured and idle.
        if let Some(webhooks) = gauges.webhooks {
            families.push(Family {
                label: "result",
                ..Family::labelled(
                    "webhook_events_total",
                    "Webhook events delivered (2xx) or dropped from a full queue.",
                    vec![
                        ("delivered", webhooks.delivered),
                        ("dropped", webhooks.dropped),
                    ],
                )
            });
            families.push(Family::plain(
                "webhook_queue_events",
                "Webhook events waiting to be sent (the batch in flight not counted).",
                "gauge",
                webhooks.queued as u64,
            ));
            families.push(Family::plain(
                "webhook_failures_total",
                "Failed webhook attempts: a status other than 2xx, no answer in 5 s, a connection error.",
                "counter",
                webhooks.failures,
            ));
        }
        families
    }

    /// The Prometheus text exposition (format 0.0.4) of every family.
    pub fn prometheus(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(2048);
        for family in self.families(gauges) {
            let name = family.name;
            let _ = writeln!(out, "# HELP roomcast_{name} {}", family.help);
            let _ = writeln!(out, "# TYPE roomcast_{name} {}", family.kind);
            match family.value {
                Value::Plain(value) => {
                    let _ = writeln!(out, "roomcast_{name} {value}");
                }
                Value::Labelled(values) => {
                    let key = family.label;
                    for (label, value) in values {
                        let _ = writeln!(out, "roomcast_{name}{{{key}=\"{label}\"}} {value}");
                    }
                }
            }
        }
        let histogram = &self.loop_iterations;
        out.push_str("# HELP roomcast_loop_iteration_seconds Time the event loop spent per iteration, from poll wake-up to the end of its batch.\n");
        out.push_str("# TYPE roomcast_loop_iteration_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, count) in LOOP_BUCKETS.iter().zip(histogram.buckets) {
            cumulative += count;
            let _ = writeln!(
                out,
                "roomcast_loop_iteration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "roomcast_loop_iteration_seconds_bucket{{le=\"+Inf\"}} {}",
            histogram.count()
        );
        let _ = writeln!(
            out,
            "roomcast_loop_iteration_seconds_sum {}",
            histogram.sum_seconds
        );
        let _ = writeln!(
            out,
            "roomcast_loop_iteration_seconds_count {}",
            histogram.count()
        );
        out
    }

    /// `/api/stats`: the same families as JSON, keyed by metric name without
    /// the `roomcast_` prefix; a labelled family is an object keyed by label.
    pub fn stats_json(&self, gauges: Gauges) -> String {
        let mut object = serde_json::Map::new();
        for family in self.families(gauges) {
            let value = match family.value {
                Value::Plain(value) => serde_json::Value::from(value),
                Value::Labelled(values) => serde_json::Value::Object(
                    values
                        .into_iter()
                        .map(|(label, value)| (label.to_string(), serde_json::Value::from(value)))
                        .collect(),
                ),
            };
            object.insert(family.name.to_string(), value);
        }
        let histogram = &self.loop_iterations;
        object.insert(
            "loop_iteration_seconds_count".into(),
            serde_json::Value::from(histogram.count()),
        );
        object.insert(
            "loop_iteration_seconds_sum".into(),
            serde_json::Value::from(histogram.sum_seconds),
        );
        serde_json::Value::Object(object).to_string()
    }
}

enum Value {
    Plain(u64),
    Labelled(Vec<(&'static str, u64)>),
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    /// The label's name of a labelled family.
    label: &'static str,
    value: Value,
}

impl Family {
    fn plain(name: &'static str, help: &'static str, kind: &'static str, value: u64) -> Self {
        Family {
            name,
            help,
            kind,
            label: "",
            value: Value::Plain(value),
        }
    }

    fn labelled(name: &'static str, help: &'static str, values: Vec<(&'static str, u64)>) -> Self {
        Family {
            name,
            help,
            kind: "counter",
            label: "reason",
            value: Value::Labelled(values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metrics {
        let mut metrics = Metrics {
            messages_received: 3,
            messages_sent: 7,
            slow_consumers_closed: 1,
            bytes_sent: 1234,
            ..Metrics::default()
        };
        metrics.reject(RejectReason::Unauthorized);
        metrics.reject(RejectReason::Unauthorized);
        metrics.drop_frames(DropReason::SoftMark, 4);
        metrics.loop_iterations.record(20_000);
        metrics.loop_iterations.record(3_000_000_000);
        metrics
    }

    #[test]
    fn prometheus_has_every_family_and_every_reason_from_the_start() {
        let text = Metrics::default().prometheus(Gauges::default());
        for name in [
            "roomcast_connections 0",
            "roomcast_rooms 0",
            "roomcast_messages_received_total 0",
            "roomcast_messages_sent_total 0",
            "roomcast_messages_dropped_total 0",
            "roomcast_slow_consumers_closed_total 0",
            "roomcast_bytes_sent_total 0",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        for reason in RejectReason::ALL {
            let line = format!(
                "roomcast_handshakes_rejected_total{{reason=\"{}\"}} 0",
                reason.label()
            );
            assert!(text.contains(&line), "{line} missing");
        }
        assert!(!text.contains("redis_up"));
        assert!(!text.contains("webhook"));
    }

    #[test]
    fn webhook_families_render_with_their_result_label() {
        let gauges = Gauges {
            webhooks: Some(crate::webhook::WebhookStats {
                delivered: 250,
                dropped: 40,
                queued: 10,
                failures: 3,
            }),
            ..Gauges::default()
        };
        let metrics = Metrics::default();
        let text = metrics.prometheus(gauges);
        assert!(text.contains("roomcast_webhook_events_total{result=\"delivered\"} 250"));
        assert!(text.contains("roomcast_webhook_events_total{result=\"dropped\"} 40"));
        assert!(text.contains("# TYPE roomcast_webhook_queue_events gauge"));
        assert!(text.contains("roomcast_webhook_queue_events 10"));
        assert!(text.contains("roomcast_webhook_failures_total 3"));
        let stats: serde_json::Value = serde_json::from_str(&metrics.stats_json(gauges)).unwrap();
        assert_eq!(stats["webhook_events_total"]["delivered"], 250);
        assert_eq!(stats["webhook_queue_events"], 10);
        assert_eq!(stats["webhook_failures_total"], 3);
    }

    #[test]
    fn prometheus_and_stats_agree() {
        let metrics = sample();
        let gauges = Gauges {
            connections: 5,
            rooms: 2,
            redis_up: Some(true),
            threads: 4,
            webhooks: None,
        };
        let text = metrics.prometheus(gauges);
        let stats: serde_json::Value = serde_json::from_str(&metrics.stats_json(gauges)).unwrap();
        assert!(text.contains("roomcast_connections 5"));
        assert!(text.contains("roomcast_threads 4"));
        assert_eq!(stats["connections"], 5);
        assert!(text.contains("roomcast_messages_dropped_total 4"));
        assert_eq!(stats["messages_dropped_total"], 4);
        assert!(text.contains("roomcast_drops_total{reason=\"soft_mark\"} 4"));
        assert_eq!(stats["drops_total"]["soft_mark"], 4);
        assert!(text.contains("roomcast_handshakes_rejected_total{reason=\"unauthorized\"} 2"));
        assert_eq!(stats["handshakes_rejected_total"]["unauthorized"], 2);
        assert_eq!(stats["handshakes_rejected_total"]["timeout"], 0);
        assert!(text.contains("roomcast_redis_up 1"));
        assert_eq!(stats["redis_up"], 1);
        assert_eq!(stats["bytes_sent_total"], 1234);
    }

    #[test]
    fn loop_histogram_is_cumulative_with_inf() {
        let text = sample().prometheus(Gauges::default());
        assert!(text.contains("roomcast_loop_iteration_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(text.contains("roomcast_loop_iteration_seconds_bucket{le=\"0.25\"} 1"));
        assert!(text.contains("roomcast_loop_iteration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("roomcast_loop_iteration_seconds_count 2"));
    }
}
