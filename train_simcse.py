"""
Unsupervised SimCSE (LLM2Vec's third step, after bidirectional attention and MNTP): train an encoder so that
two dropout views of a text embed alike and different texts apart. Any causal, MNTP (train_mntp.py) or
converted (hf:) checkpoint of a model with an `attention` option (baseline_gpt2, progressive_diverging).

    python train_simcse.py --checkpoint runs/mntp/checkpoint.pt --out-dir runs/simcse
    python train_simcse.py --out-dir runs/simcse --resume
    python embed.py --checkpoint runs/simcse/checkpoint.pt --input texts.txt --out emb.npy

1. The model is rebuilt with attention="bidirectional" (an MNTP checkpoint already is) and attention dropout
   --dropout (default 0.3, LLM2Vec's). The dropout is what makes two views of one text differ: --dropout 0 is
   refused. In this codebase's blocks (components.py) dropout acts on the attention probabilities only, not on
   the residual stream or the MLP; that is also where LLM2Vec puts it (it sets the Llama/Mistral config's
   attention_dropout, the only dropout those models have).
2. The texts are the documents of the run's train split (the stream cut at <|endoftext|>; val and test are
   only evaluated), each fed as embed.py feeds a text, <|endoftext|> text <|endoftext|>, the text cut to
   --max-len tokens in all (default 128, LLM2Vec's; at most the model's context). A step is one batch of
   --batch-size B texts (default 32) in a random order that changes every epoch, right-padded to --max-len
   with a key mask, so padding is never attended to and never pooled.
3. Shapes: ids (B, T) -> the batch twice, (2B, T), in one forward with dropout on (the two copies draw
   independent masks) -> features (2B, T, C) -> pooled (--pooling, embed.pool: mean by default, or
   weighted-mean, last, eos; over the text tokens only) -> z1, z2 (B, C), the two views.
4. The loss is LLM2Vec's (its HardNegativeNLLLoss without hard negatives; sentence-transformers'
   MultipleNegativesRankingLoss with scale 1 / temperature): scores = cos(z1_i, z2_j) / --temperature
   (default 0.05), (B, B), and the cross-entropy of each row with label i, the diagonal: each first view must
   pick its own second view among the B second views of the batch (in-batch negatives). One direction
   (view 1 -> view 2), as LLM2Vec.
5. LoRA (rank 8 by default, --lora-rank 0 trains every weight) on every attention and MLP linear; the rest is
   frozen. An MNTP checkpoint stores merged weights, so a fresh adapter is trained on top of them. The
   checkpoint stores merged weights again (see finetune.py) and records --pooling, which embed.py then uses
   (embed.py runs the encoder without dropout).

Rows of metrics.jsonl: "loss", "alignment" (the mean of ||z1 - z2||^2 over the positive pairs, unit vectors)
and "uniformity" (log of the mean of exp(-2 ||z_i - z_j||^2) over the distinct pairs of first views), Wang &
Isola 2020; lower is better for both. Train rows also hold lr and tokens (B x --max-len per step, padding
included). Val (and, at the end, test) rows: the same figures on the first texts of that split with the
dropout masks of a fixed seed, so evaluations at different steps compare; --eval-batches batches of B texts
(fewer if the split has fewer texts).

Defaults otherwise as finetune.py and train_mntp.py (the base run's data; --lr the base run's peak lr with LoRA,
its final lr without), with --max-steps 100: on the 2-core CPU of docs/results/retrieval.md a tiny (4 x 128)
model takes about 1.2 s a step at the defaults, about 2-3 minutes a run.
One process: torchrun is refused (the in-batch negatives of one batch would be split over the ranks).
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import cli

from base_trainer import TrainError
from data_file_utils import DataError
from dataloader import TokenDataLoader
from embed import POOLINGS, pool
from finetune import FinetuneTrainer, build_parser, resolve_config, run
from models import model_module

SIMCSE_DEFAULTS = dict(max_steps=100, warmup_steps=10, eval_interval=25, checkpoint_interval=25)
DEFAULT_LORA_RANK = 8
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_LEN = 128
EVAL_DROPOUT_SEED = 1234
BATCH_FLAGS = ("micro_batch_size", "seq_len", "total_batch_size")  # the trainer's; --batch-size, --max-len here


# ---- the objective ---------------------------------------------------------------------------

def two_views(model, ids, text_mask, key_mask, pooling):
    """(z1, z2), each (B, C): the pooled features of every text twice, from one forward of the batch stacked
    twice (2B rows), so that dropout draws independent masks for the two copies."""
    h = model.features(torch.cat([ids, ids]), key_mask=torch.cat([key_mask, key_mask]))   # (2B, T, C)
    z = pool(h.float(), torch.cat([text_mask, text_mask]), pooling)                       # (2B, C)
    return z.chunk(2)


def simcse_loss(z1, z2, temperature):
    """InfoNCE with in-batch negatives, one direction: cross-entropy of cos(z1_i, z2_j) / temperature, (B, B),
    with label i (the diagonal) for row i."""
    scores = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / temperature
    return F.cross_entropy(scores, torch.arange(len(z1), device=z1.device))


def alignment(z1, z2):
    """Wang & Isola's alignment (alpha 2): the mean squared distance of the positive pairs' unit vectors."""
    return (F.normalize(z1, dim=-1) - F.normalize(z2, dim=-1)).pow(2).sum(-1).mean()


def uniformity(z):
    """Wang & Isola's uniformity (t 2): log of the mean of exp(-2 d^2) over the distinct pairs of unit vectors."""
    return torch.pdist(F.normalize(z, dim=-1), p=2).pow(2).mul(-2).exp().mean().log()


def simcse_figures(model, ids, text_mask, key_mask, pooling, temperature):
    """(loss, {"alignment", "uniformity"}) of one batch; the figures are detached."""
    z1, z2 = two_views(model, ids, text_mask, key_mask, pooling)
    with torch.autocast(z1.device.type, enabled=False):  # cosines / 0.05 in fp32, also under CUDA's bf16 autocast
        loss = simcse_loss(z1, z2, temperature)
        return loss, {"alignment": alignment(z1, z2).detach(), "uniformity": uniformity(z1.detach())}


class SimCSEStep(nn.Module):
    """The training step module (DDP would wrap it): the SimCSE loss of one batch. The trainer's batch
    (x, y, loss_mask, key_mask) is (ids, text mask, None, key mask) here; the speed probes' dummy batch (no
    key mask) pools every position."""

    def __init__(self, model, pooling, temperature):
        super().__init__()
        self.model, self.pooling, self.temperature = model, pooling, temperature

    def forward(self, x, y, loss_mask, step, key_mask=None):
        key_mask = torch.ones_like(x, dtype=torch.bool) if key_mask is None else key_mask
        text_mask = y if y.dtype == torch.bool else key_mask
        return simcse_figures(self.model, x, text_mask, key_mask, self.pooling, self.temperature)


# ---- the texts -------------------------------------------------------------------------------

class TextBatches:
    """Batches of B documents of one split, each row <|endoftext|> document <|endoftext|> (the document cut to
    max_len - 2 tokens), right-padded to max_len: next_batch() -> (ids (B, T) long, text_mask (B, T) bool: the
    document's tokens, key_mask (B, T) bool: every real token). Documents are the split's stream cut at
    <|endoftext|> (the preparer writes one before each); empty ones are skipped.
    shuffle: batches follow a random order of all documents, a new one each epoch (from seed and the epoch), the
    last B - 1 left over in each epoch; otherwise the split's order from its first document, again and again.
    state_dict() / load_state_dict(): the position, for --resume."""

    def __init__(self, dataset_dir, split, batch_size, max_len, seed=0, shuffle=False, device="cpu"):
        self.stream = TokenDataLoader(dataset_dir, split, 1, 1)  # memory maps, value checks, the data's hold
        self.split, self.B, self.T, self.seed, self.shuffle = split, batch_size, max_len, seed, shuffle
        self.device = torch.device(device)
        self.vocab_size, self.tokens, self.bytes = self.stream.vocab_size, self.stream.tokens, self.stream.bytes
        self.eot = self.stream.eot_token
        self.starts, ends = self.stream.documents()
        self.lengths = np.minimum(ends - self.starts, max_len - 2)   # each cut to fit between two <|endoftext|>
        self.batches_per_epoch = len(self.starts) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"the {split} split of {dataset_dir} has {len(self.starts)} documents, fewer than "
                            f"--batch-size {batch_size}; lower --batch-size or use more data")
        self.batch = 0  # batches read so far
        self._order = (None, None)  # (epoch, its order of the documents)

    def order(self, epoch):
        if self._order[0] != epoch:
            n = len(self.starts)
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(n) if self.shuffle else np.arange(n))
        return self._order[1]

    def next_batch(self):
        epoch, i = divmod(self.batch, self.batches_per_epoch)
        self.batch += 1
        docs = self.order(epoch)[i * self.B:(i + 1) * self.B]
        ids = torch.zeros(self.B, self.T, dtype=torch.long)
        text = torch.zeros(self.B, self.T, dtype=torch.bool)
        real = torch.zeros(self.B, self.T, dtype=torch.bool)
        for r, d in enumerate(docs):
            n = int(self.lengths[d])
            tokens = self.stream.read(int(self.starts[d]), n)
            ids[r, 0], ids[r, 1:n + 1], ids[r, n + 1] = self.eot, torch.from_numpy(tokens), self.eot
            text[r, 1:n + 1] = True
            real[r, :n + 2] = True
        return ids.to(self.device), text.to(self.device), real.to(self.device)

    def state_dict(self):
        return {"batch": self.batch, "documents": len(self.starts), "batch_size": self.B, "max_len": self.T,
                "split": self.split, "content_hash": self.stream.manifest.get("content_hash")}

    def load_state_dict(self, state):
        if (state.get("content_hash"), state.get("documents"), state.get("batch_size")) != \
                (self.stream.manifest.get("content_hash"), len(self.starts), self.B):
            raise DataError(f"the saved text position belongs to other data or another --batch-size than "
                            f"{self.stream.dataset_dir}; resume with the same data or start a new run")
        self.batch = int(state["batch"])

    def close(self):
        self.stream.close()


# ---- the trainer -----------------------------------------------------------------------------

class SimCSETrainer(FinetuneTrainer):
    reports_bpb = False  # the loss is contrastive, not a language-model loss

    def entry_point(self):
        return "train_simcse.py"

    def load_base(self):
        return super().load_base(attention="bidirectional", dropout=self.cfg["dropout"])

    def make_loader(self, split, batch_size=None):
        """The split's texts (TextBatches): shuffled for training, in order for evaluation."""
        cfg = self.cfg
        return TextBatches(self.dataset_dir, split, cfg["batch_size"], cfg["max_len"], cfg["seed"],
                           shuffle=split == "train", device=self.device)

    def next_batch(self, loader):
        ids, text_mask, key_mask = loader.next_batch()
        return ids, text_mask, None, key_mask  # (x, y, loss_mask, key_mask) in the trainer's terms

    def make_step_module(self):
        return SimCSEStep(self.model, self.cfg["pooling"], self.cfg["temperature"])

    @torch.no_grad()
    def evaluate(self, split):
        """loss, alignment and uniformity of the split's first texts, dropout on with the masks of a fixed seed
        (the training's random state is put back afterwards)."""
        loader = self.make_loader(split)
        batches = min(self.cfg["eval_batches"], loader.batches_per_epoch)
        sums = {}
        self.model.train()  # dropout on: the two views
        devices = [self.device] if self.device_type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_DROPOUT_SEED)
            for _ in range(batches):
                x, y, loss_mask, key_mask = self.next_batch(loader)
                with self.autocast:
                    figures = self.evaluation_losses(x, y, loss_mask, key_mask)
                for k, v in figures.items():
                    sums[k] = sums.get(k, 0.0) + v
        loader.close()
        result = {k: float(v) / batches for k, v in sums.items()}
        self.write_metrics({"step": self.step, "split": split, **result, "tokens": self.tokens_seen})
        self.log(f"step {self.step:5d} | {split} loss {result['loss']:.4f} | alignment {result['alignment']:.4f} | "
                 f"uniformity {result['uniformity']:.4f}")
        return result

    def evaluation_losses(self, x, y, loss_mask, key_mask):
        loss, figures = SimCSEStep(self.model, self.cfg["pooling"], self.cfg["temperature"])(x, y, loss_mask,
                                                                                           self.step, key_mask)
        return {"loss": loss, **figures}


# ---- configuration ---------------------------------------------------------------------------

def resolve(argv=None):
    """(model_name, cfg, typed) of a train_simcse.py command line: finetune.py's, with SimCSE's settings."""
    parser = build_parser("Unsupervised SimCSE: train an lmsmall encoder on two dropout views of each text "
                          "(LLM2Vec step 3).", "simcse", DEFAULT_LORA_RANK)
    parser.add_argument("--batch-size", type=cli.positive_int, help=f"texts per step, each the others' negatives "
                        f"(default {DEFAULT_BATCH_SIZE}, at least 2)")
    parser.add_argument("--max-len", type=cli.positive_int, help=f"tokens per text, the two <|endoftext|> included "
                        f"(default {DEFAULT_MAX_LEN}, at most the model's context)")
    parser.add_argument("--temperature", type=cli.finite_float, help="the scores are cosines / temperature (default "
                        "0.05, sentence-transformers' scale 20)")
    parser.add_argument("--pooling", choices=POOLINGS, help="token features -> one vector (default mean; recorded "
                        "in the checkpoint for embed.py)")
    parser.add_argument("--dropout", type=cli.probability, help="attention dropout while training, which makes the "
                        "two views differ (default 0.3, LLM2Vec's; 0 is refused)")
    for action in parser._actions:  # the trainer's batch flags: a step here is --batch-size texts (refused below)
        if action.dest in BATCH_FLAGS:
            action.help = argparse.SUPPRESS
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("train_simcse.py runs in one process: under torchrun each rank would hold part of a batch "
                         "and lose the others' texts as negatives; run it with python")
    name, cfg, typed = resolve_config(argv, parser, SIMCSE_DEFAULTS, "train_simcse.py", DEFAULT_LORA_RANK,
                                      finish_config)
    fixed = [f"--{k.replace('_', '-')}" for k in BATCH_FLAGS if k in typed]
    if fixed:
        raise TrainError(f"{' and '.join(fixed)} {'does' if len(fixed) == 1 else 'do'} not apply to train_simcse.py: "
                         f"a step is one batch of --batch-size texts of at most --max-len tokens")
    return name, cfg, typed


def finish_config(name, cfg, typed):
    """SimCSE's own settings, checked before anything is written."""
    if "attention" not in model_module(name).Config.__dataclass_fields__:
        raise TrainError(f"{name} has no attention option; SimCSE needs baseline_gpt2 or progressive_diverging")
    if cfg.get("loss_on", "all") != "all" or cfg.get("filler_token"):
        raise TrainError("train_simcse.py scores whole texts; --loss-on answer and --filler-token do not apply")
    for key, value in (("batch_size", DEFAULT_BATCH_SIZE), ("temperature", 0.05), ("pooling", "mean"),
                       ("dropout", 0.3)):
        cfg.setdefault(key, value)
    block_size = cfg["base_model_config"]["block_size"]
    cfg.setdefault("max_len", min(DEFAULT_MAX_LEN, block_size))
    if cfg["batch_size"] < 2:
        raise TrainError(f"--batch-size {cfg['batch_size']}: a text alone in its batch has no negatives to be told "
                         f"apart from; use --batch-size 2 or more (default {DEFAULT_BATCH_SIZE})")
    if not cfg["temperature"] > 0:
        raise TrainError(f"--temperature must be > 0, not {cfg['temperature']:g} (default 0.05)")
    if cfg["dropout"] == 0:
        raise TrainError("--dropout 0: without dropout the two views of a text are the same view and the loss "
                         "teaches nothing; give a rate between 0 and 1 (default 0.3)")
    if cfg["dropout"] >= 1:
        raise TrainError(f"--dropout {cfg['dropout']:g} drops every attention weight; give a rate below 1 "
                         f"(default 0.3)")
    if not 3 <= cfg["max_len"] <= block_size:
        raise TrainError(f"--max-len {cfg['max_len']} must lie in 3..{block_size} (two <|endoftext|> and at least "
                         f"one token of text, within the model's context)")
    # One step = one batch of texts: the trainer's batch settings follow (no accumulation, no auto size).
    cfg.update(micro_batch_size=cfg["batch_size"], base_micro_batch_size=cfg["batch_size"], micro_batch_auto=False,
               seq_len=cfg["max_len"], total_batch_size=cfg["batch_size"] * cfg["max_len"])


if __name__ == "__main__":
    sys.exit(run(SimCSETrainer, resolve=resolve))
