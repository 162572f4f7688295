"""
ALiBi and the CLAP head (seed "ALiBi and CLAP head experiments") on baseline_gpt2, on a CPU:
the baseline (learned positions, tied head) against +ALiBi, +CLAP, both, and +CLAP-cosine, each trained with >= 2 seeds on
the same data and the same token budget; then ALiBi's length extrapolation.

    python bench/pos_head.py                  # the README table: 5 variants x 2 seeds, ~20 min on one core
    python bench/pos_head.py --variants +clap,+clap-cosine   # some rows only
    python bench/pos_head.py --smoke          # tiny everything, < 1 minute (the test suite runs it)

Every run is `train_baseline_gpt2.py --preset tiny --seq-len L --pos P --head H --seed S` (run in this process
through base_trainer.main), so the options are the train scripts' flags and the runs land in --out-dir.
--seed changes the initial weights only; --data-seed stays fixed, so every run sees the same batches.

Evaluation, on the same validation tokens for every run: the val split cut into windows of 4L tokens.
    1x: each window as 4 sequences of L tokens (the training context), 2x: 2 of 2L, 4x: 1 of 4L.
The scored tokens are the same at every length; only how much context precedes them changes.
Learned positions have no rows past L (block_size), so they stop at 1x; ALiBi has no position table.
bpb (bits per byte) = loss / ln 2 * tokens / bytes of the split (1 byte per token with --tokenizer bytes).
Spread: half the range over seeds (max - min) / 2.
"""

import json
import math
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from plumbing import cli  # noqa: E402
from auto_regressive_model import masked_cross_entropy  # noqa: E402
from checkpoint import load_model
from bench.machine import describe as describe_machine  # noqa: E402

VARIANTS = {  # name: (pos, head)
    "baseline": ("learned", "tied"),
    "+alibi": ("alibi", "tied"),
    "+clap": ("learned", "clap"),
    "+alibi+clap": ("alibi", "clap"),
    "+clap-cosine": ("learned", "clap-cosine"),   # our earlier CLAP: h normalised too, beta from 1/0.07
}
FACTORS = (1, 2, 4)
NA = "n/a - no position rows past block_size"


def train(args, variant, seed):
    """One training run through the train script's entry point; returns its run folder."""
    from base_trainer import main
    pos, head = VARIANTS[variant]
    out = os.path.join(args.out_dir, f"{variant.strip('+').replace('+', '-')}-seed{seed}")
    argv = ["--preset", "tiny", "--data-dir", args.data_dir, "--out-dir", out, "--overwrite",
            "--max-tokens", args.max_tokens, "--max-steps", args.steps, "--eval-interval", args.steps,
            "--eval-batches", 2, "--seq-len", args.seq_len, "--micro-batch-size", args.micro_batch_size,
            "--total-batch-size", args.seq_len * args.micro_batch_size, "--seed", seed, "--device", "cpu",
            "--pos", pos, "--head", head, *args.model_args]
    try:
        main("baseline_gpt2", [str(a) for a in argv])
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"training {variant} seed {seed} failed (exit {e.code})") from None
    return out


@torch.no_grad()
def evaluate(run_dir, seq_len, max_windows):
    """{factor: (loss, bpb) or None} on the val split's windows of 4 * seq_len tokens."""
    from data_file_utils import dataset_dir
    from dataloader import TokenDataLoader
    model, _ = load_model(os.path.join(run_dir, "checkpoint.pt"))
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    span = max(FACTORS) * seq_len
    loader = TokenDataLoader(dataset_dir(cfg["data_dir"], cfg["data"], cfg["tokenizer"], cfg.get("data_seed"),
                                         cfg.get("max_tokens")), "val", 1, span)
    windows = min(max_windows, loader.tokens // span - 1)
    sums = {f: 0.0 for f in FACTORS}
    for _ in range(windows):
        x, y = loader.next_batch()[:2]                   # (1, 4L)
        for f in FACTORS:
            if f * seq_len > model.wpe.max_positions:
                continue
            L = f * seq_len
            logits, _ = model(x.view(-1, L))
            sums[f] += masked_cross_entropy(logits, y.view(-1, L)).item() / windows
    per_byte = loader.tokens / loader.bytes
    return {f: ((s, s / math.log(2) * per_byte) if f * seq_len <= model.wpe.max_positions else None)
            for f, s in sums.items()}


def mean_spread(values):
    return statistics.mean(values), (max(values) - min(values)) / 2


def fmt(values, digits=3):
    m, s = mean_spread(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps: checks the script, < 1 minute")
    p.add_argument("--seeds", default="1,2", help="comma-separated --seed values (initial weights)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    p.add_argument("--steps", type=cli.positive_int, default=300)
    p.add_argument("--seq-len", type=cli.positive_int, default=64, help="the training context L")
    p.add_argument("--micro-batch-size", type=cli.positive_int, default=16)
    p.add_argument("--max-tokens", type=cli.positive_int, default=4_000_000, help="synthetic-math tokens to prepare")
    p.add_argument("--eval-windows", type=cli.positive_int, default=10_000, help="at most this many val windows of 4L")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out-dir", default="runs/pos_head")
    args = p.parse_args(argv)
    args.model_args = []
    if args.smoke:
        args.steps, args.seq_len, args.micro_batch_size, args.eval_windows = 3, 16, 4, 4
        args.model_args = ["--n-layer", 1, "--n-head", 2, "--n-embd", 32]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.time()

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = {}  # variant -> [per-seed {factor: (loss, bpb) or None}]
    for variant in variants:
        for seed in seeds:
            run_dir = train(args, variant, seed)
            results.setdefault(variant, []).append(evaluate(run_dir, args.seq_len, args.eval_windows))
    minutes = (time.time() - start) / 60

    tokens = args.steps * args.seq_len * args.micro_batch_size
    print(f"\nmachine: {describe_machine('cpu')}; {minutes:.1f} min in all")
    print(f"baseline_gpt2 --preset tiny {' '.join(map(str, args.model_args))}, context L = {args.seq_len}, "
          f"{args.steps} steps x {args.seq_len * args.micro_batch_size} tokens = {tokens:,} training tokens per run, "
          f"seeds {args.seeds}; mean ± half-range over seeds\n")
    print("| variant | pos | head | val loss | val bpb |")
    print("|---|---|---|---|---|")
    for variant, runs in results.items():
        pos, head = VARIANTS[variant]
        print(f"| {variant} | {pos} | {head} | {fmt([r[1][0] for r in runs])} | {fmt([r[1][1] for r in runs])} |")
    print("\nLength extrapolation: val loss with contexts of 1x, 2x, 4x the training context (same scored tokens)\n")
    print("| variant | " + " | ".join(f"{f}x ({f * args.seq_len})" for f in FACTORS) + " |")
    print("|---|" + "---|" * len(FACTORS))
    for variant, runs in results.items():
        cells = [NA if runs[0][f] is None else fmt([r[f][0] for r in runs]) for f in FACTORS]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "minutes": minutes,
                   "results": {v: [{str(k): x for k, x in r.items()} for r in runs] for v, runs in results.items()}},
                  f, indent=1)


if __name__ == "__main__":
    main()
