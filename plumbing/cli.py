"""
Command-line checks shared by every script: bad input ends before any work with ONE line on stderr and exit 2.

    from plumbing.cli import ArgumentParser, positive_int, finite_float, probability, device, output_file
    p = ArgumentParser(description="...")           # argparse, but an error is one line (no usage block)
    p.add_argument("--steps", type=positive_int)      # 0, -1, "x" -> error: argument --steps: ...
    p.add_argument("--lr", type=learning_rate)        # nan, inf, 0, -1, 1e7 refused (0 < lr <= 1e6)
    p.add_argument("--threads", type=thread_count)    # 1 .. 4 x the CPUs of this machine
    p.add_argument("--device", type=device, default="auto")   # unusable here (no CUDA GPU) -> refused
    p.add_argument("--out", type=output_file)         # a folder, or under a file / read-only folder -> refused
    args = p.parse_args(argv)
    args.device = pick_device(args.device)            # "auto" -> cuda, mps or cpu

Each type is a plain function for argparse's type=: it returns the parsed value or raises
argparse.ArgumentTypeError, whose text argparse puts after "argument --flag: ". Checks that are not about
one flag raise UsageError (also one line, exit 2, via fail()). Every number must also fit what torch computes
with: whole numbers an int64, other numbers a float32 (1e39 would become inf there).
"""

import argparse
import math
import os
import sys

# Exit codes besides 0: bad input 2, a failed write 1, divergence 3, a signal 128 + its number.
EXIT_WRITE_FAILED, EXIT_DIVERGED = 1, 3
DEVICES = ("auto", "cpu", "cuda", "mps")  # plus cuda:N
# Every number must fit what torch computes with: whole numbers an int64, other numbers a float32.
INT64_MAX = 2 ** 63 - 1
FLOAT32_MAX = 3.4028234663852886e38
# Learning rates and weight decays: no model trains beyond this, and it keeps what the optimizers compute from
# them (lr / bias correction, lr x weight decay, Muon's per-matrix scale) far inside float32, which overflows
# (a RuntimeError inside the optimizer) near 1e38.
MAX_RATE = 1e6
# --threads: more threads than cores only slow torch down, and thousands fail to start (a crash, not an error).
THREADS_PER_CPU = 4


class UsageError(Exception):
    """Bad input found before any work; the message says what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line, 'error: ...', and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message, code=2):
    """Print one line to stderr and exit: for scripts' own checks at the start of main()."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# ---- numbers --------------------------------------------------------------------------------

def _int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if abs(value) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most 2**63 - 1)")
    return value


def _float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if abs(value) > FLOAT32_MAX:  # torch computes in float32: such a number becomes inf there
        raise argparse.ArgumentTypeError(f"{text} is beyond float32's range (at most 3.4e38)")
    return value


def positive_int(text):
    """A whole number >= 1 (steps, intervals, counts, sizes)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text):
    """A whole number >= 0 (warmup steps, a budget that may be zero)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed(text):
    """A random seed numpy accepts too: 0 <= seed < 2**32."""
    value = _int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"a seed must lie in 0 .. 2**32 - 1, got {value}")
    return value


def finite_float(text):
    """Any finite number (not nan, not inf)."""
    return _float(text)


def positive_float(text):
    """A finite number > 0 (learning rates, clipping norms, scales)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonnegative_float(text):
    """A finite number >= 0 (weight decay, a minimum learning rate, a temperature)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def learning_rate(text):
    """A learning rate: 0 < lr <= MAX_RATE (1e6)."""
    value = _float(text)
    if not 0 < value <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"must lie in (0, {MAX_RATE:g}], got {value:g} (no model trains at a larger "
                                         f"rate, and the optimizer's float32 arithmetic overflows near 1e38)")
    return value


def rate_or_zero(text):
    """A minimum learning rate or a weight decay: 0 <= value <= MAX_RATE (1e6)."""
    value = _float(text)
    if not 0 <= value <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"must lie in [0, {MAX_RATE:g}], got {value:g} (the optimizer multiplies it "
                                         f"by the learning rate in float32)")
    return value


def max_threads():
    """The most CPU threads --threads may ask for on this machine: THREADS_PER_CPU per CPU."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def thread_count(text):
    """--threads: 1 .. max_threads(); thousands of threads crash torch when they start."""
    value = _int(text)
    limit = max_threads()
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(f"must lie in 1 .. {limit} ({THREADS_PER_CPU} x the {os.cpu_count() or 1} "
                                         f"CPUs of this machine; more only slow torch down, thousands crash it), "
                                         f"got {value}")
    return value


def probability(text):
    """A probability: 0 <= p <= 1."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value:g}")
    return value


def open_fraction(text):
    """A fraction strictly between 0 and 1 (e.g. a mask rate: neither nothing nor everything)."""
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value:g}")
    return value


def count(text):
    """A positive token count with an optional unit: '100M', '2.5k', '1e6', '1000000' -> int."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 1000000, 1e6, 100M)") from None
    if not math.isfinite(value) or value != int(value) or value < 1 or value > INT64_MAX:
        raise argparse.ArgumentTypeError(f"not a positive whole count (at most 2**63 - 1): {text!r}")
    return int(value)


def data_spec(text):
    """--data: json:PATH and text:PATH with the path made absolute (config.json records it, and --resume or
    evaluate.py may run from another folder); the other sources as given."""
    kind, sep, path = text.partition(":")
    if sep and kind in ("json", "text") and path:
        return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"
    return text


def window(text):
    """'start:stop', fractions with 0 <= start < stop <= 1 (a part of training); returned as given."""
    try:
        start, stop = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected start:stop such as 0.5:1, got {text!r}") from None
    if not 0.0 <= start < stop <= 1.0:
        raise argparse.ArgumentTypeError(f"need 0 <= start < stop <= 1, got {text!r}")
    return text


# ---- devices --------------------------------------------------------------------------------

def device_problem(name):
    """None if torch can use device `name` here, else what is wrong and what to do."""
    import torch  # late: scripts that never touch a device need not pay for it in their argument checks
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        return f"unknown device {name!r}; use one of auto, cpu, cuda, cuda:N, mps"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU here; use --device cpu (or auto)"
        if index and int(index) >= torch.cuda.device_count():
            return f"there are only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0 ..)"
    if kind == "mps" and not torch.backends.mps.is_available():
        return "this torch has no MPS support here; use --device cpu (or auto)"
    return None


def device(text):
    """argparse type: auto, cpu, cuda, cuda:N or mps, and usable on this machine. Returns the name as given
    (a run's config keeps "auto"); pick_device() turns it into the device to use."""
    if text == "auto":
        return text
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def pick_device(name="auto"):
    """The torch device string to use for --device `name`: auto -> cuda if available, else mps, else cpu.
    Raises UsageError if this machine cannot use it."""
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    problem = device_problem(name)
    if problem:
        raise UsageError(f"--device {name}: {problem}")
    return name


# ---- paths we will write --------------------------------------------------------------------

def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def writable_dir_problem(path):
    """None if `path` is, or can be created as, a folder we may write into; else what is wrong."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder; choose another path"
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        return f"{path} cannot be created: {base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable; choose a folder you may write to"
    return None


def output_dir(text):
    """argparse type: a folder that exists or can be created, and is writable (checked before any work)."""
    problem = writable_dir_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_file(text):
    """argparse type: a file path whose folder exists or can be created and is writable, and that is not a
    folder itself: so that a result is not lost at the end of long work. (Whether an existing file may be
    replaced is the script's own rule, e.g. --overwrite.)"""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    problem = writable_dir_problem(os.path.dirname(os.path.abspath(text)))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text

def micro_batch_arg(text):
    """argparse type of --micro-batch-size: a positive integer or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value
