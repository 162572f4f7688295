"""The trainer end to end, run as a user runs it: python train_baseline_gpt2.py --preset tiny ..."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script, run_torchrun, train_args

STEPS = 40
# A smaller model than --preset tiny for the tests of mechanics (resume, DDP, errors): seconds, not minutes.
# Two micro-steps per optimizer step, so gradient accumulation is part of every comparison.
SMALL = ("--n-layer", 2, "--n-head", 2, "--n-embd", 64, "--micro-batch-size", 4, "--seq-len", 64,
         "--total-batch-size", 512)
COMMON = ("--max-steps", STEPS, "--eval-interval", 10, "--checkpoint-interval", 10, *SMALL)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(rows, split):
    return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """One uninterrupted tiny run that the other tests compare against."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, *COMMON))
    assert result.returncode == 0, result.stderr
    return out


def test_tiny_preset_learns_in_40_steps(data_dir, tmp_path):
    out = tmp_path / "tiny"
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, "--max-steps", STEPS,
                                                               "--eval-interval", STEPS))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_name"] == "baseline_gpt2" and config["max_steps"] == STEPS
    assert config["model_config"]["n_layer"] == 4 and config["data"] == "synthetic-math"
    train = [loss for _, loss in losses(metrics(out), "train")]
    assert len(train) == STEPS
    first, last = train[0], sum(train[-5:]) / 5
    assert last <= 0.75 * first, f"train loss fell only from {first:.3f} to {last:.3f}"


def test_a_finished_run_names_its_files_and_the_command_that_plots_them(data_dir, tmp_path):
    """The last line says where the checkpoint and metrics are and what to run next; the command works as
    printed, also for a folder with a space in its name."""
    import shlex
    out = tmp_path / "my run"
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, "--max-steps", 2, "--eval-interval", 2,
                                                               *SMALL))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 2 steps; "), last
    assert str(out / "checkpoint.pt") in last and str(out / "metrics.jsonl") in last, last
    command = shlex.split(last.split("plot: ", 1)[1])
    assert command[:2] == ["python", "plot_loss.py"], command
    plotted = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert plotted.returncode == 0, plotted.stderr
    assert [p.name for p in out.glob("*.png")] == ["loss.png"]


def test_a_run_writes_its_files(reference_run):
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        assert (reference_run / name).is_file()
    config = json.loads((reference_run / "config.json").read_text())
    assert config["grad_accum"] == 2 and config["model_config"]["n_embd"] == 64
    rows = metrics(reference_run)
    assert [s for s, _ in losses(rows, "train")] == list(range(STEPS))
    assert [s for s, _ in losses(rows, "val")] == [0, 10, 20, 30, 40]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert len(test_rows) == 1 and test_rows[0]["bpb"] > 0
    assert all({"lr", "grad_norm", "tokens", "dt_ms", "tok_per_s"} <= set(r) for r in rows if r["split"] == "train")


@pytest.mark.parametrize("fault", ["kill_after_step:25", "kill_in_checkpoint:20"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(reference_run, data_dir, tmp_path, fault):
    out = tmp_path / "run"
    killed = run_script("tests/fault_run.py", fault, "train_baseline_gpt2.py", *train_args(data_dir, out, *COMMON))
    assert killed.returncode == -signal.SIGKILL
    # A kill while writing the checkpoint leaves the previous one intact and loadable.
    step_saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step_saved == (20 if fault.startswith("kill_after") else 10)
    resumed = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, *COMMON, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step_saved}" in resumed.stdout
    got, want = metrics(out), metrics(reference_run)
    for split in ("train", "val", "test"):
        assert losses(got, split) == losses(want, split), f"{split} losses differ after resume"


def test_two_processes_match_one(data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same --total-batch-size gives the one-process losses."""
    args = ("--max-steps", 6, "--eval-interval", 3, *SMALL)
    one = run_script("train_baseline_gpt2.py", *train_args(data_dir, tmp_path / "one", *args))
    assert one.returncode == 0, one.stderr
    two = run_torchrun("train_baseline_gpt2.py", *train_args(data_dir, tmp_path / "two", *args))
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for split in ("train", "val", "test"):
        la, lb = losses(a, split), losses(b, split)
        assert [s for s, _ in la] == [s for s, _ in lb] and len(la) > 0
        for (_, x), (_, y) in zip(la, lb):
            assert abs(x - y) < 1e-4 * max(1.0, abs(x)), f"{split}: {x} vs {y}"


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_baseline_gpt2.py"),
                             *map(str, train_args(data_dir, out, "--max-steps", 100000, *SMALL))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stdout
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] >= 3
    resumed = run_script("train_baseline_gpt2.py",
                         *train_args(data_dir, out, "--resume", "--max-steps", saved["step"] + 2, *SMALL))
    assert resumed.returncode == 0, resumed.stderr
    assert max(s for s, _ in losses(metrics(out), "train")) == saved["step"] + 1


def test_bad_inputs_get_one_line_and_touch_nothing(reference_run, data_dir, tmp_path):
    ckpt = reference_run / "checkpoint.pt"
    before = ckpt.read_bytes()
    cases = [
        (train_args(data_dir, tmp_path / "a", "--data", "wikipedia"), ["unknown"]),
        (train_args(data_dir, tmp_path / "b", "--data", f"json:{tmp_path}/missing.jsonl"), ["missing.jsonl"]),
        (train_args(data_dir, tmp_path / "c", "--resume"), ["nothing to resume"]),
        (train_args(data_dir, reference_run, "--max-steps", 5), ["--resume", "--overwrite"]),
        (train_args(data_dir, tmp_path / "d", "--total-batch-size", 1000), ["not a multiple"]),
        (train_args(data_dir, tmp_path / "e", "--n-head", 3), ["n_head"]),
    ]
    for args, words in cases:
        assert_one_line_error(run_script("train_baseline_gpt2.py", *args), *words)
    assert ckpt.read_bytes() == before
    # A corrupt checkpoint and one that is not ours: refused, left in place.
    for name, content in [("corrupt", before[: len(before) // 3]), ("foreign", None)]:
        run_dir = tmp_path / name
        run_dir.mkdir()
        if content is None:
            torch.save({"weights": torch.zeros(3)}, run_dir / "checkpoint.pt")
        else:
            (run_dir / "checkpoint.pt").write_bytes(content)
        saved = (run_dir / "checkpoint.pt").read_bytes()
        result = run_script("train_baseline_gpt2.py", *train_args(data_dir, run_dir, "--resume"))
        assert_one_line_error(result, "checkpoint")
        assert (run_dir / "checkpoint.pt").read_bytes() == saved
    # Another model's checkpoint is refused with the right script to use.
    other = tmp_path / "other"
    other.mkdir()
    data = torch.load(ckpt, weights_only=True)
    data["model_name"] = "conv_attention"
    torch.save(data, other / "checkpoint.pt")
    assert_one_line_error(run_script("train_baseline_gpt2.py", *train_args(data_dir, other, "--resume")),
                          "train_conv_attention.py")


def test_resume_refuses_a_changed_setting(reference_run, data_dir):
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, reference_run, "--resume", "--lr", "1"))
    assert_one_line_error(result, "--lr")


def test_resume_refuses_another_preset(reference_run, data_dir):
    """--preset had a parser default, so a typed --preset was never compared: resuming a tiny run with
    --preset rtx3080 silently continued the tiny run."""
    args = train_args(data_dir, reference_run, "--resume")
    args[args.index("tiny")] = "rtx3080"
    assert_one_line_error(run_script("train_baseline_gpt2.py", *args), "--preset rtx3080", "tiny")


def test_generate_from_checkpoint(reference_run):
    long_prompt = "Question: what is 12 + 30?\n" * 5  # longer than the 64-token context: cropped
    result = run_script("generate.py", "--checkpoint", reference_run / "checkpoint.pt", "--prompt", long_prompt,
                        "--max-new-tokens", 30, "--top-k", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(long_prompt) and len(result.stdout) > len(long_prompt)
    cached = result.stdout
    uncached = run_script("generate.py", "--checkpoint", reference_run / "checkpoint.pt", "--prompt", long_prompt,
                          "--max-new-tokens", 30, "--top-k", "1", "--no-cache").stdout
    assert cached == uncached
    assert_one_line_error(run_script("generate.py", "--checkpoint", reference_run / "nope.pt"), "nope.pt")


def test_plot_loss(reference_run, tmp_path):
    out = tmp_path / "loss.png"
    result = run_script("plot_loss.py", reference_run, "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_script("plot_loss.py", empty, "--out", tmp_path / "x.png"), "metrics.jsonl")


@pytest.mark.parametrize("preset", ["tiny", "rtx3080"])
def test_every_model_preset_has_a_consistent_batch(preset):
    """Each train_<model>.py --preset X must start: tokens per step divisible into micro-batches."""
    from base_trainer import resolve_config
    from models import MODELS
    for name in MODELS:
        cfg, _ = resolve_config(name, ["--preset", preset])
        assert cfg["total_batch_size"] % (cfg["micro_batch_size"] * cfg["seq_len"]) == 0, name
        assert (REPO / f"train_{name}.py").is_file()


def test_max_tokens_takes_the_preparers_units():
    from base_trainer import resolve_config
    cfg, _ = resolve_config("baseline_gpt2", ["--preset", "tiny", "--max-tokens", "2M"])
    assert cfg["max_tokens"] == 2_000_000
    with pytest.raises(SystemExit):  # argparse: one usage line and exit 2
        resolve_config("baseline_gpt2", ["--preset", "tiny", "--max-tokens", "lots"])
