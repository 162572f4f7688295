"""
Fine-tune a trained checkpoint on other data: answer-only if asked, optionally with LoRA.

    python finetune.py --checkpoint runs/baseline_gpt2/checkpoint.pt --data synthetic-math --loss-on answer \\
        --out-dir runs/finetune --max-steps 100
    python finetune.py --checkpoint runs/baseline_gpt2/checkpoint.pt --data json:../shared/data/gsm8k/train.jsonl \\
        --loss-on answer --lora-rank 8
    python finetune.py --out-dir runs/finetune --resume

Any registered model. Architecture, weights and tokenizer come from the checkpoint; the training loop is
BaseTrainer's (the same options, metrics.jsonl, exact --resume, Ctrl-C, torchrun). Options not given default to
the base run's (data, batch, sequence length, weight decay, ...), except --max-steps 100, --warmup-steps 10,
evaluation and checkpoints every 25 steps, and --lr: the base run's final lr (its min_lr) for a full fine-tune,
its peak lr with LoRA (a zero-initialised low-rank update needs larger steps); --min-lr defaults to lr / 10.
The data must use the checkpoint's tokenizer (another --tokenizer is refused).

LoRA (--lora-rank R, --lora-alpha default 2R): every nn.Linear inside a block's attention and MLP becomes a
components.LoRALinear, W x + b + (alpha / R) B A x with W, b frozen; everything else is frozen as well
(embeddings, LayerNorms). A model's own LoRA layers (progressive_diverging from stage 2) keep training.
A progressive_diverging checkpoint is fine-tuned in the stage it was saved in (its stage schedule does not run
again over the fine-tune's steps).
Saving merges: checkpoint.pt's "model_state" is the merged weights in the base architecture, which evaluate.py,
generate.py, embed.py and further fine-tunes load like any other checkpoint; the unmerged weights are stored
as "train_model_state" for --resume only.
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
import os
import sys

import torch.nn as nn

from checkpoint import CheckpointError, load_checkpoint
import base_trainer
from plumbing import cli
from base_trainer import COMMON_DEFAULTS, BaseTrainer, TrainError, add_trainer_arguments, check_filler_support
from plumbing.trainer_config import check_resume_overwrite
from components import MLP, LoRALinear, SelfAttention
from checkpoint import absolute_checkpoint
from models import create_model, model_module

FINETUNE_DEFAULTS = dict(max_steps=100, warmup_steps=10, eval_interval=25, checkpoint_interval=25)
# Taken over from the base run unless given on the command line.
INHERITED = ("data", "tokenizer", "data_dir", "data_seed", "micro_batch_size", "seq_len", "total_batch_size",
             "weight_decay", "grad_clip", "eval_batches", "preset", "seed", "device")


# ---- LoRA ------------------------------------------------------------------------------------

def add_lora(model, rank, alpha):
    """Freeze the model, then wrap every nn.Linear of a SelfAttention or MLP in a trainable LoRALinear.
    LoRALinear layers the model already has are left as they are, with their A and B trainable.
    Returns the names of the wrapped layers (merged_state_dict folds exactly these)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):  # the model's own LoRA
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            continue
        if not isinstance(module, (SelfAttention, MLP)):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}")
    return wrapped


def lora_targets(model):
    """The nn.Linear layers add_lora wraps: those directly inside a SelfAttention or MLP."""
    return [child for module in model.modules() if isinstance(module, (SelfAttention, MLP))
            for child in module.children() if isinstance(child, nn.Linear)]


def merged_state_dict(model, wrapped):
    """model.state_dict() with each LoRALinear in `wrapped` folded into plain weight and bias entries, i.e. the
    state dict of the model without those wrappers (what from_checkpoint() builds and loads)."""
    state = model.state_dict()
    for name in wrapped:
        merged = model.get_submodule(name).merged()
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state[f"{name}.weight"] = merged.weight.detach()
        if merged.bias is not None:
            state[f"{name}.bias"] = merged.bias.detach()
    return state


# ---- the trainer -----------------------------------------------------------------------------

class FinetuneTrainer(BaseTrainer):
    """BaseTrainer whose model starts from cfg["checkpoint"] (its architecture and weights), with optional LoRA."""

    def entry_point(self):
        return "finetune.py"

    def planned_target_offset(self):
        return self.cfg["base_model_config"].get("target_offset", 1)

    def check_model_before_data(self):
        pass  # the architecture is the base checkpoint's, built and checked when that run started

    def load_base(self, **config_changes):
        """The model of the base checkpoint (with config_changes, e.g. attention="bidirectional"), before LoRA."""
        base = load_checkpoint(self.cfg["checkpoint"])
        model = build_model(self.model_name, dict(base["model_config"], **config_changes),
                            base.get("model_extra_state", {}))
        try:
            model.load_state_dict(base["model_state"])
        except RuntimeError as e:
            raise CheckpointError(f"{self.cfg['checkpoint']} does not match model {self.model_name}: "
                                  f"{str(e).splitlines()[0]}") from None
        return model

    def setup_model(self):
        cfg = self.cfg
        if self.resume_ckpt is not None:  # the run's own checkpoint has the architecture (weights: restore())
            self.model = build_model(self.model_name, self.resume_ckpt["model_config"],
                                     self.resume_ckpt.get("model_extra_state", {}))
        else:
            self.model = self.load_base()
        if getattr(self.model, "grows", False):  # progressive_diverging: keep the checkpoint's stage
            self.model.grows = False
        self.model_cfg = self.model.config
        extra = getattr(model_module(self.model_name), "EXTRA_TOKENS", 0)
        if self.train_loader.vocab_size + extra > self.model_cfg.vocab_size:
            raise TrainError(f"the data's vocabulary ({self.train_loader.vocab_size} tokens) does not fit the "
                             f"model's {self.model_cfg.vocab_size}; fine-tune with the base run's tokenizer")
        if cfg["seq_len"] > self.model_cfg.block_size:
            raise TrainError(f"--seq-len {cfg['seq_len']} is longer than the model's context "
                             f"({self.model_cfg.block_size}); use --seq-len <= {self.model_cfg.block_size}")
        if cfg["lora_rank"]:
            narrowest = min(min(m.in_features, m.out_features) for m in lora_targets(self.model))
            if cfg["lora_rank"] > narrowest:  # a rank above a layer's width adds weights but no directions
                raise TrainError(f"--lora-rank {cfg['lora_rank']} is above the width of the narrowest layer LoRA "
                                 f"adapts ({narrowest}); use --lora-rank <= {narrowest}")
        self.lora_layers = add_lora(self.model, cfg["lora_rank"], cfg["lora_alpha"]) if cfg["lora_rank"] else []
        self.model.to(self.device)
        check_filler_support(self.model, self.filler_id, self.device)
        if cfg["compile"]:
            self.model.compile()
        self.optimizer = None
        self.build_optimizer()
        if self.master and self.resume_ckpt is None:
            trainable = self.model.num_params(trainable_only=True)
            self.log(f"fine-tuning {cfg['checkpoint']}: {trainable:,} of {self.model.num_params():,} parameters "
                     f"train" + (f" (LoRA rank {cfg['lora_rank']} on {len(self.lora_layers)} layers)"
                                 if self.lora_layers else ""))

    def model_states(self):
        if not self.lora_layers:
            return super().model_states()
        return {"model_state": merged_state_dict(self.model, self.lora_layers),
                "train_model_state": self.model.state_dict()}


def build_model(model_name, model_config, extra_state):
    """A model of the architecture a checkpoint describes (its stage etc. from extra_state), untrained."""
    model = create_model(model_name, preset=None, **model_config)
    model.load_extra_state(extra_state)
    return model


# ---- configuration ---------------------------------------------------------------------------

def build_parser(description=None, kind="finetune", lora_rank=0):
    p = cli.ArgumentParser(description=description or "Fine-tune an lmsmall checkpoint (any model).")
    p.add_argument("--checkpoint", help="the trained checkpoint to start from: a file, a run folder (its "
                   "checkpoint.pt) or hf:NAME_OR_DIR (not needed with --resume)")
    add_trainer_arguments(p, f"{kind}_<model>")
    p.add_argument("--lora-rank", type=cli.nonnegative_int, help=f"LoRA on attention and MLP with this rank (default: "
                   f"{lora_rank or 'none, every weight trains'})")
    p.add_argument("--lora-alpha", type=cli.positive_float, help="LoRA scale numerator (default 2 x rank)")
    return p


def resolve_config(argv, parser=None, defaults=FINETUNE_DEFAULTS, entry_point="finetune.py", lora_rank=0,
                   finish=None):
    """(model_name, cfg, typed). Resuming: the run folder's checkpoint names the model and holds the settings
    (trainer_config.adopt_saved_config merges what was typed). Otherwise: the base checkpoint's run settings <
    `defaults` < typed; then finish(name, cfg, typed) adds a subclass's own settings."""
    ns = (parser or build_parser()).parse_args(argv)
    typed = {k: v for k, v in vars(ns).items() if v is not None}
    check_resume_overwrite(typed)
    # --resume auto: continue the run in --out-dir if it has a checkpoint, else start one (the trainer, given
    # resume "auto", says so and may replace what an attempt without a checkpoint left there)
    if typed.get("resume") == "auto" and typed.get("out_dir") and os.path.exists(
            os.path.join(typed["out_dir"], "checkpoint.pt")):
        typed["resume"] = True
    if typed.get("resume") is True:
        out_dir = typed.get("out_dir")
        if not out_dir:
            raise TrainError("--resume needs --out-dir (the run folder to continue)")
        path = os.path.join(out_dir, "checkpoint.pt")
        if not os.path.exists(path):
            raise TrainError(f"nothing to resume: no checkpoint.pt in {out_dir}; run without --resume to start")
        name = load_checkpoint(path)["model_name"]
        if "checkpoint" in typed:
            typed["checkpoint"] = absolute_checkpoint(typed["checkpoint"])
        return name, dict(COMMON_DEFAULTS, out_dir=out_dir, resume=True), typed
    if "checkpoint" not in typed:
        raise TrainError(f"{entry_point} needs --checkpoint PATH (the trained model to start from)")
    typed["checkpoint"] = absolute_checkpoint(typed["checkpoint"])
    base = load_checkpoint(typed["checkpoint"])
    base_cfg, name = base["config"], base["model_name"]
    kind = entry_point[:-3].replace("train_", "")  # finetune, mntp
    if kind == "finetune" and base["model_config"].get("attention", "causal") != "causal":
        raise TrainError(f"{typed['checkpoint']} is an encoder ({base['model_config']['attention']} attention, e.g. "
                         f"MNTP): next-token fine-tuning would let every position see its target; fine-tune the "
                         f"causal checkpoint it came from")
    if "tokenizer" in typed and typed["tokenizer"] != base_cfg["tokenizer"]:
        raise TrainError(f"--tokenizer {typed['tokenizer']} differs from the checkpoint's ({base_cfg['tokenizer']}); "
                         f"a fine-tune must use the tokenizer the model was trained with")
    rank = typed.get("lora_rank", lora_rank)
    if rank < 0:
        raise TrainError("--lora-rank must be positive")
    cfg = dict(COMMON_DEFAULTS, model_name=name, out_dir=f"runs/{kind}_{name}", model_overrides={},
               max_tokens=None, min_lr=None, entry_point=entry_point, base_model_config=base["model_config"],
               lora_rank=rank, lora_alpha=float(typed.get("lora_alpha", 2 * rank)))
    cfg.update({k: base_cfg[k] for k in INHERITED if k in base_cfg})
    cfg["lr"] = base_cfg["lr"] if rank else base_cfg["min_lr"]
    cfg.update(defaults)
    cfg.update(typed)
    if cfg["min_lr"] is None:
        cfg["min_lr"] = cfg["lr"] / 10
    if cfg["data"] != base_cfg["data"] and "max_tokens" not in typed:
        cfg["max_tokens"] = None  # the new source's own default budget
    elif "max_tokens" not in typed:
        cfg["max_tokens"] = base_cfg.get("max_tokens")
    if finish is not None:
        finish(name, cfg, typed)
    return name, cfg, typed


def run(trainer_class, argv=None, resolve=resolve_config):
    """Entry point shared with train_mntp.py (base_trainer.run: one line and exit 2 on bad input)."""
    return base_trainer.run(trainer_class, resolve, argv)


if __name__ == "__main__":
    sys.exit(run(FinetuneTrainer))
