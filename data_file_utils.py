"""
Small shared helpers of the data pipeline: errors, split names, dataset folders, shard names,
the manifest, and atomic file writes. Used by base_data_preparer.py (writes) and dataloader.py (reads).

On-disk layout of one prepared dataset (one folder per request: source, seed, budget, tokenizer):

    data/synthetic-math-10M__bytes/
        manifest.json            written LAST: a folder without it is not a dataset (yet); a folder with it
                                 is complete and never changed again (base_data_preparer.py refuses to)
        train_000000.bin         flat uint16 token ids, <|endoftext|> before every document
        train_000000.mask.bin    optional uint8 loss mask, one byte per token (1 = answer token)
        val_000000.bin ...
        .lock                    the lock file: readers hold a shared lock on it, the preparer an exclusive one

Readers and the preparer meet on .lock (fcntl.flock: the kernel drops a lock when its process ends, however it
ends). Whoever reads a prepared dataset holds a SHARED lock for as long as it reads (hold_dataset: a
TokenDataLoader from its creation until it is closed or collected, check_run_data until the run's first loader
takes over). base_data_preparer.py takes the EXCLUSIVE lock without waiting before it builds anything, so
--replace is refused while anyone reads the dataset, and a reader that starts while a preparation runs waits
until the dataset is complete. Within one process, every reader of a folder must see the same data_hash:
data changed under a reader (by a command that ignores the lock) stops the next one in one line.
"""
import enum
import errno
import hashlib
import json
import os
import re
import sys
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, nothing is locked there
    fcntl = None

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
FORMAT_VERSION = 1
TOKEN_DTYPE = "uint16"  # every supported vocabulary is < 65536 tokens: 2 bytes per token
MASK_DTYPE = "uint8"


class DataError(Exception):
    """A bad input, explained in one line that says what is wrong and what to do.
    Entry points print `error: <message>` and exit 2, without a traceback."""


class Split(str, enum.Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


SPLITS = (Split.TRAIN, Split.VAL, Split.TEST)


def split_of_text(text: str) -> Split:
    """Which split a document belongs to, decided by a hash of its text (~98% train, 1% val, 1% test).
    A hash (not the position in the file, not the shard index) keeps the splits disjoint and stable:
    the same document always lands in the same split, however the corpus is ordered or cut.
    `text` may also be a key that says which problem a document is (synthetic-math passes
    synthetic_math.problem_key), so that every wording of one problem lands in the same split."""
    return split_of_hash(split_hash(text))


def qa_split_text(question: str, answer: str) -> str:
    """What decides the split of a question/answer record (json:PATH): the text the preparer writes for it.
    Every later record with the same question (whitespace aside) takes the split of the first one
    (same_question), so that no held-out question is also a training question."""
    return f"Question: {question}\nAnswer: {answer}"


def same_question(question: str) -> bytes:
    """A short digest that is equal for questions that differ only in whitespace."""
    return hashlib.blake2b(" ".join(question.split()).encode("utf-8"), digest_size=8).digest()


def split_hash(text: str) -> int:
    """The 64-bit hash that decides a document's split; twins (same text or key) have the same one."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"lmsmall-split").digest()
    return int.from_bytes(digest, "little")


def split_of_hash(h: int) -> Split:
    bucket = h % 100
    if bucket == 0:
        return Split.VAL
    if bucket == 1:
        return Split.TEST
    return Split.TRAIN


# ----------------------------------------------------------------------------- folders and names

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


def format_count(n: int) -> str:
    """10_000_000 -> '10M', 400_000 -> '400k', 123_456 -> '123456' (exact; cli.count reads it back)."""
    for unit, scale in (("B", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def dataset_dir(data_dir, data_spec: str, tokenizer_name: str, seed: int | None = None,
                max_tokens: int | None = None) -> Path:
    """The folder of one prepared dataset. Everything that changes the data is in its name, so that
    different requests never share (and never overwrite) a folder:
        synthetic-math, 10M tokens  -> data/synthetic-math-10M__bytes
        another generator seed      -> data/synthetic-math-seed7-10M__bytes
        math-reasoning, 100M        -> data/math-reasoning-100M__gpt2
        json:PATH, the whole file   -> data/json-train-1a2b3c4d__gpt2      (file stem + short hash of the absolute path)
        text:PATH, 5M tokens        -> data/text-notes-5e6f7a8b-5M__bytes
    max_tokens None: the whole source (json/text only; the others always have a budget).
    """
    from_default_seed = seed is None or seed == 1337
    if ":" in data_spec and data_spec.split(":", 1)[0] in ("json", "text"):
        kind, path = data_spec.split(":", 1)
        absolute = str(Path(path).expanduser().resolve())
        short = hashlib.sha1(absolute.encode("utf-8")).hexdigest()[:8]
        name = f"{kind}-{_slug(Path(path).stem)}-{short}"
    else:
        name = _slug(data_spec)
        if data_spec == "synthetic-math" and not from_default_seed:
            name += f"-seed{seed}"
    if max_tokens is not None:
        name += f"-{format_count(int(max_tokens))}"
    return Path(data_dir) / f"{name}__{tokenizer_name}"


def shard_name(split, index: int) -> str:
    return f"{Split(split).value}_{index:06d}.bin"


def mask_shard_name(split, index: int) -> str:
    return f"{Split(split).value}_{index:06d}.mask.bin"


# Everything the preparer may write into a dataset folder. Only files matching this are ever removed
# when a preparation starts over; anything else a user put there is left alone.
OWNED_FILE = re.compile(r"^(\.?(train|val|test)_\d{6}(\.mask)?\.bin(\.tmp-\d+)?|manifest\.json|\.manifest\.json\..*\.tmp)$")


# ----------------------------------------------------------------------------- atomic writes

def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash, even kill -9) sees the old file or the
    complete new one, never a half-written file: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(directory, manifest: dict) -> None:
    atomic_write_bytes(Path(directory) / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


# A shard name in a manifest is a plain file name inside the dataset folder: no path separators, no
# "..", not hidden. (A manifest is only ever written by base_data_preparer.py; this keeps an edited or
# foreign one from pointing the loader at files elsewhere.)
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_manifest(path: Path, manifest, hint: str) -> None:
    """DataError (one line) unless `manifest` has the fields the loader reads, of the right types."""
    def bad(what):
        raise DataError(f"{path}: {what}; the manifest was edited or damaged: delete that folder and {hint}")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict) \
            or any(not isinstance(manifest["splits"].get(s.value), dict) for s in SPLITS):
        raise DataError(f"{path} is not a dataset manifest of this version; delete that folder and {hint}")
    vocab, eot = manifest.get("vocab_size"), manifest.get("eot_token")
    if not _is_count(vocab) or not 0 < vocab <= 65536 or not _is_count(eot) or eot >= vocab:
        bad(f"vocab_size {vocab!r} / eot_token {eot!r} are not a vocabulary of uint16 token ids")
    for s in SPLITS:
        info = manifest["splits"][s.value]
        shards, masks, sizes = info.get("shards"), info.get("mask_shards", []), info.get("shard_tokens")
        if not isinstance(shards, list) or not isinstance(masks, list) or not isinstance(sizes, list) \
                or len(sizes) != len(shards) or (masks and len(masks) != len(shards)) \
                or not all(_is_count(n) for n in sizes) or not _is_count(info.get("tokens")):
            bad(f"the {s.value} split's shards, mask_shards, shard_tokens and tokens do not fit together")
        for name in shards + masks:
            if not isinstance(name, str) or not PLAIN_NAME.match(name):
                bad(f"shard name {name!r} is not a plain file name inside the dataset folder")


def read_manifest(directory) -> dict:
    """The manifest of a prepared dataset, checked; DataError when it is missing, unreadable or malformed."""
    path = Path(directory) / MANIFEST_NAME
    hint = "prepare it with: python base_data_preparer.py --data SPEC --tokenizer NAME"
    try:
        raw = path.read_bytes() if path.is_file() else None
    except FileNotFoundError:
        raw = None
    except OSError as e:  # permissions, I/O: the data may be fine, so no advice to delete them
        raise DataError(f"cannot read {path} ({os_error_reason(e)}); {os_error_advice(e, 'read')}") from None
    if raw is None:
        if path.exists() or path.is_symlink():
            raise DataError(f"{path} is not a file; a dataset's manifest is a JSON file: move that away and {hint}")
        raise DataError(f"no prepared dataset in {directory} ({MANIFEST_NAME} is missing); {hint}")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (damaged); delete that folder and {hint}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is unreadable (not JSON: {e.msg}, damaged or cut short); delete that folder and "
                        f"{hint}") from None
    _check_manifest(path, manifest, hint)
    return manifest


# ----------------------------------------------------------------------------- OSError, by its cause

def os_error_reason(e: OSError) -> str:
    """The system's words for an OSError: 'No space left on device', 'Permission denied', ..."""
    return e.strerror or str(e) or type(e).__name__


def os_error_advice(e: OSError, doing: str = "write") -> str:
    """What to do about an OSError, from its errno: a full disk, a permission, or else whatever it says."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "free some space or choose another --data-dir, then run again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ("check that path's permissions (or choose another --data-dir), then run again" if doing == "write"
                else "check that path's permissions, then run again")
    if e.errno in (errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return "the system is short of processes, files or memory: run again with fewer --num-workers"
    return "check that path or choose another --data-dir, then run again" if doing == "write" else \
        "check that path, then run again"


# ----------------------------------------------------------------------------- readers and the preparer
#
# See the top of this file. A hold is one shared lock (one open file of .lock) with the data hash seen under it.

def lock_holders(path) -> list:
    """(pid, "READ" or "WRITE") of the processes holding a flock on `path`, from /proc/locks; [] where there is
    none (not Linux) or none holds it. Requests still waiting ("->") are not holders."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    found, anywhere = [], []
    for line in lines:  # "1: FLOCK  ADVISORY  READ 1234 fe:00:2147489 0 EOF"
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK":
            continue
        try:
            major, minor, inode = f[5].split(":")
            if int(inode) != st.st_ino:
                continue
            same_device = (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev))
            (found if same_device else anywhere).append((int(f[4]), f[3]))
        except ValueError:
            continue
    return found or anywhere  # some filesystems (overlays) report another device number there


def describe_pids(pids) -> str:
    pids = sorted(set(pids))
    return "pid " + str(pids[0]) if len(pids) == 1 else "pids " + ", ".join(map(str, pids))


def lock_shared(f, directory) -> None:
    """A shared flock on the open lock file f; waits (and says so) while a preparation of `directory` runs."""
    if fcntl is None:
        return
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    except OSError:  # no locks on this filesystem: nothing to coordinate with
        return
    who = describe_pids(pid for pid, kind in lock_holders(f.name) if kind == "WRITE") if sys.platform == "linux" else ""
    print(f"waiting: {directory} is being prepared by another process{f' ({who})' if who else ''}; it is read "
          f"once complete", file=sys.stderr, flush=True)
    fcntl.flock(f, fcntl.LOCK_SH)


def open_lock_for_reading(directory):
    """The dataset's lock file opened for a shared lock, or None where there is none to take: not a dataset
    (read_manifest then says so), or a folder this process may not write that has no lock file yet."""
    path = Path(directory) / LOCK_NAME
    try:
        if path.is_file():
            return open(path, "rb")
        if (Path(directory) / MANIFEST_NAME).is_file():  # a dataset copied without its hidden lock file
            return open(path, "ab")
    except OSError:
        pass
    return None


class DatasetHold:
    """This process reads the dataset in `directory`: a shared lock on its lock file (None: no lock possible)
    and the data hash it saw under that lock. The lock is released when the hold is closed or collected."""

    def __init__(self, directory, file, data_hash_seen: str):
        self.key = str(Path(directory).resolve())
        self.file, self.data_hash, self.open = file, data_hash_seen, True
        _live_holds.add(self)

    def close(self):
        self.open = False
        if self.file is not None:
            self.file.close()  # closing the file drops its flock
            self.file = None

    def __del__(self):
        self.close()


_live_holds = weakref.WeakSet()  # every hold of this process that is still open
_run_holds = {}  # folder -> the hold check_run_data took for a run, until the run's first loader has its own


def own_holds(directory) -> list:
    """The open holds of this process on `directory` (the preparer lets them through: no process locks itself out)."""
    key = str(Path(directory).resolve())
    return [h for h in list(_live_holds) if h.key == key and h.open]


def hold_dataset(directory):
    """Start reading the prepared dataset in `directory`: returns (hold, manifest), the manifest read under a
    shared lock. Keep the hold for as long as you read; while it is open, --replace is refused. DataError if the
    data differ from what another open reader of this process saw (changed under it)."""
    f = open_lock_for_reading(directory)
    try:
        if f is not None:
            lock_shared(f, directory)
        manifest = read_manifest(directory)
    except BaseException:
        if f is not None:
            f.close()
        raise
    found = data_hash(manifest)
    seen = {h.data_hash for h in own_holds(directory)} - {found}
    if seen:
        if f is not None:
            f.close()
        raise DataError(f"the data under this run changed: {directory} now holds dataset {found}, but this process "
                        f"has been reading dataset {seen.pop()} from it (replaced by a command that ignores its "
                        f"lock?); what it computed so far belongs to the old data: start again (with --resume, if "
                        f"the old data come back) or start a new run")
    return DatasetHold(directory, f, found), manifest


def release_run_hold(directory) -> None:
    """The run's first loader of `directory` holds it now: check_run_data's hold may go."""
    _run_holds.pop(str(Path(directory).resolve()), None)


# ----------------------------------------------------------------------------- the identity of a dataset

def data_hash(manifest: dict) -> str:
    """A short hash that names a prepared dataset's contents, from its manifest (cheap: nothing else is read).
    It covers the token ids of every split in order (content_hash, computed while the shards were written),
    the loss-mask bytes (mask_hash), the per-split document/token/byte counts, the tokenizer and vocabulary.
    Not covered: the shard layout (--shard-tokens), the source path, timings. A shard file edited in place
    after preparation is not detected here (the loader checks sizes and token ids when it opens a dataset)."""
    identity = {k: manifest.get(k) for k in ("tokenizer", "vocab_size", "eot_token", "dtype", "has_loss_mask",
                                             "content_hash", "mask_hash")}
    identity["splits"] = {s.value: [manifest["splits"][s.value].get(k) for k in ("documents", "tokens", "bytes")]
                          for s in SPLITS}
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode("utf-8"), digest_size=8).hexdigest()


def check_run_data(directory, run_config: dict) -> dict:
    """What a run records about its data: {"max_tokens": the budget actually used, "data_hash": ...}.
    If run_config already holds a data_hash (a resumed run, a checkpoint being evaluated), the data in
    `directory` must have that hash: otherwise DataError, in one line, before any work is done.
    From here on the data are held (see hold_dataset) until the run's first TokenDataLoader holds them itself:
    nothing can replace them between this check and the loaders."""
    hold, manifest = hold_dataset(directory)
    found = hold.data_hash
    recorded = run_config.get("data_hash")
    if recorded is not None and recorded != found:
        raise DataError(f"the data under this run changed: {directory} holds dataset {found}, the run was trained on "
                        f"{recorded} (folder replaced, or the source file changed?); point --data-dir at the run's "
                        f"data (synthetic-math prepares again identically into a new --data-dir) or start a new run")
    _run_holds[hold.key] = hold
    return {"max_tokens": manifest.get("max_tokens"), "data_hash": found}
