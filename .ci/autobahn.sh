#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (cases 1-10, RFC 6455 without compression)
# against roomcast's /echo endpoint and fails on any FAILED case or unclean
# close. Needs ../shared/autobahn (PyPI access for its first setup).
#
#   .ci/autobahn.sh          ws:// on port $AUTOBAHN_PORT (default 9301)
#   .ci/autobahn.sh --tls    wss:// on port $AUTOBAHN_TLS_PORT (default 9302):
#                            the same cases over TLS (PROTOCOL §13), against a
#                            roomcast started with a self-signed certificate
#                            made here with openssl; the suite's client does not
#                            verify certificates (../shared/autobahn/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") TLS=0 ;;
  --tls) TLS=1 ;;
  *)
    echo "usage: $0 [--tls]" >&2
    exit 2
    ;;
esac

AUTOBAHN="${AUTOBAHN:-../shared/autobahn}"
cargo build --release --quiet
BIN=target/release/roomcast
SECRET=roomcast-autobahn-secret-of-32-bytes
SCRATCH=$(mktemp -d)
SERVER=
cleanup() {
  if [[ -n "$SERVER" ]]; then
    kill "$SERVER" 2>/dev/null || true
  fi
  rm -rf "$SCRATCH"
}
trap cleanup EXIT

tls_args=()
if [[ $TLS == 1 ]]; then
  PORT="${AUTOBAHN_TLS_PORT:-9302}"
  SCHEME=wss
  HEALTH=(curl -fsSk "https://127.0.0.1:$PORT/health")
  # A self-signed P-256 certificate for this run only.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$SCRATCH/key.pem" -out "$SCRATCH/cert.pem" -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
  tls_args=(--tls-cert "$SCRATCH/cert.pem" --tls-key "$SCRATCH/key.pem")
else
  PORT="${AUTOBAHN_PORT:-9301}"
  SCHEME=ws
  HEALTH=(curl -fsS "http://127.0.0.1:$PORT/health")
fi

"$BIN" --listen "127.0.0.1:$PORT" --jwt-secret "$SECRET" --echo \
  --max-message-size 16777216 --write-buffer-hard 67108864 \
  --rate-limit 0 --log-level warn "${tls_args[@]}" >"$SCRATCH/banner" &
SERVER=$!
TOKEN=$("$BIN" token --secret "$SECRET" --sub autobahn)
for _ in $(seq 50); do
  "${HEALTH[@]}" >/dev/null 2>&1 && break
  sleep 0.1
done
if ! "${HEALTH[@]}" >/dev/null; then
  echo "autobahn: roomcast did not answer /health on port $PORT" >&2
  exit 1
fi
if [[ $TLS == 1 ]] && ! grep -q "^roomcast listening on https://" "$SCRATCH/banner"; then
  echo "autobahn: the banner does not say https: $(head -1 "$SCRATCH/banner")" >&2
  exit 1
fi

REPORT="$SCRATCH/report"
EXCLUDE='12.*,13.*' "$AUTOBAHN/run.sh" "$SCHEME://127.0.0.1:$PORT/echo?token=$TOKEN" '1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*' | tee "$REPORT"

summary=$(grep '^summary:' "$REPORT" || true)
closes=$(grep '^close behaviour' "$REPORT" || true)
if [[ -z "$summary" ]]; then
  echo "autobahn ($SCHEME): no summary line" >&2
  exit 1
fi
if ! grep -q 'FAILED=0' <<<"$summary"; then
  echo "autobahn ($SCHEME): FAILED cases: $summary" >&2
  exit 1
fi
if grep -Eq 'UNCLEAN|WRONG|FAILED' <<<"$closes"; then
  echo "autobahn ($SCHEME): unclean closing handshakes: $closes" >&2
  exit 1
fi
echo "autobahn ($SCHEME): $summary"
