"""One line that names the machine a benchmark ran on (every figure in the README names its machine)."""

import os
import platform

import torch


def describe(device="auto"):
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return f"GPU {torch.cuda.get_device_name()}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"
