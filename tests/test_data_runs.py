"""Prepared data and the runs that use it: a complete dataset is never changed by another command,
a run notices when the data under it changed, and Ctrl-C during a preparation ends at once and cleanly."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script
from test_train import SMALL, assert_one_line_error, losses, metrics

PREPARER = [sys.executable, str(REPO / "base_data_preparer.py")]


def snapshot(folder: Path):
    """Name -> (size, mtime_ns) of every file in a folder: any change, removal or rebuild shows."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def train_args(data_dir, out_dir, budget, *extra):
    return [str(a) for a in ("--preset", "tiny", "--data-dir", data_dir, "--max-tokens", budget, "--out-dir", out_dir,
                             "--max-steps", 20, "--eval-interval", 10, "--checkpoint-interval", 10, *SMALL, *extra)]


def test_another_budget_gets_another_folder_and_the_first_run_resumes_exactly(tmp_path, capsys):
    import base_data_preparer as bdp
    from base_trainer import BaseTrainer, resolve_config
    data, run = tmp_path / "data", tmp_path / "run"
    killed = run_script("tests/fault_run.py", "kill_after_step:15", "train_baseline_gpt2.py",
                        *train_args(data, run, 100_000))
    assert killed.returncode == -signal.SIGKILL  # after step 15; its checkpoint is from step 10
    config = json.loads((run / "config.json").read_text())
    assert config["max_tokens"] == 100_000 and len(config["data_hash"]) == 16  # the budget used, and the data
    first = data / "synthetic-math-100k__bytes"
    logged = losses(metrics(run), "train")  # steps 0..15, as an uninterrupted run logs them
    before = snapshot(first)
    # what several README commands do: the same source with another budget, into the same --data-dir
    other = bdp.prepare("synthetic-math", "bytes", data, max_tokens=120_000, num_workers=2, quiet=True)
    assert other == data / "synthetic-math-120k__bytes"
    assert snapshot(first) == before  # the first dataset untouched
    cfg, typed = resolve_config("baseline_gpt2", train_args(data, run, 100_000, "--resume"))
    assert BaseTrainer("baseline_gpt2", cfg, typed).train() == 0  # as train_baseline_gpt2.py --resume does
    assert "resuming at step 10" in capsys.readouterr().out
    again = losses(metrics(run), "train")
    assert [s for s, _ in again] == list(range(20))
    assert again[10:len(logged)] == logged[10:] and len(logged) > 11  # steps 10.. once more, bit for bit


def jsonl(path: Path, n: int):
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i % 7}?", "answer": f"#### {i + i % 7}"}) + "\n"
                            for i in range(n)), encoding="utf-8")


def test_changed_data_under_a_run_is_refused_in_one_line(tmp_path):
    import base_data_preparer as bdp
    from data_file_utils import DataError
    from dual_mask.layer_cuts import validation_batches
    from test_answer_loss import trainer
    src, data, run = tmp_path / "qa.jsonl", tmp_path / "data", tmp_path / "run"
    jsonl(src, 3000)
    spec = f"json:{src}"
    assert trainer(data, run, "--data", spec, "--max-steps", 2, "--eval-interval", 2, max_tokens=None).train() == 0
    config = json.loads((run / "config.json").read_text())
    folder = Path(config["dataset_dir"])
    assert config["max_tokens"] is None  # json: the whole file

    jsonl(src, 3100)  # the source changes; preparing it again must not touch the complete dataset
    before = snapshot(folder)
    with pytest.raises(DataError, match=r"changed since.*--replace") as refusal:
        bdp.prepare(spec, "bytes", data, quiet=True)
    assert "\n" not in str(refusal.value) and snapshot(folder) == before
    assert validation_batches(config, n_batches=1)  # the run's data as it was: accepted

    bdp.prepare(spec, "bytes", data, quiet=True, replace=True)  # the explicit way: the data under the run differ
    resumed = run_script("train_baseline_gpt2.py", "--out-dir", run, "--resume", "--max-steps", 4)
    assert_one_line_error(resumed, "data under this run changed", config["data_hash"])
    evaluated = run_script("evaluate.py", "--checkpoint", run / "checkpoint.pt", "--eval-batches", 2)
    assert_one_line_error(evaluated, "data under this run changed", config["data_hash"])
    with pytest.raises(DataError, match="data under this run changed"):
        validation_batches(config, n_batches=1)


def test_a_relative_json_path_is_recorded_absolute_so_the_run_resumes_from_anywhere(tmp_path, monkeypatch):
    """config.json kept `--data json:qa.jsonl` as typed: --resume (or evaluate.py) from another folder said
    "no such file". The path is made absolute when parsed; typing it again, relative, is the same data."""
    from base_trainer import BaseTrainer, resolve_config
    (tmp_path / "here").mkdir()
    jsonl(tmp_path / "here" / "qa.jsonl", 3000)
    data, run = tmp_path / "data", tmp_path / "run"
    monkeypatch.chdir(tmp_path / "here")
    cfg, typed = resolve_config("baseline_gpt2", train_args(data, run, 100_000, "--data", "json:qa.jsonl",
                                                            "--max-steps", 2, "--eval-interval", 2))
    assert BaseTrainer("baseline_gpt2", cfg, typed).train() == 0
    assert json.loads((run / "config.json").read_text())["data"] == f"json:{tmp_path / 'here' / 'qa.jsonl'}"
    cfg, typed = resolve_config("baseline_gpt2", train_args(data, run, 100_000, "--data", "json:qa.jsonl",
                                                            "--max-steps", 3, "--eval-interval", 2, "--resume"))
    assert BaseTrainer("baseline_gpt2", cfg, typed).train() == 0  # typed again, relative: the same data
    monkeypatch.chdir(tmp_path)
    cfg, typed = resolve_config("baseline_gpt2", ["--out-dir", str(run), "--resume", "--max-steps", "4"])
    assert BaseTrainer("baseline_gpt2", cfg, typed).train() == 0  # from another folder
    assert [s for s, _ in losses(metrics(run), "train")] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- Ctrl-C

def live_processes_in_group(pgid: int):
    """Processes of a process group that have not exited (zombies have, whoever reaps them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def interrupt(cmd, folder: Path, delay: float):
    """Start cmd in its own process group, wait until `folder` exists (the preparation has begun), wait
    `delay` s, send SIGINT to the whole group as a terminal's Ctrl-C does.
    Returns (exit code, stderr, seconds until the first stderr line, seconds until every process is gone)."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines, first_line_at = [], []

    def read():  # stderr as it comes: EOF once every process holding it (workers too) has ended
        for line in proc.stderr:
            if not first_line_at:
                first_line_at.append(time.time())
            lines.append(line)
    try:
        deadline = time.time() + 120
        while not folder.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(delay)
        reader = threading.Thread(target=read)
        reader.start()
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        # Bounds: the reaction (the one line) within 10 s; the exit, with torch's slow interpreter teardown on a
        # busy shared machine, within 60 s. A hang (what Pool.terminate() did) fails either way.
        reader.join(timeout=60)
        proc.wait(timeout=5)
        while live_processes_in_group(proc.pid) and time.time() - t0 < 60:
            time.sleep(0.05)
        return proc.returncode, "".join(lines), first_line_at[0] - t0 if first_line_at else None, time.time() - t0
    finally:
        if proc.poll() is None or live_processes_in_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_stopped_at_once(code, stderr, reaction, gone):
    assert code == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in stderr, stderr
    assert reaction is not None and reaction < 10 and gone < 60, (reaction, gone)


@pytest.mark.skipif(sys.platform != "linux", reason="reads process groups from /proc")
def test_ctrl_c_during_preparation_ends_at_once_and_the_next_run_starts_clean(tmp_path):
    # 40M tokens: several seconds even on a quiet machine (5M took 0.7 s, done before the 1.0 s Ctrl-C)
    for i, delay in enumerate((0.0, 0.4, 1.0)):  # while the workers start, and while they work
        folder = tmp_path / str(i) / "synthetic-math-40M__bytes"
        cmd = [*PREPARER, "--data", "synthetic-math", "--tokenizer", "bytes", "--data-dir", folder.parent,
               "--max-tokens", "40M", "--num-workers", 2]
        assert_stopped_at_once(*interrupt(cmd, folder, delay))
        assert not (folder / "manifest.json").exists()
    again = subprocess.run([str(c) for c in cmd] + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (folder / "manifest.json").is_file() and not [p for p in folder.iterdir() if ".tmp" in p.name]


@pytest.mark.skipif(sys.platform != "linux", reason="reads process groups from /proc")
def test_ctrl_c_during_the_first_training_runs_preparation(tmp_path):
    """The README's first command prepares synthetic-math (10M tokens) before it trains."""
    data = tmp_path / "data"
    cmd = [sys.executable, REPO / "train_baseline_gpt2.py", "--preset", "tiny", "--data-dir", data,
           "--out-dir", tmp_path / "run"]
    assert_stopped_at_once(*interrupt(cmd, data / "synthetic-math-10M__bytes", 0.5))
