#!/usr/bin/env bash
# The device check (benchmarks/gpu_check.py) on the lent GPU machine, from a checkout carried there
# with its wheels folder: `run` with carry [".whl"], command `bash benchmarks/gpu_check.sh`.
# The wheels the machine lacks (deepspeed, bitsandbytes, submitit, pydantic, ...) are prepared on
# this side as benchmarks/RESULTS.md says; everything is written under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { echo "wheel install failed: see $OUT/pip.log"; tail -5 "$OUT/pip.log"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, deepspeed, bitsandbytes; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__, \
'bitsandbytes', bitsandbytes.__version__)" | tee "$OUT/versions.txt"
exec python3 benchmarks/gpu_check.py --out "$OUT" "$@"
