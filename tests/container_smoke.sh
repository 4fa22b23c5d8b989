#!/usr/bin/env bash
# Container smoke test: build the Dockerfile, run the image, wait for /ready, upload a prefix file,
# generate with it, hot-swap it, stop. Uses docker if its engine answers, else podman.
#
#   tests/container_smoke.sh [BASE_IMAGE]      # default python:3.11-slim
#
# On a machine without a Docker engine or an image registry (see docker/README.md):
#   . docker/podman-env.sh && tests/container_smoke.sh localhost/bookworm-base
#
# Environment: ENGINE (docker | podman), IMAGE (tag built; prefix-server:smoke), PORT (host port;
# 18123), READY_TIMEOUT (seconds; 240), PIP_CA (a CA bundle for pip inside the build, if present).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${1:-python:3.11-slim}"
IMAGE="${IMAGE:-prefix-server:smoke}"
PORT="${PORT:-18123}"
READY_TIMEOUT="${READY_TIMEOUT:-240}"
PIP_CA="${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}"
NAME="prefix-server-smoke-$$"
URL="http://127.0.0.1:$PORT"

if [ -z "${ENGINE:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null; then
        ENGINE=podman
    else
        echo "container_smoke: neither a docker engine nor podman is available" >&2
        exit 2
    fi
fi
step() { printf '[%5ss] %s\n' "$SECONDS" "$*"; }
fail() {
    echo "container_smoke: FAILED: $*" >&2
    echo "--- container log (last 40 lines) ---" >&2
    "$ENGINE" logs "$NAME" 2>&1 | tail -40 >&2 || true
    exit 1
}
cleanup() {
    "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
    rm -f "${PREFIX_FILE:-}"
}
trap cleanup EXIT

build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE")
[ "$ENGINE" = podman ] && build_args+=(--format docker)  # keeps HEALTHCHECK (OCI drops it)
[ -s "$PIP_CA" ] && build_args+=(--secret "id=pipca,src=$PIP_CA")
step "build with $ENGINE from $BASE_IMAGE"
"$ENGINE" build "${build_args[@]}" . >/tmp/"$NAME"-build.log 2>&1 || {
    tail -30 /tmp/"$NAME"-build.log >&2
    fail "build (log: /tmp/$NAME-build.log)"
}
rm -f /tmp/"$NAME"-build.log
step "built $IMAGE ($("$ENGINE" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}'))"

quiet() { "$@" 2> >(grep -v 'systemd connection' >&2); }  # podman without systemd: harmless noise
quiet "$ENGINE" run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null
step "started container $NAME on $URL"
deadline=$((SECONDS + READY_TIMEOUT))
until curl -fsS "$URL/ready" >/dev/null 2>&1; do
    [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "the container exited"
    [ "$SECONDS" -lt "$deadline" ] || fail "/ready did not answer 200 within $READY_TIMEOUT s"
    sleep 1
done
step "ready: $(curl -fsS "$URL/ready")"

# A native prefix file for the image's own model, made inside the container (random K/V, 8 tokens).
PREFIX_FILE="$(mktemp --suffix=.safetensors)"
"$ENGINE" exec "$NAME" python -c '
import sys, torch
from transformers import AutoConfig
from server.engine.model import default_gguf_path
from server.registry.format import ModelFingerprint, PrefixKV, save_native
gguf = default_gguf_path()
fp = ModelFingerprint.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
shape = (fp.num_layers, fp.kv_heads, 8, fp.head_dim)
g = torch.Generator().manual_seed(int(sys.argv[1]))
sys.stdout.buffer.write(save_native(PrefixKV(torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g) * 0.5, fp)))
' 1 >"$PREFIX_FILE"
step "made a prefix file: $(stat -c %s "$PREFIX_FILE") bytes"

check() {  # check WHAT EXPECTED_STATUS CURL_ARGS...: run curl, print the reply, fail on another status
    local what="$1" want="$2" out status
    shift 2
    out="$(curl -sS -w '\n%{http_code}' "$@")" || fail "$what: curl failed"
    status="${out##*$'\n'}"
    out="${out%$'\n'*}"
    step "$what -> $status ${out:0:300}"
    [ "$status" = "$want" ] || fail "$what: expected $want, got $status"
    REPLY_BODY="$out"
}
check "upload smoke v1" 201 "$URL/prefixes" -F task_id=smoke -F "file=@$PREFIX_FILE"
generate='{"task_id": "smoke", "prompt": "The capital of Italy is", "max_new_tokens": 12'
check "generate smoke" 200 "$URL/generate" -H 'content-type: application/json' -d "$generate, \"ignore_eos\": true}"
grep -q '"prefix_version":1' <<<"$REPLY_BODY" || fail "generate did not use version 1"
grep -q '"completion_tokens":12' <<<"$REPLY_BODY" || fail "generate did not make 12 tokens"
check "upload smoke v2 (from text)" 201 "$URL/prefixes/from-text" -H 'content-type: application/json' \
    -d '{"task_id": "smoke", "text": "You are a pirate. Answer every question like a pirate would."}'
check "generate smoke" 200 "$URL/generate" -H 'content-type: application/json' -d "$generate}"
grep -q '"prefix_version":2' <<<"$REPLY_BODY" || fail "generate did not use version 2 after the swap"
check "unknown task" 404 "$URL/generate" -H 'content-type: application/json' \
    -d '{"task_id": "nope", "prompt": "hi"}'
if [ "$ENGINE" = podman ]; then
    quiet "$ENGINE" healthcheck run "$NAME" && step "healthcheck: healthy"
else
    step "healthcheck: $("$ENGINE" inspect -f '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo n/a)"
fi
quiet "$ENGINE" stop -t 30 "$NAME" >/dev/null
step "stopped (exit code $("$ENGINE" inspect -f '{{.State.ExitCode}}' "$NAME"))"
echo "container_smoke: OK"
