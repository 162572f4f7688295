#!/usr/bin/env bash
# The newer paths on a GPU (bf16 autocast, fused AdamW): ALiBi/CLAP training and resume, cached == uncached
# generation with ALiBi, answer-only LoRA fine-tuning, accuracy, Bi-MNTP, embeddings; then GPT-2 124M with
# --compile at two batch sizes. Short enough for the tail of a lease (about 3 minutes on an H200).
#
#   OUT=results/ bash bench/gpu_check_options.sh
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
D=/tmp/lmsmall_opt_data
R=/tmp/lmsmall_opt_runs
source "$(dirname "$0")/gpu_part.sh"
T="--preset tiny --device cuda --max-tokens 1000000 --data-dir $D --eval-interval 20 --checkpoint-interval 20"

part options 200 bash -c "set -e
$PY train_baseline_gpt2.py $T --pos alibi --head clap --max-steps 20 --out-dir $R/alibi_clap
$PY train_baseline_gpt2.py --device cuda --data-dir $D --max-steps 30 --out-dir $R/alibi_clap --resume
$PY train_dual_mask_gpt.py $T --pos alibi --max-steps 20 --out-dir $R/dual_alibi
$PY train_progressive_diverging.py $T --pos sinusoidal --max-steps 30 --out-dir $R/prog_sin
$PY -c \"
import torch; from models import create_model
for name in ['baseline_gpt2', 'dual_mask_gpt', 'progressive_diverging']:
    torch.manual_seed(0); m = create_model(name, pos='alibi', vocab_size=320).cuda().eval()
    p = torch.randint(0, 256, (2, 5), device='cuda')
    a = m.generate(p, 60, top_k=1, use_cache=True); b = m.generate(p, 60, top_k=1, use_cache=False)
    print(name, 'alibi cached == uncached on cuda:', bool((a == b).all()))
\"
$PY finetune.py --checkpoint $R/alibi_clap/checkpoint.pt --loss-on answer --lora-rank 4 --max-steps 20 --out-dir $R/ft
$PY evaluate.py --checkpoint $R/ft/checkpoint.pt --task synthetic-math --limit 20 --quiet
$PY train_mntp.py --checkpoint $R/prog_sin/checkpoint.pt --max-steps 20 --device cuda --out-dir $R/mntp
printf 'What is 2 + 3?\nA train travels 60 km.\n' > /tmp/texts.txt
$PY embed.py --checkpoint $R/mntp/checkpoint.pt --input /tmp/texts.txt --out /tmp/e.npy --overwrite
$PY embed.py --checkpoint $R/dual_alibi/checkpoint.pt --input /tmp/texts.txt --out /tmp/d.npy --overwrite
$PY -c \"import numpy as np; print('embeddings', np.load('/tmp/e.npy').shape, np.load('/tmp/d.npy').shape)\""

G="--models baseline_gpt2 --set n_layer=12 n_head=12 n_embd=768 --seq-len 1024 --vocab-size 50304 --device cuda"
part gpt2_124m_compile_b32 120 $PY bench/throughput.py $G --batch 32 --steps 10 --rounds 3 --compile
part gpt2_124m_compile_b64 120 $PY bench/throughput.py $G --batch 64 --steps 10 --rounds 3 --compile
