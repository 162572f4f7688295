"""
The training scripts' command line: the presets, the flags every trainer shares, each model's options as
flags, and how a run's settings are resolved (COMMON_DEFAULTS < TRAIN_PRESETS[preset] < the model's
TRAIN_PRESETS < the recipe < typed flags), also against a checkpoint (--resume) and the batch sizes.
base_trainer.py owns what happens with them.
"""

import argparse
import dataclasses
import os

from plumbing import cli
import optim
from plumbing import trainer_console
from models import model_module

TRAIN_PRESETS = {
    # The seed's setup: its 80k micro-batches of 8 x 256 = 164M tokens, i.e. 313 steps of 524288 tokens.
    # build-nanogpt warms up for 715 of 19073 steps (3.75%); the same fraction of 313 steps is 12.
    "rtx3080": dict(data="math-reasoning", tokenizer="gpt2", micro_batch_size=8, seq_len=256,
                    total_batch_size=524288, lr=6e-4, min_lr=6e-5, warmup_steps=12, max_steps=313,
                    weight_decay=0.1, grad_clip=1.0, eval_interval=25, eval_batches=64,
                    checkpoint_interval=25, max_tokens=None),
    # Offline on a laptop CPU in about a minute; a small model tolerates a large learning rate.
    "tiny": dict(data="synthetic-math", tokenizer="bytes", micro_batch_size=8, seq_len=128,
                 total_batch_size=1024, lr=3e-3, min_lr=3e-4, warmup_steps=20, max_steps=200,
                 weight_decay=0.1, grad_clip=1.0, eval_interval=50, eval_batches=8,
                 checkpoint_interval=50, max_tokens=None),
}
COMMON_DEFAULTS = dict(data_dir="data", seed=1337, data_seed=1337, device="auto", compile=None, resume=False,
                       overwrite=False, loss_on="all", filler_token=None, threads=None, skip_nonfinite=0,
                       recipe="gpt2", **optim.DEFAULTS)
# --recipe modern: every modern switch at once, the speedrun's architecture and optimizer. Flags given
# on the command line still win (e.g. --recipe modern --optimizer adamw).
RECIPES = {"gpt2": {}, "modern": dict(pos="rope", norm="rms", mlp="relu2", qk_norm=True, zero_init_proj=True,
                                      optimizer="muon")}
# What --resume may change; everything else comes from the checkpoint so the run continues exactly.
RESUME_MAY_CHANGE = {"max_steps", "eval_interval", "eval_batches", "checkpoint_interval", "device", "compile",
                     "resume", "overwrite", "out_dir", "data_dir", "threads", "skip_nonfinite",
                     "micro_batch_size", "compile_mode", "memory_budget"}  # speed only (speed.py)
# vocab_size and block_size are set from the data and --seq-len; attention="bidirectional" would let a
# next-token model see its targets (only train_mntp.py switches it, for an encoder).
NOT_FLAGS = {"vocab_size", "block_size", "attention"}
LOSS_ON = ("all", "answer")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# Every numeric model option has a range at the command line. Whole numbers are sizes and counts >= 1 unless
# named here; other numbers any finite float32 unless named here. What depends on other sizes (n_head divides
# n_embd, conv_attention's levels fit the context, the model fits the device's memory) is checked when the
# model is built, before anything is written.
MODEL_FLAG_TYPES = {"dropout": cli.probability, "p_bw": cli.probability, "stage2_at": cli.probability,
                    "stage3_at": cli.probability, "lora_alpha": cli.positive_float,
                    "n_full_blocks": cli.nonnegative_int, "n_level_blocks": cli.nonnegative_int,
                    "bw_seed": cli.seed}

class TrainError(Exception):
    """A problem with the command line or the run folder; the message says what to do."""


def str2bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def resume_mode(text):
    """--resume alone: continue, or fail if there is nothing to continue; --resume auto: continue if a checkpoint
    exists, else start a new run (for schedulers that requeue the same command)."""
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', not {text!r}")
    return text


def build_parser(model_name):
    p = cli.ArgumentParser(description=f"Train {model_name}. Every default comes from --preset.")
    # Every option defaults to None so that we know what the user typed: preset < typed.
    p.add_argument("--preset", choices=list(TRAIN_PRESETS),  # None when not typed: --resume compares a typed one
                   help="default rtx3080: the seed's sizes, for a GPU (hours to days on a CPU); tiny: a laptop "
                   "CPU, offline, a few minutes")
    p.add_argument("--recipe", choices=list(RECIPES), help="gpt2 (default) | modern: --pos rope --norm rms --mlp relu2 "
                   "--qk-norm true --zero-init-proj true --optimizer muon in one flag (typed flags win)")
    add_trainer_arguments(p, model_name)
    group = p.add_argument_group(f"{model_name} options")
    for field in dataclasses.fields(model_module(model_name).Config):
        if field.name in NOT_FLAGS:
            continue
        if field.type in (bool, "bool"):
            kind = str2bool
        elif field.type in (int, "int"):
            kind = MODEL_FLAG_TYPES.get(field.name, cli.positive_int)
        elif field.type in (float, "float"):
            kind = MODEL_FLAG_TYPES.get(field.name, cli.finite_float)
        else:
            kind = str
        group.add_argument("--" + field.name.replace("_", "-"), dest="model." + field.name, type=kind,
                           help=f"(preset default: see models/{model_name}.py)")
    trainer_console.describe_options(p, model_name, list(TRAIN_PRESETS), lambda k: preset_defaults(model_name, k))
    return p


def add_trainer_arguments(p, model_name="<model>"):
    """The options of the training loop, shared by train_<model>.py, finetune.py and train_mntp.py."""
    p.add_argument("--data", type=cli.data_spec, help="synthetic-math | math-reasoning | json:PATH | text:PATH")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"])
    p.add_argument("--max-tokens", type=cli.count, help="token budget when preparing the data, e.g. 10M")
    p.add_argument("--data-dir", help="where prepared token shards live (default data/)")
    p.add_argument("--out-dir", type=cli.output_dir, help=f"run folder (default runs/{model_name})")
    p.add_argument("--max-steps", type=cli.positive_int)
    p.add_argument("--eval-interval", type=cli.positive_int)
    p.add_argument("--eval-batches", type=cli.positive_int)
    p.add_argument("--checkpoint-interval", type=cli.positive_int)
    p.add_argument("--resume", nargs="?", const=True, type=resume_mode, default=None,
                   help="continue from out-dir/checkpoint.pt (fails if there is none); --resume auto: continue "
                   "if there is one, else start")
    p.add_argument("--overwrite", action="store_true", default=None, help="start over in an existing run folder")
    p.add_argument("--seed", type=cli.seed, help="initial weights and sampling")
    p.add_argument("--data-seed", type=cli.seed, help="which synthetic-math problems (kept apart from --seed so "
                   "that runs with different seeds see the same data)")
    p.add_argument("--device", type=cli.device, help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--micro-batch-size", type=cli.micro_batch_arg, help="rows per micro-step, or auto: the "
                   "largest power of two that fits the GPU's memory (default on CUDA; elsewhere the preset's)")
    p.add_argument("--seq-len", type=cli.positive_int)
    p.add_argument("--total-batch-size", type=cli.positive_int, help="tokens per optimizer step")
    p.add_argument("--lr", type=cli.learning_rate)
    p.add_argument("--min-lr", type=cli.rate_or_zero)
    p.add_argument("--warmup-steps", type=cli.nonnegative_int)
    p.add_argument("--weight-decay", type=cli.rate_or_zero)
    p.add_argument("--grad-clip", type=cli.positive_float, help="clip the gradient norm to this before each step")
    p.add_argument("--skip-nonfinite", type=cli.nonnegative_int, help="skip up to N optimizer steps whose loss or "
                   "gradient norm is not finite (logged as split 'nonfinite') before stopping (default 0)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the blocks and the head's loss (default: on with CUDA, off elsewhere; "
                        "see README, Speed on a GPU)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode (default: default; "
                   "reduce-overhead and max-autotune add CUDA graphs)")
    p.add_argument("--memory-budget", type=cli.positive_float, help="GiB that --micro-batch-size auto may use "
                   "(default: the GPU's free memory, at most 10 for the rtx3080 presets)")
    optim.add_optimizer_arguments(p)
    # Muon's learning rate and decay get the same ranges as --lr and --weight-decay (float32 must hold each step).
    set_types(p, {"muon_lr": cli.learning_rate, "muon_weight_decay": cli.rate_or_zero})
    p.add_argument("--loss-on", choices=LOSS_ON, help="all tokens (default) or only the answers of question/answer "
                   "data (the loader's loss mask)")
    p.add_argument("--filler-token", help="a string that is one token of the tokenizer (e.g. ' blah' with gpt2): "
                   "such tokens are neither attended to nor scored")
    p.add_argument("--threads", type=cli.thread_count, help="CPU threads of torch (default: OMP_NUM_THREADS if "
                   "set; with --preset tiny on a CPU 1 if the machine is busy, else one per core, at most 4; else "
                   "torch's); at most 4 per CPU")
    return p


def set_types(parser, types):
    """Give the options {dest: type} that another module added to `parser` a stricter argparse type."""
    for action in parser._actions:
        if action.dest in types:
            action.type = types[action.dest]


def check_resume_overwrite(typed):
    """--resume (continue the run) and --overwrite (start it over) contradict each other: refuse both at once
    rather than silently ignore one."""
    if typed.get("resume") and typed.get("overwrite"):
        resume = "--resume auto" if typed["resume"] == "auto" else "--resume"
        raise cli.UsageError(f"{resume} continues the run in --out-dir and --overwrite starts it over; give only one "
                             f"of them")


def resolve_config(model_name, argv):
    """All settings: COMMON_DEFAULTS < TRAIN_PRESETS[preset] < the model's TRAIN_PRESETS < typed flags.
    Returns (config, typed) where typed holds only what the user gave on the command line."""
    ns = build_parser(model_name).parse_args(argv)
    typed = {k: v for k, v in vars(ns).items() if v is not None}
    check_resume_overwrite(typed)
    cfg = preset_defaults(model_name, typed.get("preset", "rtx3080"))
    recipe = dict(RECIPES[typed.get("recipe", "gpt2")])
    cfg["optimizer"] = recipe.pop("optimizer", cfg["optimizer"])
    cfg.update({k: v for k, v in typed.items() if not k.startswith("model.")})
    cfg["model_overrides"] = {**recipe, **{k[len("model."):]: v for k, v in typed.items() if k.startswith("model.")}}
    return cfg, typed


def preset_defaults(model_name, preset):
    """The settings of a preset before any flag: COMMON_DEFAULTS < TRAIN_PRESETS < the model's TRAIN_PRESETS."""
    cfg = dict(COMMON_DEFAULTS, out_dir=f"runs/{model_name}", preset=preset, model_name=model_name)
    cfg.update(TRAIN_PRESETS[preset])
    cfg.update(getattr(model_module(model_name), "TRAIN_PRESETS", {}).get(preset, {}))
    return cfg


# ---- checks of a run's settings (base_trainer.py calls them before anything is written) ----------------

def check_out_dir(cfg):
    """--out-dir must be a folder this process can write, and not inside --data-dir (a dataset folder's lock is
    .lock too: the run would wait for itself)."""
    problem = cli.writable_dir_problem(cfg["out_dir"])  # also the default and finetune's derived one
    if problem:
        raise TrainError(f"--out-dir: {problem}")
    out, data = os.path.realpath(cfg["out_dir"]), os.path.realpath(cfg["data_dir"])
    if out == data or out.startswith(data + os.sep):
        raise TrainError(f"--out-dir {cfg['out_dir']} is inside --data-dir {cfg['data_dir']}, where the prepared "
                         f"datasets live; choose a run folder outside it (default runs/<model>)")


def adopt_saved_config(saved_config, typed):
    """The settings of a resumed run: the checkpoint's, with the typed flags that --resume may change
    (RESUME_MAY_CHANGE); any other typed flag must equal the saved value, or TrainError."""
    # Runs from before later options had their defaults; Muon runs from before --muon-qkv oriented q/k/v as one matrix.
    saved = {**COMMON_DEFAULTS, "muon_qkv": "fused", **saved_config}
    for key, value in typed.items():
        name = key[len("model."):] if key.startswith("model.") else key
        saved_value = saved["model_overrides"].get(name) if key.startswith("model.") else saved.get(key)
        if key == "data" and saved_value:  # runs from before --data paths were made absolute
            saved_value = cli.data_spec(saved_value)
        if name not in RESUME_MAY_CHANGE and value != saved_value:
            raise TrainError(f"--{name.replace('_', '-')} {value} differs from the run being resumed "
                             f"({saved_value}); drop it to resume exactly, or start a new --out-dir")
    for key in RESUME_MAY_CHANGE - {"resume", "overwrite"}:
        if key in typed:
            saved[key] = typed[key]
    saved["resume"] = True
    return saved


def check_lr_schedule(cfg, typed):
    """The cosine schedule decays from --lr to --min-lr: a --min-lr above --lr (e.g. --lr 1e-4 with the tiny
    preset's min_lr 3e-4) would make the learning rate rise to min_lr instead."""
    lr, min_lr = cfg["lr"], cfg["min_lr"]
    if min_lr > lr:
        whose = "" if "min_lr" in typed else " (the preset's default)"
        raise TrainError(f"--min-lr {min_lr:g}{whose} is above --lr {lr:g}: the schedule would raise the "
                         f"learning rate instead of decaying it; give --min-lr {lr / 10:g} (or any value <= --lr)")


def grad_accum_steps(cfg, world_size):
    """Micro-steps per optimizer step: --total-batch-size / (micro batch x seq len x processes), which must divide."""
    B, T = cfg["micro_batch_size"], cfg["seq_len"]
    if min(B, T, cfg["total_batch_size"], cfg["max_steps"]) < 1:
        raise TrainError("--micro-batch-size, --seq-len, --total-batch-size and --max-steps must be positive")
    per_micro_step = B * T * world_size
    if cfg["total_batch_size"] % per_micro_step:
        fit = cfg["total_batch_size"] // (T * world_size)  # a micro batch that fits, if any
        fits = fit and fit * T * world_size == cfg["total_batch_size"]
        hint = f"; e.g. --micro-batch-size {fit}" if fits else ""
        raise TrainError(f"--total-batch-size {cfg['total_batch_size']} is not a multiple of micro batch x "
                         f"seq len x processes = {B} x {T} x {world_size} = {per_micro_step}{hint}")
    return cfg["total_batch_size"] // per_micro_step
