"""
GPU speed measurements, as bench/gpu_speed.sh runs them on a lent GPU (and, small, on a CPU: --dry-run).

    python bench/gpu_speed.py compare --data-dir D --out compare.json      # speed of the trainer's settings
    python bench/gpu_speed.py table --data-dir D --runs R --deadline 300   # the seed's table, full budget
    python bench/gpu_speed.py summary --compare compare.json --runs R      # both tables as text

compare  For each model and each setting (e.g. "old" = micro batch 8, eager: today's main; "new" = auto micro
         batch + torch.compile), build the real BaseTrainer in this process and time a few optimizer steps
         (the first left out: warm-up): tokens/s, MFU, the micro batch chosen, peak memory reserved, setup
         seconds (probe + compile). --memory-limit-gib makes the process see a card of that size
         (torch.cuda.set_per_process_memory_fraction): an out-of-memory there is reported, not hidden.
table    Train each model with its train_<model>.py at the rtx3080 preset (313 steps x 524,288 tokens), one
         after the other, each with a share of --deadline (--in-order: each may use all that is left); a run
         still going at its share's end is stopped with Ctrl-C (it saves a checkpoint and its rows so far
         count, marked partial). --continue: a finished run (it has a test row) is kept, a stopped one is
         resumed (--resume), so a second call on the same machine finishes what the first began.
summary  The tables (model, micro batch, steps, tokens, losses, bpb, tok/s, MFU, peak memory, minutes).
"""

import argparse
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from plumbing import cli  # noqa: E402

TABLE_MODELS = ["baseline_gpt2", "conv_attention", "progressive_diverging", "dual_mask_gpt"]
SETTINGS = {  # name: train flags (the rest: the preset's)
    "old": ["--micro-batch-size", "8", "--no-compile"],                        # the trainer before the GPU speed work ("before")
    "auto-eager": ["--micro-batch-size", "auto", "--no-compile"],
    "new": ["--micro-batch-size", "auto", "--compile"],                        # the new default on CUDA
    "reduce-overhead": ["--micro-batch-size", "auto", "--compile", "--compile-mode", "reduce-overhead"],
    "max-autotune": ["--micro-batch-size", "auto", "--compile", "--compile-mode", "max-autotune-no-cudagraphs"],
}


def stamp(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---- compare ----------------------------------------------------------------------------------------

def measure(model, setting, args):
    """One model with one setting: the trainer's own train_step(), timed."""
    from base_trainer import BaseTrainer, resolve_config
    argv = ["--preset", args.preset, "--data", "synthetic-math", "--tokenizer", args.tokenizer,
            "--data-dir", args.data_dir, "--max-tokens", str(args.max_tokens), "--out-dir", tempfile.mkdtemp(),
            "--total-batch-size", str(args.total_batch_size), "--device", args.device, *SETTINGS[setting]]
    if args.dry_run:  # a CPU: narrow models, short context (options every model has)
        argv += ["--seq-len", "64", "--n-embd", "64", "--n-head", "2"]
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = BaseTrainer(model, *resolve_config(model, argv))
    setup_s = time.perf_counter() - t0
    rows = [trainer.train_step() for _ in range(args.steps)]
    timed = [r["tok_per_s"] for r in rows[1:]] or [rows[0]["tok_per_s"]]
    tok_s = statistics.median(timed)
    mfu = trainer.flops_per_token * tok_s / trainer.peak_flops if trainer.peak_flops else None
    result = dict(model=model, setting=setting, micro_batch=trainer.cfg["micro_batch_size"],
                  grad_accum=trainer.grad_accum, tok_per_s=tok_s, mfu=mfu, setup_s=setup_s,
                  compiled=trainer.speed_info.get("compiled"), loss=rows[-1]["loss"],
                  peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                  peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    del trainer, rows
    gc.collect()
    torch._dynamo.reset()  # each setting compiles for itself (the on-disk caches stay)
    return result


def compare(args):
    if args.device == "cuda" and args.memory_limit_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total))
        stamp(f"memory limited to {args.memory_limit_gib} GiB of {total / 2**30:.1f} (a smaller card)")
    results = []
    deadline = time.time() + args.deadline
    for model in args.models:
        for setting in args.settings:
            if (model, setting) in [tuple(x.split(":")) for x in args.skip]:
                continue
            if time.time() > deadline:
                stamp(f"{model} {setting}: skipped, past the deadline")
                continue
            stamp(f"{model} {setting} ...")
            try:
                r = measure(model, setting, args)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - one failing setting (e.g. out of memory) must not end the rest
                first = (str(e).strip().splitlines() or [""])[0][:200]
                r = dict(model=model, setting=setting, error=f"{type(e).__name__}: {first}")
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            results.append(r)
            stamp(json.dumps(r))
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print_compare(results)


def print_compare(results):
    print(f"\n{'model':<22} {'setting':<16} {'micro':>5} {'accum':>5} {'tok/s':>11} {'MFU':>6} {'vs old':>7} "
          f"{'peak GiB':>8} {'setup s':>7}  loss")
    old = {r["model"]: r["tok_per_s"] for r in results if r.get("setting") == "old" and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"{r['model']:<22} {r['setting']:<16} failed: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        ratio = f"{r['tok_per_s'] / old[r['model']]:.2f}x" if r["model"] in old else "-"
        mem = f"{r['peak_reserved_gib']:.2f}" if r["peak_reserved_gib"] is not None else "-"
        print(f"{r['model']:<22} {r['setting']:<16} {r['micro_batch']:>5} {r['grad_accum']:>5} "
              f"{r['tok_per_s']:>11,.0f} {mfu:>6} {ratio:>7} {mem:>8} {r['setup_s']:>7.1f}  {r['loss']:.4f}")


# ---- table ------------------------------------------------------------------------------------------

def finished(run_dir):
    """True if run_dir's metrics end with the test row that a run writes when it reaches its last step."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if line.strip()]
    except (OSError, ValueError):
        return False
    return any(r.get("split") == "test" for r in rows)


def table(args):
    runs = Path(args.runs)
    deadline = time.time() + args.deadline
    for i, model in enumerate(args.models):
        out = runs / model
        if args.continue_runs and finished(out):
            stamp(f"{model}: finished earlier, kept")
            continue
        share = (deadline - time.time()) / (1 if args.in_order else len(args.models) - i)
        if share < 20:
            stamp(f"{model}: skipped, {share:.0f}s left")
            continue
        out.mkdir(parents=True, exist_ok=True)
        resume = args.continue_runs and (out / "checkpoint.pt").exists()
        cmd = [sys.executable, str(ROOT / f"train_{model}.py"), "--preset", args.preset, "--data", "synthetic-math",
               "--tokenizer", args.tokenizer, "--data-dir", args.data_dir, "--max-tokens", str(args.max_tokens),
               "--out-dir", str(out), "--resume" if resume else "--overwrite", "--eval-interval",
               str(args.eval_interval), "--checkpoint-interval", str(args.max_steps or 313), "--device", args.device,
               *args.train_args]
        if args.max_steps:
            cmd += ["--max-steps", str(args.max_steps)]
        stamp(f"{model}: {' '.join(cmd[1:])} (at most {share:.0f}s)")
        t0 = time.time()
        with open(out / "train.log", "a" if resume else "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                code = proc.wait(timeout=share)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # the trainer saves a checkpoint after this step and stops
                try:
                    code = proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
        wall = time.time() - t0
        earlier = float((out / "wall_s.txt").read_text()) if resume and (out / "wall_s.txt").exists() else 0.0
        (out / "wall_s.txt").write_text(f"{earlier + wall:.1f}\n")  # a resumed run: both calls' wall time
        tail = (out / "train.log").read_text().strip().splitlines()[-3:]
        stamp(f"{model}: exit {code} after {wall:.0f}s; " + " | ".join(tail))


def read_run(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if line.strip()]
    wall = float((run_dir / "wall_s.txt").read_text()) if (run_dir / "wall_s.txt").exists() else None
    return cfg, rows, wall


def print_table(runs, models):
    print(f"\n{'model':<22} {'micro':>5} {'steps':>9} {'tokens':>12} {'train loss':>10} {'val loss':>8} "
          f"{'test loss':>9} {'bpb':>6} {'tok/s':>11} {'MFU':>6} {'peak GiB':>8} {'train min':>9} {'wall min':>8}")
    for model in models:
        run_dir = Path(runs) / model
        try:
            cfg, rows, wall = read_run(run_dir)
        except (OSError, ValueError) as e:
            print(f"{model:<22} no run ({type(e).__name__})")
            continue
        train = [r for r in rows if r["split"] == "train"]
        if not train:
            print(f"{model:<22} no train rows")
            continue
        val = [r for r in rows if r["split"] == "val"]
        test = [r for r in rows if r["split"] == "test"]
        timed = [r for r in train if r["step"] > 0] or train  # step 0: warm-up
        tok_s = statistics.median(r["tok_per_s"] for r in timed)
        mfus = [r["mfu"] for r in timed if "mfu" in r]
        mems = [r["peak_mem_gib"] for r in train if "peak_mem_gib" in r]  # CUDA only
        last = test[-1] if test else (val[-1] if val else None)
        steps = f"{len(train)}/{cfg['max_steps']}"
        print(f"{model:<22} {cfg['micro_batch_size']:>5} {steps:>9} {train[-1]['tokens']:>12,} "
              f"{statistics.mean(r['loss'] for r in train[-5:]):>10.3f} "
              f"{(val[-1]['loss'] if val else float('nan')):>8.3f} "
              f"{(test[-1]['loss'] if test else float('nan')):>9.3f} "
              f"{(last['bpb'] if last else float('nan')):>6.3f} {tok_s:>11,.0f} "
              f"{(f'{statistics.median(mfus):.1%}' if mfus else '-'):>6} {(f'{max(mems):.2f}' if mems else '-'):>8} "
              f"{sum(r['dt_ms'] for r in train) / 60000:>9.2f} {(wall or 0) / 60:>8.2f}"
              + ("" if test else "  (partial: stopped before the end)"))


def summary(args):
    if args.compare and Path(args.compare).exists():
        print_compare(json.loads(Path(args.compare).read_text()))
    if args.runs:
        print_table(args.runs, args.models)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("what", choices=["compare", "table", "summary"])
    p.add_argument("--models", nargs="*", default=TABLE_MODELS, choices=TABLE_MODELS)
    p.add_argument("--settings", nargs="*", default=["old", "auto-eager", "new"], choices=list(SETTINGS))
    p.add_argument("--skip", nargs="*", default=[], metavar="MODEL:SETTING")
    p.add_argument("--preset", default="rtx3080")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--data-dir", default="/tmp/lmsmall_data")
    p.add_argument("--max-tokens", default="170000000")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--total-batch-size", type=int, default=131072, help="compare: tokens per optimizer step")
    p.add_argument("--steps", type=int, default=4, help="compare: optimizer steps per setting (the first untimed)")
    p.add_argument("--memory-limit-gib", type=float, help="compare: pretend a card of this many GiB")
    p.add_argument("--deadline", type=float, default=300, help="seconds for all of compare or table")
    p.add_argument("--out", default="compare.json")
    p.add_argument("--compare", help="summary: compare.json")
    p.add_argument("--runs", help="table/summary: folder of the run folders")
    p.add_argument("--max-steps", type=int, help="table: fewer steps than the preset's 313 (dry runs)")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--in-order", action="store_true", help="table: each run may use all the time left")
    p.add_argument("--continue", dest="continue_runs", action="store_true",
                   help="table: keep finished runs in --runs, resume stopped ones")
    p.add_argument("--dry-run", action="store_true", help="compare: small models (CPU check of the script)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    {"compare": compare, "table": table, "summary": summary}[args.what](args)


if __name__ == "__main__":
    main()
