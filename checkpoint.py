"""
The checkpoint: one file holds a model and, for a training run, everything --resume needs. This module owns
its format, writing it (through plumbing.run_folder.atomic_write: temporary file, fsync, rename, so a crash
never leaves half a checkpoint under the real name), reading it (a file, a run folder, or hf:NAME for a Hugging
Face GPT-2), rebuilding the model, the RNG state, and what --resume checks.

    ckpt = load_checkpoint("runs/baseline_gpt2")          # a dict; CheckpointError (one line) if unusable
    model, ckpt = load_model("hf:gpt2")          # any registered model, or a converted GPT-2
    enc = tokenizer_of(model, ckpt, path)        # the tokenizer the run used
    write_checkpoint(path, training_checkpoint(...))      # what the trainer saves
    check_resumable(ckpt, path, model_name, entry_point, out_dir)   # what --resume checks first

What a training checkpoint holds (training_checkpoint below; base_trainer.py passes the values):
    format "lmsmall-checkpoint-v1", model_name, model_config, model_state (and train_model_state for LoRA),
    model_extra_state, optimizer_state, step, tokens_seen, loader_state, rng, config (the run's settings),
    metrics_offset, nonfinite_skipped, finished
A model-only checkpoint (convert_hf.py from-hf, hf:NAME) has the first four and config.
"""

import dataclasses
import io
import os
import random
import re
import hashlib
import json
import tempfile

import numpy as np
import torch

from base_data_preparer import get_tokenizer
from models import create_model, model_config, model_module
from plumbing import run_folder
from plumbing.trainer_config import COMMON_DEFAULTS, TRAIN_PRESETS

CHECKPOINT_FORMAT = "lmsmall-checkpoint-v1"
# What every reader of a checkpoint uses, and its type (training runs and convert_hf.py write them all).
CHECKPOINT_FIELDS = {"model_name": str, "model_config": dict, "model_state": dict, "config": dict}
# What a training checkpoint adds and --resume needs (a model-only checkpoint lacks it).
RESUME_STATE = ("model_name", "config", "model_extra_state", "optimizer_state", "step", "tokens_seen",
                "loader_state", "rng", "metrics_offset")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


# ---- reading ----------------------------------------------------------------------------------------

def load_checkpoint(path, map_location="cpu"):
    """Read and validate a checkpoint file; CheckpointError with a one-line reason otherwise.
    hf:NAME_OR_DIR is a Hugging Face GPT-2 (the Hub or a local folder), converted by from_hf below; a run
    folder stands for its checkpoint.pt."""
    if str(path).startswith("hf:"):
        return from_hf(str(path)[3:])
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "checkpoint.pt")):
            raise CheckpointError(f"no checkpoint.pt in the folder {path}; give a run folder or a checkpoint file")
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or unpickling refused
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({reason}); it is corrupt or not an "
                              f"lmsmall checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an lmsmall checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    for key, kind in CHECKPOINT_FIELDS.items():  # an edited or damaged file: one line here, not a KeyError later
        if key not in ckpt:
            problem = f"has no '{key}'"
        elif not isinstance(ckpt[key], kind):
            problem = f"has a {type(ckpt[key]).__name__} as '{key}', not a {kind.__name__}"
        elif key == "model_state" and not all(torch.is_tensor(t) for t in ckpt[key].values()):
            problem = "has a 'model_state' that holds something other than tensors"
        else:
            continue
        raise CheckpointError(f"checkpoint {path} {problem}: it is damaged or was not written by lmsmall; use "
                              f"the checkpoint as its training run wrote it")
    return ckpt

def tokenizer_of(model, ckpt, path):
    """The tokenizer a checkpoint's run used (its config's "tokenizer"), checked against the model built from
    it: every token id needs an embedding row below the model's own extra tokens (dual_mask_gpt's task
    tokens), or generate, evaluate and embed end in an IndexError mid-run. CheckpointError otherwise."""
    name = ckpt.get("config", {}).get("tokenizer")
    if name is None:
        raise CheckpointError(f"checkpoint {path} records no tokenizer (its config has no 'tokenizer'); "
                              f"use a checkpoint written by an lmsmall training script")
    enc = get_tokenizer(name)
    extra = getattr(model_module(ckpt["model_name"]), "EXTRA_TOKENS", 0)
    if enc.n_vocab + extra > model.config.vocab_size:
        needed = f"{enc.n_vocab} tokens" + (f" + {extra} task tokens" if extra else "")
        raise CheckpointError(f"checkpoint {path} records the {name} tokenizer ({needed}) but its model has "
                              f"only {model.config.vocab_size} token rows: weights and tokenizer do not belong "
                              f"together; use the checkpoint as its training run wrote it")
    return enc

def load_model(path, device="cpu", for_inference=True):
    """Rebuild the model stored in an lmsmall checkpoint (any registered model)."""
    ckpt = load_checkpoint(path)
    for name, tensor in ckpt["model_state"].items():  # a nan weight makes every loss nan, every answer junk
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path} holds non-finite weights ({name} has nan or inf); "
                                  f"nothing it computes would mean anything: use an earlier checkpoint")
    try:  # an unknown model name, a config or extra state value of the wrong kind
        model = create_model(ckpt["model_name"], preset=None, **ckpt["model_config"])
        model.load_extra_state(ckpt.get("model_extra_state", {}))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} does not describe a model this code can build "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); use a checkpoint "
                              f"written by an lmsmall training script") from None
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match model {ckpt['model_name']}: "
                              f"{str(e).splitlines()[0]}") from None
    model.to(device)
    if for_inference:
        model.prepare_for_inference()
        model.eval()
    return model, ckpt


# ---- writing, and what --resume checks ----------------------------------------------------------------

def training_checkpoint(model_name, model_config, model_states, model_extra_state, optimizer_state, step,
                        tokens_seen, loader_state, config, metrics_offset, nonfinite_skipped, finished):
    """The dict a training run's checkpoint.pt holds; the RNG state is taken now, as the run saves.
    model_states: {"model_state": ...}, plus "train_model_state" where the run trains another structure (LoRA)."""
    return {
        "format": CHECKPOINT_FORMAT, "model_name": model_name, "model_config": dataclasses.asdict(model_config),
        **model_states, "model_extra_state": model_extra_state, "optimizer_state": optimizer_state,
        "step": step, "tokens_seen": tokens_seen, "loader_state": loader_state, "rng": rng_state(),
        "config": config, "metrics_offset": metrics_offset, "nonfinite_skipped": nonfinite_skipped,
        "finished": finished,
    }


def write_checkpoint(path, ckpt):
    """Serialize in memory, then replace path all at once: a crash or a full disk leaves the old checkpoint
    (run_folder.WriteError, one line), never half of the new one."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    run_folder.atomic_write(path, buffer.getvalue())


def check_resumable(ckpt, path, model_name, entry_point, out_dir):
    """--resume continues a training checkpoint of this model written by this script; otherwise CheckpointError
    says what to run instead."""
    missing = [key for key in RESUME_STATE if key not in ckpt]
    if missing:  # e.g. convert_hf.py from-hf's output: weights, but no optimizer, data position, RNG
        raise CheckpointError(f"{path} holds a model but no training state to resume (no {', '.join(missing)}); "
                              f"fine-tune from it instead: python finetune.py --checkpoint {path} --out-dir "
                              f"ANOTHER_FOLDER")
    if ckpt.get("model_name") != model_name:
        raise CheckpointError(f"{path} holds a {ckpt.get('model_name')} run, not {model_name}; resume it with "
                              f"train_{ckpt.get('model_name')}.py")
    made_by = ckpt["config"].get("entry_point", f"train_{model_name}.py")
    if made_by != entry_point:
        raise CheckpointError(f"{path} was written by {made_by}; resume it with python {made_by} --out-dir "
                              f"{out_dir} --resume")


def is_finished(ckpt):
    """True if the checkpoint holds the run's final evaluation. Checkpoints from before "finished" existed: the
    final one is the one at the run's own max_steps."""
    return ckpt.get("finished", ckpt["step"] >= ckpt["config"]["max_steps"])


def is_training_checkpoint(path):
    """True if path is a checkpoint a training run wrote (the format marker and optimizer state): --overwrite may
    replace it, but not, e.g., the weights-only file convert_hf.py from-hf writes. Reads no tensor (mmap)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: not known to be a run's, so not deleted
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT and "optimizer_state" in ckpt


def load_training_weights(model, ckpt, path):
    """--resume: the weights the run trained ("train_model_state" where it differs from the saved model, LoRA)
    and the model's extra state (e.g. its stage) into model; CheckpointError if they do not fit."""
    model.load_extra_state(ckpt["model_extra_state"])
    try:
        model.load_state_dict(ckpt.get("train_model_state", ckpt["model_state"]))
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from None


def tensors_in(value):
    """Every tensor inside nested dicts, lists and tuples (an optimizer's state_dict)."""
    if torch.is_tensor(value):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for item in items for t in tensors_in(item)]


def all_finite(tensors):
    """True if every element of every tensor is finite (one host sync)."""
    flags = [t.detach().isfinite().all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def check_finite_state(model, optimizer, path, step):
    """Saving refuses non-finite weights, but a checkpoint from elsewhere (or older code) may hold them: resumed,
    it would only diverge again, so say so now instead of calling it a good checkpoint later."""
    if not all_finite([*model.state_dict().values(), *tensors_in(optimizer.state_dict())]):
        raise CheckpointError(f"{path} (step {step}) holds non-finite weights or optimizer state, so it cannot be "
                              f"resumed; start over with --overwrite (or from a copy of an earlier checkpoint)")


# ---- randomness: --resume continues every random stream exactly ----------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ---- hf:NAME: a Hugging Face GPT-2 as an lmsmall checkpoint (convert_hf.py explains the mapping) -------

GPT2_VOCAB = 50257
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # HF Conv1D
# tiktoken caches each file it downloads under the sha1 of its URL; HF calls them vocab.json and merges.txt.
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {"vocab.json": TIKTOKEN_URL + "encoder.json", "merges.txt": TIKTOKEN_URL + "vocab.bpe"}


def require_transformers():
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers
    except ImportError:
        raise CheckpointError("the Hugging Face bridge needs transformers and safetensors: "
                              "pip install transformers safetensors") from None
    transformers.logging.set_verbosity_error()  # its warnings are not ours to print; errors still raise
    transformers.logging.disable_progress_bar()  # per-tensor loading bars (Hub downloads keep theirs)
    return transformers


def first_line(e):
    text = str(e).strip()
    return (text.splitlines()[0][:160] if text else type(e).__name__)


def hf_name(name):
    """An lmsmall baseline_gpt2 weight name -> GPT2LMHeadModel's: blocks.3.attn.c_attn.weight ->
    transformer.h.3.attn.c_attn.weight, wte.weight -> transformer.wte.weight."""
    return "transformer." + re.sub(r"^blocks\.", "h.", name)


def lmsmall_name(name):
    return re.sub(r"^h\.", "blocks.", name.removeprefix("transformer."))


def transposed(name):
    return name.endswith(TRANSPOSED)


def load_hf_gpt2(name):
    """GPT2LMHeadModel (fp32, eval) from a local folder or the Hub; CheckpointError with one line otherwise."""
    transformers = require_transformers()
    if not name:
        raise CheckpointError("hf: needs a Hugging Face model: hf:gpt2, hf:gpt2-medium, ... or hf:FOLDER")
    local = os.path.isdir(name)
    if local and not os.path.isfile(os.path.join(name, "config.json")):
        raise CheckpointError(f"{name} is not a Hugging Face model folder (no config.json); give a folder written "
                              f"by save_pretrained or a Hub name such as gpt2")
    if not local and (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise CheckpointError(f"no Hugging Face model folder at {name}")
    where = f"folder {name}" if local else f"{name} (Hugging Face Hub)"
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except Exception as e:  # malformed JSON, unknown model type, offline without a cached copy, no such repo
        offline_check(name, local, e)
        raise CheckpointError(f"cannot read the config of {where} ({first_line(e)})") from None
    check_gpt2_config(config, name)
    if local:
        check_gpt2_tokenizer(name)
    try:
        model, info = transformers.GPT2LMHeadModel.from_pretrained(name, output_loading_info=True)
    except Exception as e:  # missing, truncated or corrupt weight files; offline without the weights cached
        offline_check(name, local, e)
        raise CheckpointError(f"cannot load the weights of {where} ({first_line(e)}); it is corrupt or "
                              f"incomplete") from None
    missing = sorted(info.get("missing_keys", [])) + sorted(info.get("mismatched_keys", []))
    if missing:  # transformers would fill them with random numbers and carry on
        raise CheckpointError(f"the weights of {where} lack {missing[0]} ({len(missing)} tensors missing or of "
                              f"the wrong shape); the folder is incomplete")
    model = model.float().eval()
    for key, tensor in model.state_dict().items():  # a nan weight makes every loss nan, every answer junk
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"the weights of {where} are not all finite ({key} has nan or inf); nothing the "
                                  f"model computes would mean anything: use an intact copy of it")
    if not config.tie_word_embeddings and not torch.equal(model.lm_head.weight, model.transformer.wte.weight):
        raise CheckpointError(f"{name} has an output head of its own (not tied to wte); lmsmall's GPT-2 ties them")
    return model


def offline_check(name, local, error):
    """The one-line reason when a Hub name failed because the Hub cannot be reached."""
    if not local and "connect" in str(error):
        raise CheckpointError(f"{name} is neither a local folder nor in the Hugging Face cache, and the Hub cannot "
                              f"be reached (offline?); connect once, or give a folder written by save_pretrained")


def check_gpt2_config(config, name):
    """The options of GPT2Config that baseline_gpt2 computes; anything else is another model."""
    if config.model_type != "gpt2":
        raise CheckpointError(f"{name} is a {config.model_type} model; convert_hf.py reads GPT-2 (model_type gpt2)")
    if config.vocab_size != GPT2_VOCAB:
        raise CheckpointError(f"{name} has a vocabulary of {config.vocab_size} tokens, not GPT-2's {GPT2_VOCAB}: "
                              f"another tokenizer, which lmsmall cannot run")
    differs = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
               "n_inner": (None, 4 * config.n_embd), "scale_attn_weights": (True,),
               "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,)}
    for option, fine in differs.items():
        if getattr(config, option, fine[0]) not in fine:
            raise CheckpointError(f"{name} sets {option}={getattr(config, option)!r}, which lmsmall's GPT-2 does "
                                  f"not compute (it needs {fine[0]!r})")


def gpt2_vocabulary():
    """GPT-2's token -> id table (encoder.json) from tiktoken's cache, or None when it is not there."""
    path = tiktoken_file(GPT2_FILES["vocab.json"])
    return None if path is None else json.load(open(path, encoding="utf-8"))


def check_gpt2_tokenizer(folder):
    """A local folder's own tokenizer (if it has one) must be GPT-2's: lmsmall encodes with tiktoken's gpt2."""
    vocab = None
    if os.path.isfile(os.path.join(folder, "vocab.json")):
        vocab = json.load(open(os.path.join(folder, "vocab.json"), encoding="utf-8"))
    elif os.path.isfile(os.path.join(folder, "tokenizer.json")):
        vocab = json.load(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8")).get("model", {}).get("vocab")
    gpt2 = gpt2_vocabulary() if vocab is not None else None
    if gpt2 is not None and vocab != gpt2:
        raise CheckpointError(f"{folder} comes with a tokenizer other than GPT-2's; lmsmall runs Hugging Face "
                              f"models with the gpt2 tokenizer only")


def tiktoken_file(url):
    """The path of tiktoken's cached copy of url (its cache names files by the sha1 of the URL), or None."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
    return path if os.path.isfile(path) else None


def run_config(block_size):
    """The run settings a converted model carries (what finetune.py and train_mntp.py inherit): the project's
    GPT-2 setup, the rtx3080 preset (gpt2 tokenizer, math-reasoning data, lr 6e-4 .. 6e-5)."""
    cfg = dict(COMMON_DEFAULTS, **TRAIN_PRESETS["rtx3080"], preset="rtx3080", model_name="baseline_gpt2",
               model_overrides={}, entry_point="convert_hf.py")
    cfg["seq_len"] = min(cfg["seq_len"], block_size)
    return cfg


def from_hf(name):
    """An lmsmall baseline_gpt2 checkpoint (the dict a checkpoint.pt holds) of a Hugging Face GPT-2."""
    hf = load_hf_gpt2(name)
    c = hf.config
    padded = (GPT2_VOCAB + 63) // 64 * 64
    config = model_config("baseline_gpt2", preset=None, vocab_size=padded, block_size=c.n_positions,
                          n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, dropout=0.0)
    state = {}
    for key, tensor in hf.state_dict().items():
        if key == "lm_head.weight" or not key.startswith("transformer."):
            continue  # the head is tied to wte (checked in load_hf_gpt2)
        tensor = tensor.detach()
        state[lmsmall_name(key)] = (tensor.t() if transposed(key) else tensor).contiguous().clone()
    wte = state["wte.weight"]  # padded rows: the mean embedding (see the top of this file)
    state["wte.weight"] = torch.cat([wte, wte.mean(0, keepdim=True).expand(padded - GPT2_VOCAB, -1)])
    return {"format": CHECKPOINT_FORMAT, "model_name": "baseline_gpt2", "model_config": dataclasses.asdict(config),
            "model_state": state, "model_extra_state": {}, "config": run_config(c.n_positions),
            "converted_from": f"hf:{name}"}


def absolute_checkpoint(spec):
    """A --checkpoint value with its path made absolute (a run folder records it; --resume may run elsewhere).
    hf:NAME stays as it is unless NAME is a local folder."""
    spec = str(spec)
    if spec.startswith("hf:"):
        return "hf:" + os.path.abspath(spec[3:]) if os.path.isdir(spec[3:]) else spec
    return os.path.abspath(spec)
