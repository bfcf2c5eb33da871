//! Micro-benchmarks of the broadcast path: encoding a message once, queueing
//! it to every member, and draining queues into a socket-like writer. They
//! guard the design's promises (one encode per broadcast, no per-recipient
//! copy while queueing, many frames per write call) against regressions.

use std::hint::black_box;
use std::io::{self, Write};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use roomcast::auth::{Identity, RoomAccess, Verifier};
use roomcast::hub::{Hub, HubConfig};
use roomcast::outbound::{Marks, OutboundQueue, STAGING_CAPACITY, Staging};
use roomcast::protocol::FrameBuilder;

const NOW: u64 = 1_700_000_000_000;

fn content_128() -> String {
    format!(r#"{{"t":123456789,"p":"{}"}}"#, "x".repeat(100))
}

fn hub(members: usize) -> Hub {
    let mut hub = Hub::new(HubConfig {
        namespaces: std::sync::Arc::new(roomcast::hub::Namespaces::none(100)),
        max_rooms_per_connection: 100,
        typing_timeout_ms: 6000,
        heartbeat_ms: 0,
        pong_timeout_ms: 10_000,
        rate_limit: 0,
        rate_burst: 100,
        marks: Marks {
            soft: usize::MAX / 4,
            hard: usize::MAX / 2,
        },
        verifier: Verifier::new(b"bench"),
        webhooks: None,
    });
    for conn in 0..members {
        let identity = Identity {
            user_id: format!("user-{conn}"),
            name: format!("User {conn}"),
            expires_at: None,
            rooms: RoomAccess::Every,
        };
        hub.connect(conn, identity, Some("lobby"), NOW);
    }
    drain_all(&mut hub, members);
    hub
}

fn drain_all(hub: &mut Hub, members: usize) {
    let mut dirty = Vec::new();
    hub.take_dirty(&mut dirty);
    for conn in 0..members {
        if let Some(queue) = hub.outbound_mut(conn) {
            queue.clear();
        }
    }
}

/// A writer that takes everything, like a socket with room, counting calls.
struct Sink {
    calls: usize,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn encode_once(c: &mut Criterion) {
    let content = content_128();
    let user = roomcast::protocol::user_json("user-1", "User 1");
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("message frame, 128 B content", |b| {
        b.iter(|| {
            FrameBuilder::new("message", None)
                .string("room", "lobby")
                .raw("user", &user)
                .raw("content", black_box(&content))
                .number("seq", 42)
                .number("ts", NOW)
                .finish()
        })
    });
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan-out through the hub");
    for members in [10usize, 100, 1000] {
        let text = format!(
            r#"{{"type":"message","payload":{{"room":"lobby","content":{}}}}}"#,
            content_128()
        );
        let mut hub = hub(members);
        group.throughput(Throughput::Elements(members as u64));
        group.bench_function(format!("{members} members"), |b| {
            b.iter_batched_ref(
                || (),
                |_| {
                    hub.receive_text(0, black_box(&text), NOW);
                    drain_all(&mut hub, members);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn drain_queue(c: &mut Criterion) {
    let frame = Bytes::from(vec![b'x'; 200]);
    let mut group = c.benchmark_group("drain queue");
    group.throughput(Throughput::Elements(256));
    let mut staging = Staging::new();
    group.bench_function("256 frames of 200 B into one writer", |b| {
        b.iter_batched_ref(
            || {
                let mut queue = OutboundQueue::new();
                for _ in 0..256 {
                    queue.push(frame.clone());
                }
                queue
            },
            |queue| {
                let mut sink = Sink { calls: 0 };
                queue.write_to(&mut sink, &mut staging).unwrap();
                assert_eq!(
                    sink.calls,
                    (256 * 200usize).div_ceil(STAGING_CAPACITY),
                    "frames gathered into as few writes as the staging buffer allows"
                );
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, encode_once, fan_out, drain_queue);
criterion_main!(benches);
