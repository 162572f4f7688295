"""
The data sources of base_data_preparer.py: what --data names, opened and checked, and turned into documents.

    synthetic-math   built-in generator (synthetic_math.py)
    math-reasoning   the seed's Hugging Face sets, streamed through `datasets`
    json:PATH        JSON lines
    text:PATH        a text file (documents separated by blank lines) or a folder of *.txt files; Windows line
                     ends (CRLF) are read as "\n", as Python's text mode does

A document is (prompt, body, split_key): the tokens of `prompt` get loss mask 0, those of `body` mask 1;
the document text is prompt + body; split_key (None: the text) is hashed to pick the split (an int: the hash
itself, as for a question asked again in json:PATH).
"""
import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import synthetic_math
from data_file_utils import DataError, os_error_advice, os_error_reason, qa_split_text, same_question, split_hash

DATA_SPECS = ("synthetic-math", "math-reasoning", "json:PATH", "text:PATH")
QA_SPLIT = "by first question"  # json:PATH: every answer to a question takes the split of its first record
DEFAULT_SEED = 1337
OFFLINE_CHOICES = "offline choices: --data synthetic-math, --data json:PATH (JSON lines), --data text:PATH"

# The math-reasoning corpora, in order: (datasets.load_dataset args, its keyword args, the string fields
# joined with "\n" into one document, share of the token budget). A source that runs dry hands its unused
# share to the next. Tests point these at local JSON files: (("json",), {"data_files": path, "split": "train"}, ...)
MATH_REASONING_SOURCES = [
    (("ajibawa-2023/Maths-College",), {"split": "train"}, ("instruction", "output"), 0.5),
    (("open-web-math/open-web-math",), {"split": "train"}, ("text",), 0.5),
]

TASK_CHARS = 1_000_000  # documents are handed to the workers in batches of about this many characters


# ----------------------------------------------------------------------------- documents (run in the workers)

def _synthetic_docs(seed, chunk):
    # split key: the problem (its numbers and answer), not its wording, so a rewording never lands in another split
    return [(f"Question: {p['question']}\nAnswer:", " " + p["answer"],
             synthetic_math.problem_key(p["question"], p["final"])) for p in synthetic_math.generate_chunk(seed, chunk)]


def _json_docs(path, lines, repeats, with_mask):
    """Raw JSON lines (line number, byte offset, bytes) -> documents; DataError names the bad line.
    repeats: {line number: split hash} of the records whose question came before (see _repeated_questions)."""
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
            docs.append((f"Question: {q}\nAnswer:", " " + a, repeats.get(lineno)))
        else:
            text = "\n".join(v for v in record.values() if isinstance(v, str))
            if text.strip():
                docs.append(("", text, None))
        if docs and not _is_unicode(docs[-1][0] + docs[-1][1]):
            raise DataError(f"{path}: line {lineno} holds a lone surrogate escape (such as \"\\ud800\"), which is not "
                            f"text; fix or remove that record")
    return docs


def _repeated_questions(path):
    """{line number: split hash of the first record with this question} for every question/answer record whose
    question (whitespace aside) an earlier record asked: all answers to one question land in the split of the
    first, so no held-out question is also a training question (sampled solutions, rephrased answers). A file
    without repeated questions gets {}: each record splits by its own text, as always. Lines that do not parse
    are skipped here; _json_docs names them."""
    first, repeats = {}, {}
    for lineno, _, raw in _read_lines(path):
        try:
            record = json.loads(raw.decode("utf-8"))
            q, a = record.get("question"), record.get("answer")
            if isinstance(q, str) and isinstance(a, str):
                key = same_question(q)
                if key in first:
                    repeats[lineno] = first[key]
                else:
                    first[key] = split_hash(qa_split_text(q, a))
        except (ValueError, AttributeError, UnicodeEncodeError):
            continue
    return repeats


def _is_unicode(text: str) -> bool:
    """False for a string with lone surrogates (JSON allows the escape "\\ud800"; UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False



# ----------------------------------------------------------------------------- sources
#
# A source is a dict: kind, spec (as stored in the manifest), fingerprint (changes when the input changes),
# with_mask, and parts() -> [(label, tasks, share of the budget)]; a finite source (a file, a folder) also has
# size_bytes and token_bound (no tokenizer gives more tokens than that). Opening a source checks what is cheap
# to check (file exists, not empty, ...); parts() opens the rest (the Hub); both before anything on disk changes.

def _unreadable(path, e: OSError):
    advice = os_error_advice(e, "read") if e.errno is not None else "check that file"
    return DataError(f"cannot read {path} ({os_error_reason(e)}); {advice.replace('that path', 'that file')}")


def _token_bound(size: int, documents: int) -> int:
    """At most this many tokens: a document's text has no more bytes than its line(s) in the file (JSON
    quoting, a question's "Question: ...\nAnswer:" and blank-line separators only add bytes), a token is at
    least one byte, and each document adds one <|endoftext|>."""
    return size + documents


def _read_lines(path):
    """(line number, byte offset, raw bytes) of every line of a file."""
    offset = 0
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, offset, raw
                offset += len(raw)
    except OSError as e:  # else reported as a failure to write the dataset
        raise _unreadable(path, e) from None


def _text_files(folder: Path):
    """The *.txt files of a folder, recursively, sorted; a folder named *.txt is skipped (its files count)."""
    files = []
    for f in sorted(folder.rglob("*.txt")):
        if f.is_file():
            files.append(f)
        elif not f.is_dir():
            raise DataError(f"text:{folder}: {f} is not a readable file (a broken link?); fix or remove it")
    return files


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
    probe = _json_docs(path, [first], {}, with_mask=True)
    with_mask = bool(probe) and probe[0][0] != ""

    def parts():  # the file is read for repeated questions only when a dataset is built
        repeats = _repeated_questions(path)
        tasks = (("json", (str(path), batch, {n: repeats[n] for n, _, _ in batch if n in repeats}), with_mask)
                 for batch in _batched(_read_lines(path), lambda x: len(x[2])))
        return [(path.name, tasks, 1.0)]

    # The manifest records the rule for repeated questions. A dataset prepared before it (no "qa_split") is
    # still the same data when the file asks no question twice; otherwise its answers were split apart, and it
    # is refused (outdated), not reused.
    size = path.stat().st_size
    return dict(kind="json", spec=f"json:{path}", fingerprint=_fingerprint(path), with_mask=with_mask,
                size_bytes=size, token_bound=_token_bound(size, size // 2 + 1),  # a record: "{}" and a newline
                parts=parts, manifest=dict(qa_split=QA_SPLIT),
                outdated=lambda m: ["qa_split"] if "qa_split" not in m and _repeated_questions(path) else [])


def _text_documents(path: Path):
    """Documents of a text file (separated by blank lines) or a folder (one per *.txt file)."""
    if path.is_dir():
        for f in _text_files(path):
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise _unreadable(f, e) from None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                raise DataError(f"{f}: line {line} is not valid UTF-8 (byte offset {e.start}); "
                                f"convert the file to UTF-8") from None
            text = text.replace("\r\n", "\n")
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
            lines.append(line[:-2] + "\n" if line.endswith("\r\n") else line)
        elif lines:
            yield ("", "".join(lines).rstrip("\n"), None)
            lines = []
    if lines:
        yield ("", "".join(lines).rstrip("\n"), None)


def _text_source(path):
    path = _check_file("text", path)
    if path.is_dir():
        files = _text_files(path)
        if not files:
            raise DataError(f"text:{path}: the folder has no *.txt files")
        st = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        fingerprint = {"path": str(path), "files": hashlib.sha1(json.dumps(st).encode()).hexdigest()}
        size = sum(n for _, n, _ in st)
        bound = _token_bound(size, len(files))  # a file is one document
    else:
        fingerprint = _fingerprint(path)
        size = path.stat().st_size
        bound = _token_bound(size, size // 2 + 1)  # documents are apart by a blank line
    tasks = (("docs", batch, False) for batch in _batched(_text_documents(path), lambda d: len(d[1])))
    return dict(kind="text", spec=f"text:{path}", fingerprint=fingerprint, with_mask=False,
                size_bytes=size, token_bound=bound, parts=lambda: [(path.name, tasks, 1.0)])


def _synthetic_source(seed):
    def tasks():
        chunk = 0
        while True:  # endless: the token budget ends it
            yield ("synthetic", (seed, chunk), True)
            chunk += 1
    return dict(kind="synthetic-math", spec="synthetic-math", with_mask=True,
                fingerprint={"generator": "synthetic_math", "chunk_size": synthetic_math.CHUNK_SIZE,
                             "version": synthetic_math.VERSION},
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
