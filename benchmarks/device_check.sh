#!/usr/bin/env bash
# The CUDA paths on a lent GPU machine (see ../.library/device): the fast test suite with a GPU
# present, then generation and derivation throughput on a randomly initialised model with the
# shapes of a backbone (its weights are too large to send). Logs go to $OUT.
#   carry: .whl (the wheels the machine lacks) and $SHAPE (a backbone's config + tokenizer files,
#   default .gpu/qwen0.5b-shape); arguments go to pytest.
set -u
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/versions.log"
python3 -c "import safepatching.cli, safepatching.experiments.tune" || exit 1
# pytest reports failures only at its end: --timeout keeps one hung test from eating the run's limit;
# --dist loadfile runs a test file's module fixtures (a whole tiny bench) once, not in every worker
timeout "${TEST_SECONDS:-300}" python3 -m pytest -q -rfE --tb=short --timeout 240 -n 8 --dist loadfile -p no:cacheprovider \
  --ignore tests/test_utility.py "$@" 2>&1 | tee "$OUT/pytest.log" | tail -60
SHAPE=${SHAPE:-.gpu/qwen0.5b-shape}
python3 benchmarks/random_backbone.py "$SHAPE" /tmp/random-backbone 2>&1 | tail -1
timeout "${GENERATION_SECONDS:-150}" python3 benchmarks/generation_throughput.py --model /tmp/random-backbone --prompts 48 2>&1 | grep -v Warning | tee "$OUT/generation.log"
timeout "${DERIVE_SECONDS:-120}" python3 benchmarks/derive_throughput.py --model /tmp/random-backbone --steps 10 2>&1 | grep -v Warning | tee "$OUT/derive.log"
