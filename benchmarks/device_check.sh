#!/usr/bin/env bash
# The CUDA paths on a lent GPU machine (see ../.library/device), in one call of under 10 minutes.
# Prepare here with `python benchmarks/device_prepare.py`, then run there with carry [".whl", ".gpu"]:
#   bash benchmarks/device_check.sh [speed] [tests]      (both by default, speed first)
# speed: on randomly initialised models with each backbone's shapes (the weights are too large to
# send), derive_throughput.py on both shapes, then generation_throughput.py and
# static_cache_compile.py on the 1.5B shape. tests: the fast suite with a GPU present, in the time
# left. Each step's command and last line go to $OUT/device-check-<card>.md, its log beside it.
set -u
STARTED=$SECONDS
BUDGET=${BUDGET_SECONDS:-540}  # the whole script; each step gets at most what is left
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
CARD=${CARD:-no GPU}
RESULTS="$OUT/device-check-$(echo "$CARD" | tr -c 'A-Za-z0-9._-' '-' | sed 's/-*$//').md"
python3 -c "import safepatching.cli, safepatching.experiments.tune" || exit 1
VERSIONS=$(python3 -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}')")
{ echo "# Device check on $CARD ($(date -u +%Y-%m-%d))"
  echo
  echo "$VERSIONS; written by \`bash benchmarks/device_check.sh ${*:-speed tests}\` (benchmarks/device_check.sh)."
  echo
  echo "| command | last line |"
  echo "|---|---|"
} > "$RESULTS"

step() {  # step LOG SECONDS COMMAND...: run it within the time left and keep its last line
  local log=$1 seconds=$2 left=$((BUDGET - (SECONDS - STARTED)))
  shift 2
  if ((left < 30)); then echo "| \`$*\` | not run: the check's time was spent |" >> "$RESULTS"; return; fi
  ((seconds > left)) && seconds=$left
  timeout "$seconds" "$@" 2>&1 | grep -v Warning | tee "$OUT/$log.log"
  local rc=${PIPESTATUS[0]} last
  last=$(grep -v '^[[:space:]]*$' "$OUT/$log.log" | tail -1 | tr '|' '/')
  echo "| \`$*\` | ${last:-no output} (rc $rc) |" >> "$RESULTS"
}

speed() {
  for shape in .gpu/qwen2.5-coder-0.5b-instruct .gpu/qwen2.5-coder-1.5b-instruct; do
    python3 benchmarks/random_backbone.py "$shape" "/tmp/random-${shape##*/}" 2>&1 | tail -1
  done
  step derive-0.5b 100 python3 benchmarks/derive_throughput.py --model /tmp/random-qwen2.5-coder-0.5b-instruct --steps 10
  step derive-1.5b 120 python3 benchmarks/derive_throughput.py --model /tmp/random-qwen2.5-coder-1.5b-instruct --steps 10
  step generation-1.5b 120 python3 benchmarks/generation_throughput.py --model /tmp/random-qwen2.5-coder-1.5b-instruct --prompts 48
  step static-cache-1.5b 120 python3 benchmarks/static_cache_compile.py --model /tmp/random-qwen2.5-coder-1.5b-instruct --prompts 48
}

tests() {  # --timeout keeps one hung test from eating the run; --dist loadfile runs a file's module
  # fixtures (a whole tiny bench) once, not in every worker
  step pytest 300 python3 -m pytest -q -rfE --tb=short --timeout 240 -n 8 --dist loadfile -p no:cacheprovider \
    --ignore tests/test_utility.py
}

for part in ${*:-speed tests}; do
  case $part in
    speed | tests) "$part" ;;
    *) echo "error: unknown part '$part' (speed, tests)" >&2; exit 2 ;;
  esac
done
cat "$RESULTS"
