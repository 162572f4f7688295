"""
The retrieval table of docs/results/retrieval.md over several seeds: for each seed the whole pipeline (a causal
baseline_gpt2, Bi-MNTP on it, SimCSE on the causal and on the MNTP checkpoint, a dual_mask_gpt), then
bench/retrieval.py on the five checkpoints; prints mean ± sd over the seeds per row, and each stage's wall-clock
and CPU time.

    python bench/retrieval_seeds.py                          # seeds 1 2 3 -> runs/retrieval_seeds/
    python bench/retrieval_seeds.py --quick                  # every stage a few steps: checks the script works
    python bench/retrieval_seeds.py --seeds 4 5 --pairs train --limit 500

The commands are those of docs/results/retrieval.md (GSM8K train as json:, tiny preset, context 256, micro
batch 4, 400 causal and dual steps, 200 MNTP steps) with --seed S, and train_simcse.py with its defaults.
Every stage runs with --resume auto, so an interrupted round continues where it stopped; a stage that finished
is not run again (its cost, recorded in OUT/seed<S>/timings.json when it finished, is reported as it was).
CPU time is user + system of the stage's process (resource.getrusage of the children).
Each stage's torch uses 1 thread unless OMP_NUM_THREADS says otherwise (the docs' measurements did the same).
--quick: 4 steps per training stage, 2 SimCSE steps of 4 texts, 20 pairs; its figures mean nothing.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.retrieval import DEFAULT_DATA  # noqa: E402
from plumbing import cli  # noqa: E402

FIELDS = ("recall@1", "recall@10", "mrr")


def stages(data, seed, folder, quick):
    """(name, script, arguments) of one seed's pipeline, in order; each trains into folder/<name>."""
    def out(name):
        return os.path.join(folder, name)

    def ckpt(name):
        return os.path.join(out(name), "checkpoint.pt")
    lm = ["--preset", "tiny", "--data", f"json:{data}", "--seq-len", "256", "--micro-batch-size", "4",
          "--seed", str(seed)]
    steps = ["--max-steps", "4", "--eval-interval", "4", "--checkpoint-interval", "4", "--eval-batches", "1"] \
        if quick else ["--max-steps", "400", "--eval-interval", "100", "--checkpoint-interval", "100"]
    mntp_steps = steps if quick else ["--max-steps", "200"]
    simcse = ["--max-steps", "2", "--eval-interval", "2", "--batch-size", "4", "--eval-batches", "1"] if quick else []
    return [
        ("causal", "train_baseline_gpt2.py", [*lm, *steps, "--out-dir", out("causal")]),
        ("mntp", "train_mntp.py", ["--checkpoint", ckpt("causal"), *mntp_steps, "--out-dir", out("mntp")]),
        ("causal_simcse", "train_simcse.py", ["--checkpoint", ckpt("causal"), *simcse,
                                              "--out-dir", out("causal_simcse")]),
        ("mntp_simcse", "train_simcse.py", ["--checkpoint", ckpt("mntp"), *simcse, "--out-dir", out("mntp_simcse")]),
        ("dual", "train_dual_mask_gpt.py", [*lm, "--n-embd", "128", "--n-head", "4", "--p-bw", "0.5", *steps,
                                            "--out-dir", out("dual")]),
    ]


def run_stage(script, args, log_path):
    """Run one script (its output into log_path); (wall seconds, CPU seconds). Exits on failure."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log_path, "a") as log:  # a resumed stage adds to its log
        code = subprocess.call([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        print(f"error: {script} failed (exit {code}); its output: {log_path}", file=sys.stderr)
        sys.exit(1)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load_timings(folder):
    """{stage: {"wall_s", "cpu_s"}} of the stages of this seed that finished earlier (folder/timings.json)."""
    try:
        with open(os.path.join(folder, "timings.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save_timings(folder, timing):
    path = os.path.join(folder, "timings.json")
    with open(path + ".tmp", "w") as f:
        json.dump(timing, f, indent=1)
    os.replace(path + ".tmp", path)


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values, digits=3, unit=""):
    m, sd = mean_sd(values)
    return f"{m:.{digits}f}{unit}" if sd is None else f"{m:.{digits}f} ± {sd:.{digits}f}{unit}"


# The table's questions: does SimCSE make plain cosine work (no centering needed), and does MNTP + SimCSE beat
# MNTP and causal + SimCSE? Each pair: (row A, row B), as (embedding, scoring); the difference is A - B.
QUESTIONS = [
    (("causal + simcse", "pooled"), ("causal", "pooled")),
    (("mntp + simcse", "pooled"), ("mntp", "pooled")),
    (("causal + simcse", "pooled"), ("causal + simcse", "pooled, centered")),
    (("mntp + simcse", "pooled"), ("mntp + simcse", "pooled, centered")),
    (("mntp + simcse", "pooled"), ("mntp", "pooled, centered")),
    (("mntp + simcse", "pooled, centered"), ("mntp", "pooled, centered")),
    (("mntp + simcse", "pooled"), ("causal + simcse", "pooled")),
    (("mntp + simcse", "pooled, centered"), ("causal + simcse", "pooled, centered")),
]


def comparisons(tables, fields=("recall@10", "mrr")):
    """Markdown lines: for each QUESTIONS pair and field, A - B over the seeds with its 95% CI and Welch's p
    (compare.welch, scipy), or why there is none."""
    from compare import welch
    lines = ["| A | B | metric | A - B (95% CI) | p (Welch) |", "|---|---|---|---|---|"]
    for a, b in QUESTIONS:
        for field in fields:
            values = [[next(r[field] for r in t["rows"] if (r["kind"], r["scoring"]) == row) for t in tables]
                      for row in (a, b)]
            w = welch(*values)
            ci = f" ({w['diff_ci95'][0]:+.3f} .. {w['diff_ci95'][1]:+.3f})" if w["diff_ci95"] else ""
            p = (f"{w['p']:.3g}" if w["p"] is not None else "n too small to tell" if len(tables) < 2
                 else "cannot tell: no spread")
            lines.append(f"| {', '.join(a)} | {', '.join(b)} | {field} | {w['diff']:+.3f}{ci} | {p} |")
    return lines


def summarize(tables, timings):
    """Markdown lines: per row mean ± sd over the seeds, then per stage mean wall and CPU time."""
    lines = [f"| embedding | scoring | {' | '.join(FIELDS)} |", "|---|---|" + "---|" * len(FIELDS)]
    for i, row in enumerate(tables[0]["rows"]):
        cells = []
        for field in FIELDS:
            cells.append(cell([t["rows"][i][field] for t in tables]))
        lines.append(f"| {row['kind']} | {row['scoring']} | {' | '.join(cells)} |")
    lines += ["", "| stage | wall (mean ± sd) | CPU (mean ± sd) |", "|---|---|---|"]
    for name in timings[0]:
        wall, cpu = (cell([t[name][k] for t in timings], 0, " s") for k in ("wall_s", "cpu_s"))
        lines.append(f"| {name} | {wall} | {cpu} |")
    return lines


def main(argv=None):
    p = cli.ArgumentParser(description="The retrieval pipeline for several seeds: mean ± sd per row.")
    p.add_argument("--seeds", type=cli.seed, nargs="+", default=[1, 2, 3])
    p.add_argument("--out-dir", help="runs go to OUT/seed<S>/<stage> (default runs/retrieval_seeds, with --quick "
                   "runs/retrieval_seeds_quick)")
    p.add_argument("--data", default=DEFAULT_DATA, help="GSM8K-format JSON lines (default: shared GSM8K train)")
    p.add_argument("--pairs", choices=["heldout", "train"], default="heldout", help="bench/retrieval.py --pairs")
    p.add_argument("--limit", type=cli.positive_int, help="bench/retrieval.py --limit")
    p.add_argument("--no-maxsim", action="store_true", help="bench/retrieval.py --no-maxsim")
    p.add_argument("--quick", action="store_true", help="a few steps per stage, 20 pairs: a dry run of the script")
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        cli.fail(f"--data {args.data}: no such file")
    out_dir = os.path.abspath(args.out_dir or os.path.join(REPO, "runs", "retrieval_seeds_quick" if args.quick
                                                             else "retrieval_seeds"))
    limit = 20 if args.quick and args.limit is None else args.limit
    tables, timings = [], []
    for seed in args.seeds:
        folder = os.path.join(out_dir, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        timing = load_timings(folder)  # a stage that finished earlier is kept, with the cost it had then
        for name, script, stage_args in stages(args.data, seed, folder, args.quick):
            if name in timing:
                print(f"seed {seed} | {name}: finished earlier ({timing[name]['wall_s']:.0f} s wall, "
                      f"{timing[name]['cpu_s']:.0f} s CPU then)", flush=True)
                continue
            wall, cpu = run_stage(script, [*stage_args, "--resume", "auto"], os.path.join(folder, f"{name}.log"))
            timing[name] = {"wall_s": wall, "cpu_s": cpu}
            save_timings(folder, timing)
            print(f"seed {seed} | {name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        table_path = os.path.join(folder, f"retrieval_{args.pairs}.json")
        bench = ["--causal", os.path.join(folder, "causal"), "--causal-simcse", os.path.join(folder, "causal_simcse"),
                 "--mntp", os.path.join(folder, "mntp"), "--mntp-simcse", os.path.join(folder, "mntp_simcse"),
                 "--dual", os.path.join(folder, "dual"), "--pairs", args.pairs, "--data", args.data,
                 "--out", table_path]
        bench += (["--limit", str(limit)] if limit else []) + (["--no-maxsim"] if args.no_maxsim else [])
        wall, cpu = run_stage("bench/retrieval.py", bench, os.path.join(folder, f"retrieval_{args.pairs}.log"))
        timing["retrieval bench"] = {"wall_s": wall, "cpu_s": cpu}
        print(f"seed {seed} | retrieval bench: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        with open(table_path) as f:
            tables.append(json.load(f))
        timings.append(timing)
    lines = summarize(tables, timings)
    print(f"\n{tables[0]['n']} GSM8K pairs ({args.pairs}), seeds {' '.join(map(str, args.seeds))}: mean ± sd\n")
    print("\n".join(lines))
    if all(any(r["kind"] == "mntp + simcse" for r in t["rows"]) for t in tables):
        print(f"\nThe questions, over seeds {' '.join(map(str, args.seeds))}:\n")
        print("\n".join(comparisons(tables)))
    summary = os.path.join(out_dir, f"summary_{args.pairs}.json")
    with open(summary, "w") as f:
        json.dump({"seeds": args.seeds, "pairs": args.pairs, "tables": tables, "timings": timings}, f, indent=2)
    print(f"\n-> {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
