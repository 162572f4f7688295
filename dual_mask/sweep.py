"""
Sweep of dual-mask GPT runs: depths x widths x p_bw values x seeds, one run folder each, then the layer-cut
evaluation of each finished run. Resumable: a run whose folder holds sweep_run.json is finished and skipped
(refused, before anything is written, if it records other settings than this command's: n_head, --bw-mode,
--dynamic-p-bw, --preset or the arguments after --);
a run with a checkpoint but no sweep_run.json is continued with --resume; anything else starts fresh.

    # the seed's grid (4 x 4 x 3 x 3 = 144 runs; GPU-sized)
    python dual_mask/sweep.py --out-dir runs/dual_mask_sweep
    # a CPU-sized one (16 runs; 9 minutes on a busy 2-core machine), then the plots in docs/dual_mask
    python dual_mask/sweep.py --out-dir runs/dm_tiny --preset tiny --depths 2 4 --widths 32 64 \
        --p-bw 0 0.05 --seeds 0 1 --head-size 16 --jobs 2 --threads 1 -- --seq-len 64 \
        --micro-batch-size 8 --total-batch-size 512 --max-steps 400 --eval-interval 25 --max-tokens 2000000
    python dual_mask/analyze.py runs/dm_tiny --out docs/dual_mask

Every run is `python train_dual_mask_gpt.py --preset P --n-layer D --n-embd W --n-head W//head_size
--p-bw P --seed S --bw-seed S --out-dir OUT/d{D}_w{W}_p{P}_s{S} --data-dir DATA [args after --]`.
The run folder ends with the trainer's config.json, metrics.jsonl, checkpoint.pt, layer_cuts.json and
sweep_run.json (depth, width, p_bw, seed, num_params, ...).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from plumbing import cli
from data_file_utils import atomic_write_bytes

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
DONE_FILE = "sweep_run.json"


def run_name(depth, width, p_bw, seed):
    return f"d{depth}_w{width}_p{p_bw:g}_s{seed}"


def grid(depths, widths, p_bws, seeds):
    """Every (depth, width, p_bw, seed), seeds innermost, so one setting's seeds run one after another."""
    return list(itertools.product(depths, widths, p_bws, seeds))


def train_command(args, depth, width, p_bw, seed, run_dir, resume):
    n_head = max(1, width // args.head_size)
    cmd = [sys.executable, os.path.join(HERE, "train_dual_mask_gpt.py"), "--preset", args.preset,
           "--n-layer", str(depth), "--n-embd", str(width), "--n-head", str(n_head),
           "--p-bw", str(p_bw), "--bw-mode", args.bw_mode, "--dynamic-p-bw", str(args.dynamic_p_bw).lower(),
           "--seed", str(seed), "--bw-seed", str(seed), "--out-dir", run_dir, "--data-dir", args.data_dir]
    if resume:
        cmd.append("--resume")
    return cmd + list(args.train_args)


def run_state(run_dir):
    if os.path.exists(os.path.join(run_dir, DONE_FILE)):
        return "done"
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        return "partial"
    return "new"


def run_settings(args, width):
    """What a finished run's sweep_run.json records of how it was trained, besides its name's depth, width,
    p_bw and seed: a finished run is only skipped when these are the same as now."""
    return dict(n_head=max(1, width // args.head_size), bw_mode=args.bw_mode, dynamic_p_bw=args.dynamic_p_bw,
                preset=args.preset, train_args=list(args.train_args))


def settings_differ(args, run_dir, width):
    """None when the finished run in run_dir was trained with this command's settings, else the first
    difference in words."""
    try:
        with open(os.path.join(run_dir, DONE_FILE), encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        return f"its {DONE_FILE} cannot be read ({e})"
    if not isinstance(done, dict):
        return f"its {DONE_FILE} holds a JSON {type(done).__name__}, not the object this script writes"
    for key, now in run_settings(args, width).items():
        if key in done and done[key] != now:
            return f"it was trained with {key} {done[key]!r}, this command asks for {now!r}"
    return None


def run_one(args, depth, width, p_bw, seed, env):
    """Train (or resume) one run, then its layer cuts, then the marker; returns (run_dir, ok, seconds)."""
    name = run_name(depth, width, p_bw, seed)
    run_dir = os.path.join(args.out_dir, name)
    cmd = train_command(args, depth, width, p_bw, seed, run_dir, resume=(run_state(run_dir) == "partial"))
    log_path = os.path.join(args.out_dir, name + ".log")
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        ok = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env=env) == 0
    if ok and args.layer_cuts:  # in this process: saves a second torch start-up per run
        from dual_mask import layer_cuts
        try:
            result = layer_cuts.evaluate_checkpoint(run_dir, "val", args.cut_batches, log=None)
            atomic_write_bytes(os.path.join(run_dir, layer_cuts.CUTS_FILE),
                               json.dumps(result, indent=1).encode("utf-8"))
        except Exception as e:  # noqa: BLE001 - reported, the run stays unfinished and is retried next time
            with open(log_path, "a") as log:
                log.write(f"layer cuts failed: {type(e).__name__}: {e}\n")
            ok = False
    if ok:
        try:  # the trainer's, written just now; a number the summary shows, so no reason to fail the run
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                n_params = json.load(f).get("n_params")
        except (OSError, ValueError, AttributeError):
            n_params = None
        info = dict(depth=depth, width=width, p_bw=p_bw, seed=seed, **run_settings(args, width),
                    num_params=n_params, seconds=round(time.time() - t0, 1))
        atomic_write_bytes(os.path.join(run_dir, DONE_FILE), json.dumps(info, indent=1).encode("utf-8"))
    return run_dir, ok, time.time() - t0, log_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=cli.output_dir, default="runs/dual_mask_sweep")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--preset", default="rtx3080", choices=["rtx3080", "tiny"])
    p.add_argument("--depths", type=cli.positive_int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--widths", type=cli.positive_int, nargs="+", default=[192, 384, 768, 1536])
    p.add_argument("--p-bw", type=cli.probability, nargs="+", default=[0.0, 0.05, 0.1])
    p.add_argument("--seeds", type=cli.seed, nargs="+", default=[0, 1, 2])
    p.add_argument("--head-size", type=cli.positive_int, default=64, help="n_head = max(1, width // head_size)")
    p.add_argument("--bw-mode", default="additional", choices=["additional", "exclusive"])
    p.add_argument("--dynamic-p-bw", action="store_true")
    p.add_argument("--no-layer-cuts", dest="layer_cuts", action="store_false")
    p.add_argument("--cut-batches", type=cli.positive_int, default=8, help="validation batches per layer cut")
    p.add_argument("--jobs", type=cli.positive_int, default=1, help="runs trained at the same time (default 1)")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="OMP_NUM_THREADS of each run (small CPU models run fastest with 1)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    args.train_args = train_args

    runs = grid(args.depths, args.widths, args.p_bw, args.seeds)
    for depth, width, p_bw, seed in runs:  # before anything is written: a finished run is skipped, so it must
        run_dir = os.path.join(args.out_dir, run_name(depth, width, p_bw, seed))  # be what this command asks
        problem = run_state(run_dir) == "done" and settings_differ(args, run_dir, width)
        if problem:
            print(f"error: {run_dir} is finished, but {problem}; it would be skipped and analysed as if trained "
                  f"with this command: use another --out-dir, or the settings it was trained with", file=sys.stderr)
            return 2
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(args.out_dir, "sweep.json"),
                           json.dumps({k: v for k, v in vars(args).items()}, indent=1).encode("utf-8"))
    except OSError as e:
        print(f"error: could not write into {args.out_dir} ({e.strerror or e}); free some space or choose another "
              f"--out-dir", file=sys.stderr)
        return 1
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    t_start, failed, todo = time.time(), [], []
    for n, (depth, width, p_bw, seed) in enumerate(runs, 1):
        run_dir = os.path.join(args.out_dir, run_name(depth, width, p_bw, seed))
        state = run_state(run_dir)
        if state == "done":
            print(f"[{n}/{len(runs)}] {run_dir}: finished, skipped")
            continue
        cmd = train_command(args, depth, width, p_bw, seed, run_dir, resume=(state == "partial"))
        print(f"[{n}/{len(runs)}] {' '.join(cmd)}", flush=True)
        todo.append((depth, width, p_bw, seed))
    if not args.dry_run:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_one, args, *r, env) for r in todo]
            for fut in as_completed(futures):
                try:
                    run_dir, ok, seconds, log_path = fut.result()
                except OSError as e:  # a full disk: a run's log or marker could not be written
                    print(f"    a run FAILED: could not write {e.filename} ({e.strerror or e})", flush=True)
                    failed.append(e.filename)
                    continue
                print(f"    {run_dir}: {'done' if ok else 'FAILED, see ' + log_path} ({seconds:.0f} s)", flush=True)
                if not ok:
                    failed.append(run_dir)
    print(f"sweep: {len(runs)} runs, {len(failed)} failed, {time.time() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
