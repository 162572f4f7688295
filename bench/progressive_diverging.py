"""
Training step time of progressive_diverging in each stage against baseline_gpt2 of the same depth
(12 layer applications) and width, measured side by side in one process.

    python bench/progressive_diverging.py                      # rtx3080 sizes: 12 x (6 heads, 192 wide), 8 x 256
    python bench/progressive_diverging.py --preset tiny --vocab-size 320 --batch-size 16
    python bench/progressive_diverging.py --plain-lora         # + stages 2/3 with components.LoRALinear.forward

One step = zero_grad, forward, backward, gradient clipping, AdamW step over the trainable parameters,
as in base_trainer.py (bf16 autocast and fused AdamW on CUDA). The models take turns step by step, so a
slow phase of the machine hits all of them alike; a second copy of the baseline shows how much two runs of
the same model differ on this machine. The table shows the median wall time per step and, on a CPU,
also the median CPU time of this process per step, which other programs on a busy machine disturb far less
(use --threads 1 there, so that no thread waits for another).
"""

import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plumbing import cli  # noqa: E402
from components import LoRALinear  # noqa: E402
from models import create_model, model_config  # noqa: E402
import models.progressive_diverging as pd  # noqa: E402


def parse_args():
    p = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--preset", default="rtx3080", choices=list(pd.PRESETS))
    p.add_argument("--vocab-size", type=cli.positive_int, default=50304, help="50304 = GPT-2 tokenizer; 320 = bytes")
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--seq-len", type=cli.positive_int, default=None, help="default: the preset's block_size")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="timed steps per model (after --warmup)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=3)
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--plain-lora", action="store_true",
                   help="also time stages 2/3 with components.LoRALinear.forward instead of the custom matmul")
    return p.parse_args()


class Runner:
    """One model with its AdamW, timed one training step at a time."""

    def __init__(self, label, model, device, plain_lora=False):
        self.label, self.model, self.device, self.plain_lora = label, model.to(device), device, plain_lora
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device.startswith("cuda"))
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                         else contextlib.nullcontext())
        self.times, self.cpu_times = [], []

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        elif self.device == "mps":
            torch.mps.synchronize()

    def step(self, x, y, record):
        forward = pd.LoRAProjection.forward
        if self.plain_lora:
            pd.LoRAProjection.forward = LoRALinear.forward
        try:
            self.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            self.opt.zero_grad(set_to_none=True)
            with self.autocast:
                _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        finally:
            pd.LoRAProjection.forward = forward
        if record:
            self.times.append(dt)
            self.cpu_times.append(dc)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    cfg = model_config("progressive_diverging", args.preset, vocab_size=args.vocab_size)
    T = args.seq_len or cfg.block_size
    sizes = dict(vocab_size=cfg.vocab_size, block_size=T, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 n_embd=cfg.n_embd)
    torch.manual_seed(0)
    # The baseline twice: how far its two copies differ is how far this machine's timings can be trusted.
    runners = [Runner(label, create_model("baseline_gpt2", None, **sizes), device)
               for label in (f"baseline_gpt2 ({cfg.n_layer} layers)", "baseline_gpt2 again (noise check)")]
    variants = [(s, False) for s in (1, 2, 3)] + ([(s, True) for s in (2, 3)] if args.plain_lora else [])
    for stage, plain in variants:
        model = create_model("progressive_diverging", args.preset, vocab_size=cfg.vocab_size, block_size=T)
        model.set_stage(stage)
        with torch.no_grad():  # B = 0 right after a switch; give the LoRA a trained-looking value
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0.0, 0.02)
        label = f"progressive stage {stage} ({len(model.blocks)} blocks)" + (" plain LoRA" if plain else "")
        runners.append(Runner(label, model, device, plain))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, T), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, T), generator=g).to(device)
    print(f"device {device} ({torch.get_num_threads()} CPU threads) | torch {torch.__version__} | "
          f"{cfg.n_layer} x (heads {cfg.n_head}, width {cfg.n_embd}) | vocab {cfg.vocab_size} | "
          f"batch {args.batch_size} x {T} | LoRA r={cfg.lora_rank} | {args.steps} timed steps each")
    for i in range(args.warmup + args.steps):
        for r in runners[i % len(runners):] + runners[:i % len(runners)]:  # rotate who goes first
            r.step(x, y, record=i >= args.warmup)
    cpu = device == "cpu"
    base, base_cpu = statistics.median(runners[0].times), statistics.median(runners[0].cpu_times)
    print(f"{'model':46s} {'trainable':>11s} {'wall ms':>9s} {'ratio':>6s}"
          + (f" {'CPU ms':>9s} {'ratio':>6s}" if cpu else ""))
    for r in runners:
        wall, cpu_ms = statistics.median(r.times), statistics.median(r.cpu_times)
        print(f"{r.label:46s} {sum(p.numel() for p in r.params):11,d} {wall * 1000:9.1f} {wall / base:6.3f}"
              + (f" {cpu_ms * 1000:9.1f} {cpu_ms / base_cpu:6.3f}" if cpu else ""))

if __name__ == "__main__":
    main()
