#!/usr/bin/env bash
# GPU speed on a lent GPU, in one go, inside TOTAL_S seconds (default 450): the trainer's speed settings side by
# side, then the seed's table at its full budget (313 steps x 524,288 tokens = 164M tokens per model) for
# baseline_gpt2, conv_attention, progressive_diverging and dual_mask_gpt (p_bw 0.05), on synthetic-math with
# the GPT-2 tokenizer, and its loss chart.
#
#   OUT=results bash bench/gpu_speed.sh              # on the GPU machine (the lead's run)
#   OUT=/tmp/dry bash bench/gpu_speed.sh --dry-run   # on a CPU: tiny sizes, a few steps, every part
#
# Offline: the GPT-2 BPE files travel in the repo's ignored .tiktoken-cache/ (copy ../shared/tiktoken-cache
# there and carry it). What comes back ($OUT, 6 files): log.txt (everything, with timestamps), compare.json,
# summary.txt, runs.tgz (each run's config.json, metrics.jsonl, train.log), seed_table.png, gpu_clocks.csv.
#
# Plan on an H100 (each part has its own time limit; later parts get what is left of TOTAL_S):
#   0 s   env; the table's data (170M tokens, 12 tokenizer processes) starts preparing in the background
#   ~5 s  compare: every model at micro batch 8 eager (today's main) and auto eager; baseline_gpt2 compiled
#         in the default mode and with CUDA graphs (reduce-overhead), all under a 10 GiB memory limit
#         (set_per_process_memory_fraction: the micro batch an RTX 3080 would pick, and proof that it fits)
#   then  the table, one model after another, each with an equal share of what is left; a run still going at
#         the end of its share is stopped with Ctrl-C (checkpoint saved, its rows so far count, marked partial)
set -u
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu_results}
TOTAL_S=${TOTAL_S:-450}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
[ -d .tiktoken-cache ] && export TIKTOKEN_CACHE_DIR="$PWD/.tiktoken-cache"
START=$SECONDS
left() { echo $((TOTAL_S - (SECONDS - START))); }
stamp() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*"; }
part() {  # part NAME LIMIT_S command...: run with a time limit (SIGINT, then KILL), say how it ended
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    stamp "=== $name (limit ${limit}s): $*"
    timeout -s INT -k 30 "$limit" "$@"
    stamp "=== $name: exit $? after $((SECONDS - t0)) s"
}

DATA=/tmp/lmsmall_data; CMP_DATA=/tmp/lmsmall_cmp_data; RUNS=/tmp/lmsmall_gpu_speed
TABLE_TOKENS=${TABLE_TOKENS:-170000000}; CMP_TOKENS=2000000; WORKERS=12
COMPARE_LIMIT=170; SUMMARY_RESERVE=40
# SETTINGS="old auto-eager" and TABLE_TRAIN_ARGS="--no-compile" shorten a rerun (the second H100 run used both).
# COMPARE=0 skips the comparison; EAGER_REF=N first trains baseline_gpt2 eager for N steps (the side-by-side
# reference for a compiled table); TABLE_STEPS=N trains every model N steps (the schedule is N steps long, the
# same for all) and TABLE_TOKENS sizes the data for it; GPT2_124M=0 skips the GPT-2 124M measurement.
# TABLE_MODELS="a b" trains those (in that order); IN_ORDER=1 lets each use all the time left (no equal shares);
# CONTINUE=1 keeps finished runs and resumes stopped ones (a second call on the same warm machine);
# HEAD_AB=1 times the compiled head chunk, this code's and the one before 11-28, while the data prepares.
CMP_ARGS=(--memory-limit-gib 10); CMP_SETTINGS=(${SETTINGS:-old auto-eager new reduce-overhead})
ORDER_ARGS=(); [ -n "${TABLE_MODELS:-}" ] && ORDER_ARGS+=(--models $TABLE_MODELS)
[ "${IN_ORDER:-0}" = 1 ] && ORDER_ARGS+=(--in-order)
[ "${CONTINUE:-0}" = 1 ] && ORDER_ARGS+=(--continue)
TABLE_ARGS=("${ORDER_ARGS[@]}"); [ -n "${TABLE_STEPS:-}" ] && TABLE_ARGS+=(--max-steps "$TABLE_STEPS")
[ -n "${TABLE_TRAIN_ARGS:-}" ] && TABLE_ARGS+=(--train-args $TABLE_TRAIN_ARGS)
CMP_SKIP=(conv_attention:new conv_attention:reduce-overhead progressive_diverging:new
          progressive_diverging:reduce-overhead dual_mask_gpt:new dual_mask_gpt:reduce-overhead)
if [ $DRY = 1 ]; then  # a CPU: small data, models and steps; compile only where asked (slow on a CPU)
    DATA=/tmp/lmsmall_dry_data; CMP_DATA=/tmp/lmsmall_dry_cmp; RUNS=/tmp/lmsmall_dry_runs
    TABLE_TOKENS=3000000; CMP_TOKENS=1000000; WORKERS=2; COMPARE_LIMIT=600
    CMP_ARGS=(--dry-run --total-batch-size 4096 --steps 2); CMP_SETTINGS=(old auto-eager)
    [ "${DRY_COMPILE:-0}" = 1 ] && CMP_SETTINGS+=(new)
    TABLE_ARGS=("${ORDER_ARGS[@]}" --max-steps ${DRY_STEPS:-3} --eval-interval 2 --train-args --seq-len 64 --total-batch-size 4096 --n-embd 64
                --n-head 2 --eval-batches 2)
    [ "${CONTINUE:-0}" = 1 ] || rm -rf "$RUNS" "$RUNS-eager"
fi
rm -f /tmp/cmp_*.json

stamp "GPU speed script (dry run: $DRY), total ${TOTAL_S}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || echo "no nvidia-smi"
$PY -c "import torch, sys, os; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda',
torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'cores',
os.cpu_count()); print('tiktoken cache', os.environ.get('TIKTOKEN_CACHE_DIR'))"
uptime
# The card's clocks, power, temperature and load every 5 s while everything runs (read only): a step time that
# drifts on fixed shapes (seen 2026-11-28) is the machine's if the SM clock or the load moves with it.
SMI=
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
        --format=csv -l 5 > "$OUT/gpu_clocks.csv" 2>&1 &
    SMI=$!
fi

# The table's data, in the background while the comparison runs (the comparison has its own small set).
stamp "preparing $TABLE_TOKENS tokens in the background ($WORKERS processes)"
$PY base_data_preparer.py --data synthetic-math --tokenizer gpt2 --max-tokens $TABLE_TOKENS --data-dir $DATA \
    --num-workers $WORKERS > "$OUT/prep.log" 2>&1 &
PREP=$!
if [ "${HEAD_AB:-0}" = 1 ]; then
    PROFILE_ARGS=(--head-only); [ $DRY = 1 ] && PROFILE_ARGS+=(--preset tiny --micro 4 --vocab 512 --repeat 2)
    part head_ab 120 $PY bench/gpu_profile.py "${PROFILE_ARGS[@]}"
fi
part compare_data 120 $PY base_data_preparer.py --data synthetic-math --tokenizer gpt2 --max-tokens $CMP_TOKENS \
    --data-dir $CMP_DATA --num-workers 4
# One process per model and setting: a process that compiled, or ran out of memory under the 10 GiB cap,
# keeps memory that the next setting would then lack (seen in the first H100 run).
CMP_T0=$SECONDS
[ "${COMPARE:-1}" = 0 ] && CMP_SETTINGS=()
for m in baseline_gpt2 conv_attention progressive_diverging dual_mask_gpt; do
    for s in "${CMP_SETTINGS[@]}"; do
        case " ${CMP_SKIP[*]} " in *" $m:$s "*) continue;; esac
        rest=$((COMPARE_LIMIT - (SECONDS - CMP_T0)))
        [ $rest -lt 10 ] && { stamp "compare $m $s: skipped, past the deadline"; continue; }
        part "compare_${m}_$s" $((rest + 30)) $PY bench/gpu_speed.py compare --models $m --settings $s \
            --data-dir $CMP_DATA --max-tokens $CMP_TOKENS --deadline $rest --out "/tmp/cmp_${m}_$s.json" "${CMP_ARGS[@]}"
    done
done
$PY -c "import json, glob, sys; rows = [r for f in sorted(glob.glob('/tmp/cmp_*.json')) for r in json.load(open(f))]; json.dump(rows, open(sys.argv[1], 'w'), indent=1)" "$OUT/compare.json"
$PY bench/gpu_speed.py summary --compare "$OUT/compare.json"

stamp "waiting for the table's data"
WAIT_T0=$SECONDS
while kill -0 $PREP 2>/dev/null && [ "$(left)" -gt $((SUMMARY_RESERVE + 60)) ]; do sleep 1; done
if kill -0 $PREP 2>/dev/null; then kill -INT $PREP; stamp "data preparation still running: stopped (no table)"; fi
wait $PREP; PREP_CODE=$?
stamp "data preparation: exit $PREP_CODE (waited $((SECONDS - WAIT_T0)) s after the comparison)"; tail -2 "$OUT/prep.log"

if [ $PREP_CODE = 0 ] && [ "${EAGER_REF:-0}" -gt 0 ]; then
    REF_ARGS=(--max-steps "$EAGER_REF" --train-args --no-compile); [ $DRY = 1 ] && REF_ARGS=("${TABLE_ARGS[@]}" --no-compile)
    part eager_reference 120 $PY bench/gpu_speed.py table --models baseline_gpt2 --data-dir $DATA \
        --max-tokens $TABLE_TOKENS --runs $RUNS-eager --deadline 90 "${REF_ARGS[@]}"
fi
if [ $PREP_CODE = 0 ]; then
    TABLE_S=$(( $(left) - SUMMARY_RESERVE ))
    part table $((TABLE_S + 90)) $PY bench/gpu_speed.py table --data-dir $DATA --max-tokens $TABLE_TOKENS \
        --runs $RUNS --deadline $TABLE_S "${TABLE_ARGS[@]}"
fi

# If time is left: GPT-2 124M compiled (the earlier 42.3% MFU figure was measured with the loss inside forward;
# training now runs the chunked head instead).
if [ $DRY = 0 ] && [ "${GPT2_124M:-1}" = 1 ] && [ "$(left)" -gt 100 ]; then
    part gpt2_124m_compile $(( $(left) - 45 )) $PY bench/throughput.py --models baseline_gpt2 --set n_layer=12 \
        n_head=12 n_embd=768 --seq-len 1024 --batch 32 --vocab-size 50304 --device cuda --steps 10 --rounds 3 --compile
fi

part summary 60 bash -c "$PY bench/gpu_speed.py summary --compare '$OUT/compare.json' --runs $RUNS \
    | tee '$OUT/summary.txt'; [ -d $RUNS-eager ] && $PY bench/gpu_speed.py summary --runs $RUNS-eager \
    --models baseline_gpt2 | tee -a '$OUT/summary.txt'"
part plot 30 bash -c "ls -d $RUNS/*/ >/dev/null 2>&1 && $PY plot_loss.py $RUNS/*/ --out '$OUT/seed_table.png'"
mkdir -p "$RUNS" && mv "$OUT/prep.log" "$RUNS/prep.log"
[ -d $RUNS-eager ] && rm -rf "$RUNS/eager_reference" && cp -r $RUNS-eager/baseline_gpt2 "$RUNS/eager_reference"
(cd "$RUNS" && tar czf - prep.log $(ls -d */config.json */metrics.jsonl */train.log */wall_s.txt 2>/dev/null)) \
    > "$OUT/runs.tgz"
[ -n "$SMI" ] && kill $SMI
stamp "done; files in $OUT:"; ls -la "$OUT"
