#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100/H200, everything written under one folder ($OUT, else
# outputs/gpu_check/<date>):
#   1. the GPU-marked tests                                         -> $OUT/pytest_gpu.txt
#   2. the PEFT comparison at paper sizes, bf16, with MFU           -> $OUT/bench_training.{json,txt}
#   3. the LAMA P-tuning table for SmolLM2 (manual + P-tuning, 1 seed, all 41 relations in one shared batch)
#                                                                   -> $OUT/lama/{results.json,REPORT.md,*.png}
# Each part has its own time limit so that one slow part cannot eat the others' time; the script goes on
# after a failed part and exits non-zero at the end if any failed.  Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false \
       MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
OUT="${OUT:-outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
failed=()
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, time it
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || failed+=("$name")
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/device.txt" 2>&1

# data and model the LAMA part needs (cheap when present; the mirror comes from ../shared)
part prepare 120 bash -c "{ [ -d data/lama/29k ] || { python -m components.cli prepare data && python -m components.cli prepare lama; }; } && python -m components.cli models prepare smollm2-135m"

part pytest_gpu 90 python -m pytest -q -p no:cacheprovider -m gpu tests

# paper sizes (random weights, real widths and depths), bf16, frozen and joint, ours vs PEFT; MFU in the table
part bench_training 200 python benchmarks/bench_training.py --device cuda --precision bf16 \
  --models random:bert-base-cased random:bert-large-cased random:gpt2-medium random:albert-xxlarge-v2 \
  --batch-size 32 --steps 10 --warmup 3 --timeout 60 --output "$OUT/bench_training.json"

# the LAMA table: all 41 relations' prompts at once (41 x 8 rows a step), bf16 frozen LM
part lama_report 240 python -m components.cli report lama --model smollm2-135m --methods manual,ptuning --seeds 34 \
  --pool 41 --lm-batch 512 --set train.precision=bf16 --output-dir "$OUT/lama" --no-progress

echo "total ${SECONDS}s; failed: ${failed[*]:-none}" | tee -a "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
