#!/usr/bin/env bash
# One node versus two nodes on Redis, same workload, same run.
#
#   benches/cluster.sh [--reps N] [WORKLOAD FLAGS…]
#
# Starts its own redis-server on a free loopback port (no persistence) and,
# for each repetition, runs the same roomcast-bench workload against, in turn:
#   single     one roomcast without --redis (the baseline)
#   redis-1    one roomcast with --redis
#   redis-2    two roomcast nodes with --redis; --url lists both, so every
#              room has members (and publishers) on both nodes
# Every configuration gets fresh servers and a flushed Redis. The summary is
# the median per configuration of published/s, deliveries/s, p50 and p99.
# Raw JSON lines go to target/bench-results/cluster-<timestamp>.jsonl.
#
# Default workload: fanout, 20 rooms × 50 members, 2 publishers per room
# (one per node in redis-2), 4 messages in flight each, 128-byte content.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
reps=3
if [[ ${1:-} == --reps ]]; then
    reps=$2
    shift 2
fi
workload=("$@")
if [[ ${#workload[@]} -eq 0 ]]; then
    workload=(fanout --rooms 20 --members 50 --publishers 2 --rate 0 --in-flight 4 --size 128
              --duration 5 --warmup 1)
fi
redis_server=$(command -v redis-server || true)
[[ -n $redis_server ]] || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 1; }

cargo build --release --quiet -p roomcast -p roomcast-bench
dir=$root/target/release
secret=roomcast-bench-secret-of-32-bytes
stamp=$(date +%Y%m%d-%H%M%S)
results=$root/target/bench-results
logs=$results/logs/cluster-$stamp
mkdir -p "$logs"
out=$results/cluster-$stamp.jsonl
: >"$out"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local port=$1
    while port_busy "$port"; do port=$((port + 1)); done
    echo "$port"
}
wait_port() {
    for _ in $(seq 1 100); do port_busy "$1" && return 0; sleep 0.1; done
    return 1
}

pids=()
stop_all() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
redis_pid=
cleanup() {
    stop_all
    if [[ -n $redis_pid ]]; then
        kill -KILL "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

redis_port=$(free_port 6390)
"$redis_server" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    >"$logs/redis.log" 2>&1 </dev/null &
redis_pid=$!
wait_port "$redis_port" || { echo "redis-server did not start" >&2; exit 1; }
flush_redis() { # FLUSHALL over a plain TCP connection (no redis-cli needed)
    exec 4<>"/dev/tcp/127.0.0.1/$redis_port"
    printf 'FLUSHALL\r\n' >&4
    read -r -t 5 reply <&4 || true
    exec 4>&-
}

node_port=
start_node() { # name [extra flags…]; sets node_port (no subshell: pids must see the node)
    local name=$1
    shift
    local port
    port=$(free_port 9460)
    "$dir/roomcast" --listen "127.0.0.1:$port" --jwt-secret "$secret" --rate-limit 0 \
        --log-level warn "$@" >"$logs/$name.log" 2>&1 </dev/null &
    pids+=($!)
    wait_port "$port" || { echo "$name did not start" >&2; exit 1; }
    if [[ $# -gt 0 ]]; then
        # A --redis node serves once it is registered: /health answers 200.
        for _ in $(seq 1 100); do
            curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
            sleep 0.1
        done
    fi
    node_port=$port
}

run_config() { # config rep
    local config=$1 rep=$2 url
    flush_redis
    case $config in
        single)
            start_node "$config-$rep"
            url="ws://127.0.0.1:$node_port"
            ;;
        redis-1)
            start_node "$config-$rep" --redis "redis://127.0.0.1:$redis_port"
            url="ws://127.0.0.1:$node_port"
            ;;
        redis-2)
            start_node "$config-$rep-a" --redis "redis://127.0.0.1:$redis_port"
            url="ws://127.0.0.1:$node_port"
            start_node "$config-$rep-b" --redis "redis://127.0.0.1:$redis_port"
            url="$url,ws://127.0.0.1:$node_port"
            ;;
    esac
    echo "== $config (rep $rep): roomcast-bench ${workload[*]} --url $url"
    local line rc=0
    line=$(timeout 300 "$dir/roomcast-bench" "${workload[@]}" --url "$url" --secret "$secret" \
        --json-only 2>"$logs/$config-$rep.err") || rc=$?
    stop_all
    if [[ $rc -ne 0 || $line != \{* ]]; then
        echo "   failed (exit $rc): $(tail -3 "$logs/$config-$rep.err")" >&2
    fi
    CONFIG=$config python3 -c '
import json, os, sys
line = sys.stdin.read().strip()
try:
    d = json.loads(line)
except ValueError:
    d = {"ok": False, "error": "no JSON line"}
d["config"] = os.environ["CONFIG"]
print(json.dumps(d))' <<<"$line" >>"$out"
}

for rep in $(seq 1 "$reps"); do
    for config in single redis-1 redis-2; do
        run_config "$config" "$rep"
    done
done

python3 - "$out" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def figure(d, *names):
    f = d.get("figures") or {}
    for n in names:
        if n in f:
            return f[n]
    return None
print()
print(f"{'config':<10} {'runs':>4} {'published/s':>12} {'deliveries/s':>13} {'ratio':>7} {'p50 µs':>9} {'p99 µs':>9}")
for config in ["single", "redis-1", "redis-2"]:
    ok = [d for d in rows if d["config"] == config and d.get("ok")]
    if not ok:
        print(f"{config:<10} {0:>4}  (no successful run)")
        continue
    med = lambda *names: statistics.median(figure(d, *names) or 0 for d in ok)
    print(f"{config:<10} {len(ok):>4} {med('published_per_s'):>12.0f} {med('deliveries_per_s'):>13.0f}"
          f" {med('delivery_ratio'):>7.4f} {med('latency_p50_us'):>9.0f} {med('latency_p99_us'):>9.0f}")
print(f"\nraw: {sys.argv[1]}")
EOF
