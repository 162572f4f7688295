"""
Speed on a GPU: what BaseTrainer does so that small models do not run at a few percent of the hardware.
Each piece is a small function the trainer calls once with plain values; it returns what it decided and the
trainer keeps it. None changes what is computed.

    micro batch   --micro-batch-size auto (the default on CUDA): the largest power of two, dividing the rows
                  of one optimizer step, whose measured training step fits the memory budget
                  (min(free memory, --memory-budget), 10 GiB for the rtx3080 presets: they promise a 10 GB
                  card). The total batch, and so the maths, stay; only the split into micro-steps changes.
    compile       torch.compile (on by default on CUDA, --no-compile; --compile-mode) of every Block and of
                  one chunk of the head's loss (compile_model; CUDA graphs for the blocks only); a warm-up
                  step at start, and if compiling fails the run says so in one line and goes on eager.
    MFU           model FLOPs utilisation of each train row: FLOPs per token counted once at start (as
                  bench/throughput.py does) x tokens/s / the device's dense bf16 peak. Unknown devices, and
                  CPUs, get no MFU: never a guessed peak.
    prefetch      the next training batch is read and copied to the GPU (pinned memory, non_blocking) while
                  the GPU still works on the current one.
"""

import contextlib
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import model_module
from plumbing.trainer_config import COMPILE_MODES, TRAIN_PRESETS  # noqa: F401  (COMPILE_MODES: for the benches)

GiB = 2**30
# Dense bf16 peak FLOP/s by device name (NVIDIA datasheets; RTX 3080 by llm.c's count). Checked in order,
# the more specific names first; None = a device we do not know the peak of (no MFU then).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
    ("RTX 3080 Ti", None), ("RTX 3080", 59.5e12), ("RTX 4090 D", None), ("RTX 4090", 165e12),
]
# Memory the micro batch may use, by training preset: the rtx3080 presets promise a 10 GB card.
PRESET_MEMORY_GIB = {"rtx3080": 10.0}
# Of the budget, what the eager probe step may use: the rest is for the compiled graph, the allocator's
# fragmentation and the evaluation batches.
PROBE_FRACTION = 0.85
CHUNK_MODES = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}  # the head: no CUDA graphs



# ---- MFU ------------------------------------------------------------------------------------

def peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a device by name, or None when unknown (CPU included)."""
    for key, peak in PEAK_BF16_FLOPS:
        if device_name and key in device_name:
            return peak
    return None


def device_peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def count_flops_per_token(step_module, x, y, autocast):
    """FLOPs of one training step (forward + backward) per token, counted by FlopCounterMode on the batch
    x, y (eagerly: the counter cannot see inside a compiled graph). Leaves no gradients behind."""
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast:
            loss, _ = step_module(x, y, None, 0)
        loss.backward()
    for p in step_module.parameters():
        p.grad = None
    return counter.get_total_flops() / x.numel()


def mfu(flops_per_token, tokens_per_s, peak):
    return flops_per_token * tokens_per_s / peak if peak and flops_per_token else None


# ---- the micro batch --------------------------------------------------------------------------

def micro_batch_candidates(rows):
    """Powers of two that divide `rows` (the rows of one optimizer step per process), smallest first."""
    out, b = [], 1
    while b <= rows and rows % b == 0:
        out.append(b)
        b *= 2
    return out


def choose_micro_batch(rows, budget, peak_bytes):
    """(largest power of two b dividing rows whose peak_bytes(b) <= budget, {b: measured bytes or None}).
    peak_bytes(b) measures a training step of b rows (None: out of memory). Measures the two smallest,
    extrapolates linearly, then walks up (or down) from that guess one power of two at a time, so that few
    sizes are measured. When not even the smallest fits it returns the smallest; the caller says so."""
    candidates = micro_batch_candidates(rows)
    measured = {}

    def fits(b):
        if b not in measured:
            measured[b] = peak_bytes(b)
        return measured[b] is not None and measured[b] <= budget

    if not fits(candidates[0]) or len(candidates) == 1:
        return candidates[0], measured
    i = 0
    if fits(candidates[1]):
        b0, b1 = candidates[0], candidates[1]
        slope = max(measured[b1] - measured[b0], 1) / (b1 - b0)
        guess = [b for b in candidates if measured[b0] + slope * (b - b0) <= budget]
        i = candidates.index(guess[-1]) if guess else 1
    if fits(candidates[i]):
        while i + 1 < len(candidates) and fits(candidates[i + 1]):
            i += 1
    else:
        while i > 0 and not fits(candidates[i]):
            i -= 1
    return candidates[i], measured


def memory_budget(device, cap_gib):
    """Bytes a run may use on a CUDA device: what is free plus what this process already holds, capped."""
    free, _ = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    return min(usable, cap_gib * GiB) if cap_gib else usable


def cuda_peak_bytes(step, device, extra_bytes=0):
    """Peak bytes allocated while step() runs (plus extra_bytes), or None when it runs out of memory."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) + extra_bytes
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def no_side_effects(model, device):
    """Run a probe step without changing what the run does next: RNG streams, the model's extra state
    (e.g. dual_mask_gpt's running sums) and gradients are as before afterwards."""
    devices = [device] if str(device).startswith("cuda") else []
    state = model.extra_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            model.load_extra_state(state)
            for p in model.parameters():
                p.grad = None


def probe_step(step_module, autocast, rows, seq_len, device, step=0):
    """One forward + backward of step_module on a dummy batch of `rows` x seq_len tokens."""
    x = torch.zeros(rows, seq_len, dtype=torch.long, device=device)
    with autocast:
        loss, _ = step_module(x, x, None, step)
    loss.backward()


# ---- what the trainer asks: plain values in, its decisions out ---------------------------------------

def plan_micro_batch(cfg, typed, device_type, model_name):
    """Before the data: what the user asked for, as the cfg entries to set. micro_batch_size is the base size
    until choose_micro_batch_for_device() decides; micro_batch_auto says whether the size is chosen per device
    (kept on --resume unless --micro-batch-size is given again); base_micro_batch_size is the preset's or the
    user's number: evaluation counts its batches in it, and auto off CUDA uses it."""
    asked = typed.get("micro_batch_size")
    if asked is not None:
        auto = asked == "auto"
    elif "micro_batch_auto" in cfg:  # resumed: as the run was started
        auto = cfg["micro_batch_auto"]
    else:
        auto = device_type == "cuda"
    if "base_micro_batch_size" in cfg:
        base = cfg["base_micro_batch_size"]
    else:
        base = (cfg["micro_batch_size"] if cfg["micro_batch_size"] != "auto"
                else preset_micro_batch_size(model_name, cfg.get("preset")))
    changes = {"base_micro_batch_size": base}
    if isinstance(asked, int):
        changes["micro_batch_size"] = asked
    elif auto or cfg["micro_batch_size"] == "auto":
        changes["micro_batch_size"] = base
    changes["micro_batch_auto"] = auto
    return changes


def preset_micro_batch_size(model_name, preset):
    model_presets = getattr(model_module(model_name), "TRAIN_PRESETS", {}).get(preset, {})
    return model_presets.get("micro_batch_size", TRAIN_PRESETS.get(preset, TRAIN_PRESETS["tiny"])["micro_batch_size"])


def device_measures_memory(device):
    return str(device).startswith("cuda")


def measure_function(probe, step_module, autocast, seq_len, device, step, adam_bytes):
    """peak_bytes(b) for choose_micro_batch: a real training step of b rows on the GPU, side-effect free."""
    def peak_bytes(b):
        with no_side_effects(probe, device):
            return cuda_peak_bytes(lambda: probe_step(step_module, autocast, b, seq_len, device, step), device,
                                   adam_bytes)
    return peak_bytes


def choose_micro_batch_for_device(cfg, model, step_module, device, autocast, world_size, step):
    """After the model is on its device: (micro batch, info for config.json, a line to print or None). With
    micro_batch_auto on CUDA it probes the model's training step (step_module, moved onto the model's
    memory_probe_model) and picks the largest size that fits; every DDP rank takes the smallest any rank picked.
    Elsewhere, or without auto, the micro batch stays."""
    if not cfg["micro_batch_auto"]:
        return cfg["micro_batch_size"], {}, None
    T = cfg["seq_len"]
    rows = cfg["total_batch_size"] // (T * world_size)
    if not device_measures_memory(device):
        return cfg["micro_batch_size"], {}, (f"micro batch {cfg['micro_batch_size']} (auto measures GPU memory; on "
                                             f"{str(device).split(':')[0]} it keeps the preset's)")
    preset_cap = PRESET_MEMORY_GIB.get(cfg.get("preset"))
    budget = memory_budget(device, cfg.get("memory_budget") or preset_cap)
    probe = model.memory_probe_model()
    step_module.model = probe  # TrainingStep (or a subclass's step module) around the probe model
    adam_bytes = 2 * sum(p.numel() * 4 for p in probe.parameters() if p.requires_grad)  # not allocated yet
    t0 = time.perf_counter()
    chosen, measured = choose_micro_batch(rows, PROBE_FRACTION * budget, measure_function(
        probe, step_module, autocast, T, device, step, adam_bytes))
    probe_s = time.perf_counter() - t0
    del probe, step_module
    if str(device).startswith("cuda"):  # the probe's larger sizes are not what the run holds
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if world_size > 1:
        import torch.distributed as dist
        t = torch.tensor([chosen], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        chosen = int(t.item())
    sizes = ", ".join(f"{b}: {'OOM' if v is None else f'{v / GiB:.2f}'}" for b, v in sorted(measured.items()))
    fits = measured.get(chosen) is not None and measured[chosen] <= PROBE_FRACTION * budget
    capped = f" (the {cfg['preset']} preset's cap)" if preset_cap and not cfg.get("memory_budget") else ""
    line = (f"micro batch {chosen} (auto: the largest power of two whose training step fits "
            f"{PROBE_FRACTION:.0%} of {budget / GiB:.1f} GiB{capped}; measured GiB by rows: {sizes}; "
            f"{probe_s:.1f} s)" + ("" if fits else "; even this does not fit: expect out-of-memory, lower --seq-len"))
    info = {"micro_batch_probe_gib": {b: None if v is None else round(v / GiB, 6) for b, v in sorted(measured.items())},
            "memory_budget_gib": round(budget / GiB, 6)}
    return chosen, info, line


def eval_batches(cfg, world_size):
    """(rows per batch, batches per process) of one evaluation: eval_batches x base_micro_batch_size rows in
    all, whatever the micro batch, so that every micro batch (and --resume with another) evaluates the
    same tokens; read in batches as large as the micro batch where they divide the rows."""
    base = cfg.get("base_micro_batch_size", cfg["micro_batch_size"])
    total_rows = cfg["eval_batches"] * base
    if total_rows % world_size:
        return base, max(1, cfg["eval_batches"] // world_size)
    per_process = total_rows // world_size
    rows = math.gcd(cfg["micro_batch_size"], per_process)
    return rows, per_process // rows


def compile_wanted(cfg, device_type):
    """--compile / --no-compile as typed; by default on CUDA only."""
    return cfg["compile"] if cfg.get("compile") is not None else device_type == "cuda"


def setup_compile(cfg, model, step_module, device, autocast, step, evaluation_losses):
    """Count the FLOPs per token (for MFU) eagerly, then compile the model in place (CUDA default) and warm it
    up with a training and an evaluation step (evaluation_losses(x, y, loss_mask, key_mask): the trainer's).
    Returns (flops_per_token or None, the device's peak FLOP/s or None, whether CUDA graphs run, info for
    config.json, a line to print or None); if compiling fails the model is left eager and the line says so."""
    # On by default on CUDA: on an H100 it halves the rtx3080 step (the head's elementwise work, fused per chunk)
    # for about a minute of compiling (bench/gpu_profile.py, docs/gpu_h100_2026-11-27/). Off elsewhere: on a
    # CPU the compile costs more than a small run saves.
    compile_on = compile_wanted(cfg, str(device).split(":")[0])
    mode = cfg.get("compile_mode") or "default"
    peak, flops_per_token = device_peak_flops(device), None
    if peak:
        x = torch.zeros(1, cfg["seq_len"], dtype=torch.long, device=device)
        with no_side_effects(model, device):
            flops_per_token = count_flops_per_token(step_module, x, x, autocast)
    info = dict(compiled=False, compile_mode=None, flops_per_token=flops_per_token, peak_flops=peak)
    if not compile_on:
        return flops_per_token, peak, False, info, None
    compile_model(model, mode)
    B, T = cfg["micro_batch_size"], cfg["seq_len"]
    t0 = time.perf_counter()
    try:
        with no_side_effects(model, device):
            probe_step(step_module, autocast, B, T, device, step)
            with torch.no_grad(), autocast:
                x = torch.zeros(B, T, dtype=torch.long, device=device)
                evaluation_losses(x, x, None, None)
    except Exception as e:  # noqa: BLE001 - any failure of the compiler: say it in one line, go on eager
        uncompile_model(model)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return flops_per_token, peak, False, info, (f"torch.compile failed ({type(e).__name__}: {first}); training "
                                                    f"without it (--no-compile skips the attempt)")
    info.update(compiled=True, compile_mode=mode, compile_s=round(time.perf_counter() - t0, 1))
    return flops_per_token, peak, mode in ("reduce-overhead", "max-autotune"), info, None


def compile_model(model, mode="default", backend="inductor", fullgraph=False):
    """torch.compile in place, by region: every transformer Block (the 12 blocks of a model share one
    compiled graph, so compiling takes seconds, not minutes, and a progressive_diverging stage switch adds
    one graph, not a whole model: its new blocks are deep copies, which carry their own compiled call) and
    one chunk of the head's cross-entropy (model.chunk_loss / model.chunk_token_losses: one graph per chunk
    shape, so that memory stays one chunk's, as eager). What runs between them (embeddings, conv_attention's
    reshapes, the chunk loop) stays eager."""
    from auto_regressive_model import chunk_loss_and_grads, chunk_token_losses
    from components import Block
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # widths x modes
    options = dict(backend=backend, dynamic=False, fullgraph=fullgraph)  # fullgraph: the tests forbid breaks
    if backend == "inductor":  # (the tests trace with backend="eager": seconds instead of minutes on a CPU)
        options["mode"] = None if mode == "default" else mode
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**options)
    # CUDA graphs pay where kernels are small and many: the blocks. A head chunk is a few large kernels (about
    # 0.5 ms a call at the rtx3080 preset, docs/gpu_notes.md), and a graph per call would copy its inputs into
    # static buffers each time: the chunks keep CUDA graphs off.
    chunk_options = {**options, "mode": CHUNK_MODES.get(options.get("mode"), options.get("mode"))}
    model.chunk_loss = torch.compile(chunk_loss_and_grads, **chunk_options)
    model.chunk_token_losses = torch.compile(chunk_token_losses, **chunk_options)


def uncompile_model(model):
    from components import Block
    for module in model.modules():
        if isinstance(module, Block):
            module._compiled_call_impl = None
    for name in ("chunk_loss", "chunk_token_losses"):
        model.__dict__.pop(name, None)


def begin_micro_step(runner):
    """Under CUDA graphs, a new micro-step may overwrite the previous one's outputs: say when one begins.
    runner: the trainer (or a bench's runner), whose cudagraphs says whether they run."""
    if getattr(runner, "cudagraphs", False):
        torch.compiler.cudagraph_mark_step_begin()


def to_floats(values):
    """{name: tensor or number} -> {name: float} with one device-to-host copy (one sync) for all tensors."""
    tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
        out.update(zip(tensors, stacked))
    return {k: out[k] for k in values}


def train_row_speed(flops_per_token, peak, device, tokens_per_s):
    """A train row's speed fields: mfu (where the device's peak is known) and, on CUDA, the most memory
    the run has held so far (what a smaller card would need)."""
    row = {}
    value = mfu(flops_per_token, tokens_per_s, peak)
    if value is not None:
        row["mfu"] = value
    if str(device).startswith("cuda"):
        row["peak_mem_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    return row


# ---- prefetch -----------------------------------------------------------------------------------

class Prefetcher:
    """A TokenDataLoader that reads one batch ahead: next_batch() returns the batch read (and, on CUDA,
    copied with non_blocking from pinned memory) during the previous call, so the copy overlaps the GPU's
    work. state_dict() is the position of the batch it will return next, so --resume is exact."""

    def __init__(self, loader):
        self.loader = loader
        self.ahead = None  # (loader state before the batch, the batch)

    def _read(self):
        state = self.loader.state_dict()
        return state, self.loader.next_batch()

    def next_batch(self):
        _, batch = self.ahead if self.ahead is not None else self._read()
        self.ahead = self._read()
        return batch

    def state_dict(self):
        return self.ahead[0] if self.ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state):
        self.ahead = None
        self.loader.load_state_dict(state)

    def __getattr__(self, name):  # vocab_size, tokens, bytes, ...: the loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def describe_speed(info):
    """The start-of-run line about compile and MFU (info: setup_compile's)."""
    parts = [f"compile {info['compile_mode']} ({info['compile_s']:.1f} s: a training and an evaluation step)"
             if info["compiled"] else "eager"]
    if info["flops_per_token"]:
        parts.append(f"{info['flops_per_token'] / 1e9:.3f} GFLOP/token, MFU against "
                     f"{info['peak_flops'] / 1e12:.0f} TFLOP/s bf16")
    return " | ".join(parts)
