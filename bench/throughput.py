"""
Training throughput of every registered model: one optimizer step = forward + backward + clip + AdamW step.
Prints tokens/s, ms/step, FLOPs per token, MFU (CUDA) and peak memory (CUDA) per model, measured in
interleaved rounds (model A, B, ..., A, B, ...) so that machine noise hits every model alike.

    python bench/throughput.py                                   # every model, tiny preset, CPU
    python bench/throughput.py --preset rtx3080 --device cuda --compile
    python bench/throughput.py --models baseline_gpt2 --nanogpt /path/to/nanoGPT/model.py \
        --set n_layer=6 n_head=6 n_embd=192 --seq-len 256 --batch 8        # side by side with nanoGPT

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records every matmul and attention
kernel of one forward + backward, so each architecture (shortened sequences, shared blocks, LoRA) is counted
as it runs. MFU = counted FLOPs per second / the GPU's dense bf16 peak.
"""

import importlib.util
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import speed  # noqa: E402
from plumbing import cli  # noqa: E402
from models import MODELS, create_model  # noqa: E402


def parse_value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def load_nanogpt(path, overrides, vocab_size, seq_len):
    """nanoGPT's GPT from a model.py the user points at (not shipped with lmsmall)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fields = module.GPTConfig.__dataclass_fields__
    cfg = {k: v for k, v in dict(overrides, vocab_size=vocab_size, block_size=seq_len, bias=True,
                                 dropout=0.0).items() if k in fields}
    return module.GPT(module.GPTConfig(**cfg))


class Runner:
    """One model with its optimizer and a fixed random batch."""

    def __init__(self, label, model, batch, seq_len, vocab, device, compile_model, dtype, compile_mode="default"):
        self.label, self.model, self.device = label, model.to(device), device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.startswith("cuda"))
        self.params = params
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
        self.y = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
        self.tokens = batch * seq_len
        self.autocast = torch.autocast("cuda", dtype=dtype) if device.startswith("cuda") else None
        self.flops = self.flops_per_token()  # counted eagerly: the counter cannot see inside a compiled graph
        if compile_model and hasattr(model, "lm_loss"):
            speed.compile_model(model, compile_mode)  # in place, as the trainer does: blocks and chunked head
        elif compile_model:
            model.compile(mode=None if compile_mode == "default" else compile_mode)  # nanoGPT
        self.times = []
        self.cudagraphs = compile_model and compile_mode in ("reduce-overhead", "max-autotune")

    def loss(self):
        if hasattr(self.model, "training_loss"):  # lmsmall models: their own training objective
            return self.model.training_loss(self.x, self.y, None, 0)[0]
        return self.model(self.x, self.y)[1]      # nanoGPT

    def step(self):
        speed.begin_micro_step(self)
        if self.autocast:
            with self.autocast:
                loss = self.loss()
        else:
            loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_steps(self, n):
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        sync()
        self.times.append((time.perf_counter() - t0) / n)

    def resident_bytes(self):
        """Memory this runner holds between steps: weights, buffers and optimizer state."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def flops_per_token(self):
        counter = FlopCounterMode(display=False)
        with counter:
            self.loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.tokens


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--preset", default="tiny", choices=["tiny", "rtx3080"])
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model config overrides")
    p.add_argument("--batch", type=cli.positive_int, default=8)
    p.add_argument("--seq-len", type=cli.positive_int, default=None, help="default: the model preset's block_size")
    p.add_argument("--vocab-size", type=cli.positive_int, default=320, help="320 = byte tokenizer, 50304 = GPT-2")
    p.add_argument("--steps", type=cli.positive_int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=cli.positive_int, default=3)
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", choices=speed.COMPILE_MODES, default="default")
    p.add_argument("--nanogpt", help="path to nanoGPT's model.py, timed beside baseline_gpt2")
    args = p.parse_args(argv)
    args.device = cli.pick_device(args.device)
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    runners = []
    for name in args.models:
        cfg = dict(overrides, vocab_size=args.vocab_size)
        if args.seq_len:
            cfg["block_size"] = args.seq_len
        model = create_model(name, preset=args.preset, **cfg)
        seq_len = args.seq_len or model.config.block_size
        runners.append(Runner(name, model, args.batch, seq_len, args.vocab_size, args.device, args.compile,
                              torch.bfloat16, args.compile_mode))
    if args.nanogpt:
        seq_len = runners[0].x.size(1)
        model = load_nanogpt(args.nanogpt, overrides, args.vocab_size, seq_len)
        runners.append(Runner("nanoGPT model.py", model, args.batch, seq_len, args.vocab_size, args.device,
                              args.compile, torch.bfloat16, args.compile_mode))
    flops = {r.label: r.flops for r in runners}
    for r in runners:  # warm-up: allocator, kernels, compilation
        r.timed_steps(2)
        r.times.clear()
    for _ in range(args.rounds):
        for r in runners:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                others = torch.cuda.memory_allocated() - r.resident_bytes()  # the other models' weights, Adam
            r.timed_steps(args.steps)
            if args.device.startswith("cuda"):  # this model's own peak, as if it were alone on the GPU
                r.peak_mem = (torch.cuda.max_memory_allocated() - others) / 2**30
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    peak = speed.peak_flops(gpu)
    print(f"device: {gpu or 'cpu'} ({torch.get_num_threads()} threads) | preset {args.preset} | batch {args.batch} "
          f"| overrides {overrides or '-'} | compile {args.compile and args.compile_mode} | median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':<24} {'params':>10} {'seq':>5} {'ms/step':>9} {'tok/s':>10} {'GFLOP/tok':>10} "
          f"{'MFU':>6} {'peak GiB':>9} {'vs first':>9}")
    base = None
    for r in runners:
        ms = statistics.median(r.times) * 1000
        tok_s = r.tokens / (ms / 1000)
        base = base or ms
        mfu = f"{flops[r.label] * tok_s / peak:.1%}" if peak else "-"
        mem = f"{r.peak_mem:.2f}" if hasattr(r, "peak_mem") else "-"
        n_params = sum(p.numel() for p in r.model.parameters())
        print(f"{r.label:<24} {n_params:>10,} {r.x.size(1):>5} {ms:>9.1f} {tok_s:>10,.0f} "
              f"{flops[r.label] / 1e9:>10.3f} {mfu:>6} {mem:>9} {ms / base:>8.2f}x")


if __name__ == "__main__":
    main()
