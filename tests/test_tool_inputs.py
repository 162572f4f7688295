"""The user tools (evaluate, generate, embed, plot_loss, the dual-mask layer cuts, sweep and analysis) and what they
read and write: every bad file (corrupt, truncated, not UTF-8, the wrong JSON type, a checkpoint missing a part) and
every failed write (a full disk) ends in ONE line on stderr, no traceback, no temporary file left and no file changed
that the command did not make; Ctrl-C while a script still imports torch is one line and exit 130."""

import ast
import dataclasses
import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

DELETE = object()  # a checkpoint part to leave out
TINY = dict(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32)
RUN_SETTINGS = {"tokenizer": "bytes", "data": "synthetic-math", "data_dir": "data", "seq_len": 32,
                "micro_batch_size": 2}


def save_checkpoint(path, name="baseline_gpt2", settings=None, **changes):
    """A random tiny model `name` as a checkpoint with the run settings `settings` (default: the tokenizer only),
    and `changes` to its parts (DELETE: the part left out)."""
    from checkpoint import CHECKPOINT_FORMAT
    from models import create_model
    torch.manual_seed(0)
    model = create_model(name, preset="tiny", **dict(TINY, n_layer=4 if name == "progressive_diverging" else 2))
    ckpt = {"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
            "model_state": model.state_dict(), "model_extra_state": model.extra_state(),
            "config": dict(settings or {"tokenizer": "bytes"})}
    for key, value in changes.items():
        if value is DELETE:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return str(path)


def one_line(capsys, module, argv, code=2):
    """Run module.main(argv) in-process; assert the exit code and ONE 'error: ' line on stderr; return the line."""
    capsys.readouterr()
    try:
        got = importlib.import_module(module).main(argv)
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # as a terminal shows it: a wiped progress bar
    lines = [line for line in shown if line.strip()]                  # ("\r", spaces, "\r") leaves nothing
    assert got == code and len(lines) == 1 and lines[0].startswith("error: "), (got, err)
    return lines[0]


def listing(folder):
    """Every file below `folder` with its bytes: a command that fails must leave this unchanged."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---- checkpoints: every tool that loads one --------------------------------------------------------------

CHECKPOINT_DEFECTS = {
    "no model_state": dict(model_state=DELETE),
    "model_state a list": dict(model_state=[1, 2]),
    "model_state holding text": dict(model_state={"wte.weight": "weights"}),
    "no model_name": dict(model_name=DELETE),
    "unknown model_name": dict(model_name="gpt5"),
    "model_name a number": dict(model_name=3),
    "model_config text": dict(model_config="n_layer=2"),
    "no model_config": dict(model_config=DELETE),
    "a model_config size as text": "n_embd",
    "config a list": dict(config=[1]),
    "no config": dict(config=DELETE),
    "truncated": "truncated",
    "bytes that are not UTF-8": "garbage",
    "a list, not a dict": "list",
}
TOOLS = ["generate", "evaluate", "embed", "dual_mask.layer_cuts"]


def tool_argv(tool, ckpt, tmp_path):
    (tmp_path / "in.txt").write_text("What is 2 + 3?\n")
    return {"generate": ["--checkpoint", ckpt, "--max-new-tokens", "2"],
            "evaluate": ["--checkpoint", ckpt, "--task", "synthetic-math", "--limit", "1", "--max-new-tokens", "2",
                         "--out", str(tmp_path / "r.json")],
            "embed": ["--checkpoint", ckpt, "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e.npy")],
            "dual_mask.layer_cuts": [ckpt]}[tool]


def damaged_checkpoint(path, model_name, defect):
    change = CHECKPOINT_DEFECTS[defect]
    if isinstance(change, dict):
        return save_checkpoint(path, model_name, **change)
    if change == "n_embd":
        from models import create_model
        config = dataclasses.asdict(create_model(model_name, preset="tiny", **TINY).config)
        return save_checkpoint(path, model_name, model_config=dict(config, n_embd="32"))
    if change == "list":
        torch.save([1, 2], path)
        return str(path)
    save_checkpoint(path, model_name)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if change == "truncated" else b"\xff\xfe\x00lmsmall?" * 64)
    return str(path)


@pytest.mark.parametrize("defect", list(CHECKPOINT_DEFECTS))
@pytest.mark.parametrize("tool", TOOLS)
def test_a_damaged_checkpoint_is_one_line_in_every_tool(tool, defect, tmp_path, capsys):
    """A checkpoint without model_state (or with a part of the wrong type) ended in a KeyError, AttributeError or
    TypeError traceback in generate, evaluate, embed and dual_mask/layer_cuts.py: now the loader says what is wrong."""
    ckpt = damaged_checkpoint(tmp_path / "checkpoint.pt", "dual_mask_gpt" if tool == "dual_mask.layer_cuts" else
                              "baseline_gpt2", defect)
    argv = tool_argv(tool, ckpt, tmp_path)
    before = listing(tmp_path)
    line = one_line(capsys, tool, argv, code=1 if tool == "dual_mask.layer_cuts" else 2)
    assert "checkpoint" in line
    assert listing(tmp_path) == before


def test_extra_state_of_the_wrong_type_is_one_line(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "c.pt", "progressive_diverging", model_extra_state=3)
    assert "checkpoint" in one_line(capsys, "generate", ["--checkpoint", ckpt, "--max-new-tokens", "2"])


def test_run_settings_the_loss_and_layer_cuts_read_are_checked(tmp_path, capsys):
    """A checkpoint whose run settings lack "data" ended in KeyError: 'data' in evaluate.py's loss (and its json
    tasks) and in dual_mask/layer_cuts.py."""
    ckpt = save_checkpoint(tmp_path / "c.pt")
    assert "'data'" in one_line(capsys, "evaluate", ["--checkpoint", ckpt, "--quiet"])
    (tmp_path / "t.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    assert "'data'" in one_line(capsys, "evaluate", ["--checkpoint", ckpt, "--task", f"json:{tmp_path / 't.jsonl'}",
                                                     "--split", "all"])
    dual = save_checkpoint(tmp_path / "d.pt", "dual_mask_gpt", settings={"tokenizer": "bytes", "seq_len": 32})
    assert "'data'" in one_line(capsys, "dual_mask.layer_cuts", [dual], code=1)


# ---- evaluate.py: the json task file and --out ----------------------------------------------------------------

GOOD = b'{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
TASK_FILES = {
    "not UTF-8": GOOD + b'{"question": "caf\xe9?", "answer": "#### 1"}\n',
    "truncated": GOOD + b'{"question": "What is 2 + 2?", "ans',
    "corrupt": GOOD + b"\x00\x01\x02 not json\n",
    "a JSON list": GOOD + b"[1, 2]\n",
    "a JSON number": b"3\n" + GOOD,
    "a question that is a number": b'{"question": 5, "answer": "#### 5"}\n',
    "no final answer": b'{"question": "What is 1 + 1?", "answer": "2"}\n',
    "a lone surrogate": b'{"question": "What is \\ud800?", "answer": "#### 1"}\n',
    "empty": b"",
}


@pytest.mark.parametrize("case", list(TASK_FILES))
def test_a_bad_task_file_is_one_line(case, tmp_path, capsys):
    """A json task file with bytes that are not UTF-8 (or a lone surrogate escape) ended in a UnicodeDecodeError
    (UnicodeEncodeError) traceback; every bad file is one line naming it, and nothing is written."""
    ckpt = save_checkpoint(tmp_path / "c.pt", settings=RUN_SETTINGS)
    task = tmp_path / "task.jsonl"
    task.write_bytes(TASK_FILES[case])
    before = listing(tmp_path)
    line = one_line(capsys, "evaluate", ["--checkpoint", ckpt, "--task", f"json:{task}", "--split", "all",
                                         "--max-new-tokens", "2", "--out", str(tmp_path / "r.json")])
    assert "task.jsonl" in line
    assert listing(tmp_path) == before


def test_a_folder_as_task_file_is_one_line(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "c.pt", settings=RUN_SETTINGS)
    assert "no such file" in one_line(capsys, "evaluate", ["--checkpoint", ckpt, "--task", f"json:{tmp_path}"])


@pytest.mark.parametrize("where", ["a name too long for the file system", "under a regular file"])
def test_evaluate_checks_out_can_be_written_before_it_evaluates(where, tmp_path, capsys, monkeypatch):
    """--out into a folder that cannot be made was found only after the whole evaluation (a traceback, the
    result lost): now it is checked first, and the check leaves nothing behind."""
    import evaluate
    monkeypatch.setattr(evaluate, "accuracy", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    ckpt = save_checkpoint(tmp_path / "c.pt")
    (tmp_path / "a_file").write_text("a file")
    folder = tmp_path / ("x" * 300) if where.startswith("a name") else tmp_path / "a_file" / "sub"
    before = listing(tmp_path)
    line = one_line(capsys, "evaluate", ["--checkpoint", ckpt, "--task", "synthetic-math", "--limit", "1",
                                         "--out", str(folder / "deeper" / "r.json")])
    assert "--out" in line
    assert listing(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_file", "c.pt"]


def test_evaluate_out_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "r.json"
    out.write_text("old result\n")
    monkeypatch.setattr(os, "fsync", disk_full)  # atomic_write_bytes: the data are written, the flush fails
    before = listing(tmp_path)
    line = one_line(capsys, "evaluate", ["--checkpoint", ckpt, "--task", "synthetic-math", "--limit", "1",
                                         "--max-new-tokens", "2", "--out", str(out), "--overwrite", "--quiet"], code=1)
    assert str(out) in line and os.strerror(errno.ENOSPC) in line
    assert listing(tmp_path) == before  # the old file whole, no temporary file


# ---- embed.py ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "tokens"])
def test_embed_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tokens, tmp_path, capsys, monkeypatch):
    """A full disk mid-write ended in a traceback and left the .tmp file (gigabytes, for many texts) behind."""
    import embed
    ckpt = save_checkpoint(tmp_path / "c.pt")
    (tmp_path / "in.txt").write_text("What is 2 + 3?\nx\n")
    out = tmp_path / ("e.npz" if tokens else "e.npy")
    out.write_bytes(b"old embeddings")
    real = embed.write_rows

    def write_then_full(f, *args):
        real(f, *args)
        disk_full()
    monkeypatch.setattr(embed, "write_rows", write_then_full)
    before = listing(tmp_path)
    line = one_line(capsys, "embed", ["--checkpoint", ckpt, "--input", str(tmp_path / "in.txt"), "--out", str(out),
                                      "--overwrite", *(["--tokens"] if tokens else [])], code=1)
    assert str(out) in line and os.strerror(errno.ENOSPC) in line
    assert listing(tmp_path) == before


def test_embed_interrupted_mid_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import embed
    ckpt = save_checkpoint(tmp_path / "c.pt")
    (tmp_path / "in.txt").write_text("What is 2 + 3?\n")

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(embed, "write_rows", interrupted)
    before = listing(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        embed.main(["--checkpoint", ckpt, "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e.npy")])
    assert listing(tmp_path) == before


EMBED_INPUTS = {"not UTF-8": b"caf\xe9\n", "truncated": b'{"q": "one"}\n{"q": "tw', "a JSON list": b"[1, 2]\n",
                "a JSON number": b"3\n", "no such field": b'{"text": "x"}\n', "a field that is a number": b'{"q": 3}\n',
                "empty": b"\n"}


@pytest.mark.parametrize("case", list(EMBED_INPUTS))
def test_a_bad_embed_input_is_one_line(case, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "c.pt")
    (tmp_path / "in.jsonl").write_bytes(EMBED_INPUTS[case])
    field = [] if case == "not UTF-8" else ["--field", "q"]
    before = listing(tmp_path)
    assert "in.jsonl" in one_line(capsys, "embed", ["--checkpoint", ckpt, "--input", str(tmp_path / "in.jsonl"),
                                                    *field, "--out", str(tmp_path / "e.npy")])
    assert listing(tmp_path) == before


# ---- plot_loss.py ----------------------------------------------------------------------------------------------

ROWS = b'{"step": 0, "split": "train", "loss": 5.0, "tokens": 64}\n{"step": 0, "split": "val", "loss": 5.1}\n'
METRICS_LINES = {
    "a JSON list": b"[1, 2]\n",
    "a JSON number": b"3\n",
    "a JSON string": b'"loss"\n',
    "null": b"null\n",
    "not UTF-8": b'{"step": 1, "split": "train", "loss": 4.0, "note": "caf\xe9"}\n',
    "corrupt": b"\x00\x00\x00\x00\n",
    "a train row without step": b'{"split": "train", "loss": 4.0}\n',
    "a step that is text": b'{"step": "1", "split": "train", "loss": 4.0}\n',
    "a loss that is text": b'{"step": 1, "split": "val", "loss": "4.0"}\n',
    "tokens that are null": b'{"step": 1, "split": "train", "loss": 4.0, "tokens": null}\n',
}


@pytest.mark.parametrize("case", list(METRICS_LINES))
def test_a_bad_metrics_row_is_one_line(case, tmp_path, capsys):
    """A metrics.jsonl holding JSON that is not an object ([1,2], 3) or a line that is not UTF-8 ended in a
    traceback; now it is refused as any bad line is (one line naming the file and line), nothing written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(METRICS_LINES[case] + ROWS)
    before = listing(tmp_path)
    line = one_line(capsys, "plot_loss", [str(run), "--out", str(tmp_path / "loss.png")])
    assert "metrics.jsonl line 1" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("last", [b"[1, 2]", b'{"step": 1, "split": "train", "loss": "caf\xc3', b"7"])
def test_an_unfinished_last_row_of_any_kind_is_left_out_with_a_note(last, tmp_path, capsys):
    """A run still writing its last row (no newline yet): left out with a note, whatever its bytes are so far."""
    import plot_loss
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(ROWS + last)
    assert len(plot_loss.read_metrics(str(run))) == 2
    assert "last line is incomplete" in capsys.readouterr().err


def test_fields_that_are_not_numbers_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(ROWS + b'{"step": 1, "split": "train", "loss": 4.0, "lr": "high"}\n')
    assert '"lr"' in one_line(capsys, "plot_loss", [str(run), "--fields", "lr", "--out", str(tmp_path / "l.png")])


def good_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(ROWS)
    return run


def test_plot_on_a_full_disk_is_one_line_and_keeps_the_old_image(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def write_then_full(self, target, *args, **kwargs):
        target.write(b"\x89PNG half an image")
        disk_full()
    monkeypatch.setattr(Figure, "savefig", write_then_full)
    run = good_run(tmp_path)
    out = tmp_path / "loss.png"
    out.write_bytes(b"old image")
    before = listing(tmp_path)
    line = one_line(capsys, "plot_loss", [str(run), "--out", str(out), "--overwrite"], code=1)
    assert str(out) in line and os.strerror(errno.ENOSPC) in line
    assert listing(tmp_path) == before


def test_plot_out_in_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    run = good_run(tmp_path)
    before = listing(tmp_path)
    one_line(capsys, "plot_loss", [str(run), "--out", str(tmp_path / ("x" * 300) / "loss.png")], code=1)
    assert listing(tmp_path) == before


# ---- only what the command made is deleted or replaced -----------------------------------------------------------

def test_a_users_file_named_like_a_temporary_file_is_never_touched(tmp_path, capsys, monkeypatch):
    """plot_loss.py, embed.py and dual_mask/layer_cuts.py wrote their output to OUT.tmp (replacing a user's file of
    that name, then renaming it away) and removed OUT.tmp after a failure even when they had not made it."""
    from dual_mask import layer_cuts
    run = good_run(tmp_path)
    mine = {"loss.png.tmp": b"a user's file", "e.npy.tmp": b"another", "layer_cuts.json.tmp": b"and a third"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    assert importlib.import_module("plot_loss").main([str(run), "--out", str(tmp_path / "loss.png")]) == 0
    ckpt = save_checkpoint(tmp_path / "c.pt")
    (tmp_path / "in.txt").write_text("What is 2 + 3?\n")
    assert importlib.import_module("embed").main(["--checkpoint", ckpt, "--input", str(tmp_path / "in.txt"),
                                                  "--out", str(tmp_path / "e.npy")]) == 0
    monkeypatch.setattr(layer_cuts, "evaluate_checkpoint", lambda *a, **k: {"cuts": []})
    assert layer_cuts.main([ckpt, "--out", str(tmp_path / "layer_cuts.json")]) == 0
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data, name
    assert sorted(os.listdir(tmp_path)) == sorted([*mine, "run", "loss.png", "c.pt", "in.txt", "e.npy",
                                                   "layer_cuts.json"])


def test_layer_cuts_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from dual_mask import layer_cuts
    monkeypatch.setattr(layer_cuts, "evaluate_checkpoint", lambda *a, **k: {"cuts": []})
    monkeypatch.setattr(os, "replace", disk_full)  # the last step of every atomic write
    (tmp_path / "checkpoint.pt").write_bytes(b"not read: evaluate_checkpoint is replaced")
    before = listing(tmp_path)
    line = one_line(capsys, "dual_mask.layer_cuts", [str(tmp_path)], code=1)
    assert "layer_cuts.json" in line and os.strerror(errno.ENOSPC) in line
    assert listing(tmp_path) == before


# ---- the dual-mask sweep and its analysis: config.json, metrics.jsonl, layer_cuts.json, sweep_run.json ------------

def dual_run(folder, p_bw, config=None, metrics=None, cuts=None):
    folder.mkdir(parents=True)
    cfg = {"model_config": {"n_layer": 2, "n_embd": 32, "p_bw": p_bw}, "seed": 0, "n_params": 1000}
    (folder / "config.json").write_bytes(config if config is not None else json.dumps(cfg).encode())
    rows = b"".join(b'{"step": %d, "split": "val", "loss": 3.0, "loss_fw": 3.0, "loss_bw": 3.5}\n' % s for s in (0, 5))
    (folder / "metrics.jsonl").write_bytes(metrics if metrics is not None else rows)
    if cuts is not None:
        (folder / "layer_cuts.json").write_bytes(cuts)


BAD_RUN_FILES = {
    "config.json not UTF-8": dict(config=b'{"seed": "caf\xe9"}'),
    "config.json truncated": dict(config=b'{"model_config": {"n_layer": 2, "n_em'),
    "config.json a list": dict(config=b"[1, 2]"),
    "config.json without model_config": dict(config=b'{"seed": 0, "n_params": 10}'),
    "config.json with a size as text": dict(config=b'{"model_config": {"n_layer": "2", "n_embd": 32, "p_bw": 0.05}, '
                                                   b'"seed": 0, "n_params": 10}'),
    "metrics.jsonl with a JSON list": dict(metrics=b"[1, 2]\n"),
    "metrics.jsonl not UTF-8": dict(metrics=b'{"step": 0, "split": "val", "loss_fw": 1, "x": "\xe9"}\n'),
    "layer_cuts.json a list": dict(cuts=b"[1, 2]"),
    "layer_cuts.json truncated": dict(cuts=b'{"cuts": [{"layers": 2, "loss_fw"'),
    "layer_cuts.json rows without losses": dict(cuts=b'{"cuts": [{"layers": 2}]}'),
}


@pytest.mark.parametrize("case", list(BAD_RUN_FILES))
def test_analysis_skips_a_bad_run_folder_with_a_note(case, tmp_path, capsys):
    """A run folder whose files are not a dual-mask run's is skipped with a one-line note (the analysis' policy),
    never a traceback: a config.json holding a list ended in AttributeError, bad layer cuts in KeyError."""
    from dual_mask import analyze
    dual_run(tmp_path / "sweep" / "a", 0.0)
    dual_run(tmp_path / "sweep" / "b", 0.05, **BAD_RUN_FILES[case])
    capsys.readouterr()
    code = analyze.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "analysis")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and not (tmp_path / "analysis").exists()  # only p_bw 0 is left: nothing to compare
    assert len(err) == 2 and err[0].startswith(f"skip {tmp_path / 'sweep' / 'b'}: ") and err[1].startswith("error: ")


@pytest.mark.parametrize("content", [b"[1, 2]", b'"preset"', b"\xff\xfe", b'{"preset": "ti'])
def test_a_sweep_marker_that_is_not_an_object_is_refused_in_one_line(content, tmp_path, capsys):
    """A finished run's sweep_run.json holding a list was taken for "same settings" (the run skipped, whatever it
    was trained with); a string ended in a TypeError traceback."""
    run = tmp_path / "sweep" / "d2_w32_p0_s0"
    run.mkdir(parents=True)
    (run / "sweep_run.json").write_bytes(content)
    before = listing(tmp_path)
    assert "sweep_run.json" in one_line(capsys, "dual_mask.sweep", [
        "--out-dir", str(tmp_path / "sweep"), "--depths", "2", "--widths", "32", "--p-bw", "0", "--seeds", "0",
        "--dry-run"])
    assert listing(tmp_path) == before


# ---- Ctrl-C while a script still imports --------------------------------------------------------------------------

def entry_points():
    """Every script at the root that a user runs (it has an `if __name__ == "__main__":` block)."""
    return sorted(p.name for p in REPO.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.parametrize("script", entry_points())
def test_every_entry_point_imports_ctrl_c_first(script):
    """So that Ctrl-C during its imports (torch: a second or two) is one line and exit 130, not a traceback."""
    tree = ast.parse((REPO / script).read_text())
    first = next(node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
    assert isinstance(first, ast.ImportFrom) and first.module == "plumbing" and \
        [a.name for a in first.names] == ["ctrl_c"], f"{script}: the first import must be `from plumbing import ctrl_c`"


def interrupt_while_importing(script, args, cwd, marker):
    """Start `script`, send SIGINT as soon as it has mapped a shared library whose path holds `marker` (it is then
    importing torch or numpy: its own imports have not finished); (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    maps = f"/proc/{proc.pid}/maps"
    deadline = time.monotonic() + 30
    while os.path.exists(maps) and time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(maps) as f:
                if marker in f.read():
                    break
        except OSError:
            break
        time.sleep(0.002)
    else:
        if not os.path.exists(maps):  # not Linux: torch takes well over 0.3 s to import
            time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("script,marker", [("train_baseline_gpt2.py", "libtorch"), ("evaluate.py", "libtorch"),
                                           ("embed.py", "libtorch"), ("plot_loss.py", "numpy")])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(script, marker, tmp_path):
    """Ctrl-C in the first second or two (torch still importing) printed a 25-42 line KeyboardInterrupt traceback
    and ended with -2 (killed by SIGINT). Now one line, exit 130. "interrupted" alone is ctrl_c.py's line: the
    trainer's own Ctrl-C line says more, so the line also shows that the signal came during the imports."""
    args = ["--preset", "tiny", "--out-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")] \
        if script.startswith("train_") else ["--help"]
    for _ in range(3):  # retried only if the signal missed the imports (then the script ends its own way)
        code, err = interrupt_while_importing(script, args, tmp_path, marker)
        assert "Traceback" not in err and code != -signal.SIGINT, (code, err)
        if code == 130 and err.splitlines() == ["interrupted"]:
            break
    assert code == 130 and err.splitlines() == ["interrupted"], (code, err)
