"""
The Hugging Face bridge: real GPT-2 weights in, any GPT-2-shaped lmsmall model out.

    python convert_hf.py from-hf --model gpt2 --out gpt2.pt                  # the Hub (once, then its cache)
    python convert_hf.py from-hf --model path/to/folder --out gpt2.pt        # a folder written by save_pretrained
    python convert_hf.py to-hf --checkpoint runs/baseline_gpt2/checkpoint.pt --out hf/baseline
    python finetune.py --checkpoint hf:gpt2 ...                              # any script: converted on the fly

--overwrite replaces only what convert_hf.py wrote: an lmsmall checkpoint file (from-hf), or an earlier export
that holds nothing but the files its lmsmall_export.json lists (to-hf). Any other existing --out is refused.

lmsmall's baseline_gpt2 is GPT-2 (build-nanogpt), so the bridge is naming and layout:
    transformer.wte / wpe / ln_f     <->  wte / wpe / ln_f
    transformer.h.{i}.*              <->  blocks.{i}.*
    attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj: HF stores them as Conv1D, weight (in, out), the transpose
    of nn.Linear's (out, in).
    lm_head is tied to wte in both.
Vocabulary: GPT-2 has 50257 tokens; lmsmall pads the table to a multiple of 64 (50304, faster matmuls). The 47
padded rows are set to the mean of the real rows: the tokenizer never produces them, generate.py and evaluate.py
never sample them (vocab_limit), and by Jensen's inequality (mean of exp >= exp of mean) their share of the
softmax is at most 47 / 50257, so a loss over 50304 logits exceeds GPT-2's own by at most log(1 + 47/50257)
< 0.001 nats. to-hf cuts the table back to the tokenizer's size.

What can go to Hugging Face (as GPT2LMHeadModel): baseline_gpt2 and progressive_diverging (its LoRA merged; a
stage-1 or stage-2 model, whose blocks are shared, is unrolled into n_layer blocks), causal, with the tied head
and learned positions (sinusoidal and none also: their positions become a fixed wpe table of block_size rows).
Not ALiBi or RoPE, the CLAP heads, RMSNorm, relu2/SwiGLU, QK-norm, bidirectional encoders (MNTP), conv_attention
or dual_mask_gpt: GPT-2 has no equivalent. The exported model's logits are checked against the checkpoint's.
Tokenizer files go with it (vocab.json, merges.txt, tokenizer.json): GPT-2's, copied from tiktoken's cache, for
gpt2 runs; for byte runs a byte-level vocabulary without merges (id = the byte, 256 = <|endoftext|>).
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile

import torch

from checkpoint import (CHECKPOINT_FORMAT, GPT2_FILES, GPT2_VOCAB, CheckpointError, absolute_checkpoint, first_line,
                        from_hf, hf_name, load_model, require_transformers, tiktoken_file, tokenizer_of, transposed)
from data_file_utils import DataError
from models import ModelConfigError
from plumbing.cli import EXIT_WRITE_FAILED
from plumbing.run_folder import WriteError

WHY_NOT = {  # models and options GPT-2 has no equivalent for
    "conv_attention": "conv_attention's hourglass (compressors and expanders between resolutions) has no GPT-2 "
                      "equivalent",
    "dual_mask_gpt": "dual_mask_gpt's task tokens and backward (anti-causal) direction have no GPT-2 equivalent",
    "alibi": "ALiBi positions (biases inside attention) have no GPT-2 equivalent (GPT-2 adds position vectors)",
    "clap": "the CLAP head (unit-length embeddings, cosine logits times a learned beta) has no GPT-2 equivalent",
    "bidirectional": "it is an encoder (bidirectional attention, e.g. MNTP), and GPT-2 is causal",
    "rope": "rotary positions (RoPE, applied to q and k inside attention) have no GPT-2 equivalent",
    "clap-cosine": "the CLAP-cosine head (cosine logits times a learned beta) has no GPT-2 equivalent",
    "rms": "RMSNorm (--norm rms) has no GPT-2 equivalent (GPT2LMHeadModel uses LayerNorm with a bias)",
    "relu2": "the relu2 MLP (relu(x)^2) has no GPT-2 equivalent (GPT2LMHeadModel computes GELU)",
    "swiglu": "the SwiGLU MLP (a gated MLP) has no GPT-2 equivalent",
    "qk_norm": "QK-norm (RMSNorm on q and k) has no GPT-2 equivalent",
}
# to-hf writes this file last, listing the export's files: --overwrite replaces a folder only when it holds it
# and nothing else, so it never deletes a file convert_hf.py did not write.
EXPORT_MARKER, EXPORT_FORMAT = "lmsmall_export.json", "lmsmall-hf-export-v1"
GPT2_OPTIONS = {"pos": ("learned", "sinusoidal", "none"), "head": ("tied",), "attention": ("causal",),
                "norm": ("layer",), "mlp": ("gelu",), "qk_norm": (False,)}  # what GPT2LMHeadModel computes


# ---- lmsmall -> Hugging Face -----------------------------------------------------------------------

def why_not_exportable(model):
    """None when GPT2LMHeadModel can compute `model` exactly, else the reason in words."""
    if model.name not in ("baseline_gpt2", "progressive_diverging"):
        return WHY_NOT.get(model.name, f"{model.name} is not a GPT-2 architecture")
    for option, fine in GPT2_OPTIONS.items():
        value = getattr(model.config, option, fine[0])
        if value not in fine:
            return WHY_NOT.get(option if value is True else value, f"{option}={value!r} has no GPT-2 equivalent")
    return None


def hf_state_dict(model, n_vocab):
    """GPT2LMHeadModel's weights for an lmsmall model (LoRA merged): applications unrolled into blocks."""
    c = model.config
    with torch.no_grad():
        positions = model.wpe(torch.arange(c.block_size))  # learned: the table; sinusoidal: fixed; none: 0.0
        positions = positions + torch.zeros(c.block_size, c.n_embd)
    wte = model.wte.weight.detach()[:n_vocab]
    state = {"transformer.wte.weight": wte, "transformer.wpe.weight": positions, "lm_head.weight": wte,
             "transformer.ln_f.weight": model.ln_f.weight.detach(), "transformer.ln_f.bias": model.ln_f.bias.detach()}
    repeats = c.n_layer // len(model.blocks)  # 1 for baseline_gpt2; 4, 2, 1 in progressive stages 1, 2, 3
    for a in range(c.n_layer):
        for key, tensor in model.blocks[a // repeats].state_dict().items():
            name = hf_name(f"blocks.{a}.{key}")
            state[name] = (tensor.t() if transposed(name) else tensor).contiguous().clone()
    return state


@torch.no_grad()
def check_same_logits(model, hf, n_vocab, checkpoint):
    """The exported model must compute the lmsmall model's logits (a short fixed sequence, fp32); a folder that
    loads but predicts something else is never written."""
    idx = (torch.arange(min(16, model.config.block_size)) * 7 % n_vocab)[None]
    ours, theirs = model(idx)[0][..., :n_vocab].float(), hf(idx).logits.float()
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3):
        raise CheckpointError(f"{checkpoint} cannot go to Hugging Face as GPT-2: the exported GPT2LMHeadModel "
                              f"computes other logits (max difference {float((ours - theirs).abs().max()):.3g}); "
                              f"please report this")


def byte_vocabulary():
    """The byte tokenizer as a byte-level BPE vocabulary without merges: GPT-2's printable stand-in for each byte
    (its bytes_to_unicode table) -> the byte's value, and <|endoftext|> -> 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {char[b]: b for b in range(256)} | {"<|endoftext|>": 256}


def gpt2_tokenizer_files():
    """HF's name -> the path of tiktoken's cached copy, for GPT-2's vocab.json and merges.txt."""
    for url in GPT2_FILES.values():
        if tiktoken_file(url) is None:
            raise CheckpointError(f"GPT-2's {url.rsplit('/', 1)[1]} is not in tiktoken's cache; set "
                                  f"TIKTOKEN_CACHE_DIR to the folder that holds it (e.g. ../shared/tiktoken-cache)")
    return {name: tiktoken_file(url) for name, url in GPT2_FILES.items()}


def write_tokenizer(folder, tokenizer_name, block_size):
    """vocab.json and merges.txt, then tokenizer.json and tokenizer_config.json through AutoTokenizer, which must
    then encode exactly as lmsmall's tokenizer does."""
    from base_data_preparer import get_tokenizer
    transformers = require_transformers()
    enc = get_tokenizer(tokenizer_name)  # a gpt2 run: puts GPT-2's files into tiktoken's cache if online
    if tokenizer_name == "gpt2":
        for name, path in gpt2_tokenizer_files().items():
            shutil.copyfile(path, os.path.join(folder, name))
    else:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(byte_vocabulary(), f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, model_max_length=block_size)
    tokenizer.save_pretrained(folder)
    sample = "Question: What is 12 + 35?\nAnswer: 47<|endoftext|> déjà vu, 😀  two  spaces\n"
    ids = transformers.AutoTokenizer.from_pretrained(folder)(sample)["input_ids"]
    if ids != enc.encode(sample, allowed_special="all"):
        raise CheckpointError(f"the exported {tokenizer_name} tokenizer does not encode as lmsmall's does "
                              f"(transformers {transformers.__version__}); please report this")


def export_hf(checkpoint, out, overwrite=False):
    """Write `checkpoint` (a path or hf:NAME) as a Hugging Face GPT-2 folder `out`; returns a summary line."""
    transformers = require_transformers()
    old_files = check_export_out(out, checkpoint, overwrite)  # before any work
    model, ckpt = load_model(checkpoint)  # for inference: LoRA merged
    reason = why_not_exportable(model)
    if reason:
        raise CheckpointError(f"{checkpoint} cannot go to Hugging Face as GPT-2: {reason}")
    enc = tokenizer_of(model, ckpt, checkpoint)
    tokenizer_name = ckpt["config"]["tokenizer"]
    if tokenizer_name == "gpt2":
        gpt2_tokenizer_files()
    c = model.config
    config = transformers.GPT2Config(
        vocab_size=enc.n_vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=c.dropout,
        bos_token_id=enc.eot_token, eos_token_id=enc.eot_token, architectures=["GPT2LMHeadModel"])
    hf = transformers.GPT2LMHeadModel(config)
    hf.load_state_dict(hf_state_dict(model, enc.n_vocab), strict=True)
    check_same_logits(model, hf.eval(), enc.n_vocab, checkpoint)

    def write(staging):
        hf.save_pretrained(staging)
        write_tokenizer(staging, tokenizer_name, c.block_size)
    write_export(write, out, checkpoint, old_files)
    unrolled = f", {len(model.blocks)} shared blocks unrolled" if len(model.blocks) != c.n_layer else ""
    return (f"{checkpoint} ({model.name}{unrolled}) -> {out}: GPT2LMHeadModel with {c.n_layer} layers, vocabulary "
            f"{enc.n_vocab}, context {c.block_size}, and the {tokenizer_name} tokenizer")


def import_hf(name, out, overwrite=False):
    """Write the Hugging Face GPT-2 `name` as an lmsmall checkpoint file `out`; returns a summary line."""
    check_checkpoint_out(out, overwrite)  # before any work
    ckpt = from_hf(name)
    write_checkpoint(ckpt, out)
    c = ckpt["model_config"]
    return (f"{name} -> {out}: baseline_gpt2 with {c['n_layer']} layers, {c['n_embd']} wide, context "
            f"{c['block_size']}, vocabulary {GPT2_VOCAB} padded to {c['vocab_size']}, tokenizer gpt2")


# ---- writing: nothing destroyed --------------------------------------------------------------------
# --overwrite replaces only what convert_hf.py wrote itself: an lmsmall checkpoint file (from-hf), an earlier
# export listed by its marker (to-hf). Everything is written beside --out under a name of its own, then renamed
# into place; a failed write removes what it made and leaves --out as it was.

def nearest_existing(path):
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def inside(path, folder):
    """Whether the real path `path` is `folder` or lies under it."""
    return os.path.commonpath([path, folder]) == folder


def check_out_path(out, what):
    """What both directions refuse: a symbolic link (renaming onto it would replace the link, not its target) and
    a path under a file."""
    if not out.strip():
        raise CheckpointError(f"--out is empty; give the {what} to write")
    if os.path.islink(out):
        raise CheckpointError(f"{out} is a symbolic link; give the {what} itself or choose another --out")
    above = nearest_existing(os.path.dirname(os.path.abspath(out)))
    if not os.path.isdir(above):
        raise CheckpointError(f"{above} is a file, so nothing can be written under it; choose another --out")


def check_checkpoint_out(out, overwrite):
    """from-hf's --out: a new file, or with --overwrite an lmsmall checkpoint; anything else is refused."""
    check_out_path(out, "checkpoint file")
    if os.path.isdir(out):
        raise CheckpointError(f"{out} is a folder; --out names the checkpoint file to write, e.g. "
                              f"{os.path.join(out, 'gpt2.pt')}")
    if os.path.exists(out):
        if not overwrite:
            raise CheckpointError(f"{out} already exists; add --overwrite to replace it or choose another --out")
        if not is_lmsmall_checkpoint(out):
            raise CheckpointError(f"{out} is not an lmsmall checkpoint; --overwrite replaces only one: choose "
                                  f"another --out")


def is_lmsmall_checkpoint(path):
    """A regular file that torch.load reads safely (weights_only; mmap leaves the tensors on disk) and whose
    format is lmsmall's."""
    if not os.path.isfile(path):
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file, truncated, or unpickling refused
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT


def check_export_out(out, checkpoint, overwrite):
    """to-hf's --out: a new or empty folder, or with --overwrite an earlier export (its files, returned); never
    the current folder or one holding the checkpoint being read."""
    check_out_path(out, "folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out} is a file; --out names the folder to write: choose another --out")
    real = os.path.realpath(out)
    if inside(os.path.realpath(os.getcwd()), real):
        raise CheckpointError(f"{out} is the current folder or holds it; give the export a folder of its own, "
                              f"e.g. --out hf/NAME")
    source = checkpoint[3:] if checkpoint.startswith("hf:") else checkpoint
    if os.path.exists(source) and inside(os.path.realpath(source), real):
        raise CheckpointError(f"{out} holds the checkpoint being read ({checkpoint}); choose another --out")
    if not os.path.isdir(out) or not os.listdir(out):
        return []
    names = sorted(os.listdir(out))
    listed = export_marker_files(out)
    if listed is None:
        raise CheckpointError(f"{out} already exists and is not a folder written by convert_hf.py to-hf (no "
                              f"{EXPORT_MARKER}); --overwrite replaces only such a folder: choose another --out")
    strangers = [n for n in names if n not in listed or os.path.islink(os.path.join(out, n))
                 or not os.path.isfile(os.path.join(out, n))]
    if strangers:
        raise CheckpointError(f"{out} holds files convert_hf.py to-hf did not write ({', '.join(strangers[:3])}); "
                              f"--overwrite replaces only an earlier export as it wrote it: choose another --out")
    if not overwrite:
        raise CheckpointError(f"{out} already exists; add --overwrite to replace it or choose another --out")
    return names


def export_marker_files(folder):
    """The file names an export's marker lists (the marker included), or None when there is no valid marker."""
    try:
        with open(os.path.join(folder, EXPORT_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
        files = marker["files"] if marker["format"] == EXPORT_FORMAT else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(files, list) or not all(isinstance(n, str) and n == os.path.basename(n) and n not in
                                              ("", ".", "..") for n in files):
        return None
    return set(files) | {EXPORT_MARKER}


def default_mode(mode):
    """`mode` as the umask leaves it (mkstemp and mkdtemp make private 0600 and 0700 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def make_parent(path, created):
    """Create the missing folders above path, noting each in `created` (removed again if the write fails)."""
    missing, folder = [], os.path.dirname(path)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        os.mkdir(folder)
        created.append(folder)


def remove_folders(created):
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only while empty


def write_error(out, error):
    """A failed write in one line. safetensors and torch.save report a full disk with errors of their own
    (SafetensorError, RuntimeError), so the free space is given too."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
    try:
        reason += f"; {shutil.disk_usage(nearest_existing(os.path.abspath(out))).free:,} bytes free there"
    except OSError:
        pass
    return WriteError(f"could not write {out} ({reason}); nothing was changed: free some disk space or check the "
                      f"folder's permissions, or choose another --out")


def write_checkpoint(ckpt, out):
    """torch.save into a temporary file of its own beside out, then rename: out is replaced whole or not at all."""
    path = os.path.abspath(out)
    created, tmp, done = [], None, False
    try:
        make_parent(path, created)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode(0o666))
        os.replace(tmp, path)
        done = True
    except Exception as e:
        raise write_error(out, e) from None
    finally:
        if not done:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            remove_folders(created)


def write_export(write, out, checkpoint, old_files):
    """write(folder) fills a staging folder beside out; the marker goes in last, then the folder is renamed into
    place (over an earlier export: see swap_in)."""
    path = os.path.abspath(out)
    created, staging, done = [], None, False
    try:
        make_parent(path, created)
        staging = tempfile.mkdtemp(prefix=".to-hf-", dir=os.path.dirname(path))
        os.chmod(staging, default_mode(0o777))
        write(staging)
        marker = {"format": EXPORT_FORMAT, "written_by": "convert_hf.py to-hf",
                  "checkpoint": absolute_checkpoint(checkpoint), "files": sorted(os.listdir(staging))}
        with open(os.path.join(staging, EXPORT_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
        swap_in(staging, path, old_files)
        done = True
    except CheckpointError:  # the exported tokenizer does not encode as lmsmall's: not a write failure
        raise
    except Exception as e:
        raise write_error(out, e) from None
    finally:
        if not done:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)  # the staging folder is this command's own
            remove_folders(created)


def swap_in(staging, path, old_files):
    """Rename the staging folder to path. An earlier export is moved aside first and put back if the rename
    fails; once the new one is in, the old one's own files are deleted (anything else stays, aside)."""
    if not old_files:  # nothing there, or an empty folder (a rename replaces it)
        os.replace(staging, path)
        return
    aside = tempfile.mkdtemp(prefix=".to-hf-old-", dir=os.path.dirname(path))
    try:
        os.replace(path, aside)  # a folder renamed onto an empty one
    except BaseException:
        os.rmdir(aside)
        raise
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(aside, path)
        raise
    for name in old_files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(aside, name))
    with contextlib.suppress(OSError):
        os.rmdir(aside)


# ---- command line ----------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Convert between Hugging Face GPT-2 and lmsmall checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="a Hugging Face GPT-2 (Hub name or local folder) -> an lmsmall checkpoint")
    a.add_argument("--model", required=True, help="gpt2, gpt2-medium, ... or a folder written by save_pretrained")
    a.add_argument("--out", required=True, help="the checkpoint file to write, e.g. gpt2.pt")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out that is an lmsmall checkpoint")
    b = sub.add_parser("to-hf", help="an lmsmall checkpoint -> a folder transformers loads")
    b.add_argument("--checkpoint", required=True,
                   help="an lmsmall checkpoint file or a run folder (its checkpoint.pt)")
    b.add_argument("--out", required=True, help="the folder to write")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is an earlier to-hf export (and holds nothing else)")
    args = p.parse_args(argv)
    try:
        if args.command == "from-hf":
            print(import_hf(args.model, args.out, args.overwrite))
        else:
            print(export_hf(args.checkpoint, args.out, args.overwrite))
    except (CheckpointError, DataError, ModelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
