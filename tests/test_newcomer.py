"""A newcomer's first hour: --help tells defaults and choices, outputs land under runs/ (ignored by
git), CPU threads and the ETA are sensible, the GPU preset on a CPU says so, embed.py's memory stays flat."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_TOKENS
from models import MODELS


# ---- --help ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(MODELS))
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


def help_blocks(text):
    """{option line: its help text, on one line} of an argparse --help printed without wrapping."""
    blocks, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current, _, rest = line.strip().partition("  ")
            blocks[current] = rest.strip()
        elif line.startswith("   ") and current:
            blocks[current] = (blocks[current] + " " + line.strip()).strip()
        else:
            current = None
    return blocks


def test_help_keeps_every_choice_whole_and_says_each_default_once():
    """`python train_baseline_gpt2.py --help`: the choices of a Config comment were cut at the first hyphen
    ('--head {tied,clap,clap-cosine} -cosine'), and options whose help says their default got it twice
    ('(default data/); default data', 'auto (default), cpu, ...; default auto', 'default False')."""
    from plumbing.trainer_config import TRAIN_PRESETS, build_parser, preset_defaults
    from plumbing.trainer_console import format_value, per_preset
    from models import model_config
    r = subprocess.run([sys.executable, "train_baseline_gpt2.py", "--help"], cwd=REPO, capture_output=True,
                       text=True, env=dict(os.environ, COLUMNS="1000"), timeout=120)
    assert r.returncode == 0, r.stderr
    blocks = help_blocks(r.stdout)
    parser = build_parser("baseline_gpt2")
    flags = {s for action in parser._actions for s in action.option_strings}
    presets = list(TRAIN_PRESETS)
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "preset"):
            continue
        key = next(k for k in blocks if k.split(",")[0].split()[0] == action.option_strings[0])
        text = blocks[key]
        if action.metavar and str(action.metavar).startswith("{"):
            assert key.endswith(" " + action.metavar), key
        for word in re.findall(r"(?<![\w-])-[\w-]+", text):   # a dash starts a flag, never a cut choice
            assert word in flags, (key, text)
        if action.dest.startswith("model."):
            values = {p: getattr(model_config("baseline_gpt2", p), action.dest[len("model."):]) for p in presets}
        else:
            values = {p: preset_defaults("baseline_gpt2", p).get(action.dest) for p in presets}
        if all(v is None or (v is False and not action.dest.startswith("model.")) for v in values.values()):
            assert "default false" not in text.lower() and "default none" not in text.lower(), (key, text)
            continue                                     # a switch that is off: the help says what it does
        shown = per_preset(values)
        if not shown.startswith("default "):              # per preset: 'rtx3080: 313, tiny: 200', once
            assert text.count(shown) == 1 and "(default)" not in text, (key, text)
        else:
            value = format_value(values[presets[0]])
            said = text.count("(default)") + len(re.findall(rf"\bdefault:? {re.escape(value)}(?![\w.])", text))
            assert said == 1, (key, text)
        checked += 1
    assert checked > 30


# ---- evaluate.py: what the answers cost ---------------------------------------------------------------

def test_generate_answers_counts_the_tokens_each_answer_cost():
    """A finished answer line stops a row (the rest is <|endoftext|> filling, not counted); an <|endoftext|> the
    model wrote counts; a row that never finishes costs --max-new-tokens."""
    from base_data_preparer import get_tokenizer
    from evaluate import generate_answers
    from test_evaluate import scripted_model
    enc = get_tokenizer("bytes")
    answer = " 2 + 3 = 5.\n#### 5\n"
    model, _ = scripted_model(enc, answer + "Question: what next?")
    assert generate_answers(model, enc, ["2 + 3?", "a longer one"], 500) == ([answer] * 2, [len(answer)] * 2)
    model, _ = scripted_model(enc, " 5<|endoftext|>")
    assert generate_answers(model, enc, ["2 + 3?"], 500) == ([" 5"], [3])             # " ", "5", <|endoftext|>
    model, _ = scripted_model(enc, " 5" * 20)
    assert generate_answers(model, enc, ["q"], 10)[1] == [10]


def test_evaluate_prints_its_time_and_tokens_per_problem(tmp_path, capsys):
    """200 problems took minutes under load with no word of why; now the command says what they cost."""
    import json

    import evaluate
    from models import create_model
    from test_embed import save
    torch.manual_seed(0)
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320, block_size=64, n_layer=1, n_head=2,
                         n_embd=32)
    ckpt, out = save(model, tmp_path / "m.pt"), tmp_path / "r.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--task", "synthetic-math", "--limit", "3", "--max-new-tokens",
                          "12", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    acc = json.loads(out.read_text())["accuracy"]
    lengths = [a["new_tokens"] for a in acc["answers"]]
    assert all(1 <= n <= 12 for n in lengths) and acc["max_new_tokens"] == 12 and acc["seconds"] > 0
    assert acc["new_tokens_mean"] == sum(lengths) / 3 and acc["reached_max_new_tokens"] == lengths.count(12)
    assert (f"3 problems in {acc['seconds']:.1f} s" in printed and f"{acc['new_tokens_mean']:.0f} tokens generated "
            f"per problem" in printed and f"{lengths.count(12)} of 3 used all --max-new-tokens (12)" in printed)


def test_a_busy_cpu_gets_one_thread_for_evaluation(monkeypatch):
    """OpenMP threads wait for each other while another job holds a core: evaluate.py, like --preset tiny, takes
    1 thread on a busy machine (2 threads were several times slower at load 4 on 2 cores)."""
    from plumbing import trainer_console as tc
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(tc, "usable_cores", lambda: 2)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
        torch.set_num_threads(2)
        assert tc.set_threads_if_busy("cpu") is None and torch.get_num_threads() == 2   # quiet: torch's default
        monkeypatch.setattr(os, "getloadavg", lambda: (4.0, 4.0, 4.0))
        assert tc.set_threads_if_busy("cuda") is None and torch.get_num_threads() == 2
        assert "cpu threads: 1 (load average 4.0" in tc.set_threads_if_busy("cpu") and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")                                      # the user's choice wins
        assert tc.set_threads_if_busy("cpu") is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


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
    from checkpoint import rng_state, set_rng_state
    saved = {}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: saved.setdefault("mps", s))
    state = rng_state()
    assert torch.equal(state["mps"], torch.tensor([7], dtype=torch.uint8))
    set_rng_state(state)
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
