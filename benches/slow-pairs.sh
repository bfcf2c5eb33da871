#!/usr/bin/env bash
# The slow-member target as paired runs: roomcast with one stalled member and
# without, interleaved (baseline, stalled, baseline, stalled, …) so that the
# machine's drift hits both alike; prints each pair and the medians.
#
#   benches/slow-pairs.sh [--pairs N] [--out FILE.jsonl] [compare.sh flags…]
#
# Each run is one `benches/compare.sh slow … --servers roomcast --reps 1` (a
# fresh server, its buffer marks, noise checks such as --max-other), with the
# campaign's `slow` flags: 100 members, 2,000 msgs/s, 512-byte content, the
# stalled member stops reading after 0.5 s, 10 s window.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=5
out=""
passthrough=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --pairs) pairs=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) passthrough+=("$1"); shift ;;
    esac
done
cargo build --release --quiet -p roomcast -p roomcast-bench
if [[ -z $out ]]; then
    mkdir -p target/bench-results
    out=target/bench-results/slow-pairs-$(date +%Y%m%d-%H%M%S).jsonl
fi
: >"$out"
run_out=$(mktemp)
trap 'rm -f "$run_out" "$run_out.noisy"' EXIT
for ((pair = 1; pair <= pairs; pair++)); do
    for stalled in 0 1; do
        benches/compare.sh slow --members 100 --publishers 1 --rate 2000 --size 512 --stall-after 0.5 \
            --duration 10 --warmup 1 --stalled "$stalled" --servers roomcast --reps 1 --no-build \
            --out "$run_out" "${passthrough[@]}" >&2
        cat "$run_out" >>"$out"
    done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
base = [r["figures"] for r in runs if r["params"].get("stalled", 0) == 0]
stall = [r["figures"] for r in runs if r["params"].get("stalled", 0) != 0]
print(f"{'pair':>4} {'baseline p99 µs':>16} {'stalled p99 µs':>15} {'ratio':>6} {'stalled RSS max':>16}")
ratios = []
for i, (b, s) in enumerate(zip(base, stall), 1):
    ratios.append(s["latency_p99_us"] / b["latency_p99_us"])
    print(f"{i:>4} {b['latency_p99_us']:>16,} {s['latency_p99_us']:>15,} {ratios[-1]:>6.2f} {s['server_rss_max'] / 2**20:>12.1f} MiB")
med = statistics.median
print(f"median: baseline p99 {med(b['latency_p99_us'] for b in base):,.0f} µs, stalled p99 "
      f"{med(s['latency_p99_us'] for s in stall):,.0f} µs, paired ratio {med(ratios):.2f}; delivery ratio "
      f"(healthy members) {min(r['delivery_ratio'] for r in base + stall)} at worst; raw: {sys.argv[1]}")
PY
