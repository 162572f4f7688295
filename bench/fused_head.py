"""
The head's loss and gradients, A/B: the chunked head (eager and compiled per chunk, as --compile runs it)
against the fused Triton kernel (fused_head.py) and, when installed, cut-cross-entropy (filter_eps=None: exact
gradients). One forward + backward of the head alone, on random hidden states, under bf16 autocast as training.

    python bench/fused_head.py                         # CUDA: rows 65536 (micro 256 x seq 256), C 192 and 384, V 50304
    python bench/fused_head.py --channels 768 --rows 16384
    python bench/fused_head.py --tiles default,64x64x8,32x32x4   # sweep the fused kernel's tiles
    python bench/fused_head.py --dry-run               # CPU, tiny shapes, Triton's interpreter (the tests run it)

Prints one row per head and width: the median ms of --repeat timed calls after a warm-up (synchronised),
TFLOP/s of the head's model FLOPs (6 N V C: logits, d/d h, d/d w; fused_head.head_flops), GB/s as the fp32
logits' size (4 N V bytes) per second: how fast each head gets through a step's worth of logits (the fused
head never writes them), the peak memory above the inputs, and the loss's and gradients' largest difference
from the eager chunked head's. Stops starting new heads after --time-limit seconds.
"""

import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from plumbing import cli  # noqa: E402


def parse_args(argv=None):
    p = cli.ArgumentParser(description="the chunked head against the fused Triton head (and cut-cross-entropy)")
    p.add_argument("--rows", type=cli.positive_int, default=256 * 256, help="N = micro batch x seq len")
    p.add_argument("--channels", type=channel_list, default=[192, 384], help="comma-separated widths C")
    p.add_argument("--vocab", type=cli.positive_int, default=50304)
    p.add_argument("--repeat", type=cli.positive_int, default=10)
    p.add_argument("--time-limit", type=cli.positive_float, default=300.0, help="seconds; no new head after it")
    p.add_argument("--tiles", type=tile_list, default=[None],
                   help="fused tile sizes to sweep, OUTERxINNERxWARPS or 'default' (fused_head's own choice), "
                        "comma-separated, e.g. default,64x64x8 (fused_head.TILES)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    return p.parse_args(argv)


def channel_list(text):
    widths = [cli.positive_int(part) for part in text.split(",")]
    return widths


def tile_list(text):
    tiles = []
    for part in text.split(","):
        if part == "default":
            tiles.append(None)
            continue
        sizes = part.split("x")
        if len(sizes) != 3:
            raise cli.argparse.ArgumentTypeError(f"expected OUTERxINNERxWARPS such as 32x64x8, got {part!r}")
        sizes = [cli.positive_int(size) for size in sizes]
        if any(size & (size - 1) for size in sizes) or min(sizes[:2]) < 16:
            raise cli.argparse.ArgumentTypeError(f"tile sizes must be powers of two, OUTER and INNER >= 16: {part!r}")
        tiles.append(tuple(sizes))
    return tiles


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        # before triton is imported: the kernels then run on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
        args.rows, args.channels, args.vocab, args.repeat = 96, [32], 1000, 2
        args.tiles = [None, (32, 64, 4)] if args.tiles == [None] else args.tiles
    import torch
    import fused_head
    if not args.dry_run and not torch.cuda.is_available():
        cli.fail("this benchmark needs a CUDA GPU; on a CPU run it with --dry-run")
    device = "cpu" if args.dry_run else "cuda"
    print(f"# head A/B on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (dry run)'}, "
          f"triton {getattr(fused_head.triton, '__version__', 'not installed')}, N={args.rows} V={args.vocab}")
    print(f"{'head':<18} {'C':>5} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>8} {'d loss':>9} {'d grad':>9}")
    start = time.perf_counter()
    for channels in args.channels:
        for name, head in heads(device, fused_head, args.tiles):
            if time.perf_counter() - start > args.time_limit:
                print(f"# stopped: past --time-limit {args.time_limit:g} s")
                return
            print(measure(name, head, args.rows, channels, args.vocab, args.repeat, device), flush=True)


def heads(device, fused_head, tiles):
    """(name, f(h, w, targets) -> loss) for each head that can run here; the first is the reference."""
    import torch
    from auto_regressive_model import chunked_cross_entropy, chunk_loss_and_grads
    found = [("chunked", chunked_cross_entropy)]
    if device == "cuda":
        compiled = torch.compile(chunk_loss_and_grads, dynamic=False)
        found.append(("chunked-compiled", lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_fn=compiled)))
    if fused_head.fused_head_available(device):
        for tile in tiles:
            found.append(("fused" + ("" if tile is None else " " + "x".join(map(str, tile))), fused_with(tile)))
    if device == "cuda":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            print("# cut-cross-entropy: not installed (pip install cut-cross-entropy), skipped")
        else:
            found.append(("cce", lambda h, w, t: linear_cross_entropy(h.to(torch.bfloat16), w.to(torch.bfloat16),
                                                                      t, ignore_index=-1, filter_eps=None)))
    return found


def fused_with(tile):
    import fused_head

    def head(h, w, t):
        fused_head.TILES = tile
        return fused_head.fused_linear_cross_entropy(h, w, t)
    return head


_reference = {}


def measure(name, head, rows, channels, vocab, repeat, device):
    import torch
    import fused_head
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(rows, channels, generator=gen)).to(device).requires_grad_()
    w = (torch.randn(vocab, channels, generator=gen) * channels ** -0.5).to(device).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    t[::10] = -1                                                   # some positions not scored

    def step():
        h.grad = w.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = head(h, w, t)
        loss.backward()
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    loss = step()                                                  # warm-up (and compile)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device == "cuda" else float("nan")
    key = (rows, channels, vocab)
    if key not in _reference:
        _reference[key] = (loss.detach().float(), h.grad.float(), w.grad.float())
    ref_loss, ref_h, ref_w = _reference[key]
    d_loss = (loss.detach().float() - ref_loss).abs().item()
    d_grad = max((h.grad.float() - ref_h).abs().max().item(), (w.grad.float() - ref_w).abs().max().item())
    s = statistics.median(times)
    tflops = fused_head.head_flops(rows, vocab, channels, recompute=False) / s / 1e12
    gbs = 4 * rows * vocab / s / 1e9
    return f"{name:<18} {channels:>5} {s * 1e3:>9.2f} {tflops:>8.1f} {gbs:>8.1f} {peak:>8.0f} {d_loss:>9.2e} {d_grad:>9.2e}"


if __name__ == "__main__":
    main()
