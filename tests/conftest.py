"""Shared test setup: the repo on sys.path, the offline GPT-2 BPE files, and one small prepared dataset."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIKTOKEN_CACHE = REPO.parent / "shared" / "tiktoken-cache"
if TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
sys.path.insert(0, str(REPO))
# The test models are tiny: one OpenMP thread per process beats two fighting over 2 cores (and the
# subprocess tests run several processes at once). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Small enough to prepare in seconds, large enough for a few hundred tiny steps without wrapping much.
TINY_TOKENS = 400_000


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder with synthetic-math prepared for the byte tokenizer (shared by the training tests)."""
    from base_data_preparer import prepare
    d = tmp_path_factory.mktemp("data")
    prepare("synthetic-math", "bytes", data_dir=str(d), max_tokens=TINY_TOKENS, quiet=True)
    return d


def run_script(script, *args, env=None, timeout=300):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is faster
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_torchrun(script, *args, env=None, timeout=300):
    """Run a train script under torchrun with 2 CPU processes (gloo), as a user would; the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / script), *map(str, args)], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def train_args(data_dir, out_dir, *extra):
    return ["--preset", "tiny", "--data-dir", data_dir, "--max-tokens", TINY_TOKENS, "--out-dir", out_dir, *extra]
