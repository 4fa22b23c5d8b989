#!/usr/bin/env bash
# Issue #16's device check, from the repository root on a machine with one NVIDIA GPU that cannot download:
#
#   make gpu-wheels                      # here, once: the wheels the GPU machine lacks, into .gpu-wheels/
#   bash loadtest/gpu_check.sh OUTDIR    # there (with .gpu-wheels carried along)
#
# Installs the carried wheels into a folder outside the repository (GPU_CHECK_SITE, default
# /tmp/prefix-server-gpu-site) and puts it first on PYTHONPATH, then runs `python3 -m loadtest.gpu_check
# --out OUTDIR` under a hard time limit (GPU_CHECK_TOTAL_S, default 450 s for everything). Writes
# OUTDIR/gpu_check.json, OUTDIR/gpu_check.md, OUTDIR/gpu_check.log (this script's and the driver's
# progress) and OUTDIR/gpu_check.parts.log (each part's whole output); the JSON and the Markdown exist
# even when the driver fails or is killed (then they say so). Then issue #18's int8 measurement,
# `python3 -m loadtest.gpu_int8 --out OUTDIR`, under its own limit (GPU_CHECK_INT8_S, default 130 s; 0
# skips it): OUTDIR/gpu_int8.json and gpu_int8.md. Both together: under 580 s. Exit code: the driver's (0: every part ok;
# 3: the report is written but a part failed, ran out of time or was skipped; 124 or 137: stopped at the
# limit; 124 also when too little time was left to start it). Arguments after OUTDIR go to the driver,
# e.g. `--device cpu --tiny` for a rehearsal on a CPU (with GPU_CHECK_SKIP_WHEELS=1 and PYTHON set to a
# Python that has the server's packages).
set -euo pipefail

OUT=${1:?usage: bash loadtest/gpu_check.sh OUTDIR [driver arguments]}
shift
INT8_ARGS=()  # a CPU rehearsal (--device cpu) gives gpu_int8 the same device, tiny shapes with it
for ((i = 1; i <= $#; i++)); do
  [[ ${!i} == --device ]] && j=$((i + 1)) && INT8_ARGS+=(--device "${!j}")
  [[ ${!i} == --tiny ]] && INT8_ARGS+=(--tiny)
done
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}
INT8_S=${GPU_CHECK_INT8_S:-130}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/prefix-server-gpu-site}
START=$(date +%s)

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "gpu_check.sh: [$(elapsed) s] $*"; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
LOG="$OUT/gpu_check.log"
: >"$LOG"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say "repository $REPO, output $OUT, limit ${TOTAL_S} s, python $PY" | tee -a "$LOG"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu_check.sh: gpu: /' | tee -a "$LOG" || true
fi

WHEELS_STATUS="none carried"
shopt -s nullglob
wheels=(.gpu-wheels/*.whl)
shopt -u nullglob
if [[ ${GPU_CHECK_SKIP_WHEELS:-0} == 1 ]]; then
  WHEELS_STATUS="skipped (GPU_CHECK_SKIP_WHEELS=1)"
elif ((${#wheels[@]} > 0)); then
  say "installing ${#wheels[@]} carried wheels into $SITE" | tee -a "$LOG"
  rm -rf "$SITE"
  if timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1; then
    WHEELS_STATUS="installed ${#wheels[@]} wheels into $SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    WHEELS_STATUS="pip install of the carried wheels failed (see gpu_check.log); going on without them"
  fi
fi
say "wheels: $WHEELS_STATUS" | tee -a "$LOG"
export GPU_CHECK_WHEELS_STATUS="$WHEELS_STATUS"
"$PY" - <<'EOF' 2>&1 | sed 's/^/gpu_check.sh: /' | tee -a "$LOG" || true
import importlib
for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "fastapi", "uvicorn", "pydantic", "httpx"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: NOT importable ({type(e).__name__}: {e})")
EOF

# The driver's parts share what is left, less a margin for writing the report after a kill.
left=$((TOTAL_S - $(elapsed)))
budget=$((left - 25))
rc=0
if ((budget < 30)); then
  say "only ${left} s left: the driver does not start" | tee -a "$LOG"
  rc=124
else
  say "driver: budget ${budget} s, killed at $((left - 5)) s" | tee -a "$LOG"
  set +e
  timeout --kill-after=5 $((left - 5)) "$PY" -m loadtest.gpu_check --out "$OUT" --budget-s "$budget" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  set -e
fi

if [[ ! -s "$OUT/gpu_check.json" ]]; then
  cat >"$OUT/gpu_check.json" <<EOF
{"issue": 16, "status": "driver failed", "exit_code": $rc, "wheels": "$WHEELS_STATUS", "log": "gpu_check.log", "parts": {}, "goals": []}
EOF
fi
if [[ ! -s "$OUT/gpu_check.md" ]]; then
  {
    echo "# GPU device check (issue #16)"
    echo
    echo "The driver wrote no report (exit code $rc; wheels: $WHEELS_STATUS). The end of gpu_check.log:"
    echo
    echo '```'
    tail -n 40 "$LOG"
    echo '```'
  } >"$OUT/gpu_check.md"
fi
if ((rc != 0)) && grep -q '^## Parts' "$OUT/gpu_check.md"; then
  echo >>"$OUT/gpu_check.md"
  echo "The driver exited with code $rc (124 or 137: stopped at the ${TOTAL_S} s limit; a part still 'running' above was cut off)." >>"$OUT/gpu_check.md"
fi
say "done, exit code $rc: $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/gpu_check.log" | tee -a "$LOG"

# Issue #18's int8 figures after #16's (its own limit, GPU_CHECK_INT8_S; 0 skips it). It cannot change
# the exit code above: #16's report comes first.
if ((INT8_S > 0)); then
  say "int8: python -m loadtest.gpu_int8, limit ${INT8_S} s" | tee -a "$LOG"
  set +e
  timeout --kill-after=5 "$INT8_S" "$PY" -m loadtest.gpu_int8 --out "$OUT" --budget-s $((INT8_S - 15)) \
    "${INT8_ARGS[@]}" 2>&1 | tee -a "$LOG"
  say "int8: exit code ${PIPESTATUS[0]}: $OUT/gpu_int8.json, $OUT/gpu_int8.md" | tee -a "$LOG"
  set -e
fi
exit "$rc"
