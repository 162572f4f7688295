"""Nothing destroyed: --overwrite leaves the old run byte for byte until the new run has made its first step,
deletes only files a training run wrote, and every numeric flag of the trainers has a range at the command
line (one line, exit 2). Tiny models; the refusals run in-process and take well under a second each."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, train_args
from models import MODELS

SHAPE = ("--micro-batch-size", 2, "--seq-len", 32, "--total-batch-size", 128, "--eval-batches", 2)
SMALL = ("--n-layer", 1, "--n-head", 2, "--n-embd", 32, *SHAPE)
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json")


def files(run_dir):
    return {name: (run_dir / name).read_bytes() for name in RUN_FILES if (run_dir / name).exists()}


def one_line(err, code, expected_code, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def train(model, argv):
    """train_<model>.py in-process: the exit code (argparse's refusals raise SystemExit(2))."""
    import base_trainer
    try:
        return base_trainer.run(base_trainer.BaseTrainer,
                                lambda a: (model, *base_trainer.resolve_config(model, a)), list(map(str, argv)))
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert train("baseline_gpt2", train_args(data_dir, out, "--max-steps", 2, "--eval-interval", 2, *SMALL)) == 0
    return out


def copy_run(run, to):
    shutil.copytree(run, to)
    return to


# (model, flags after --overwrite, a word the one line must hold): every one was accepted and failed only once
# the model ran (ValueError, ZeroDivisionError, a segfault, an optimizer RuntimeError, gigabytes of memory)
BAD_AFTER_OVERWRITE = [
    ("baseline_gpt2", ["--n-embd", "0"], "--n-embd"),
    ("baseline_gpt2", ["--n-head", "0"], "--n-head"),
    ("baseline_gpt2", ["--n-layer", "-1"], "--n-layer"),
    ("baseline_gpt2", ["--n-embd", "2000000"], "parameters"),       # ~16 TB of training state: refused, not built
    ("conv_attention", ["--n-levels", "10"], "n_levels"),           # padded to 4**10 positions, 32768 wide
    ("conv_attention", ["--n-levels", "0"], "--n-levels"),
    ("dual_mask_gpt", ["--bw-seed", "-1"], "--bw-seed"),            # as --seed -1
    ("progressive_diverging", ["--n-layer", "4", "--lora-rank", "100000"], "lora_rank"),
    ("baseline_gpt2", ["--threads", "100000"], "CPUs"),              # 5000 crashed torch: a segfault
    ("baseline_gpt2", ["--lr", "1e39"], "--lr"),
    ("baseline_gpt2", ["--lr", "1e38"], "--lr"),                    # fits float32, but lr / bias correction not
    ("baseline_gpt2", ["--optimizer", "muon", "--muon-lr", "1e300"], "--muon-lr"),
    ("baseline_gpt2", ["--weight-decay", "1e30"], "--weight-decay"),  # lr x weight decay overflows
    ("baseline_gpt2", ["--grad-clip", "1e39"], "--grad-clip"),
    ("baseline_gpt2", ["--total-batch-size", str(2 ** 64)], "--total-batch-size"),
    ("baseline_gpt2", ["--resume", "auto"], "--overwrite"),         # ignored --overwrite silently
    ("baseline_gpt2", ["--resume"], "--overwrite"),
]


def test_overwrite_with_a_bad_value_is_one_line_and_leaves_the_old_run(finished_run, data_dir, capsys):
    before = files(finished_run)
    assert set(before) == set(RUN_FILES)
    failures = []
    for model, bad, word in BAD_AFTER_OVERWRITE:
        shape = SHAPE if model != "baseline_gpt2" else SMALL
        argv = train_args(data_dir, finished_run, "--max-steps", 2, *shape, "--overwrite", *bad)
        capsys.readouterr()
        try:
            code = train(model, argv)
        except Exception as e:  # noqa: BLE001 - a traceback is one of the failures this test lists
            code = repr(e)[:200]
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 2 or len(lines) != 1 or word not in lines[0] or files(finished_run) != before:
            failures.append(f"{model} {bad}: exit {code}, stderr {err[-300:]!r}, files kept: "
                            f"{files(finished_run) == before}")
    assert not failures, "\n".join(failures)


def test_a_model_that_cannot_be_built_stops_before_the_data_are_prepared(tmp_path, capsys):
    """conv_attention --n-levels 10 into a --data-dir that does not exist yet: the model's own check refuses it
    before the dataset is prepared (it was prepared first: seconds of work and a folder of shards for nothing)."""
    data = tmp_path / "data"
    argv = ["--preset", "tiny", "--max-steps", 2, "--max-tokens", "50k", "--data-dir", data,
            "--out-dir", tmp_path / "run", "--n-levels", 10]
    code = train("conv_attention", argv)
    one_line(capsys.readouterr().err, code, 2, "n_levels")
    assert not data.exists() and not (tmp_path / "run").exists()


# Stands in for anything that kills the process in the new run's first step (the segfault of too many threads,
# an out-of-memory kill): the first optimizer step dies with SIGSEGV.
CRASH_IN_FIRST_STEP = """
import os, runpy, signal, sys, torch
def crash(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSEGV)
torch.optim.AdamW.step = crash
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_new_run_that_fails_in_its_first_step_leaves_the_old_run(finished_run, data_dir, tmp_path, capsys,
                                                                    monkeypatch):
    """Validation cannot foresee everything that fails only when the model first runs; such a failure (a crash,
    or a non-finite first step) must leave the run being overwritten byte for byte, and say so."""
    run = copy_run(finished_run, tmp_path / "run")
    before = files(run)
    args = train_args(data_dir, run, "--max-steps", 2, *SMALL, "--overwrite")
    crashed = subprocess.run([sys.executable, "-c", CRASH_IN_FIRST_STEP, str(REPO / "train_baseline_gpt2.py"),
                              *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert crashed.returncode == -11, crashed.stderr[-2000:]
    assert files(run) == before
    from fault_run import plant
    plant("nan_loss:0", monkeypatch.setattr)
    capsys.readouterr()
    code = train("baseline_gpt2", args)
    line = one_line(capsys.readouterr().err, code, 3, "step 0", "as it was")
    assert files(run) == before, line
    # the same command without the fault replaces the old run: its own rows only, from step 0
    monkeypatch.undo()
    assert train("baseline_gpt2", args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(0, "val"), (0, "train"), (1, "train"), (2, "val"),
                                                       (2, "test")]
    assert files(run)["checkpoint.pt"] != before["checkpoint.pt"]


def test_a_run_replaces_only_files_a_training_run_wrote(finished_run, data_dir, tmp_path, capsys):
    """A new run used to delete metrics.jsonl and config.json whenever there was no checkpoint.pt beside them
    (without --overwrite), and --overwrite deleted any file of those names: e.g. a Hugging Face export's
    config.json, or the weights-only checkpoint convert_hf.py from-hf writes."""
    hf = tmp_path / "hf_export"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    full = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    weights = tmp_path / "weights_only"
    weights.mkdir()
    torch.save({k: full[k] for k in ("format", "model_name", "model_config", "model_state", "model_extra_state",
                                     "config")}, weights / "checkpoint.pt")
    for folder, extra in [(hf, []), (hf, ["--overwrite"]), (weights, ["--overwrite"])]:
        before = files(folder)
        capsys.readouterr()
        code = train("baseline_gpt2", train_args(data_dir, folder, "--max-steps", 1, *SMALL, *extra))
        one_line(capsys.readouterr().err, code, 2, "no training run wrote", "--out-dir")
        assert files(folder) == before and set(os.listdir(folder)) <= set(RUN_FILES) | {".lock"}

    # what a run killed before its first checkpoint leaves: kept unless --overwrite (or --resume auto, which
    # restarts its own attempt)
    attempt = tmp_path / "attempt"
    attempt.mkdir()
    for name in ("metrics.jsonl", "config.json"):
        shutil.copy(finished_run / name, attempt / name)
    before = files(attempt)
    capsys.readouterr()
    code = train("baseline_gpt2", train_args(data_dir, attempt, "--max-steps", 1, *SMALL))
    one_line(capsys.readouterr().err, code, 2, "saved no checkpoint", "--overwrite")
    assert files(attempt) == before
    assert train("baseline_gpt2", train_args(data_dir, attempt, "--max-steps", 1, *SMALL, "--resume", "auto")) == 0
    rows = [json.loads(line) for line in (attempt / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(0, "val"), (0, "train"), (1, "val"), (1, "test")]


def test_resuming_a_checkpoint_with_nonfinite_weights_is_refused(finished_run, data_dir, tmp_path, capsys):
    """It trained one step and stopped calling the NaN checkpoint "the last good checkpoint"."""
    run = copy_run(finished_run, tmp_path / "nan")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["model_state"]["wte.weight"][0, 0] = float("nan")
    ckpt["finished"] = False
    torch.save(ckpt, run / "checkpoint.pt")
    before = files(run)
    code = train("baseline_gpt2", train_args(data_dir, run, "--resume", "--max-steps", 4))
    line = one_line(capsys.readouterr().err, code, 2, "non-finite", "--overwrite")
    assert "good" not in line and files(run) == before


def test_a_failed_write_says_resume_only_when_there_is_a_checkpoint(tmp_path, monkeypatch):
    import errno

    from plumbing import run_folder

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(run_folder.WriteError) as fresh:
        run_folder.atomic_write(str(tmp_path / "config.json"), b"{}")
    assert "--resume" not in str(fresh.value) and "intact" not in str(fresh.value)
    assert "nothing was written" in str(fresh.value) and "--overwrite" in str(fresh.value)
    monkeypatch.undo()
    (tmp_path / "checkpoint.pt").write_bytes(b"old")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(run_folder.WriteError) as later:
        run_folder.atomic_write(str(tmp_path / "checkpoint.pt"), b"new")
    assert "the previous file is intact" in str(later.value) and "--resume" in str(later.value)


@pytest.mark.parametrize("name", list(MODELS))
def test_sizes_below_one_are_a_config_error_in_every_model(name):
    """n_head 0 was a ZeroDivisionError in the size check, n_embd 0 a model of 0 parameters."""
    from models import ModelConfigError, create_model
    for size in ("n_head", "n_embd"):
        with pytest.raises(ModelConfigError, match=size):
            create_model(name, preset="tiny", **{size: 0})


def test_every_numeric_trainer_flag_has_a_range():
    """Every numeric option of every trainer's parser (train_<model>.py, finetune.py, train_mntp.py) refuses a
    negative value and one beyond float32 at parse time: none is a bare int or float."""
    import argparse

    import train_mntp
    from plumbing.trainer_config import build_parser
    parsers = [build_parser(name) for name in MODELS]
    mntp = train_mntp.build_parser("mntp", "mntp", 8)
    mntp.add_argument("--mask-rate", type=train_mntp.cli.open_fraction)  # as train_mntp.resolve adds it
    parsers += [train_mntp.build_parser(), mntp]
    accepted = []
    for p in parsers:
        for action in p._actions:
            if action.type in (None, str) or action.dest in ("data", "out_dir", "device"):
                continue  # not numbers (--data, --out-dir and --device have their own checks)
            for value in ("-1", "1e39"):
                try:
                    action.type(value)
                    accepted.append(f"{'/'.join(action.option_strings)} accepts {value}")
                except (argparse.ArgumentTypeError, ValueError):
                    pass
    assert not accepted, "\n".join(sorted(set(accepted)))
