"""A prepared dataset in use is never replaced under its reader, a run notices data that changed under it, the
preparer's inputs are bounded before anything is written, and an OSError is named by its real cause."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

import base_data_preparer as bdp  # noqa: E402
from data_file_utils import DataError, check_run_data, data_hash, read_manifest  # noqa: E402
from dataloader import TokenDataLoader  # noqa: E402

PREPARER = [sys.executable, str(REPO / "base_data_preparer.py")]
LINUX = sys.platform == "linux"


def jsonl(path: Path, n: int, start: int = 0):
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i % 7}?", "answer": f"#### {i + i % 7}"}) + "\n"
                            for i in range(start, start + n)), encoding="utf-8")


@pytest.fixture
def qa(tmp_path):
    """(source file, data dir, prepared dataset folder): 600 question/answer records, byte tokenizer."""
    src, data = tmp_path / "qa.jsonl", tmp_path / "data"
    jsonl(src, 600)
    return src, data, bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True)


def snapshot(folder: Path):
    """Name -> (size, mtime_ns, inode) of every file in a folder: a change, removal or rename-over shows."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()}


def cli(*args, timeout=120):
    return subprocess.run([*PREPARER, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, *needles):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def replace_cmd(src, data):
    return ("--data", f"json:{src}", "--tokenizer", "bytes", "--data-dir", data, "--num-workers", 1, "--quiet",
            "--replace")


READER = """
import sys
sys.path.insert(0, sys.argv[1])
from dataloader import TokenDataLoader
loader = TokenDataLoader(sys.argv[2], "train", 2, 16)
print(loader.tokens, flush=True)
sys.stdin.read()  # reads until the test closes our stdin
loader.next_batch()
"""


def start_reader(folder):
    """A process that opens the dataset with a TokenDataLoader and keeps it open until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", READER, str(REPO), str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc):
    """Close the reader's stdin (it reads one more batch and ends); its exit code, stdout and stderr."""
    if not proc.stdin.closed:
        proc.stdin.close()
    proc.stdin = None
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


# ----------------------------------------------------------------------------- a dataset in use

@pytest.mark.skipif(not LINUX, reason="flock and /proc/locks")
def test_replace_is_refused_while_another_process_reads_the_dataset(qa):
    src, data, folder = qa
    reader = start_reader(folder)
    try:
        assert int(reader.stdout.readline()) > 0  # the loader is open
        jsonl(src, 650)  # the source changed: --replace would build other data
        before = snapshot(folder)
        refused = cli(*replace_cmd(src, data))
        one_line_error(refused, str(folder), "being read", f"pid {reader.pid}", "wait for it to end")
        assert snapshot(folder) == before  # nothing built, nothing moved, nothing left over
    finally:
        code, _, err = stop(reader)
    assert code == 0, err  # the reader read on, undisturbed
    done = cli(*replace_cmd(src, data))
    assert done.returncode == 0, done.stderr  # no reader: the explicit replace goes ahead
    assert sum(s["documents"] for s in read_manifest(folder)["splits"].values()) == 650


@pytest.mark.skipif(not LINUX, reason="flock and /proc/locks")
def test_asking_for_a_dataset_in_use_without_replace_returns_it(qa):
    """A second run (or evaluate.py) on the same data while the first one reads it: no refusal, no wait."""
    src, data, folder = qa
    reader = start_reader(folder)
    try:
        assert int(reader.stdout.readline()) > 0
        before = snapshot(folder)
        again = cli("--data", f"json:{src}", "--tokenizer", "bytes", "--data-dir", data, "--quiet", timeout=60)
        assert again.returncode == 0 and again.stdout.strip() == str(folder), again.stderr
        assert snapshot(folder) == before
    finally:
        code, _, err = stop(reader)
    assert code == 0, err


def test_a_lock_path_that_is_no_file(qa):
    """.lock a folder (by hand): reading still works; preparing into that folder says what is in the way."""
    src, data, folder = qa
    (folder / ".lock").unlink()
    (folder / ".lock").mkdir()
    TokenDataLoader(folder, "train", 2, 16).next_batch()
    jsonl(src, 650)
    with pytest.raises(DataError, match=r"cannot write to .*\.lock.*\(Is a directory\)") as refused:
        bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True, replace=True)
    assert "\n" not in str(refused.value)


def start_run(src, data, run):
    """A tiny training run on json:src that evaluates at every step and would go on for a long time."""
    args = ["--preset", "tiny", "--data", f"json:{src}", "--data-dir", data, "--out-dir", run, "--max-steps", 100000,
            "--eval-interval", 1, "--eval-batches", 1, "--checkpoint-interval", 100000, "--n-layer", 1, "--n-head", 2,
            "--n-embd", 32, "--micro-batch-size", 2, "--seq-len", 32, "--total-batch-size", 64]
    proc = subprocess.Popen([sys.executable, str(REPO / "train_baseline_gpt2.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count('"val"') >= 2):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()
    return proc


@pytest.mark.skipif(not LINUX, reason="flock and /proc/locks")
def test_a_run_that_evaluates_every_step_keeps_its_data(qa, tmp_path):
    """The reported case: --replace while a run evaluates at every step. It killed the run ("manifest.json is
    missing") or, with an edited source, let it measure its later val/test rows on the new data."""
    src, data, folder = qa
    run = tmp_path / "run"
    proc = start_run(src, data, run)
    try:
        jsonl(src, 650)
        before = snapshot(folder)
        one_line_error(cli(*replace_cmd(src, data)), "being read", f"pid {proc.pid}")
        assert snapshot(folder) == before
        time.sleep(0.5)  # the run goes on evaluating: no error
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "error" not in err, err  # stopped by us, checkpoint saved
    config = json.loads((run / "config.json").read_text())
    assert config["data_hash"] == data_hash(read_manifest(folder))


def test_a_run_whose_data_change_under_it_stops_in_one_line(qa, tmp_path):
    """Data swapped under a running run by something that ignores the lock: its next evaluation stops it (it
    used to finish with exit 0, its later val/test rows measured on the new data)."""
    src, data, folder = qa
    jsonl(tmp_path / "other.jsonl", 600, start=10)
    other = bdp.prepare(f"json:{tmp_path / 'other.jsonl'}", "bytes", tmp_path / "data2", num_workers=1, quiet=True)
    run = tmp_path / "run"
    proc = start_run(src, data, run)
    recorded = json.loads((run / "config.json").read_text())["data_hash"]
    swap_in_other_data(folder, other)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the run went on with other data under it")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "data under this run changed" in lines[0] and recorded in lines[0]


@pytest.mark.skipif(not LINUX, reason="flock")
def test_a_reader_that_starts_during_a_preparation_waits_for_it(qa):
    """While the preparer holds the folder (here: the test, as --replace does while it moves the new files in),
    a reader waits and then reads the complete dataset, instead of failing on a folder in the middle of a swap."""
    import fcntl
    _, _, folder = qa
    with open(folder / ".lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "manifest.json").rename(folder / "manifest.moving")  # as in the middle of the swap
        reader = start_reader(folder)
        said = reader.stderr.readline()  # its first word: why it waits (it used to fail at once)
        assert "waiting" in said and "being prepared" in said and f"pid {os.getpid()}" in said, \
            said + reader.stderr.read()
        time.sleep(0.5)
        assert reader.poll() is None  # still waiting
        (folder / "manifest.moving").rename(folder / "manifest.json")
    code, out, err = stop(reader)
    assert code == 0 and int(out) == read_manifest(folder)["splits"]["train"]["tokens"], err


@pytest.mark.skipif(not LINUX, reason="flock and /proc/locks")
def test_replace_while_another_process_prepares_it_is_refused_not_queued(qa):
    import fcntl
    src, data, folder = qa
    with open(folder / ".lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a preparation of this folder in another process holds it
        try:
            refused = cli(*replace_cmd(src, data), timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("--replace waited behind another preparation")
    one_line_error(refused, "being prepared by another process", f"pid {os.getpid()}")


def swap_in_other_data(folder: Path, other: Path):
    """Replace a dataset's files by another's, as an older preparer did: each renamed over the old one, ignoring
    any lock. (A copy INTO a file an open loader has mapped would be worse: reading past its new end is SIGBUS.)"""
    for p in other.iterdir():
        if p.is_file() and p.name != ".lock":
            shutil.copyfile(p, folder / f".{p.name}.new")
            os.replace(folder / f".{p.name}.new", folder / p.name)


def test_data_changed_under_a_live_reader_stops_the_next_reader_in_one_line(qa, tmp_path):
    src, data, folder = qa
    jsonl(tmp_path / "other.jsonl", 600, start=10)
    other = bdp.prepare(f"json:{tmp_path / 'other.jsonl'}", "bytes", tmp_path / "data2", num_workers=1, quiet=True)
    old = data_hash(read_manifest(folder))
    train = TokenDataLoader(folder, "train", 2, 16)  # a run reads it
    swap_in_other_data(folder, other)
    with pytest.raises(DataError, match="data under this run changed") as changed:
        TokenDataLoader(folder, "val", 2, 16)  # its next evaluation
    message = str(changed.value)
    assert "\n" not in message and old in message and data_hash(read_manifest(other)) in message
    train.next_batch()  # the open loader still reads the files it opened
    del train
    TokenDataLoader(folder, "val", 2, 16)  # nobody reads the old data any more: a new reader is fine


def test_data_changed_between_the_runs_check_and_its_first_loader_is_refused(qa, tmp_path):
    """check_run_data records the hash a run trains on; the data may not change before its loaders open it."""
    src, data, folder = qa
    jsonl(tmp_path / "other.jsonl", 600, start=10)
    other = bdp.prepare(f"json:{tmp_path / 'other.jsonl'}", "bytes", tmp_path / "data2", num_workers=1, quiet=True)
    recorded = check_run_data(folder, {})["data_hash"]
    swap_in_other_data(folder, other)
    with pytest.raises(DataError, match="data under this run changed") as changed:
        TokenDataLoader(folder, "train", 2, 16)
    assert recorded in str(changed.value)


def test_this_process_may_replace_what_it_reads_but_never_mixes_the_two(qa):
    """A process does not lock itself out (a test, a notebook): its open loaders keep reading the files they
    opened, and a new loader in it refuses the new data for as long as one of them is open."""
    src, data, folder = qa
    old_loader = TokenDataLoader(folder, "train", 2, 16)
    first = old_loader.next_batch()
    jsonl(src, 650)
    bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True, replace=True)
    old_loader.reset()
    assert all((a == b).all() for a, b in zip(first, old_loader.next_batch()))  # the old data, intact
    with pytest.raises(DataError, match="data under this run changed"):
        TokenDataLoader(folder, "train", 2, 16)
    old_loader.close()
    assert TokenDataLoader(folder, "train", 2, 16).tokens == read_manifest(folder)["splits"]["train"]["tokens"]


# ----------------------------------------------------------------------------- bounded inputs

def test_max_tokens_beyond_what_a_file_can_give_is_refused_before_writing(tmp_path):
    src = tmp_path / "qa.jsonl"
    jsonl(src, 600)
    refused = cli("--data", f"json:{src}", "--tokenizer", "bytes", "--data-dir", tmp_path / "data",
                  "--max-tokens", "1e18", "--num-workers", 1)
    line = one_line_error(refused, "--max-tokens", f"{src.stat().st_size:,} bytes", "at most")
    assert "leave --max-tokens out" in line
    assert not (tmp_path / "data").exists()


def test_max_tokens_beyond_the_free_disk_is_refused_before_writing(tmp_path):
    """synthetic-math has no end: --max-tokens 1e40 wrote GBs of temporary shards and never stopped (cli.count
    now takes at most 2**63 - 1: 1e18 is as bad)."""
    try:
        refused = cli("--data", "synthetic-math", "--tokenizer", "bytes", "--data-dir", tmp_path / "data",
                      "--max-tokens", "1e18", "--num-workers", 1, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("--max-tokens 1e18 was accepted: still writing after 60 s")
    one_line_error(refused, "--max-tokens", "free", "3 bytes a token")
    assert not (tmp_path / "data").exists()


def test_free_disk_bounds_every_preparation_and_replace_keeps_the_old_data(qa, monkeypatch):
    import collections
    src, data, folder = qa
    before = snapshot(folder)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(bdp.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 5000, 5000))
    with pytest.raises(DataError, match=r"needs about .* free .*free some space") as refused:
        bdp.prepare("synthetic-math", "bytes", data, max_tokens=100_000, num_workers=1, quiet=True)
    assert "\n" not in str(refused.value) and not (data / "synthetic-math-100k__bytes").exists()
    jsonl(src, 650)
    with pytest.raises(DataError, match="free some space"):
        bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True, replace=True)
    assert snapshot(folder) == before


def test_num_workers_is_bounded(tmp_path):
    one_line_error(cli("--data", "synthetic-math", "--tokenizer", "bytes", "--data-dir", tmp_path / "data",
                       "--max-tokens", "10k", "--num-workers", 100_000), "--num-workers")
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- an OSError, named by its cause

@pytest.mark.parametrize("code,says,never", [
    (errno.ENOSPC, "free some space", "permission"),
    (errno.EDQUOT, "free some space", "permission"),
    (errno.EACCES, "permission", "free some space"),
    (errno.EPERM, "permission", "free some space"),
    (errno.EAGAIN, os.strerror(errno.EAGAIN), "free some space"),
    (errno.EMFILE, os.strerror(errno.EMFILE), "free some space"),
])
def test_an_os_error_while_preparing_is_named_by_its_errno(tmp_path, monkeypatch, code, says, never):
    def fail(self):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(bdp.ShardWriter, "_open", fail)
    with pytest.raises(DataError) as e:
        bdp.prepare("synthetic-math", "bytes", tmp_path / "data", max_tokens=20_000, num_workers=1, quiet=True)
    assert says in str(e.value) and never not in str(e.value).lower() and "\n" not in str(e.value)
    assert not [p for p in (tmp_path / "data" / "synthetic-math-20k__bytes").iterdir() if p.name != ".lock"]


def test_a_failed_preparation_removes_the_shards_it_wrote_and_nothing_else(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "synthetic-math-60k__bytes"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    real_open, opened = bdp.ShardWriter._open, []

    def full_after_a_while(self):
        opened.append(1)
        if len(opened) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_open(self)
    monkeypatch.setattr(bdp.ShardWriter, "_open", full_after_a_while)
    with pytest.raises(DataError, match="No space left on device.*free some space"):
        bdp.prepare("synthetic-math", "bytes", tmp_path / "data", max_tokens=60_000, shard_tokens=5_000,
                    num_workers=1, quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "notes.txt"]


@pytest.mark.parametrize("what", ["shard", "manifest"])
def test_an_os_error_while_reading_a_dataset_is_named_by_its_errno(qa, monkeypatch, what):
    _, _, folder = qa
    real_open, real_read_text = open, Path.read_text

    def no_access(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    if what == "shard":  # as for a shard of another user: open() fails
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: no_access() if str(p).endswith(".bin")
                            else real_open(p, *a, **k))
    else:  # read_bytes: how read_manifest reads it now; read_text: how it read it before
        real_read_bytes = Path.read_bytes
        monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: no_access() if p.name == "manifest.json"
                            else real_read_text(p, *a, **k))
        monkeypatch.setattr(Path, "read_bytes", lambda p: no_access() if p.name == "manifest.json"
                            else real_read_bytes(p))
    with pytest.raises(DataError) as e:
        TokenDataLoader(folder, "train", 2, 16)
    assert "Permission denied" in str(e.value) and "delete" not in str(e.value)  # no advice to delete good data


# ----------------------------------------------------------------------------- deletes only its own files

def test_a_leftover_staging_folder_with_foreign_files_is_not_emptied(qa):
    src, data, folder = qa
    staging = folder / ".replacing"
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    (staging / "train_000000.bin").write_bytes(b"\0\0")  # what an interrupted --replace leaves
    jsonl(src, 650)
    with pytest.raises(DataError, match=r"\.replacing.*notes.txt") as refused:
        bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True, replace=True)
    assert "\n" not in str(refused.value)
    assert (staging / "notes.txt").read_text() == "mine"
    (staging / "notes.txt").unlink()
    bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True, replace=True)  # only ours left: cleared
    assert not staging.exists()


@pytest.mark.parametrize("what", ["file", "link"])
def test_a_staging_path_that_is_no_folder_is_refused_in_one_line(qa, tmp_path, what):
    src, data, folder = qa
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train_000000.bin").write_bytes(b"keep")
    if what == "file":
        (folder / ".replacing").write_text("not a folder")
    else:
        (folder / ".replacing").symlink_to(elsewhere)
    before = snapshot(folder)
    refused = cli(*replace_cmd(src, data))
    one_line_error(refused, ".replacing")
    assert snapshot(folder) == before and (elsewhere / "train_000000.bin").read_bytes() == b"keep"


def test_replace_removes_only_the_files_of_the_old_dataset(qa):
    src, data, folder = qa
    (folder / "notes.txt").write_text("mine")
    (folder / "README").write_text("mine too")
    jsonl(src, 50)  # fewer documents: fewer shards than before
    bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True, replace=True, shard_tokens=300)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "README").read_text() == "mine too"


# ----------------------------------------------------------------------------- damaged files, one line each

def manifest_variants(good: bytes):
    return {"truncated": good[:len(good) // 2], "non-utf8": b"\xff\xfe" + good, "a list": b"[1, 2]\n",
            "a string": b'"manifest"\n', "splits a list": json.dumps({"splits": []}).encode(), "empty": b""}


@pytest.mark.parametrize("variant", list(manifest_variants(b"{}")) + ["a folder"])
def test_a_damaged_manifest_is_one_line_everywhere(qa, variant):
    src, data, folder = qa
    path = folder / "manifest.json"
    if variant == "a folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(manifest_variants(path.read_bytes())[variant])
    before = snapshot(folder)
    with pytest.raises(DataError) as loading:
        TokenDataLoader(folder, "train", 2, 16)
    with pytest.raises(DataError) as preparing:
        bdp.prepare(f"json:{src}", "bytes", data, num_workers=1, quiet=True)
    for e in (loading, preparing):
        assert "\n" not in str(e.value) and "manifest.json" in str(e.value)
        if variant == "a folder":
            assert "is missing" not in str(e.value) and "not a file" in str(e.value)
    assert snapshot(folder) == before


def test_a_shard_that_is_a_folder_is_named_so(qa):
    _, _, folder = qa
    shard = folder / read_manifest(folder)["splits"]["train"]["shards"][0]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(DataError, match="is not a file"):
        TokenDataLoader(folder, "train", 2, 16)


@pytest.mark.parametrize("content,says", [
    (b'{"question": "What is 1 + 1?", "answer": "#### 2"}\n{"question": "What is', "line 2 is not valid JSON"),
    (b'{"text": "one"}\n"just a string"\n', "line 2 is a JSON str, not an object"),
    (b'{"text": "one"}\n{"text": "caf\xe9"}\n', "line 2 is not valid UTF-8"),
    (b'\x00\x01\x02binary\n', "line 1 is not valid"),
])
def test_damaged_json_sources_are_one_line(tmp_path, content, says):
    src = tmp_path / "src.jsonl"
    src.write_bytes(content)
    one_line_error(cli("--data", f"json:{src}", "--tokenizer", "bytes", "--data-dir", tmp_path / "data",
                       "--num-workers", 1), says)
    assert not list((tmp_path / "data").rglob("*.bin")) if (tmp_path / "data").exists() else True


def test_a_non_utf8_file_in_a_text_folder_is_named(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"note {i}\n")
    (folder / "bad.txt").write_bytes(b"fine\ncaf\xe9\n")
    one_line_error(cli("--data", f"text:{folder}", "--tokenizer", "bytes", "--data-dir", tmp_path / "data",
                       "--num-workers", 1), "bad.txt", "line 2 is not valid UTF-8")


def test_sources_of_the_wrong_type_are_one_line(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    one_line_error(cli("--data", f"json:{tmp_path / 'folder.jsonl'}", "--tokenizer", "bytes", "--data-dir",
                       tmp_path / "data"), "is a folder")
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 4)  # a binary file given as text
    one_line_error(cli("--data", f"text:{tmp_path / 'image.txt'}", "--tokenizer", "bytes", "--data-dir",
                       tmp_path / "data", "--num-workers", 1), "not valid UTF-8")
    assert not list((tmp_path / "data").rglob("*.bin")) if (tmp_path / "data").exists() else True
