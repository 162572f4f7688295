"""
Text embeddings from lmsmall checkpoints: mean-pooled vectors, and token vectors for late interaction (MaxSim).

    python embed.py --checkpoint runs/mntp/checkpoint.pt --input texts.txt --out runs/emb.npy     # a text a line
    python embed.py --checkpoint runs/dual/checkpoint.pt --input gsm8k.jsonl --field question --out runs/q.npy
    python embed.py --checkpoint ... --input texts.txt --tokens --out runs/tokens.npz              # MaxSim
    python embed.py --checkpoint runs/simcse/checkpoint.pt --input texts.txt --pooling eos           # another pooling

The command line shows a progress bar and writes the output batch by batch (memory does not grow with the
number of texts beyond the texts themselves); an existing --out is kept unless --overwrite.

    from embed import embed, token_embeddings, maxsim, pool
    E = embed(model, enc, ["What is 2 + 3?", ...])          # (N, D) float32, unit rows: cosine = E @ E.T

Every text is fed as <|endoftext|> text <|endoftext|> (how documents sit in the training stream; truncated to
the context) and only the text's own tokens are pooled. The features are model.features(): the final hidden
states after the last LayerNorm. The kind follows from the checkpoint (--kind to check it):
    causal  a next-token model (baseline_gpt2, progressive_diverging, conv_attention): the mean of its token
            features. Token i has seen only tokens 0..i, so early tokens know little of the text.
    mntp    an encoder from train_mntp.py (bidirectional attention): the mean of its token features; padding
            is removed from attention with the key mask.
    simcse  an encoder from train_simcse.py: as mntp, pooled by default as it was trained (its config's
            "pooling").
    dual    dual_mask_gpt: a fw pass (causal, FW task token) and a bw pass (anti-causal, BW task token). Each
            pass is mean-pooled and L2-normalised, and the two are concatenated and divided by sqrt(2), so the
            dot product of two dual embeddings is the mean of their fw and bw cosines. Per token, fw feature i
            has seen the prefix and bw feature i the suffix: together, the whole text (seed 000, point 3).
Pooling (--pooling, pool(); train_simcse.py trains with the same function): mean (the default, except for a
SimCSE checkpoint: the pooling it was trained with), weighted-mean (weights 1, 2, ..., L over the L text tokens,
as SGPT and LLM2Vec), last (the last text token), eos (the closing <|endoftext|>). dual is mean-pooled only.
Pooled embeddings are L2-normalised: (N, C), (N, 2C) for dual. Token embeddings are one (L, C) or (L, 2C)
matrix of unit rows per text (dual: per token the normalised fw and bw vectors, concatenated, / sqrt(2)).
maxsim(Q, D) is ColBERT's late interaction: for every query token the best-matching document token's cosine,
averaged over the query's tokens. Batching pads so that the padding changes nothing: right padding for causal
passes (no real token sees later positions), left padding for dual's bw pass (its positions count from the
BW token at the end), a key mask for the bidirectional encoder.
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import contextlib
import io
import itertools
import json
import math
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from plumbing import cli
from checkpoint import CheckpointError, load_model, tokenizer_of
from data_file_utils import DataError

KINDS = ("causal", "mntp", "simcse", "dual")
ENCODERS = ("mntp", "simcse")  # bidirectional encoders: one pass with a key mask
POOLINGS = ("mean", "weighted-mean", "last", "eos")


class EmbedError(Exception):
    """Bad input; printed as one line."""


def embedding_kind(model, ckpt=None):
    """causal, mntp (any bidirectional encoder), simcse (an encoder written by train_simcse.py: needs its
    checkpoint `ckpt`) or dual."""
    if model.name == "dual_mask_gpt":
        return "dual"
    if getattr(model.config, "attention", "causal") != "bidirectional":
        return "causal"
    made_by = (ckpt or {}).get("config", {}).get("entry_point")
    return "simcse" if made_by == "train_simcse.py" else "mntp"


def default_pooling(ckpt):
    """The pooling a checkpoint was trained with (train_simcse.py records it), else mean."""
    return (ckpt or {}).get("config", {}).get("pooling", "mean")


def encode(enc, texts, max_len):
    """Token ids of each text between two <|endoftext|>, the text cut to fit max_len tokens in all."""
    return [[enc.eot_token] + enc.encode_ordinary(t)[:max_len - 2] + [enc.eot_token] for t in texts]


def pool(features, text_mask, pooling="mean"):
    """One vector per row (B, C), not normalised, of features (B, T, C). text_mask (B, T) bool marks each row's
    text tokens: one contiguous run, followed by its closing <|endoftext|> (the layout of encode(), padded left
    or right); padding is never marked, so it never enters a pooled vector.
        mean           the mean of the text tokens' features
        weighted-mean  weights 1, 2, ..., L over the L text tokens, normalised (SGPT, LLM2Vec): later tokens,
                       which have seen more of the text in a causal model, count more
        last           the last text token's features
        eos            the closing <|endoftext|>'s features (the position after the last text token)
    Shared by embed() and train_simcse.py, so an encoder is trained and used with the same pooling."""
    if pooling not in POOLINGS:
        raise EmbedError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    m = text_mask.to(features.dtype)
    order = m.cumsum(1) * m                                   # 1, 2, ..., L on the text tokens, 0 elsewhere
    if pooling in ("last", "eos"):
        last = order.argmax(1) + (pooling == "eos")           # (B,): the last text token, or the one after it
        return features[torch.arange(features.size(0), device=features.device), last]
    weights = m if pooling == "mean" else order
    return (features * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)


@torch.no_grad()
def _pass(model, kind, rows, direction=None):
    """Features (B, T, C) of the id lists `rows`, padded as the pass needs, and for each row the slice of its
    text tokens (the two <|endoftext|> left out)."""
    device = next(model.parameters()).device
    T = max(map(len, rows))
    idx = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    real = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    spans = []
    for r, ids in enumerate(rows):
        start = T - len(ids) if direction == "bw" else 0  # left padding for the bw pass only
        idx[r, start:start + len(ids)] = torch.tensor(ids, device=device)
        real[r, start:start + len(ids)] = True
        spans.append(slice(start + 1, start + len(ids) - 1))
    if kind == "dual":
        h = model.features(idx, direction=direction)
    elif kind in ENCODERS:
        h = model.features(idx, key_mask=real)
    else:
        h = model.features(idx)
    return h.float(), spans


def text_mask_of(spans, shape, device):
    """(B, T) bool, True on each row's span."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for r, span in enumerate(spans):
        mask[r, span] = True
    return mask


def feature_batches(model, enc, texts, kind=None, batch_size=32, progress=False, pooling=None):
    """Yields (i, features of text i) batch by batch, texts in order of length (little padding): (L, C) float
    tensors, for dual a pair (fw, bw). Only one batch's features are alive at a time. With `pooling` (one of
    POOLINGS) it yields (i, the text's pooled, L2-normalised embedding) instead."""
    kind = kind or embedding_kind(model)
    if kind not in KINDS:
        raise EmbedError(f"unknown embedding kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if (kind == "dual") != (model.name == "dual_mask_gpt") or (kind in ENCODERS) != (embedding_kind(model) == "mntp"):
        raise EmbedError(f"a {model.name} checkpoint ({embedding_kind(model)}) cannot give {kind} embeddings")
    if pooling is not None and pooling not in POOLINGS:
        raise EmbedError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    if kind == "dual" and pooling not in (None, "mean"):
        raise EmbedError(f"dual embeddings are mean-pooled (per direction); --pooling {pooling} is for causal and "
                         f"encoder checkpoints")
    rows = [np.asarray(r, dtype=np.int64) for r in encode(enc, texts, model.config.block_size)]  # compact ids
    if any(len(r) < 3 for r in rows):
        raise EmbedError("an empty text has no tokens to embed")
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    starts = range(0, len(order), batch_size)
    # leave=False: the bar is wiped when it closes, so a failure mid-way ends with its one error line alone
    with tqdm(starts, desc="embedding", unit="batch", disable=not progress, file=sys.stderr, leave=False) as bar:
        for b in bar:
            batch = order[b:b + batch_size]
            passes = ("fw", "bw") if kind == "dual" else (None,)
            feats = [_pass(model, kind, [rows[i] for i in batch], d) for d in passes]
            if pooling is not None:
                pooled = [pool(h, text_mask_of(spans, h.shape[:2], h.device), pooling).cpu() for h, spans in feats]
                for j, i in enumerate(batch):
                    yield i, _combine([p[j] for p in pooled])
                continue
            for j, i in enumerate(batch):
                per_pass = [h[j, spans[j]].cpu() for h, spans in feats]
                yield i, (tuple(per_pass) if kind == "dual" else per_pass[0])
    model.train(was_training)


def text_features(model, enc, texts, kind=None, batch_size=32):
    """Per text its token features (L, C) as a float tensor; for dual a pair (fw, bw); in input order."""
    out = [None] * len(texts)
    for i, f in feature_batches(model, enc, texts, kind, batch_size):
        out[i] = f
    return out


def _combine(parts):
    """Unit vectors of each part, concatenated and scaled so that the whole is a unit vector again."""
    return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1) / math.sqrt(len(parts))


def token_vectors(features):
    """One text's unit token vectors (L, C), dual: (L, 2C)."""
    return _combine(list(features)) if isinstance(features, tuple) else F.normalize(features, dim=-1)


def embed(model, enc, texts, kind=None, batch_size=32, pooling="mean"):
    """Pooled (mean by default; see pool()), L2-normalised embeddings: float32 array (N, C), or (N, 2C) for
    dual."""
    rows = [None] * len(texts)
    for i, vector in feature_batches(model, enc, texts, kind, batch_size, pooling=pooling):
        rows[i] = vector
    return torch.stack(rows).numpy().astype(np.float32)


def token_embeddings(model, enc, texts, kind=None, batch_size=32):
    """Per text an (L, C) (dual: (L, 2C)) float32 array of unit token vectors, for late interaction."""
    out = [None] * len(texts)
    for i, f in feature_batches(model, enc, texts, kind, batch_size):
        out[i] = token_vectors(f).numpy().astype(np.float32)
    return out


# ---- writing as it goes: memory does not grow with the number of texts ---------------------------------

def own_temporary(path):
    """A new, empty file beside `path` for writing it (a hidden name with this process's id), created here and
    never an existing file: so removing it after a failure removes nothing that was there before."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    open(tmp, "xb").close()
    return tmp


def open_npy(path, shape):
    """A .npy file of float32 `shape` whose rows are written in any order with write_rows (no memmap: pages
    written through a file handle do not count toward this process's memory)."""
    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                             "fortran_order": False, "shape": tuple(shape)})
    return f, f.tell()


def write_rows(f, header, width, first_row, rows):
    f.seek(header + first_row * width * 4)
    f.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())


def write_pooled(path, items, n, width):
    """items: (i, pooled vector) as feature_batches(pooling=...) yields them -> an (n, width) .npy written batch by
    batch."""
    f, header = open_npy(path, (n, width))
    with f:
        for i, vector in items:
            write_rows(f, header, width, i, vector.numpy()[None])


def write_tokens(path, items, lengths, width):
    """items -> an .npz with 'tokens' (all texts' unit token vectors stacked, in input order) and 'offsets'
    (text i is tokens[offsets[i]:offsets[i+1]]), as np.savez writes it; the tokens go through a temporary .npy
    that is copied into the zip in chunks."""
    offsets = np.cumsum([0] + list(lengths))
    tmp = own_temporary(path + ".tokens")
    try:
        f, header = open_npy(tmp, (int(offsets[-1]), width))
        with f:
            for i, features in items:
                write_rows(f, header, width, offsets[i], token_vectors(features).numpy())
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with open(tmp, "rb") as src, z.open("tokens.npy", "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            buffer = io.BytesIO()
            np.save(buffer, offsets)
            z.writestr("offsets.npy", buffer.getvalue())
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return int(offsets[-1])


def write_output(out, items, tokens, lengths, width):
    """items -> `out`: pooled (.npy) or, with tokens, token embeddings (.npz), written into a temporary file that
    is renamed at the end, so `out` appears whole or not at all. Whatever stops it (a full disk, Ctrl-C, bad
    input found mid-way), the temporary file is removed. Returns the shape in words."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = own_temporary(out)
    try:
        if tokens:
            shape = f"{write_tokens(tmp, items, lengths, width)} tokens x {width}"
        else:
            write_pooled(tmp, items, len(lengths), width)
            shape = f"{len(lengths)} x {width}"
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return shape


def maxsim(queries, documents):
    """Late-interaction scores (Nq, Nd): score[q, d] = mean over q's tokens of the max over d's tokens of the
    dot product (cosine, for unit token vectors). All document tokens are stacked into one matrix, so each
    query costs one matmul and one segmented max."""
    assert all(len(d) for d in documents), "every document needs at least one token"
    D = np.concatenate(documents)
    starts = np.cumsum([0] + [len(d) for d in documents[:-1]])
    scores = np.empty((len(queries), len(documents)), dtype=np.float32)
    for i, q in enumerate(queries):
        scores[i] = np.maximum.reduceat(q @ D.T, starts, axis=1).mean(0)  # (Lq, Nd) -> mean over q tokens
    return scores


def read_texts(path, field=None):
    """One text per line of a text file, or the string `field` of each record of a JSON lines file."""
    p = Path(path)
    if not p.is_file():
        raise EmbedError(f"--input {path}: no such file")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EmbedError(f"--input {path} is not valid UTF-8 (byte offset {e.start}); convert it to UTF-8") from None
    texts = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        if field is None:
            texts.append(line)
            continue
        try:
            value = json.loads(line).get(field)
        except (json.JSONDecodeError, AttributeError):
            raise EmbedError(f"{path}: line {lineno} is not a JSON object") from None
        if not isinstance(value, str):
            raise EmbedError(f"{path}: line {lineno} has no string field {field!r}")
        if any("\ud800" <= c <= "\udfff" for c in value):  # the tokenizer would replace it silently
            raise EmbedError(f"{path}: line {lineno} holds a lone surrogate escape (such as \"\\ud800\"), which is "
                             f"not text; fix or remove that record")
        texts.append(value)
    if not texts:
        raise EmbedError(f"--input {path} holds no texts")
    return texts


def main(argv=None):
    p = cli.ArgumentParser(description="Embed texts with an lmsmall checkpoint (causal, MNTP encoder, dual).")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file, a run folder (its checkpoint.pt) or hf:NAME_OR_DIR")
    p.add_argument("--input", required=True, help="a text per line, or JSON lines with --field")
    p.add_argument("--field", help="take this string field of each JSON line")
    p.add_argument("--out", type=cli.output_file, help=".npy (pooled, N x D) or, with --tokens, .npz (default runs/embeddings.npy, "
                   "with --tokens runs/token_embeddings.npz)")
    p.add_argument("--kind", choices=KINDS, help="check the checkpoint gives this kind (default: its own)")
    p.add_argument("--pooling", choices=POOLINGS, help="how token features become one vector (default: the "
                   "pooling a SimCSE checkpoint was trained with, else mean; dual: mean only)")
    p.add_argument("--tokens", action="store_true", help="token embeddings for MaxSim: an .npz with 'tokens' "
                   "(all texts' token vectors stacked) and 'offsets' (text i is tokens[offsets[i]:offsets[i+1]])")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", type=cli.device, default="auto", help="auto (cuda if available, else cpu), cpu, "
                   "cuda, cuda:N, mps")
    args = p.parse_args(argv)
    args.device = cli.pick_device(args.device)
    suffix = ".npz" if args.tokens else ".npy"
    out = args.out or os.path.join("runs", "token_embeddings.npz" if args.tokens else "embeddings.npy")
    out = out if out.endswith(suffix) else out + suffix   # as np.save / np.savez name their files
    try:
        if os.path.exists(out) and not args.overwrite:
            raise EmbedError(f"{out} already exists; add --overwrite to replace it or choose another --out")
        if args.tokens and args.pooling:
            raise EmbedError("--pooling makes one vector per text; --tokens keeps every token's vector: give one")
        texts = read_texts(args.input, args.field)  # cheap, so before the model is loaded
        model, ckpt = load_model(args.checkpoint, device=args.device)
        enc = tokenizer_of(model, ckpt, args.checkpoint)
        kind = embedding_kind(model, ckpt)
        if args.kind and args.kind != kind:
            raise EmbedError(f"--kind {args.kind}: {args.checkpoint} (a {model.name} checkpoint) gives {kind} "
                             f"embeddings, not {args.kind}")
        pooling = None if args.tokens else args.pooling or default_pooling(ckpt)
        batches = feature_batches(model, enc, texts, kind, args.batch_size, progress=True, pooling=pooling)
        try:
            first = next(batches)
            width = (first[1] if pooling else token_vectors(first[1])).shape[-1]
            lengths = [len(r) - 2 for r in encode(enc, texts, model.config.block_size)]
            shape = write_output(out, itertools.chain([first], batches), args.tokens, lengths, width)
        except OSError as e:  # e.g. a full disk
            batches.close()  # the progress bar goes before the message
            print(f"error: could not write {out} ({e.strerror or e}); no file was changed: free some space or "
                  f"choose another --out", file=sys.stderr)
            return 1
    except (EmbedError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = f", {pooling} pooling" if pooling else ""
    print(f"{kind} embeddings of {len(texts)} texts ({shape}{how}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
