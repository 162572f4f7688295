"""A run never loses, mixes or fakes its results: divergence, one writer per folder, --overwrite,
failed writes, signals, --resume auto. Tiny models, a few steps each."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script, run_torchrun, train_args

SMALL = ("--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--micro-batch-size", 2, "--seq-len", 32,
         "--total-batch-size", 128, "--eval-batches", 2)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_line_error(result, code, *words):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


def all_finite(state):
    return all(bool(t.isfinite().all()) for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def files(run_dir):
    return {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "config.json")}


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "finished"
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, "--max-steps", 4, "--eval-interval", 2,
                                                               "--checkpoint-interval", 2, *SMALL))
    assert result.returncode == 0, result.stderr
    return out


# ---- 1. divergence -----------------------------------------------------------------------------

def test_divergence_stops_before_the_step_and_keeps_a_finite_checkpoint(data_dir, tmp_path):
    out = tmp_path / "diverge"
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, "--lr", "1e6", "--warmup-steps", 1,
                                                               "--max-steps", 30, "--checkpoint-interval", 1, *SMALL))
    line = one_line_error(result, 3, "not finite" if "weights" in result.stderr else "step", "--lr")
    saved = checkpoint(out)
    assert all_finite(saved["model_state"]) and all_finite(saved["optimizer_state"]["state"][0])
    assert f"step {saved['step']}" in line or "no checkpoint" in line
    train_steps = [r["step"] for r in metrics(out) if r["split"] == "train"]
    assert train_steps and max(train_steps) < 29  # stopped early, not "done"


def test_a_nonfinite_step_is_skipped_or_stops_the_run(data_dir, tmp_path):
    """tests/fault_run.py nan_loss:5 makes the loss of step 5 NaN (once): by default the run stops there with the
    step-4 checkpoint kept; with --skip-nonfinite 1 that step is skipped and logged, and the run finishes."""
    args = ("--max-steps", 8, "--eval-interval", 4, "--checkpoint-interval", 4, *SMALL)
    stopped = run_script("tests/fault_run.py", "nan_loss:5", "train_baseline_gpt2.py",
                         *train_args(data_dir, tmp_path / "a", *args))
    one_line_error(stopped, 3, "step 5", "loss is nan", "step 4")
    assert checkpoint(tmp_path / "a")["step"] == 4
    assert [r["action"] for r in metrics(tmp_path / "a") if r["split"] == "nonfinite"] == ["stopped"]

    skipped = run_script("tests/fault_run.py", "nan_loss:5", "train_baseline_gpt2.py",
                         *train_args(data_dir, tmp_path / "b", *args, "--skip-nonfinite", 1))
    assert skipped.returncode == 0, skipped.stderr
    rows = metrics(tmp_path / "b")
    assert [(r["step"], r["action"]) for r in rows if r["split"] == "nonfinite"] == [(5, "skipped")]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(8))
    assert all_finite(checkpoint(tmp_path / "b")["model_state"])


# ---- 3. one writer -----------------------------------------------------------------------------

def start_training(data_dir, out, *extra):
    proc = subprocess.Popen([sys.executable, str(REPO / "train_baseline_gpt2.py"),
                             *map(str, train_args(data_dir, out, "--max-steps", 100000, "--eval-interval", 1000,
                                                  *SMALL, *extra))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the run did not start: {proc.communicate()[1][-2000:]}")


def test_a_second_writer_is_refused_and_sighup_saves(data_dir, tmp_path):
    out = tmp_path / "busy"
    first = start_training(data_dir, out)
    try:
        for extra in (["--overwrite"], ["--resume", "auto"]):
            second = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, "--max-steps", 2, *SMALL, *extra))
            one_line_error(second, 2, f"pid {first.pid}", "--out-dir")
        assert first.poll() is None  # the first run trains on
        assert all(r["split"] in ("train", "val") for r in metrics(out))
    finally:
        first.send_signal(signal.SIGHUP)  # a closed terminal: like SIGTERM, save and exit 128 + 1
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 129, stderr
    assert "checkpoint saved" in stdout and checkpoint(out)["step"] >= 2


def test_sigterm_exits_143_and_resume_auto_continues_or_starts(data_dir, tmp_path):
    out = tmp_path / "term"
    proc = start_training(data_dir, out, "--resume", "auto")  # no checkpoint: starts a new run
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    saved = checkpoint(out)["step"]
    again = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, "--resume", "auto",
                                                              "--max-steps", saved + 1, *SMALL))
    assert again.returncode == 0, again.stderr
    assert f"resuming at step {saved}" in again.stdout


# ---- 4. --overwrite validates first; --resume checks the metrics ------------------------------

def test_overwrite_with_a_bad_option_leaves_the_old_run(finished_run, data_dir):
    before = files(finished_run)
    for bad in (["--eval-interval", "0"], ["--n-head", "3"]):  # refused by the flags, by the model build
        result = run_script("train_baseline_gpt2.py", *train_args(data_dir, finished_run, "--overwrite", *SMALL, *bad))
        one_line_error(result, 2)
        assert files(finished_run) == before, bad


def test_a_split_too_small_to_evaluate_is_refused_before_training(finished_run, data_dir, tmp_path):
    """The test split is read only at the end: a context longer than it used to train every step, then stop
    without the final checkpoint; with --overwrite it deleted the old run first. Now: refused at the start."""
    manifest = json.loads(next(data_dir.glob("synthetic-math*__bytes")).joinpath("manifest.json").read_text())
    val, test = (manifest["splits"][s]["tokens"] for s in ("val", "test"))
    assert test < val  # this dataset; a context that fits val but not test
    too_long = ("--micro-batch-size", 1, "--seq-len", test, "--total-batch-size", test, "--eval-batches", 1)
    args = ("--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--max-steps", 2, *too_long)
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, tmp_path / "new", *args))
    one_line_error(result, 2, "test split")
    assert not (tmp_path / "new").exists()
    before = files(finished_run)
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, finished_run, "--overwrite", *args))
    one_line_error(result, 2, "test split")
    assert files(finished_run) == before


def test_an_out_dir_inside_the_data_dir_is_refused(tmp_path):
    """--out-dir naming the dataset folder the run is about to prepare used to hang forever: the run folder's
    lock and the dataset's are the same .lock file, taken twice by one process."""
    data = tmp_path / "data"
    out = data / "synthetic-math-400k__bytes"
    result = run_script("train_baseline_gpt2.py", "--preset", "tiny", "--data-dir", data, "--max-tokens", "400k",
                        "--out-dir", out, "--max-steps", 1, timeout=60)
    one_line_error(result, 2, "--out-dir", "--data-dir")
    assert not data.exists()


def test_resume_of_a_model_only_checkpoint_is_one_line(finished_run, data_dir, tmp_path):
    """A checkpoint with weights but no training state (what convert_hf.py from-hf writes) ended --resume with a
    KeyError traceback; now one line that points to finetune.py."""
    full = checkpoint(finished_run)
    run_dir = tmp_path / "weights_only"
    run_dir.mkdir()
    keep = ("format", "model_name", "model_config", "model_state", "model_extra_state", "config")
    torch.save({k: full[k] for k in keep}, run_dir / "checkpoint.pt")
    saved = (run_dir / "checkpoint.pt").read_bytes()
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, run_dir, "--resume"))
    one_line_error(result, 2, "no training state", "finetune.py --checkpoint")
    result = run_script("finetune.py", "--out-dir", run_dir, "--resume", "--data-dir", data_dir)
    one_line_error(result, 2, "no training state")
    assert (run_dir / "checkpoint.pt").read_bytes() == saved and set(os.listdir(run_dir)) <= {"checkpoint.pt", ".lock"}


def test_resume_at_the_checkpoints_step_ends_the_run_with_its_final_evaluation(data_dir, tmp_path):
    """A run interrupted after its step-2 checkpoint, resumed with --max-steps 2 (or Ctrl-C in the last step):
    it said "run already finished", exit 0, with no test row and the killed process's rows left in metrics.jsonl.
    Now it runs the final evaluation; a --max-steps below the checkpoint's step is refused."""
    out = tmp_path / "cut"
    args = train_args(data_dir, out, "--max-steps", 6, "--eval-interval", 2, "--checkpoint-interval", 2, *SMALL)
    killed = run_script("tests/fault_run.py", "kill_after_step:3", "train_baseline_gpt2.py", *args)
    assert killed.returncode == -signal.SIGKILL and checkpoint(out)["step"] == 2
    before = files(out)
    one_line_error(run_script("train_baseline_gpt2.py", *args, "--resume", "--max-steps", 1), 2, "--max-steps 2")
    assert files(out) == before
    resumed = run_script("train_baseline_gpt2.py", *args, "--resume", "--max-steps", 2)
    assert resumed.returncode == 0, resumed.stderr
    rows = [(r["step"], r["split"]) for r in metrics(out)]
    assert rows == [(0, "val"), (0, "train"), (1, "train"), (2, "val"), (2, "test")]
    assert checkpoint(out)["finished"]


def test_resume_refuses_metrics_shorter_than_the_checkpoint(finished_run, data_dir, tmp_path):
    run = tmp_path / "cut"
    run.mkdir()
    for name, content in files(finished_run).items():
        (run / name).write_bytes(content)
    (run / "metrics.jsonl").write_bytes(b'{"step": 0}\n')
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, run, "--resume", "--max-steps", 6, *SMALL))
    one_line_error(result, 2, "metrics.jsonl", "--overwrite")
    assert (run / "metrics.jsonl").read_bytes() == b'{"step": 0}\n'  # no NUL padding, nothing changed


# ---- 5. write failures --------------------------------------------------------------------------

FAILING_WRITE = """
import errno, os, runpy, sys
real_write, seen = os.write, []
def write(fd, data):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if name.endswith("checkpoint.pt.tmp"):
        seen.append(fd)
        if len(seen) == 2:  # the second checkpoint: half written, then the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)
os.write = write
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux) to see which file is written")
def test_a_failed_checkpoint_write_is_one_line_and_never_blocks_resume(data_dir, tmp_path):
    out = tmp_path / "full"
    args = train_args(data_dir, out, "--max-steps", 6, "--eval-interval", 2, "--checkpoint-interval", 2, *SMALL)
    result = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(REPO / "train_baseline_gpt2.py"),
                             *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    one_line_error(result, 1, "checkpoint.pt", "bytes needed", "--resume")
    assert not (out / "checkpoint.pt.tmp").exists()
    assert checkpoint(out)["step"] == 2  # the previous checkpoint, intact
    # A crash can leave a partial temporary file: it neither blocks nor survives the next run.
    (out / "checkpoint.pt.tmp").write_bytes(b"partial")
    resumed = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, "--resume", "--max-steps", 6, *SMALL))
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint(out)["step"] == 6 and not (out / "checkpoint.pt.tmp").exists()


def test_atomic_write_and_append_keep_old_content_on_failure(tmp_path, monkeypatch):
    import errno

    from plumbing import run_folder
    path = tmp_path / "f.bin"
    run_folder.atomic_write(str(path), b"old")
    run_folder.append_line(str(tmp_path / "m.jsonl"), "{}\n")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(run_folder.WriteError, match="f.bin.*3 bytes needed"):
        run_folder.atomic_write(str(path), b"new")
    with pytest.raises(run_folder.WriteError, match="m.jsonl"):
        run_folder.append_line(str(tmp_path / "m.jsonl"), '{"a": 1}\n')
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and not (tmp_path / "f.bin.tmp").exists()
    assert (tmp_path / "m.jsonl").read_text() == "{}\n"


def test_the_lock_is_exclusive_and_released(tmp_path):
    """Another process is refused with the holder's pid; this process may share it; released, the other process
    gets it; a folder the lock created is removed again if nothing else was written."""
    from plumbing import run_folder
    folder = str(tmp_path / "new")
    other = [sys.executable, "-c", "import sys\nfrom plumbing import run_folder\ntry:\n    run_folder.RunFolderLock(sys.argv[1]).acquire()"
             "\nexcept run_folder.RunFolderBusy as e:\n    sys.exit(str(e))", folder]
    lock = run_folder.RunFolderLock(folder).acquire()
    shared = run_folder.RunFolderLock(folder).acquire()
    refused = subprocess.run(other, cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 1 and f"pid {os.getpid()}" in refused.stderr
    shared.release()
    lock.release()
    assert not (tmp_path / "new").exists()
    assert subprocess.run(other, cwd=REPO, capture_output=True, text=True).returncode == 0


def test_two_processes_stop_together_on_a_nonfinite_step(data_dir, tmp_path):
    """torchrun, 2 CPU processes: the NaN of step 3 (rank 0 sees it in the all-reduced loss, rank 1 too) stops
    both ranks, no rank waits for the other, one line says why, and the step-2 checkpoint is kept."""
    out = tmp_path / "ddp"
    args = train_args(data_dir, out, "--max-steps", 6, "--eval-interval", 6, "--checkpoint-interval", 2, *SMALL)
    result = run_torchrun("tests/fault_run.py", "nan_loss:3", "train_baseline_gpt2.py", *args)
    assert result.returncode != 0
    assert result.stderr.count("error: step 3: the loss is nan") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("error: step 3")[0]
    assert checkpoint(out)["step"] == 2
