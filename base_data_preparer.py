"""
Turns a data source into tokenized shards + a manifest, ready for dataloader.py.

    python base_data_preparer.py --data synthetic-math --tokenizer bytes
    python base_data_preparer.py --data json:../shared/data/gsm8k/train.jsonl --tokenizer gpt2
    python base_data_preparer.py --data math-reasoning --tokenizer gpt2 --max-tokens 100M

Data sources (--data):
    synthetic-math   built-in generator (synthetic_math.py), offline, deterministic from --seed; default 10M tokens
    math-reasoning   the seed's Hugging Face sets, streamed: ajibawa-2023/Maths-College (instruction + output),
                     then open-web-math/open-web-math (text), each up to half of --max-tokens (default 100M)
    json:PATH        JSON lines. A record with string fields "question" and "answer" (GSM8K) becomes
                     "Question: {question}\\nAnswer: {answer}"; any other record becomes its string fields joined
                     by "\\n". If the first record is a question/answer pair, loss-mask shards mark the answers
                     (records without a question then count as all answer)
    text:PATH        a UTF-8 text file whose documents are separated by blank lines,
                     or a folder in which every *.txt file (recursively) is one document

What it guarantees:
  - split by DOCUMENT: a hash of the document text (of the question, for synthetic-math) puts it in
    train/val/test (~98/1/1); a document is never in two splits; each split gets at least one document.
  - deterministic: the same source, tokenizer, seed and budget give the same bytes, whatever --num-workers.
  - crash safe: shards are written under a temporary name and renamed when complete; manifest.json is
    written last (atomically). A folder without a manifest is not a dataset; a rerun starts it over.
  - idempotent: if a complete dataset for the same request exists, prepare() returns at once.
  - concurrent callers (e.g. every DDP rank) are serialised by a lock file; one prepares, the others reuse.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tiktoken
from tqdm import tqdm

import synthetic_math
from data_file_utils import (FORMAT_VERSION, MASK_DTYPE, OWNED_FILE, SPLITS, TOKEN_DTYPE, DataError, Split,
                             dataset_dir, mask_shard_name, read_manifest, shard_name, split_of_text, write_manifest)

EOT = "<|endoftext|>"
TOKENIZERS = ("gpt2", "bytes")
DATA_SPECS = ("synthetic-math", "math-reasoning", "json:PATH", "text:PATH")
DEFAULT_SEED = 1337
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
DEFAULT_MAX_TOKENS = {"synthetic-math": 10_000_000, "math-reasoning": 100_000_000}  # json/text: the whole file
OFFLINE_CHOICES = "offline choices: --data synthetic-math, --data json:PATH (JSON lines), --data text:PATH"

# The math-reasoning corpora, in order: (datasets.load_dataset args, its keyword args, the string fields
# joined with "\n" into one document, share of the token budget). A source that runs dry hands its unused
# share to the next. Tests point these at local JSON files: (("json",), {"data_files": path, "split": "train"}, ...)
MATH_REASONING_SOURCES = [
    (("ajibawa-2023/Maths-College",), {"split": "train"}, ("instruction", "output"), 0.5),
    (("open-web-math/open-web-math",), {"split": "train"}, ("text",), 0.5),
]

TASK_CHARS = 1_000_000  # documents are handed to the workers in batches of about this many characters


# ----------------------------------------------------------------------------- tokenizers

_BYTES_ENCODING = None


def get_tokenizer(name: str) -> tiktoken.Encoding:
    """'gpt2' (50257 tokens, via tiktoken's cache or download) or 'bytes' (256 byte values + <|endoftext|>)."""
    global _BYTES_ENCODING
    if name == "bytes":
        if _BYTES_ENCODING is None:
            # No merges: every byte is its own token, so the split pattern only needs to cover all text
            # (long pieces are faster). Needs no download.
            _BYTES_ENCODING = tiktoken.Encoding(
                name="bytes", pat_str=r"[^\n]+\n?|\n",
                mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})
        return _BYTES_ENCODING
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no cache and no network, a corrupt cache file, ...
            raise DataError(f"the gpt2 tokenizer files are not available ({type(e).__name__}); set TIKTOKEN_CACHE_DIR "
                            f"to a folder holding them (e.g. ../shared/tiktoken-cache), connect to the internet once, "
                            f"or use --tokenizer bytes") from None
    raise DataError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")


# ----------------------------------------------------------------------------- tokenizing (runs in the workers)
#
# A document is (prompt, body, split_key): the tokens of `prompt` get loss mask 0, those of `body` mask 1;
# the document text is prompt + body; split_key (None: the text) is hashed to pick the split.
# A worker turns a task (a batch of documents) into one flat token array, <|endoftext|> before each document.

_worker_encoding = None


def _init_worker(tokenizer_name):
    global _worker_encoding
    _worker_encoding = get_tokenizer(tokenizer_name)


def _encode_pieces(enc, pieces):
    """Tokens of [EOT, piece0, EOT, piece1, ...]. Each piece is tokenized on its own (tiktoken splits the
    text at special tokens first), so joining them with EOT and encoding once is exact, and much faster
    than one call per piece. A piece that itself contains the text '<|endoftext|>' is encoded as text."""
    if enc.name == "bytes":
        # Fast path, same result as enc.encode (tested): a byte-level token id is the byte value.
        data = [p.encode("utf-8") for p in pieces]
        sizes = np.fromiter(map(len, data), dtype=np.int64, count=len(data)) + 1
        out = np.empty(int(sizes.sum()), dtype=np.uint16)
        is_eot = np.zeros(len(out), dtype=bool)
        is_eot[np.cumsum(sizes) - sizes] = True
        out[is_eot] = enc.eot_token
        out[~is_eot] = np.frombuffer(b"".join(data), dtype=np.uint8)
        return out
    if any(EOT in p for p in pieces):
        out = []
        for p in pieces:
            out.append(enc.eot_token)
            out.extend(enc.encode_ordinary(p))
        return np.array(out, dtype=np.uint16)
    return np.fromiter(enc.encode(EOT + EOT.join(pieces), allowed_special={EOT}), dtype=np.uint16)


def tokenize_documents(enc, docs, with_mask):
    """docs -> dict(tokens uint16, mask uint8|None, lengths, splits, nbytes): per-document arrays in order."""
    eot = enc.eot_token
    if with_mask:  # prompt and body as separate pieces, so that the mask boundary is a token boundary
        ids = _encode_pieces(enc, [x for prompt, body, _ in docs for x in (prompt, body)])
        eots = np.flatnonzero(ids == eot)  # [doc0, body0, doc1, body1, ...] starts
        step = np.zeros(len(ids), dtype=np.int8)
        step[eots[1::2]] = 1    # a body begins
        step[eots[2::2]] = -1   # the next document begins
        in_body = np.cumsum(step, dtype=np.int8).astype(np.uint8)
        keep = np.ones(len(ids), dtype=bool)
        keep[eots[1::2]] = False  # drop the EOT between prompt and body: it only marked the boundary
        tokens, mask = ids[keep], in_body[keep]
        starts = eots[0::2] - np.arange(len(docs))
    else:
        tokens = _encode_pieces(enc, [prompt + body for prompt, body, _ in docs])
        mask = None
        starts = np.flatnonzero(tokens == eot)
    lengths = np.diff(np.append(starts, len(tokens)))
    splits = np.empty(len(docs), dtype=np.uint8)
    nbytes = np.empty(len(docs), dtype=np.int64)
    split_index = {s: i for i, s in enumerate(SPLITS)}
    for i, (prompt, body, key) in enumerate(docs):
        text = prompt + body
        nbytes[i] = len(text.encode("utf-8"))
        splits[i] = split_index[split_of_text(text if key is None else key)]
    assert len(lengths) == len(docs), "document boundaries lost while tokenizing"
    return dict(tokens=tokens, mask=mask, lengths=lengths, splits=splits, nbytes=nbytes)


def _synthetic_docs(seed, chunk):
    return [(f"Question: {p['question']}\nAnswer:", " " + p["answer"], p["question"])
            for p in synthetic_math.generate_chunk(seed, chunk)]


def _json_docs(path, lines, with_mask):
    """Raw JSON lines (line number, byte offset, bytes) -> documents; DataError names the bad line."""
    docs = []
    for lineno, offset, raw in lines:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid UTF-8 (byte offset {offset + e.start} in the file); "
                            f"convert the file to UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg}); json:PATH expects JSON lines, "
                            f"one object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object; json:PATH "
                            f"expects JSON lines, one object per line")
        q, a = record.get("question"), record.get("answer")
        if isinstance(q, str) and isinstance(a, str):
            docs.append((f"Question: {q}\nAnswer:", " " + a, None))
        else:
            text = "\n".join(v for v in record.values() if isinstance(v, str))
            if text.strip():
                docs.append(("", text, None))
    return docs


def _process_task(task):
    """One unit of work for a worker: make or decode the documents, then tokenize them."""
    kind, args, with_mask = task
    if kind == "synthetic":
        docs = _synthetic_docs(*args)
    elif kind == "json":
        docs = _json_docs(*args, with_mask)
    else:  # "docs": already documents
        docs = args
    result = tokenize_documents(_worker_encoding, docs, with_mask) if docs else None
    return result


def _run_tasks(tasks, tokenizer_name, num_workers):
    """Results of the tasks, in task order (so the output never depends on num_workers). At most
    2 x num_workers tasks are in flight: memory stays bounded even for an endless task stream."""
    if num_workers <= 1:
        _init_worker(tokenizer_name)
        for task in tasks:
            yield _process_task(task)
        return
    # forkserver on Linux: a plain fork of a process that already ran torch's OpenMP threads can deadlock
    # (seen in the test suite); elsewhere the platform's safe default.
    ctx = multiprocessing.get_context("forkserver" if sys.platform == "linux" else None)
    pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_name,))
    pending = deque()
    try:
        for task in tasks:
            pending.append(pool.apply_async(_process_task, (task,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        # The caller usually stops early (the token budget is reached) with tasks still in flight. Pool's
        # terminate() (what `with Pool()` does) can deadlock while workers are sending results, so let them
        # finish and shut the pool down in order.
        for result in pending:
            result.wait(timeout=120)
        if all(result.ready() for result in pending):
            pool.close()
            pool.join()
        else:
            pool.terminate()


# ----------------------------------------------------------------------------- sources
#
# A source is a dict: kind, spec (as stored in the manifest), fingerprint (changes when the input changes),
# with_mask, and parts() -> [(label, tasks, share of the budget)]. Opening a source checks what is cheap to
# check (file exists, not empty, ...); parts() opens the rest (the Hub); both before anything on disk changes.

def _read_lines(path):
    """(line number, byte offset, raw bytes) of every line of a file."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, offset, raw
            offset += len(raw)


def _batched(items, size_of, limit=TASK_CHARS):
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += size_of(item)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_file(kind, path):
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{kind}:{path}: no such file; check the path (relative paths start in {Path.cwd()})")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"{kind}:{path}: the file is empty; give a file with at least 3 documents")
    return p.resolve()


def _fingerprint(path: Path):
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _json_source(path):
    path = _check_file("json", path)
    if not path.is_file():
        raise DataError(f"json:{path}: is a folder; json:PATH expects one JSON lines file")
    # The first record decides whether the file has question/answer pairs (then: loss mask on the answers).
    first = next((line for line in _read_lines(path) if line[2].strip()), None)
    if first is None:
        raise DataError(f"json:{path}: the file has no records (only blank lines)")
    probe = _json_docs(path, [first], with_mask=True)
    with_mask = bool(probe) and probe[0][0] != ""
    tasks = (("json", (str(path), batch), with_mask) for batch in _batched(_read_lines(path), lambda x: len(x[2])))
    return dict(kind="json", spec=f"json:{path}", fingerprint=_fingerprint(path), with_mask=with_mask,
                parts=lambda: [(path.name, tasks, 1.0)])


def _text_documents(path: Path):
    """Documents of a text file (separated by blank lines) or a folder (one per *.txt file)."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        for f in files:
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                raise DataError(f"{f}: line {line} is not valid UTF-8 (byte offset {e.start}); "
                                f"convert the file to UTF-8") from None
            if text.strip():
                yield ("", text.strip("\n"), None)
        return
    lines = []
    for lineno, offset, raw in _read_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid UTF-8 (byte offset {offset + e.start}); "
                            f"convert the file to UTF-8") from None
        if line.strip():
            lines.append(line)
        elif lines:
            yield ("", "".join(lines).rstrip("\n"), None)
            lines = []
    if lines:
        yield ("", "".join(lines).rstrip("\n"), None)


def _text_source(path):
    path = _check_file("text", path)
    if path.is_dir():
        if not any(path.rglob("*.txt")):
            raise DataError(f"text:{path}: the folder has no *.txt files")
        st = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*.txt"))]
        fingerprint = {"path": str(path), "files": hashlib.sha1(json.dumps(st).encode()).hexdigest()}
    else:
        fingerprint = _fingerprint(path)
    tasks = (("docs", batch, False) for batch in _batched(_text_documents(path), lambda d: len(d[1])))
    return dict(kind="text", spec=f"text:{path}", fingerprint=fingerprint, with_mask=False,
                parts=lambda: [(path.name, tasks, 1.0)])


def _synthetic_source(seed):
    def tasks():
        chunk = 0
        while True:  # endless: the token budget ends it
            yield ("synthetic", (seed, chunk), True)
            chunk += 1
    return dict(kind="synthetic-math", spec="synthetic-math", with_mask=True,
                fingerprint={"generator": "synthetic_math", "chunk_size": synthetic_math.CHUNK_SIZE},
                parts=lambda: [("synthetic-math", tasks(), 1.0)])


def _hub_unreachable_reason():
    """Why the Hugging Face Hub cannot be reached, or None. A quick check up front saves the user the
    half minute of retries inside `datasets` when there is no network at all."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "offline mode: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection says nothing: let datasets try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        return None
    except OSError as e:
        return f"cannot connect to {url.hostname}: {e.strerror or type(e).__name__}"


def _hf_where(args, kwargs):
    name = str(args[0] if args else kwargs.get("path", "?"))
    is_hub = "/" in name and not Path(name).exists()  # "owner/name" on the Hub, not a local folder or builder
    return (f"{name} ({kwargs['data_files']})" if "data_files" in kwargs else name), is_hub


def _hf_error(args, kwargs, e):
    where, is_hub = _hf_where(args, kwargs)
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    hint = f"; {OFFLINE_CHOICES}" if is_hub else ""
    return DataError(f"cannot load {where} through datasets ({type(e).__name__}: {first_line}){hint}")


def _hf_open(args, kwargs):
    """datasets.load_dataset(*args, streaming=True, **kwargs), or a one-line DataError. Called before anything
    on disk changes, so that an unreachable Hub leaves an existing dataset alone."""
    where, is_hub = _hf_where(args, kwargs)
    if is_hub:
        reason = _hub_unreachable_reason()
        if reason:
            raise DataError(f"cannot stream {where} from the Hugging Face Hub ({reason}); {OFFLINE_CHOICES}")
    import datasets  # imported here: it is slow to import and only this source needs it
    try:
        return datasets.load_dataset(*args, streaming=True, **kwargs)
    except Exception as e:
        raise _hf_error(args, kwargs, e) from None


def _hf_documents(dataset, args, kwargs, fields):
    """Documents streamed from an opened datasets source: its `fields` joined by newlines."""
    try:
        for record in dataset:
            text = "\n".join(record[f] for f in fields if isinstance(record.get(f), str))
            if text.strip():
                yield ("", text, None)
    except Exception as e:  # the connection dropped, a corrupt file, ...
        raise _hf_error(args, kwargs, e) from None


def _math_reasoning_source():
    sources = [(tuple(a), dict(k), tuple(f), float(s)) for a, k, f, s in MATH_REASONING_SOURCES]

    def parts():  # opened only when there is something to prepare: a prepared dataset needs no network
        out = []
        for args, kwargs, fields, share in sources:
            docs = _hf_documents(_hf_open(args, kwargs), args, kwargs, fields)
            out.append((str(args[0]), (("docs", b, False) for b in _batched(docs, lambda d: len(d[1]))), share))
        return out

    fingerprint = {"sources": json.loads(json.dumps(sources, default=str))}
    return dict(kind="math-reasoning", spec="math-reasoning", fingerprint=fingerprint, with_mask=False, parts=parts)


def open_source(data_spec: str, seed: int = DEFAULT_SEED) -> dict:
    if data_spec == "synthetic-math":
        return _synthetic_source(seed)
    if data_spec == "math-reasoning":
        return _math_reasoning_source()
    kind, _, path = data_spec.partition(":")
    if kind in ("json", "text") and path:
        return _json_source(path) if kind == "json" else _text_source(path)
    raise DataError(f"unknown data source {data_spec!r}; choose one of: {', '.join(DATA_SPECS)}")


# ----------------------------------------------------------------------------- writing shards

_writes_before_kill = int(os.environ.get("LMSMALL_DATA_KILL_AFTER_WRITES", "0"))  # test hook: simulate kill -9


class ShardWriter:
    """Appends tokens (and mask bytes) of one split to shards of at most shard_tokens tokens. A shard is
    written as '.train_000000.bin.tmp-PID' and renamed to 'train_000000.bin' only once it is complete."""

    def __init__(self, directory: Path, split: Split, shard_tokens: int, with_mask: bool):
        self.directory, self.split, self.shard_tokens, self.with_mask = directory, split, shard_tokens, with_mask
        self.shards, self.mask_shards, self.shard_sizes = [], [], []
        self.documents = self.tokens = self.bytes = 0
        self.hash = hashlib.blake2b(digest_size=16)
        self._files = None  # (token file, mask file or None, their temp paths) of the shard being written
        self._in_shard = 0

    def write(self, tokens: np.ndarray, mask, documents: int, nbytes: int):
        global _writes_before_kill
        self.documents += documents
        self.bytes += nbytes
        self.tokens += len(tokens)
        self.hash.update(tokens.tobytes())
        start = 0
        while start < len(tokens):
            if self._files is None:
                self._open()
            end = start + min(len(tokens) - start, self.shard_tokens - self._in_shard)
            self._files[0].write(tokens[start:end].tobytes())
            if self.with_mask:
                self._files[1].write(mask[start:end].tobytes())
            self._in_shard += end - start
            start = end
            if _writes_before_kill > 0:
                _writes_before_kill -= 1
                if _writes_before_kill == 0:
                    self._files[0].flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            if self._in_shard == self.shard_tokens:
                self._finish()

    def _open(self):
        i = len(self.shards)
        names = [shard_name(self.split, i)] + ([mask_shard_name(self.split, i)] if self.with_mask else [])
        temps = [self.directory / f".{n}.tmp-{os.getpid()}" for n in names]
        files = [open(t, "wb") for t in temps]
        self._files = (files[0], files[1] if self.with_mask else None, temps, names)
        self._in_shard = 0

    def _finish(self):
        token_file, mask_file, temps, names = self._files
        for f in (token_file, mask_file):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        for temp, name in zip(temps, names):
            os.replace(temp, self.directory / name)  # complete: now it may carry its real name
        self.shards.append(names[0])
        if self.with_mask:
            self.mask_shards.append(names[1])
        self.shard_sizes.append(self._in_shard)
        self._files, self._in_shard = None, 0

    def close(self):
        if self._files is not None:
            self._finish()

    def abort(self):
        if self._files is not None:
            for f in self._files[:2]:
                if f is not None:
                    f.close()
            for temp in self._files[2]:
                temp.unlink(missing_ok=True)
            self._files = None

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards,
                "mask_shards": self.mask_shards, "shard_tokens": self.shard_sizes}


class SplitRouter:
    """Routes tokenized documents to the three split writers. The last 2 documents of each split are held
    back until the end, so that a split the hash left empty (tiny sources) can be given one of them:
    every split gets at least one document, and a document still lands in exactly one split."""

    def __init__(self, writers: dict):
        self.writers = writers
        self.held = {s: deque() for s in SPLITS}  # split -> single documents (tokens, mask, nbytes)

    def add(self, split: Split, tokens, mask, lengths, nbytes):
        n = len(lengths)
        n_tail = min(2, n)
        cut = len(tokens) - int(lengths[n - n_tail:].sum())
        held = self.held[split]
        if n > n_tail:  # older held documents and the bulk of this batch go out now, in stream order
            while held:
                self._write(split, *held.popleft())
            self.writers[split].write(tokens[:cut], None if mask is None else mask[:cut], n - n_tail,
                                      int(nbytes[:n - n_tail].sum()))
        offsets = np.append(cut, cut + np.cumsum(lengths[n - n_tail:]))
        for j in range(n_tail):
            a, b = offsets[j], offsets[j + 1]
            held.append((tokens[a:b], None if mask is None else mask[a:b], int(nbytes[n - n_tail + j])))
        while len(held) > 2:
            self._write(split, *held.popleft())

    def _write(self, split, tokens, mask, nbytes):
        self.writers[split].write(tokens, mask, 1, nbytes)

    def finish(self):
        count = {s: self.writers[s].documents + len(self.held[s]) for s in SPLITS}
        total = sum(count.values())
        if total < len(SPLITS):
            raise DataError(f"only {total} document(s) in the source (or within --max-tokens); need at least "
                            f"{len(SPLITS)}, one per split: use a bigger source or a larger --max-tokens")
        for empty in [s for s in SPLITS if count[s] == 0]:
            donor = max((s for s in SPLITS if self.held[s] and count[s] >= 2), key=lambda s: count[s])
            self._write(empty, *self.held[donor].pop())
            count[donor] -= 1
            count[empty] += 1
        for s in SPLITS:
            while self.held[s]:
                self._write(s, *self.held[s].popleft())
            self.writers[s].close()


# ----------------------------------------------------------------------------- prepare

def _lock(directory: Path):
    """An exclusive lock on the dataset folder (released when the process ends, even by kill -9)."""
    f = open(directory / ".lock", "a")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX)
    except ImportError:  # no fcntl (Windows): no cross-process lock
        pass
    return f


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _complete_manifest(directory: Path, request: dict):
    """The manifest of a finished preparation matching `request`, or None (absent, partial, other request)."""
    try:
        manifest = read_manifest(directory)
    except DataError:
        return None
    for key, value in request.items():
        if value is not None and manifest.get(key) != value:
            return None
    for info in manifest["splits"].values():
        names = info.get("shards", []) + info.get("mask_shards", [])
        sizes = info.get("shard_tokens", []) * (2 if info.get("mask_shards") else 1)
        item_size = [2] * len(info.get("shards", [])) + [1] * len(info.get("mask_shards", []))
        for name, n, itemsize in zip(names, sizes, item_size):
            path = directory / name
            if not path.is_file() or path.stat().st_size != n * itemsize:
                return None
    return manifest


def prepare(data_spec: str, tokenizer_name: str, data_dir="data", max_tokens=None, seed: int = DEFAULT_SEED,
            num_workers=None, quiet: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """Prepare `data_spec` with `tokenizer_name` under data_dir; returns the dataset folder.
    max_tokens: budget over all splits (None: an existing dataset of any budget, or the source's default).
    seed: generator seed of synthetic-math (other sources do not use it)."""
    enc = get_tokenizer(tokenizer_name)
    if max_tokens is not None and (int(max_tokens) != max_tokens or max_tokens < 1):
        raise DataError(f"--max-tokens must be a positive whole number, got {max_tokens}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    source = open_source(data_spec, seed)  # checks the input before anything on disk changes
    uses_seed = source["kind"] == "synthetic-math"
    out = dataset_dir(data_dir, data_spec, tokenizer_name, seed=seed if uses_seed else None)
    request = {"format_version": FORMAT_VERSION, "source": source["spec"], "tokenizer": tokenizer_name,
               "vocab_size": enc.n_vocab, "source_fingerprint": _jsonable(source["fingerprint"]),
               "seed": seed if uses_seed else None, "max_tokens": None if max_tokens is None else int(max_tokens)}
    if _complete_manifest(out, request) is not None:  # fast path, no lock needed
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except OSError as e:
        raise DataError(f"cannot write to {out} ({e.strerror or e}); choose another --data-dir") from None
    with lock:
        if _complete_manifest(out, request) is not None:  # another process finished it while we waited
            return out
        budget = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS.get(source["kind"])
        _build(out, source, enc, tokenizer_name, budget, seed, num_workers or os.cpu_count() or 1, quiet,
               shard_tokens, request)
    return out


ensure_prepared = prepare  # what the trainer calls: prepares on first use, then returns at once


def _route(router: SplitRouter, result: dict, n_docs: int) -> int:
    """Send the first n_docs documents of a tokenized batch to their splits; returns their token count."""
    lengths = result["lengths"][:n_docs]
    n_tok = int(lengths.sum())
    tokens, mask = result["tokens"][:n_tok], result["mask"]
    doc_split = result["splits"][:n_docs]
    token_split = np.repeat(doc_split, lengths)  # the split of every token
    for i, s in enumerate(SPLITS):
        docs_here = doc_split == i
        if docs_here.any():
            here = token_split == i
            router.add(s, tokens[here], None if mask is None else mask[:n_tok][here], lengths[docs_here],
                       result["nbytes"][:n_docs][docs_here])
    return n_tok


def _build(out: Path, source: dict, enc, tokenizer_name, budget, seed, num_workers, quiet, shard_tokens, request):
    parts = source["parts"]()  # may fail (Hub unreachable): still nothing changed on disk
    # Start over: the manifest goes first (the folder stops being a dataset), then our old shards and any
    # temporary files a killed run left behind. Files we did not write are left alone.
    (out / "manifest.json").unlink(missing_ok=True)
    for p in out.iterdir():
        if OWNED_FILE.match(p.name):
            p.unlink()
    t0 = time.time()
    writers = {s: ShardWriter(out, s, shard_tokens, source["with_mask"]) for s in SPLITS}
    router = SplitRouter(writers)
    # the bar appears with the first tokens (an early error prints only its own line); not in logs/pipes
    bar = tqdm(total=budget, unit="tok", unit_scale=True, disable=True if quiet else None, smoothing=0.1,
               desc=f"{source['spec'][:40]} [{tokenizer_name}]", delay=0.5)
    total, shares_left = 0, sum(share for _, _, share in parts)
    try:
        for _label, tasks, share in parts:
            # this part's quota: its share of what is left (a part that runs dry leaves more for the next)
            quota = None if budget is None else int((budget - total) * share / shares_left)
            shares_left -= share
            used = 0
            for result in _run_tasks(tasks, tokenizer_name, num_workers):
                if result is None:
                    continue
                lengths = result["lengths"]
                n_docs = len(lengths)
                if quota is not None:  # only whole documents, within the quota
                    n_docs = int(np.searchsorted(np.cumsum(lengths), quota - used, side="right"))
                n_tok = _route(router, result, n_docs)
                used += n_tok
                bar.update(n_tok)
                if n_docs < len(lengths):
                    break  # quota reached: the generator is closed, and with it the worker pool
            total += used
        router.finish()
    except BaseException as e:
        for w in writers.values():
            w.abort()
        bar.close()
        if isinstance(e, OSError):  # disk full, permissions, ...
            raise DataError(f"writing {out} failed ({e.strerror or e}); free some space or choose another "
                            f"--data-dir, then run again") from None
        raise
    bar.close()
    seconds = time.time() - t0
    content = hashlib.blake2b(digest_size=16)
    for s in SPLITS:
        content.update(writers[s].hash.digest())
    manifest = dict(request)
    manifest.update({
        "source_kind": source["kind"], "seed": seed, "max_tokens": None if budget is None else int(budget),
        "eot_token": enc.eot_token, "dtype": TOKEN_DTYPE, "mask_dtype": MASK_DTYPE,
        "has_loss_mask": source["with_mask"], "shard_size": shard_tokens, "content_hash": content.hexdigest(),
        "created_unix": int(time.time()), "prepare_seconds": round(seconds, 3),
        "splits": {s.value: writers[s].summary() for s in SPLITS},
    })
    write_manifest(out, manifest)  # last: from now on the folder is a complete dataset
    if not quiet:
        n = {s.value: writers[s].tokens for s in SPLITS}
        total = sum(n.values())
        print(f"prepared {out}: {total:,} tokens (train {n['train']:,}, val {n['val']:,}, test {n['test']:,}) "
              f"in {seconds:.1f}s, {total / max(seconds, 1e-9) / 1e6:.2f}M tokens/s", file=sys.stderr)


# ----------------------------------------------------------------------------- command line

def parse_count(text: str) -> int:
    """'100M', '2.5k', '1e6', '1000000' -> int."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 1000000, 1e6, 100M)") from None
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def main(argv=None):
    import cli  # one-line errors and checked numbers (late: cli is not needed by the importers of this module)
    parser = cli.ArgumentParser(description="Tokenize a data source into shards for training.")
    parser.add_argument("--data", required=True, help=f"one of: {', '.join(DATA_SPECS)}")
    parser.add_argument("--tokenizer", required=True, choices=TOKENIZERS)
    parser.add_argument("--data-dir", default="data", help="where dataset folders go (default: data)")
    parser.add_argument("--max-tokens", type=cli.count, default=None,
                        help="token budget over all splits, e.g. 100M (default: synthetic-math 10M, "
                             "math-reasoning 100M, json/text the whole file)")
    parser.add_argument("--seed", type=cli.seed, default=DEFAULT_SEED, help="synthetic-math generator seed")
    parser.add_argument("--num-workers", type=cli.positive_int, default=None, help="tokenizer processes (default: all cores)")
    parser.add_argument("--shard-tokens", type=cli.count, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.data, args.tokenizer, args.data_dir, args.max_tokens, args.seed, args.num_workers,
                      args.quiet, args.shard_tokens)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was completed, run the same command again to start over", file=sys.stderr)
        sys.exit(130)
    print(out)


if __name__ == "__main__":
    main()
