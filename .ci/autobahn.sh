#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (cases 1-10, RFC 6455 without compression)
# against roomcast's /echo endpoint and fails on any FAILED case or unclean
# close. Needs ../shared/autobahn (PyPI access for its first setup).
set -euo pipefail
cd "$(dirname "$0")/.."

AUTOBAHN="${AUTOBAHN:-../shared/autobahn}"
PORT="${AUTOBAHN_PORT:-9301}"
cargo build --release --quiet
BIN=target/release/roomcast
SECRET=roomcast-autobahn-secret-of-32-bytes
"$BIN" --listen "127.0.0.1:$PORT" --jwt-secret "$SECRET" --echo \
  --max-message-size 16777216 --write-buffer-hard 67108864 \
  --rate-limit 0 --log-level warn &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
TOKEN=$("$BIN" token --secret "$SECRET" --sub autobahn)
for _ in $(seq 50); do
  curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done

REPORT=$(mktemp)
EXCLUDE='12.*,13.*' "$AUTOBAHN/run.sh" "ws://127.0.0.1:$PORT/echo?token=$TOKEN" '1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*' | tee "$REPORT"

summary=$(grep '^summary:' "$REPORT" || true)
closes=$(grep '^close behaviour' "$REPORT" || true)
if [[ -z "$summary" ]]; then
  echo "autobahn: no summary line" >&2
  exit 1
fi
if ! grep -q 'FAILED=0' <<<"$summary"; then
  echo "autobahn: FAILED cases: $summary" >&2
  exit 1
fi
if grep -Eq 'UNCLEAN|WRONG|FAILED' <<<"$closes"; then
  echo "autobahn: unclean closing handshakes: $closes" >&2
  exit 1
fi
echo "autobahn: $summary"
