#!/usr/bin/env bash
# Webhooks (PROTOCOL.md §14.2): fan-out with webhooks on against off in the same
# interleaved runs, and the webhook events per second delivered at saturation.
#
#   benches/webhooks.sh [--reps N] [--duration S] [--steps fanout-small,fanout-one,fanout-rate,saturation]
#                       [--max-other PCT] [--no-build]
#
# Starts `roomcast-bench webhook-sink` (a receiver that answers 200 at once and
# counts events) on a free port, and writes two config files: both with
# `[[namespace]] prefix = "" webhook_messages = true` (every room) and an api_key,
# the "on" one also with webhook_url = the sink. The only difference between the
# two servers is then the webhook: without a URL no event is made.
#
# Fan-out steps (benches/compare.sh, the servers webhooks-off and webhooks-on,
# each started fresh, interleaved; the same cells as BENCHMARKS.md):
#   fanout-small  50 rooms × 20 members, 1 publisher each, max rate, 4 in flight
#   fanout-one    1 room × 100, max rate, 64 in flight
#   fanout-rate   1 room × 100 at 2,000 messages/s
# Each message is one `message` event; the sink's events during the step are printed.
#
# saturation: roomcast with the "on" config under `echo --clients 100 --in-flight 8`
# (each client publishing as fast as its window allows in a room of its own: every
# message one event). The sink's events/s are read in the middle of the load (its
# per-second lines), the server's queue at both ends of that window (a queue that
# grows: the sender is behind), and the /metrics webhook counters (delivered,
# dropped, queued, failures) at the end of the load.
#
# --max-other PCT is passed to compare.sh (runs during which other processes took
# more than PCT % of a core are repeated); the sink counts as "other" in the
# on runs, and its own CPU per event is printed for each step.
#
# Raw results: target/bench-results/webhooks-STAMP-*.jsonl (the sink's lines, one
# file per compare.sh step, the saturation lines). Only processes this script
# started are stopped, by their PID (servers: their process group).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

reps=3
duration=5
steps="fanout-small,fanout-one,fanout-rate,saturation"
build=1
max_other=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --reps) reps=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --max-other) max_other=(--max-other "$2" --retries 3); shift 2 ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
    esac
done
want() { [[ ,$steps, == *,$1,* ]]; }

results=target/bench-results # relative: compare.sh's servers run from the repository
mkdir -p "$results/logs"
stamp=$(date +%Y%m%d-%H%M%S)
bench=target/release/roomcast-bench
server_bin=target/release/roomcast
secret=roomcast-bench-secret-of-32-bytes
api_key=roomcast-bench-api-key-of-32-bytes

if [[ $build == 1 ]]; then
    echo "== cargo build --release --workspace" >&2
    cargo build --release --quiet --workspace
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p=$1
    while port_busy "$p"; do p=$((p + 1)); done
    echo "$p"
}

# ---- the processes we start, stopped by PID at the end -------------------------------
sink_pid=""
server_pid=""
stop_group() { # pid: SIGTERM to its process group, KILL after 5 s
    local pid=$1
    [[ -n $pid && -d /proc/$pid ]] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        [[ -d /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_group "$server_pid"
    if [[ -n $sink_pid && -d /proc/$sink_pid ]]; then
        kill -TERM "$sink_pid" 2>/dev/null || true
        wait "$sink_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the sink ---------------------------------------------------------------------------
sink_port=$(free_port 9700)
sink_out=$results/webhooks-$stamp-sink.jsonl
"$bench" webhook-sink --listen "127.0.0.1:$sink_port" >"$sink_out" 2>"$results/logs/webhooks-$stamp-sink.log" &
sink_pid=$!
for _ in $(seq 1 50); do port_busy "$sink_port" && break; sleep 0.1; done
port_busy "$sink_port" || { echo "!! the sink did not start (see $results/logs/webhooks-$stamp-sink.log)" >&2; exit 1; }
echo "== webhook sink on 127.0.0.1:$sink_port (pid $sink_pid), lines in $sink_out" >&2

# sink_ticks: the sink's CPU so far (utime + stime, clock ticks)
sink_ticks() { awk '{print $14 + $15}' "/proc/$sink_pid/stat"; }
hz=$(getconf CLK_TCK)

# sink_field KEY: from the sink's last line
sink_field() {
    sleep 1.1 # a fresh line
    tail -1 "$sink_out" | python3 -c 'import json, sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"
}

# ---- the two configs ------------------------------------------------------------------
off_cfg=$results/webhooks-off.toml
on_cfg=$results/webhooks-on.toml
cat >"$off_cfg" <<EOF
# benches/webhooks.sh: every room sends its client messages to the webhook,
# but no webhook_url: no event is made.
api_key = "$api_key"

[[namespace]]
prefix = ""
webhook_messages = true
EOF
cat >"$on_cfg" <<EOF
# benches/webhooks.sh: every room's client messages go to the harness's sink.
api_key = "$api_key"
webhook_url = "http://127.0.0.1:$sink_port/hook"

[[namespace]]
prefix = ""
webhook_messages = true
EOF
servers="roomcast:config=$off_cfg:as=webhooks-off,roomcast:config=$on_cfg:as=webhooks-on"

# ---- fan-out, on against off ------------------------------------------------------------
fanout_step() { # name, harness flags…
    local name=$1
    shift
    local before after ticks0 ticks1 out=$results/webhooks-$stamp-$name.jsonl
    before=$(sink_field events)
    ticks0=$(sink_ticks)
    echo "== $name: benches/compare.sh fanout $* --duration $duration --warmup 1 --servers $servers --reps $reps" >&2
    benches/compare.sh fanout "$@" --duration "$duration" --warmup 1 --servers "$servers" \
        --reps "$reps" --no-build --out "$out" "${max_other[@]}"
    after=$(sink_field events)
    ticks1=$(sink_ticks)
    python3 - "$out" "$((after - before))" "$duration" "$(((ticks1 - ticks0) * 1000000 / hz))" <<'EOF'
import json, statistics, sys
path, sunk, duration, sink_us = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
runs = [json.loads(l) for l in open(path) if l.strip()]
def med(server, key):
    v = [r["figures"][key] for r in runs if r.get("server_name") == server and r.get("ok") and key in r.get("figures", {})]
    return statistics.median(v) if v else float("nan")
off, on = med("webhooks-off", "server_cpu_us_per_delivery"), med("webhooks-on", "server_cpu_us_per_delivery")
print(f"   server CPU µs per delivery: off {off:.4g}, on {on:.4g}: on ÷ off = {on / off:.3f} (target ≤ 1.10)")
for s in ("webhooks-off", "webhooks-on"):
    per = [(r["rep"], r["figures"].get("server_cpu_us_per_delivery")) for r in runs if r.get("server_name") == s and r.get("ok")]
    print(f"   {s} by rep: " + ", ".join(f"{v}" for _, v in sorted(per)))
# Every published message is an event; the warm-up's too (not in the window),
# and those of runs set aside as noisy (--max-other) and repeated.
noisy = []
try:
    noisy = [json.loads(l) for l in open(path + ".noisy") if l.strip()]
except OSError:
    pass
pub = [r["figures"].get("published_per_s", 0) for r in runs + noisy if r.get("server_name") == "webhooks-on" and r.get("ok")]
sent = sum(p * (duration + 1) for p in pub)
print(f"   webhook events received by the sink during the step: {sunk:,} "
      f"(≈{sent:,.0f} messages published by the on runs, warm-up included; "
      f"{sunk / sent if sent else float('nan'):.2f} of them); the sink's CPU "
      f"{sink_us / max(1, sunk):.2f} µs per event")
for s in ("webhooks-off", "webhooks-on"):
    th = {}
    for r in runs:
        if r.get("server_name") == s and r.get("ok"):
            for t, v in r.get("server", {}).get("thread_cpu_pct", {}).items():
                th.setdefault(t, []).append(v)
    print(f"   {s} threads, median % of a core: " + ", ".join(f"{t} {statistics.median(v):.1f}" for t, v in sorted(th.items())))
EOF
}

want fanout-small && fanout_step fanout-small --rooms 50 --members 20 --publishers 1 --rate 0 --in-flight 4 --size 128
want fanout-one && fanout_step fanout-one --rooms 1 --members 100 --publishers 1 --rate 0 --in-flight 64 --size 128
want fanout-rate && fanout_step fanout-rate --rooms 1 --members 100 --publishers 1 --rate 2000 --size 128

# ---- saturation -------------------------------------------------------------------------
metric() { # metrics-text name[{labels}] -> value (0 when absent)
    awk -v m="$2" '$1 == m { v = $2 } END { print (v == "" ? 0 : v) }' <<<"$1"
}
if want saturation; then
    sat_out=$results/webhooks-$stamp-saturation.jsonl
    : >"$sat_out"
    sat_duration=$((duration + 5))
    echo "== saturation: roomcast --config $on_cfg; roomcast-bench echo --clients 100 --in-flight 8 --size 128 --duration $sat_duration, $reps reps" >&2
    for ((rep = 1; rep <= reps; rep++)); do
        port=$(free_port 9500)
        log=$results/logs/webhooks-$stamp-saturation-$rep.log
        echo "# roomcast --config $on_cfg --threads 1 (port $port)" >"$log"
        setsid "$server_bin" --listen "127.0.0.1:$port" --jwt-secret "$secret" --rate-limit 0 \
            --write-buffer-soft 1048576 --write-buffer-hard 8388608 --log-level warn --threads 1 \
            --config "$on_cfg" >>"$log" 2>&1 </dev/null &
        server_pid=$!
        for _ in $(seq 1 100); do port_busy "$port" && break; sleep 0.1; done
        harness_out=$(mktemp)
        "$bench" echo --url "ws://127.0.0.1:$port" --secret "$secret" --server-pid "$server_pid" --json-only \
            --clients 100 --in-flight 8 --size 128 --warmup 1 --duration "$sat_duration" >"$harness_out" 2>>"$log" &
        harness_pid=$!
        # The middle of the load: after connecting, the warm-up and 2 s for the
        # queue to fill; a window of (duration) seconds from the sink's lines.
        sleep 4
        e1=$(tail -1 "$sink_out")
        t1=$(sink_ticks)
        q1=$(metric "$(curl -s -m 2 "http://127.0.0.1:$port/metrics" || true)" roomcast_webhook_queue_events)
        sleep "$duration"
        e2=$(tail -1 "$sink_out")
        t2=$(sink_ticks)
        q2=$(metric "$(curl -s -m 2 "http://127.0.0.1:$port/metrics" || true)" roomcast_webhook_queue_events)
        wait "$harness_pid" || true
        metrics=$(curl -s -m 5 "http://127.0.0.1:$port/metrics" || true)
        stop_group "$server_pid"
        server_pid=""
        LINE1=$e1 LINE2=$e2 REP=$rep Q1=$q1 Q2=$q2 SINK_US=$(((t2 - t1) * 1000000 / hz)) \
            DELIVERED=$(metric "$metrics" 'roomcast_webhook_events_total{result="delivered"}') \
            DROPPED=$(metric "$metrics" 'roomcast_webhook_events_total{result="dropped"}') \
            QUEUED=$(metric "$metrics" roomcast_webhook_queue_events) \
            FAILURES=$(metric "$metrics" roomcast_webhook_failures_total) \
            python3 - "$harness_out" >>"$sat_out" <<'EOF'
import json, os, sys
a, b = json.loads(os.environ["LINE1"]), json.loads(os.environ["LINE2"])
secs = (b["unix_ms"] - a["unix_ms"]) / 1000
h = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        h = json.loads(line)
f = h.get("figures", {})
print(json.dumps({
    "rep": int(os.environ["REP"]),
    "sink_events_per_s": round((b["events"] - a["events"]) / secs),
    "sink_requests_per_s": round((b["requests"] - a["requests"]) / secs, 1),
    "events_per_request": round((b["events"] - a["events"]) / max(1, b["requests"] - a["requests"]), 1),
    "sink_window_s": secs,
    "messages_per_s": f.get("round_trips_per_s"),
    "server_cpu_pct": h.get("server", {}).get("cpu_pct"),
    "server_threads_cpu_pct": h.get("server", {}).get("thread_cpu_pct"),
    "sink_cpu_us_per_event": round(int(os.environ["SINK_US"]) / max(1, b["events"] - a["events"]), 3),
    "harness_ok": h.get("ok"),
    "delivered": int(float(os.environ["DELIVERED"])),
    "dropped": int(float(os.environ["DROPPED"])),
    "queued_in_window": [int(float(os.environ["Q1"])), int(float(os.environ["Q2"]))],
    "queued": int(float(os.environ["QUEUED"])),
    "failures": int(float(os.environ["FAILURES"])),
}, separators=(",", ":")))
EOF
        rm -f "$harness_out"
        echo "-- rep $rep: $(tail -1 "$sat_out")" >&2
    done
    python3 - "$sat_out" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda k: statistics.median(r[k] for r in runs if r.get(k) is not None)
print()
print(f"saturation, median of {len(runs)}: webhook events delivered {med('sink_events_per_s'):,.0f}/s "
      f"in {med('sink_requests_per_s'):,.0f} requests/s ({med('events_per_request')} events each, "
      f"one every {1e6 / med('sink_requests_per_s'):,.0f} µs); messages published {med('messages_per_s'):,.0f}/s; "
      f"queue in the window (first, last rep by rep): {[r['queued_in_window'] for r in runs]}; "
      f"at the end: delivered {med('delivered'):,.0f}, dropped {med('dropped'):,.0f}, queued {med('queued'):,.0f}, "
      f"failures {med('failures'):,.0f}")
EOF
fi
echo "== sink totals: $(tail -1 "$sink_out")" >&2
