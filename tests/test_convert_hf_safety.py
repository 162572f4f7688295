"""convert_hf.py destroys nothing: --overwrite replaces only what convert_hf.py wrote itself (an earlier to-hf
export, an lmsmall checkpoint), every other --out is refused in one line before any work, and a failed write
(disk full, no permission) is one line with nothing left behind."""

import contextlib
import errno
import os
import resource
import shutil
import signal
import stat

import pytest
import torch

from test_convert_hf import random_gpt2, save


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "gpt2-random"
    random_gpt2().save_pretrained(d)
    return d


def tiny_checkpoint(path, seed=0):
    from models import create_model
    torch.manual_seed(seed)
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320, block_size=32, n_layer=2, n_head=2,
                         n_embd=32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return str(save(model, path))


def tree(folder):
    """Everything under folder (hidden entries included): path -> file bytes, 'dir' or the link's target."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = open(p, "rb").read()
    return out


def one_line(capsys, code, expected_code, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def spy(monkeypatch, owner, name):
    """Record the calls of owner.name (still calling it): refusals must come before any work."""
    calls, real = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


# ---- to-hf -----------------------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project-like folder, the current directory: sources, .git, a run folder, other folders and files."""
    import transformers
    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (work / "train.py").write_text("print('hi')\n")
    tiny_checkpoint(str(work / "runs" / "a" / "checkpoint.pt"))
    (work / "runs" / "a" / "metrics.jsonl").write_text("{}\n")
    (work / "notes").mkdir()
    (work / "notes" / "todo.txt").write_text("keep me\n")
    (work / "afile.txt").write_text("a file\n")
    # a Hugging Face folder someone else wrote (save_pretrained): the same file names as an export, no marker
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_layer=1, n_head=2, n_embd=32,
                                                         n_positions=32)).save_pretrained(work / "someone_elses_hf")
    os.symlink("notes", work / "link")
    monkeypatch.chdir(work)
    return tmp_path


@pytest.mark.parametrize("out,words", [
    (".", ["current folder"]),                       # used to delete the whole folder, .git and sources included
    ("..", ["current folder"]),
    ("runs", ["checkpoint"]),                        # holds the run folder being read
    ("runs/a", ["checkpoint"]),                      # the run folder itself
    ("notes", ["not a folder written by"]),          # a folder with files of its own
    ("someone_elses_hf", ["not a folder written by", "lmsmall_export.json"]),
    ("afile.txt", ["is a file"]),
    ("afile.txt/hf", ["is a file"]),
    ("link", ["symbolic link"])])
@pytest.mark.parametrize("overwrite", [True, False])
def test_to_hf_refuses_every_out_it_did_not_write_before_any_work(out, words, overwrite, workdir, capsys,
                                                                  monkeypatch):
    import convert_hf
    before = tree(workdir)
    loads = spy(monkeypatch, convert_hf, "load_model")
    code = convert_hf.main(["to-hf", "--checkpoint", "runs/a", "--out", out] + ["--overwrite"] * overwrite)
    one_line(capsys, code, 2, *words)
    assert tree(workdir) == before and loads == []


def test_to_hf_overwrite_replaces_an_earlier_export_and_nothing_else(tmp_path, capsys):
    import transformers
    from convert_hf import EXPORT_MARKER, main
    first, second = tiny_checkpoint(str(tmp_path / "one.pt"), 0), tiny_checkpoint(str(tmp_path / "two.pt"), 1)
    out = tmp_path / "hf"
    assert main(["to-hf", "--checkpoint", first, "--out", str(out)]) == 0
    assert (out / EXPORT_MARKER).is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700
    one_line(capsys, main(["to-hf", "--checkpoint", second, "--out", str(out)]), 2, "already exists", "--overwrite")
    # the export being read is never the one replaced
    code = main(["to-hf", "--checkpoint", f"hf:{out}", "--out", str(out), "--overwrite"])
    one_line(capsys, code, 2, "checkpoint")

    assert main(["to-hf", "--checkpoint", second, "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "one.pt", "two.pt"]  # no staging folder left
    from auto_regressive_model import AutoRegressiveModel
    from checkpoint import load_model
    model, _ = load_model(second)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf.transformer.h[0].ln_1.weight, model.blocks[0].ln_1.weight.detach())

    (out / "my_notes.txt").write_text("mine\n")  # a file of the user's own: no longer only an export
    before = tree(tmp_path)
    code = main(["to-hf", "--checkpoint", first, "--out", str(out), "--overwrite"])
    one_line(capsys, code, 2, "did not write", "my_notes.txt")
    assert tree(tmp_path) == before


def test_to_hf_a_failed_swap_puts_the_earlier_export_back(tmp_path, capsys, monkeypatch):
    import convert_hf
    ckpt, out = tiny_checkpoint(str(tmp_path / "c.pt")), tmp_path / "hf"
    assert convert_hf.main(["to-hf", "--checkpoint", ckpt, "--out", str(out)]) == 0
    before = tree(tmp_path)
    real = os.replace

    def staging_cannot_move(src, dst):
        if str(dst) == str(out) and not moves:  # the new export's move into place (putting the old back works)
            moves.append(src)
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)
    moves = []
    monkeypatch.setattr(os, "replace", staging_cannot_move)
    code = convert_hf.main(["to-hf", "--checkpoint", ckpt, "--out", str(out), "--overwrite"])
    one_line(capsys, code, 1, "Input/output error")
    assert moves and tree(tmp_path) == before


# ---- from-hf ---------------------------------------------------------------------------------------

def test_from_hf_refuses_every_out_but_an_lmsmall_checkpoint_before_any_work(hf_dir, tmp_path, capsys,
                                                                              monkeypatch):
    import convert_hf
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "data.bin").write_bytes(b"\0" * 10)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"format": "something-else", "weights": torch.ones(3)}, tmp_path / "other.pt")
    os.symlink("other.pt", tmp_path / "link.pt")
    before = tree(tmp_path)
    loads = spy(monkeypatch, convert_hf, "from_hf")
    for out, words in [("folder", ["is a folder"]), ("notes.txt", ["not an lmsmall checkpoint"]),
                       ("other.pt", ["not an lmsmall checkpoint"]), ("link.pt", ["symbolic link"]),
                       ("notes.txt/x.pt", ["is a file"])]:
        code = convert_hf.main(["from-hf", "--model", str(hf_dir), "--out", str(tmp_path / out), "--overwrite"])
        one_line(capsys, code, 2, *words)
        assert tree(tmp_path) == before, out  # no .tmp left either
    assert loads == []


def test_from_hf_overwrite_replaces_a_checkpoint_and_no_file_beside_it(hf_dir, tmp_path, capsys):
    from auto_regressive_model import AutoRegressiveModel
    from checkpoint import load_model
    from convert_hf import main
    out = tmp_path / "gpt2.pt"
    tiny_checkpoint(str(out))
    (tmp_path / "gpt2.pt.tmp").write_text("the user's own file\n")  # was overwritten, then renamed away
    assert main(["from-hf", "--model", str(hf_dir), "--out", str(out), "--overwrite"]) == 0
    assert (tmp_path / "gpt2.pt.tmp").read_text() == "the user's own file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.pt", "gpt2.pt.tmp"]
    assert oct(stat.S_IMODE(os.stat(out).st_mode) & 0o044) == oct(0o044 & ~_umask())  # not mkstemp's 0600
    model, _ = load_model(str(out))
    assert model.config.n_embd == 64


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_from_hf_refuses_non_finite_weights(bad, hf_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from convert_hf import main
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    state = load_file(broken / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"][3, 5] = bad
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    before = tree(tmp_path)
    code = main(["from-hf", "--model", str(broken), "--out", str(tmp_path / "x.pt")])
    one_line(capsys, code, 2, "h.1.mlp.c_fc.weight", "nan or inf")
    assert tree(tmp_path) == before


# ---- a full disk -----------------------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_leaves_nothing(hf_dir, tmp_path, capsys, monkeypatch):
    import transformers
    import convert_hf
    ckpt = tiny_checkpoint(str(tmp_path / "c.pt"))
    assert convert_hf.main(["to-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "hf")]) == 0
    tiny_checkpoint(str(tmp_path / "old.pt"))
    before = tree(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(transformers.GPT2LMHeadModel, "save_pretrained", no_space)
        for out, more in [(tmp_path / "new" / "deeper" / "hf", []), (tmp_path / "hf", ["--overwrite"])]:
            code = convert_hf.main(["to-hf", "--checkpoint", ckpt, "--out", str(out), *more])
            one_line(capsys, code, 1, "No space left on device")
            assert tree(tmp_path) == before
    with monkeypatch.context() as m:
        m.setattr(convert_hf.torch, "save", no_space)
        for out, more in [(tmp_path / "new" / "deeper" / "x.pt", []), (tmp_path / "old.pt", ["--overwrite"])]:
            code = convert_hf.main(["from-hf", "--model", str(hf_dir), "--out", str(out), *more])
            one_line(capsys, code, 1, "No space left on device")
            assert tree(tmp_path) == before


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes beyond nbytes fail (EFBIG) in this process, as on a full disk: safetensors and torch.save then raise
    errors of their own (SafetensorError, RuntimeError), not OSError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_real_write_failure_is_one_line_and_leaves_nothing(hf_dir, tmp_path, capsys):
    import convert_hf
    ckpt = tiny_checkpoint(str(tmp_path / "c.pt"))  # its model.safetensors: 141 kB
    before = tree(tmp_path)
    with file_size_limit(64_000):
        code = convert_hf.main(["to-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "hf")])
    one_line(capsys, code, 1, "could not write", "hf")
    assert tree(tmp_path) == before
    with file_size_limit(1_000_000):  # the checkpoint: 13 MB
        code = convert_hf.main(["from-hf", "--model", str(hf_dir), "--out", str(tmp_path / "x.pt")])
    one_line(capsys, code, 1, "could not write", "x.pt")
    assert tree(tmp_path) == before
