"""
Small shared helpers of the data pipeline: errors, split names, dataset folders, shard names,
the manifest, and atomic file writes. Used by base_data_preparer.py (writes) and dataloader.py (reads).

On-disk layout of one prepared dataset (one folder per data source + tokenizer):

    data/synthetic-math__bytes/
        manifest.json            written LAST: a folder without it is not a dataset (yet)
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
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"lmsmall-split").digest(), "little")
    bucket = h % 100
    if bucket == 0:
        return Split.VAL
    if bucket == 1:
        return Split.TEST
    return Split.TRAIN


# ----------------------------------------------------------------------------- folders and names

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


def dataset_dir(data_dir, data_spec: str, tokenizer_name: str, seed: int | None = None) -> Path:
    """The folder of one prepared dataset, readable at a glance:
        synthetic-math  -> data/synthetic-math__bytes     (seed 1337, the default)
                        -> data/synthetic-math-seed7__bytes (another generator seed: another dataset)
        math-reasoning  -> data/math-reasoning__gpt2
        json:PATH       -> data/json-train-1a2b3c4d__gpt2   (file stem + short hash of the absolute path)
        text:PATH       -> data/text-notes-5e6f7a8b__bytes
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


def read_manifest(directory) -> dict:
    """The manifest of a prepared dataset; DataError when it is missing or unreadable."""
    path = Path(directory) / MANIFEST_NAME
    hint = "prepare it with: python base_data_preparer.py --data SPEC --tokenizer NAME"
    if not path.is_file():
        raise DataError(f"no prepared dataset in {directory} ({MANIFEST_NAME} is missing); {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}); delete that folder and {hint}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict) \
            or any(s.value not in manifest["splits"] for s in SPLITS):
        raise DataError(f"{path} is not a dataset manifest of this version; delete that folder and {hint}")
    return manifest
