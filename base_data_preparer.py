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
  - split by DOCUMENT: a hash of the document text (of the problem_key, for synthetic-math) puts it in
    train/val/test (~98/1/1); a document is never in two splits; each split gets at least one document.
  - deterministic: the same source, tokenizer, seed and budget give the same bytes, whatever --num-workers.
  - one folder per request: the budget and seed are part of the folder name (data/synthetic-math-10M__bytes),
    so preparations with other settings never touch each other.
  - immutable: a complete dataset (its manifest.json exists) is never changed or removed by a later command;
    asked for again, prepare() returns it at once.
    If its source changed since, preparing it again is refused in one line; --replace rebuilds it explicitly
    (into out/.replacing: the old dataset is removed only once the new one is complete).
    The manifest records data_hash (see data_file_utils.data_hash); every run records it and checks it.
  - never under a reader: runs and tools hold a shared lock on the dataset while they read it (see
    data_file_utils); --replace is refused in one line while another process holds one, before it builds anything.
  - bounded: --max-tokens beyond what a json/text source can give, or shards that would not fit on the disk
    (synthetic-math and math-reasoning have no end), are refused in one line before anything is written.
  - crash safe: shards are written under a temporary name and renamed when complete; manifest.json is
    written last (atomically). A folder without a manifest is not a dataset; a rerun starts it over.
  - Ctrl-C stops it at once (one line, exit 130): the worker processes never see SIGINT; the parent kills them.
  - concurrent callers (e.g. every DDP rank) are serialised by the same lock file; one prepares, the others wait
    and reuse it.
"""
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import contextlib
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from data_file_utils import (FORMAT_VERSION, LOCK_NAME, MANIFEST_NAME, MASK_DTYPE, OWNED_FILE, SPLITS, TOKEN_DTYPE,
                             DataError, Split, data_hash, dataset_dir, describe_pids, fcntl, lock_holders, lock_shared,
                             mask_shard_name, os_error_advice, os_error_reason, own_holds, read_manifest, shard_name,
                             split_hash, split_of_hash, write_manifest)
from data_sources import DATA_SPECS, DEFAULT_SEED, _json_docs, _synthetic_docs, open_source

EOT = "<|endoftext|>"
TOKENIZERS = ("gpt2", "bytes")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
DEFAULT_MAX_TOKENS = {"synthetic-math": 10_000_000, "math-reasoning": 100_000_000}  # json/text: the whole file

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
    """docs -> dict(tokens uint16, mask uint8|None, lengths, splits, keys, nbytes): per-document arrays in order
    (keys: the split hash of each document; twins have the same)."""
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
    keys = np.empty(len(docs), dtype=np.uint64)
    nbytes = np.empty(len(docs), dtype=np.int64)
    split_index = {s: i for i, s in enumerate(SPLITS)}
    for i, (prompt, body, key) in enumerate(docs):
        text = prompt + body
        nbytes[i] = len(text.encode("utf-8"))
        keys[i] = key if isinstance(key, int) else split_hash(text if key is None else key)
        splits[i] = split_index[split_of_hash(int(keys[i]))]
    assert len(lengths) == len(docs), "document boundaries lost while tokenizing"
    return dict(tokens=tokens, mask=mask, lengths=lengths, splits=splits, keys=keys, nbytes=nbytes)


def _process_task(task):
    """One unit of work for a worker: make or decode the documents, then tokenize them."""
    kind, args, with_mask = task
    if kind == "synthetic":
        docs = _synthetic_docs(*args)
    elif kind == "json":
        docs = _json_docs(*args, with_mask)
    else:  # "docs": already documents
        docs = args
    try:
        return tokenize_documents(_worker_encoding, docs, with_mask) if docs else None
    except UnicodeEncodeError:  # json:PATH names the line itself; this catches what other sources hand over
        raise DataError("a document of the source holds a lone surrogate (e.g. from a \\ud800 escape), which is not "
                        "text; clean the source") from None


# ----------------------------------------------------------------------------- the worker processes
#
# Our own small pool instead of multiprocessing.Pool, because a Pool cannot be stopped reliably: on Ctrl-C its
# workers died with tracebacks (SIGINT reaches the whole process group), and terminate() then hung on locks
# and pipes the dead workers held. Here each worker has one pipe of its own and no shared lock:
#   - the workers never see Ctrl-C (nor SIGTERM/SIGHUP sent to the whole process group): these are blocked
#     while the forkserver is started (as CPython's own resource_tracker does); the workers are forked from it
#     and inherit the blocked mask, from birth on. The parent decides; a worker also ends when its pipe closes.
#   - Ctrl-C raises KeyboardInterrupt in the parent only; stopping then means SIGKILL to every worker and a
#     join: nothing to wait for, nothing to deadlock on. Their unfinished results are thrown away.
#   - the parent sends a worker its next task only after it has read that worker's previous result, so
#     neither side can block on a full pipe while the other waits for it.

GROUP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


def _worker_main(conn, tokenizer_name):
    """A tokenizer process: receives tasks, sends (ok, result) or (error, ...) back, until None or EOF."""
    for sig in GROUP_SIGNALS:  # the parent's business (blocked already, normally)
        signal.signal(sig, signal.SIG_IGN)
    _init_worker(tokenizer_name)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        try:
            reply = ("ok", _process_task(task))
        except DataError as e:  # bad input: the parent reports it in one line
            reply = ("data_error", str(e))
        except Exception:
            reply = ("error", traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:  # the parent is gone (killed): so are we, quietly
            return


@contextlib.contextmanager
def _group_signals_blocked():
    """Block SIGINT, SIGTERM, SIGHUP in this thread; a process started meanwhile inherits the blocked mask.
    A signal that arrives meanwhile is delivered (e.g. KeyboardInterrupt) as soon as the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_workers(workers: list, n: int, tokenizer_name):
    """Start n worker processes, appending (process, pipe) to `workers` as they start."""
    # forkserver on Linux: a plain fork of a process that already ran torch's OpenMP threads can deadlock
    # (seen in the test suite); elsewhere the platform's safe default.
    ctx = multiprocessing.get_context("forkserver" if sys.platform == "linux" else None)
    forkserver = ctx.get_start_method() == "forkserver"
    if forkserver:
        from multiprocessing import forkserver as server, resource_tracker
        resource_tracker.ensure_running()  # first: starting it UNblocks SIGINT/SIGTERM in this thread afterwards
        with _group_signals_blocked():  # only while the server is forked: its imports (torch) do not delay Ctrl-C
            server.ensure_running()
    for _ in range(n):
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(theirs, tokenizer_name), daemon=True)
        with contextlib.nullcontext() if forkserver else _group_signals_blocked():
            process.start()
        theirs.close()
        workers.append((process, ours))


def _stop_forkserver():
    """After Ctrl-C the process is about to end. The forkserver (deaf to SIGINT) would outlive it by as long
    as it still needs to import the main script (seconds for torch, more on a busy machine), so it is killed
    too. CPython notices a dead forkserver and starts a new one when one is needed again."""
    from multiprocessing import forkserver
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)  # CPython's, no public API
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _receive(worker):
    process, conn = worker
    try:
        status, value = conn.recv()
    except EOFError:
        process.join(timeout=5)
        code = process.exitcode
        how = f"killed by signal {-code}, out of memory?" if code is not None and code < 0 else f"exit code {code}"
        raise DataError(f"a tokenizer worker died ({how}); run again, perhaps with fewer --num-workers") from None
    if status == "data_error":
        raise DataError(value)
    if status == "error":
        raise RuntimeError(f"a tokenizer worker failed:\n{value}")
    return value


def _stop_workers(workers):
    """Stop every worker now (SIGKILL: it holds no lock and nothing of it is kept) and reap it."""
    for process, conn in workers:
        if process.exitcode is None:
            process.kill()
    for process, conn in workers:
        process.join(timeout=10)
        conn.close()


def _run_tasks(tasks, tokenizer_name, num_workers):
    """Results of the tasks, in task order (so the output never depends on num_workers). Task i goes to
    worker i % num_workers; at most one task per worker is in flight, so memory stays bounded even for an
    endless task stream. The caller may stop early (the token budget is reached): closing this generator,
    an error or Ctrl-C all stop the workers at once."""
    if num_workers <= 1:
        _init_worker(tokenizer_name)
        for task in tasks:
            yield _process_task(task)
        return
    workers = []
    in_flight = deque()  # the worker of every task sent and not yet received, oldest first
    try:
        _start_workers(workers, num_workers, tokenizer_name)
        for i, task in enumerate(tasks):
            w = i % num_workers
            if len(in_flight) == num_workers:  # every worker is busy: the oldest task is worker w's
                yield _receive(workers[in_flight.popleft()])
            workers[w][1].send(task)
            in_flight.append(w)
        while in_flight:
            yield _receive(workers[in_flight.popleft()])
    except KeyboardInterrupt:
        _stop_workers(workers)
        if sys.platform == "linux":
            _stop_forkserver()
        raise
    finally:
        _stop_workers(workers)


# ----------------------------------------------------------------------------- writing shards

_writes_before_kill = int(os.environ.get("LMSMALL_DATA_KILL_AFTER_WRITES", "0"))  # test hook: simulate kill -9


class ShardWriter:
    """Appends tokens (and mask bytes) of one split to shards of at most shard_tokens tokens. A shard is
    written as '.train_000000.bin.tmp-PID' and renamed to 'train_000000.bin' only once it is complete."""

    def __init__(self, directory: Path, split: Split, shard_tokens: int, with_mask: bool):
        self.directory, self.split, self.shard_tokens, self.with_mask = directory, split, shard_tokens, with_mask
        self.shards, self.mask_shards, self.shard_sizes = [], [], []
        self.documents = self.tokens = self.bytes = 0
        self.hash = hashlib.blake2b(digest_size=16)  # of the token ids, in order
        self.mask_hash = hashlib.blake2b(digest_size=16)  # of the loss-mask bytes
        self._files = None  # (token file, mask file or None, their temp paths) of the shard being written
        self._in_shard = 0

    def write(self, tokens: np.ndarray, mask, documents: int, nbytes: int):
        global _writes_before_kill
        self.documents += documents
        self.bytes += nbytes
        self.tokens += len(tokens)
        self.hash.update(tokens.tobytes())
        if self.with_mask:
            self.mask_hash.update(mask.tobytes())
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
        """Remove every file this writer made: the shard being written and the ones it completed."""
        if self._files is not None:
            for f in self._files[:2]:
                if f is not None:
                    f.close()
            for temp in self._files[2]:
                temp.unlink(missing_ok=True)
            self._files = None
        for name in self.shards + self.mask_shards:
            (self.directory / name).unlink(missing_ok=True)
        self.shards, self.mask_shards, self.shard_sizes = [], [], []

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards,
                "mask_shards": self.mask_shards, "shard_tokens": self.shard_sizes}


class SplitRouter:
    """Routes tokenized documents to the three split writers. The last 2 documents of each split are held
    back until the end, so that a split the hash left empty (tiny sources) can be given one of them:
    every split gets at least one document, and a document still lands in exactly one split. Only a document
    without a twin (another document with the same split key) in its split is given away: a held-out split
    never shares a document with train."""

    def __init__(self, writers: dict):
        self.writers = writers
        self.held = {s: deque() for s in SPLITS}  # split -> single documents (tokens, mask, nbytes, key)
        self.keys = {s: [] for s in SPLITS}  # split -> arrays of the split keys of all its documents

    def add(self, split: Split, tokens, mask, lengths, nbytes, keys):
        self.keys[split].append(keys)
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
            held.append((tokens[a:b], None if mask is None else mask[a:b], int(nbytes[n - n_tail + j]),
                         int(keys[n - n_tail + j])))
        while len(held) > 2:
            self._write(split, *held.popleft())

    def _write(self, split, tokens, mask, nbytes, key=None):
        self.writers[split].write(tokens, mask, 1, nbytes)

    def _donation(self, empty, count):
        """(split, index) of a held document that may move to the empty split: from the largest split that can
        spare one, the last held document whose key occurs only once in its split (no twin left behind)."""
        for s in sorted((s for s in SPLITS if count[s] >= 2), key=lambda s: -count[s]):
            keys = np.concatenate(self.keys[s])
            for i in reversed(range(len(self.held[s]))):
                if np.count_nonzero(keys == np.uint64(self.held[s][i][3])) == 1:
                    return s, i
        raise DataError(f"the hash put none of the {sum(count.values())} documents in {empty.value}, and the last "
                        f"documents of the other splits, which could be moved there, have twins (duplicates) that "
                        f"would stay behind; remove duplicate documents, or use a bigger source or --max-tokens")

    def finish(self):
        count = {s: self.writers[s].documents + len(self.held[s]) for s in SPLITS}
        total = sum(count.values())
        if total < len(SPLITS):
            raise DataError(f"only {total} document(s) in the source (or within --max-tokens); need at least "
                            f"{len(SPLITS)}, one per split: use a bigger source or a larger --max-tokens")
        for empty in [s for s in SPLITS if count[s] == 0]:
            donor, i = self._donation(empty, count)
            doc = self.held[donor][i]
            del self.held[donor][i]
            self._write(empty, *doc)
            count[donor] -= 1
            count[empty] += 1
        for s in SPLITS:
            while self.held[s]:
                self._write(s, *self.held[s].popleft())
            self.writers[s].close()


# ----------------------------------------------------------------------------- prepare

@contextlib.contextmanager
def _shared(out: Path):
    """A shared lock on `out` while it is looked at: waits while another process prepares or replaces it, so
    that a half-swapped folder is never taken for a damaged one. No lock file yet: nothing was ever prepared."""
    try:
        f = open(out / LOCK_NAME, "rb") if (out / LOCK_NAME).is_file() else None
    except OSError:
        f = None
    if f is None:
        yield
        return
    with f:
        lock_shared(f, out)
        yield


def _in_use(out: Path, readers) -> str:
    who = f" ({describe_pids(readers)})" if readers else ""
    return (f"{out} is being read by a running process{who}; wait for it to end (a run, or a tool reading this "
            f"data), or prepare into another --data-dir; nothing was changed")


def _lock_exclusive(f, out: Path, replace: bool, complete) -> bool:
    """Take the exclusive lock on `out` (f: its open lock file) to build the dataset there. Never waits for a
    reader: refused in one line (DataError) while another process reads it, and --replace never waits at all.
    Without --replace it waits while another process prepares the same dataset (every DDP rank asks for it);
    returns False if that one completed it meanwhile. (/proc/locks only names the pids in the messages.)"""
    if fcntl is None:
        return True
    said, tries = False, 0
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        holders = [(pid, kind) for pid, kind in lock_holders(out / LOCK_NAME) if pid != os.getpid()]
        readers = [pid for pid, kind in holders if kind == "READ"]
        preparers = [pid for pid, kind in holders if kind == "WRITE"]
        who = f" ({describe_pids(preparers)})" if preparers else ""
        with open(out / LOCK_NAME, "rb") as probe:  # a shared lock: granted unless another process writes
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                writing = False
            except BlockingIOError:
                writing = True
            if not writing:  # only readers: held like this, the folder cannot change while we look
                if not replace and complete():
                    return False
                tries += 1
                if tries > 20:  # for 0.4 s: not just a look (another command finding this dataset complete)
                    raise DataError(_in_use(out, readers))
        if writing and replace:
            raise DataError(f"{out} is being prepared by another process{who}; wait for it to end, then run this "
                            f"again; nothing was changed")
        if writing and not said:
            print(f"waiting: {out} is being prepared by another process{who}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.1 if writing else 0.02)


@contextlib.contextmanager
def _own_readers_step_aside(out: Path):
    """This process's own readers of `out` (a notebook or a test that reads and then replaces) unlock it while
    it is built: no process locks itself out. Their loaders keep the files they opened (an unlinked file stays
    readable), and their data hash stays: a new loader of this process refuses other data while one is open."""
    holds = [h for h in own_holds(out) if h.file is not None] if fcntl is not None else []
    for h in holds:
        fcntl.flock(h.file, fcntl.LOCK_UN)
    try:
        yield
    finally:
        for h in holds:
            fcntl.flock(h.file, fcntl.LOCK_SH)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# What a differing request key means, for the refusal message.
DIFFERENCE = {"source_fingerprint": "the source as it was before (it changed since)",
              "format_version": "another version of this program", "vocab_size": "another vocabulary",
              "source": "another source", "tokenizer": "another tokenizer", "seed": "another seed",
              "max_tokens": "another budget",
              "qa_split": "the old rule for repeated questions (their answers could land in train and in val/test)"}


def _damage(directory: Path, manifest: dict):
    """What is wrong with the shard files of a manifest (missing, wrong size), or None."""
    for info in manifest["splits"].values():
        for names, itemsize in ((info["shards"], 2), (info.get("mask_shards", []), 1)):
            for name, n in zip(names, info["shard_tokens"]):
                path = directory / name
                if not path.is_file():
                    return f"{name} is missing"
                if path.stat().st_size != n * itemsize:
                    return f"{name} has {path.stat().st_size:,} bytes, the manifest says {n * itemsize:,}"
    return None


def _existing_dataset(out: Path, request: dict, replace_command: str, outdated=None):
    """The manifest of the complete dataset in `out` if it is the one requested; None if `out` holds none
    (absent, or a preparation that was interrupted: that one is started over). A complete dataset that
    differs from the request, or is damaged, is refused in one line and left as it is: runs may depend on it.
    outdated(manifest): the source's own check (DIFFERENCE keys) of a dataset prepared by an older rule."""
    if not (out / MANIFEST_NAME).exists():
        return None
    manifest = read_manifest(out)  # an unreadable manifest: DataError, the folder untouched
    way_out = f"delete that folder, use another --data-dir, or replace it with: {replace_command}"
    differs = [k for k, v in request.items() if manifest.get(k) != v and not (k == "seed" and v is None)]
    differs += outdated(manifest) if outdated and not differs else []
    if differs:
        what = "; ".join(DIFFERENCE.get(k, k) for k in differs)
        raise DataError(f"{out} holds a complete dataset prepared from {what}; a prepared dataset is never changed "
                        f"(runs may depend on it): {way_out}")
    damage = _damage(out, manifest)
    if damage:
        raise DataError(f"{out} is damaged ({damage}); it is left as it is: {way_out}")
    return manifest


def _holds(out: Path, run_data_hash: str) -> bool:
    """Whether `out` holds a complete, undamaged dataset with this data hash."""
    try:
        manifest = read_manifest(out)
    except DataError:
        return False
    return data_hash(manifest) == run_data_hash and _damage(out, manifest) is None


MAX_WORKERS = max(64, 8 * (os.cpu_count() or 1))  # each is a process; more than this only exhausts the machine


def _count(n: int) -> str:
    return f"{n:,}" if n < 10 ** 15 else f"{n:.3g}"


def _size(nbytes) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def _free_bytes(path: Path):
    """Free space on the disk that holds `path` (or would: its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _check_bounds(out: Path, data_dir, source: dict, budget, data_spec: str):
    """Before anything is written: the budget must be one the source can give (a file has so many bytes) and
    the shards must fit on the disk. synthetic-math and math-reasoning have no end: only the disk bounds them."""
    size, bound = source.get("size_bytes"), source.get("token_bound")
    if budget is not None and bound is not None and budget > bound:
        raise DataError(f"--max-tokens {_count(budget)} is more than {data_spec} can give: at most {bound:,} tokens "
                        f"from its {size:,} bytes; leave --max-tokens out to take the whole file, or give less")
    tokens = budget if size is None else min(budget or size, size)  # a file: about a token a byte at most
    per_token = np.dtype(TOKEN_DTYPE).itemsize + (np.dtype(MASK_DTYPE).itemsize if source["with_mask"] else 0)
    free = _free_bytes(out)
    if tokens is not None and free is not None and tokens * per_token > free:
        raise DataError(f"{out.name} needs about {_size(tokens * per_token)} of shards ({_count(tokens)} tokens x "
                        f"{per_token} bytes a token), but only {_size(free)} are free under {data_dir}; free some "
                        f"space, choose another --data-dir, or a smaller --max-tokens")


def prepare(data_spec: str, tokenizer_name: str, data_dir="data", max_tokens=None, seed: int = DEFAULT_SEED,
            num_workers=None, quiet: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            replace: bool = False, run_data_hash: str | None = None) -> Path:
    """Prepare `data_spec` with `tokenizer_name` under data_dir; returns the dataset folder.
    max_tokens: budget over all splits (None: the source's default; json/text: the whole file).
    seed: generator seed of synthetic-math (other sources do not use it).
    Each request (source, seed, budget, tokenizer) has its own folder. A complete one is returned as it is;
    one that no longer matches its request (the source file changed) is refused unless replace=True.
    replace=True is refused while another process reads the dataset (see data_file_utils: the lock).
    run_data_hash: the data hash a run recorded (resume, evaluate): a complete dataset with that hash is the
    run's data and is returned even if its source has changed since."""
    enc = get_tokenizer(tokenizer_name)
    if max_tokens is not None and (int(max_tokens) != max_tokens or max_tokens < 1):
        raise DataError(f"--max-tokens must be a positive whole number, got {max_tokens}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    if num_workers is not None and not 1 <= num_workers <= MAX_WORKERS:
        raise DataError(f"--num-workers must be 1..{MAX_WORKERS} (each is a process; this machine has "
                        f"{os.cpu_count()} cores), got {num_workers}")
    source = open_source(data_spec, seed)  # checks the input before anything on disk changes
    uses_seed = source["kind"] == "synthetic-math"
    budget = int(max_tokens) if max_tokens is not None else DEFAULT_MAX_TOKENS.get(source["kind"])
    out = dataset_dir(data_dir, data_spec, tokenizer_name, seed=seed if uses_seed else None, max_tokens=budget)
    request = {"format_version": FORMAT_VERSION, "source": source["spec"], "tokenizer": tokenizer_name,
               "vocab_size": enc.n_vocab, "source_fingerprint": _jsonable(source["fingerprint"]),
               "seed": seed if uses_seed else None, "max_tokens": budget}
    replace_command = (f"python base_data_preparer.py --data {shlex.quote(data_spec)} --tokenizer {tokenizer_name} "
                       f"--data-dir {shlex.quote(str(data_dir))}" + (f" --max-tokens {budget}" if max_tokens else "")
                       + (f" --seed {seed}" if uses_seed and seed != DEFAULT_SEED else "") + " --replace")

    def complete():
        return _existing_dataset(out, request, replace_command, source.get("outdated")) is not None

    if not replace:
        with _shared(out):  # a preparation of it in progress: wait for it
            if run_data_hash and _holds(out, run_data_hash):
                return out
            if complete():
                return out
    _check_bounds(out, data_dir, source, budget, data_spec)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_NAME, "ab")
    except OSError as e:
        raise DataError(f"cannot write to {e.filename or out} ({os_error_reason(e)}); {os_error_advice(e)}") from None
    with _own_readers_step_aside(out), lock:
        try:
            if not _lock_exclusive(lock, out, replace, complete) or (not replace and complete()):
                return out  # another process completed it meanwhile
        except OSError as e:
            raise DataError(f"cannot lock {out / LOCK_NAME} ({os_error_reason(e)}); {os_error_advice(e)}") from None
        _build(out, source, enc, tokenizer_name, budget, num_workers or os.cpu_count() or 1, quiet,
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
                       result["nbytes"][:n_docs][docs_here], result["keys"][:n_docs][docs_here])
    return n_tok


def _clear(folder: Path):
    """Remove what a preparation wrote into `folder`: the manifest first (the folder stops being a dataset),
    then shards and the temporary files an interrupted preparation left behind. Files we did not write stay."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for p in folder.iterdir():
        if OWNED_FILE.match(p.name) and (p.is_file() or p.is_symlink()):
            p.unlink()


STAGING = ".replacing"  # inside the dataset folder: where --replace builds the new dataset


def _clear_staging(staging: Path):
    """Remove the staging folder an interrupted --replace left behind. Only what a preparation writes there is
    removed; anything else in the way is refused in one line and left as it is."""
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise DataError(f"{staging} is in the way: --replace builds the new dataset in a folder of that name, and "
                        f"this is no folder it made; move it away, then run again")
    if not staging.exists():
        return
    foreign = sorted(p.name for p in staging.iterdir() if not (OWNED_FILE.match(p.name) and p.is_file()))
    if foreign:
        names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DataError(f"{staging} (where --replace builds the new dataset) holds files the preparer did not write: "
                        f"{names}; move them away, then run again")
    _clear(staging)
    staging.rmdir()


def _build(out: Path, source: dict, enc, tokenizer_name, budget, num_workers, quiet, shard_tokens, request):
    parts = source["parts"]()  # may fail (Hub unreachable): still nothing changed on disk
    # --replace: the complete dataset stays as it is until the new one is complete (a bad line found halfway,
    # Ctrl-C or a full disk leave it intact): the new shards go into out/.replacing and are moved in at the end.
    # Otherwise start over in `out` itself.
    staging = out / STAGING
    _clear_staging(staging)  # left by an interrupted --replace
    try:
        if (out / MANIFEST_NAME).exists():
            staging.mkdir()
            target = staging
        else:
            _clear(out)
            target = out
    except OSError as e:
        raise DataError(f"preparing {out} failed ({os_error_reason(e)}); {os_error_advice(e)}") from None
    t0 = time.time()
    writers = {s: ShardWriter(target, s, shard_tokens, source["with_mask"]) for s in SPLITS}
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
        bar.close()
        with contextlib.suppress(OSError):  # what this command wrote goes; a complete old dataset stays
            for w in writers.values():
                w.abort()
            if target is staging:
                _clear(staging)
                staging.rmdir()
        if isinstance(e, OSError):  # named by its errno: a full disk, a permission, or whatever it was
            raise DataError(f"preparing {out} failed ({os_error_reason(e)}); {os_error_advice(e)}") from None
        raise
    bar.close()
    seconds = time.time() - t0
    content, masks = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    for s in SPLITS:
        content.update(writers[s].hash.digest())
        masks.update(writers[s].mask_hash.digest())
    manifest = dict(request, **source.get("manifest", {}))
    manifest.update({
        "source_kind": source["kind"], "eot_token": enc.eot_token, "dtype": TOKEN_DTYPE, "mask_dtype": MASK_DTYPE,
        "has_loss_mask": source["with_mask"], "shard_size": shard_tokens, "content_hash": content.hexdigest(),
        "mask_hash": masks.hexdigest() if source["with_mask"] else None,
        "created_unix": int(time.time()), "prepare_seconds": round(seconds, 3),
        "splits": {s.value: writers[s].summary() for s in SPLITS},
    })
    manifest["data_hash"] = data_hash(manifest)  # what runs record; recomputed from the fields when checked
    try:
        if target is staging:  # the old dataset goes only now (a crash in between: no manifest, prepared again)
            _clear(out)
            for p in staging.iterdir():
                os.replace(p, out / p.name)
            staging.rmdir()
        write_manifest(out, manifest)  # last: from now on the folder is a complete dataset
    except OSError as e:
        raise DataError(f"completing {out} failed ({os_error_reason(e)}); it holds no complete dataset now: "
                        f"{os_error_advice(e)}") from None
    if not quiet:
        n = {s.value: writers[s].tokens for s in SPLITS}
        total = sum(n.values())
        print(f"prepared {out}: {total:,} tokens (train {n['train']:,}, val {n['val']:,}, test {n['test']:,}) "
              f"in {seconds:.1f}s, {total / max(seconds, 1e-9) / 1e6:.2f}M tokens/s", file=sys.stderr)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    from plumbing import cli  # one-line errors and checked numbers (late: cli is not needed by the importers of this module)
    parser = cli.ArgumentParser(description="Tokenize a data source into shards for training.")
    parser.add_argument("--data", required=True, help=f"one of: {', '.join(DATA_SPECS)}")
    parser.add_argument("--tokenizer", required=True, choices=TOKENIZERS)
    parser.add_argument("--data-dir", default="data", help="where dataset folders go (default: data)")
    parser.add_argument("--max-tokens", type=cli.count, default=None,
                        help="token budget over all splits, e.g. 100M (default: synthetic-math 10M, "
                             "math-reasoning 100M, json/text the whole file); at most what a file can give and "
                             "what fits on the disk")
    parser.add_argument("--seed", type=cli.seed, default=DEFAULT_SEED, help="synthetic-math generator seed")
    parser.add_argument("--num-workers", type=cli.positive_int, default=None, help="tokenizer processes (default: all cores)")
    parser.add_argument("--shard-tokens", type=cli.count, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--replace", action="store_true",
                        help="prepare the complete dataset of this request again and replace it (the old one stays "
                             "until the new one is complete; refused while a run or tool reads it; runs trained on "
                             "it then refuse to resume or be evaluated if the data came out different)")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.data, args.tokenizer, args.data_dir, args.max_tokens, args.seed, args.num_workers,
                      args.quiet, args.shard_tokens, replace=args.replace)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; the dataset was not completed, run the same command again to start over",
              file=sys.stderr)
        sys.exit(130)
    print(out)


if __name__ == "__main__":
    main()
