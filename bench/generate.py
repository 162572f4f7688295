"""
Generation speed of every registered model: new tokens per second with and without the KV cache
(AutoRegressiveModel.generate, greedy, batch 1 by default), plus progressive_diverging in stage 3 with its
LoRA unmerged (W x + s B A x per projection) and merged (prepare_for_inference(): plain nn.Linear).

    python bench/generate.py                                  # every model, tiny preset, 256 new tokens
    python bench/generate.py --smoke                          # tiny settings, a few seconds
    python bench/generate.py --threads 2                      # CPU: default 1 thread
    python bench/generate.py --preset rtx3080 --device cuda   # the seed's sizes on a GPU

conv_attention has no KV cache (its compressor/expander recompute the window; supports_kv_cache = False):
it is timed uncached only. Models are timed in interleaved rounds (A, B, ..., A, B, ...) and the median
round is reported, so machine noise hits every model alike.

The context (block_size) is raised, when needed, to hold the prompt plus every new token: past block_size
generate() refills the cache once per half window (learned absolute positions), which would mix refill cost
into the per-token figure. The table's "ctx" column shows the block_size used. Weights are random:
speed does not depend on them (the cached and uncached paths are checked to give the same greedy tokens).
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import cli  # noqa: E402
from bench.machine import describe as describe_machine  # noqa: E402
from models import MODELS, create_model  # noqa: E402


class Case:
    """One (model, variant, cache on/off) row."""

    def __init__(self, label, variant, model, use_cache):
        self.label, self.variant, self.model, self.use_cache = label, variant, model, use_cache
        self.times, self.tokens = [], None


def build_models(args):
    """[(label, variant, model)] on args.device, in eval mode."""
    out = []
    for name in args.models:
        probe = create_model(name, preset=args.preset, vocab_size=args.vocab_size)
        block = max(probe.config.block_size, args.prompt_len + args.new_tokens)
        if args.block_size:
            block = args.block_size
        torch.manual_seed(0)
        model = create_model(name, preset=args.preset, vocab_size=args.vocab_size, block_size=block)
        if name == "progressive_diverging":
            model.set_stage(3)
            with torch.no_grad():  # give the fresh LoRA (B = 0) a real update, so merging changes the weights
                g = torch.Generator().manual_seed(1)
                for pname, p in model.named_parameters():
                    if pname.endswith("lora_B"):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            merged = create_model(name, preset=args.preset, vocab_size=args.vocab_size, block_size=block)
            merged.set_stage(3)
            merged.load_state_dict(model.state_dict())
            merged.prepare_for_inference()
            out.append((name, "stage 3, LoRA unmerged", model))
            out.append((name, "stage 3, merged", merged))
        else:
            out.append((name, "", model))
    for _, _, m in out:
        m.to(args.device).eval()
    return out


def run(case, prompt, args):
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        idx = case.model.generate(prompt, args.new_tokens, temperature=1.0, top_k=1, use_cache=case.use_cache)
        sync()
    case.times.append(time.perf_counter() - t0)
    case.tokens = idx[:, prompt.size(1):].cpu()


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--preset", default="tiny", choices=["tiny", "rtx3080"])
    p.add_argument("--new-tokens", type=cli.positive_int, default=256)
    p.add_argument("--prompt-len", type=cli.positive_int, default=16)
    p.add_argument("--batch", type=cli.positive_int, default=1)
    p.add_argument("--block-size", type=cli.positive_int, default=None,
                   help="context; default: the preset's, raised to prompt + new tokens if smaller")
    p.add_argument("--vocab-size", type=cli.positive_int, default=320, help="320 = byte tokenizer, 50304 = GPT-2")
    p.add_argument("--rounds", type=cli.positive_int, default=3)
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch CPU threads (default 1 on CPU: batch-1 decoding of small models is fastest on one "
                        "thread, and more threads thrash on a shared machine)")
    p.add_argument("--smoke", action="store_true", help="tiny settings: 32 new tokens, 1 round")
    args = p.parse_args(argv)
    args.device = cli.pick_device(args.device)
    if args.smoke:
        args.new_tokens, args.rounds, args.prompt_len = min(args.new_tokens, 32), 1, min(args.prompt_len, 8)
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    models = build_models(args)
    cases = []
    for label, variant, model in models:
        if model.supports_kv_cache:
            cases += [Case(label, variant, model, True), Case(label, variant, model, False)]
        else:
            cases.append(Case(label, ", ".join(filter(None, [variant, "no KV cache"])), model, False))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (args.batch, args.prompt_len), generator=g).to(args.device)
    for case in cases:  # warm-up (allocator, kernels), not timed
        with torch.inference_mode():
            case.model.generate(prompt, min(4, args.new_tokens), top_k=1, use_cache=case.use_cache)
    for _ in range(args.rounds):
        for case in cases:
            run(case, prompt, args)

    print(f"machine: {describe_machine(args.device)} | torch {torch.__version__} | preset {args.preset} | batch "
          f"{args.batch} | prompt {args.prompt_len} + {args.new_tokens} new tokens | greedy | median of "
          f"{args.rounds} round(s)")
    print(f"{'model':<22} {'variant':<24} {'params':>10} {'ctx':>5} {'cache':>5} {'ms/token':>9} "
          f"{'tok/s':>9} {'cache speedup':>13} {'same tokens':>11}")
    uncached = {(c.label, c.variant): c for c in cases if not c.use_cache}
    for c in cases:
        sec = statistics.median(c.times)
        new = args.new_tokens * args.batch
        partner = uncached.get((c.label, c.variant))
        if c.use_cache and partner is not None:
            speedup = f"{statistics.median(partner.times) / sec:.2f}x"
            same = "yes" if torch.equal(c.tokens, partner.tokens) else "NO"
        else:
            speedup, same = ("-", "-") if c.model.supports_kv_cache else ("n/a", "-")
        n_params = sum(p.numel() for p in c.model.parameters())
        print(f"{c.label:<22} {c.variant or '-':<24} {n_params:>10,} {c.model.config.block_size:>5} "
              f"{'on' if c.use_cache else 'off':>5} {sec / args.new_tokens * 1000:>9.2f} {new / sec:>9.1f} "
              f"{speedup:>13} {same:>11}")
    merged = [c for c in cases if c.label == "progressive_diverging" and c.variant.endswith("merged")
              and not c.variant.endswith("unmerged") and c.use_cache]
    unmerged = [c for c in cases if c.label == "progressive_diverging" and c.variant.endswith("unmerged")
                and c.use_cache]
    if merged and unmerged:
        m, u = statistics.median(merged[0].times), statistics.median(unmerged[0].times)
        print(f"merged vs unmerged (progressive_diverging stage 3, cached): merged is {u / m:.2f}x the speed of unmerged; same "
              f"greedy tokens: {'yes' if torch.equal(merged[0].tokens, unmerged[0].tokens) else 'NO'}")
    print("conv_attention: no KV cache (supports_kv_cache = False), uncached only" if "conv_attention" in
          args.models else "", end="\n" if "conv_attention" in args.models else "")


if __name__ == "__main__":
    main()
