"""
Run a grid of settings x seeds with any training script, one run folder each, then compare them (compare.py).

    python sweep.py train_baseline_gpt2.py --preset tiny --grid pos=learned,rope --seeds 1,2,3 --jobs 2 \
        --out runs/sweep_pos -- --max-steps 100
    python compare.py runs/sweep_pos --baseline pos=learned

Every run is `python SCRIPT --out-dir OUT/KEY=V/.../seed=S --KEY V ... --seed S --threads T [--preset P]
[flags after --]`. Several --grid options multiply. Run again with the same command to finish a sweep:
a finished run (a val row at its last step) is kept, an interrupted one is continued with --resume auto, and
a run folder whose config.json shows other settings than this command's is refused before anything starts
(never overwritten). --jobs N runs N at once and gives each 1/N of the CPU threads. Each run's console
output goes to OUT/KEY=V/.../seed=S.log, next to its folder.
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from plumbing import cli

REPO = os.path.dirname(os.path.abspath(__file__))
# Flags the sweep sets itself for every run; given after -- they would fight with it.
OWN_FLAGS = {"--out-dir", "--seed", "--resume", "--overwrite"}
# Settings that do not change what a run computes: not compared with an existing run folder's config.json.
NOT_SETTINGS = {"threads", "resume", "overwrite", "out_dir", "data_dir", "device"}


class SweepError(Exception):
    """Bad input or a run folder that belongs to other settings; printed as one line (exit 2)."""


def parse_grid(items):
    """[("pos", ["learned", "rope"]), ...] from ["pos=learned,rope", ...]."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")  # n_layer or n-layer: the flag is --n-layer
        vals = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(vals):
            raise SweepError(f"--grid {item}: write KEY=V1,V2 (e.g. --grid pos=learned,rope)")
        if "--" + key in OWN_FLAGS:
            raise SweepError(f"--grid {item}: the sweep sets --{key} itself; use --seeds for seeds")
        if key in [k for k, _ in grid]:
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid {key}=V1,V2")
        if len(set(vals)) != len(vals):
            raise SweepError(f"--grid {item}: a value is listed twice")
        grid.append((key, vals))
    return grid


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise SweepError(f"--seeds {text}: give whole numbers separated by commas, e.g. --seeds 1,2,3") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise SweepError(f"--seeds {text}: give distinct whole numbers of 0 or more")
    return seeds


def safe(value):
    """A value as part of a folder name: no path separators."""
    return value.replace(os.sep, "_").replace("/", "_")


def plan_runs(grid, seeds):
    """Each run as (name, {flag key: value}, seed), in grid order then seed order."""
    runs = []
    for combo in itertools.product(*[vals for _, vals in grid]):
        settings = dict(zip([k for k, _ in grid], combo))
        for seed in seeds:
            parts = [f"{k}={safe(v)}" for k, v in settings.items()] + [f"seed={seed}"]
            runs.append((os.path.join(*parts), settings, seed))
    return runs


def flag_pairs(args):
    """{key: value} of the `--key value` and `--key=value` flags in a list (a bare --flag gets "true")."""
    pairs, i = {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, i = args[i + 1], i + 1
                else:
                    value = "true"
            pairs[key] = value
        i += 1
    return pairs


def config_value(config, key):
    """The value config.json records for flag `key` (n-layer -> n_layer, also inside the model's settings)."""
    name = key.replace("-", "_")
    for place in (config, config.get("model_overrides") or {}, config.get("model_config") or {}):
        if isinstance(place, dict) and name in place:
            return True, place[name]
    return False, None


def same_value(recorded, given):
    """Whether a config.json value is what the flag text asked for: 3e-3 == 0.003, 100k == 100000, True == true."""
    if isinstance(recorded, bool) or recorded is None:
        return str(recorded).lower() == given.lower() or (recorded is None and given.lower() in ("none", "null"))
    if isinstance(recorded, (int, float)):
        scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(given[-1:].lower(), 1)
        try:
            return float(given[:-1] if scale != 1 else given) * scale == float(recorded)
        except ValueError:
            return False
    return str(recorded) == given


def other_settings(config, flags):
    """The first flag whose value config.json records differently, as "--key: here X, there Y"; None if all agree.
    Flags that config.json does not record (or that do not change the result, like --threads) are not compared."""
    for key, given in flags.items():
        if key.replace("-", "_") in NOT_SETTINGS:
            continue
        found, recorded = config_value(config, key)
        if found and not same_value(recorded, given):
            return f"--{key} {given} here, {json.dumps(recorded)} in its config.json"
    return None


def read_rows(run_dir):
    rows = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a last line cut by a kill
    except OSError:
        pass
    return [r for r in rows if isinstance(r, dict)]


def final_val_loss(run_dir, max_steps):
    """The val loss at the run's last step, or None while the run has not got there."""
    for row in reversed(read_rows(run_dir)):
        if row.get("split") == "val" and isinstance(row.get("step"), int) and row["step"] >= max_steps:
            return row.get("loss")
    return None


def run_state(run_dir, flags):
    """"new", "finished" (with its final val loss), "resume", or SweepError for a folder of other settings."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        return "new", None
    if not os.path.isfile(config_path):
        # a run killed before its first step leaves at most a lock file; --resume auto starts it
        return "resume", None
    try:
        with open(config_path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError
    except (OSError, ValueError):
        raise SweepError(f"{config_path} is not a config.json of lmsmall; move the folder away or choose "
                         f"another --out") from None
    differs = other_settings(config, flags)
    if differs:
        raise SweepError(f"{run_dir} holds a run with other settings ({differs}); it is kept: choose another "
                         f"--out or move it away")
    loss = final_val_loss(run_dir, config.get("max_steps", float("inf")))
    return ("finished", loss) if loss is not None else ("resume", None)


def read_config(run_dir):
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "(no output)"
    return lines[-1] if lines else "(no output)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = cli.ArgumentParser(description="Run a grid of settings x seeds with a training script, one run "
                                "folder each; run the same command again to finish an interrupted sweep.")
    p.add_argument("script", help="train_<model>.py, finetune.py, train_mntp.py, ...")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a flag of the script and its values (several --grid multiply), e.g. pos=learned,rope")
    p.add_argument("--seeds", default="1", help="comma-separated --seed values of every grid point (default 1)")
    p.add_argument("--jobs", type=cli.positive_int, default=1,
                   help="runs at once (default 1); the CPU threads are divided between them")
    p.add_argument("--out", required=True, help="the sweep folder; each run in OUT/KEY=V/.../seed=S")
    p.add_argument("--preset", help="passed to every run as --preset")
    args = p.parse_args(argv)
    try:
        script = os.path.abspath(args.script if os.path.isfile(args.script) else os.path.join(REPO, args.script))
        if not (os.path.isfile(script) and script.endswith(".py")):
            raise SweepError(f"{args.script}: no such Python script; give e.g. train_baseline_gpt2.py")
        grid, seeds = parse_grid(args.grid), parse_seeds(args.seeds)
        clash = sorted(OWN_FLAGS & {a.partition("=")[0] for a in extra}
                       | {"--" + k for k, _ in grid} & {a.partition("=")[0] for a in extra})
        if clash:
            raise SweepError(f"{clash[0]} after --: the sweep sets it for every run (--grid, --seeds, --out); "
                             f"leave it out")
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        base = (["--preset", args.preset] if args.preset else []) + extra
        if "--threads" not in {a.partition("=")[0] for a in extra}:
            base += ["--threads", str(threads)]
        jobs = []
        for name, settings, seed in plan_runs(grid, seeds):
            run_dir = os.path.join(args.out, name)
            flags = [x for k, v in settings.items() for x in (f"--{k}", v)] + ["--seed", str(seed)]
            state, loss = run_state(run_dir, flag_pairs(base + flags))
            jobs.append((name, run_dir, base + flags, state, loss))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    lock, failed = threading.Lock(), []

    def say(text):
        with lock:
            print(text, flush=True)

    def run_one(job):
        name, run_dir, flags, state, loss = job
        if state == "finished":
            say(f"{name}: kept (finished earlier, val loss {loss:.4f})")
            return
        cmd = [sys.executable, script, *flags, "--out-dir", run_dir] + (["--resume", "auto"] if state == "resume"
                                                                        else [])
        say(f"{name}: {'resumed' if state == 'resume' else 'started'}")
        start = time.time()
        os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
        log = run_dir + ".log"
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            code = subprocess.call(cmd, stdout=f, stderr=f)
        loss = final_val_loss(run_dir, read_config(run_dir).get("max_steps", float("inf")))
        if code == 0 and loss is not None:
            say(f"{name}: done in {time.time() - start:.0f}s, final val loss {loss:.4f}")
        else:
            failed.append(name)
            say(f"{name}: failed (exit {code}): {last_line(log)}")

    print(f"sweep: {len(jobs)} run(s) of {os.path.basename(script)} in {args.out}, {args.jobs} at once, "
          f"{threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_one, jobs))
    if failed:
        logs = os.path.join(args.out, "<run>.log")
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are {logs}; run the same command again "
              f"to retry them", file=sys.stderr)
        return 1
    print(f"all {len(jobs)} run(s) finished; compare them: python compare.py {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
