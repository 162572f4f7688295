"""sweep.py (a grid x seeds of any train script: skip finished runs, resume interrupted ones, refuse a folder of
other settings) and compare.py (group runs that differ only in the seed; mean, sd, t CI, Welch's test)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_TOKENS, run_script

TIMING = {"dt_ms", "tok_per_s", "mfu"}  # wall-clock numbers: differ between two runs of the same settings


def tiny_flags(data_dir):
    return ["--max-steps", 6, "--eval-interval", 3, "--checkpoint-interval", 2, "--n-layer", 1, "--n-embd", 32,
            "--n-head", 2, "--total-batch-size", 256, "--micro-batch-size", 2, "--seq-len", 64, "--eval-batches", 2,
            "--data-dir", data_dir, "--max-tokens", TINY_TOKENS]


def sweep_args(out, data_dir, seeds="1,2", extra=()):
    return ["train_baseline_gpt2.py", "--preset", "tiny", "--grid", "pos=learned,rope", "--seeds", seeds,
            "--jobs", 2, "--out", out, "--", *tiny_flags(data_dir), *extra]


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def raw_train_row(run_dir, step):
    """The metrics line of one train step as written, wall-clock fields included."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return next(line for line in f if json.loads(line)["split"] == "train" and json.loads(line)["step"] == step)


def snapshot(folder):
    """{path: (bytes, mtime)} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (f.read(), os.stat(path).st_mtime_ns)
    return out


# ---- statistics ------------------------------------------------------------------------------------------------

def test_statistics_equal_scipy():
    import numpy as np
    from scipy import stats
    import compare
    a, b = [3.10, 3.02, 3.21, 3.15], [2.95, 3.01, 2.90]
    s = compare.summary(a)
    assert s["n"] == 4 and s["mean"] == pytest.approx(np.mean(a)) and s["sd"] == pytest.approx(np.std(a, ddof=1))
    assert s["ci95"] == pytest.approx(list(stats.t.interval(0.95, 3, loc=np.mean(a), scale=stats.sem(a))))
    w = compare.welch(b, a)
    ref = stats.ttest_ind(b, a, equal_var=False)
    assert w["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert w["p"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert w["diff_ci95"] == pytest.approx([ci.low, ci.high])
    # n < 2 or no spread: no CI, no p, never a made-up number
    assert compare.summary([3.0])["ci95"] is None and compare.welch([3.0], a)["p"] is None
    assert compare.welch([1.0, 1.0], [1.0, 1.0])["p"] is None


# ---- grouping --------------------------------------------------------------------------------------------------

def fake_run(folder, seed, pos="learned", data_hash="aaaa", val=5.0, data_seed=1337, typed=None, loss_on="all"):
    folder.mkdir(parents=True)
    config = {"seed": seed, "data_seed": data_seed, "out_dir": str(folder), "threads": 1, "data_hash": data_hash,
              "loss_on": loss_on,
              "n_params": 1000, "max_steps": 3, "data": "synthetic-math", "tokenizer": "bytes",
              "model_config": {"pos": pos, "n_layer": 1}, "model_overrides": typed or {}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text(
        json.dumps({"step": 3, "split": "val", "loss": val, "bpb": val * 1.4, "tokens": 768}) + "\n"
        + json.dumps({"step": 3, "split": "test", "loss": val + 0.1, "tokens": 768}) + "\n")
    return folder


def test_groups_differ_only_in_the_seed_and_different_data_is_not_pooled(tmp_path, capsys):
    import compare
    for i, seed in enumerate([1, 2, 3]):  # --pos learned typed for one seed, left at its default for two: one group
        fake_run(tmp_path / "a" / f"learned{seed}", seed, val=5.0 + i / 10, typed={"pos": "learned"} if i else None)
        fake_run(tmp_path / "a" / f"rope{seed}", seed, pos="rope", val=4.0 + i / 10)
    fake_run(tmp_path / "a" / "other_data_seed", 1, data_seed=7)          # a setting: its own group
    (tmp_path / "a" / "learned1" / "eval.json").write_text(json.dumps({"accuracy": 0.5, "task": "x"}))
    groups = compare.group_runs([compare.load_run(d) for d in compare.find_runs([str(tmp_path / "a")])])
    assert sorted((g["name"], len(g["runs"])) for g in groups) == [
        ("data_seed=1337, pos=learned", 3), ("data_seed=1337, pos=rope", 3), ("data_seed=7, pos=learned", 1)]
    assert compare.main([str(tmp_path / "a"), "--baseline", "pos=learned,data_seed=1337", "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)["rows"]
    rope = next(r for r in table if r["metric"] == "val loss" and r["group"] == "data_seed=1337, pos=rope")
    assert rope["n"] == 3 and rope["diff"] == pytest.approx(-1.0) and rope["p"] < 0.01
    lone = next(r for r in table if r["metric"] == "val loss" and r["group"] == "data_seed=7, pos=learned")
    assert lone["note"] == "n too small to tell" and lone["p"] is None
    assert any(r["metric"] == "eval.json:accuracy" for r in table)
    # the same settings on other data: refused, one line
    fake_run(tmp_path / "a" / "learned9", 9, data_hash="bbbb")
    assert compare.main([str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data_hash" in err[0] and "learned9" in err[0]


def test_unfinished_runs_are_left_out_and_named(tmp_path, capsys):
    """A run still training has a val row at step 0 (or at its last checkpoint), not its final one: pooling it with
    finished seeds compared its step-0 loss as if final (a sweep in progress gave a group mean of 5.76 for 0.84)."""
    import compare
    for seed in (1, 2):
        fake_run(tmp_path / "a" / f"done{seed}", seed, val=1.0 + seed / 100)
    running = fake_run(tmp_path / "a" / "running", 3, val=9.0)
    (running / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "val", "loss": 9.0, "tokens": 0}) + "\n")
    assert compare.main([str(tmp_path / "a"), "--format", "json"]) == 0
    out = capsys.readouterr()
    [row] = [r for r in json.loads(out.out)["rows"] if r["metric"] == "val loss"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(1.015)
    assert "left out 1 unfinished run" in out.err and "running" in out.err
    assert compare.main([str(running)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished" in err[0]


def test_markdown_names_a_group_by_what_sets_it_apart_from_the_baseline(tmp_path, capsys):
    import compare
    for seed in (1, 2):
        fake_run(tmp_path / "a" / f"l{seed}", seed, val=5.0 + seed / 10)
        fake_run(tmp_path / "a" / f"r{seed}", seed, pos="rope", val=4.0 + seed / 10)
        fake_run(tmp_path / "a" / f"o{seed}", seed, data_seed=7, val=5.5 + seed / 10)
    assert compare.main([str(tmp_path / "a"), "--baseline", "pos=learned,data_seed=1337", "--metric", "val loss"]) == 0
    names = [line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert sorted(names) == ["data_seed=1337, pos=learned", "data_seed=7", "pos=rope"]


def test_losses_over_other_tokens_are_not_compared(tmp_path, capsys):
    """--loss-on answer makes a run's val/test "loss" its answer-token loss: against all-token runs that is not a
    difference of settings but of what is measured (a p of 0.0002 for +0.13 nats, where evaluate.py's answer-token
    loss differs by +0.02). No diff or p for those rows; bpb (every token for both) is still compared."""
    import compare
    for seed in (1, 2, 3):
        fake_run(tmp_path / "a" / f"all{seed}", seed, val=0.63 + seed / 100)
        fake_run(tmp_path / "a" / f"answer{seed}", seed, val=0.76 + seed / 100, loss_on="answer")
    assert compare.main([str(tmp_path / "a"), "--baseline", "loss_on=all", "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)["rows"]
    answer = {r["metric"]: r for r in table if r["group"] == "loss_on=answer"}
    for metric in ("val loss", "test loss"):
        assert answer[metric]["p"] is None and answer[metric]["diff"] is None
        assert answer[metric]["note"].startswith("not like for like")
    assert answer["val bpb"]["p"] is not None


# ---- sweeps ----------------------------------------------------------------------------------------------------

def test_a_sweep_keeps_finished_runs_refuses_other_settings_and_resumes_killed_ones(data_dir, tmp_path):
    """One sweep of 2 settings x 2 seeds, then: the same command again keeps every run untouched; a command with
    other settings is refused and changes nothing; a sweep killed with SIGKILL (a crash, the OOM killer), run
    again, resumes its runs from their checkpoints and ends with the metrics of the sweep never stopped."""
    ref = tmp_path / "ref"
    result = run_script("sweep.py", *sweep_args(ref, data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": started") == 4 and result.stdout.count("final val loss") == 4
    assert sorted(os.path.relpath(r, ref) for r, _, f in os.walk(ref) if "config.json" in f) == [
        "pos=learned/seed=1", "pos=learned/seed=2", "pos=rope/seed=1", "pos=rope/seed=2"]
    config = json.load(open(ref / "pos=rope" / "seed=2" / "config.json"))
    assert config["seed"] == 2 and config["model_config"]["pos"] == "rope" and config["threads"] >= 1
    table = run_script("compare.py", ref, "--baseline", "pos=learned").stdout
    assert "| val loss | pos=rope | 2 |" in table and "| val loss | pos=learned | 2 |" in table

    # the same command again: every run kept, no file touched
    before = snapshot(ref)
    result = run_script("sweep.py", *sweep_args(ref, data_dir))
    assert result.returncode == 0 and result.stdout.count("kept (finished earlier") == 4, result.stdout
    assert "started" not in result.stdout and snapshot(ref) == before

    # other settings in the same folder: refused before anything starts, nothing changed
    result = run_script("sweep.py", *sweep_args(ref, data_dir, extra=["--lr", "0.01"]))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--lr 0.01" in result.stderr and "started" not in result.stdout
    assert snapshot(ref) == before

    # killed mid-run (the sweep and its runs), then the same command again
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *map(str, sweep_args(out, data_dir, seeds="1"))],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = out / "pos=learned" / "seed=1" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the sweep ended before its first checkpoint: nothing was interrupted"
    assert not any(r["split"] == "test" for r in rows(out / "pos=learned" / "seed=1"))  # killed before the end
    first_step = raw_train_row(out / "pos=learned" / "seed=1", 0)
    result = run_script("sweep.py", *sweep_args(out, data_dir, seeds="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pos=learned/seed=1: resumed" in result.stdout
    # continued from the checkpoint, not started over: the step before it keeps its row, timing included
    assert raw_train_row(out / "pos=learned" / "seed=1", 0) == first_step
    for name in ("pos=learned/seed=1", "pos=rope/seed=1"):
        assert rows(out / name) == rows(ref / name), name


@pytest.mark.parametrize("args, words", [
    (["--grid", "pos"], "KEY=V1,V2"),
    (["--grid", "pos=rope", "--seeds", "1,x"], "--seeds"),
    (["--grid", "seed=1,2"], "--seeds"),
    (["--grid", "pos=rope", "--", "--out-dir", "x"], "--out-dir"),
    (["--grid", "pos=rope", "--jobs", "0"], "--jobs"),
])
def test_bad_input_is_one_line_and_starts_nothing(args, words, tmp_path):
    result = run_script("sweep.py", "train_baseline_gpt2.py", "--out", tmp_path / "s", *args)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


# ---- plot_loss.py --group --------------------------------------------------------------------------------------

def curve_run(folder, seed, pos, shift):
    fake_run(folder, seed, pos=pos)
    lines = []
    for s in range(0, 7, 3):
        lines.append({"step": s, "split": "val", "loss": 5 - s / 10 + shift, "tokens": s * 256})
        lines.append({"step": s, "split": "train", "loss": 5 - s / 10 + shift, "tokens": (s + 1) * 256, "dt_ms": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_plot_groups_mean_band_params_and_identical_curves(tmp_path):
    import plot_loss
    curve_run(tmp_path / "s" / "a1", 1, "learned", 0.0)
    curve_run(tmp_path / "s" / "a2", 2, "learned", 0.2)
    curve_run(tmp_path / "s" / "b1", 1, "rope", 0.0)     # rope's curve is learned's lower run, not its mean
    curve_run(tmp_path / "s" / "c1", 1, "alibi", 0.1)    # alibi's mean equals learned's mean (up to rounding)
    curve_run(tmp_path / "s" / "c2", 2, "alibi", 0.1)
    fig = plot_loss.make_group_figure([str(tmp_path / "s")], x="steps")
    ax = fig.axes[0]
    vals = {ln.get_gid(): ln for ln in ax.get_lines() if (ln.get_gid() or "").endswith(" val")}
    assert list(vals["pos=learned val"].get_ydata()) == pytest.approx([5.1, 4.8, 4.5])
    band = next(c for c in ax.collections if c.get_gid() == "pos=learned band")
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(4.4) and max(ys) == pytest.approx(5.2)   # min of the lowest, max of the highest
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pos=learned (n=2, 1,000 params)" in labels
    assert labels[2] == "pos=alibi (n=2, 1,000 params) (same as pos=learned)", labels
    assert sum("same as" in lab for lab in labels) == 1
    assert vals["pos=alibi val"].get_linestyle() == "--"           # drawn on top, dashed: both stay visible
    assert ax.get_title() == "data: synthetic-math (bytes tokenizer); 1,792 training tokens per run"


def test_plot_replaces_its_default_output_but_not_a_named_one(tmp_path):
    curve_run(tmp_path / "runs" / "s" / "a1", 1, "learned", 0.0)
    env = {"MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(REPO / "plot_loss.py"), "--group"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, **env))
    assert first.returncode == 0, first.stderr
    png = tmp_path / "runs" / "loss.png"
    png.write_bytes(b"old")
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, **env))
    assert again.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG", again.stderr
    named = tmp_path / "mine.png"
    named.write_bytes(b"mine")
    refused = subprocess.run(cmd + ["runs", "--out", str(named)], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and named.read_bytes() == b"mine"
