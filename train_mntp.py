"""
Bi-MNTP (LLM2Vec step 1, seed 004): turn a trained causal model into a bidirectional encoder.

    python train_mntp.py --checkpoint runs/baseline_gpt2/checkpoint.pt --out-dir runs/mntp
    python train_mntp.py --out-dir runs/mntp --resume
    python embed.py --checkpoint runs/mntp/checkpoint.pt --input texts.txt --out emb.npy

1. The model is rebuilt with attention="bidirectional": every position now sees every other one.
2. A mask token is added: the first id above the tokenizer's (257 for bytes, 50257 for gpt2). The embedding
   table is padded to a multiple of 64, so that row exists; it starts as the mean of the real tokens' rows.
   The id is recorded in the checkpoint (config "mask_token").
3. In each training window a fixed fraction (--mask-rate, default 0.2) of the input tokens is replaced by the
   mask token: round(rate * (T - 1)) positions per row, drawn uniformly from positions 1..T-1 (never the
   first, which has no previous position).
4. Masked token i is predicted from the logits at position i - 1, as in next-token prediction (LLM2Vec's
   shift): the model keeps its output head and only has to adapt to seeing both sides. The loss is the mean
   cross-entropy over masked positions only.
5. LoRA (rank 8 by default, --lora-rank 0 trains every weight) on every attention and MLP linear; the rest
   is frozen. The checkpoint stores merged weights (see finetune.py), so it loads as a plain model.
Works for checkpoints of models with an `attention` option: baseline_gpt2 and progressive_diverging.

Defaults otherwise as finetune.py (the base run's data and batch shape), with --max-steps 200, --lr the base
run's peak lr. Val rows hold the masked-token "loss" and "acc" (top-1 accuracy on masked tokens), on masks
drawn from a fixed seed, so evaluations at different steps compare.
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
import sys

import torch
import torch.nn as nn

from plumbing import cli

from auto_regressive_model import masked_cross_entropy
from base_data_preparer import get_tokenizer
from base_trainer import TrainError
from finetune import FinetuneTrainer, build_parser, resolve_config, run
from models import model_module

MNTP_DEFAULTS = dict(max_steps=200, warmup_steps=10, eval_interval=50, checkpoint_interval=50)
DEFAULT_LORA_RANK = 8
EVAL_MASK_SEED = 1234


def mntp_mask(x, rate, mask_token, generator=None):
    """(inputs, masked): x (B, T) with round(rate * (T - 1)) positions per row (never position 0) replaced by
    mask_token, and the bool (B, T) marking them."""
    B, T = x.shape
    k = max(1, round(rate * (T - 1)))
    scores = torch.rand(B, T - 1, device=x.device, generator=generator)
    chosen = scores.argsort(dim=1)[:, :k] + 1                         # k distinct positions in 1..T-1
    masked = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, chosen, True)
    return x.masked_fill(masked, mask_token), masked


def mntp_loss(model, x, rate, mask_token, generator=None):
    """(loss, accuracy) of masked next-token prediction: the token at masked position i is predicted from the
    logits at i - 1; only masked positions count."""
    inputs, masked = mntp_mask(x, rate, mask_token, generator)
    logits, _ = model(inputs)
    # position i-1 predicts token i: drop the last logits row and the first target column
    pred, targets, scored = logits[:, :-1], x[:, 1:], masked[:, 1:].float()
    loss = masked_cross_entropy(pred, targets, scored)
    hit = (pred.argmax(-1) == targets).float()
    return loss, (hit * scored).sum() / scored.sum()


class MNTPStep(nn.Module):
    """The training step module (DDP wraps it): the MNTP loss of one micro-batch."""

    def __init__(self, model, rate, mask_token):
        super().__init__()
        self.model, self.rate, self.mask_token = model, rate, mask_token

    def forward(self, x, y, loss_mask, step, key_mask=None):
        loss, acc = mntp_loss(self.model, x, self.rate, self.mask_token)  # the global RNG: --resume restores it
        return loss, {"acc": float(acc)}


class MNTPTrainer(FinetuneTrainer):
    reports_bpb = False  # the loss is over masked tokens, not a language-model loss

    def entry_point(self):
        return "train_mntp.py"

    def load_base(self):
        model = super().load_base(attention="bidirectional")
        with torch.no_grad():  # a neutral start for the new token: the mean of the tokenizer's embeddings
            model.wte.weight[self.cfg["mask_token"]] = model.wte.weight[:self.cfg["mask_token"]].mean(0)
        return model

    def make_step_module(self):
        return MNTPStep(self.model, self.cfg["mask_rate"], self.cfg["mask_token"])

    def evaluate(self, split):
        self.eval_generator = torch.Generator(device=self.device).manual_seed(EVAL_MASK_SEED)
        return super().evaluate(split)

    def evaluation_losses(self, x, y, loss_mask, key_mask):
        loss, acc = mntp_loss(self.model, x, self.cfg["mask_rate"], self.cfg["mask_token"], self.eval_generator)
        return {"loss": loss, "acc": acc}


def resolve(argv=None):
    """(model_name, cfg, typed) of a train_mntp.py command line: finetune.py's, with MNTP's defaults."""
    parser = build_parser("Bi-MNTP: make a causal lmsmall checkpoint a bidirectional encoder (LLM2Vec step 1).",
                          "mntp", DEFAULT_LORA_RANK)
    parser.add_argument("--mask-rate", type=cli.open_fraction, help="fraction of input tokens replaced by the mask token "
                        "(default 0.2)")
    return resolve_config(argv, parser, MNTP_DEFAULTS, "train_mntp.py", DEFAULT_LORA_RANK, finish_config)


def finish_config(name, cfg, typed):
    """MNTP's own settings, checked before anything is written."""
    if "attention" not in model_module(name).Config.__dataclass_fields__:
        raise TrainError(f"{name} has no attention option; MNTP needs baseline_gpt2 or progressive_diverging")
    if cfg.get("loss_on", "all") != "all" or cfg.get("filler_token"):
        raise TrainError("train_mntp.py scores the masked tokens; --loss-on answer and --filler-token do not apply")
    cfg.setdefault("mask_rate", 0.2)
    if not 0.0 < cfg["mask_rate"] < 1.0:
        raise TrainError(f"--mask-rate must lie strictly between 0 and 1, not {cfg['mask_rate']}")
    if "mask_token" not in cfg:
        cfg["mask_token"] = get_tokenizer(cfg["tokenizer"]).n_vocab  # the first id the tokenizer never produces
        extra = getattr(model_module(name), "EXTRA_TOKENS", 0)
        if cfg["mask_token"] >= cfg["base_model_config"]["vocab_size"] - extra:
            raise TrainError(f"the model's vocabulary has no spare row for a mask token "
                             f"(vocab_size {cfg['base_model_config']['vocab_size']})")


if __name__ == "__main__":
    sys.exit(run(MNTPTrainer, resolve=resolve))
