"""
The seed's results table, reproduced: train baseline_gpt2, conv_attention and progressive_diverging on the same
data with the same token budget (same tokens per optimizer step, same number of steps) by running their
train_<model>.py scripts, then print the seed's columns from each run's own config.json and metrics.jsonl.

    python bench/reproduce_seed_table.py                      # --scale smoke on CPU: tiny presets, minutes
    python bench/reproduce_seed_table.py --scale full         # rtx3080 presets, the seed's 164M tokens per model
    python bench/reproduce_seed_table.py --scale full --max-steps 60 --data synthetic-math --tokenizer gpt2

Scales
    smoke  --preset tiny, synthetic-math bytes (offline, 400k tokens prepared), 30 steps of 2048 tokens,
           subprocesses with OMP_NUM_THREADS=1. For checking the pipeline, not the models.
    full   --preset rtx3080: the seed's sizes and budget (313 steps x 524,288 tokens = 164M tokens per model,
           math-reasoning with the GPT-2 tokenizer). Meant for a GPU.

Columns (the seed's, plus bits per byte)
    heads, width            from config.json's model_config (conv_attention: n_embd at full resolution ..
                            n_embd * 2**n_levels at the shortest level)
    micro batch, context    micro_batch_size, seq_len
    batches                 optimizer steps / micro-batches (= steps x grad_accum); the seed counted micro-batches
    ms/step, ms/micro       median dt_ms of the train rows (step 0 left out: warm-up), and that / grad_accum
    final train loss        mean of the last 5 train rows
    test loss, bpb          the run's test row (written at the end of training on the test split)
    infer ms/tok            generation from the run's checkpoint (merged for inference), batch 1, greedy,
                            KV cache where the model has one (conv_attention: none), ms per new token
Runs go to OUT_DIR/<model>. A folder that already holds a run is refused unless --reuse finds it finished
(then it is kept) or --overwrite says to start it over.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import cli  # noqa: E402
from bench.machine import describe as describe_machine  # noqa: E402

SEED_MODELS = ["baseline_gpt2", "conv_attention", "progressive_diverging"]
SCALES = {
    "smoke": dict(preset="tiny", data="synthetic-math", tokenizer="bytes", max_tokens=400_000, max_steps=30,
                  total_batch_size=2048, eval_batches=4, infer_tokens=32, threads=1),
    "full": dict(preset="rtx3080", data=None, tokenizer=None, max_tokens=None, max_steps=None,
                 total_batch_size=None, eval_batches=None, infer_tokens=128, threads=None),
}
# The seed's table (RTX 3080, 80k micro-batches of 8 x context, about 12 hours per model), for reference.
SEED_ROWS = [
    ("baseline_gpt2 (seed)", 6, "192", 8, 256, "80k micro", "487", 3.54, 3.5, "5.2", "-"),
    ("conv_attention (seed)", 6, "48-496", 8, 1024, "80k micro", "250", 1.42, 1.3, "12.23", "-"),
    ("progressive_diverging (seed)", 6, "192", 8, 256, "80k micro", "655", 4.65, 4.7, "5", "-"),
]


def read_run(run_dir):
    with open(run_dir / "config.json") as f:
        cfg = json.load(f)
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return cfg, rows


def finished(run_dir, max_steps):
    try:
        cfg, rows = read_run(run_dir)
    except (OSError, ValueError):
        return False
    return cfg.get("max_steps") == max_steps and any(r["split"] == "test" for r in rows)


def train_command(model, args, out):
    cmd = [sys.executable, str(ROOT / f"train_{model}.py"), "--preset", args.preset, "--out-dir", str(out),
           "--seed", str(args.seed)]
    for flag in ("data", "tokenizer", "data_dir", "max_tokens", "max_steps", "total_batch_size", "eval_batches",
                 "device"):
        value = getattr(args, flag)
        if value is not None:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    if args.max_steps is not None:  # validate at the end only: the table needs the last val/test rows
        cmd += ["--eval-interval", str(args.max_steps), "--checkpoint-interval", str(args.max_steps)]
    return cmd + (["--overwrite"] if args.overwrite else []) + args.train_args


def inference_ms_per_token(run_dir, n_tokens, device):
    from checkpoint import load_model
    dev = "cuda" if device in (None, "auto") and torch.cuda.is_available() else (device or "cpu")
    dev = "cpu" if dev == "auto" else dev
    model, _ = load_model(str(run_dir / "checkpoint.pt"), device=dev)
    prompt = torch.zeros((1, 8), dtype=torch.long, device=dev)
    new = min(n_tokens, model.config.block_size - prompt.size(1))  # stay inside the window
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        model.generate(prompt, 4, top_k=1)  # warm-up
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            model.generate(prompt, new, top_k=1)  # use_cache=True where the model supports it
            sync()
            times.append((time.perf_counter() - t0) / new)
    return statistics.median(times) * 1000, model.supports_kv_cache


def table_row(model, run_dir, args):
    cfg, rows = read_run(run_dir)
    mc = cfg["model_config"]
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"][-1]
    accum = cfg["grad_accum"] * cfg.get("world_size", 1)
    timed = [r["dt_ms"] for r in train if r["step"] > 0] or [r["dt_ms"] for r in train]
    ms_step = statistics.median(timed)
    width = str(mc["n_embd"])
    if "n_levels" in mc:
        width = f"{mc['n_embd']}-{mc['n_embd'] * 2 ** mc['n_levels']}"
    final = statistics.mean(r["loss"] for r in train[-5:])
    infer, cached = inference_ms_per_token(run_dir, args.infer_tokens, args.device)
    return (model, mc["n_head"], width, cfg["micro_batch_size"], cfg["seq_len"],
            f"{len(train)} / {len(train) * accum}", f"{ms_step:.0f} / {ms_step / accum:.0f}", final,
            test["loss"], f"{infer:.2f}" + ("" if cached else " (no cache)"), f"{test['bpb']:.3f}",
            train[-1]["tokens"])


def print_table(rows, seed_rows):
    head = ("model", "heads", "width", "micro", "context", "steps / micro-batches", "ms/step / ms/micro",
            "final train loss", "test loss", "infer ms/tok", "bpb", "train tokens")
    fmt = "{:<28} {:>5} {:>8} {:>5} {:>7} {:>21} {:>18} {:>16} {:>9} {:>18} {:>6} {:>12}"
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(*r[:7], f"{r[7]:.3f}", f"{r[8]:.3f}", *r[9:11], f"{r[11]:,}"))
    for r in seed_rows:
        print(fmt.format(*r[:7], f"{r[7]:.2f}", f"{r[8]:.1f}", *r[9:], "164M"))


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--scale", choices=list(SCALES), default=None,
                   help="smoke (default without CUDA) or full (default with CUDA)")
    p.add_argument("--models", nargs="*", default=SEED_MODELS, choices=SEED_MODELS)
    p.add_argument("--data", help="dataset spec passed to every train script (default: the scale's)")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"])
    p.add_argument("--data-dir", help="prepared shards (default: the train scripts' data/)")
    p.add_argument("--max-tokens", type=cli.count, help="token budget when preparing the data, e.g. 40M")
    p.add_argument("--out-dir", help="runs go to OUT_DIR/<model> (default runs/seed_table_<scale>)")
    p.add_argument("--max-steps", type=cli.positive_int, help="optimizer steps per model (default: the scale's)")
    p.add_argument("--total-batch-size", type=cli.positive_int, help="tokens per optimizer step (default: the scale's)")
    p.add_argument("--eval-batches", type=cli.positive_int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=cli.seed, default=1337)
    p.add_argument("--infer-tokens", type=cli.positive_int, help="new tokens timed for inference ms/token")
    p.add_argument("--threads", type=cli.positive_int, help="OMP_NUM_THREADS of the train scripts (smoke: 1)")
    p.add_argument("--timeout", type=cli.positive_float, default=None, help="seconds per training run (default: none)")
    p.add_argument("--reuse", action="store_true", help="keep a finished run with the same --max-steps")
    p.add_argument("--overwrite", action="store_true", help="start over runs that already exist in OUT_DIR")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after this goes to every train script, e.g. --train-args --compile")
    args = p.parse_args(argv)
    args.scale = args.scale or ("full" if torch.cuda.is_available() else "smoke")
    for key, value in SCALES[args.scale].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    out_root = Path(args.out_dir or f"runs/seed_table_{args.scale}")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # the inference timing in this process too
    print(f"reproduce the seed's table | scale {args.scale} | machine: {describe_machine(args.device or 'auto')} | "
          f"threads {args.threads or 'default'} | torch {torch.__version__}", flush=True)
    existing = [m for m in args.models if (out_root / m / "checkpoint.pt").exists()
                and not (args.reuse and finished(out_root / m, args.max_steps))]
    if existing and not args.overwrite:
        print(f"error: {out_root} already holds runs of {', '.join(existing)}; add --overwrite to start them "
              f"over, --reuse to keep finished ones, or choose another --out-dir", file=sys.stderr)
        return 2
    rows, t_all = [], time.perf_counter()
    for model in args.models:
        run_dir = out_root / model
        cmd = train_command(model, args, run_dir)
        shown = " ".join(["python", os.path.relpath(cmd[1])] + cmd[2:])
        if args.reuse and finished(run_dir, args.max_steps):
            print(f"[{model}] reusing the finished run in {run_dir}", flush=True)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"[{model}] {('OMP_NUM_THREADS=' + str(args.threads) + ' ') if args.threads else ''}{shown}",
                  flush=True)
            t0 = time.perf_counter()
            with open(run_dir / "train.log", "w") as log:
                try:
                    result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            timeout=args.timeout)
                    code = result.returncode
                except subprocess.TimeoutExpired:
                    code = "timeout"
            if code != 0:
                tail = (run_dir / "train.log").read_text().strip().splitlines()[-5:]
                print(f"[{model}] training failed ({code}); last lines of {run_dir / 'train.log'}:\n  "
                      + "\n  ".join(tail), file=sys.stderr)
                return 1
            print(f"[{model}] trained in {time.perf_counter() - t0:.0f}s", flush=True)
        rows.append(table_row(model, run_dir, args))
    print(f"\nall runs: {time.perf_counter() - t_all:.0f}s; same data, {rows[0][11]:,} training tokens per model"
          if len({r[11] for r in rows}) == 1 else "\nwarning: the runs saw different numbers of tokens")
    print_table(rows, SEED_ROWS)
    print("(seed rows: its README, RTX 3080, ~12 h per model; its conv_attention loss came from a future-token "
          "leak, see README.md, 'Convolution-attention model')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
