"""
What the trainer tells the user, kept out of BaseTrainer: `--help` with every preset's defaults and every
choice, how many CPU threads torch uses, the ETA, and a hint when the GPU preset starts on a CPU.
"""

import dataclasses
import inspect
import os
import re
import statistics

import torch

import models

# --preset tiny on a CPU without OMP_NUM_THREADS or --threads: one thread per free core, at most this many.
# Tiny matmuls (128 wide) gain little from more threads; measured on 2 cores only (README, "Set up and run").
TINY_MAX_THREADS = 4


# ---- --help ---------------------------------------------------------------------------------

def format_value(value):
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()  # as the flag takes it: --qk-norm true
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def per_preset(values):
    """{preset: value} -> 'default X' when every preset agrees, else 'rtx3080: X, tiny: Y'."""
    shown = {p: format_value(v) for p, v in values.items()}
    if len(set(shown.values())) == 1:
        return f"default {next(iter(shown.values()))}"
    return ", ".join(f"{p}: {v}" for p, v in shown.items())


def config_comments(config_class):
    """{field: the comment after it in the Config dataclass's source}: the model file documents its options."""
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def option_choices(model_name):
    """{field: allowed values} of the model's Config: the shared CHOICES (models/__init__.py) it has, plus the
    model file's own CHOICES (e.g. dual_mask_gpt's bw_mode)."""
    module = models.model_module(model_name)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    shared = {k: v for k, v in models.CHOICES.items() if k in fields}
    return {**shared, **getattr(module, "CHOICES", {})}


def without_choices(comment, choices):
    """A Config comment without the list of choices it starts with (--help shows them as {a,b,c}); a note on
    the last choice is kept: 'layer | rms (nn.RMSNorm)' -> 'rms: nn.RMSNorm', 'tied | clap | clap-cosine' -> ''.
    Choices are matched whole, hyphens included."""
    names = "|".join(re.escape(c) for c in sorted(map(str, choices), key=len, reverse=True))
    m = re.fullmatch(rf"((?:{names})(?: \| (?:{names}))*)\s*(?:\((.*)\))?", comment)
    if not m:
        return comment
    return f"{m.group(1).split(' | ')[-1]}: {m.group(2)}" if m.group(2) else ""


def states_default(help_text, value):
    """True when an option's own help already says its default: 'X (default)', '(default)' or 'default X'."""
    return "(default)" in help_text or re.search(rf"\bdefault:? {re.escape(value)}(?![\w.])", help_text) is not None


def describe_options(parser, model_name, presets, defaults_of):
    """Append each option's default per preset to its help: trainer options from defaults_of(preset) (the
    resolved trainer settings), model options from the model's Config and PRESETS. Model options also get
    their comment from the Config's source and their choices. A default shows once: not where the help
    already says it, and not for a switch that is off (False or None: the help says what it does)."""
    trainer = {p: defaults_of(p) for p in presets}
    configs = {p: models.model_config(model_name, p) for p in presets}
    module = models.model_module(model_name)
    comments = config_comments(module.Config)
    choices = option_choices(model_name)
    for action in parser._actions:
        if action.dest.startswith("model."):
            name = action.dest[len("model."):]
            values = {p: getattr(c, name) for p, c in configs.items()}
            text = comments.get(name, "")
            if name in choices:
                action.metavar = "{" + ",".join(choices[name]) + "}"
                text = without_choices(text, choices[name])
            elif isinstance(values[presets[0]], bool):
                action.metavar = "{true,false}"
            else:
                action.metavar = name.upper()
            text = text.replace("%", "%%")  # argparse formats help with %
            action.help = f"{text}; {per_preset(values)}" if text else per_preset(values)
        elif action.dest in trainer[presets[0]] and action.nargs != 0 and action.dest != "preset":
            values = {p: trainer[p][action.dest] for p in presets}
            if all(v is None or v is False for v in values.values()):  # no default to show
                continue
            shown = per_preset(values)
            if action.help and shown.startswith("default ") and states_default(action.help, shown[len("default "):]):
                continue
            action.help = f"{action.help}; {shown}" if action.help else shown


# ---- CPU threads --------------------------------------------------------------------------------

def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tiny_preset_threads(cores, load, world_size=1):
    """Threads per process for the tiny preset. When the machine is busy (load average within half a core of
    the core count) 1 thread: OpenMP threads wait for each other, so while another job holds a core 2 threads
    ran the tiny preset 4.7-5x slower than 1 on the 2-core box (README, "Set up and run"). Otherwise the cores
    shared by this run's processes, at most TINY_MAX_THREADS (2 threads won at load 1.3 on 2 cores)."""
    if load >= cores - 0.5:
        return 1
    return max(1, min(TINY_MAX_THREADS, cores // world_size))


def set_cpu_threads(cfg, device_type, world_size=1):
    """torch.set_num_threads per --threads, else (tiny preset on a CPU, no OMP_NUM_THREADS) per the load;
    returns a line saying what was chosen, or None when torch keeps its default."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
        return f"cpu threads: {cfg['threads']} (--threads)"
    if "OMP_NUM_THREADS" in os.environ or device_type != "cpu" or cfg.get("preset") != "tiny":
        return None
    cores, load = usable_cores(), os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n = tiny_preset_threads(cores, load, world_size)
    torch.set_num_threads(n)
    return (f"cpu threads: {n} (load average {load:.1f} on {cores} cores; --threads N or OMP_NUM_THREADS=N "
            f"to choose)")


def set_threads_if_busy(device_type):
    """For a tool that runs a model on a CPU (evaluate.py): 1 torch thread when the machine is busy, by the
    tiny preset's rule (OpenMP threads wait for each other while another job holds a core: evaluate.py on the
    tiny run took 12-17x longer with 2 threads than with 1 at load 4-8 on 2 cores, docs/evaluation.md);
    otherwise torch's default. OMP_NUM_THREADS wins. Returns a line saying what was chosen, or None."""
    if "OMP_NUM_THREADS" in os.environ or device_type != "cpu":
        return None
    cores, load = usable_cores(), os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if tiny_preset_threads(cores, load) != 1 or torch.get_num_threads() == 1:
        return None
    torch.set_num_threads(1)
    return f"cpu threads: 1 (load average {load:.1f} on {cores} cores; OMP_NUM_THREADS=N to choose)"


# ---- time -------------------------------------------------------------------------------------

def eta_seconds(step_ms, steps_left):
    """Seconds left: steps_left x the median of the last 20 step times. The first step of the process is left
    out once there are others (it warms caches; with --compile it compiles, which can take a minute); the
    median ignores an odd slow step (a recompile at a stage switch)."""
    recent = (step_ms[1:] if len(step_ms) > 1 else step_ms)[-20:]
    return steps_left * statistics.median(recent) / 1000


def format_duration(seconds):
    seconds = int(seconds)
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds % 60:02d}s"


def gpu_preset_on_cpu(cfg, device_type):
    return device_type == "cpu" and cfg.get("preset") == "rtx3080"


def gpu_preset_note(cfg, device_type):
    """Said before anything else runs: what the default preset costs on a CPU."""
    if not gpu_preset_on_cpu(cfg, device_type):
        return None
    return (f"note: this is --preset rtx3080 (the default, sized for a GPU: {cfg['max_steps']} steps x "
            f"{cfg['total_batch_size']:,} tokens) on a CPU: at the preset's sizes, hours to days; --preset tiny "
            f"trains a small model in minutes. An estimate follows the first step.")


def gpu_preset_estimate(cfg, device_type, step_ms, eta):
    """Said once, after the first step: the rest of the run's time at this speed."""
    if not gpu_preset_on_cpu(cfg, device_type):
        return None
    return (f"note: {step_ms / 1000:.0f} s per step: the rest of this run takes about {format_duration(eta)} on "
            f"this CPU; Ctrl-C saves and stops; --preset tiny is the CPU preset")
