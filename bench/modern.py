"""
The modern switches against GPT-2's recipe, on a CPU: each switch alone, all of them together with
AdamW and with Muon ("modern" = --recipe modern), several seeds each, same data, same token budget.

    OMP_NUM_THREADS=1 python bench/modern.py                        # baseline_gpt2 --preset tiny, 10 variants x 3 seeds
    python bench/modern.py --models conv_attention,progressive_diverging,baseline_gpt2 --variants gpt2,modern
    python bench/modern.py --smoke                                  # 2 variants, 2 steps: checks the script
    python bench/modern.py --table-only                             # the table of the runs finished so far

Every run is `train_<model>.py --preset tiny <variant flags> --seed S` (in this process, through
base_trainer.main), so the variants are exactly the train scripts' flags; --seed changes the initial weights
only (--data-seed is fixed), so every run sees the same batches. Runs go seed by seed, every variant of a seed
one after the other, so that a change of machine load spreads over all variants.

Columns: val loss and bpb of the final evaluation (--eval-batches batches of the val split; bpb = loss / ln 2 *
tokens / bytes), mean ± spread over seeds (spread = half the range, (max - min) / 2); step time: measured apart
from the training runs, side by side (step_times: one step of every variant in turn, --timing-rounds rounds,
median), as a ratio to the first variant's of the same model, since absolute times on a shared machine mean
little and the load changes between runs. Each run's own median dt_ms is in results.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.machine import describe as describe_machine  # noqa: E402

VARIANTS = {  # name: train-script flags on top of the GPT-2 recipe
    "gpt2": [],
    "+rope": ["--pos", "rope"],
    "+rms": ["--norm", "rms"],
    "+relu2": ["--mlp", "relu2"],
    "+swiglu": ["--mlp", "swiglu"],
    "+qk_norm": ["--qk-norm", "true"],
    "+zero_init": ["--zero-init-proj", "true"],
    "+muon": ["--optimizer", "muon"],
    "modern-adamw": ["--recipe", "modern", "--optimizer", "adamw"],
    "modern": ["--recipe", "modern"],          # rope, rms, relu2, qk_norm, zero_init_proj, muon
}


def finished(out, argv):
    """True if `out` holds a completed run made with exactly these arguments (then it is reused, not redone)."""
    try:
        with open(os.path.join(out, "bench_argv.json")) as f:
            same = json.load(f) == argv
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return same and any(json.loads(line)["split"] == "test" for line in f)
    except (OSError, ValueError):
        return False


def train(args, model, variant, seed):
    """One training run through the train script's entry point (or a finished one with the same arguments);
    returns its figures."""
    from base_trainer import main
    out = os.path.join(args.out_dir, f"{model}-{variant.strip('+')}-seed{seed}")
    argv = [str(a) for a in ["--preset", "tiny", "--data-dir", args.data_dir, "--out-dir", out, "--overwrite",
                             "--max-tokens", args.max_tokens, "--max-steps", args.steps, "--eval-interval", args.steps,
                             "--checkpoint-interval", args.steps, "--eval-batches", args.eval_batches, "--seed", seed,
                             "--device", "cpu", *VARIANTS[variant], *args.model_args]]
    if args.table_only and not finished(out, argv):
        return None
    if not ((args.reuse or args.table_only) and finished(out, argv)):
        try:
            main(model, argv)
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"training {model} {variant} seed {seed} failed (exit {e.code})") from None
        with open(os.path.join(out, "bench_argv.json"), "w") as f:
            json.dump(argv, f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out, "config.json")) as f:
        n_params = json.load(f)["n_params"]
    val = [r for r in rows if r["split"] == "val"][-1]
    dts = [r["dt_ms"] for r in rows if r["split"] == "train"][5:] or [r["dt_ms"] for r in rows if r["split"] == "train"]
    return {"loss": val["loss"], "bpb": val["bpb"], "dt_ms": statistics.median(dts), "n_params": n_params}


def step_times(models, variants, model_args, rounds):
    """{(model, variant): median seconds of one training step}, measured side by side: every round times one
    step of every variant in turn (same random batch, tiny preset sizes), so a change of machine load hits every
    variant alike; the first 2 rounds are warm-up."""
    import optim
    from base_trainer import resolve_config
    from models import create_model
    runners = {}
    for model in models:
        for variant in variants:
            cfg, _ = resolve_config(model, ["--preset", "tiny", *VARIANTS[variant], *model_args])
            net = create_model(model, "tiny", **dict(cfg["model_overrides"], vocab_size=320,
                                                     block_size=cfg["seq_len"] + 1)).train()
            batch = torch.randint(0, 256, (cfg["micro_batch_size"], cfg["seq_len"] + 1),
                                  generator=torch.Generator().manual_seed(0))
            runners[(model, variant)] = (net, optim.build_optimizer(net, cfg), batch, cfg)
    times = {key: [] for key in runners}
    for r in range(rounds + 2):
        for key, (net, opt, batch, cfg) in runners.items():
            t0 = time.perf_counter()
            for _ in range(cfg["total_batch_size"] // (batch.size(0) * cfg["seq_len"])):
                net.training_loss(batch[:, :-1], batch[:, 1:])[0].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r >= 2:
                times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}


def mean_spread(values):
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="baseline_gpt2", help="comma-separated model names")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated --seed values (initial weights)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (tiny: 1024 tokens each)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--max-tokens", default="2M", help="synthetic-math tokens to prepare")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out-dir", default="runs/modern")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs of --out-dir made with the same "
                   "arguments (to add seeds or models to a table, or to finish an interrupted benchmark)")
    p.add_argument("--timing-rounds", type=int, default=20, help="side-by-side step timing: steps per variant")
    p.add_argument("--table-only", action="store_true", help="train nothing: the table of the finished runs "
                   "(those that --reuse would reuse); the seeds column says how many each row has")
    p.add_argument("--smoke", action="store_true", help="a 1-layer model, 2 steps, 2 variants: checks the script")
    args, model_args = p.parse_known_args(argv)
    args.model_args = model_args  # anything else goes to every train script, e.g. --n-layer 6 --n-embd 192
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.smoke:
        args.steps, args.eval_batches, args.timing_rounds, variants = 2, 1, 1, ["gpt2", "modern"]
        args.model_args += ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--micro-batch-size", "2",
                            "--seq-len", "32", "--total-batch-size", "64"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    models, seeds = args.models.split(","), [int(s) for s in args.seeds.split(",")]
    start = time.time()
    results = {}  # (model, variant) -> [per-seed dict]
    for seed in seeds:
        for model in models:
            for variant in variants:
                run = train(args, model, variant, seed)
                if run is not None:
                    results.setdefault((model, variant), []).append(dict(run, seed=seed))

    print(f"\n{describe_machine('cpu')}; load average at the end {os.getloadavg()[0]:.1f}; "
          f"{time.time() - start:.0f} s for {sum(len(r) for r in results.values())} runs"
          f"{' (finished earlier: --table-only)' if args.table_only else ''}")
    print(f"--preset tiny, {args.steps} steps {' '.join(args.model_args)}; seeds {args.seeds}\n")
    timing = step_times(models, variants, args.model_args, args.timing_rounds)
    print("| model | variant | params | seeds | val loss | val bpb | step time (x first variant) |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        for variant in variants:
            rs = results.get((model, variant))
            if not rs:
                continue
            ratio = timing[(model, variant)] / timing[(model, variants[0])]
            print(f"| {model} | {variant} | {rs[0]['n_params']:,} | {len(rs)} | "
                  f"{mean_spread([r['loss'] for r in rs])} | {mean_spread([r['bpb'] for r in rs])} | {ratio:.2f} |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"argv": argv if argv is not None else sys.argv[1:], "machine": describe_machine("cpu"),
                   "step_seconds": {f"{m}|{v}": t for (m, v), t in timing.items()},
                   "results": {f"{m}|{v}": r for (m, v), r in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
