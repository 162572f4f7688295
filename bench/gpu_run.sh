#!/usr/bin/env bash
# The GPU half of the benchmarks, as one script for a short lease on a lent GPU.
#
#   OUT=results/ bash bench/gpu_run.sh          # every table also goes to $OUT/*.txt
#   SEED_STEPS=24 bash bench/gpu_run.sh         # optimizer steps per model in the seed table
#
# Offline: the seed table trains on synthetic-math with the GPT-2 tokenizer (set TIKTOKEN_CACHE_DIR to a
# folder holding the BPE files if the machine cannot download them). Each part has its own time limit, so a
# failure or a hang in one still leaves the others' figures. The order is the order of importance.
set -u
OUT=${OUT:-gpu_results}
SEED_STEPS=${SEED_STEPS:-24}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
source "$(dirname "$0")/gpu_part.sh"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } \
    2>&1 | tee "$OUT/env.txt"

# 1. The trainer end to end on CUDA (bf16 autocast, fused AdamW, checkpoint, resume).
part smoke 120 bash -c "$PY train_baseline_gpt2.py --preset tiny --device cuda --max-steps 6 --eval-interval 3 \
    --checkpoint-interval 3 --max-tokens 1000000 --data-dir /tmp/lmsmall_data --out-dir /tmp/lmsmall_smoke --overwrite && \
    $PY train_baseline_gpt2.py --preset tiny --device cuda --max-steps 8 --data-dir /tmp/lmsmall_data \
    --out-dir /tmp/lmsmall_smoke --resume"

# 2. Every model at its rtx3080 preset (GPT-2 vocabulary, the seed's micro batch of 8): speed, MFU and memory,
#    eager here, compiled at the end (compiling four models takes minutes).
part throughput_rtx3080 150 $PY bench/throughput.py --preset rtx3080 --vocab-size 50304 --batch 8 --device cuda \
    --steps 10 --rounds 3

# 3. GPT-2 124M (12 layers, 12 heads, 768 wide, context 1024) in bf16, eager and with --compile.
part gpt2_124m 120 $PY bench/throughput.py --models baseline_gpt2 --set n_layer=12 n_head=12 n_embd=768 \
    --seq-len 1024 --batch 32 --vocab-size 50304 --device cuda --steps 10 --rounds 3
part gpt2_124m_compile 240 $PY bench/throughput.py --models baseline_gpt2 --set n_layer=12 n_head=12 n_embd=768 \
    --seq-len 1024 --batch 32 --vocab-size 50304 --device cuda --steps 10 --rounds 3 --compile

# 4. The seed's table: rtx3080 presets, same data and token budget (SEED_STEPS x 524,288 tokens per model).
#    Micro batch 32 instead of 8: the same optimizer steps (gradient accumulation), fewer kernel launches.
part seed_table 420 $PY bench/reproduce_seed_table.py --scale full --device cuda --data synthetic-math \
    --tokenizer gpt2 --max-tokens 40000000 --data-dir /tmp/lmsmall_data --max-steps "$SEED_STEPS" --eval-batches 16 \
    --out-dir /tmp/lmsmall_seed_table --overwrite --train-args --micro-batch-size 32

# 5. Generation with and without the KV cache at the rtx3080 sizes.
part generate 120 $PY bench/generate.py --preset rtx3080 --vocab-size 50304 --device cuda --new-tokens 200

# 6. Every model at its rtx3080 preset again, compiled.
part throughput_rtx3080_compile 240 $PY bench/throughput.py --preset rtx3080 --vocab-size 50304 --batch 8 \
    --device cuda --steps 10 --rounds 3 --compile
