"""
Where a training step's time goes: one model at one micro batch, its micro-step taken apart.

    python bench/gpu_profile.py --device cuda                       # baseline_gpt2 --preset rtx3080, micro 256
    python bench/gpu_profile.py --device cpu --preset tiny --micro 4 --vocab 512 --repeat 2   # dry run

Prints, each the median of --repeat timed calls after warm-up (CUDA: synchronised around each):
  step       forward + backward of the model's own training loss (what a micro-step of the trainer computes)
  trunk      forward + backward of the blocks only (features(), a cheap loss on them; no head)
  head ...   forward + backward of the tied head's chunked cross-entropy alone, on random hidden states,
             for several chunk sizes, and F.cross_entropy on all the logits at once
  adamw      one fused AdamW step over the model's parameters
  head compiled   the chunked head with each chunk compiled (as --compile does): this code's chunk function
             side by side with the one before 2026-11-28 (chunk_loss_scatter below), and with 4x the rows
             per chunk (a quarter of the calls)
  compiled   `step` again after speed.compile_model (the trainer's --compile), with its compile time
then the top CUDA kernels of two eager steps and of two compiled ones (torch.profiler), so the figures can be
checked against kernels. --head-only: the head figures alone (seconds, plus the chunks' compile).
"""

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import auto_regressive_model as arm  # noqa: E402
from plumbing import cli  # noqa: E402
from plumbing import speed  # noqa: E402
from models import MODELS, create_model  # noqa: E402


def chunk_loss_scatter(hc, wd, t, wt, with_accuracy):
    """auto_regressive_model.chunk_loss_and_grads as it was before 2026-11-28, for side-by-side timing: the
    -onehot is scattered into the (n, V) fp32 softmax, so a compiled chunk writes that out in fp32 and reads it
    back before the cast."""
    logits = (hc @ wd.t()).float()
    hits = ((logits.argmax(1, keepdim=True) == t).float() * wt).sum() if with_accuracy else logits.new_zeros(())
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    loss = ((lse - logits.gather(1, t)) * wt).sum()
    g = logits.sub_(lse).exp_()
    g.scatter_add_(1, t, torch.full_like(wt, -1.0))
    g = g.mul_(wt).to(hc.dtype)
    return loss, hits, g @ wd, (g.t() @ hc).float()


def kernel_table(step, label):
    """The top CUDA kernels of two calls of step()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"-- kernels of two {label} steps")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))


def timed(fn, device, repeat, warmup=2):
    """Median milliseconds of fn() over `repeat` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="baseline_gpt2")
    p.add_argument("--preset", choices=["rtx3080", "tiny"], default="rtx3080")
    p.add_argument("--micro", type=cli.positive_int, default=256, help="rows per micro-step")
    p.add_argument("--vocab", type=cli.positive_int, default=50304)
    p.add_argument("--device", type=cli.device, default="auto", help="auto (default): cuda if there is one")
    p.add_argument("--repeat", type=cli.positive_int, default=5, help="timed calls per figure (median)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled figures (about a minute on a GPU)")
    p.add_argument("--head-only", action="store_true", help="only the head's figures, eager and compiled")
    args = p.parse_args(argv)
    device = torch.device(cli.pick_device(args.device))
    torch.manual_seed(0)
    model = create_model(args.model, preset=args.preset, vocab_size=args.vocab).to(device)
    T = model.config.block_size
    B = args.micro
    x = torch.randint(0, args.vocab, (B, T), device=device)
    y = torch.randint(0, args.vocab, (B, T), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    tokens = B * T
    rows = []

    def report(label, ms):
        rows.append((label, ms))
        print(f"{label:34s} {ms:9.2f} ms  {tokens / ms * 1000:12,.0f} tok/s", flush=True)

    print(f"{args.model} --preset {args.preset} | micro {B} x {T} tokens | vocab {args.vocab} | {device} "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} | torch {torch.__version__}")

    def step():
        with autocast:
            loss, _ = model.training_loss(x, y, None, 0)
        loss.backward()

    def trunk():
        with autocast:
            h = model.features(x)
        h.float().square().mean().backward()

    if not args.head_only:
        report("step (fwd+bwd, eager)", timed(step, device, args.repeat))
        report("trunk (blocks, fwd+bwd)", timed(trunk, device, args.repeat))
        opt.zero_grad(set_to_none=False)
        report("adamw step (fused on CUDA)", timed(opt.step, device, args.repeat))

    C = model.config.n_embd
    h = torch.randn(B * T, C, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                    requires_grad=True)
    w = torch.nn.Parameter(torch.randn(args.vocab, C, device=device) * 0.02)
    t = y.reshape(-1)
    for elements in (1 << 24, 1 << 26, 1 << 28):
        chunk = max(1, elements // args.vocab)

        def head(chunk=chunk):
            with autocast:
                loss = arm.chunked_cross_entropy(h, w, t, chunk_rows=chunk)
            loss.backward()
        try:
            report(f"head chunked, {chunk} rows/chunk", timed(head, device, args.repeat))
        except torch.OutOfMemoryError:
            print(f"head chunked, {chunk} rows: out of memory")
            torch.cuda.empty_cache()

    def head_plain():
        with autocast:
            loss = F.cross_entropy((h @ w.t()).float(), t)
        loss.backward()
    try:
        report("head F.cross_entropy, all logits", timed(head_plain, device, args.repeat))
    except torch.OutOfMemoryError:
        print("head F.cross_entropy: out of memory")
        torch.cuda.empty_cache()

    if not args.no_compile:  # each chunk function compiled on its own, as speed.compile_model does
        default_rows = arm._chunk_rows(B * T, args.vocab)
        variants = [("scatter, before 11-28", chunk_loss_scatter, default_rows),
                    ("this code", arm.chunk_loss_and_grads, default_rows),
                    ("this code, 4x rows", arm.chunk_loss_and_grads, 4 * default_rows)]  # fewer calls per step
        for label, fn, chunk in variants:
            compiled = torch.compile(fn)

            def head_compiled(compiled=compiled, chunk=chunk):
                with autocast:
                    loss = arm.chunked_cross_entropy(h, w, t, chunk_rows=chunk, chunk_fn=compiled)
                loss.backward()
            t0 = time.perf_counter()
            try:
                head_compiled()
                print(f"head chunk compile ({label}) {time.perf_counter() - t0:.1f} s")
                report(f"head compiled, {label}", timed(head_compiled, device, args.repeat))
            except torch.OutOfMemoryError:
                print(f"head compiled, {label}: out of memory")
                torch.cuda.empty_cache()
    if args.head_only:
        return

    if device.type == "cuda":
        kernel_table(step, "eager")
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")

    if not args.no_compile:
        t0 = time.perf_counter()
        speed.compile_model(model)
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"compile + first step {time.perf_counter() - t0:.1f} s")
        report("step (fwd+bwd, compiled)", timed(step, device, args.repeat))
        report("trunk (compiled blocks)", timed(trunk, device, args.repeat))
        if device.type == "cuda":
            kernel_table(step, "compiled")


if __name__ == "__main__":
    main()
