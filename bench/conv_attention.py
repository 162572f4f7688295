"""
Training cost of conv_attention against baseline_gpt2 at the same context, full-resolution width and
number of blocks (the rtx3080 presets: context 1024, n_embd 48, 6 heads, 12 blocks).

    python bench/conv_attention.py                          # CUDA if present (bf16 autocast, as the trainer)
    python bench/conv_attention.py --device cpu --micro-batch-size 2 --vocab-size 320

One training step = forward, backward and an AdamW step on random tokens. Each measurement runs in its own
process (so peak memory is that model's alone), and the two models take turns --rounds times, so a machine
whose load changes meanwhile hurts both alike; the best round counts. FLOPs per training token are
counted too (torch.utils.flop_counter), which do not depend on the machine or its load.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the peak resident set size (ru_maxrss) minus
the resident size just before the model was built.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args):
    """Runs in a child process: one model, `steps` timed training steps; prints one JSON line."""
    sys.path.insert(0, REPO)
    import torch
    from models import create_model
    device = args.device
    torch.manual_seed(0)
    before = rss_bytes()
    common = dict(vocab_size=args.vocab_size, block_size=args.seq_len, n_embd=args.n_embd, n_head=args.n_head)
    if args.which == "conv_attention":
        model = create_model("conv_attention", preset="rtx3080", **common)
    else:
        model = create_model("baseline_gpt2", preset="rtx3080", n_layer=args.n_layer, **common)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast(
        "cpu", enabled=False)
    x = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len + 1), device=device)
    x, y = x[:, :-1], x[:, 1:]
    times = []
    for i in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    # Work per token, independent of the machine's load: forward + backward FLOPs of one sequence, with
    # attention on the math path (dense T x T matmuls, which the flop counter sees; causal kernels skip ~half).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x[:1], y[:1])[1].backward()
    tokens = args.micro_batch_size * args.seq_len
    print(json.dumps(dict(model=args.which, params=model.num_params(), tok_per_s=tokens / min(times),
                          step_ms=1000 * min(times), peak_bytes=peak,
                          flops_per_token=counter.get_total_flops() / args.seq_len)))


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seq-len", type=cli.positive_int, default=1024)
    p.add_argument("--micro-batch-size", type=cli.positive_int, default=8)
    p.add_argument("--vocab-size", type=cli.positive_int, default=50304, help="50304 = GPT-2 BPE, 320 = the byte tokenizer")
    p.add_argument("--n-embd", type=cli.positive_int, default=48)
    p.add_argument("--n-head", type=cli.positive_int, default=6)
    p.add_argument("--steps", type=cli.positive_int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=1)
    p.add_argument("--rounds", type=cli.positive_int, default=2)
    p.add_argument("--which", help=argparse.SUPPRESS)
    p.add_argument("--n-layer", type=cli.positive_int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.which:
        return measure(args)

    sys.path.insert(0, REPO)
    from models import create_model
    n_layer = create_model("conv_attention", preset="rtx3080", n_embd=args.n_embd, n_head=args.n_head).n_blocks
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("which", "n_layer")]
    best = {}
    for _ in range(args.rounds):
        for which in ("conv_attention", "baseline_gpt2"):
            cmd = [sys.executable, os.path.abspath(__file__), *passed, f"--which={which}", f"--n-layer={n_layer}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if which not in best or r["tok_per_s"] > best[which]["tok_per_s"]:
                best[which] = dict(r, peak_bytes=max(r["peak_bytes"], best.get(which, r)["peak_bytes"]))
    print(f"device {args.device} | context {args.seq_len} | micro batch {args.micro_batch_size} | vocab "
          f"{args.vocab_size} | n_embd {args.n_embd} at full resolution | {n_layer} blocks each | "
          f"best of {args.rounds} rounds x {args.steps} steps")
    for name, r in best.items():
        print(f"{name:15s} {r['params'] / 1e6:6.2f}M params | {r['tok_per_s']:10,.0f} tok/s | "
              f"{r['step_ms']:9.1f} ms/step | peak memory {r['peak_bytes'] / 2**20:9,.0f} MiB | "
              f"{r['flops_per_token'] / 1e6:7.2f} MFLOP/token (fwd+bwd)")
    c, b = best["conv_attention"], best["baseline_gpt2"]
    print(f"conv_attention / baseline_gpt2: {c['tok_per_s'] / b['tok_per_s']:.2f}x tokens/s, "
          f"{c['peak_bytes'] / b['peak_bytes']:.2f}x peak memory, "
          f"{c['flops_per_token'] / b['flops_per_token']:.2f}x FLOPs per token")


if __name__ == "__main__":
    main()
