#!/usr/bin/env bash
# bench/modern.py's runs in parallel lanes: one process per (model, variant, seed), each with one torch thread,
# JOBS at a time (default: the number of cores), the longest kinds first. Each process is
# `python bench/modern.py --models M --variants V --seeds S ...` with the same flags as one big run would use,
# so its run folder is the one that run would write; afterwards `python bench/modern.py --table-only` (same
# flags, all models/variants/seeds) prints the table of every finished run, and --reuse redoes what is missing.
#
#   DATA=data17 OUT=runs17/tiny bash bench/modern_parallel.sh "baseline_gpt2:gpt2,+rope:1,2,3" ...
#   EXTRA="--n-layer 6 --n-embd 192 --n-head 6" ... (passed to every run: a larger config)
# Each argument is MODELS:VARIANTS:SEEDS (comma-separated lists); all their combinations are run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}; OUT=${OUT:-runs/modern}; JOBS=${JOBS:-$(nproc)}; STEPS=${STEPS:-200}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1
jobs=()
for spec in "$@"; do
    IFS=: read -r models variants seeds <<< "$spec"
    for m in ${models//,/ }; do for v in ${variants//,/ }; do for s in ${seeds//,/ }; do
        jobs+=("$m $v $s")
    done; done; done
done
# The data once, before the lanes start (each would otherwise wait for the others' preparation).
$PY base_data_preparer.py --data synthetic-math --tokenizer bytes --max-tokens 2M --data-dir "$DATA" > /dev/null
mkdir -p "$OUT/logs"
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c '
    log="'"$OUT"'/logs/$0-${1#+}-seed$2.log"
    '"$PY"' bench/modern.py --models "$0" --variants "$1" --seeds "$2" --data-dir "'"$DATA"'" \
        --out-dir "'"$OUT"'" --steps '"$STEPS"' --reuse --timing-rounds 1 '"${EXTRA:-}"' > "$log" 2>&1 \
        && echo "done $0 $1 $2" || echo "FAILED $0 $1 $2 (see $log)"'
