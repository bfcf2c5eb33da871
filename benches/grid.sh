#!/usr/bin/env bash
# The event-loop grid (issue 13): workloads that do not favour batching, each
# through benches/compare.sh (fresh server per run, interleaved), against
# roomcast with one event loop, roomcast with two and the tokio peer; then a
# markdown summary per cell: deliveries/s (round trips/s) per server and the
# ratio to tokio, server CPU µs per delivery of t1 and t2 and their ratio (the
# cost of crossing loops), the CPU the servers used and t2's loop balance.
#
#   benches/grid.sh [--quick] [--reps N] [--duration S] [--warmup S] [--servers a,b,…]
#                   [--cells NAME|GLOB,…] [--dir DIR] [--max-other PCT | --no-retry]
#                   [--no-build] [--list] [--summary DIR]
#
# Cells (default: all 15; 135 runs of ≈8.5 s, about 20 minutes, with 3 servers × 3 reps × 5 s):
#   rRxM-ifK      fanout, R rooms × M members, one publisher per room, --rate 0 with
#                 K messages in flight per publisher (K = 1, 4, 16), 128 B, for
#                 R×M = 200×10, 50×20 and 20×50 (2,000, 1,000 and 1,000 connections)
#   rRxM-rT       the same at a fixed total rate of T msgs/s (2,000 and 10,000),
#                 for 200×10 and 20×50
#   fanout-max    1 room × 100 members, --rate 0, 64 in flight (campaign.sh's fanout-max)
#   echo          100 clients, 1 in flight, 64 B (campaign.sh's echo)
# Of the 9 room shapes (10, 20, 50 members × 20, 50, 200 rooms) the grid runs the
# diagonal from many tiny rooms to few larger ones: 200×10 is the worst case for
# batching (10 deliveries per message, 200 publishers), 20×50 the mildest, 50×20
# between; 200×50 would add 10,000 connections (≈2 s of connecting per run, 9
# runs per cell) for a shape that 200×10 (room count) and 20×50 (room size)
# bracket. The fixed rates run on the two ends of that diagonal.
#
# --quick: 2 cells (r50x20-if4, echo), 1 rep, 2 s window, 0.5 s warm-up, no
# retries: a smoke test of the plumbing, not a measurement.
# Servers (default roomcast:threads=1,roomcast:threads=2,tokio-tungstenite, the
# columns roomcast-t1, roomcast-t2, tokio-tungstenite): compare.sh's specs.
# --max-other PCT (default 25) repeats a run during which other processes took
# more than PCT% of a core (compare.sh --max-other); --no-retry keeps every run.
#
# Results: target/bench-results/grid-<timestamp>/ (or --dir): <cell>.jsonl (raw
# lines) and <cell>.log (compare.sh's output) per cell, cells.txt (the cells'
# flags), summary.md; target/bench-results/grid-latest points at it.
# --summary DIR rewrites DIR/summary.md from the .jsonl files there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() { sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

reps=3
duration=5
warmup=1
servers="roomcast:threads=1,roomcast:threads=2,tokio-tungstenite"
cell_filter=""
dir=""
max_other=25
build=1
quick=0
list=0
summary_only=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1; shift ;;
        --reps) reps=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --servers) servers=$2; shift 2 ;;
        --cells) cell_filter=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --max-other) max_other=$2; shift 2 ;;
        --no-retry) max_other=""; shift ;;
        --no-build) build=0; shift ;;
        --list) list=1; shift ;;
        --summary) summary_only=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done

# ---- the cells: name|compare.sh workload and flags ------------------------------------
cells=()
for shape in 200x10 50x20 20x50; do
    rooms=${shape%x*}
    members=${shape#*x}
    for k in 1 4 16; do
        cells+=("r$shape-if$k|fanout --rooms $rooms --members $members --publishers 1 --rate 0 --in-flight $k --size 128")
    done
done
for shape in 200x10 20x50; do
    rooms=${shape%x*}
    members=${shape#*x}
    for rate in 2000 10000; do
        cells+=("r$shape-r$rate|fanout --rooms $rooms --members $members --publishers 1 --rate $rate --size 128")
    done
done
cells+=("fanout-max|fanout --rooms 1 --members 100 --publishers 1 --rate 0 --in-flight 64 --size 128")
cells+=("echo|echo --clients 100 --in-flight 1 --size 64")

if [[ $quick == 1 ]]; then
    [[ -n $cell_filter ]] || cell_filter="r50x20-if4,echo"
    reps=1
    duration=2
    warmup=0.5
    max_other=""
fi

selected=()
for cell in "${cells[@]}"; do
    name=${cell%%|*}
    if [[ -n $cell_filter ]]; then
        IFS=, read -r -a patterns <<<"$cell_filter"
        hit=0
        for p in "${patterns[@]}"; do
            # shellcheck disable=SC2053 # a glob on purpose
            [[ $name == $p ]] && hit=1
        done
        [[ $hit == 1 ]] || continue
    fi
    selected+=("$cell")
done
if [[ ${#selected[@]} == 0 ]]; then
    echo "no cell matches --cells $cell_filter (see --list)" >&2
    exit 2
fi
if [[ $list == 1 ]]; then
    for cell in "${selected[@]}"; do printf '%-16s %s\n' "${cell%%|*}" "${cell#*|}"; done
    exit 0
fi

# ---- the summary ------------------------------------------------------------------------
summarize() { # DIR -> DIR/summary.md, also printed
    python3 - "$1" <<'EOF'
import json, os, statistics, sys

d = sys.argv[1]
cells = []
meta = {}
for line in open(os.path.join(d, "cells.txt")):
    line = line.rstrip("\n")
    if not line or line.startswith("#"):
        if line.startswith("# "):
            k, _, v = line[2:].partition(": ")
            meta[k] = v
        continue
    name, _, args = line.partition("|")
    cells.append((name, args))

def runs_of(name):
    path = os.path.join(d, name + ".jsonl")
    if not os.path.exists(path):
        return None
    return [json.loads(l) for l in open(path) if l.strip()]

servers, threads_of = [], {}
for name, _ in cells:
    for r in runs_of(name) or []:
        s = r.get("server_name")
        if s and s not in servers:
            servers.append(s)
        fl = r.get("server_flags") or []
        if s and "--threads" in fl:
            threads_of[s] = fl[fl.index("--threads") + 1]
tokio = next((s for s in servers if s.startswith("tokio")), None)
t1 = next((s for s in servers if threads_of.get(s) == "1"), None)
t2 = next((s for s in servers if threads_of.get(s) == "2"), None)
roomcasts = [s for s in servers if s in threads_of]

def med(runs, server, key, where="figures"):
    vals = [r.get(where, {}).get(key) for r in runs if r.get("server_name") == server and r.get("ok")]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None

def num(v, digits=None):
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    if digits is not None:
        return f"{v:.{digits}f}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

# Warnings worth a note (machine saturated is the rule on 2 cores: left out).
def notes(runs):
    out = []
    for s in servers:
        mine = [r for r in runs if r.get("server_name") == s]
        failed = sum(1 for r in mine if not r.get("ok"))
        tags = set()
        for r in mine:
            for w in r.get("warnings", []):
                if w.startswith("machine saturated") or "no --server-pid" in w:
                    continue
                words = w.split()
                if w.startswith("publishers reached only"):
                    tags.add("rate " + words[3])
                elif w.startswith("other processes used"):
                    tags.add("others " + words[3])
                elif w.startswith("delivery ratio"):
                    tags.add("delivery ratio " + words[2])
                else:
                    tag = w.split(":")[0]
                    tags.add(tag if len(tag) <= 40 else tag[:40].rsplit(" ", 1)[0] + "…")
        if failed:
            tags.add(f"{failed} run(s) FAILED")
        if tags:
            out.append(f"{s}: " + "; ".join(sorted(tags)))
    return " · ".join(out)

head = ["cell", "throughput/s"]
for s in servers:
    head.append(s + (" (÷ tokio)" if tokio and s != tokio else ""))
head += [f"µs/del {s}" for s in servers]
if t1 and t2:
    head.append("t2 ÷ t1 µs/del")
head += ["server CPU % " + " / ".join(servers), "p99 µs " + " / ".join(servers)]
if t2:
    head.append(f"loop balance {t2}")
head.append("notes")

rows = []
for name, args in cells:
    runs = runs_of(name)
    if runs is None:
        continue
    echo = args.startswith("echo")
    key = "round_trips_per_s" if echo else "deliveries_per_s"
    row = [name, "round trips" if echo else "deliveries"]
    base = med(runs, tokio, key) if tokio else None
    for s in servers:
        v = med(runs, s, key)
        cell = num(v)
        if v is not None and base and s != tokio:
            cell += f" ({v / base:.2f}×)"
        row.append(cell)
    per = {s: med(runs, s, "server_cpu_us_per_delivery") for s in servers}
    row += [num(per[s], 3) for s in servers]
    if t1 and t2:
        row.append(f"{per[t2] / per[t1]:.2f}×" if per[t1] and per[t2] else "—")
    row.append(" / ".join(num(med(runs, s, "server_cpu_pct"), 0) for s in servers))
    row.append(" / ".join(num(med(runs, s, "latency_p99_us"), 0) for s in servers))
    if t2:
        b = med(runs, t2, "loop_balance")
        loops = med(runs, t2, "loops", "server")
        if b is None:
            row.append("— (no loop threads)")
        else:
            row.append(f"{b:.2f} ({loops:.0f} loops)" if loops else f"{b:.2f}")
    row.append(notes(runs))
    rows.append(row)

reps = max((sum(1 for r in (runs_of(n) or []) if r.get("server_name") == s and r.get("ok"))
            for n, _ in cells for s in servers), default=0)
out = []
out.append(f"# Event-loop grid — {meta.get('date', '?')}")
out.append("")
out.append(f"git {meta.get('git', '?')}; {meta.get('machine', '?')}; servers: "
           + ", ".join(f"`{s}`" + (f" (--threads {threads_of[s]})" if s in threads_of else "") for s in servers)
           + f"; medians of up to {reps} run(s) per server and cell; window {meta.get('duration', '?')} s"
           + f" after {meta.get('warmup', '?')} s of warm-up; interleaved, fresh server per run (benches/compare.sh).")
out.append("")
out.append("µs/del: server CPU (user + kernel) per delivery (per round trip for echo). "
           "t2 ÷ t1 above 1 is what crossing loops costs per delivery. "
           "Loop balance: least busy ÷ most busy event loop (`roomcast-loop-N` threads).")
out.append("")
out.append("| " + " | ".join(head) + " |")
out.append("|" + "|".join("---" if i < 2 or i == len(head) - 1 else "---:" for i in range(len(head))) + "|")
for row in rows:
    out.append("| " + " | ".join(row) + " |")
out.append("")
out.append("Cells:")
out.append("")
for name, args in cells:
    out.append(f"- `{name}`: `{args}`")
text = "\n".join(out) + "\n"
open(os.path.join(d, "summary.md"), "w").write(text)
print(text)
EOF
}

if [[ -n $summary_only ]]; then
    summarize "$summary_only"
    exit 0
fi

# ---- the runs ------------------------------------------------------------------------------
results=$root/target/bench-results
mkdir -p "$results"
if [[ -z $dir ]]; then
    dir=$results/grid-$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ $(dirname "$dir") == "$results" ]]; then
    ln -sfn "$(basename "$dir")" "$results/grid-latest"
fi
shown_dir=${dir#"$root"/}

if [[ $build == 1 ]]; then
    echo "== building roomcast and roomcast-bench (release)" >&2
    cargo build --release --quiet -p roomcast -p roomcast-bench
fi

IFS=, read -r -a server_specs <<<"$servers"
n_runs=$((${#selected[@]} * ${#server_specs[@]} * reps))
est=$(awk -v n="$n_runs" -v d="$duration" -v w="$warmup" 'BEGIN { printf "%.0f", n * (d + w + 2.5) / 60 }')
echo "== grid: ${#selected[@]} cell(s) × ${#server_specs[@]} server(s) × $reps rep(s) = $n_runs runs, ≈ $est min; results: $shown_dir" >&2

{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet -- src 2>/dev/null || echo ' (src modified)')"
    echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "# servers: $servers"
    echo "# reps: $reps"
    echo "# duration: $duration"
    echo "# warmup: $warmup"
    for cell in "${selected[@]}"; do echo "$cell"; done
} >"$dir/cells.txt"

retry=()
[[ -n $max_other ]] && retry=(--max-other "$max_other")
i=0
for cell in "${selected[@]}"; do
    i=$((i + 1))
    name=${cell%%|*}
    read -r -a flags <<<"${cell#*|}"
    echo "== cell $i/${#selected[@]} $name: compare.sh ${flags[*]}  (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    set +e
    "$root/benches/compare.sh" "${flags[@]}" --duration "$duration" --warmup "$warmup" --reps "$reps" \
        --servers "$servers" --no-build "${retry[@]}" --out "$dir/$name.jsonl" 2>&1 | tee "$dir/$name.log" >&2
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc != 0 ]]; then
        echo "!! cell $name: compare.sh exited with $rc (see $shown_dir/$name.log)" >&2
    fi
done

echo "== summary: $shown_dir/summary.md" >&2
summarize "$dir"
