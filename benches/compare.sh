#!/usr/bin/env bash
# Runs ONE roomcast-bench workload against roomcast and the comparison peers,
# each server started fresh for every run, interleaved A B C D A B C D …, and
# prints per server the median of the headline figures and the ratio to roomcast.
#
#   benches/compare.sh WORKLOAD [harness flags…] [--reps N] [--servers a,b,…] [--port-base P] [--no-build]
#                      [--out FILE.jsonl] [--max-other PCT [--retries N]] [--roomcast-flags "FLAGS"]
#                      [--tls] [--insecure-skip-verify]
#   benches/compare.sh fanout --rooms 1 --members 100 --rate 0 --size 128 --duration 5 --reps 3
#   benches/compare.sh fanout --rooms 50 --members 20 --rate 0 --in-flight 4 --servers roomcast,roomcast:threads=2,tokio-tungstenite
#   benches/compare.sh echo --clients 10 --servers roomcast,roomcast:tls,tokio-tungstenite,tokio-tungstenite:tls
#
# Servers: roomcast (target/release, --rate-limit 0, --threads 1), `baseline` (another
# roomcast binary, ROOMCAST_BASELINE=PATH, same flags: a before/after of a
# change in one interleaved run) and the peers in
# ../shared/peers (tokio-tungstenite, node-ws, fastapi), copied once to
# target/peers/<name> and run from there, so their builds, venvs and
# node_modules land under our target/. Raw JSON lines go to
# target/bench-results/<timestamp>.jsonl (or --out). With --max-other PCT a run
# during which other processes took more than PCT% of a core is set aside in
# FILE.jsonl.noisy and repeated, at most --retries times (default 2; the last
# attempt is kept). Only processes this script started are stopped, by the
# process group it created for each.
#
# roomcast and baseline take options in their spec, NAME:KEY=VALUE[:KEY=VALUE…],
# each passed as --KEY VALUE to that server only, the column named after them:
# `roomcast:threads=2` runs `--threads 2` as `roomcast-t2` (other keys: NAME-KEY=VALUE);
# threads=default passes no --threads (the server's own default, all cores).
# A value may be a relative path (letters, digits, . _ - /; no ':' or ','), e.g.
# roomcast:config=target/bench-results/x.toml. The option `as=LABEL` (any server)
# names the column LABEL instead: roomcast:config=off.toml:as=webhooks-off.
# Without threads in the spec or in --roomcast-flags, a roomcast binary that
# knows --threads runs with --threads 1. --roomcast-flags "FLAGS" adds FLAGS to
# every roomcast and baseline server (words split on spaces). Ratios are to
# `roomcast` if it runs, else to the first server.
#
# TLS (wss://): the spec suffix `:tls` (any server: roomcast:tls, roomcast:threads=2:tls,
# tokio-tungstenite:tls) runs that server with --tls-cert/--tls-key and the harness with
# wss://, as a column of its own (`roomcast-tls`), beside the plain ones: ws and wss on
# the same workload in one interleaved run. --tls does it for every server (names
# unchanged). One self-signed P-256 certificate (subjectAltName localhost and
# 127.0.0.1) is made per run under target/bench-results/tls-<timestamp>/; the
# harness trusts it with --ca, or accepts any certificate with --insecure-skip-verify.
# node-ws has no TLS: its TLS columns are skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
shared_peers="$root/../shared/peers"

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
workload=$1
shift

reps=3
servers="roomcast,tokio-tungstenite,node-ws,fastapi"
port_base=9500
build=1
out=""
max_other=""
retries=2
roomcast_flags=""
tls_all=0
insecure=0
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --reps) reps=$2; shift 2 ;;
        --reps=*) reps=${1#*=}; shift ;;
        --servers) servers=$2; shift 2 ;;
        --servers=*) servers=${1#*=}; shift ;;
        --port-base) port_base=$2; shift 2 ;;
        --port-base=*) port_base=${1#*=}; shift ;;
        --no-build) build=0; shift ;;
        --out) out=$2; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        --max-other) max_other=$2; shift 2 ;;
        --max-other=*) max_other=${1#*=}; shift ;;
        --retries) retries=$2; shift 2 ;;
        --retries=*) retries=${1#*=}; shift ;;
        --roomcast-flags) roomcast_flags=$2; shift 2 ;;
        --roomcast-flags=*) roomcast_flags=${1#*=}; shift ;;
        --tls) tls_all=1; shift ;;
        --insecure-skip-verify) insecure=1; shift ;;
        --url|--url=*|--server-pid|--server-pid=*|--secret|--secret=*|--ca|--ca=*)
            echo "compare.sh sets --url, --secret, --server-pid and --ca itself" >&2; exit 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
IFS=, read -r -a server_specs <<<"$servers"
read -r -a extra_flags <<<"$roomcast_flags"
for w in "${extra_flags[@]}"; do
    if [[ $w == --tls-cert* || $w == --tls-key* ]]; then
        echo "TLS is --tls or a :tls spec (compare.sh makes the certificate), not --roomcast-flags" >&2
        exit 2
    fi
done

# ---- server specs: NAME[:KEY=VALUE…] -> column name, base server, its own flags ------
is_roomcast() { [[ $1 == roomcast || $1 == baseline ]]; }
server_list=()      # column names, in run order
declare -A base_of  # column name -> roomcast | baseline | peer name
declare -A flags_of # column name -> its own flags (roomcast and baseline only)
declare -A pin_of   # column name -> 1: add --threads 1 where the binary knows it
declare -A spec_of  # column name -> the spec as given
declare -A tls_of   # column name -> 1: TLS (--tls-cert/--tls-key, wss://)
tls_peers=" tokio-tungstenite fastapi " # peers whose run.sh takes --tls-cert/--tls-key
flag_given() { # flag words… : is --flag (or --flag=…) among the words?
    local flag=$1 w
    shift
    for w in "$@"; do [[ $w == "$flag" || $w == "$flag="* ]] && return 0; done
    return 1
}
for spec in "${server_specs[@]}"; do
    base=${spec%%:*}
    name=$base
    own=()
    pin=1
    tls=$tls_all
    label=""
    flag_given --threads "${extra_flags[@]}" && pin=0
    if [[ $spec == *:* ]]; then
        IFS=: read -r -a kvs <<<"${spec#*:}"
        for kv in "${kvs[@]}"; do
            if [[ $kv == tls ]]; then
                tls=1
                name+="-tls"
                continue
            fi
            if [[ $kv == as=* ]]; then
                label=${kv#as=}
                if [[ ! $label =~ ^[A-Za-z0-9._-]+$ ]]; then
                    echo "bad column name '$label' in $spec (as=LABEL: letters, digits, . _ -)" >&2
                    exit 2
                fi
                continue
            fi
            if ! is_roomcast "$base"; then
                echo "server options ($spec) are for roomcast and baseline only (any server takes :tls)" >&2
                exit 2
            fi
            key=${kv%%=*}
            value=${kv#*=}
            if [[ $kv != *=* || ! $key =~ ^[a-z][a-z0-9-]*$ || ! $value =~ ^[A-Za-z0-9._/-]+$ ]]; then
                echo "bad server option '$kv' in $spec (want KEY=VALUE or tls, e.g. roomcast:threads=2:tls)" >&2
                exit 2
            fi
            if [[ $key == tls-cert || $key == tls-key ]]; then
                echo "TLS is the spec suffix :tls ($base:tls); compare.sh makes the certificate" >&2
                exit 2
            fi
            if flag_given "--$key" "${extra_flags[@]}"; then
                echo "--$key is both in --roomcast-flags and in $spec" >&2
                exit 2
            fi
            if [[ $key == threads ]]; then
                pin=0
                name+="-t$value"
                [[ $value == default ]] && continue
            else
                name+="-$key=$value"
            fi
            own+=("--$key" "$value")
        done
    fi
    [[ -z $label ]] || name=$label
    if [[ -n ${base_of[$name]:-} ]]; then
        echo "two servers would both be named $name (--servers $servers)" >&2
        exit 2
    fi
    server_list+=("$name")
    base_of[$name]=$base
    flags_of[$name]="${own[*]}"
    pin_of[$name]=$pin
    spec_of[$name]=$spec
    tls_of[$name]=$tls
done

secret=roomcast-bench-secret-of-32-bytes
# Room for a burst of broadcasts to a briefly busy reader without drops.
buffers=(--write-buffer-soft 1048576 --write-buffer-hard 8388608)
results="$root/target/bench-results"
logs="$results/logs"
mkdir -p "$results" "$logs"
stamp=$(date +%Y%m%d-%H%M%S)
if [[ -z $out ]]; then
    out="$results/$stamp.jsonl"
else
    mkdir -p "$(dirname "$out")"
    out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
fi
noisy="$out.noisy"
rel() { echo "${1#"$root"/}"; } # a path as shown: relative to the repository

# ---- TLS: one self-signed certificate for the run ---------------------------------
# rustls (the harness's --ca) verifies it as webpki does: the name must be a
# subjectAltName (the CN is not read) and an end-entity certificate must not say
# CA:TRUE, which `openssl req -x509` puts in by default.
tls_cert="" tls_key=""
tls_columns=()
for name in "${server_list[@]}"; do
    if [[ ${tls_of[$name]} == 1 ]]; then tls_columns+=("$name"); fi
done
if [[ ${#tls_columns[@]} -gt 0 ]]; then
    tls_dir="$results/tls-$stamp"
    mkdir -p "$tls_dir"
    tls_cert="$tls_dir/cert.pem"
    tls_key="$tls_dir/key.pem"
    if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$tls_key" -out "$tls_cert" >"$tls_dir/openssl.log" 2>&1; then
        echo "!! could not make a TLS certificate (openssl); see $(rel "$tls_dir/openssl.log")" >&2
        exit 1
    fi
    if [[ $insecure == 1 ]]; then
        tls_trust=(--insecure-skip-verify)
    else
        tls_trust=(--ca "$(rel "$tls_cert")") # the harness runs from the repository
    fi
    echo "== TLS (wss://) for ${tls_columns[*]}: certificate $(rel "$tls_cert") (P-256, self-signed); harness ${tls_trust[*]}" >&2
fi

bench="$root/target/release/roomcast-bench"
server_bin="$root/target/release/roomcast"
if [[ $build == 1 ]]; then
    echo "== building roomcast and roomcast-bench (release)" >&2
    cargo build --release --quiet -p roomcast -p roomcast-bench
elif [[ ! -x $bench || ! -x $server_bin ]]; then
    echo "--no-build: $bench or $server_bin is missing" >&2
    exit 2
fi

: >"$out"

wants_echo_endpoint=0
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ ${args[i]} == "--endpoint=echo" || (${args[i]} == "--endpoint" && ${args[i + 1]:-} == "echo") ]]; then
        wants_echo_endpoint=1
    fi
done

# ---- processes we start ------------------------------------------------------------
started_pids=()

stop_server() { # pid
    local pid=$1
    [[ -d /proc/$pid ]] || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        [[ -d /proc/$pid ]] && [[ $(awk '{print $3}' /proc/$pid/stat 2>/dev/null) != Z ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid && $(awk '{print $3}' /proc/$pid/stat 2>/dev/null) != Z ]]; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    for pid in "${started_pids[@]}"; do stop_server "$pid"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() { # preferred
    local p=$1
    while port_busy "$p"; do p=$((p + 1)); done
    echo "$p"
}

declare -A knows_threads # binary -> 1 when its --help lists --threads
threads_flag_known() {
    local bin=$1
    if [[ -z ${knows_threads[$bin]:-} ]]; then
        knows_threads[$bin]=0
        if "$bin" --help 2>/dev/null | grep -q -- '--threads'; then knows_threads[$bin]=1; fi
    fi
    [[ ${knows_threads[$bin]} == 1 ]]
}

# roomcast_flags_of NAME -> sets FLAGS: what this roomcast or baseline server
# gets beyond the common flags (--roomcast-flags, its spec's, --threads 1).
roomcast_flags_of() {
    local name=$1 bin=$2
    local own
    read -r -a own <<<"${flags_of[$name]}"
    FLAGS=("${extra_flags[@]}" "${own[@]}")
    if [[ ${pin_of[$name]} == 1 ]] && threads_flag_known "$bin"; then
        FLAGS+=(--threads 1)
    fi
}

# start_server NAME PORT LOG [plain] -> sets SERVER_PID; the process leads its own
# process group (setsid without forking: we are not a group leader), and
# run.sh execs the real server, so the PID is the server's. `plain`: without
# TLS whatever the column says (preparing a peer).
start_server() {
    local name=$1 port=$2 log=$3 mode=${4:-}
    local base=${base_of[$name]}
    local cmd tls_flags=()
    SERVER_FLAGS=()
    if [[ ${tls_of[$name]} == 1 && $mode != plain ]]; then
        tls_flags=(--tls-cert "$tls_cert" --tls-key "$tls_key")
    fi
    if is_roomcast "$base"; then
        local bin=$server_bin
        [[ $base == baseline ]] && bin=${ROOMCAST_BASELINE:?baseline needs ROOMCAST_BASELINE=PATH to a roomcast binary}
        roomcast_flags_of "$name" "$bin"
        cmd=("$bin" --listen "127.0.0.1:$port" --jwt-secret "$secret" --rate-limit 0 "${buffers[@]}" --echo --log-level warn "${FLAGS[@]}" "${tls_flags[@]}")
        SERVER_FLAGS=("${FLAGS[@]}")
    else
        cmd=("$root/target/peers/$base/run.sh" --listen "127.0.0.1:$port" --jwt-secret "$secret" --rate-limit 0 "${buffers[@]}" "${tls_flags[@]}")
    fi
    # The command without the program's path (no machine paths in the logs:
    # the certificate's, absolute for peers that change directory, shown relative).
    local shown="${cmd[*]:1}"
    echo "# $name: ${shown//"$root"\//}" >"$log"
    setsid "${cmd[@]}" >>"$log" 2>&1 </dev/null &
    SERVER_PID=$!
    started_pids+=("$SERVER_PID")
}

# wait_ready PID PORT TIMEOUT_S [tls]: /health where the server has one, else the TCP port.
wait_ready() {
    local pid=$1 port=$2 timeout=$3 tls=${4:-0} t=0
    while ((t < timeout * 10)); do
        if [[ ! -d /proc/$pid ]] || [[ $(awk '{print $3}' /proc/$pid/stat 2>/dev/null) == Z ]]; then
            return 1
        fi
        if port_busy "$port"; then
            if command -v curl >/dev/null 2>&1; then
                if [[ $tls == 1 ]]; then
                    curl -s -k -m 1 -o /dev/null "https://127.0.0.1:$port/health" || true
                else
                    curl -s -m 1 -o /dev/null "http://127.0.0.1:$port/health" || true
                fi
            fi
            return 0
        fi
        sleep 0.1
        t=$((t + 1))
    done
    return 1
}

# ---- peers: private copies, prepared once (first builds take minutes) -------------
for base in $(printf '%s\n' "${base_of[@]}" | sort -u); do
    is_roomcast "$base" && continue
    name=$base
    if [[ ! -d $shared_peers/$name ]]; then
        echo "no peer $name in $shared_peers" >&2
        exit 2
    fi
    if [[ ! -d $root/target/peers/$name ]]; then
        mkdir -p "$root/target/peers"
        cp -r "$shared_peers/$name" "$root/target/peers/$name"
        chmod -R u+w "$root/target/peers/$name"
    else
        # Sources changed in ../shared since the copy (e.g. a peer that
        # learnt --tls-cert; the tokio peer ignores flags it does not know)
        # are copied again; unchanged ones keep their times, so nothing rebuilds.
        cp -ru "$shared_peers/$name/." "$root/target/peers/$name/"
        chmod -R u+w "$root/target/peers/$name"
    fi
    # Our copy sits under this workspace's directory: give a Rust peer its own
    # (empty) workspace so cargo does not take it for a member of ours.
    manifest="$root/target/peers/$name/Cargo.toml"
    if [[ -f $manifest ]] && ! grep -q '^\[workspace\]' "$manifest"; then
        printf '\n[workspace]\n' >>"$manifest"
    fi
done

skip_reason() { # name -> prints why this server cannot run the workload
    local name=$1 base=${base_of[$name]}
    if ! is_roomcast "$base" && [[ $wants_echo_endpoint == 1 ]]; then
        echo "no /echo endpoint"
    elif [[ ${tls_of[$name]} == 1 ]] && ! is_roomcast "$base" && [[ $tls_peers != *" $base "* ]]; then
        echo "no TLS: $base takes no --tls-cert/--tls-key"
    elif [[ ${tls_of[$name]} == 1 && $base == baseline ]] \
        && ! "${ROOMCAST_BASELINE:-/nonexistent}" --help 2>/dev/null | grep -q -- '--tls-cert'; then
        echo "no TLS: the baseline binary has no --tls-cert"
    fi
}

declare -A prepared # peer -> 1 once built/installed
for name in "${server_list[@]}"; do
    base=${base_of[$name]}
    is_roomcast "$base" && continue
    [[ -n $(skip_reason "$name") ]] && continue
    # one preparation per peer, whatever the columns (started plain, even
    # for a TLS column)
    [[ -z ${prepared[$base]:-} ]] || continue
    prepared[$base]=1
    port=$(free_port "$port_base")
    echo "== preparing $base (first start builds/installs; log: $(rel "$logs/$base-prepare.log"))" >&2
    start_server "$name" "$port" "$logs/$base-prepare.log" plain
    if ! wait_ready "$SERVER_PID" "$port" 1200; then
        echo "!! $base did not start; see $(rel "$logs/$base-prepare.log")" >&2
        tail -20 "$logs/$base-prepare.log" >&2 || true
        stop_server "$SERVER_PID"
        exit 1
    fi
    stop_server "$SERVER_PID"
done

for name in "${server_list[@]}"; do
    if [[ ${tls_of[$name]} == 1 && ${base_of[$name]} == fastapi && -z $(skip_reason "$name") ]]; then
        echo "-- note: fastapi with TLS runs on asyncio's own loop, not uvloop (its README, §13): $name differs from fastapi in more than TLS" >&2
    fi
done

# ---- the runs, interleaved ----------------------------------------------------------
echo "== $workload ${args[*]}  (reps $reps; servers ${server_list[*]}; raw: $(rel "$out"))" >&2
# run_once NAME REP ATTEMPT -> sets LINE (the JSON line, server_name and rep added)
run_once() {
    local name=$1 rep=$2 attempt=$3 port log pid
    port=$(free_port "$port_base")
    log="$logs/$stamp-$name-$rep.log"
    [[ $attempt -gt 1 ]] && log="$logs/$stamp-$name-$rep-try$attempt.log"
    start_server "$name" "$port" "$log"
    pid=$SERVER_PID
    local scheme=ws trust=()
    if [[ ${tls_of[$name]} == 1 ]]; then
        scheme=wss
        trust=("${tls_trust[@]}")
    fi
    if ! wait_ready "$pid" "$port" 120 "${tls_of[$name]}"; then
        echo "!! rep $rep $name: server did not start (log $(rel "$log"))" >&2
        stop_server "$pid"
        LINE=$(printf '{"workload":"%s","ok":false,"error":"server did not start"}' "$workload")
    else
        sleep 0.3
        set +e
        LINE=$("$bench" "$workload" --url "$scheme://127.0.0.1:$port" "${trust[@]}" --secret "$secret" --server-pid "$pid" \
            --json-only "${args[@]}" 2>>"$log" | grep '^{' | tail -1)
        set -e
        stop_server "$pid"
        if [[ -z $LINE ]]; then
            LINE=$(printf '{"workload":"%s","ok":false,"error":"harness printed no JSON line"}' "$workload")
        fi
    fi
    # server_spec: as given in --servers; server_flags: what this roomcast got
    # beyond the flags every server gets (the TLS pair aside: server_tls).
    LINE=$(NAME="$name" SPEC="${spec_of[$name]}" REP="$rep" ATTEMPT="$attempt" TLS="${tls_of[$name]}" python3 -c '
import json, os, sys
d = json.loads(sys.stdin.readline())
d["server_name"] = os.environ["NAME"]
d["server_spec"] = os.environ["SPEC"]
d["server_flags"] = sys.stdin.read().split()
d["server_tls"] = os.environ["TLS"] == "1"
d["rep"] = int(os.environ["REP"])
if os.environ["ATTEMPT"] != "1":
    d["attempt"] = int(os.environ["ATTEMPT"])
print(json.dumps(d, separators=(",", ":")))' <<<"$LINE
${SERVER_FLAGS[*]}")
}

# other_pct LINE -> other processes' CPU during the window (% of a core), 0 if unknown
other_pct() {
    python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
print(int(round(d.get("client", {}).get("other_cpu_pct") or 0)))' <<<"$1"
}

for ((rep = 1; rep <= reps; rep++)); do
    for name in "${server_list[@]}"; do
        why=$(skip_reason "$name")
        if [[ -n $why ]]; then
            echo "-- rep $rep $name: skipped ($why)" >&2
            continue
        fi
        attempt=1
        while :; do
            run_once "$name" "$rep" "$attempt"
            [[ -n $max_other ]] || break
            other=$(other_pct "$LINE")
            ((other > max_other)) || break
            if ((attempt > retries)); then
                echo "   rep $rep $name: other processes used ≈$other% (> $max_other%) on every attempt; keeping the last" >&2
                break
            fi
            echo "   rep $rep $name: other processes used ≈$other% (> $max_other%): set aside in $(basename "$noisy"), repeating" >&2
            echo "$LINE" >>"$noisy"
            attempt=$((attempt + 1))
        done
        line=$LINE
        echo "$line" >>"$out"
        NAME="$name" REP="$rep" python3 -c '
import json, os, sys
d = json.loads(sys.stdin.read())
f = d.get("figures", {})
shown = ", ".join(f"{k}={f.get(k)}" for k in d.get("key", []) + (["loop_balance"] if "loop_balance" in f else []))
status = "ok" if d.get("ok") else "FAILED: " + str(d.get("error"))
rep, name = os.environ["REP"], os.environ["NAME"]
print(f"-- rep {rep} {name:<18} {status}  {shown}", file=sys.stderr)
for w in d.get("warnings", []):
    print(f"     ! {w}", file=sys.stderr)' <<<"$line"
    done
done

# ---- medians and ratios ---------------------------------------------------------------
python3 - "$out" "${server_list[@]}" <<'EOF'
import json, os, statistics, sys

path, servers = sys.argv[1], sys.argv[2:]
runs = [json.loads(l) for l in open(path) if l.strip()]
keys = []
for r in runs:
    for k in r.get("key", []):
        if k not in keys:
            keys.append(k)
extra = ["spread_p50_us", "spread_p99_us", "server_kernel_us_per_delivery", "client_cpu_us_per_delivery", "client_kernel_us_per_delivery", "server_cpu_pct", "loop_balance", "client_cpu_pct"]
rows = keys + [k for k in extra if k not in keys]

def median(server, key):
    vals = [r["figures"][key] for r in runs
            if r.get("server_name") == server and r.get("ok") and isinstance(r.get("figures", {}).get(key), (int, float))]
    return statistics.median(vals) if vals else None

rows = [k for k in rows if k in keys or any(median(s, k) is not None for s in servers)]

def fmt(m):
    if abs(m) >= 1000:
        return f"{m:,.0f}"
    if abs(m) >= 10:
        return f"{m:.1f}"
    return f"{m:.4g}"

base_name = "roomcast" if "roomcast" in servers else servers[0]
base = {k: median(base_name, k) for k in rows}
shown_path = os.path.relpath(path) if path.startswith(os.getcwd() + "/") else path
print()
print(f"median of {max((sum(1 for r in runs if r.get('server_name') == s and r.get('ok')) for s in servers), default=0)} run(s) per server; ratio = server ÷ {base_name}; raw: {shown_path}")
width = max([len(k) for k in rows] + [10])
header = f"{'figure':<{width}}" + "".join(f"  {s:>26}" for s in servers)
print(header)
print("-" * len(header))
for k in rows:
    line = f"{k:<{width}}"
    for s in servers:
        m = median(s, k)
        if m is None:
            cell = "—"
        elif s == base_name or not base.get(k):
            cell = fmt(m)
        else:
            cell = f"{fmt(m)} ({m / base[k]:.2f}×)"
        line += f"  {cell:>26}"
    print(line)
failed = [r for r in runs if not r.get("ok")]
for r in failed:
    print(f"FAILED: {r.get('server_name')} rep {r.get('rep')}: {r.get('error')}")
warned = {}
for r in runs:
    for w in r.get("warnings", []):
        if "no --server-pid" in w:
            continue
        warned.setdefault(r.get("server_name"), set()).add(w.split(":")[0])
for s, ws in warned.items():
    print(f"warnings for {s}: " + "; ".join(sorted(ws)))
EOF
