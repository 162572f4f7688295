#!/usr/bin/env bash
# Answer-only loss, "show that it measures something": the tiny baseline_gpt2 on synthetic-math, all-token loss vs
# answer-only loss at the same budget, 3 seeds each (same data), then exact match on the de-twinned test split.
# Two lanes (one per loss) run side by side, each with 1 torch thread: fits a 2-core CPU.
# Usage: [LIMIT=N] bash bench/accuracy_experiment.sh [STEPS] [OUT] [DATA]   (defaults 400, runs/acc, data;
#        LIMIT = test problems scored per run, default 200)
#        bash bench/accuracy_experiment.sh summary [OUT]          (the tables, from the runs' JSON and logs)
set -euo pipefail
summary() {  # $1 = OUT: per-run rows, mean and sd per loss, strict/flexible per family and seed
    python - "$1" <<'PY'
import json, re, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
def ms(xs):
    m = statistics.mean(xs); s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return m, s
rows, fams = {}, {}
for variant in ("all", "answer"):
    for seed in (1, 2, 3):
        run = out / f"{variant}_s{seed}"
        ev = out / f"{variant}_s{seed}_eval.json"
        if not ev.exists():
            continue
        r = json.loads(ev.read_text())
        acc, loss = r["accuracy"], r["loss"]
        val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        val = [m for m in val if m["split"] == "val"][-1]
        tlog = (out / f"{variant}_s{seed}.train.log").read_text()
        elog = (out / f"{variant}_s{seed}.eval.log").read_text()
        tw = float(re.search(r"train wall ([\d.]+) s", tlog).group(1))
        ew = float(re.search(r"eval wall ([\d.]+) s", elog).group(1))
        load = re.search(r"load average: ([\d.]+)", tlog).group(1)
        rows.setdefault(variant, []).append(dict(seed=seed, strict=acc["strict"]["correct"],
            flex=acc["flexible"]["correct"], total=acc["total"], loss=loss["loss"],
            aloss=loss.get("answer_loss"), bpb=loss["bpb"], val=val.get("loss_all", val["loss"]), vala=val["loss"] if "loss_all" in val else None, tw=tw, ew=ew, load=load,
            hashes=sum("####" in a["generated"] for a in acc["answers"])))
        for f, c in acc["per_family"].items():
            fams.setdefault(f, {}).setdefault(variant, []).append((c["strict"], c["flexible"], c["total"]))
print("| loss | seed | strict | flexible | wrote #### | val loss all (trainer) | test loss all | test loss answer | bpb | train wall | eval wall (problems/s) | load at start |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for v, rs in rows.items():
    for x in rs:
        print(f"| {v} | {x['seed']} | {x['strict']}/{x['total']} | {x['flex']}/{x['total']} | {x['hashes']} | {x['val']:.3f} | "
              f"{x['loss']:.3f} | {x['aloss']:.3f} | {x['bpb']:.3f} | {x['tw']:.0f} s | {x['ew']:.0f} s ({x['total']/x['ew']:.1f}) | {x['load']} |")
print()
print("| loss | strict % mean ± sd | flexible % mean ± sd | test loss all | test loss answer | bpb |")
print("|---|---|---|---|---|---|")
for v, rs in rows.items():
    f = lambda k, scale=1.0: "%.3f ± %.3f" % ms([x[k] * scale for x in rs])
    s = ms([100 * x["strict"] / x["total"] for x in rs]); fl = ms([100 * x["flex"] / x["total"] for x in rs])
    print(f"| {v} (n={len(rs)}) | {s[0]:.1f} ± {s[1]:.1f} | {fl[0]:.1f} ± {fl[1]:.1f} | {f('loss')} | {f('aloss')} | {f('bpb')} |")
print()
print("| family | problems | all: strict per seed | all: flexible | answer: strict per seed | answer: flexible |")
print("|---|---|---|---|---|---|")
for fam, d in sorted(fams.items()):
    tot = (d.get("all") or d.get("answer"))[0][2]
    cell = lambda v, i: " / ".join(str(t[i]) for t in d.get(v, [])) or "-"
    print(f"| {fam} | {tot} | {cell('all', 0)} | {cell('all', 1)} | {cell('answer', 0)} | {cell('answer', 1)} |")
PY
}
if [ "${1:-}" = summary ]; then summary "${2:-runs/acc}"; exit 0; fi
STEPS=${1:-400}
OUT=${2:-runs/acc}
DATA=${3:-data}
LIMIT=${LIMIT:-200}
EVAL_EVERY=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
# Prepare the data once, before the two lanes start (both would otherwise write the same shards).
python train_baseline_gpt2.py --preset tiny --data-dir "$DATA" --out-dir "$OUT/prepare" --max-steps 1 \
    --overwrite > "$OUT/prepare.log" 2>&1

lane() {  # $1 = all | answer
    for seed in 1 2 3; do
        run="$OUT/${1}_s${seed}"
        { echo "uptime before: $(uptime)"; /usr/bin/time -f "train wall %e s, user %U s" \
            python train_baseline_gpt2.py --preset tiny --data-dir "$DATA" --out-dir "$run" --overwrite \
            --seed "$seed" --max-steps "$STEPS" --eval-interval "$EVAL_EVERY" --checkpoint-interval "$EVAL_EVERY" --loss-on "$1"; } \
            > "$run.train.log" 2>&1
        { echo "uptime before: $(uptime)"; /usr/bin/time -f "eval wall %e s, user %U s" \
            python evaluate.py --checkpoint "$run/checkpoint.pt" --task synthetic-math --split test --limit "$LIMIT" \
            --loss --quiet --overwrite --out "${run}_eval.json"; echo "uptime after: $(uptime)"; } \
            > "$run.eval.log" 2>&1
    done
}
lane all & A=$!
lane answer & B=$!
wait $A $B
summary "$OUT"
