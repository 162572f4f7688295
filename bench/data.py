"""
Benchmark of the data pipeline (a script, not a test): prints three tables.

  1. preparation throughput (base_data_preparer.prepare) on GSM8K train and synthetic-math, bytes and gpt2:
     tokens/s (wall clock), per core (tokens/s / cores), and tokens per CPU-second (all processes together:
     independent of what else the machine is doing)
  2. loader time per batch (B=16,T=128 and B=8,T=256), also as a fraction of one tiny-preset training step
     (baseline_gpt2 tiny, forward + backward + AdamW, on this CPU)
  3. loader memory while reading once through a >= 200M-token shard set (random tokens written with numpy
     into a temporary folder, deleted afterwards): resident memory growth, anonymous and file-backed

    python bench/data.py            # full: 10M-token synthetic sets, 200M-token memory test (~2 min on 2 cores)
    python bench/data.py --smoke    # tiny settings, < 1 min
"""
import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT.parent / "shared" / "tiktoken-cache"
if CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(CACHE))
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

import dataloader  # noqa: E402
from base_data_preparer import prepare  # noqa: E402
from data_file_utils import DataError, read_manifest, shard_name, write_manifest  # noqa: E402
from dataloader import TokenDataLoader  # noqa: E402


def cpu_seconds():
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def memory_kb():
    """VmRSS, RssAnon, RssFile of this process in kB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    for i, row in enumerate([header] + rows):
        print("  " + "  ".join(str(x).rjust(w) if j else str(x).ljust(w) for j, (x, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def bench_prepare(work: Path, synthetic_tokens: int, tokenizers=("bytes", "gpt2")):
    cores = os.cpu_count()
    rows, dirs = [], {}
    cases = [("GSM8K train (json)", f"json:{GSM8K}", "bytes", None),
             ("GSM8K train (json)", f"json:{GSM8K}", "gpt2", None),
             ("synthetic-math", "synthetic-math", "bytes", synthetic_tokens),
             ("synthetic-math", "synthetic-math", "gpt2", synthetic_tokens)]
    for label, spec, tok, budget in [case for case in cases if case[2] in tokenizers]:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        d = prepare(spec, tok, work / f"prep-{tok}", max_tokens=budget, num_workers=cores, quiet=True)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        m = read_manifest(d)
        n = sum(s["tokens"] for s in m["splits"].values())
        dirs[(spec, tok)] = d
        rows.append([label, tok, f"{n:,}", f"{dt:.2f}", f"{n / dt / 1e6:.2f}M", f"{n / dt / cores / 1e6:.2f}M",
                     f"{n / cpu / 1e6:.2f}M"])
    table(f"Preparation ({cores} cores, {cores} tokenizer workers; tokens of all splits)",
          ["source", "tokenizer", "tokens", "seconds", "tok/s", "tok/s/core", "tok/CPU-s"], rows)
    return dirs


def tiny_step_seconds(B, T, vocab, steps=5):
    """One tiny-preset training step of baseline_gpt2 (forward, backward, AdamW), or None if unavailable."""
    try:
        import torch
        from models import create_model
        model = create_model("baseline_gpt2", "tiny", vocab_size=-(-vocab // 64) * 64, block_size=T)
    except Exception as e:  # the models are written by others; the loader figures stand alone
        print(f"(no tiny step timing: {type(e).__name__}: {e})")
        return None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (B, T))
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= steps // 2:  # the first steps warm up
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_loader(dataset, n_batches, steps):
    rows = []
    for B, T in [(16, 128), (8, 256)]:
        loader = TokenDataLoader(dataset, "train", B, T, with_loss_mask=False)
        for _ in range(20):
            loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            loader.next_batch()
        per_batch = (time.perf_counter() - t0) / n_batches
        masked = TokenDataLoader(dataset, "train", B, T, with_loss_mask=True)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            masked.next_batch()
        per_masked = (time.perf_counter() - t0) / n_batches
        t0 = time.perf_counter()
        for _ in range(20):
            TokenDataLoader(dataset, "val", B, T).next_batch()
        construct = (time.perf_counter() - t0) / 20
        step = tiny_step_seconds(B, T, loader.vocab_size, steps)
        frac = f"{per_batch / step * 100:.3f}%" if step else "n/a"
        rows.append([f"B={B}, T={T}", f"{per_batch * 1e6:.0f}", f"{per_masked * 1e6:.0f}", f"{construct * 1e3:.2f}",
                     f"{step * 1e3:.1f}" if step else "n/a", frac])
    table(f"Loader (CPU tensors, mean of {n_batches} batches; tiny step = baseline_gpt2 tiny fwd+bwd+AdamW)",
          ["batch", "us/batch", "us/batch +mask", "new val loader ms", "tiny step ms", "loader/step"], rows)


def make_shard_set(d: Path, tokens: int, shard_tokens: int = 100_000_000):
    """A fake dataset of random bytes-tokenizer ids, written block by block (never all in RAM)."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards, sizes, left, i = [], [], tokens, 0
    while left:
        n = min(shard_tokens, left)
        with open(d / shard_name("train", i), "wb") as f:
            for start in range(0, n, 8_000_000):
                rng.integers(0, 257, size=min(8_000_000, n - start), dtype=np.uint16).tofile(f)
        shards.append(shard_name("train", i))
        sizes.append(n)
        left -= n
        i += 1
    rng.integers(0, 257, size=100_000, dtype=np.uint16).tofile(d / shard_name("val", 0))
    rng.integers(0, 257, size=100_000, dtype=np.uint16).tofile(d / shard_name("test", 0))
    small = {"documents": 1, "tokens": 100_000, "bytes": 100_000, "mask_shards": [], "shard_tokens": [100_000]}
    write_manifest(d, {"source": "bench", "tokenizer": "bytes", "vocab_size": 257, "eot_token": 256, "seed": 0,
                       "max_tokens": tokens, "has_loss_mask": False, "content_hash": "bench",
                       "splits": {"train": {"documents": 1, "tokens": tokens, "bytes": tokens, "shards": shards,
                                            "mask_shards": [], "shard_tokens": sizes},
                                  "val": dict(small, shards=[shard_name("val", 0)]),
                                  "test": dict(small, shards=[shard_name("test", 0)])}})


def read_through(d: Path, B: int, T: int):
    """Read the whole train split once; returns (seconds, peak growth of VmRSS/RssAnon/RssFile in MB)."""
    before = memory_kb()
    peak = dict(before)
    loader = TokenDataLoader(d, "train", B, T)
    t0 = time.perf_counter()
    for i in range(loader.chunks_per_epoch):
        loader.next_batch()
        if i % 50 == 0:
            for k, v in memory_kb().items():
                peak[k] = max(peak[k], v)
    dt = time.perf_counter() - t0
    del loader
    return dt, {k: (peak[k] - before[k]) / 1024 for k in before}


def bench_memory(work: Path, tokens: int):
    d = work / "big"
    t0 = time.perf_counter()
    make_shard_set(d, tokens)
    made = time.perf_counter() - t0
    B, T = 64, 1024
    rows, default = [], dataloader.RELEASE_BYTES
    for label, release in [("release pages read (default)", default), ("release only at shard end", 1 << 62)]:
        dataloader.RELEASE_BYTES = release
        dt, grow = read_through(d, B, T)
        rows.append([label, f"{tokens / 1e6:.0f}M", f"{dt:.1f}", f"{tokens / dt / 1e6:.0f}M",
                     f"{grow['VmRSS']:.1f}", f"{grow['RssAnon']:.1f}", f"{grow['RssFile']:.1f}"])
    dataloader.RELEASE_BYTES = default
    table(f"Loader memory, one pass over {tokens / 1e6:.0f}M tokens ({tokens * 2 / 2 ** 20:.0f} MiB of shards, "
          f"made in {made:.1f}s), B={B}, T={T}: peak growth in MB",
          ["mode", "tokens", "seconds", "tok/s", "RSS", "anon", "file-backed"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--smoke", action="store_true", help="small settings (< 1 min)")
    parser.add_argument("--tiny", action="store_true", help="smallest settings, bytes tokenizer only (for the tests)")
    args = parser.parse_args()
    args.smoke = args.smoke or args.tiny
    synthetic_tokens = 400_000 if args.tiny else 1_000_000 if args.smoke else 10_000_000
    big_tokens = 2_000_000 if args.tiny else 20_000_000 if args.smoke else 200_000_000
    n_batches = 50 if args.tiny else 200 if args.smoke else 2000
    print(f"lmsmall data benchmark{' (smoke)' if args.smoke else ''}: {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    if not GSM8K.is_file():
        print(f"error: bench/data.py reads GSM8K train from {GSM8K}, which is missing; see README.md, 'What the "
              f"tests need offline'", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="lmsmall-bench-") as tmp:
        work = Path(tmp)
        try:
            dirs = bench_prepare(work, synthetic_tokens, ("bytes",) if args.tiny else ("bytes", "gpt2"))
        except DataError as e:  # e.g. no GPT-2 BPE files and no network
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        bench_loader(dirs[("synthetic-math", "bytes")], n_batches, 3 if args.smoke else 5)
        bench_memory(work, big_tokens)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other processes on the machine slow the wall-clock "
          f"figures; tok/CPU-s is not affected)")


if __name__ == "__main__":
    main()
