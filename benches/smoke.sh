#!/usr/bin/env bash
# CI smoke test of the bench harness (NOT a timing test): starts a fresh
# roomcast, runs every workload once at tiny scale, and fails if the harness
# errors or any run lacks its JSON line. Then, when openssl is there, a
# second roomcast with TLS and a few workloads over wss:// (--ca and
# --insecure-skip-verify).
#
#   benches/smoke.sh            # release build (the harness's normal mode)
#   PROFILE=dev benches/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
profile=${PROFILE:-release}
if [[ $profile == release ]]; then
    cargo build --release --quiet -p roomcast -p roomcast-bench
    dir=$root/target/release
else
    cargo build --quiet -p roomcast -p roomcast-bench
    dir=$root/target/debug
fi
secret=roomcast-bench-secret-of-32-bytes
logs=$root/target/bench-results/smoke
mkdir -p "$logs"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=9450
while port_busy "$port"; do port=$((port + 1)); done

"$dir/roomcast" --listen "127.0.0.1:$port" --jwt-secret "$secret" --rate-limit 0 --echo \
    --log-level warn >"$logs/server.log" 2>&1 </dev/null &
server=$!
servers=("$server")
stop_one() { # pid
    local pid=$1
    if [[ -d /proc/$pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
stop() {
    for pid in "${servers[@]}"; do stop_one "$pid"; done
}
trap stop EXIT
for _ in $(seq 1 100); do port_busy "$port" && break; sleep 0.1; done
port_busy "$port" || { echo "roomcast did not start" >&2; cat "$logs/server.log" >&2; exit 1; }

common=(--url "ws://127.0.0.1:$port" --secret "$secret" --server-pid "$server")
passed=0
failed=0
run() { # name workload flags…
    local name=$1
    shift
    local out="$logs/$name.out" rc=0
    echo "== $name: roomcast-bench $*"
    timeout 120 "$dir/roomcast-bench" "$@" "${common[@]}" >"$out" 2>"$logs/$name.err" || rc=$?
    cat "$out"
    if WORKLOAD=$1 RC=$rc python3 - "$out" <<'EOF'; then
import json, os, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
assert len(lines) == 1, f"expected exactly one JSON line, got {len(lines)}"
d = json.loads(lines[0])
assert d["workload"] == os.environ["WORKLOAD"], d["workload"]
assert d["ok"] is True, f"harness error: {d.get('error')}"
assert os.environ["RC"] == "0", f"exit status {os.environ['RC']}"
assert d["figures"] and d["key"], "no figures"
# The server used CPU: per thread too (--server-pid). CPU is read in 10 ms
# clock ticks and the process and its threads are read moments apart, so a
# window of a tick or two can show process CPU and no thread's: ask for the
# per-thread figures only where the server used several ticks.
if d["server"].get("cpu_us", 0) >= 50000:
    threads = d["server"].get("thread_cpu_pct")
    assert isinstance(threads, dict) and threads, f"no server.thread_cpu_pct: {d['server']}"
    if any(t.startswith("roomcast-loop-") for t in threads):
        assert "loop_balance" in d["figures"], "event-loop threads but no loop_balance"
EOF
        echo "ok   $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name (stderr: $logs/$name.err)"
        tail -5 "$logs/$name.err" || true
        failed=$((failed + 1))
    fi
}

run fanout fanout --rooms 1 --members 5 --rate 500 --duration 2 --warmup 0.5
run fanout-window fanout --rooms 2 --members 5 --publishers 2 --rate 0 --in-flight 4 --duration 1 --warmup 0.2
run echo echo --clients 5 --duration 2 --warmup 0.5
run echo-endpoint echo --clients 5 --endpoint echo --duration 1 --warmup 0.2
run idle idle --connections 50 --rooms 5 --hold 1
run slow slow --members 5 --rate 500 --duration 2 --warmup 0.5
run churn churn --connections 50 --rate 50 --rooms 5 --duration 2 --warmup 0.5

# ---- wss:// (PROTOCOL §13): a roomcast with a self-signed certificate --------------
if command -v openssl >/dev/null 2>&1; then
    tls=$logs/tls
    mkdir -p "$tls"
    # subjectAltName: rustls reads no CN; CA:FALSE: webpki refuses a CA as the server's certificate.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$tls/key.pem" -out "$tls/cert.pem" >"$tls/openssl.log" 2>&1
    tport=$((port + 1))
    while port_busy "$tport"; do tport=$((tport + 1)); done
    "$dir/roomcast" --listen "127.0.0.1:$tport" --jwt-secret "$secret" --rate-limit 0 --echo \
        --log-level warn --tls-cert "$tls/cert.pem" --tls-key "$tls/key.pem" \
        >"$logs/server-tls.log" 2>&1 </dev/null &
    tls_server=$!
    servers+=("$tls_server")
    for _ in $(seq 1 100); do port_busy "$tport" && break; sleep 0.1; done
    if port_busy "$tport"; then
        # The harness runs from the repository: the --ca path stays relative.
        ca=${tls#"$root"/}/cert.pem
        common=(--url "wss://127.0.0.1:$tport" --ca "$ca" --secret "$secret" --server-pid "$tls_server")
        run tls-echo echo --clients 5 --duration 1 --warmup 0.2
        run tls-fanout fanout --rooms 2 --members 5 --rate 0 --in-flight 4 --size 2000 --duration 1 --warmup 0.2
        run tls-idle idle --connections 50 --rooms 5 --hold 1
        run tls-slow slow --members 5 --rate 500 --duration 1 --warmup 0.2
        common=(--url "wss://localhost:$tport" --insecure-skip-verify --secret "$secret" --server-pid "$tls_server")
        run tls-churn-insecure churn --connections 20 --rate 20 --rooms 5 --duration 1 --warmup 0.2
    else
        echo "FAIL tls (roomcast with --tls-cert did not start; see $logs/server-tls.log)"
        failed=$((failed + 1))
    fi
else
    echo "skip wss:// runs: no openssl to make a certificate"
fi

echo "bench smoke: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
