"""
Is A better than B? Groups run folders that differ only in --seed and compares the groups' final metrics.

    python compare.py runs/sweep_pos --baseline pos=learned                 # a Markdown table
    python compare.py runs/sweep_pos runs/other --format json --metric "val loss" "test bpb"

A group is every run whose config.json settings are the same except "seed" (and what does not change the result:
out_dir, threads, device, resume, ...). --data-seed is a setting: runs with other data seeds form other groups.
Runs that differ only in the seed but were trained on different data (config.json "data_hash") are refused.
Metrics: every number of the last val row and the last test row ("val loss", "test bpb", ...) and every number
in the other JSON files of a run folder (such as evaluate.py --out runs/x/eval.json: "eval.json:accuracy").
Per group and metric: n, mean, sd, the 95% confidence interval of the mean (t-based); per group against the
baseline group: the difference of the means with its 95% CI and the p-value of Welch's t-test.
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import json
import math
import os
import sys

from plumbing import cli

# config.json fields that do not change what a run computes (or that follow from the settings). model_overrides
# is what was typed (--pos learned, or nothing for the same default); model_config, what was built, is compared.
NOT_SETTINGS = {"model_overrides", "seed", "out_dir", "resume", "overwrite", "threads", "data_dir", "dataset_dir",
                "device", "device_used", "data_hash", "n_params", "checkpoint_interval", "compiled", "compile_mode",
                "flops_per_token", "peak_flops", "world_size", "micro_batch_size", "base_micro_batch_size",
                "micro_batch_auto", "grad_accum", "memory_budget"}
TOO_FEW = "n too small to tell"
# The trainer's "loss" is over the tokens a run trains on (--loss-on answer: the answers; --filler-token: all but
# the filler), so two groups' val/test "loss" measure other tokens when these differ (bpb and evaluate.py's
# figures are over the same tokens for every run).
LOSS_SCOPE = ("loss_on", "filler_token")
UNLIKE = ("not like for like: --loss-on or --filler-token differs, so the loss is over other tokens; compare bpb or "
          "evaluate.py's loss and answer_loss")


def loss_scope(group):
    config = group["runs"][0]["config"]
    return tuple(config.get(k) or None for k in LOSS_SCOPE)


class CompareError(Exception):
    """Bad input; printed as one line (exit 2)."""


# ---- statistics ------------------------------------------------------------------------------------------------

def summary(values):
    """n, mean, sd (n-1), and the t-based 95% CI of the mean (None where n < 2)."""
    from scipy import stats
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def welch(values, base):
    """Difference of the means (values - base), its 95% CI (Welch-Satterthwaite degrees of freedom) and the
    p-value of Welch's t-test; the CI and p are None when a group has n < 2 or neither group varies."""
    from scipy import stats
    diff = sum(values) / len(values) - sum(base) / len(base)
    out = {"diff": diff, "diff_ci95": None, "p": None}
    if len(values) < 2 or len(base) < 2:
        return out
    va, vb = (summary(values)["sd"] ** 2 / len(values), summary(base)["sd"] ** 2 / len(base))
    if va + vb == 0:
        return out
    df = (va + vb) ** 2 / (va ** 2 / (len(values) - 1) + vb ** 2 / (len(base) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    out["diff_ci95"] = [diff - half, diff + half]
    out["p"] = float(stats.ttest_ind(values, base, equal_var=False).pvalue)
    return out


# ---- run folders -----------------------------------------------------------------------------------------------

def find_runs(paths):
    """Every folder under the paths (the paths included) that holds a config.json and a metrics.jsonl."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise CompareError(f"{path} is not a folder; give run folders or folders that hold them")
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            if "config.json" in files and "metrics.jsonl" in files:
                runs.append(folder)
    if not runs:
        raise CompareError(f"no run folder (config.json + metrics.jsonl) under {' '.join(paths)}; "
                           f"run sweep.py or a train_<model>.py first")
    return runs


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CompareError(f"cannot read {path} as JSON ({e}); is it a file of lmsmall?") from None


def flatten(value, prefix=""):
    """{"a.b": leaf} of nested dicts."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_metrics(run_dir):
    """({metric name: number}, finished) of one run: the last val and test rows and the numbers of its other JSON
    files; finished when it has its final evaluation (a test row, written at --max-steps)."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl"), errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a last line cut by a kill
    metrics = {}
    for split in ("val", "test"):
        last = [r for r in rows if isinstance(r, dict) and r.get("split") == split]
        if last:
            metrics.update({f"{split} {k}": v for k, v in last[-1].items()
                            if is_number(v) and k not in ("step", "tokens")})
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".json") and name != "config.json":
            data = read_json(os.path.join(run_dir, name))
            metrics.update({f"{name}:{k}": v for k, v in flatten(data).items() if is_number(v)})
    return metrics, any(isinstance(r, dict) and r.get("split") == "test" for r in rows)


def load_run(run_dir):
    config = read_json(os.path.join(run_dir, "config.json"))
    if not isinstance(config, dict):
        raise CompareError(f"{run_dir}/config.json is not a JSON object; is it a run folder of lmsmall?")
    settings = {k: v for k, v in flatten(config).items() if k.split(".")[0] not in NOT_SETTINGS}
    metrics, finished = run_metrics(run_dir)
    return {"dir": run_dir, "config": config, "settings": settings, "metrics": metrics, "finished": finished}


def finished_runs(runs):
    """The runs that reached their final evaluation, and a note naming those left out (a run still training, or
    stopped: its last val row is not its final one, and pooling it would compare unequal budgets)."""
    done = [r for r in runs if r["finished"]]
    if not done:
        raise CompareError(f"none of the {len(runs)} run(s) has finished (no test row yet); finish them with "
                           f"--resume, or wait for the sweep")
    left = [r["dir"] for r in runs if not r["finished"]]
    note = (f"note: left out {len(left)} unfinished run(s) (no final test row yet): {', '.join(left[:3])}"
            f"{' ...' if len(left) > 3 else ''}") if left else None
    return done, note


def group_runs(runs):
    """Runs with the same settings but the seed, as a list of groups {"name", "runs", ...}; CompareError for a
    group whose runs read different data (data_hash), which would not be a fair pool."""
    groups = {}
    for run in runs:
        key = json.dumps(run["settings"], sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    for members in groups.values():
        hashes = {r["config"].get("data_hash") for r in members}
        if len(hashes) > 1:
            a = members[0]
            b = next(r for r in members if r["config"].get("data_hash") != a["config"].get("data_hash"))
            raise CompareError(f"{a['dir']} and {b['dir']} differ only in the seed but read different data "
                               f"(data_hash {a['config'].get('data_hash')} vs {b['config'].get('data_hash')}); "
                               f"they are not pooled: compare them in separate commands or retrain on one dataset")
    # name each group by the settings that differ between groups (leaf names: model_config.pos -> pos)
    all_keys = sorted({k for m in groups.values() for k in m[0]["settings"]})
    varying = [k for k in all_keys if len({json.dumps(m[0]["settings"].get(k), default=str)
                                           for m in groups.values()}) > 1]
    result = []
    for members in groups.values():
        labels = []
        for k in varying:
            label = f"{k.split('.')[-1]}={members[0]['settings'].get(k)}"
            if label not in labels:
                labels.append(label)
        seeds = sorted(r["config"].get("seed") for r in members)
        result.append({"name": ", ".join(labels) or "all runs", "labels": labels, "runs": members,
                       "seeds": seeds, "n_params": members[0]["config"].get("n_params")})
    return result


def pick_baseline(groups, text):
    """The one group whose name holds every KEY=VALUE of text (comma-separated), or CompareError."""
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    hits = [g for g in groups if all(w in g["labels"] for w in wanted)]
    if len(hits) != 1:
        names = "; ".join(g["name"] for g in groups)
        raise CompareError(f"--baseline {text} matches {len(hits)} groups, not one; the groups are: {names}")
    return hits[0]


def metric_order(name):
    """val first, then test, then the numbers of other files; the loss first within each."""
    return not name.startswith("val "), not name.startswith("test "), name.split(" ")[-1] != "loss", name


def compare(groups, baseline=None, metrics=None):
    """[{metric, group, n, mean, sd, ci95, diff, diff_ci95, p, note}] for every metric and group."""
    names = metrics or sorted({m for g in groups for r in g["runs"] for m in r["metrics"]}, key=metric_order)
    table = []
    for metric in names:
        base_values = [r["metrics"][metric] for r in baseline["runs"] if metric in r["metrics"]] if baseline else []
        for g in groups:
            values = [r["metrics"][metric] for r in g["runs"] if metric in r["metrics"]]
            if not values:
                continue
            row = {"metric": metric, "group": g["name"], "n_params": g["n_params"], "seeds": g["seeds"],
                   **summary(values), "diff": None, "diff_ci95": None, "p": None, "note": ""}
            if baseline is not None and g is baseline:
                row["note"] = "baseline"
            elif baseline is not None and base_values and metric in ("val loss", "test loss") \
                    and loss_scope(g) != loss_scope(baseline):
                row["note"] = UNLIKE
            elif baseline is not None and base_values:
                row.update(welch(values, base_values))
                if len(values) < 2 or len(base_values) < 2:
                    row["note"] = TOO_FEW
                elif row["p"] is None:
                    row["note"] = "cannot tell: no spread in either group"
            elif len(values) < 2:
                row["note"] = TOO_FEW
            table.append(row)
    return table


def fmt(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def short_names(groups, baseline):
    """{group name: what sets it apart from the baseline} ("pos=rope" rather than every varying setting)."""
    if baseline is None:
        return {g["name"]: g["name"] for g in groups}
    return {g["name"]: ", ".join(label for label in g["labels"] if label not in baseline["labels"]) or g["name"]
            for g in groups}


def markdown(table, baseline, groups):
    short = short_names(groups, baseline)
    head = ("| metric | group" + (" (its settings unlike the baseline's)" if baseline else "") + " | n | mean | sd "
            "| 95% CI | diff vs baseline (95% CI) | p (Welch) | note |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in table:
        ci = f"{fmt(r['ci95'][0])} .. {fmt(r['ci95'][1])}" if r["ci95"] else ""
        diff = "" if r["diff"] is None else f"{r['diff']:+.4f}"
        if r["diff_ci95"]:
            diff += f" ({r['diff_ci95'][0]:+.4f} .. {r['diff_ci95'][1]:+.4f})"
        p = "" if r["p"] is None else f"{r['p']:.3g}"
        lines.append(f"| {r['metric']} | {short[r['group']]} | {r['n']} | {fmt(r['mean'])} | {fmt(r['sd'])} | {ci} | "
                     f"{diff} | {p} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None):
    p = cli.ArgumentParser(description="Group runs that differ only in --seed and compare their final "
                                "metrics: mean, sd, 95% CI, difference to a baseline group, Welch's t-test.")
    p.add_argument("paths", nargs="+", help="run folders, or folders that hold them (searched recursively)")
    p.add_argument("--baseline", help="the group to compare against, as KEY=VALUE[,KEY=VALUE] from its name "
                   "(e.g. pos=learned)")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown", help="default markdown")
    p.add_argument("--metric", nargs="+", help='metrics to show (default all), e.g. "val loss" "test bpb"')
    args = p.parse_args(argv)
    try:
        runs, note = finished_runs([load_run(d) for d in find_runs(args.paths)])
        if note:
            print(note, file=sys.stderr)
        groups = group_runs(runs)
        baseline = pick_baseline(groups, args.baseline) if args.baseline else None
        known = {m for g in groups for r in g["runs"] for m in r["metrics"]}
        for m in args.metric or []:
            if m not in known:
                raise CompareError(f"--metric {m!r}: no run has it; the metrics are: {', '.join(sorted(known))}")
        table = compare(groups, baseline, args.metric)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({"baseline": baseline["name"] if baseline else None,
                          "groups": [{"name": g["name"], "n_params": g["n_params"], "seeds": g["seeds"],
                                      "runs": [r["dir"] for r in g["runs"]]} for g in groups],
                          "rows": table}, indent=1))
    else:
        print(markdown(table, baseline, groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
