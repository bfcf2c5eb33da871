#!/usr/bin/env bash
# The whole benchmark campaign behind BENCHMARKS.md: every step through
# benches/compare.sh (fresh server per run, interleaved, medians and ratios),
# then the syscall count and a CPU profile of roomcast alone, then the plots.
#
#   benches/campaign.sh [--steps a,b,…] [--dir DIR] [--reps N] [--sweep-reps N]
#                       [--idle-reps N] [--in-flight K] [--quiet-budget SECS] [--no-wait]
#
# Steps (default: all, in this order):
#   fanout-max      fanout 1 room × 100 members, --rate 0, --in-flight K (64), 128 B
#   fanout-1000     fanout 1 × 100 at 1,000 msgs/s (latency, CDF)
#   echo            echo, 100 clients, 1 in flight; then roomcast's /echo alone (the
#                   machine's ceiling: framing only)
#   idle            idle at 1k, 5k, 10k joined connections (all servers) and 19k (roomcast)
#   slow            roomcast and tokio-tungstenite, 100 members at 2,000 msgs/s,
#                   with one stalled member and without (the baseline); then
#                   roomcast alone in 5 interleaved pairs (benches/slow-pairs.sh)
#   sweep           fanout room-size sweep, --rate 0: 10, 50, 200, 500 members
#                   (100 comes from fanout-max: same flags)
#   syscalls        roomcast alone under saturated fanout: strace -c and perf stat
#                   of write/send/writev for 5 s; frames per write call
#   profile         roomcast alone under saturated fanout: perf record -e cpu-clock -g, 5 s
#   plots           benches/plot.py → docs/bench/*.svg
#
# Results: target/bench-results/campaign-<timestamp>/ (or --dir), one .jsonl per
# compare.sh call, its console output in .log, machine.txt, quiet.log (how long
# each step waited for a quiet machine) and syscalls.txt / profile.txt;
# target/bench-results/campaign-latest points at the directory.
#
# Before each step the script waits for a quiet machine: no fuzzer running
# (`pgrep -f fuzz/target/`) and a 1-minute load average under 0.8, polling
# every 30 s, at most 40 minutes (--quiet-budget) over the whole campaign; after that it
# proceeds and writes NOISY into quiet.log. A run during which other processes
# took more than 25% of a core is repeated (compare.sh --max-other 25).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

steps_all=(fanout-max fanout-1000 echo idle slow sweep syscalls profile plots)
steps=""
dir=""
reps=3
sweep_reps=3
idle_reps=3
inflight=64
wait_quiet_enabled=1
quiet_budget=2400 # seconds of waiting over the whole campaign
while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) steps=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --reps) reps=$2; shift 2 ;;
        --sweep-reps) sweep_reps=$2; shift 2 ;;
        --idle-reps) idle_reps=$2; shift 2 ;;
        --in-flight) inflight=$2; shift 2 ;;
        --quiet-budget) quiet_budget=$2; shift 2 ;;
        --no-wait) wait_quiet_enabled=0; shift ;;
        -h|--help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
if [[ -n $steps ]]; then
    IFS=, read -r -a step_list <<<"$steps"
else
    step_list=("${steps_all[@]}")
fi

results=$root/target/bench-results
if [[ -z $dir ]]; then
    dir=$results/campaign-$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
ln -sfn "$dir" "$results/campaign-latest"
echo "== campaign results: $dir" >&2

# ---- machine -------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cores (nproc): $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -sr)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "open files (hard limit): $(ulimit -Hn)"
    echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
    echo "node: $(node --version 2>/dev/null || echo '?')"
    echo "python: $(python3 --version 2>/dev/null || echo '?')"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet -- src 2>/dev/null || echo ' (src modified)')"
} >"$dir/machine.txt"
cat "$dir/machine.txt" >&2

echo "== building roomcast and roomcast-bench (release)" >&2
cargo build --release --quiet -p roomcast -p roomcast-bench
bench=$root/target/release/roomcast-bench
server_bin=$root/target/release/roomcast

# ---- a quiet machine ------------------------------------------------------------------
waited=0
wait_quiet() { # step
    local step=$1 fuzz load start=$waited
    [[ $wait_quiet_enabled == 1 ]] || { echo "$step: not checked (--no-wait)" >>"$dir/quiet.log"; return 0; }
    while :; do
        fuzz=$( (pgrep -f 'fuzz/target/' || true) | wc -l)
        load=$(cut -d' ' -f1 /proc/loadavg)
        if [[ $fuzz == 0 ]] && awk -v l="$load" 'BEGIN { exit !(l < 0.8) }'; then
            echo "$(date +%H:%M:%S) $step: quiet (load $load, waited $((waited - start)) s)" >>"$dir/quiet.log"
            return 0
        fi
        if ((waited >= quiet_budget)); then
            echo "$(date +%H:%M:%S) $step: NOISY — $fuzz fuzzer process(es), load $load; the waiting budget (${quiet_budget}s) is spent, proceeding" >>"$dir/quiet.log"
            echo "!! $step: machine not quiet ($fuzz fuzzers, load $load); proceeding" >&2
            return 0
        fi
        echo "   $step: waiting for a quiet machine ($fuzz fuzzer process(es), load $load; waited ${waited}s of ${quiet_budget}s)" >&2
        sleep 30
        waited=$((waited + 30))
    done
}

compare() { # name compare.sh-args…
    local name=$1
    shift
    wait_quiet "$name"
    echo "== step $name: compare.sh $*" >&2
    "$root/benches/compare.sh" "$@" --no-build --max-other 25 --out "$dir/$name.jsonl" 2>&1 | tee "$dir/$name.log" >&2
}

fanout_max=(fanout --rooms 1 --publishers 1 --rate 0 --in-flight "$inflight" --size 128 --warmup 1)

# ---- roomcast alone, instrumented ---------------------------------------------------------
secret=roomcast-bench-secret-of-32-bytes
solo_pid=""
stop_solo() {
    if [[ -n $solo_pid && -d /proc/$solo_pid ]]; then
        kill -TERM "$solo_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do [[ -d /proc/$solo_pid ]] || break; sleep 0.1; done
        kill -KILL "$solo_pid" 2>/dev/null || true
    fi
    if [[ -n $solo_pid ]]; then wait "$solo_pid" 2>/dev/null || true; fi
    solo_pid=""
}
trap stop_solo EXIT

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# One event loop, as compare.sh runs `roomcast` (where the binary knows --threads).
solo_threads=()
if "$server_bin" --help 2>/dev/null | grep -q -- '--threads'; then solo_threads=(--threads 1); fi

start_solo() { # log -> sets solo_pid, solo_port
    solo_port=9700
    while port_busy "$solo_port"; do solo_port=$((solo_port + 1)); done
    "$server_bin" --listen "127.0.0.1:$solo_port" --jwt-secret "$secret" --rate-limit 0 \
        --write-buffer-soft 1048576 --write-buffer-hard 8388608 --log-level warn "${solo_threads[@]}" >"$1" 2>&1 </dev/null &
    solo_pid=$!
    for _ in $(seq 1 100); do port_busy "$solo_port" && break; sleep 0.1; done
    sleep 0.3
}

stats() { # "frames bytes" queued/sent so far (/api/stats)
    curl -s -m 2 "http://127.0.0.1:$solo_port/api/stats" |
        python3 -c 'import json, sys; d = json.load(sys.stdin); print(d["messages_sent_total"], d["bytes_sent_total"])'
}

# instrumented NAME COMMAND… : roomcast alone under saturated fanout 1 × 100
# (the fanout-max flags); COMMAND (with @PID@ replaced) starts 3 s into the
# traffic and runs about 5 s. Inside its run, 0.5 s after it starts and 4 s
# apart, the server's counters of frames queued and bytes written are read:
# their rate times the command's duration is the traffic it saw (the rate is
# steady, and attaching/detaching does not blur the count).
instrumented() {
    local name=$1
    shift
    start_solo "$dir/$name-server.log"
    "$bench" "${fanout_max[@]}" --members 100 --duration 12 --url "ws://127.0.0.1:$solo_port" \
        --secret "$secret" --server-pid "$solo_pid" --json-only >"$dir/$name.json" 2>"$dir/$name-bench.log" &
    local bench_pid=$!
    sleep 4 # connect + 1 s warm-up + 2 s of the window
    local cmd=("${@//@PID@/$solo_pid}")
    local t0 t1 ta tb sa sb
    t0=$(date +%s.%N)
    "${cmd[@]}" >"$dir/$name.txt" 2>&1 &
    local cmd_pid=$!
    sleep 0.5
    ta=$(date +%s.%N)
    sa=$(stats)
    sleep 4
    tb=$(date +%s.%N)
    sb=$(stats)
    wait "$cmd_pid" || true
    t1=$(date +%s.%N)
    wait "$bench_pid" || true
    stop_solo
    echo "counters_a=${sa// /,} at=$ta counters_b=${sb// /,} bt=$tb command_secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" >>"$dir/$name.txt"
}

frames_per_write() { # name tool
    python3 - "$dir/$1.txt" "$2" "$dir/$1.json" <<'EOF'
import json, re, sys
path, tool, bench = sys.argv[1:4]
text = open(path).read()
m = re.search(r"counters_a=(\d+),(\d+) at=([\d.]+) counters_b=(\d+),(\d+) bt=([\d.]+) command_secs=([\d.]+)", text)
fa, ba, ta, fb, bb, tb, secs = (float(x) for x in m.groups())
rate = (fb - fa) / (tb - ta)
frame_bytes = (bb - ba) / (fb - fa)
if tool == "perf":  # perf's own measure of how long it counted
    e = re.search(r"([\d.]+) seconds time elapsed", text)
    if e:
        secs = float(e.group(1))
calls = {}
for line in text.splitlines():
    f = line.split()
    if tool == "strace" and len(f) >= 5 and f[-1] in ("write", "writev", "sendto") and f[3].isdigit():
        calls[f[-1]] = int(f[3])
    m2 = re.match(r"\s*([\d,]+)\s+syscalls:sys_enter_(writev|write|sendto)\b", line)
    if tool == "perf" and m2:
        calls[m2.group(2)] = int(m2.group(1).replace(",", ""))
n = sum(calls.values())
frames = rate * secs
try:
    b = json.loads([l for l in open(bench) if l.startswith("{")][-1])["figures"]
    whole = f"; harness: {b['deliveries_per_s']:,.0f} deliveries/s over its 12 s window"
except Exception:
    whole = ""
print(f"{tool}: {rate:,.0f} frames/s queued ({frame_bytes:.0f} bytes each) × {secs:.2f} s = {frames:,.0f} frames; "
      f"write {calls.get('write', 0):,} + send {calls.get('sendto', 0):,} + writev {calls.get('writev', 0):,} calls; "
      f"frames per write call = {frames / n if n else float('nan'):.1f}{whole}")
EOF
}

# write_summary NAME: from one second of `strace -e trace=sendto,writev` (not
# -c): how many bytes every write call offered and carried.
write_summary() {
    python3 - "$dir/$1.txt" <<'EOF'
import re, statistics, sys
offered, rets = [], []
for line in open(sys.argv[1]):
    m = re.search(r"sendto\(\d+, .*?, (\d+), [^)]*\)\s+= (-?\d+)", line)
    if m:
        offered.append(int(m.group(1)))
        rets.append(int(m.group(2)))
if not offered:
    print("strace sample: no send seen")
else:
    full = sum(1 for o in offered if o >= 60 * 1024)
    print(f"strace sample (1 s): {len(offered):,} send calls, {statistics.mean(offered):,.0f} bytes offered per call "
          f"(median {statistics.median(offered):,.0f}; {full} offered a full staging buffer), "
          f"{statistics.mean([r for r in rets if r > 0] or [0]):,.0f} bytes written per call, "
          f"{sum(1 for r in rets if r < 0)} returned an error (EAGAIN)")
EOF
}

# ---- the steps ----------------------------------------------------------------------------
for step in "${step_list[@]}"; do
    case $step in
        fanout-max)
            compare fanout-max "${fanout_max[@]}" --members 100 --duration 5 --reps "$reps"
            ;;
        fanout-1000)
            compare fanout-1000 fanout --rooms 1 --members 100 --publishers 1 --rate 1000 --size 128 \
                --duration 5 --warmup 1 --reps "$reps"
            ;;
        echo)
            compare echo echo --clients 100 --in-flight 1 --size 64 --duration 5 --warmup 1 --reps "$reps"
            # The machine's ceiling: roomcast's /echo (framing only, no JSON,
            # no rooms), where server and harness together fill both cores.
            compare echo-endpoint echo --endpoint echo --clients 100 --in-flight 1 --size 64 \
                --duration 5 --warmup 1 --reps "$reps" --servers roomcast
            ;;
        idle)
            for n in 1000 5000 10000; do
                compare "idle-$n" idle --connections "$n" --rooms 100 --hold 3 --reps "$idle_reps"
            done
            # The peers stop at 10k: the harness and the server each need one
            # file per connection under the 20,000 cap, and the target is roomcast's.
            compare idle-19000 idle --connections 19000 --rooms 100 --hold 3 --reps "$idle_reps" --servers roomcast
            ;;
        slow)
            slow=(slow --members 100 --publishers 1 --rate 2000 --size 512 --stall-after 0.5 --duration 10 --warmup 1)
            compare slow-stalled "${slow[@]}" --stalled 1 --reps "$reps" --servers roomcast,tokio-tungstenite
            compare slow-baseline "${slow[@]}" --stalled 0 --reps "$reps" --servers roomcast,tokio-tungstenite
            # The target compares the two: as interleaved pairs, so that the
            # machine's drift between the two steps above is not read as an effect.
            wait_quiet slow-pairs
            echo "== step slow-pairs: benches/slow-pairs.sh --pairs 5" >&2
            "$root/benches/slow-pairs.sh" --pairs 5 --max-other 25 --out "$dir/slow-pairs.jsonl" 2>&1 | tee "$dir/slow-pairs.log" >&2
            ;;
        sweep)
            for m in 10 50 200 500; do
                compare "sweep-m$m" "${fanout_max[@]}" --members "$m" --duration 5 --reps "$sweep_reps"
            done
            ;;
        syscalls)
            wait_quiet syscalls
            echo "== step syscalls: strace -c, perf stat and an strace sample of the sends, on roomcast alone" >&2
            instrumented syscalls-strace timeout -s INT 5 strace -c -f -e trace=write,writev,sendto -p @PID@
            instrumented syscalls-perf perf stat -e syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto -p @PID@ -- sleep 5
            instrumented syscalls-sends timeout -s INT 1 strace -f -e trace=sendto,writev -e verbose=none -s 0 -p @PID@
            {
                frames_per_write syscalls-strace strace
                frames_per_write syscalls-perf perf
                write_summary syscalls-sends
            } | tee "$dir/syscalls.txt" >&2
            ;;
        profile)
            wait_quiet profile
            echo "== step profile: perf record -e cpu-clock -g on roomcast alone" >&2
            instrumented profile-record perf record -e cpu-clock -g -o "$dir/perf.data" -p @PID@ -- sleep 5
            perf report -i "$dir/perf.data" --stdio --no-children --sort symbol --percent-limit 0.7 \
                -g none 2>/dev/null | grep -v "^$" | sed -E "s/ +(- +-|IPC +\[IPC Coverage\]|\.+) *$//" >"$dir/profile.txt" || true
            head -45 "$dir/profile.txt" >&2
            ;;
        plots)
            python3 "$root/benches/plot.py" --results "$dir" --out "$root/docs/bench"
            ;;
        *)
            echo "unknown step $step (steps: ${steps_all[*]})" >&2
            exit 2
            ;;
    esac
done

echo "== campaign done: $dir" >&2
cat "$dir/quiet.log" >&2 2>/dev/null || true
