"""A newcomer's first hour (issue 16): --help tells defaults and choices, outputs land under runs/ (ignored by
git), CPU threads and the ETA are sensible, the GPU preset on a CPU says so, embed.py's memory stays flat."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_TOKENS


# ---- --help ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["baseline_gpt2", "conv_attention", "progressive_diverging", "dual_mask_gpt"])
def test_help_shows_each_presets_default_and_every_choice(model):
    from base_trainer import build_parser
    from models import model_config
    text = " ".join(build_parser(model).format_help().split())   # argparse wraps lines
    assert "see models/" not in text
    assert "default rtx3080" in text                                 # which preset is the default
    assert "--lr LR rtx3080: 0.0006, tiny: 0.003" in text
    assert "--pos {learned,sinusoidal,alibi,none,rope}" in text and "--head {tied,clap,clap-cosine}" in text
    tiny, big = model_config(model, "tiny"), model_config(model, "rtx3080")
    assert f"rtx3080: {big.n_embd}, tiny: {tiny.n_embd}" in text
    if model == "dual_mask_gpt":
        assert "--bw-mode {additional,exclusive}" in text and "probability of the backward task" in text


# ---- outputs under runs/, ignored by git ----------------------------------------------------------

def test_readme_commands_leave_a_fresh_clone_clean(tmp_path):
    """Training, plotting and embedding with default paths in a copy of the repository (its tracked files only):
    everything they write goes under data/ and runs/, which .gitignore covers. Old code: loss.png, emb.npy."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    git = lambda *a: subprocess.run(["git", *a], cwd=clone, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")

    def run(*args):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, *map(str, args)], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    # The default preset (rtx3080) at toy sizes: on a CPU it says at once that --preset tiny is the CPU one.
    r = run("train_baseline_gpt2.py", "--data", "synthetic-math", "--tokenizer", "bytes", "--max-steps", 1,
            "--max-tokens", TINY_TOKENS, "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--total-batch-size", 2048,
            "--eval-batches", 1, "--device", "cpu")
    lines = r.stdout.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step"))
    assert any("--preset tiny" in line for line in lines[:first_step])          # before the first evaluation
    assert any("the rest of this run takes about" in line for line in lines)   # an estimate after step 0
    run("plot_loss.py")
    (clone / "runs" / "texts.txt").write_text("What is 2 + 3?\nHalf of 48 is 24.\n")
    run("embed.py", "--checkpoint", "runs/baseline_gpt2/checkpoint.pt", "--input", "runs/texts.txt")
    assert (clone / "runs" / "loss.png").is_file() and (clone / "runs" / "embeddings.npy").is_file()
    assert git("status", "--porcelain", "--untracked-files=all") == ""


# ---- threads, ETA, the GPU preset on a CPU, MPS random state ---------------------------------------

def test_tiny_preset_threads_follow_the_load(monkeypatch):
    from plumbing import trainer_console as tc
    assert tc.tiny_preset_threads(cores=2, load=0.1) == 2          # quiet: every core
    assert tc.tiny_preset_threads(cores=2, load=1.7) == 1          # busy: 1 thread
    assert tc.tiny_preset_threads(cores=16, load=0.0) == tc.TINY_MAX_THREADS
    assert tc.tiny_preset_threads(cores=2, load=0.0, world_size=2) == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert tc.set_cpu_threads({"preset": "rtx3080"}, "cpu") is None          # torch's default
        monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
        assert "cpu threads: 1" in tc.set_cpu_threads({"preset": "tiny"}, "cpu") and torch.get_num_threads() == 1
        assert "--threads" in tc.set_cpu_threads({"preset": "tiny", "threads": 2}, "cpu")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")                                # the user's choice wins
        assert tc.set_cpu_threads({"preset": "tiny"}, "cpu") is None
    finally:
        torch.set_num_threads(before)


def test_eta_leaves_out_the_first_step():
    from plumbing.trainer_console import eta_seconds
    compile_then_fast = [60_000.0] + [100.0] * 5                   # --compile: a minute, then 100 ms steps
    assert eta_seconds(compile_then_fast, 100) == 10.0             # old code: mean of all = 10,083 ms a step
    assert eta_seconds([250.0], 4) == 1.0                          # the only step there is
    assert eta_seconds([100.0] * 10 + [5000.0], 10) == 1.0         # one slow step (a recompile) does not count


def test_mps_random_state_is_saved_and_restored(monkeypatch):
    from base_trainer import BaseTrainer
    saved = {}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: saved.setdefault("mps", s))
    state = BaseTrainer.rng_state()
    assert torch.equal(state["mps"], torch.tensor([7], dtype=torch.uint8))
    BaseTrainer.set_rng_state(state)
    assert torch.equal(saved["mps"], state["mps"])


# ---- embed.py: memory flat in the number of texts -------------------------------------------------

MEASURE_EMBED = r"""
import resource, sys, torch
sys.path.insert(0, {repo!r})
import embed
code = embed.main(["--checkpoint", {ckpt!r}, "--input", {texts!r}, "--out", {out!r}, "--batch-size", "32"])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib_of_embed(tmp_path, n_texts, ckpt):
    texts = tmp_path / f"texts{n_texts}.txt"
    texts.write_text("".join(f"Question {i}: what is {i} + {i * 7 % 13}? " * 4 + "\n" for i in range(n_texts)))
    out = tmp_path / f"e{n_texts}.npy"
    script = MEASURE_EMBED.format(repo=str(REPO), ckpt=str(ckpt), texts=str(texts), out=str(out))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    code, peak = r.stdout.split()[-2:]
    assert code == "0", r.stderr[-2000:]
    import numpy as np
    assert np.load(out).shape[0] == n_texts
    return int(peak)


def test_embed_memory_does_not_grow_with_the_number_of_texts(tmp_path):
    """300 vs 3,000 texts of about 150 tokens with a 64-wide model: the old code kept every text's token
    features (150 x 64 floats = 38 KB a text), about 100 MB more for the larger input."""
    from test_embed import save
    from models import create_model
    torch.manual_seed(0)
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320, block_size=256, n_layer=1, n_head=2,
                         n_embd=64)
    ckpt = save(model, tmp_path / "m.pt")
    small, large = peak_kib_of_embed(tmp_path, 300, ckpt), peak_kib_of_embed(tmp_path, 3000, ckpt)
    assert large - small < 30_000, (small, large)     # KiB: well under the old code's growth
