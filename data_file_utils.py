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
"""
import enum
import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST_NAME = "manifest.json"
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
    if not path.is_file():
        raise DataError(f"no prepared dataset in {directory} ({MANIFEST_NAME} is missing); {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}); delete that folder and {hint}") from None
    _check_manifest(path, manifest, hint)
    return manifest


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
    `directory` must have that hash: otherwise DataError, in one line, before any work is done."""
    manifest = read_manifest(directory)
    found = data_hash(manifest)
    recorded = run_config.get("data_hash")
    if recorded is not None and recorded != found:
        raise DataError(f"the data under this run changed: {directory} holds dataset {found}, the run was trained on "
                        f"{recorded} (folder replaced, or the source file changed?); point --data-dir at the run's "
                        f"data (synthetic-math prepares again identically into a new --data-dir) or start a new run")
    return {"max_tokens": manifest.get("max_tokens"), "data_hash": found}
